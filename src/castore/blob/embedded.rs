//! The embedded blob store: one read-only file per blob under the data dir.
//!
//! Layout (`<hex>` is the digest in lowercase hex):
//! - `blobs/<hex[0..2]>/<hex>`: the blob, mode 0444;
//! - `blobs-x/<hex[0..2]>/<hex>`: an executable variant (mode 0555), made by
//!   copy on first use, so materialised executables can be hardlinks too;
//! - `blobs-tmp/`: blobs being written.
//!
//! A blob is written to a temporary file in `blobs-tmp/` (same filesystem),
//! hashed while written, fsynced, made read-only and renamed to its digest:
//! a blob file is never visible half-written, and its name is always the
//! digest of its contents. The rename never replaces a file, so the store
//! knows which puts added a blob, and keeps counts ([`super::counts`]).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempPath;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::counts::BlobCounts;
use super::{
    hash_file_blocking, hash_opened_blocking, BlobError, BlobReader, BlobService, BlobStats,
    StoredBlob, CHUNK_SIZE,
};
use crate::castore::digest::B3Digest;
use crate::hostfs::Dir;

const BLOB_MODE: u32 = 0o444;
const EXECUTABLE_MODE: u32 = 0o555;

/// Blobs as files under a data dir.
#[derive(Debug, Clone)]
pub struct EmbeddedBlobService {
    blobs: PathBuf,
    executables: PathBuf,
    tmp: PathBuf,
    counts: BlobCounts,
}

impl EmbeddedBlobService {
    /// Opens (creating if needed) the blob store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let store = EmbeddedBlobService {
            blobs: data_dir.join("blobs"),
            executables: data_dir.join("blobs-x"),
            tmp: data_dir.join("blobs-tmp"),
            counts: BlobCounts::new(data_dir.join("blobs")),
        };
        for dir in [&store.blobs, &store.executables, &store.tmp] {
            fs::create_dir_all(dir).map_err(|source| BlobError::CreateStore {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(store)
    }

    /// Removes half-written blobs a crashed process left in the temporary
    /// directory. Only for the store's single owner.
    pub fn remove_partial_blobs(&self) -> Result<usize, BlobError> {
        let mut removed = 0;
        let entries = fs::read_dir(&self.tmp).map_err(|source| BlobError::CreateStore {
            path: self.tmp.clone(),
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
        shard_path(&self.blobs, digest)
    }

    fn executable_path(&self, digest: &B3Digest) -> PathBuf {
        shard_path(&self.executables, digest)
    }

    fn new_temp_file(&self) -> Result<(fs::File, TempPath), BlobError> {
        let file = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(&self.tmp)
            .map_err(BlobError::Write)?;
        Ok(file.into_parts())
    }

    /// Copies the opened `file` to a temporary file, checks the copy hashes
    /// to `expected` and moves it into place. Blocking.
    fn copy_in(
        &self,
        file: &fs::File,
        origin: &Path,
        expected: StoredBlob,
    ) -> Result<StoredBlob, BlobError> {
        let (mut copy, tmp) = self.new_temp_file()?;
        let mut source = file;
        io::Seek::seek(&mut source, io::SeekFrom::Start(0))
            .and_then(|_| io::copy(&mut source, &mut copy))
            .map_err(|source| BlobError::HashFile {
                path: origin.to_owned(),
                source,
            })?;
        drop(copy);
        let copied = hash_file_blocking(&tmp)?;
        if copied != expected {
            return Err(BlobError::Changed {
                path: origin.to_owned(),
                first: expected.digest,
                second: copied.digest,
            });
        }
        sync_file(&tmp).map_err(BlobError::Write)?;
        self.persist_blob(tmp, copied)?;
        Ok(copied)
    }

    /// Takes the file `name` of a build's tree over: renamed into the
    /// store's temporary directory when on the same filesystem (then checked
    /// to be the very inode that was hashed, made kiln's and read-only, and
    /// renamed to its digest), copied otherwise; the name is gone from the
    /// tree afterwards. Blocking.
    fn take(
        &self,
        parent: &Dir,
        name: &OsStr,
        file: fs::File,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        let hashed = hash_opened_blocking(&file, origin)?;
        let target = self.blob_path(&hashed.digest);
        let take_err = |source| BlobError::Take {
            path: origin.to_owned(),
            source,
        };
        if target.exists() {
            parent.unlink(name).map_err(take_err)?;
            return Ok(hashed);
        }
        let tmp_dir = Dir::open(&self.tmp).map_err(BlobError::Write)?;
        let tmp_name = format!(
            "take-{}-{}",
            hashed.digest.to_hex(),
            uuid::Uuid::new_v4().simple()
        );
        match parent.rename(name, &tmp_dir, OsStr::new(&tmp_name)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let stored = self.copy_in(&file, origin, hashed)?;
                parent.unlink(name).map_err(take_err)?;
                return Ok(stored);
            }
            Err(e) => return Err(take_err(e)),
        }
        let tmp = TempPath::try_from_path(self.tmp.join(&tmp_name)).map_err(take_err)?;
        let moved = tmp_dir.stat(OsStr::new(&tmp_name)).map_err(take_err)?;
        let hashed_inode = rustix::fs::fstat(&file).map_err(|e| take_err(e.into()))?;
        if (moved.st_dev, moved.st_ino) != (hashed_inode.st_dev, hashed_inode.st_ino) {
            return Err(take_err(io::Error::other(
                "the file was replaced while being stored",
            )));
        }
        // The build's uid and group-writable bits must not survive into a
        // blob later builds share.
        rustix::fs::fchown(
            &file,
            Some(rustix::process::geteuid()),
            Some(rustix::process::getegid()),
        )
        .and_then(|()| rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(BLOB_MODE)))
        .map_err(|e| take_err(e.into()))?;
        file.sync_all().map_err(take_err)?;
        self.persist_blob(tmp, hashed)?;
        Ok(hashed)
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

    /// Moves the finished temporary file of `blob` into place, counted if
    /// it is new. Blocking.
    fn persist_blob(&self, tmp: TempPath, blob: StoredBlob) -> Result<(), BlobError> {
        let target = self.blob_path(&blob.digest);
        let mut shard = self.counts.shard(&blob.digest);
        if persist(tmp, &target, BLOB_MODE, &blob.digest)? {
            shard.added(blob.size);
        }
        Ok(())
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
        file.sync_all().await.map_err(BlobError::Write)?;
        drop(file);
        let stored = StoredBlob {
            digest: hasher.finalize().into(),
            size: hasher.count(),
        };
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.persist_blob(tmp, stored))
            .await
            .map_err(BlobError::Task)??;
        Ok(stored)
    }

    fn stats(&self) -> Option<BlobStats> {
        self.counts.get()
    }

    fn local_path(&self, digest: &B3Digest) -> Option<PathBuf> {
        let path = self.blob_path(digest);
        path.exists().then_some(path)
    }

    async fn local_executable_path(&self, digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        let store = self.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || store.make_executable(&digest))
            .await
            .map_err(BlobError::Task)?
    }

    async fn put_opened(&self, file: fs::File, origin: &Path) -> Result<StoredBlob, BlobError> {
        let store = self.clone();
        let origin = origin.to_owned();
        tokio::task::spawn_blocking(move || {
            let hashed = hash_opened_blocking(&file, &origin)?;
            if store.blob_path(&hashed.digest).exists() {
                return Ok(hashed);
            }
            store.copy_in(&file, &origin, hashed)
        })
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
        let parent = parent.try_clone().map_err(BlobError::Write)?;
        let (store, name, origin) = (self.clone(), name.to_owned(), origin.to_owned());
        tokio::task::spawn_blocking(move || store.take(&parent, &name, file, &origin))
            .await
            .map_err(BlobError::Task)?
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

/// Sets the mode of the finished temporary file and renames it to `target`,
/// never over an existing file; true if it was placed. If the target
/// already exists (same digest, so same bytes) the temporary file is simply
/// dropped.
fn persist(tmp: TempPath, target: &Path, mode: u32, digest: &B3Digest) -> Result<bool, BlobError> {
    let persist_err = |source| BlobError::Persist {
        digest: *digest,
        source,
    };
    if target.exists() {
        return Ok(false);
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(persist_err)?;
    create_shard(target).map_err(persist_err)?;
    match tmp.persist_noclobber(target) {
        Ok(()) => {}
        // Another put of the same bytes got there first; ours is dropped.
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(persist_err(e.error)),
    }
    sync_parent(target).map_err(persist_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_each_distinct_blob_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedBlobService::open(tmp.path()).expect("open");
        store.put(&mut &b"before"[..]).await.expect("put");
        // The first question walks the store (on its own thread).
        let mut stats = store.stats();
        for _ in 0..200 {
            if stats.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            stats = store.stats();
        }
        assert_eq!(stats, Some(BlobStats { blobs: 1, bytes: 6 }));
        // The same bytes, eight times at once, and one new blob.
        let puts = (0..8).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.put(&mut &b"same bytes"[..]).await })
        });
        for put in puts {
            put.await.expect("join").expect("put");
        }
        store.put(&mut &b"before"[..]).await.expect("put again");
        assert_eq!(
            store.stats(),
            Some(BlobStats {
                blobs: 2,
                bytes: 6 + 10
            })
        );
    }
}
