//! The grants table: which tenant may see which blob or directory.
//!
//! One `redb` file (`grants.redb` in the data dir) holds a key per
//! (tenant, kind, digest) a tenant has proved it may see: it put the bytes
//! or the directory, or a build of its produced them. Content stays stored
//! once, whoever put it; only visibility is per tenant. Grants are never
//! taken back (nothing in kiln deletes content). Every write is one durable
//! transaction, made after the content itself is stored, so a crash can lose
//! a grant (the tenant then uploads again) but never grants what is not
//! stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, TableDefinition};

use crate::castore::B3Digest;
use crate::tenant::Tenant;

/// (tenant, kind, digest) → nothing.
const GRANTS: TableDefinition<(&str, u8, &[u8; 32]), ()> = TableDefinition::new("grants");

/// redb's page cache for the grants: small keys, read once per file of a
/// build's inputs.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// What a grant is for (a blob and a directory may share a digest only if
/// the blob's bytes are the directory's encoding, but they stay apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A blob.
    Blob = 1,
    /// A directory.
    Directory = 2,
}

/// Reading or writing the grants table failed.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    /// Opening or creating the table's file failed.
    #[error("opening the grants database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<redb::Error>,
    },
    /// A read failed.
    #[error("reading the grants database")]
    Read(#[source] Box<redb::Error>),
    /// A write failed.
    #[error("writing the grants database")]
    Write(#[source] Box<redb::Error>),
}

/// Who may see what. Cheap to clone.
#[derive(Clone)]
pub struct Grants {
    db: Arc<Database>,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grants")
    }
}

impl Grants {
    /// Opens (creating if needed) the grants database at `path`.
    pub fn open(path: &Path) -> Result<Self, GrantsError> {
        let open_err = |source: redb::Error| GrantsError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_err(e.into()))?;
        Self::init(db).map_err(|e| match e {
            GrantsError::Write(source) => GrantsError::Open {
                path: path.to_owned(),
                source,
            },
            e => e,
        })
    }

    /// A grants table in memory (tests).
    pub fn in_memory() -> Result<Self, GrantsError> {
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| GrantsError::Write(Box::new(e.into())))?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, GrantsError> {
        let write = |e: redb::Error| GrantsError::Write(Box::new(e));
        let txn = db.begin_write().map_err(|e| write(e.into()))?;
        txn.open_table(GRANTS).map_err(|e| write(e.into()))?;
        txn.commit().map_err(|e| write(e.into()))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Whether `tenant` may see the `kind` named `digest` (a blocking read
    /// of one key: microseconds).
    pub fn granted(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digest: &B3Digest,
    ) -> Result<bool, GrantsError> {
        let read = |e: redb::Error| GrantsError::Read(Box::new(e));
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let table = txn.open_table(GRANTS).map_err(|e| read(e.into()))?;
        let key = (tenant.as_str(), kind as u8, digest.as_bytes());
        Ok(table.get(key).map_err(|e| read(e.into()))?.is_some())
    }

    /// The index of the first of `digests` that `tenant` may not see as a
    /// `kind`, if any (one read transaction for all).
    pub fn first_unseen(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<Option<usize>, GrantsError> {
        if digests.is_empty() {
            return Ok(None);
        }
        let read = |e: redb::Error| GrantsError::Read(Box::new(e));
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let table = txn.open_table(GRANTS).map_err(|e| read(e.into()))?;
        for (index, digest) in digests.iter().enumerate() {
            let key = (tenant.as_str(), kind as u8, digest.as_bytes());
            if table.get(key).map_err(|e| read(e.into()))?.is_none() {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// [`Grants::first_unseen`] off the async workers.
    pub async fn first_unseen_async(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: Vec<B3Digest>,
    ) -> Result<Option<usize>, GrantsError> {
        let (this, tenant) = (self.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || this.first_unseen(&tenant, kind, &digests))
            .await
            .unwrap_or_else(|e| Err(GrantsError::Read(task_died(e))))
    }

    /// Lets `tenant` see every `kind` in `digests`, in one durable write.
    pub fn grant(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<(), GrantsError> {
        if digests.is_empty() {
            return Ok(());
        }
        let write = |e: redb::Error| GrantsError::Write(Box::new(e));
        let txn = self.db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut table = txn.open_table(GRANTS).map_err(|e| write(e.into()))?;
            for digest in digests {
                table
                    .insert((tenant.as_str(), kind as u8, digest.as_bytes()), ())
                    .map_err(|e| write(e.into()))?;
            }
        }
        txn.commit().map_err(|e| write(e.into()))
    }

    /// [`Grants::granted`] off the async workers.
    pub async fn granted_async(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digest: &B3Digest,
    ) -> Result<bool, GrantsError> {
        let (this, tenant, digest) = (self.clone(), tenant.clone(), *digest);
        tokio::task::spawn_blocking(move || this.granted(&tenant, kind, &digest))
            .await
            .unwrap_or_else(|e| Err(GrantsError::Read(task_died(e))))
    }

    /// [`Grants::grant`] off the async workers.
    pub async fn grant_async(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: Vec<B3Digest>,
    ) -> Result<(), GrantsError> {
        let (this, tenant) = (self.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || this.grant(&tenant, kind, &digests))
            .await
            .unwrap_or_else(|e| Err(GrantsError::Write(task_died(e))))
    }
}

/// A blocking task that died, as the database error it stands for.
fn task_died(e: tokio::task::JoinError) -> Box<redb::Error> {
    Box::new(redb::Error::Io(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_per_tenant_and_kind_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grants.redb");
        let a = Tenant::parse("a").expect("a");
        let b = Tenant::parse("b").expect("b");
        let d1 = B3Digest::from([1u8; 32]);
        let d2 = B3Digest::from([2u8; 32]);
        {
            let grants = Grants::open(&path).expect("open");
            grants.grant(&a, Kind::Blob, &[d1, d2]).expect("grant");
            grants.grant(&b, Kind::Directory, &[d1]).expect("grant");
            grants.grant(&b, Kind::Blob, &[]).expect("nothing");
        }
        let grants = Grants::open(&path).expect("reopen");
        let seen = |t, k, d| grants.granted(t, k, d).expect("read");
        assert!(seen(&a, Kind::Blob, &d1) && seen(&a, Kind::Blob, &d2));
        assert!(!seen(&a, Kind::Directory, &d1));
        assert!(seen(&b, Kind::Directory, &d1));
        assert!(!seen(&b, Kind::Blob, &d1));
        assert_eq!(
            grants
                .first_unseen(&a, Kind::Blob, &[d2, d1])
                .expect("read"),
            None
        );
        assert_eq!(
            grants
                .first_unseen(&b, Kind::Directory, &[d1, d2])
                .expect("read"),
            Some(1)
        );
    }
}
