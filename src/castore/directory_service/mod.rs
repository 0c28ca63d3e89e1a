//! Directory storage: the [`DirectoryService`] trait and its backends.
//!
//! - [`redb`]: an embedded `redb` database under the data dir, the default.
//! - [`postgres`]: PostgreSQL shared by several kiln hosts
//!   (`kiln serve --database`).
//! - [`grpc`]: another kiln (or any tvix/snix castore) over gRPC.
//!
//! The store is closed under references: a directory is only accepted when
//! every child directory it names is already stored (or comes earlier in the
//! same batch), so a stored root always has its whole tree. The gRPC
//! `Put` writes long streams in several batches
//! ([`super::grpc_server::PUT_BATCH_BYTES`]), each closed in this sense.

use std::path::PathBuf;

use futures::stream::BoxStream;
use prost::Message;

use super::digest::B3Digest;
use super::directory::Directory;
use super::errors::ValidationError;
use crate::db::DbError;
use crate::proto::tvix_castore;

pub mod grpc;
pub mod postgres;
pub mod redb;

/// A failed directory operation.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Opening or creating the database failed.
    #[error("opening directory database {path}")]
    OpenDatabase {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<::redb::Error>,
    },
    /// Reading from the database failed.
    #[error("reading the directory database")]
    ReadDatabase(#[source] Box<::redb::Error>),
    /// Writing to the database failed.
    #[error("writing the directory database")]
    WriteDatabase(#[source] Box<::redb::Error>),
    /// A stored directory no longer decodes.
    #[error("stored directory {digest} does not decode")]
    CorruptEncoding {
        /// Its key.
        digest: B3Digest,
        /// Why.
        #[source]
        source: prost::DecodeError,
    },
    /// A stored directory decodes but breaks a castore rule.
    #[error("stored directory {digest} is invalid")]
    CorruptDirectory {
        /// Its key.
        digest: B3Digest,
        /// Why.
        #[source]
        source: ValidationError,
    },
    /// A stored directory is not the one its key names (the shared
    /// database holds something kiln did not write under that key).
    #[error("stored directory {digest} hashes to {actual}")]
    WrongDigest {
        /// Its key.
        digest: B3Digest,
        /// What its bytes hash to.
        actual: B3Digest,
    },
    /// The directory is not stored.
    #[error("directory {0} not found")]
    NotFound(B3Digest),
    /// A directory to put names a child directory that is not stored.
    #[error("directory {parent} refers to unknown directory {child}")]
    UnknownChild {
        /// The directory being put.
        parent: B3Digest,
        /// The missing child.
        child: B3Digest,
    },
    /// A put with no directories.
    #[error("no directories to put")]
    EmptyBatch,
    /// The shared PostgreSQL database failed.
    #[error("the directory table")]
    Postgres(#[source] DbError),
    /// A background database task died.
    #[error("directory database task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A remote Get call failed.
    #[error("remote directory get")]
    RemoteGet(#[source] Box<tonic::Status>),
    /// A remote Put call failed.
    #[error("remote directory put")]
    RemotePut(#[source] Box<tonic::Status>),
    /// The remote sent a directory breaking a castore rule.
    #[error("remote sent an invalid directory")]
    RemoteInvalid(#[source] ValidationError),
    /// The grants table of tenants' views could not be read or written.
    #[error("the castore's grants table")]
    Grants(#[source] Box<crate::castore::scoped::GrantsError>),
    /// The remote sent a directory that was not asked for.
    #[error("remote sent directory {0}, which was not asked for")]
    RemoteUnexpected(B3Digest),
}

impl DirectoryError {
    /// The database failure behind this error, if one is (the directory
    /// table or the grants table), for callers telling an unreachable
    /// database (UNAVAILABLE) from a refused statement.
    pub fn database(&self) -> Option<&DbError> {
        match self {
            Self::Postgres(e) => Some(e),
            Self::Grants(e) => e.database(),
            _ => None,
        }
    }
}

/// A stored directory from its canonical encoding, checked again (it must
/// decode, keep castore's rules and hash to its key): both
/// embedded and shared backends store exactly what [`Directory::encode`]
/// wrote, but what comes back from storage is still only bytes.
pub(crate) fn decode_stored(
    digest: &B3Digest,
    encoded: &[u8],
) -> Result<Directory, DirectoryError> {
    let wire = tvix_castore::Directory::decode(encoded).map_err(|source| {
        DirectoryError::CorruptEncoding {
            digest: *digest,
            source,
        }
    })?;
    let directory =
        Directory::try_from(wire).map_err(|source| DirectoryError::CorruptDirectory {
            digest: *digest,
            source,
        })?;
    // Storage is trusted for nothing: the bytes must be what the key names.
    let actual = directory.digest();
    if actual != *digest {
        return Err(DirectoryError::WrongDigest {
            digest: *digest,
            actual,
        });
    }
    Ok(directory)
}

/// Where directories live.
#[async_trait::async_trait]
pub trait DirectoryService: Send + Sync {
    /// One directory; `None` if it is not stored.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError>;

    /// The directory and everything below it: root first, then breadth-first,
    /// each distinct directory once. A missing root or child ends the stream
    /// with [`DirectoryError::NotFound`].
    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>>;

    /// Stores directories given leaves first (each one's children already
    /// stored or earlier in the batch), all or nothing; answers the digest
    /// of the last one, the root.
    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError>;

    /// Stores one directory whose children are already stored.
    async fn put(&self, directory: Directory) -> Result<B3Digest, DirectoryError> {
        self.put_many(vec![directory]).await
    }

    /// How many directories are stored, if this backend knows cheaply
    /// (the embedded database does; a remote one does not say).
    async fn count(&self) -> Result<Option<u64>, DirectoryError> {
        Ok(None)
    }
}
