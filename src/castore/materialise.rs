//! Materialise: a castore node becomes a host path again.
//!
//! Steps: fetch the whole directory tree, create the directories and
//! symlinks, then place the files several at a time. With a store that has
//! local blob files (the embedded one), files are hardlinks of the blob
//! files (mode 0444, or 0555 via the store's executable variant), so
//! materialising costs no copies; otherwise, or when linking fails (other
//! filesystem, link limit), the bytes are copied from the blob stream.
//!
//! Hardlinked files share their inode with the store: callers must treat a
//! materialised tree as read-only (the executor shares it read-only).

use std::collections::HashMap;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use super::blob::BlobError;
use super::digest::B3Digest;
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::node::Node;
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

/// A file still to place.
struct FileJob {
    path: PathBuf,
    digest: B3Digest,
    size: u64,
    executable: bool,
}

/// Creates `target` (which must not exist) holding `node`.
pub async fn materialise(
    store: &Store,
    node: &Node,
    target: &Path,
) -> Result<(), MaterialiseError> {
    let tree = match node {
        Node::Directory { digest, .. } => fetch_tree(store, digest).await?,
        _ => HashMap::new(),
    };
    let mut files = Vec::new();
    let (node, target_owned) = (node.clone(), target.to_owned());
    let planned = tokio::task::spawn_blocking(move || {
        create_tree(&node, &target_owned, &tree, &mut files).map(|()| files)
    })
    .await;
    let files = match planned {
        Ok(result) => result?,
        Err(join) => {
            return Err(MaterialiseError::Create {
                path: target.to_owned(),
                source: io::Error::other(join),
            })
        }
    };
    futures::stream::iter(files)
        .map(|job| place_file(store, job))
        .buffer_unordered(PARALLEL_FILES)
        .try_collect::<()>()
        .await
}

/// Every directory below (and including) `root`, by digest.
async fn fetch_tree(
    store: &Store,
    root: &B3Digest,
) -> Result<HashMap<B3Digest, Directory>, MaterialiseError> {
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

/// Creates directories and symlinks, listing the files to place. Blocking.
fn create_tree(
    node: &Node,
    path: &Path,
    tree: &HashMap<B3Digest, Directory>,
    files: &mut Vec<FileJob>,
) -> Result<(), MaterialiseError> {
    let create_err = |source| MaterialiseError::Create {
        path: path.to_owned(),
        source,
    };
    match node {
        Node::File {
            digest,
            size,
            executable,
        } => files.push(FileJob {
            path: path.to_owned(),
            digest: *digest,
            size: *size,
            executable: *executable,
        }),
        Node::Symlink { target } => {
            let target = std::ffi::OsStr::from_bytes(target.as_bytes());
            std::os::unix::fs::symlink(target, path).map_err(create_err)?;
        }
        Node::Directory { digest, .. } => {
            let directory = tree
                .get(digest)
                .ok_or(MaterialiseError::MissingDirectory(*digest))?;
            std::fs::create_dir(path).map_err(create_err)?;
            for (name, child) in directory.nodes() {
                let child_path = path.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
                create_tree(child, &child_path, tree, files)?;
            }
        }
    }
    Ok(())
}

/// Places one file: a hardlink of the local blob file when possible, a
/// copy of the blob stream otherwise.
async fn place_file(store: &Store, job: FileJob) -> Result<(), MaterialiseError> {
    let local = if job.executable {
        store
            .blobs
            .local_executable_path(&job.digest)
            .await
            .map_err(|source| MaterialiseError::ReadBlob {
                digest: job.digest,
                source,
            })?
    } else {
        store.blobs.local_path(&job.digest)
    };
    if let Some(local) = local {
        if tokio::fs::hard_link(&local, &job.path).await.is_ok() {
            return Ok(());
        }
    }
    copy_file(store, &job).await
}

async fn copy_file(store: &Store, job: &FileJob) -> Result<(), MaterialiseError> {
    let read_err = |source| MaterialiseError::ReadBlob {
        digest: job.digest,
        source,
    };
    let create_err = |source| MaterialiseError::Create {
        path: job.path.clone(),
        source,
    };
    let blob = store.blobs.open_read(&job.digest).await.map_err(read_err)?;
    let mut blob = blob.ok_or(MaterialiseError::MissingBlob(job.digest))?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&job.path)
        .await
        .map_err(create_err)?;
    let written = tokio::io::copy(&mut blob.reader, &mut file)
        .await
        .map_err(|e| read_err(BlobError::ReadSource(e)))?;
    file.flush().await.map_err(create_err)?;
    if written != job.size {
        return Err(MaterialiseError::SizeMismatch {
            path: job.path.clone(),
            digest: job.digest,
            expected: job.size,
            actual: written,
        });
    }
    let mode = if job.executable { 0o555 } else { 0o444 };
    tokio::fs::set_permissions(&job.path, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(create_err)
}
