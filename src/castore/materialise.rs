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
//!
//! Parts: `expansion` measures a fetched tree and checks it against
//! [`Limits`]; `create` is the blocking walk that makes the host tree.

mod create;
mod expansion;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::hostfs::{open_parent, Dir};

use super::blob::BlobError;
use super::digest::B3Digest;
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::node::Node;
use super::Store;

pub use expansion::{expansion, Expansion, Limits};

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
        let creator = create::Creator {
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
