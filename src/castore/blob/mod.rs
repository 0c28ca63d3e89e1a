//! Blob storage: the [`BlobService`] trait and its backends.
//!
//! - [`embedded`]: files under the data dir, the default.
//! - [`grpc`]: another kiln (or any tvix/snix castore) over gRPC.
//! - [`cached`]: an S3-compatible object store ([`object_store`]) shared
//!   by several hosts, behind a bounded local cache on each.
//!
//! A blob is addressed by the BLAKE3 digest of its bytes. Backends never
//! hold a whole blob in memory: puts stream, reads stream. A single put is
//! durable when it answers; trees of host files go through a [`BlobBatch`],
//! durable as a whole when committed.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncSeekExt};

use crate::hostfs::Dir;

use super::digest::B3Digest;
use super::errors::ValidationError;

pub mod batch;
pub mod cached;
pub mod counts;
pub mod embedded;
pub mod grpc;
pub mod object_store;
mod verify;

pub use batch::{BatchPut, BlobBatch};
pub use counts::BlobStats;
pub use verify::VerifyingReader;

/// Size of the read buffer and of the chunks sent over gRPC.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A blob being read.
pub struct BlobReader {
    /// The bytes; remote readers fail at the end if they do not match the digest.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    /// Length in bytes, when the backend knows it up front (local backends do;
    /// the gRPC protocol does not announce it).
    pub size: Option<u64>,
}

/// What a put stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlob {
    /// BLAKE3 of the bytes.
    pub digest: B3Digest,
    /// Length in bytes.
    pub size: u64,
}

/// A failed blob operation.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Creating the store's directories failed.
    #[error("creating blob store directory {path}")]
    CreateStore {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing a new blob to a temporary file failed.
    #[error("writing a new blob")]
    Write(#[source] io::Error),
    /// Making the blobs of a batch durable (flushing their bytes or their
    /// names to disk) failed; none of the batch's blobs not yet visible
    /// becomes visible.
    #[error("making stored blobs durable")]
    Durable(#[source] io::Error),
    /// An earlier step of this batch failed; it stores nothing more.
    #[error("the blob batch failed earlier")]
    BatchFailed,
    /// Reading the bytes to put failed.
    #[error("reading the bytes to store")]
    ReadSource(#[source] io::Error),
    /// Moving a verified blob into place failed.
    #[error("storing blob {digest}")]
    Persist {
        /// The blob.
        digest: B3Digest,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Opening or inspecting a stored blob failed.
    #[error("opening blob {digest}")]
    Open {
        /// The blob.
        digest: B3Digest,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or hashing a host file to ingest failed.
    #[error("hashing {path}")]
    HashFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host file changed between hashing and storing it.
    #[error("{path} changed while being stored (hashed {first}, stored copy {second})")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Digest before copying.
        first: B3Digest,
        /// Digest of the copy.
        second: B3Digest,
    },
    /// The remote store answered a different digest than the bytes sent.
    #[error("remote stored digest {remote}, but the bytes sent hash to {local}")]
    DigestMismatch {
        /// What the remote said.
        remote: B3Digest,
        /// What kiln computed.
        local: B3Digest,
    },
    /// Taking a build's file out of its tree failed.
    #[error("taking {path} out of the build tree")]
    Take {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A background task (hashing, file IO) died.
    #[error("blob store task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A remote Stat call failed.
    #[error("remote blob stat")]
    RemoteStat(#[source] Box<tonic::Status>),
    /// A remote Read call failed.
    #[error("remote blob read")]
    RemoteRead(#[source] Box<tonic::Status>),
    /// A remote Put call failed.
    #[error("remote blob put")]
    RemotePut(#[source] Box<tonic::Status>),
    /// The grants table of tenants' views could not be read or written.
    #[error("the castore's grants table")]
    Grants(#[source] Box<crate::castore::scoped::GrantsError>),
    /// The remote answered a malformed digest.
    #[error("remote answered an invalid digest")]
    RemoteDigest(#[source] ValidationError),
    /// The object store could not be reached or refused a request (gRPC
    /// UNAVAILABLE). The client's message is kept as text: its errors
    /// repeat their causes in their own messages.
    #[error("object store {store}: {action}: {message}")]
    Unavailable {
        /// The store: bucket, prefix and endpoint (never credentials).
        store: String,
        /// What kiln was doing (`uploading blob <digest>`).
        action: String,
        /// The client's error.
        message: String,
    },
    /// A blob fetched from the object store could not be read whole or did
    /// not hash to its digest; nothing of it was kept.
    #[error("fetching blob {digest} from object store {store}")]
    Fetch {
        /// The store.
        store: String,
        /// The blob.
        digest: B3Digest,
        /// Why (`InvalidData` for bytes that are not the blob's).
        #[source]
        source: io::Error,
    },
}

/// Where blobs live.
#[async_trait::async_trait]
pub trait BlobService: Send + Sync {
    /// Whether the blob is stored.
    async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError>;

    /// Opens the blob for reading; `None` if it is not stored.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError>;

    /// Stores the bytes of `reader`, streaming, and returns their digest.
    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<StoredBlob, BlobError>;

    /// The path of the stored blob on this host (read-only, mode 0444), so
    /// callers can hardlink it instead of copying; `None` for remote stores
    /// or when the blob is not stored. A store with a local cache fetches
    /// the blob into it first.
    async fn local_path(&self, _digest: &B3Digest) -> Result<Option<PathBuf>, BlobError> {
        Ok(None)
    }

    /// Like [`BlobService::local_path`], for an executable copy (mode 0555),
    /// created on first use.
    async fn local_executable_path(
        &self,
        _digest: &B3Digest,
    ) -> Result<Option<PathBuf>, BlobError> {
        Ok(None)
    }

    /// How many blobs are stored and their bytes, if this backend knows
    /// cheaply (the embedded store keeps counts; a remote one does not say).
    fn stats(&self) -> Option<BlobStats> {
        None
    }

    /// Stores the bytes of an opened host file, leaving it in place
    /// (`origin` names it in messages). The default hashes it locally first
    /// and skips the upload when the store already has it.
    async fn put_opened(&self, file: File, origin: &Path) -> Result<StoredBlob, BlobError> {
        let (file, hashed) = hash_opened(file, origin.to_owned()).await?;
        if self.has(&hashed.digest).await? {
            return Ok(hashed);
        }
        let mut file = tokio::fs::File::from_std(file);
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|source| BlobError::HashFile {
                path: origin.to_owned(),
                source,
            })?;
        let stored = self.put(&mut file).await?;
        if stored != hashed {
            return Err(BlobError::Changed {
                path: origin.to_owned(),
                first: hashed.digest,
                second: stored.digest,
            });
        }
        Ok(stored)
    }

    /// Stores the regular file `name` of a build's tree, opened beneath
    /// `parent` as `file`, and takes it out of the tree. Backends that can
    /// take the file over without copying its bytes do (the embedded store
    /// links the opened inode under its digest); the default copies like
    /// [`BlobService::put_opened`] and unlinks it.
    async fn put_taken(
        &self,
        parent: &Dir,
        name: &OsStr,
        file: File,
        origin: &Path,
    ) -> Result<StoredBlob, BlobError> {
        let stored = self.put_opened(file, origin).await?;
        parent.unlink(name).map_err(|source| BlobError::Take {
            path: origin.to_owned(),
            source,
        })?;
        Ok(stored)
    }

    /// A batch of host-file puts made durable together (see [`BlobBatch`]).
    /// The default stores each file durably on its own.
    fn batch(&self) -> Box<dyn BlobBatch + '_> {
        Box::new(batch::OneByOne(self))
    }
}

/// Files at least this large are hashed memory-mapped on the rayon pool.
const MMAP_THRESHOLD: u64 = 128 * 1024;

/// Hashes an opened file from its start without reading it into memory
/// whole, on a blocking thread; gives the file back.
pub async fn hash_opened(file: File, origin: PathBuf) -> Result<(File, StoredBlob), BlobError> {
    tokio::task::spawn_blocking(move || {
        let hashed = hash_opened_blocking(&file, &origin)?;
        Ok((file, hashed))
    })
    .await
    .map_err(BlobError::Task)?
}

/// [`hash_opened`] for callers already on a blocking thread.
pub fn hash_opened_blocking(file: &File, origin: &Path) -> Result<StoredBlob, BlobError> {
    let len = file
        .metadata()
        .map_err(|source| BlobError::HashFile {
            path: origin.to_owned(),
            source,
        })?
        .len();
    hash_opened_sized(file, len, origin)
}

/// [`hash_opened_blocking`] of a file whose length the caller has just
/// read: its first `len` bytes, read from offset 0 without moving the
/// file's offset (a small file in one read: the call that would find the
/// end is saved). A file that changes while being hashed is the caller's
/// to detect, as with [`hash_opened_blocking`].
pub(crate) fn hash_opened_sized(
    file: &File,
    len: u64,
    origin: &Path,
) -> Result<StoredBlob, BlobError> {
    let err = |source| BlobError::HashFile {
        path: origin.to_owned(),
        source,
    };
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        // SAFETY: the map is only read while this function runs. Files
        // hashed here are build outputs of a VM that is gone, or files the
        // caller owns; a file truncated by someone else meanwhile would
        // fault the reader, as with any mmap-based hasher (blake3's own).
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(err)?;
        hasher.update_rayon(&map);
    } else {
        use std::os::unix::fs::FileExt;
        // No larger than the file: zeroing a buffer is not free either.
        let size = usize::try_from(len).map_or(CHUNK_SIZE, |len| len.min(CHUNK_SIZE));
        let mut buf = vec![0u8; size];
        let mut offset = 0u64;
        while offset < len {
            let want = usize::try_from(len - offset).map_or(buf.len(), |left| left.min(buf.len()));
            let n = match file.read_at(&mut buf[..want], offset) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(err(e)),
            };
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
    }
    Ok(StoredBlob {
        digest: hasher.finalize().into(),
        size: hasher.count(),
    })
}

/// Hashes a host file without reading it into memory (memory-mapped and
/// hashed on the rayon pool when large), on a blocking thread.
pub async fn hash_file(path: PathBuf) -> Result<StoredBlob, BlobError> {
    tokio::task::spawn_blocking(move || hash_file_blocking(&path))
        .await
        .map_err(BlobError::Task)?
}

/// [`hash_file`] for callers already on a blocking thread.
pub fn hash_file_blocking(path: &Path) -> Result<StoredBlob, BlobError> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .map_err(|source| BlobError::HashFile {
            path: path.to_owned(),
            source,
        })?;
    Ok(StoredBlob {
        digest: hasher.finalize().into(),
        size: hasher.count(),
    })
}
