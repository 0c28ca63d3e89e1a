//! Ingest: a host path becomes castore nodes.
//!
//! Steps: scan the tree (regular files with their executable bit,
//! symlinks as they are, directories; anything else is refused), store the
//! files' bytes several at a time (each file is hashed streaming, large ones
//! memory-mapped on the rayon pool, never read into memory whole), then
//! assemble the directories bottom-up and store them leaves first.
//!
//! Two modes: [`IngestMode::Copy`] leaves the host files untouched;
//! [`IngestMode::Move`] hands the files' bytes to the blob store (for the
//! embedded store, a rename: build outputs are ingested without copying).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};

use super::blob::{BlobError, StoredBlob};
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::errors::ValidationError;
use super::node::{Node, PathComponent, SymlinkTarget};
use super::{B3Digest, Store};

/// How many files are stored at once.
const PARALLEL_FILES: usize = 8;

/// What happens to the host files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestMode {
    /// Copy the bytes; the host tree is left as it was.
    Copy,
    /// Give the files to the store (renamed into it when possible); the host
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
    /// Storing the directories failed.
    #[error("storing the directories of {path}")]
    StoreDirectories {
        /// The ingested root.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<DirectoryError>,
    },
    /// The scanning task died.
    #[error("scanning task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A scanned tree; files refer to their index in the list of files to store.
#[derive(Debug)]
enum Scanned {
    Directory(Vec<(PathComponent, Scanned)>),
    File { index: usize, executable: bool },
    Symlink(SymlinkTarget),
}

/// Stores the tree at `path` and returns its root node (nameless: the
/// caller names it).
pub async fn ingest(store: &Store, path: &Path, mode: IngestMode) -> Result<Node, IngestError> {
    let root = path.to_owned();
    let (tree, files) = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        scan(&root, &mut files).map(|tree| (tree, files))
    })
    .await
    .map_err(IngestError::Task)??;

    let blobs = store_files(store, files, mode).await?;

    let mut directories = Vec::new();
    let node = assemble(tree, path, &blobs, &mut directories, &mut HashSet::new())?;
    if !directories.is_empty() {
        store
            .directories
            .put_many(directories)
            .await
            .map_err(|source| IngestError::StoreDirectories {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
    }
    Ok(node)
}

/// [`ingest`] in [`IngestMode::Copy`].
pub async fn ingest_path(store: &Store, path: &Path) -> Result<Node, IngestError> {
    ingest(store, path, IngestMode::Copy).await
}

/// [`ingest`] in [`IngestMode::Move`], for build outputs.
pub async fn ingest_path_moving(store: &Store, path: &Path) -> Result<Node, IngestError> {
    ingest(store, path, IngestMode::Move).await
}

/// Walks the tree at `path`, listing regular files in `files`. Blocking.
fn scan(path: &Path, files: &mut Vec<PathBuf>) -> Result<Scanned, IngestError> {
    let inspect = |source| IngestError::Inspect {
        path: path.to_owned(),
        source,
    };
    let metadata = fs::symlink_metadata(path).map_err(inspect)?;
    let kind = metadata.file_type();
    if kind.is_file() {
        files.push(path.to_owned());
        let executable = metadata.permissions().mode() & 0o100 != 0;
        return Ok(Scanned::File {
            index: files.len() - 1,
            executable,
        });
    }
    if kind.is_symlink() {
        let target = fs::read_link(path).map_err(inspect)?;
        let target = SymlinkTarget::try_from(target.as_os_str().as_bytes()).map_err(|source| {
            IngestError::Target {
                path: path.to_owned(),
                source,
            }
        })?;
        return Ok(Scanned::Symlink(target));
    }
    if !kind.is_dir() {
        return Err(IngestError::Unsupported {
            path: path.to_owned(),
            kind: kind_name(&kind),
        });
    }
    let mut children = Vec::new();
    for entry in fs::read_dir(path).map_err(inspect)? {
        let entry = entry.map_err(inspect)?;
        let child = entry.path();
        let name = PathComponent::try_from(entry.file_name().as_bytes()).map_err(|source| {
            IngestError::Name {
                path: child.clone(),
                source,
            }
        })?;
        children.push((name, scan(&child, files)?));
    }
    Ok(Scanned::Directory(children))
}

fn kind_name(kind: &fs::FileType) -> &'static str {
    if kind.is_fifo() {
        "fifo"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_char_device() {
        "character device"
    } else {
        "file of unknown type"
    }
}

/// Stores the files' bytes, several at a time, in list order.
async fn store_files(
    store: &Store,
    files: Vec<PathBuf>,
    mode: IngestMode,
) -> Result<Vec<StoredBlob>, IngestError> {
    futures::stream::iter(files)
        .map(|path| async move {
            let stored = match mode {
                IngestMode::Copy => store.blobs.put_file(&path).await,
                IngestMode::Move => store.blobs.put_file_moving(&path).await,
            };
            stored.map_err(|source| IngestError::StoreFile { path, source })
        })
        .buffered(PARALLEL_FILES)
        .try_collect()
        .await
}

/// Builds the nodes bottom-up, appending each new directory to
/// `directories` after its children (leaves first).
fn assemble(
    tree: Scanned,
    path: &Path,
    blobs: &[StoredBlob],
    directories: &mut Vec<Directory>,
    seen: &mut HashSet<B3Digest>,
) -> Result<Node, IngestError> {
    Ok(match tree {
        Scanned::File { index, executable } => Node::File {
            digest: blobs[index].digest,
            size: blobs[index].size,
            executable,
        },
        Scanned::Symlink(target) => Node::Symlink { target },
        Scanned::Directory(children) => {
            let mut directory = Directory::new();
            for (name, child) in children {
                let child_path = path.join(name.to_os_str());
                let node = assemble(child, &child_path, blobs, directories, seen)?;
                // One directory listing never repeats a name; if it somehow
                // did, say so rather than drop an entry.
                directory
                    .add(name, node)
                    .map_err(|source| IngestError::Name {
                        path: child_path,
                        source,
                    })?;
            }
            let node = directory.as_node();
            if let Node::Directory { digest, .. } = &node {
                if seen.insert(*digest) {
                    directories.push(directory);
                }
            }
            node
        }
    })
}
