//! Materialise: a castore node becomes a host tree again.
//!
//! Steps: fetch every directory of the tree ([`fetch_tree`]), measure what
//! it expands to ([`Expansion`]: a DAG of a few KB can stand for millions of
//! entries, since a directory may be referenced many times) and refuse it
//! beyond the caller's [`Limits`], then create it on a blocking thread,
//! one directory at a time through handles ([`crate::hostfs`]: nothing is
//! created through a symlink, at any depth, without recursion), placing each
//! directory's files several at a time. With a store that has local blob
//! files (the embedded one), files are hardlinks of the blob files (mode
//! 0444, or 0555 via the store's executable variant), so materialising costs
//! no copies; otherwise, or when linking fails (other filesystem, link
//! limit), the bytes are copied from the blob stream, while the disk keeps
//! its reserve. The walk stops when cancelled or past its deadline.
//!
//! Hardlinked files share their inode with the store: callers must treat a
//! materialised tree as read-only (the executor shares it read-only).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::hostfs::{open_parent, Dir};

use super::blob::BlobError;
use super::digest::B3Digest;
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::node::{Node, PathComponent};
use super::Store;

/// How many files are placed at once.
const PARALLEL_FILES: usize = 8;

/// Materialising a node failed.
#[derive(Debug, thiserror::Error)]
pub enum MaterialiseError {
    /// A directory of the tree is not in the store.
    #[error("directory {0} is not in the store")]
    MissingDirectory(B3Digest),
    /// A file's blob is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(B3Digest),
    /// Fetching the directory tree failed.
    #[error("fetching directory tree {root}")]
    FetchDirectories {
        /// The root asked for.
        root: B3Digest,
        /// Why.
        #[source]
        source: Box<DirectoryError>,
    },
    /// Reading a blob from the store failed.
    #[error("reading blob {digest}")]
    ReadBlob {
        /// The blob.
        digest: B3Digest,
        /// Why.
        #[source]
        source: BlobError,
    },
    /// Creating something on the host failed.
    #[error("creating {path}")]
    Create {
        /// What was being created.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The tree expands beyond a limit of the caller's.
    #[error("the input tree expands to {value} {what}, over the limit of {limit}")]
    TooLarge {
        /// `entries`, `bytes` or `levels`.
        what: &'static str,
        /// What the tree expands to.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The disk fell to its reserve while copying.
    #[error("the data disk has {free} bytes free, below the reserve of {reserve}")]
    DiskReserve {
        /// Free bytes.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// Materialising was cancelled.
    #[error("materialising was cancelled")]
    Cancelled,
    /// Materialising ran past its deadline.
    #[error("materialising ran past its deadline")]
    Deadline,
    /// The blocking task died.
    #[error("materialising task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A blob did not have the size its node announces.
    #[error("{path}: blob {digest} has {actual} bytes, the node says {expected}")]
    SizeMismatch {
        /// The file being written.
        path: PathBuf,
        /// The blob.
        digest: B3Digest,
        /// Size from the node.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
}

impl MaterialiseError {
    /// The digest missing from the store, if that is what failed (the
    /// executor answers FAILED_PRECONDITION for these).
    pub fn missing_digest(&self) -> Option<B3Digest> {
        match self {
            MaterialiseError::MissingDirectory(digest) | MaterialiseError::MissingBlob(digest) => {
                Some(*digest)
            }
            _ => None,
        }
    }

    /// [`MaterialiseError::missing_digest`] with the kind of thing missing
    /// (`blob` or `directory`) and the digest in hex, for messages.
    pub fn missing(&self) -> Option<(&'static str, String)> {
        match self {
            MaterialiseError::MissingDirectory(digest) => Some(("directory", digest.to_hex())),
            MaterialiseError::MissingBlob(digest) => Some(("blob", digest.to_hex())),
            _ => None,
        }
    }
}

/// What a tree expands to on disk: every occurrence of a directory counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expansion {
    /// Entries created (files, symlinks, directories, the root included).
    pub entries: u64,
    /// File bytes.
    pub bytes: u64,
    /// Levels of directories, the root's included.
    pub depth: u64,
}

impl Expansion {
    /// Both trees side by side (saturating).
    pub fn plus(self, other: Expansion) -> Expansion {
        Expansion {
            entries: self.entries.saturating_add(other.entries),
            bytes: self.bytes.saturating_add(other.bytes),
            depth: self.depth.max(other.depth),
        }
    }

    /// The first limit this breaks, as an error.
    pub fn check(&self, limits: &Limits) -> Result<(), MaterialiseError> {
        for (what, value, limit) in [
            ("entries", self.entries, limits.max_entries),
            ("bytes", self.bytes, limits.max_bytes),
            ("levels", self.depth, limits.max_depth),
        ] {
            if value > limit {
                return Err(MaterialiseError::TooLarge { what, value, limit });
            }
        }
        Ok(())
    }
}

/// Bounds on what one materialisation may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries in all.
    pub max_entries: u64,
    /// File bytes in all (hardlinked or copied).
    pub max_bytes: u64,
    /// Directory levels: Linux cannot name a path deeper than 2048
    /// components (PATH_MAX), and no tool can use one.
    pub max_depth: u64,
    /// Free bytes the disk must keep while files are copied.
    pub min_free_bytes: u64,
}

impl Limits {
    /// No bounds (for the CLI's export to a directory of the user's).
    pub fn unlimited() -> Self {
        Self {
            max_entries: u64::MAX,
            max_bytes: u64::MAX,
            max_depth: u64::MAX,
            min_free_bytes: 0,
        }
    }
}

impl Default for Limits {
    /// 1 000 000 entries, 64 GiB, 2048 levels, 1 GiB kept free (the
    /// `kiln serve` defaults).
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
            max_depth: 2048,
            min_free_bytes: 1 << 30,
        }
    }
}

/// When to stop early.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Stops the walk when cancelled.
    pub cancel: Option<CancellationToken>,
    /// Stops the walk when passed.
    pub deadline: Option<Instant>,
    /// Free bytes the disk must keep while files are copied.
    pub min_free_bytes: u64,
}

/// Every directory below (and including) the root of `node`, by digest.
pub async fn fetch_tree(
    store: &Store,
    node: &Node,
) -> Result<HashMap<B3Digest, Directory>, MaterialiseError> {
    let Node::Directory { digest: root, .. } = node else {
        return Ok(HashMap::new());
    };
    let mut tree = HashMap::new();
    let mut directories = store.directories.get_recursive(root);
    while let Some(directory) = directories.next().await {
        let directory = directory.map_err(|source| match source {
            DirectoryError::NotFound(digest) => MaterialiseError::MissingDirectory(digest),
            source => MaterialiseError::FetchDirectories {
                root: *root,
                source: Box::new(source),
            },
        })?;
        tree.insert(directory.digest(), directory);
    }
    Ok(tree)
}

/// What `node` expands to, from its fetched `tree`. Each distinct directory
/// is measured once (children before parents, without recursion), so a DAG
/// that expands to 2^18 copies costs 18 steps.
pub fn expansion(
    node: &Node,
    tree: &HashMap<B3Digest, Directory>,
) -> Result<Expansion, MaterialiseError> {
    let root = match node {
        Node::Directory { digest, .. } => *digest,
        Node::File { size, .. } => {
            return Ok(Expansion {
                entries: 1,
                bytes: *size,
                depth: 0,
            })
        }
        Node::Symlink { .. } => {
            return Ok(Expansion {
                entries: 1,
                ..Expansion::default()
            })
        }
    };
    let mut measured: HashMap<B3Digest, Expansion> = HashMap::new();
    let mut stack = vec![root];
    while let Some(&digest) = stack.last() {
        if measured.contains_key(&digest) {
            stack.pop();
            continue;
        }
        let directory = tree
            .get(&digest)
            .ok_or(MaterialiseError::MissingDirectory(digest))?;
        let unmeasured: Vec<B3Digest> = directory
            .child_directories()
            .filter(|c| !measured.contains_key(c))
            .collect();
        if !unmeasured.is_empty() {
            stack.extend(unmeasured);
            continue;
        }
        let mut total = Expansion {
            entries: 1,
            bytes: 0,
            depth: 1,
        };
        for (_, child) in directory.nodes() {
            let e = match child {
                Node::Directory { digest, .. } => {
                    let e = measured[digest];
                    Expansion {
                        depth: e.depth.saturating_add(1),
                        ..e
                    }
                }
                Node::File { size, .. } => Expansion {
                    entries: 1,
                    bytes: *size,
                    depth: 0,
                },
                Node::Symlink { .. } => Expansion {
                    entries: 1,
                    ..Expansion::default()
                },
            };
            total = Expansion {
                entries: total.entries.saturating_add(e.entries),
                bytes: total.bytes.saturating_add(e.bytes),
                depth: total.depth.max(e.depth),
            };
        }
        measured.insert(digest, total);
        stack.pop();
    }
    Ok(measured[&root])
}

/// Creates `target` (which must not exist, a path of the caller's) holding
/// `node`, without limits.
pub async fn materialise(
    store: &Store,
    node: &Node,
    target: &Path,
) -> Result<(), MaterialiseError> {
    let create = |source| MaterialiseError::Create {
        path: target.to_owned(),
        source,
    };
    let (parent, name) = open_parent(target).map_err(create)?;
    let tree = fetch_tree(store, node).await?;
    materialise_at(
        store,
        parent,
        name,
        node,
        tree,
        target.to_owned(),
        Control::default(),
    )
    .await
}

/// Creates `name` in `parent` holding `node`, whose directories are `tree`
/// ([`fetch_tree`]); `origin` names it in messages. The caller has checked
/// the [`expansion`] against its limits.
pub async fn materialise_at(
    store: &Store,
    parent: Dir,
    name: OsString,
    node: &Node,
    tree: HashMap<B3Digest, Directory>,
    origin: PathBuf,
    control: Control,
) -> Result<(), MaterialiseError> {
    let (store, node, runtime) = (
        store.clone(),
        node.clone(),
        tokio::runtime::Handle::current(),
    );
    tokio::task::spawn_blocking(move || {
        let creator = Creator {
            store: &store,
            runtime: &runtime,
            tree: &tree,
            origin: &origin,
            control: &control,
        };
        creator.create(&parent, &name, &node)
    })
    .await
    .map_err(MaterialiseError::Task)?
}

/// One directory being filled: its identity and the subdirectories still to
/// create.
struct Level<'t> {
    id: crate::hostfs::DirId,
    pending: Vec<(&'t PathComponent, B3Digest)>,
}

/// The blocking creation walk.
struct Creator<'a> {
    store: &'a Store,
    runtime: &'a tokio::runtime::Handle,
    tree: &'a HashMap<B3Digest, Directory>,
    origin: &'a Path,
    control: &'a Control,
}

impl<'a> Creator<'a> {
    /// Creates `node` as `name` in `parent`: directories one at a time,
    /// descending by name and climbing back through `..` (checked), so only
    /// one directory handle is open at any depth.
    fn create(&self, parent: &Dir, name: &OsStr, node: &'a Node) -> Result<(), MaterialiseError> {
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
            blobs.local_path(&job.digest)
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
