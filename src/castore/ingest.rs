//! Ingest: a host tree becomes castore nodes.
//!
//! The tree is walked through directory handles ([`crate::hostfs::walk`]):
//! no symlink is ever followed, nothing outside the tree is reached, and a
//! tree of any depth is walked in a loop, not by recursion. Regular files
//! (with their executable bit) are opened beneath their directory's handle
//! and handed to one [`BlobBatch`] for the whole ingest, a directory's worth
//! at a time (each hashed streaming, large ones memory-mapped on the rayon
//! pool, never read into memory whole); symlinks are stored as they are;
//! anything else is refused. Each directory is assembled when the walk
//! leaves it.
//!
//! Durability comes in one order: the blob batch is committed (every blob
//! durable) first, then all directories go to the directory store in one
//! put, leaves first, so a stored directory never names something that a
//! crash could lose. The ingest answers only after both.
//!
//! Two modes: [`IngestMode::Copy`] leaves the host files untouched;
//! [`IngestMode::Move`] hands the files' bytes to the blob store (for the
//! embedded store, a hard link of the very inode: build outputs are ingested
//! without copying).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::hostfs::walk::{walk, Event, Options};
use crate::hostfs::{open_parent, Dir, Kind, RegularFile};

use super::blob::{BatchPut, BlobBatch, BlobError, StoredBlob};
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::errors::ValidationError;
use super::node::{Node, PathComponent, SymlinkTarget};
use super::{B3Digest, Store};

/// How many files of a directory wait to be stored at most (opened, all at
/// once, when they are).
const BATCH_FILES: usize = 256;

#[cfg(test)]
mod tests;

/// What happens to the host files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestMode {
    /// Copy the bytes; the host tree is left as it was.
    Copy,
    /// Give the files to the store (linked into it when possible); the host
    /// tree is left without its files. For build outputs.
    Move,
}

/// Ingesting a host path failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Inspecting a path (metadata, directory listing, link target) failed.
    #[error("inspecting {path}")]
    Inspect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file, a directory nor a symlink.
    #[error("{path} is a {kind}: only regular files, directories and symlinks can be stored")]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A file name breaks the castore name rules.
    #[error("{path}: name not storable")]
    Name {
        /// The path.
        path: PathBuf,
        /// The rule broken.
        #[source]
        source: ValidationError,
    },
    /// A symlink target breaks the castore target rules.
    #[error("{path}: symlink target not storable")]
    Target {
        /// The symlink.
        path: PathBuf,
        /// The rule broken.
        #[source]
        source: ValidationError,
    },
    /// Storing a file's bytes failed.
    #[error("storing {path}")]
    StoreFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BlobError,
    },
    /// Making the stored files durable failed (no directory was stored).
    #[error("making the files of {path} durable")]
    CommitFiles {
        /// The ingested root.
        path: PathBuf,
        /// Why.
        #[source]
        source: BlobError,
    },
    /// Storing the directories failed.
    #[error("storing the directories of {path}")]
    StoreDirectories {
        /// The ingested root.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<DirectoryError>,
    },
    /// The ingest ran past its deadline and was stopped.
    #[error("ingesting {path} ran past its deadline")]
    Deadline {
        /// The ingested root.
        path: PathBuf,
    },
    /// The scanning task died.
    #[error("scanning task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Stores the tree at `path` (a path the caller trusts up to its last
/// component, which may be a symlink and is then stored as one) and returns
/// its root node (nameless: the caller names it).
pub async fn ingest(store: &Store, path: &Path, mode: IngestMode) -> Result<Node, IngestError> {
    let (parent, name) = open_parent(path).map_err(|source| IngestError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    ingest_at(store, parent, name, path.to_owned(), mode, None).await
}

/// [`ingest`] in [`IngestMode::Copy`].
pub async fn ingest_path(store: &Store, path: &Path) -> Result<Node, IngestError> {
    ingest(store, path, IngestMode::Copy).await
}

/// [`ingest`] in [`IngestMode::Move`].
pub async fn ingest_path_moving(store: &Store, path: &Path) -> Result<Node, IngestError> {
    ingest(store, path, IngestMode::Move).await
}

/// Stores the entry `name` of the directory `parent` and everything below
/// it. `origin` is how messages name that entry (for build outputs, the path
/// the guest saw). Past `deadline` the walk stops with
/// [`IngestError::Deadline`].
pub async fn ingest_at(
    store: &Store,
    parent: Dir,
    name: OsString,
    origin: PathBuf,
    mode: IngestMode,
    deadline: Option<Instant>,
) -> Result<Node, IngestError> {
    let (store, runtime) = (store.clone(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        let mut walker = Walker {
            store: &store,
            blobs: store.blobs.batch(),
            runtime: &runtime,
            mode,
            origin: &origin,
            deadline,
            arena: Vec::new(),
            open: Vec::new(),
            batch: None,
            directories: Vec::new(),
            seen: HashSet::new(),
            root: None,
        };
        walk(&parent, &name, Options::default(), |event| {
            walker.event(event)
        })
        .map_err(|e| walker.error_of(e))?;
        walker.finish()
    })
    .await
    .map_err(IngestError::Task)?
}

/// A directory being assembled: its place in the tree and its entries so far.
struct Assembling {
    parent: Option<usize>,
    name: OsString,
    directory: Directory,
}

/// Files of one directory waiting to be stored.
struct Batch {
    dir: Dir,
    at: usize,
    names: Vec<OsString>,
}

/// The walk's state: directories on the path from the root (`open`, indexes
/// into `arena`), the files waiting, the directories finished.
struct Walker<'a> {
    store: &'a Store,
    /// Where every file of the ingest goes; committed before the directories.
    blobs: Box<dyn BlobBatch + 'a>,
    runtime: &'a tokio::runtime::Handle,
    mode: IngestMode,
    origin: &'a Path,
    deadline: Option<Instant>,
    arena: Vec<Assembling>,
    open: Vec<usize>,
    batch: Option<Batch>,
    directories: Vec<Directory>,
    seen: HashSet<B3Digest>,
    root: Option<Node>,
}

/// Errors raised inside the walk's callback travel as `io::Error`s carrying
/// an [`IngestError`]; this unwraps them again.
fn carry(e: IngestError) -> io::Error {
    io::Error::other(e)
}

impl Walker<'_> {
    fn event(&mut self, event: Event<'_>) -> io::Result<()> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(carry(IngestError::Deadline {
                path: self.origin.to_owned(),
            }));
        }
        match event {
            Event::Enter { name, .. } => {
                self.flush()?;
                self.arena.push(Assembling {
                    parent: self.open.last().copied(),
                    name: name.to_owned(),
                    directory: Directory::new(),
                });
                self.open.push(self.arena.len() - 1);
            }
            Event::Leaf { dir, name, kind } => self.leaf(dir, name, kind)?,
            Event::Leave { .. } => {
                self.flush()?;
                let Some(done) = self.open.pop() else {
                    return Ok(());
                };
                let directory = std::mem::take(&mut self.arena[done].directory);
                let node = directory.as_node();
                if let Node::Directory { digest, .. } = &node {
                    if self.seen.insert(*digest) {
                        self.directories.push(directory);
                    }
                }
                self.place(done, node)?;
            }
        }
        Ok(())
    }

    /// A file, symlink or unsupported entry of the current directory (or
    /// the root itself when it is not a directory).
    fn leaf(&mut self, dir: &Dir, name: &OsStr, kind: Kind) -> io::Result<()> {
        match kind {
            Kind::File => {
                if self.open.is_empty() {
                    let opened = dir
                        .open_regular(name)
                        .map_err(|source| self.inspect(name, source))?;
                    let executable = is_executable(&opened);
                    let stored = self.store_one(dir, name, opened)?;
                    self.root = Some(file_node(stored, executable));
                    return Ok(());
                }
                let at = self.open[self.open.len() - 1];
                if self.batch.as_ref().is_some_and(|b| b.at != at) {
                    self.flush()?;
                }
                let batch = match self.batch.take() {
                    Some(batch) => batch,
                    None => Batch {
                        dir: dir.try_clone()?,
                        at,
                        names: Vec::new(),
                    },
                };
                let batch = self.batch.insert(batch);
                batch.names.push(name.to_owned());
                if batch.names.len() >= BATCH_FILES {
                    self.flush()?;
                }
                Ok(())
            }
            Kind::Symlink => {
                let target = dir
                    .read_link(name)
                    .map_err(|source| self.inspect(name, source))?;
                let target = SymlinkTarget::try_from(target.as_bytes()).map_err(|source| {
                    carry(IngestError::Target {
                        path: self.path_of(name),
                        source,
                    })
                })?;
                self.place_leaf(name, Node::Symlink { target })
            }
            Kind::Dir => Ok(()),
            Kind::Other(what) => Err(carry(IngestError::Unsupported {
                path: self.path_of(name),
                kind: what,
            })),
        }
    }

    /// Stores the waiting files and adds them to their directory.
    fn flush(&mut self) -> io::Result<()> {
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        // Opened several at once: on a tree of small files, opening is a
        // good part of the work.
        let dir = &batch.dir;
        let opened: Vec<io::Result<RegularFile>> = batch
            .names
            .par_iter()
            .map(|name| dir.open_regular(name))
            .collect();
        let mut names = Vec::with_capacity(batch.names.len());
        let mut files = Vec::with_capacity(batch.names.len());
        for (name, opened) in batch.names.into_iter().zip(opened) {
            let opened = opened.map_err(|source| {
                carry(IngestError::Inspect {
                    path: self.path_in(batch.at, &name),
                    source,
                })
            })?;
            names.push((name.clone(), is_executable(&opened)));
            files.push((name, opened));
        }
        let stored = self.put(&batch.dir, files);
        let stored = stored.map_err(|source| {
            carry(IngestError::StoreFile {
                path: self.dir_path(batch.at),
                source,
            })
        })?;
        for ((name, executable), stored) in names.iter().zip(stored) {
            let stored = stored.map_err(|source| {
                carry(IngestError::StoreFile {
                    path: self.path_in(batch.at, name),
                    source,
                })
            })?;
            let node = file_node(stored, *executable);
            self.add(batch.at, name, node)?;
        }
        Ok(())
    }

    /// Hands files of `dir` to the blob batch, as the mode says.
    fn put(&mut self, dir: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let blobs = &mut self.blobs;
        self.runtime.block_on(async {
            match self.mode {
                IngestMode::Copy => blobs.put_opened(files).await,
                IngestMode::Move => blobs.put_taken(dir, files).await,
            }
        })
    }

    /// Stores a root that is a single file.
    fn store_one(
        &mut self,
        dir: &Dir,
        name: &OsStr,
        opened: RegularFile,
    ) -> io::Result<StoredBlob> {
        let err = |source| {
            carry(IngestError::StoreFile {
                path: self.origin.to_owned(),
                source,
            })
        };
        let stored = self
            .put(dir, vec![(name.to_owned(), opened)])
            .map_err(err)?;
        stored
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(BlobError::BatchFailed))
            .map_err(err)
    }

    /// A symlink of the current directory, or the root symlink.
    fn place_leaf(&mut self, name: &OsStr, node: Node) -> io::Result<()> {
        match self.open.last() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(&at) => self.add(at, name, node),
        }
    }

    /// A finished directory goes into its parent, or becomes the root.
    fn place(&mut self, done: usize, node: Node) -> io::Result<()> {
        match self.arena[done].parent {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(parent) => {
                let name = self.arena[done].name.clone();
                self.add(parent, &name, node)
            }
        }
    }

    fn add(&mut self, at: usize, name: &OsStr, node: Node) -> io::Result<()> {
        let component = PathComponent::try_from(name.as_bytes()).map_err(|source| {
            carry(IngestError::Name {
                path: self.path_in(at, name),
                source,
            })
        })?;
        // One directory listing never repeats a name; if it somehow did,
        // say so rather than drop an entry.
        self.arena[at]
            .directory
            .add(component, node)
            .map_err(|source| {
                carry(IngestError::Name {
                    path: self.path_in(at, name),
                    source,
                })
            })
    }

    /// The message path of `name` in the current directory.
    fn path_of(&self, name: &OsStr) -> PathBuf {
        match self.open.last() {
            None => self.origin.to_owned(),
            Some(&at) => self.path_in(at, name),
        }
    }

    /// The message path of `name` in the directory `at`: built only for
    /// errors (it is as long as the tree is deep).
    fn path_in(&self, at: usize, name: &OsStr) -> PathBuf {
        let mut path = self.dir_path(at);
        path.push(name);
        path
    }

    /// The message path of the directory `at`.
    fn dir_path(&self, at: usize) -> PathBuf {
        let mut names = Vec::new();
        let mut cur = Some(at);
        while let Some(i) = cur {
            if self.arena[i].parent.is_some() {
                names.push(&self.arena[i].name);
            }
            cur = self.arena[i].parent;
        }
        let mut path = self.origin.to_owned();
        for n in names.iter().rev() {
            path.push(n);
        }
        path
    }

    fn inspect(&self, name: &OsStr, source: io::Error) -> io::Error {
        carry(IngestError::Inspect {
            path: self.path_of(name),
            source,
        })
    }

    /// The walk's own error, or the [`IngestError`] a callback carried out.
    fn error_of(&self, e: io::Error) -> IngestError {
        match e.downcast::<IngestError>() {
            Ok(e) => e,
            Err(e) => IngestError::Inspect {
                path: self.origin.to_owned(),
                source: e,
            },
        }
    }

    /// Makes every stored file durable, then stores the finished
    /// directories, leaves first; returns the root.
    fn finish(mut self) -> Result<Node, IngestError> {
        self.flush().map_err(|e| self.error_of(e))?;
        let root = self.root.take().ok_or_else(|| IngestError::Inspect {
            path: self.origin.to_owned(),
            source: io::Error::other("the walk reported no root"),
        })?;
        self.runtime
            .block_on(self.blobs.commit())
            .map_err(|source| IngestError::CommitFiles {
                path: self.origin.to_owned(),
                source,
            })?;
        if !self.directories.is_empty() {
            let directories = std::mem::take(&mut self.directories);
            self.runtime
                .block_on(self.store.directories.put_many(directories))
                .map_err(|source| IngestError::StoreDirectories {
                    path: self.origin.to_owned(),
                    source: Box::new(source),
                })?;
        }
        Ok(root)
    }
}

/// Whether the owner may execute the file: what castore's executable bit keeps.
fn is_executable(opened: &RegularFile) -> bool {
    opened.stat.st_mode & 0o100 != 0
}

fn file_node(stored: StoredBlob, executable: bool) -> Node {
    Node::File {
        digest: stored.digest,
        size: stored.size,
        executable,
    }
}
