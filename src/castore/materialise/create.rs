//! The creation walk, on a blocking thread: one directory at a time through
//! handles (never through a symlink, without recursion), each directory's
//! symlinks made and its files placed several at a time, as hardlinks of
//! the store's local blob files where possible and as copies of the blob
//! stream otherwise (keeping the disk's reserve).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{Control, MaterialiseError};
use crate::castore::blob::BlobError;
use crate::castore::digest::B3Digest;
use crate::castore::directory::Directory;
use crate::castore::node::{Node, PathComponent};
use crate::castore::Store;
use crate::hostfs::Dir;

/// How many files are placed at once.
const PARALLEL_FILES: usize = 8;

/// One directory being filled: its identity and the subdirectories still to
/// create.
struct Level<'t> {
    id: crate::hostfs::DirId,
    pending: Vec<(&'t PathComponent, B3Digest)>,
}

/// The blocking creation walk.
pub(super) struct Creator<'a> {
    pub(super) store: &'a Store,
    pub(super) runtime: &'a tokio::runtime::Handle,
    pub(super) tree: &'a HashMap<B3Digest, Directory>,
    pub(super) origin: &'a Path,
    pub(super) control: &'a Control,
}

impl<'a> Creator<'a> {
    /// Creates `node` as `name` in `parent`: directories one at a time,
    /// descending by name and climbing back through `..` (checked), so only
    /// one directory handle is open at any depth.
    pub(super) fn create(
        &self,
        parent: &Dir,
        name: &OsStr,
        node: &'a Node,
    ) -> Result<(), MaterialiseError> {
        let digest = match node {
            Node::Directory { digest, .. } => digest,
            leaf => return self.place(parent, &[(name, leaf)]),
        };
        let mut cur = self.make_dir(parent, name, digest)?;
        let mut stack = vec![self.level(&cur, digest)?];
        while let Some(level) = stack.last_mut() {
            self.check()?;
            if let Some((child, digest)) = level.pending.pop() {
                let next = self.make_dir(&cur, child.to_os_str(), &digest)?;
                stack.push(self.level(&next, &digest)?);
                cur = next;
                continue;
            }
            stack.pop();
            let Some(above) = stack.last() else { break };
            cur = cur.climb(above.id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Makes the directory `name` (of `digest`) in `parent` and opens it.
    fn make_dir(
        &self,
        parent: &Dir,
        name: &OsStr,
        digest: &B3Digest,
    ) -> Result<Dir, MaterialiseError> {
        if !self.tree.contains_key(digest) {
            return Err(MaterialiseError::MissingDirectory(*digest));
        }
        parent.create_dir(name, 0o755).map_err(|e| self.err(e))?;
        parent.open_dir(name).map_err(|e| self.err(e))
    }

    /// Places the files and symlinks of the new directory `dir`; returns its
    /// level with the subdirectories still to create.
    fn level(&self, dir: &Dir, digest: &B3Digest) -> Result<Level<'a>, MaterialiseError> {
        let directory = self
            .tree
            .get(digest)
            .ok_or(MaterialiseError::MissingDirectory(*digest))?;
        let mut pending = Vec::new();
        let mut leaves = Vec::new();
        for (name, node) in directory.nodes() {
            match node {
                Node::Directory { digest, .. } => pending.push((name, *digest)),
                leaf => leaves.push((name.to_os_str(), leaf)),
            }
        }
        self.place(dir, &leaves)?;
        Ok(Level {
            id: dir.id().map_err(|e| self.err(e))?,
            pending,
        })
    }

    /// Creates symlinks and places files in `dir`, several at a time.
    fn place(&self, dir: &Dir, leaves: &[(&OsStr, &Node)]) -> Result<(), MaterialiseError> {
        let mut files = Vec::new();
        for (name, node) in leaves {
            match node {
                Node::Symlink { target } => dir
                    .symlink(OsStr::from_bytes(target.as_bytes()), name)
                    .map_err(|e| self.err_at(name, e))?,
                Node::File {
                    digest,
                    size,
                    executable,
                } => files.push(FileJob {
                    name,
                    digest: *digest,
                    size: *size,
                    executable: *executable,
                }),
                Node::Directory { .. } => {}
            }
        }
        self.runtime.block_on(
            futures::stream::iter(files)
                .map(|job| self.place_file(dir, job))
                .buffer_unordered(PARALLEL_FILES)
                .fold(Ok(()), |acc, r| async move { acc.and(r) }),
        )
    }

    /// Places one file: a hardlink of the local blob file when possible, a
    /// copy of the blob stream otherwise.
    async fn place_file(&self, dir: &Dir, job: FileJob<'_>) -> Result<(), MaterialiseError> {
        let blobs = &self.store.blobs;
        let read_err = |source| MaterialiseError::ReadBlob {
            digest: job.digest,
            source,
        };
        let local = if job.executable {
            blobs
                .local_executable_path(&job.digest)
                .await
                .map_err(read_err)?
        } else {
            blobs.local_path(&job.digest).await.map_err(read_err)?
        };
        if let Some(local) = local {
            if dir.hard_link_from(&local, job.name).is_ok() {
                return Ok(());
            }
        }
        self.copy_file(dir, &job).await
    }

    async fn copy_file(&self, dir: &Dir, job: &FileJob<'_>) -> Result<(), MaterialiseError> {
        let read_err = |source| MaterialiseError::ReadBlob {
            digest: job.digest,
            source,
        };
        let create_err = |e| self.err_at(job.name, e);
        let free = dir.free_bytes().map_err(create_err)?;
        let reserve = self.control.min_free_bytes;
        if free.saturating_sub(job.size) < reserve {
            return Err(MaterialiseError::DiskReserve { free, reserve });
        }
        let blob = self
            .store
            .blobs
            .open_read(&job.digest)
            .await
            .map_err(read_err)?;
        let mut blob = blob.ok_or(MaterialiseError::MissingBlob(job.digest))?;
        let file = dir.create_file(job.name, 0o600).map_err(create_err)?;
        let mut file = tokio::fs::File::from_std(file);
        let written = tokio::io::copy(&mut blob.reader, &mut file)
            .await
            .map_err(|e| read_err(BlobError::ReadSource(e)))?;
        file.flush().await.map_err(create_err)?;
        if written != job.size {
            return Err(MaterialiseError::SizeMismatch {
                path: self.origin.join(job.name),
                digest: job.digest,
                expected: job.size,
                actual: written,
            });
        }
        let mode = if job.executable { 0o555 } else { 0o444 };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(create_err)
    }

    /// Stops the walk when cancelled or past the deadline.
    fn check(&self) -> Result<(), MaterialiseError> {
        if self
            .control
            .cancel
            .as_ref()
            .is_some_and(|c| c.is_cancelled())
        {
            return Err(MaterialiseError::Cancelled);
        }
        if self.control.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(MaterialiseError::Deadline);
        }
        Ok(())
    }

    fn err(&self, source: io::Error) -> MaterialiseError {
        MaterialiseError::Create {
            path: self.origin.to_owned(),
            source,
        }
    }

    fn err_at(&self, name: &OsStr, source: io::Error) -> MaterialiseError {
        MaterialiseError::Create {
            path: self.origin.join(name),
            source,
        }
    }
}

/// A file still to place.
struct FileJob<'n> {
    name: &'n OsStr,
    digest: B3Digest,
    size: u64,
    executable: bool,
}
