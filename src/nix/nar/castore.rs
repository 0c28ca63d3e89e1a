//! NAR of a castore tree, streamed: directories are fetched one at a time as
//! the walk reaches them (only the chain from the root to the current
//! directory is held), and file contents are copied from the blob store in
//! chunks straight into the output.

use std::pin::Pin;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    close, directory_open, entry_open, file_header, padding, symlink, token, NarError, NarHash,
    NarHasher, SourceError, MAGIC,
};
use crate::castore::{B3Digest, Directory, Node, PathComponent, Store};
use crate::nix::hash::HashAlgorithm;

/// A blob being read, as a [`TreeSource`] hands it out.
pub type BlobRead = Pin<Box<dyn AsyncRead + Send>>;

/// Where a castore tree's directories and blobs come from: the narrow view
/// NAR serialisation needs of a store.
#[async_trait]
pub trait TreeSource: Send + Sync {
    /// The directory with this digest, `None` if the store lacks it.
    async fn directory(&self, digest: &B3Digest) -> Result<Option<Directory>, SourceError>;

    /// A reader over the blob with this digest, `None` if the store lacks it.
    async fn blob(&self, digest: &B3Digest) -> Result<Option<BlobRead>, SourceError>;
}

/// Any castore (embedded or remote over gRPC) is a tree source.
#[async_trait]
impl TreeSource for Store {
    async fn directory(&self, digest: &B3Digest) -> Result<Option<Directory>, SourceError> {
        Ok(self.directories.get(digest).await?)
    }

    async fn blob(&self, digest: &B3Digest) -> Result<Option<BlobRead>, SourceError> {
        Ok(self.blobs.open_read(digest).await?.map(|blob| blob.reader))
    }
}

/// Writes the NAR of the tree rooted at `root` to `out`.
pub async fn write_nar<W>(source: &dyn TreeSource, root: &Node, out: &mut W) -> Result<(), NarError>
where
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut buf = Vec::new();
    token(&mut buf, MAGIC);
    out.write_all(&buf).await.map_err(NarError::Write)?;
    // Each frame is a directory being written: its remaining entries.
    let mut stack: Vec<std::vec::IntoIter<(PathComponent, Node)>> = Vec::new();
    if let Some(frame) = open_node(source, root, out).await? {
        stack.push(frame);
    }
    while let Some(frame) = stack.last_mut() {
        buf.clear();
        match frame.next() {
            Some((name, node)) => {
                entry_open(&mut buf, name.as_bytes());
                out.write_all(&buf).await.map_err(NarError::Write)?;
                match open_node(source, &node, out).await? {
                    Some(child) => stack.push(child),
                    None => write_close(out).await?,
                }
            }
            None => {
                // Close the directory node, then the entry holding it.
                stack.pop();
                write_close(out).await?;
                if !stack.is_empty() {
                    write_close(out).await?;
                }
            }
        }
    }
    out.flush().await.map_err(NarError::Write)
}

/// SHA-256 and length of the NAR of the tree rooted at `root`: the store's
/// NAR hash.
pub async fn nar_hash(source: &dyn TreeSource, root: &Node) -> Result<NarHash, NarError> {
    nar_hash_with(source, root, HashAlgorithm::Sha256).await
}

/// The `algorithm` digest and length of the NAR of the tree rooted at
/// `root`, the NAR streamed once into the hasher (a recursive fixed output
/// may declare any of Nix's algorithms).
pub async fn nar_hash_with(
    source: &dyn TreeSource,
    root: &Node,
    algorithm: HashAlgorithm,
) -> Result<NarHash, NarError> {
    let mut hasher = NarHasher::with_algorithm(algorithm);
    write_nar(source, root, &mut hasher).await?;
    Ok(hasher.finish())
}

/// Writes a node; a file or symlink completely, a directory only its
/// opening, returning its entries for the caller to walk.
async fn open_node<W>(
    source: &dyn TreeSource,
    node: &Node,
    out: &mut W,
) -> Result<Option<std::vec::IntoIter<(PathComponent, Node)>>, NarError>
where
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut buf = Vec::new();
    match node {
        Node::Symlink { target } => {
            symlink(&mut buf, target.as_bytes());
            out.write_all(&buf).await.map_err(NarError::Write)?;
            Ok(None)
        }
        Node::File {
            digest,
            size,
            executable,
        } => {
            write_file(source, digest, *size, *executable, out).await?;
            Ok(None)
        }
        Node::Directory { digest, .. } => {
            let directory = source
                .directory(digest)
                .await
                .map_err(|source| NarError::FetchDirectory {
                    digest: *digest,
                    source,
                })?
                .ok_or(NarError::MissingDirectory(*digest))?;
            directory_open(&mut buf);
            out.write_all(&buf).await.map_err(NarError::Write)?;
            let entries: Vec<(PathComponent, Node)> = directory
                .nodes()
                .map(|(name, node)| (name.clone(), node.clone()))
                .collect();
            Ok(Some(entries.into_iter()))
        }
    }
}

async fn write_file<W>(
    source: &dyn TreeSource,
    digest: &B3Digest,
    size: u64,
    executable: bool,
    out: &mut W,
) -> Result<(), NarError>
where
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut reader = source
        .blob(digest)
        .await
        .map_err(|source| NarError::OpenBlob {
            digest: *digest,
            source,
        })?
        .ok_or(NarError::MissingBlob(*digest))?;
    let mut buf = Vec::new();
    file_header(&mut buf, executable, size);
    out.write_all(&buf).await.map_err(NarError::Write)?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(|source| NarError::ReadBlob {
                digest: *digest,
                source,
            })?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        if copied > size {
            break;
        }
        out.write_all(&chunk[..n]).await.map_err(NarError::Write)?;
    }
    if copied != size {
        return Err(NarError::BlobSize {
            digest: *digest,
            expected: size,
            actual: copied,
        });
    }
    buf.clear();
    buf.extend_from_slice(padding(size));
    close(&mut buf);
    out.write_all(&buf).await.map_err(NarError::Write)
}

async fn write_close<W>(out: &mut W) -> Result<(), NarError>
where
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut buf = Vec::new();
    close(&mut buf);
    out.write_all(&buf).await.map_err(NarError::Write)
}
