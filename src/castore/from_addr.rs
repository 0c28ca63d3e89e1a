//! Picks a castore backend from an address.
//!
//! | address | store |
//! |---|---|
//! | `` (empty) or `embedded` | embedded store in the data dir |
//! | `embedded:/some/dir` | embedded store in `/some/dir` |
//! | `grpc+http://host:port` | a remote castore (e.g. another kiln) over gRPC |
//! | `grpc+https://host:port` | the same over TLS |
//! | `grpc+unix:/path/to.sock` (or `grpc+unix:///path/to.sock`) | the same over a unix socket |
//!
//! Remote stores are reached through [`crate::client::connect`], with the
//! TLS and token settings given to [`from_addr_with`].
//!
//! The embedded store keeps blobs as files (see [`super::blob::embedded`])
//! and directories in `directories.redb`, both under the data dir.
//!
//! Blobs alone can live in an S3-compatible object store shared by several
//! hosts, behind a local cache ([`open_blob_store`]):
//! `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`.

use std::path::Path;
use std::sync::Arc;

use super::blob::cached::CachedBlobService;
use super::blob::embedded::EmbeddedBlobService;
use super::blob::grpc::GrpcBlobService;
use super::blob::object_store::{ObjectStoreAddrError, ObjectStoreBlobs};
use super::blob::{BlobError, BlobService};
use super::directory_service::grpc::GrpcDirectoryService;
use super::directory_service::redb::RedbDirectoryService;
use super::directory_service::DirectoryError;
use super::Store;
use crate::client::{ClientSecurity, ConnectError};

/// Choosing or opening a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum FromAddrError {
    /// The address has no scheme kiln knows.
    #[error("castore address {0:?}: unknown scheme (want embedded, grpc+http(s)://HOST:PORT or grpc+unix:PATH)")]
    UnknownScheme(String),
    /// The address has a known scheme but a malformed rest.
    #[error("castore address {address:?}: {problem}")]
    Malformed {
        /// The address.
        address: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Connecting to the remote failed.
    #[error("connecting to castore {0}")]
    Connect(String, #[source] ConnectError),
    /// Opening the embedded blob store failed.
    #[error("opening the embedded blob store")]
    OpenBlobs(#[source] BlobError),
    /// Opening the embedded directory database failed.
    #[error("opening the embedded directory store")]
    OpenDirectories(#[source] DirectoryError),
    /// The object-store address or its credentials are unusable.
    #[error(transparent)]
    ObjectStore(#[from] ObjectStoreAddrError),
    /// Opening the local cache of the object store failed.
    #[error("opening the blob cache {path}")]
    OpenCache {
        /// The cache directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: BlobError,
    },
    /// The object store did not answer the probe at start.
    #[error("blob store {address:?} is not usable")]
    Probe {
        /// The address.
        address: String,
        /// Why (names the store and what it answered).
        #[source]
        source: BlobError,
    },
}

/// Opens the blob store `address` names, for `--blob-store`: an
/// `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]` object store with
/// credentials from `credentials` (a `KEY_ID:SECRET` file) or from
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, behind a cache of at most
/// `cache_bytes` in `<data_dir>/blob-cache`. Asks the store once (a head
/// of a probe key), so that a wrong endpoint, bucket or key fails now.
/// Installs the process's rustls provider if none is.
pub async fn open_blob_store(
    address: &str,
    data_dir: &Path,
    cache_bytes: u64,
    credentials: Option<&Path>,
) -> Result<Arc<dyn BlobService>, FromAddrError> {
    if !address.starts_with("s3://") {
        return Err(FromAddrError::Malformed {
            address: address.to_owned(),
            problem: "a blob store address is s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]"
                .to_owned(),
        });
    }
    let remote = ObjectStoreBlobs::from_address(address, credentials)?;
    remote
        .probe()
        .await
        .map_err(|source| FromAddrError::Probe {
            address: address.to_owned(),
            source,
        })?;
    let path = data_dir.join("blob-cache");
    let dir = path.clone();
    let opened =
        tokio::task::spawn_blocking(move || CachedBlobService::open(remote, &dir, cache_bytes))
            .await
            .map_err(BlobError::Task)
            .and_then(|opened| opened);
    let cache = opened.map_err(|source| FromAddrError::OpenCache { path, source })?;
    Ok(Arc::new(cache))
}

/// Opens the store `address` names; `data_dir` is where an embedded store
/// without its own path lives. A remote store is reached without TLS or
/// credentials; see [`from_addr_with`].
pub async fn from_addr(address: &str, data_dir: &Path) -> Result<Store, FromAddrError> {
    from_addr_with(address, data_dir, &ClientSecurity::none()).await
}

/// [`from_addr`], reaching a remote store with `security` (TLS, client
/// certificate, bearer token).
pub async fn from_addr_with(
    address: &str,
    data_dir: &Path,
    security: &ClientSecurity,
) -> Result<Store, FromAddrError> {
    if address.is_empty() || address == "embedded" {
        return embedded(data_dir);
    }
    if let Some(dir) = address.strip_prefix("embedded:") {
        let dir = dir.strip_prefix("//").unwrap_or(dir);
        if !dir.starts_with('/') {
            return Err(malformed(address, "want an absolute path after embedded:"));
        }
        return embedded(Path::new(dir));
    }
    if let Some(rest) = address
        .strip_prefix("grpc+http://")
        .or_else(|| address.strip_prefix("grpc+https://"))
    {
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(malformed(address, "want grpc+http(s)://HOST:PORT"));
        }
    } else if let Some(path) = address.strip_prefix("grpc+unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(malformed(
                address,
                "want an absolute socket path after grpc+unix:",
            ));
        }
    } else {
        return Err(FromAddrError::UnknownScheme(address.to_owned()));
    }
    let channel = crate::client::connect(address, security)
        .await
        .map_err(|e| FromAddrError::Connect(address.to_owned(), e))?;
    Ok(Store {
        blobs: Arc::new(GrpcBlobService::new(channel.clone())),
        directories: Arc::new(GrpcDirectoryService::new(channel)),
    })
}

/// The embedded store under `data_dir` (created if needed).
pub fn embedded(data_dir: &Path) -> Result<Store, FromAddrError> {
    let blobs = EmbeddedBlobService::open(data_dir).map_err(FromAddrError::OpenBlobs)?;
    let directories = RedbDirectoryService::open(&data_dir.join("directories.redb"))
        .map_err(FromAddrError::OpenDirectories)?;
    // The database lock makes this process the store's only owner: whatever
    // is still in the temporary directory was left by one that crashed.
    blobs
        .remove_partial_blobs()
        .map_err(FromAddrError::OpenBlobs)?;
    Ok(Store {
        blobs: Arc::new(blobs),
        directories: Arc::new(directories),
    })
}

fn malformed(address: &str, problem: &str) -> FromAddrError {
    FromAddrError::Malformed {
        address: address.to_owned(),
        problem: problem.to_owned(),
    }
}

/// An embedded castore in a temporary directory, removed when dropped: for
/// tests across the crate that need a real store.
#[cfg(test)]
pub(crate) struct TempStore {
    /// The store.
    pub store: Store,
    _dir: tempfile::TempDir,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
pub(crate) fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path()).unwrap();
    TempStore { store, _dir: dir }
}
