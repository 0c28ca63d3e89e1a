//! The embedded store's [`BlobBatch`]: stage each file now, make many
//! durable at once, name them after.
//!
//! Staging a host file hashes it and readies an inode holding exactly those
//! bytes, mode 0444, owned by kiln: a taken file on the store's filesystem
//! is that inode itself (owner and mode set through its handle); anything
//! else is copied into an unnamed temporary file (`O_TMPFILE`, or a named
//! one in `blobs-tmp/` where the filesystem has none) checked to hash the
//! same. Nothing is flushed then. A flush, once [`Limits::files`] files or
//! [`MAX_STAGED_BYTES`] bytes are staged and at commit:
//! 1. makes the staged inodes durable, together with the names the previous
//!    flush gave ([`durable::sync_all`]: one `fsync` each, or one `syncfs`);
//! 2. links each inode, by its handle, under its digest (a name already
//!    there holds the same bytes) and takes a taken file's name out of the
//!    build's tree;
//! 3. leaves those names to be made durable by the next flush's first step.
//!
//! Commit flushes, then makes the last names durable. So a digest only ever
//! names durable bytes, and once commit answers every name is durable too.
//! Memory and descriptors are bounded by the flush thresholds, not by the
//! size of the tree.

use std::collections::{BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};
use tempfile::TempPath;

use super::durable::{self, link_handle};
use super::{EmbeddedBlobService, BLOB_MODE};
use crate::castore::blob::{
    hash_opened_blocking, hash_opened_sized, BatchPut, BlobBatch, BlobError, StoredBlob,
};
use crate::castore::digest::B3Digest;
use crate::hostfs::{Dir, RegularFile};

/// Bytes staged at most before a flush: bounds the dirty data one flush
/// writes (a larger single file is flushed alone).
const MAX_STAGED_BYTES: u64 = 256 << 20;

/// When a batch flushes, besides [`MAX_STAGED_BYTES`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Staged files at most. Each holds an open descriptor, so at most a
    /// quarter of this process's limit on open files (and 4096).
    pub files: usize,
}

impl Limits {
    fn of_process() -> Limits {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        Limits {
            files: usize::try_from(soft / 4)
                .unwrap_or(usize::MAX)
                .clamp(16, 4096),
        }
    }
}

/// The batch [`EmbeddedBlobService::batch`] hands out: [`Pending`] work,
/// run on a blocking thread; gone once a step of it failed.
pub(super) struct EmbeddedBatch {
    store: EmbeddedBlobService,
    pending: Option<Box<Pending>>,
}

impl EmbeddedBatch {
    pub(super) fn new(store: EmbeddedBlobService) -> Self {
        EmbeddedBatch {
            store,
            pending: Some(Box::new(Pending::new())),
        }
    }

    async fn run<T: Send + 'static>(
        &mut self,
        step: impl FnOnce(&mut Pending, &EmbeddedBlobService) -> Result<T, BlobError> + Send + 'static,
    ) -> Result<T, BlobError> {
        let mut pending = self.pending.take().ok_or(BlobError::BatchFailed)?;
        let store = self.store.clone();
        let (pending, result) = tokio::task::spawn_blocking(move || {
            let result = step(&mut pending, &store);
            (pending, result)
        })
        .await
        .map_err(BlobError::Task)?;
        if result.is_ok() {
            self.pending = Some(pending);
        }
        result
    }
}

#[async_trait::async_trait]
impl BlobBatch for EmbeddedBatch {
    async fn put_opened(&mut self, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        self.run(move |pending, store| pending.put(store, None, files))
            .await
    }

    async fn put_taken(&mut self, parent: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let parent = Arc::new(parent.try_clone().map_err(BlobError::Write)?);
        self.run(move |pending, store| pending.put(store, Some(parent), files))
            .await
    }

    async fn commit(&mut self) -> Result<(), BlobError> {
        self.run(|pending, store| pending.commit(store)).await
    }
}

/// A blob ready to be named: its inode, durable or not yet.
struct Staged {
    file: File,
    digest: B3Digest,
    size: u64,
    /// The name of a named temporary copy, removed once linked.
    temp: Option<TempPath>,
    /// The build tree's name for a taken file, removed once linked.
    take: Option<(Arc<Dir>, OsString)>,
}

/// What staging a file found.
enum Outcome {
    /// The store already has the bytes (in this shard).
    Present(u8),
    /// A new blob, to be named at the next flush.
    Staged(Staged),
}

/// Files staged and names given but not yet durable. Blocking.
///
/// A flush runs on a thread of its own while the next files are staged
/// (its `syncfs` is mostly waiting for the disk); one at a time, since each
/// flush also makes the previous one's names durable. Dropping a `Pending`
/// waits for the flush in flight, so no blob is named, nor any taken file
/// removed from its tree, after the batch is gone.
pub(super) struct Pending {
    limits: Limits,
    staged: Vec<Staged>,
    bytes: u64,
    /// Digests in `staged`, so a repeated file is staged once.
    digests: HashSet<B3Digest>,
    /// Shards with names not yet durable.
    unsynced: BTreeSet<u8>,
    /// The flush in flight: it answers the shards it gave names in.
    flushing: Option<std::thread::JoinHandle<Result<BTreeSet<u8>, BlobError>>>,
}

impl Pending {
    pub(super) fn new() -> Pending {
        Pending::with_limits(Limits::of_process())
    }

    pub(super) fn with_limits(limits: Limits) -> Pending {
        Pending {
            limits,
            staged: Vec::new(),
            bytes: 0,
            digests: HashSet::new(),
            unsynced: BTreeSet::new(),
            flushing: None,
        }
    }

    /// Stages `files` (several at once), flushing when the thresholds are
    /// reached. `parent` is the directory they are taken from, if taken.
    pub(super) fn put(
        &mut self,
        store: &EmbeddedBlobService,
        parent: Option<Arc<Dir>>,
        files: Vec<(OsString, RegularFile)>,
    ) -> BatchPut {
        let outcomes: Vec<_> = files
            .into_par_iter()
            .map(|(name, opened)| {
                let origin = Path::new(&name).to_owned();
                store.stage(parent.as_ref(), name, opened, &origin)
            })
            .collect();
        let answers = outcomes
            .into_iter()
            .map(|outcome| self.keep(outcome?))
            .collect();
        if self.staged.len() >= self.limits.files || self.bytes >= MAX_STAGED_BYTES {
            self.start_flush(store)?;
        }
        Ok(answers)
    }

    /// Stages one file, named `origin` in messages; flushes nothing.
    pub(super) fn put_one(
        &mut self,
        store: &EmbeddedBlobService,
        parent: Option<Arc<Dir>>,
        name: OsString,
        opened: RegularFile,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        let outcome = store.stage(parent.as_ref(), name, opened, origin)?;
        self.keep(outcome)
    }

    fn keep(&mut self, (stored, outcome): (StoredBlob, Outcome)) -> Result<StoredBlob, BlobError> {
        match outcome {
            Outcome::Present(shard) => {
                self.unsynced.insert(shard);
            }
            Outcome::Staged(staged) if self.digests.insert(staged.digest) => {
                self.bytes += staged.size;
                self.staged.push(staged);
            }
            // The same bytes are staged already.
            Outcome::Staged(staged) => staged.untake()?,
        }
        Ok(stored)
    }

    /// Hands the staged files to a flush of their own, once the previous
    /// one is done.
    fn start_flush(&mut self, store: &EmbeddedBlobService) -> Result<(), BlobError> {
        self.finish_flush()?;
        let (staged, unsynced) = self.take_staged();
        let store = store.clone();
        // Without a thread to be had, the staged files go unnamed with the
        // closure, and the batch fails.
        let handle = std::thread::Builder::new()
            .name("kiln-blob-flush".into())
            .spawn(move || flush(&store, staged, &unsynced))
            .map_err(BlobError::Durable)?;
        self.flushing = Some(handle);
        Ok(())
    }

    /// Waits for the flush in flight; its names are left to make durable.
    fn finish_flush(&mut self) -> Result<(), BlobError> {
        if let Some(handle) = self.flushing.take() {
            let named = handle.join().map_err(|_| {
                BlobError::Durable(io::Error::other("the flushing thread panicked"))
            })??;
            self.unsynced.extend(named);
        }
        Ok(())
    }

    fn take_staged(&mut self) -> (Vec<Staged>, BTreeSet<u8>) {
        self.bytes = 0;
        self.digests.clear();
        (
            std::mem::take(&mut self.staged),
            std::mem::take(&mut self.unsynced),
        )
    }

    /// Flushes, then makes every name given durable.
    pub(super) fn commit(&mut self, store: &EmbeddedBlobService) -> Result<(), BlobError> {
        self.finish_flush()?;
        let (staged, unsynced) = self.take_staged();
        let named = flush(store, staged, &unsynced)?;
        let shards = shard_dirs(store, &named)?;
        let fds: Vec<BorrowedFd<'_>> = shards.iter().map(|d| d.as_fd()).collect();
        store.sync_all(&fds)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(handle) = self.flushing.take() {
            let _ = handle.join();
        }
    }
}

/// Makes `staged` durable together with the names given before in
/// `unsynced`, then names them; answers the shards of the new names (or of
/// the old ones, when nothing was staged), not yet durable.
fn flush(
    store: &EmbeddedBlobService,
    staged: Vec<Staged>,
    unsynced: &BTreeSet<u8>,
) -> Result<BTreeSet<u8>, BlobError> {
    if staged.is_empty() {
        return Ok(unsynced.clone());
    }
    let shards = shard_dirs(store, unsynced)?;
    let mut fds: Vec<BorrowedFd<'_>> = staged.iter().map(|s| s.file.as_fd()).collect();
    fds.extend(shards.iter().map(|d| d.as_fd()));
    store.sync_all(&fds)?;
    drop(fds);
    let named: Vec<Result<u8, BlobError>> = staged.into_par_iter().map(|s| store.name(s)).collect();
    named.into_iter().collect()
}

fn shard_dirs<'s>(
    store: &'s EmbeddedBlobService,
    shards: &BTreeSet<u8>,
) -> Result<Vec<&'s Dir>, BlobError> {
    shards
        .iter()
        .map(|&byte| store.shard(byte).map_err(BlobError::Durable))
        .collect()
}

impl Staged {
    /// Drops a staged file whose bytes are staged already: a taken file
    /// still leaves the tree.
    fn untake(self) -> Result<(), BlobError> {
        match &self.take {
            Some((parent, name)) => unlink(parent, name),
            None => Ok(()),
        }
    }
}

fn unlink(parent: &Dir, name: &OsStr) -> Result<(), BlobError> {
    parent.unlink(name).map_err(|source| BlobError::Take {
        path: name.into(),
        source,
    })
}

impl EmbeddedBlobService {
    /// Hashes the file and readies its blob (see the module docs). A taken
    /// file whose bytes the store has already leaves the tree now.
    fn stage(
        &self,
        parent: Option<&Arc<Dir>>,
        name: OsString,
        opened: RegularFile,
        origin: &Path,
    ) -> Result<(StoredBlob, Outcome), BlobError> {
        let RegularFile { file, stat: st } = opened;
        let len = u64::try_from(st.st_size).unwrap_or(0);
        let hashed = hash_opened_sized(&file, len, origin)?;
        let digest = hashed.digest;
        let byte = digest.as_bytes()[0];
        let persist_err = |source| BlobError::Persist { digest, source };
        // A taken file is not looked up: readying it costs less than the
        // lookup, and naming it finds a blob already there (the same
        // bytes) just as well. A copy is looked up, to skip copying.
        let take = parent.filter(|_| st.st_dev == self.inner.device);
        if take.is_none()
            && present(self.shard(byte).map_err(persist_err)?, &digest).map_err(persist_err)?
        {
            if let Some(parent) = parent {
                parent.unlink(&name).map_err(|source| BlobError::Take {
                    path: origin.to_owned(),
                    source,
                })?;
            }
            return Ok((hashed, Outcome::Present(byte)));
        }
        let (file, temp) = match take {
            Some(_) => {
                self.take_over(&file, &st)
                    .map_err(|source| BlobError::Take {
                        path: origin.to_owned(),
                        source,
                    })?;
                (file, None)
            }
            _ => self.copy(&file, origin, hashed)?,
        };
        Ok((
            hashed,
            Outcome::Staged(Staged {
                file,
                digest,
                size: hashed.size,
                temp,
                take: parent.map(|p| (p.clone(), name)),
            }),
        ))
    }

    /// Copies `source` into a new staging file, checks the copy hashes to
    /// `expected` and makes it read-only.
    fn copy(
        &self,
        source: &File,
        origin: &Path,
        expected: StoredBlob,
    ) -> Result<(File, Option<TempPath>), BlobError> {
        let (mut copy, temp) = self.staging_file()?;
        let mut reader = source;
        io::Seek::seek(&mut reader, io::SeekFrom::Start(0))
            .and_then(|_| io::copy(&mut reader, &mut copy))
            .map_err(|source| BlobError::HashFile {
                path: origin.to_owned(),
                source,
            })?;
        let copied = hash_opened_blocking(&copy, origin)?;
        if copied != expected {
            return Err(BlobError::Changed {
                path: origin.to_owned(),
                first: expected.digest,
                second: copied.digest,
            });
        }
        rustix::fs::fchmod(&copy, Mode::from_raw_mode(BLOB_MODE))
            .map_err(|e| BlobError::Write(e.into()))?;
        Ok((copy, temp))
    }

    /// An unnamed file in `blobs-tmp/` (gone by itself if kiln dies), or a
    /// named one where the filesystem cannot make unnamed files.
    fn staging_file(&self) -> Result<(File, Option<TempPath>), BlobError> {
        match rustix::fs::openat(
            &self.inner.tmp_dir,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => Ok((File::from(fd), None)),
            Err(e)
                if [
                    rustix::io::Errno::OPNOTSUPP,
                    rustix::io::Errno::ISDIR,
                    rustix::io::Errno::INVAL,
                ]
                .contains(&e) =>
            {
                let (file, temp) = self.new_temp_file()?;
                Ok((file, Some(temp)))
            }
            Err(e) => Err(BlobError::Write(e.into())),
        }
    }

    /// Names a staged blob, whose bytes are durable, by its digest; answers
    /// its shard, whose new name is not durable yet.
    fn name(&self, staged: Staged) -> Result<u8, BlobError> {
        let digest = staged.digest;
        let byte = digest.as_bytes()[0];
        let persist_err = |source| BlobError::Persist { digest, source };
        let shard = self.shard(byte).map_err(persist_err)?;
        let hex = digest.to_hex();
        let mut count = self.count_shard(&digest);
        match link_handle(&staged.file, shard, OsStr::new(hex.as_str())) {
            Ok(()) => count.added(staged.size),
            // Put meanwhile by someone else: the same bytes, named only
            // once they were durable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // Another mount of the same filesystem: copied after all.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let origin = Path::new(hex.as_str());
                let expected = StoredBlob {
                    digest,
                    size: staged.size,
                };
                let (copy, _temp) = self.copy(&staged.file, origin, expected)?;
                self.inner
                    .syncer
                    .fsync(copy.as_fd())
                    .map_err(BlobError::Durable)?;
                match link_handle(&copy, shard, OsStr::new(hex.as_str())) {
                    Ok(()) => count.added(staged.size),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(persist_err(e)),
                }
            }
            Err(e) => return Err(persist_err(e)),
        }
        drop(count);
        // Named now: a named temporary copy has served.
        drop(staged.temp);
        if let Some((parent, name)) = &staged.take {
            unlink(parent, name)?;
        }
        Ok(byte)
    }

    /// Makes a build's file kiln's and read-only, through its handle: the
    /// build's uid and group-writable bits must not survive into a blob
    /// later builds share. Skips calls that would change nothing.
    pub(super) fn take_over(&self, file: &File, st: &rustix::fs::Stat) -> io::Result<()> {
        let (uid, gid) = self.inner.owner;
        if st.st_uid != uid.as_raw() || st.st_gid != gid.as_raw() {
            rustix::fs::fchown(file, Some(uid), Some(gid))?;
        }
        if st.st_mode & 0o7777 != BLOB_MODE {
            rustix::fs::fchmod(file, Mode::from_raw_mode(BLOB_MODE))?;
        }
        Ok(())
    }

    fn sync_all(&self, fds: &[BorrowedFd<'_>]) -> Result<(), BlobError> {
        durable::sync_all(&*self.inner.syncer, self.inner.tmp_dir.as_fd(), fds)
            .map_err(BlobError::Durable)
    }
}

/// Whether the shard has a blob of this digest.
fn present(shard: &Dir, digest: &B3Digest) -> io::Result<bool> {
    match rustix::fs::statat(shard, digest.to_hex().as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
