//! Making the embedded store's writes durable, and naming a blob by its
//! handle.
//!
//! Every flush goes through a [`Syncer`] (the real system calls, or in tests
//! one that counts and fails on purpose). A set of descriptors is made
//! durable by [`sync_all`]: a small set one `fsync` each, several at once so
//! the filesystem's journal groups them; a large set with one `syncfs` of
//! the store's filesystem. Measured on ext4 in a VM (2 cores): parallel
//! `fsync`s level off near 6 µs a file, CPU-bound, while one `syncfs` after
//! 4096 files costs about 1 µs a file; but `syncfs` also writes whatever
//! else is dirty on that filesystem, so it is only worth it, and only taken,
//! for sets too large to flush one by one.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::fs::{AtFlags, CWD};

use crate::hostfs::Dir;

/// Sets of at most this many descriptors are flushed one `fsync` each;
/// larger ones with one `syncfs`.
pub(super) const FSYNC_EACH_MAX: usize = 256;

/// Threads flushing a set one `fsync` each: enough waiting at once for the
/// journal to commit them together.
const FSYNC_THREADS: usize = 16;

/// The flushes the store issues.
pub(crate) trait Syncer: Send + Sync {
    /// `fsync` of a file or directory: its bytes and metadata (for a
    /// directory, its entries) are on disk when this returns.
    fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// `syncfs` of the filesystem holding `fd`: everything written to it
    /// before the call is on disk when this returns.
    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

/// The real system calls.
pub(super) struct System;

impl Syncer for System {
    fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(rustix::fs::fsync(fd)?)
    }

    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(rustix::fs::syncfs(fd)?)
    }
}

/// Makes everything written through `fds` durable: one `fsync` each while
/// the set is small, else one `syncfs` of the filesystem holding `store`
/// (every descriptor must be on that filesystem).
pub(super) fn sync_all(
    syncer: &dyn Syncer,
    store: BorrowedFd<'_>,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    match fds.len() {
        0 => Ok(()),
        1 => syncer.fsync(fds[0]),
        n if n > FSYNC_EACH_MAX => syncer.syncfs(store),
        n => {
            let chunk = n.div_ceil(FSYNC_THREADS);
            std::thread::scope(|scope| {
                let workers: Vec<_> = fds
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || part.iter().try_for_each(|fd| syncer.fsync(*fd)))
                    })
                    .collect();
                workers.into_iter().try_for_each(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a flushing thread panicked")))
                })
            })
        }
    }
}

/// Gives the inode open as `file` the name `name` in `dir`: the very inode
/// that was hashed, whatever happened to the name it was opened by.
/// `AT_EMPTY_PATH` needs `CAP_DAC_READ_SEARCH` (or, from Linux 6.10, a file
/// this process opened); `/proc/self/fd` works for anyone.
pub(super) fn link_handle(file: &File, dir: &Dir, name: &OsStr) -> io::Result<()> {
    match rustix::fs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::PERM => {
            Ok(rustix::fs::linkat(
                CWD,
                format!("/proc/self/fd/{}", file.as_raw_fd()),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A [`Syncer`] for tests: flushes for real, records every call with the
/// blobs named when it came, and fails from a chosen call on.
#[cfg(test)]
pub(crate) mod recorder {
    use std::collections::BTreeSet;
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::{Syncer, System};

    /// What was flushed.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Flushed {
        /// One file or directory, by inode.
        Fsync(u64),
        /// The whole filesystem.
        Syncfs,
    }

    /// One call.
    #[derive(Debug, Clone)]
    pub(crate) struct Call {
        pub flushed: Flushed,
        /// Inodes named under `blobs/` when the call came.
        pub named: BTreeSet<u64>,
        /// Whether the call was made to fail.
        pub failed: bool,
    }

    /// Records flushes of the store under `data_dir`.
    pub(crate) struct Recorder {
        blobs: PathBuf,
        fail_from: Option<usize>,
        pub calls: Mutex<Vec<Call>>,
    }

    impl Recorder {
        /// Fails every call from the `fail_from`th (0-based) on, if given.
        pub(crate) fn new(data_dir: &std::path::Path, fail_from: Option<usize>) -> Recorder {
            Recorder {
                blobs: data_dir.join("blobs"),
                fail_from,
                calls: Mutex::new(Vec::new()),
            }
        }

        /// The calls so far.
        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        /// Inodes of every blob named under `blobs/`.
        pub(crate) fn named(&self) -> BTreeSet<u64> {
            let mut named = BTreeSet::new();
            for shard in std::fs::read_dir(&self.blobs)
                .into_iter()
                .flatten()
                .flatten()
            {
                for blob in std::fs::read_dir(shard.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if let Ok(meta) = blob.metadata() {
                        named.insert(meta.ino());
                    }
                }
            }
            named
        }

        fn record(
            &self,
            flushed: Flushed,
            real: impl FnOnce() -> io::Result<()>,
        ) -> io::Result<()> {
            let named = self.named();
            let mut calls = self
                .calls
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            let failed = self.fail_from.is_some_and(|n| calls.len() >= n);
            calls.push(Call {
                flushed,
                named,
                failed,
            });
            drop(calls);
            if failed {
                return Err(io::Error::other("injected flush failure"));
            }
            real()
        }
    }

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        rustix::fs::fstat(fd).map(|st| st.st_ino).unwrap_or(0)
    }

    impl Syncer for Recorder {
        fn fsync(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
            self.record(Flushed::Fsync(inode(fd)), || System.fsync(fd))
        }

        fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
            self.record(Flushed::Syncfs, || System.syncfs(fd))
        }
    }
}
