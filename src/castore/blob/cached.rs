//! [`CachedBlobService`]: blobs in a shared object store
//! ([`super::object_store`]), behind a bounded cache on this host's disk.
//!
//! The cache is an embedded store ([`EmbeddedBlobService`]) in
//! `<data-dir>/blob-cache`, on the data dir's filesystem, so that inputs
//! are still hardlinked into builds. What holds, whatever fails:
//!
//! - a put (single, opened, taken, or a batch's commit) answers `Ok` only
//!   once the object store has the blob;
//! - a name in the cache is the digest of its bytes (they were hashed
//!   locally, from a private copy or a verified download) and the object
//!   store has those bytes: a blob is named only after its upload (or once
//!   the store was seen to have it);
//! - reads prefer the cache; a miss streams from the store, checked against
//!   the digest. [`BlobService::local_path`] fetches a missing blob into the
//!   cache first (concurrent fetches of one blob share one download), so a
//!   build's inputs are hardlinks from local disk.
//!
//! The cache is bounded ([`Lru`]): once its bytes pass the budget, the least
//! recently used blobs lose their names. A build already holding a hardlink
//! keeps its inode; a build about to link a name that was just evicted
//! falls back to copying from the stream ([`crate::castore::materialise`]).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use rayon::prelude::*;
use tempfile::TempPath;
use tokio::io::AsyncRead;

use super::embedded::EmbeddedBlobService;
use super::object_store::ObjectStoreBlobs;
use super::{BatchPut, BlobBatch, BlobError, BlobReader, BlobService, StoredBlob};
use crate::castore::digest::B3Digest;
use crate::hostfs::{Dir, RegularFile};

/// Uploads a batch runs at once at commit.
const PARALLEL_UPLOADS: usize = 4;
/// Blobs smaller than this are uploaded without asking first whether the
/// store has them: a head costs a round trip, as does a small put.
const HEAD_FIRST_BYTES: u64 = 1 << 20;

/// Blobs in an object store with a local, bounded read and write-through
/// cache. Cheap to clone.
#[derive(Clone)]
pub struct CachedBlobService {
    inner: Arc<Inner>,
}

struct Inner {
    cache: EmbeddedBlobService,
    remote: ObjectStoreBlobs,
    lru: Mutex<Lru>,
    /// One lock per blob being fetched, so concurrent fetches share one
    /// download: the second waits, then finds the blob cached.
    fetches: Mutex<HashMap<B3Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for CachedBlobService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedBlobService")
            .field("remote", &self.inner.remote.name())
            .finish_non_exhaustive()
    }
}

impl CachedBlobService {
    /// `remote` behind a cache in `cache_dir` holding at most `cache_bytes`
    /// (see [`Lru`]). Scans the cache to learn its size and drops what a
    /// crashed process left half-written: the caller must be the cache's
    /// only user. Makes no request to the store.
    pub fn open(
        remote: ObjectStoreBlobs,
        cache_dir: &Path,
        cache_bytes: u64,
    ) -> Result<CachedBlobService, BlobError> {
        super::object_store::install_crypto_provider();
        let cache = EmbeddedBlobService::open(cache_dir)?;
        cache.remove_partial_blobs()?;
        let mut lru = Lru::new(cache_bytes);
        for (digest, bytes) in scan(&cache)? {
            lru.record(digest, bytes);
        }
        let service = CachedBlobService {
            inner: Arc::new(Inner {
                cache,
                remote,
                lru: Mutex::new(lru),
                fetches: Mutex::new(HashMap::new()),
            }),
        };
        service.evict(None);
        Ok(service)
    }

    /// The object store behind the cache.
    pub fn remote(&self) -> &ObjectStoreBlobs {
        &self.inner.remote
    }

    /// Bytes the cache holds by its own count (blobs and executable copies).
    pub fn cached_bytes(&self) -> u64 {
        self.lru().bytes
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding it left counts, not broken invariants.
        self.inner
            .lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts `bytes` more for `digest` (0 for a mere use) as used now, then
    /// evicts down to the budget, sparing `digest`.
    fn used(&self, digest: &B3Digest, bytes: u64) {
        self.lru().record(*digest, bytes);
        self.evict(Some(digest));
    }

    /// Unlinks least recently used blobs (and their executable copies)
    /// until the cache is within its budget; never `keep`, which a caller is
    /// about to hand out. Under the lock, so a blob is never named again
    /// between being chosen and unlinked (names are given before they are
    /// recorded, and recorded under this lock).
    fn evict(&self, keep: Option<&B3Digest>) {
        let mut lru = self.lru();
        while let Some(victim) = lru.victim(keep) {
            for path in [
                self.inner.cache.blob_path(&victim),
                self.inner.cache.executable_path(&victim),
            ] {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "evicting a cached blob");
                    }
                }
            }
        }
    }

    /// The cached blob's path if it is cached, marked as used.
    async fn cached(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let path = self.inner.cache.local_path(digest).await?;
        if path.is_some() {
            self.used(digest, 0);
        }
        Ok(path)
    }

    /// The blob's path in the cache, fetched from the store if needed;
    /// `None` if the store has no such blob.
    async fn fetched(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        if let Some(path) = self.cached(digest).await? {
            return Ok(Some(path));
        }
        let lock = {
            let mut fetches = self
                .inner
                .fetches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fetches.entry(*digest).or_default().clone()
        };
        let result = async {
            let _one_download = lock.lock().await;
            if let Some(path) = self.cached(digest).await? {
                return Ok(Some(path));
            }
            self.download(digest).await
        }
        .await;
        let mut fetches = self
            .inner
            .fetches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fetches.get(digest).is_some_and(|l| Arc::ptr_eq(l, &lock))
            && Arc::strong_count(&lock) == 2
        {
            fetches.remove(digest);
        }
        result
    }

    /// Streams the blob from the store into the cache, verified before it
    /// gets its name.
    async fn download(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let Some(mut blob) = self.inner.remote.open_read(digest).await? else {
            return Ok(None);
        };
        let fetch_err = |source| BlobError::Fetch {
            store: self.inner.remote.name().to_owned(),
            digest: *digest,
            source,
        };
        let (file, tmp, stored) = match self.inner.cache.spool(&mut blob.reader).await {
            Ok(spooled) => spooled,
            Err(BlobError::ReadSource(e)) => return Err(fetch_err(e)),
            Err(e) => return Err(e),
        };
        if stored.digest != *digest {
            // The verifying reader has already refused such bytes.
            return Err(fetch_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("arrived with digest {}", stored.digest),
            )));
        }
        self.inner.cache.adopt(file, tmp, stored).await?;
        self.used(digest, stored.size);
        tracing::debug!(%digest, size = stored.size, "fetched a blob into the cache");
        Ok(Some(self.inner.cache.blob_path(digest)))
    }

    /// Uploads the staged blob `tmp` unless the store has it, then names it
    /// in the cache.
    async fn upload_and_name(&self, tmp: TempPath, stored: StoredBlob) -> Result<(), BlobError> {
        let remote = &self.inner.remote;
        if stored.size < HEAD_FIRST_BYTES || !remote.has(&stored.digest).await? {
            remote.upload(&stored.digest, &tmp).await?;
        }
        let file = fs::File::open(&tmp).map_err(BlobError::Write)?;
        self.inner.cache.adopt(file, tmp, stored).await?;
        self.used(&stored.digest, stored.size);
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobService for CachedBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        Ok(self.inner.cache.has(digest).await? || self.inner.remote.has(digest).await?)
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError> {
        if let Some(reader) = self.inner.cache.open_read(digest).await? {
            self.used(digest, 0);
            return Ok(Some(reader));
        }
        self.inner.remote.open_read(digest).await
    }

    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<StoredBlob, BlobError> {
        let (file, tmp, stored) = self.inner.cache.spool(reader).await?;
        drop(file);
        // Named in the cache means stored remotely already.
        if self.cached(&stored.digest).await?.is_none() {
            self.upload_and_name(tmp, stored).await?;
        }
        Ok(stored)
    }

    async fn local_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        self.fetched(digest).await
    }

    async fn local_executable_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let Some(plain) = self.fetched(digest).await? else {
            return Ok(None);
        };
        let made = !self.inner.cache.executable_path(digest).exists();
        let path = self.inner.cache.local_executable_path(digest).await?;
        if made && path.is_some() {
            let size = fs::metadata(&plain).map(|m| m.len()).unwrap_or(0);
            self.used(digest, size);
        }
        Ok(path)
    }

    fn batch(&self) -> Box<dyn BlobBatch + '_> {
        Box::new(CachedBatch {
            service: self.clone(),
            staged: Some(Vec::new()),
        })
    }
}

/// The cache's least-recently-used order and byte count.
///
/// Recency is use through this process: a put, a fetch, a hit of
/// `local_path` or `open_read` (a logical clock, not `atime`, which
/// `noatime`/`relatime` mounts do not keep). At start, blobs already cached
/// rank by their file's modification time, when they were cached. Bytes
/// count each blob's size plus its executable copy's, if made.
#[derive(Debug, Default)]
struct Lru {
    budget: u64,
    bytes: u64,
    clock: u64,
    entries: HashMap<B3Digest, Entry>,
    /// Each entry's last use, oldest first.
    order: BTreeMap<u64, B3Digest>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    used: u64,
}

impl Lru {
    fn new(budget: u64) -> Lru {
        Lru {
            budget,
            ..Lru::default()
        }
    }

    /// Marks `digest` used now, adding `bytes` to what it holds.
    fn record(&mut self, digest: B3Digest, bytes: u64) {
        self.clock += 1;
        let entry = self
            .entries
            .entry(digest)
            .or_insert(Entry { bytes: 0, used: 0 });
        self.order.remove(&entry.used);
        entry.bytes += bytes;
        entry.used = self.clock;
        self.order.insert(self.clock, digest);
        self.bytes += bytes;
    }

    /// The least recently used blob to drop while over budget (not `keep`),
    /// forgotten already.
    fn victim(&mut self, keep: Option<&B3Digest>) -> Option<B3Digest> {
        if self.bytes <= self.budget {
            return None;
        }
        let (&used, &digest) = self
            .order
            .iter()
            .find(|(_, digest)| Some(*digest) != keep)?;
        self.order.remove(&used);
        if let Some(entry) = self.entries.remove(&digest) {
            self.bytes -= entry.bytes;
        }
        Some(digest)
    }
}

/// The cached blobs and their bytes (with executable copies), oldest first.
/// Blocking; called once at open.
fn scan(cache: &EmbeddedBlobService) -> Result<Vec<(B3Digest, u64)>, BlobError> {
    let blobs = cache.blob_path(&B3Digest::from([0u8; 32]));
    let Some(root) = blobs.parent().and_then(Path::parent) else {
        return Ok(Vec::new());
    };
    let scan_err = |source| BlobError::CreateStore {
        path: root.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for shard in fs::read_dir(root).map_err(scan_err)? {
        let shard = shard.map_err(scan_err)?;
        for blob in fs::read_dir(shard.path()).map_err(scan_err)?.flatten() {
            let Some(digest) = blob
                .file_name()
                .to_str()
                .and_then(|hex| hex.parse::<B3Digest>().ok())
            else {
                continue;
            };
            let Ok(meta) = blob.metadata() else { continue };
            let executable = fs::metadata(cache.executable_path(&digest)).map_or(0, |m| m.len());
            found.push((meta.modified().ok(), digest, meta.len() + executable));
        }
    }
    found.sort_by_key(|(modified, _, _)| *modified);
    Ok(found.into_iter().map(|(_, d, bytes)| (d, bytes)).collect())
}

/// The cached store's batch: each file staged in the cache's temporary
/// directory now (a taken file by a link to its inode, others copied),
/// hashed there; at commit, uploaded [`PARALLEL_UPLOADS`] at a time and
/// named in the cache once uploaded. Commit answers `Ok` only when every
/// blob of the batch is in the object store. A batch dropped or failed
/// names nothing more; its staged files go with it.
struct CachedBatch {
    service: CachedBlobService,
    /// `None` once a step failed.
    staged: Option<Vec<(TempPath, StoredBlob)>>,
}

impl CachedBatch {
    async fn stage(
        &mut self,
        parent: Option<&Dir>,
        files: Vec<(OsString, RegularFile)>,
    ) -> BatchPut {
        let mut staged = self.staged.take().ok_or(BlobError::BatchFailed)?;
        let parent = parent
            .map(Dir::try_clone)
            .transpose()
            .map_err(BlobError::Write)?;
        let cache = self.service.inner.cache.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            files
                .into_par_iter()
                .map(|(name, opened)| stage_one(&cache, parent.as_ref(), &name, &opened))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(BlobError::Task)?;
        let answers = outcomes
            .into_iter()
            .map(|outcome| {
                let (tmp, stored) = outcome?;
                staged.push((tmp, stored));
                Ok(stored)
            })
            .collect();
        self.staged = Some(staged);
        Ok(answers)
    }
}

/// Stages one file (see [`CachedBatch`]), taking it out of `parent` if
/// given. Blocking.
fn stage_one(
    cache: &EmbeddedBlobService,
    parent: Option<&Dir>,
    name: &OsStr,
    opened: &RegularFile,
) -> Result<(TempPath, StoredBlob), BlobError> {
    let origin = Path::new(name);
    let staged = cache.stage_in_tmp(&opened.file, &opened.stat, parent.is_some(), origin)?;
    if let Some(parent) = parent {
        parent.unlink(name).map_err(|source| BlobError::Take {
            path: origin.to_owned(),
            source,
        })?;
    }
    Ok(staged)
}

#[async_trait::async_trait]
impl BlobBatch for CachedBatch {
    async fn put_opened(&mut self, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        self.stage(None, files).await
    }

    async fn put_taken(&mut self, parent: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        self.stage(Some(parent), files).await
    }

    async fn commit(&mut self) -> Result<(), BlobError> {
        let staged = self.staged.take().ok_or(BlobError::BatchFailed)?;
        let service = &self.service;
        // One upload per digest; the rest of its copies are dropped.
        let mut unique = HashMap::new();
        for (tmp, stored) in staged {
            unique.entry(stored.digest).or_insert((tmp, stored));
        }
        let uploads = unique.into_values().map(|(tmp, stored)| async move {
            if service.cached(&stored.digest).await?.is_some() {
                return Ok(());
            }
            service.upload_and_name(tmp, stored).await
        });
        let results: Vec<Result<(), BlobError>> = futures::stream::iter(uploads)
            .buffer_unordered(PARALLEL_UPLOADS)
            .collect()
            .await;
        results.into_iter().collect::<Result<(), _>>()?;
        self.staged = Some(Vec::new());
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
