//! A tenant's view of the castore: the same stored content, deduplicated on
//! disk, but only what the tenant may see.
//!
//! A tenant sees a blob or a directory when it put it, when a build of its
//! produced it, or when it is reachable from a directory it sees. Every
//! grant is recorded when the content is stored through the tenant's view
//! ([`Grants`]), so "reachable" holds by construction: a directory is only
//! stored through a view when each child directory it names is already seen
//! by the tenant (or comes earlier in the same batch), and a build's outputs
//! are ingested through its tenant's view, so every directory of an output
//! tree is granted along with it. Blobs are different: a directory may name
//! any digest (snix's services do not check blobs on a directory put), so a
//! blob named by a seen directory is visible only if it is itself granted;
//! otherwise knowing a digest would be enough to read the bytes.
//!
//! Whatever a tenant may not see answers exactly as if it were not stored:
//! `has` false, `open_read` and `get` `None`, a put naming an unseen child
//! `UnknownChild`, a build input `MissingInput`. Putting bytes that are
//! already stored (by anyone) grants them: the tenant has proved it has
//! them. Timing aside: a put of bytes stored by another tenant takes a
//! different time than one of new bytes (the store skips writing them), and
//! reads of stored content are served from the same caches.
//!
//! [`Scoping`] picks the view for a caller: the whole store for one who sees
//! everything (an operator, any caller without authentication), the
//! tenant's view otherwise.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::BoxStream;
use tokio::io::AsyncRead;

use super::blob::{BatchPut, BlobBatch, BlobError, BlobReader, BlobService, StoredBlob};
use super::directory_service::{DirectoryError, DirectoryService};
use super::{B3Digest, Directory, Store};
use crate::hostfs::{Dir, RegularFile};
use crate::tenant::{Identity, Tenant};

pub mod grants;

pub use grants::{Grants, GrantsError, Kind};

/// How the server scopes the castore: by tenant when callers authenticate
/// (`grants` set), not at all otherwise.
#[derive(Debug, Clone, Default)]
pub struct Scoping {
    grants: Option<Grants>,
}

impl Scoping {
    /// Every caller sees the whole store (no authentication).
    pub fn none() -> Self {
        Self::default()
    }

    /// Callers who do not see everything see their tenant's view.
    pub fn by_tenant(grants: Grants) -> Self {
        Self {
            grants: Some(grants),
        }
    }

    /// The store as `who` may see it.
    pub fn store_for(&self, store: &Store, who: &Identity) -> Store {
        match (&self.grants, who.scope()) {
            (Some(grants), Some(tenant)) => view(store, grants.clone(), tenant.clone()),
            _ => store.clone(),
        }
    }
}

/// `tenant`'s view of `store`.
pub fn view(store: &Store, grants: Grants, tenant: Tenant) -> Store {
    let scope = Arc::new(Scope { grants, tenant });
    Store {
        blobs: Arc::new(ScopedBlobs {
            inner: store.blobs.clone(),
            scope: scope.clone(),
        }),
        directories: Arc::new(ScopedDirectories {
            inner: store.directories.clone(),
            scope,
        }),
    }
}

/// Whose view, and where its grants are.
struct Scope {
    grants: Grants,
    tenant: Tenant,
}

impl Scope {
    async fn sees_async(&self, kind: Kind, digest: &B3Digest) -> Result<bool, GrantsError> {
        self.grants.granted(&self.tenant, kind, digest).await
    }

    async fn grant(&self, kind: Kind, digests: Vec<B3Digest>) -> Result<(), GrantsError> {
        self.grants.grant(&self.tenant, kind, digests).await
    }
}

/// A grants failure, as a blob error (the store could not answer).
fn blob_grants(e: GrantsError) -> BlobError {
    BlobError::Grants(Box::new(e))
}

/// A grants failure, as a directory error.
fn directory_grants(e: GrantsError) -> DirectoryError {
    DirectoryError::Grants(Box::new(e))
}

/// A tenant's view of the blobs.
struct ScopedBlobs {
    inner: Arc<dyn BlobService>,
    scope: Arc<Scope>,
}

impl ScopedBlobs {
    async fn sees(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        self.scope
            .sees_async(Kind::Blob, digest)
            .await
            .map_err(blob_grants)
    }

    async fn granted(&self, stored: StoredBlob) -> Result<StoredBlob, BlobError> {
        self.scope
            .grant(Kind::Blob, vec![stored.digest])
            .await
            .map_err(blob_grants)?;
        Ok(stored)
    }
}

#[async_trait::async_trait]
impl BlobService for ScopedBlobs {
    async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        if !self.sees(digest).await? {
            return Ok(false);
        }
        self.inner.has(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError> {
        if !self.sees(digest).await? {
            return Ok(None);
        }
        self.inner.open_read(digest).await
    }

    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<StoredBlob, BlobError> {
        let stored = self.inner.put(reader).await?;
        self.granted(stored).await
    }

    async fn local_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        if !self.sees(digest).await? {
            return Ok(None);
        }
        self.inner.local_path(digest).await
    }

    async fn local_executable_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        if !self.sees(digest).await? {
            return Ok(None);
        }
        self.inner.local_executable_path(digest).await
    }

    async fn put_opened(&self, file: File, origin: &Path) -> Result<StoredBlob, BlobError> {
        let stored = self.inner.put_opened(file, origin).await?;
        self.granted(stored).await
    }

    async fn put_taken(
        &self,
        parent: &Dir,
        name: &OsStr,
        file: File,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        let stored = self.inner.put_taken(parent, name, file, origin).await?;
        self.granted(stored).await
    }

    fn batch(&self) -> Box<dyn BlobBatch + '_> {
        Box::new(ScopedBatch {
            inner: self.inner.batch(),
            scope: &self.scope,
            stored: Vec::new(),
        })
    }
}

/// A batch through a tenant's view: its blobs are granted when it commits
/// (once they are durable, so no grant names bytes a crash could lose).
struct ScopedBatch<'a> {
    inner: Box<dyn BlobBatch + 'a>,
    scope: &'a Scope,
    stored: Vec<B3Digest>,
}

impl ScopedBatch<'_> {
    fn note(&mut self, put: BatchPut) -> BatchPut {
        if let Ok(files) = &put {
            self.stored.extend(
                files
                    .iter()
                    .filter_map(|f| f.as_ref().ok())
                    .map(|s| s.digest),
            );
        }
        put
    }
}

#[async_trait::async_trait]
impl BlobBatch for ScopedBatch<'_> {
    async fn put_opened(&mut self, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let put = self.inner.put_opened(files).await;
        self.note(put)
    }

    async fn put_taken(&mut self, parent: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let put = self.inner.put_taken(parent, files).await;
        self.note(put)
    }

    async fn commit(&mut self) -> Result<(), BlobError> {
        self.inner.commit().await?;
        let stored = std::mem::take(&mut self.stored);
        self.scope
            .grant(Kind::Blob, stored)
            .await
            .map_err(blob_grants)
    }
}

/// A tenant's view of the directories.
struct ScopedDirectories {
    inner: Arc<dyn DirectoryService>,
    scope: Arc<Scope>,
}

impl ScopedDirectories {
    async fn sees(&self, digest: &B3Digest) -> Result<bool, DirectoryError> {
        self.scope
            .sees_async(Kind::Directory, digest)
            .await
            .map_err(directory_grants)
    }
}

#[async_trait::async_trait]
impl DirectoryService for ScopedDirectories {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        if !self.sees(digest).await? {
            return Ok(None);
        }
        self.inner.get(digest).await
    }

    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>> {
        // Every directory below a seen one is seen (see the module docs):
        // checking the root is enough.
        let (inner, scope, root) = (self.inner.clone(), self.scope.clone(), *root);
        Box::pin(async_stream::try_stream! {
            if !scope.sees_async(Kind::Directory, &root).await.map_err(directory_grants)? {
                Err(DirectoryError::NotFound(root))?;
            }
            let mut directories = inner.get_recursive(&root);
            while let Some(directory) = futures::StreamExt::next(&mut directories).await {
                yield directory?;
            }
        })
    }

    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        // Children not in the batch must be seen already: all checked in
        // one read.
        let mut earlier = std::collections::HashSet::with_capacity(directories.len());
        let mut outside = Vec::new();
        for directory in &directories {
            let digest = directory.digest();
            outside.extend(
                directory
                    .child_directories()
                    .filter(|child| !earlier.contains(child))
                    .map(|child| (digest, child)),
            );
            earlier.insert(digest);
        }
        let children: Vec<B3Digest> = outside.iter().map(|&(_, child)| child).collect();
        let unseen = self
            .scope
            .grants
            .first_unseen(&self.scope.tenant, Kind::Directory, children)
            .await
            .map_err(directory_grants)?;
        if let Some(index) = unseen {
            let (parent, child) = outside[index];
            return Err(DirectoryError::UnknownChild { parent, child });
        }
        let root = self.inner.put_many(directories).await?;
        self.scope
            .grant(Kind::Directory, earlier.into_iter().collect())
            .await
            .map_err(directory_grants)?;
        Ok(root)
    }
}

#[cfg(test)]
mod tests;
