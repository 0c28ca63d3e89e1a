//! The embedded blob store: one read-only file per blob under the data dir.
//!
//! Layout (`<hex>` is the digest in lowercase hex):
//! - `blobs/<hex[0..2]>/<hex>`: the blob, mode 0444 (the 256 shard
//!   directories are made, durably, when the store is opened);
//! - `blobs-x/<hex[0..2]>/<hex>`: an executable variant (mode 0555), made by
//!   copy on first use, so materialised executables can be hardlinks too;
//! - `blobs-tmp/`: blobs being written.
//!
//! A blob's name appears only once its bytes are on disk, so a blob file is
//! never visible half-written and its name is always the digest of its
//! contents; and the name itself is on disk before the put answers:
//! - a single [`BlobService::put`] (a client's gRPC put) writes a temporary
//!   file in `blobs-tmp/`, hashing while writing, fsyncs it, renames it to
//!   its digest and fsyncs the shard directory;
//! - host files (ingest, [`BlobService::put_opened`], [`BlobService::put_taken`])
//!   go through a [`batch`]: staged without a flush, made durable many at a
//!   time, named after, durable as a whole at commit.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tempfile::TempPath;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::counts::BlobCounts;
use super::{BlobBatch, BlobError, BlobReader, BlobService, BlobStats, StoredBlob, CHUNK_SIZE};
use crate::castore::digest::B3Digest;
use crate::hostfs::{Dir, RegularFile};

mod batch;
pub(crate) mod durable;
#[cfg(test)]
mod tests;

use batch::{EmbeddedBatch, Pending};
use durable::{Syncer, System};

const BLOB_MODE: u32 = 0o444;
const EXECUTABLE_MODE: u32 = 0o555;

/// Blobs as files under a data dir. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBlobService {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: PathBuf,
    executables: PathBuf,
    tmp: PathBuf,
    /// `blobs-tmp/`, where unnamed staged files are made.
    tmp_dir: Dir,
    /// The device of `blobs-tmp/`: files elsewhere are copied, not linked.
    device: u64,
    /// Handles on the 256 shard directories of `blobs/`, opened on first use.
    shards: Box<[OnceLock<Dir>]>,
    /// kiln's user and group, which taken files get.
    owner: (rustix::fs::Uid, rustix::fs::Gid),
    syncer: Arc<dyn Syncer>,
    /// Blobs and bytes stored, for the metrics ([`super::counts`]): a blob
    /// is named while its shard's count is held, and counted if new.
    counts: BlobCounts,
}

impl std::fmt::Debug for EmbeddedBlobService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBlobService")
            .field("blobs", &self.inner.blobs)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBlobService {
    /// Opens (creating if needed) the blob store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        Self::open_with(data_dir, Arc::new(System))
    }

    /// [`EmbeddedBlobService::open`] flushing through `syncer` (tests count
    /// and fail flushes with it).
    pub(crate) fn open_with(data_dir: &Path, syncer: Arc<dyn Syncer>) -> Result<Self, BlobError> {
        let blobs = data_dir.join("blobs");
        let create_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::CreateStore { path, source }
        };
        for dir in [
            &blobs,
            &data_dir.join("blobs-x"),
            &data_dir.join("blobs-tmp"),
        ] {
            fs::create_dir_all(dir).map_err(create_err(dir))?;
        }
        // A shard's own name must be durable before any blob in it is.
        let blobs_dir = Dir::open(&blobs).map_err(create_err(&blobs))?;
        let mut created = false;
        for byte in 0..=u8::MAX {
            match blobs_dir.create_dir(OsStr::new(&format!("{byte:02x}")), 0o755) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(create_err(&blobs)(e)),
            }
        }
        if created {
            syncer
                .fsync(blobs_dir.as_fd())
                .map_err(create_err(&blobs))?;
        }
        let tmp = data_dir.join("blobs-tmp");
        let tmp_dir = Dir::open(&tmp).map_err(create_err(&tmp))?;
        let device = tmp_dir.self_stat().map_err(create_err(&tmp))?.st_dev;
        Ok(EmbeddedBlobService {
            inner: Arc::new(Inner {
                counts: BlobCounts::new(blobs.clone()),
                blobs,
                executables: data_dir.join("blobs-x"),
                tmp,
                tmp_dir,
                device,
                shards: (0..=u8::MAX).map(|_| OnceLock::new()).collect(),
                owner: (rustix::process::geteuid(), rustix::process::getegid()),
                syncer,
            }),
        })
    }

    /// Removes half-written blobs a crashed process left in the temporary
    /// directory. Only for the store's single owner.
    pub fn remove_partial_blobs(&self) -> Result<usize, BlobError> {
        let mut removed = 0;
        let tmp = &self.inner.tmp;
        let entries = fs::read_dir(tmp).map_err(|source| BlobError::CreateStore {
            path: tmp.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            if fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Where the blob lives (whether or not it is stored).
    pub fn blob_path(&self, digest: &B3Digest) -> PathBuf {
        shard_path(&self.inner.blobs, digest)
    }

    /// The shard directory of `blobs/` holding blobs whose digest starts
    /// with `byte`.
    fn shard(&self, byte: u8) -> io::Result<&Dir> {
        let slot = &self.inner.shards[usize::from(byte)];
        if let Some(dir) = slot.get() {
            return Ok(dir);
        }
        let dir = Dir::open(&self.inner.blobs.join(format!("{byte:02x}")))?;
        Ok(slot.get_or_init(move || dir))
    }

    pub(super) fn new_temp_file(&self) -> Result<(fs::File, TempPath), BlobError> {
        let file = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(&self.inner.tmp)
            .map_err(BlobError::Write)?;
        Ok(file.into_parts())
    }

    /// Writes `reader` to a new temporary file, hashing while writing;
    /// names nothing and flushes nothing ([`EmbeddedBlobService::adopt`]
    /// does). The caller may use the file first (upload it).
    pub(super) async fn spool(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<(fs::File, TempPath, StoredBlob), BlobError> {
        let (file, tmp) = self.new_temp_file()?;
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = reader.read(&mut buf).await.map_err(BlobError::ReadSource)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(BlobError::Write)?;
        }
        file.flush().await.map_err(BlobError::Write)?;
        let stored = StoredBlob {
            digest: hasher.finalize().into(),
            size: hasher.count(),
        };
        Ok((file.into_std().await, tmp, stored))
    }

    /// Makes the spooled file `tmp` (open as `file`) durable and names it
    /// `stored`'s digest, durably. Two steps, each awaited: a put cancelled
    /// meanwhile (a client that reset its upload) stops before its blob is
    /// named.
    pub(super) async fn adopt(
        &self,
        file: fs::File,
        tmp: TempPath,
        stored: StoredBlob,
    ) -> Result<(), BlobError> {
        let syncer = self.inner.syncer.clone();
        tokio::task::spawn_blocking(move || syncer.fsync(file.as_fd()))
            .await
            .map_err(BlobError::Task)?
            .map_err(BlobError::Write)?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.persist_blob(tmp, &stored))
            .await
            .map_err(BlobError::Task)?
    }

    /// Where the executable variant of the blob lives (whether or not it
    /// was made).
    pub(super) fn executable_path(&self, digest: &B3Digest) -> PathBuf {
        shard_path(&self.inner.executables, digest)
    }

    /// Readies the opened file `file` (`stat` its metadata) as a new blob
    /// in the temporary directory, unnamed by digest: the inode itself,
    /// linked and made kiln's and read-only, when it is on the store's
    /// filesystem and `take` allows; a copy otherwise. Answers the
    /// temporary name and the digest of what it names. Blocking.
    pub(super) fn stage_in_tmp(
        &self,
        file: &fs::File,
        stat: &rustix::fs::Stat,
        take: bool,
        origin: &Path,
    ) -> Result<(TempPath, StoredBlob), BlobError> {
        let hash_err = |source| BlobError::HashFile {
            path: origin.to_owned(),
            source,
        };
        if take && stat.st_dev == self.inner.device {
            self.take_over(file, stat)
                .map_err(|source| BlobError::Take {
                    path: origin.to_owned(),
                    source,
                })?;
            let name = format!("take-{}", uuid::Uuid::new_v4().simple());
            durable::link_handle(file, &self.inner.tmp_dir, OsStr::new(&name))
                .map_err(BlobError::Write)?;
            let tmp =
                TempPath::try_from_path(self.inner.tmp.join(name)).map_err(BlobError::Write)?;
            let stored = super::hash_opened_blocking(file, origin)?;
            return Ok((tmp, stored));
        }
        let (mut copy, tmp) = self.new_temp_file()?;
        let mut reader = file;
        io::Seek::seek(&mut reader, io::SeekFrom::Start(0))
            .and_then(|_| io::copy(&mut reader, &mut copy))
            .map_err(hash_err)?;
        // The private copy's bytes are the blob, whatever the original did.
        let stored = super::hash_opened_blocking(&copy, origin)?;
        Ok((tmp, stored))
    }

    /// Names the fsynced temporary file `tmp` by its digest and makes the
    /// name durable. A name already there holds the same bytes (and is made
    /// durable too: a batch may have named it without a flush yet). Blocking.
    fn persist_blob(&self, tmp: TempPath, blob: &StoredBlob) -> Result<(), BlobError> {
        let digest = &blob.digest;
        let persist_err = |source| BlobError::Persist {
            digest: *digest,
            source,
        };
        let shard = self.shard(digest.as_bytes()[0]).map_err(persist_err)?;
        let target = self.blob_path(digest);
        let mut count = self.inner.counts.shard(digest);
        if !target.exists() {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(BLOB_MODE))
                .map_err(persist_err)?;
            // Never over an existing name, so that a new blob is counted
            // once: a put of the same bytes may have got there first.
            match tmp.persist_noclobber(&target) {
                Ok(()) => count.added(blob.size),
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(persist_err(e.error)),
            }
        }
        drop(count);
        self.inner.syncer.fsync(shard.as_fd()).map_err(persist_err)
    }

    /// The count of blobs in `digest`'s shard, held while a blob is named.
    fn count_shard(&self, digest: &B3Digest) -> super::counts::ShardGuard<'_> {
        self.inner.counts.shard(digest)
    }

    /// Makes the executable variant by copying the blob. Blocking.
    fn make_executable(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let target = self.executable_path(digest);
        if target.exists() {
            return Ok(Some(target));
        }
        let source = self.blob_path(digest);
        if !source.exists() {
            return Ok(None);
        }
        let (file, tmp) = self.new_temp_file()?;
        drop(file);
        fs::copy(&source, &tmp).map_err(|source| BlobError::Open {
            digest: *digest,
            source,
        })?;
        sync_file(&tmp).map_err(BlobError::Write)?;
        persist(tmp, &target, EXECUTABLE_MODE, digest)?;
        Ok(Some(target))
    }

    /// Stores one host file through a batch of its own, committed before
    /// answering. Blocking.
    fn put_one(
        &self,
        parent: Option<Arc<Dir>>,
        name: &OsStr,
        file: fs::File,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        let stat = rustix::fs::fstat(&file).map_err(|e| BlobError::HashFile {
            path: origin.to_owned(),
            source: e.into(),
        })?;
        let opened = RegularFile { file, stat };
        let mut pending = Pending::new();
        let stored = pending.put_one(self, parent, name.to_owned(), opened, origin)?;
        pending.commit(self)?;
        Ok(stored)
    }
}

#[async_trait::async_trait]
impl BlobService for EmbeddedBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        tokio::fs::try_exists(self.blob_path(digest))
            .await
            .map_err(|source| BlobError::Open {
                digest: *digest,
                source,
            })
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError> {
        let open_err = |source| BlobError::Open {
            digest: *digest,
            source,
        };
        let file = match tokio::fs::File::open(self.blob_path(digest)).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(open_err(e)),
        };
        let size = file.metadata().await.map_err(open_err)?.len();
        Ok(Some(BlobReader {
            reader: Box::pin(file),
            size: Some(size),
        }))
    }

    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<StoredBlob, BlobError> {
        let (file, tmp, stored) = self.spool(reader).await?;
        self.adopt(file, tmp, stored).await?;
        Ok(stored)
    }

    fn stats(&self) -> Option<BlobStats> {
        self.inner.counts.get()
    }

    async fn local_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let path = self.blob_path(digest);
        match tokio::fs::try_exists(&path).await {
            Ok(exists) => Ok(exists.then_some(path)),
            Err(source) => Err(BlobError::Open {
                digest: *digest,
                source,
            }),
        }
    }

    async fn local_executable_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let store = self.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || store.make_executable(&digest))
            .await
            .map_err(BlobError::Task)?
    }

    async fn put_opened(&self, file: fs::File, origin: &Path) -> Result<StoredBlob, BlobError> {
        let (store, origin) = (self.clone(), origin.to_owned());
        tokio::task::spawn_blocking(move || store.put_one(None, origin.as_os_str(), file, &origin))
            .await
            .map_err(BlobError::Task)?
    }

    async fn put_taken(
        &self,
        parent: &Dir,
        name: &OsStr,
        file: fs::File,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        // The handle and name go to the blocking thread as owned values.
        let parent = Arc::new(parent.try_clone().map_err(BlobError::Write)?);
        let (store, name, origin) = (self.clone(), name.to_owned(), origin.to_owned());
        tokio::task::spawn_blocking(move || store.put_one(Some(parent), &name, file, &origin))
            .await
            .map_err(BlobError::Task)?
    }

    fn batch(&self) -> Box<dyn BlobBatch + '_> {
        Box::new(EmbeddedBatch::new(self.clone()))
    }
}

fn shard_path(root: &Path, digest: &B3Digest) -> PathBuf {
    let hex = digest.to_hex();
    root.join(&hex[..2]).join(hex)
}

fn create_shard(target: &Path) -> io::Result<()> {
    match target.parent() {
        Some(parent) => fs::create_dir_all(parent),
        None => Ok(()),
    }
}

fn sync_file(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Sets the mode of the finished temporary file and renames it to `target`.
/// If the target already exists (same digest, so same bytes) the temporary
/// file is simply dropped.
fn persist(tmp: TempPath, target: &Path, mode: u32, digest: &B3Digest) -> Result<(), BlobError> {
    let persist_err = |source| BlobError::Persist {
        digest: *digest,
        source,
    };
    if target.exists() {
        return Ok(());
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(persist_err)?;
    create_shard(target).map_err(persist_err)?;
    tmp.persist(target).map_err(|e| persist_err(e.error))?;
    sync_parent(target).map_err(persist_err)
}
