//! Picks a castore backend from an address.
//!
//! | address | store |
//! |---|---|
//! | `` (empty) or `embedded` | embedded store in the data dir |
//! | `embedded:/some/dir` | embedded store in `/some/dir` |
//! | `grpc+http://host:port` | a remote castore (e.g. another kiln) over gRPC |
//! | `grpc+unix:/path/to.sock` (or `grpc+unix:///path/to.sock`) | the same over a unix socket |
//!
//! The embedded store keeps blobs as files (see [`super::blob::embedded`])
//! and directories in `directories.redb`, both under the data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::blob::embedded::EmbeddedBlobService;
use super::blob::grpc::GrpcBlobService;
use super::blob::BlobError;
use super::directory_service::grpc::GrpcDirectoryService;
use super::directory_service::redb::RedbDirectoryService;
use super::directory_service::DirectoryError;
use super::Store;

/// Choosing or opening a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum FromAddrError {
    /// The address has no scheme kiln knows.
    #[error("castore address {0:?}: unknown scheme (want embedded, grpc+http://HOST:PORT or grpc+unix:PATH)")]
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
    Connect(String, #[source] tonic::transport::Error),
    /// Opening the embedded blob store failed.
    #[error("opening the embedded blob store")]
    OpenBlobs(#[source] BlobError),
    /// Opening the embedded directory database failed.
    #[error("opening the embedded directory store")]
    OpenDirectories(#[source] DirectoryError),
}

/// Opens the store `address` names; `data_dir` is where an embedded store
/// without its own path lives.
pub async fn from_addr(address: &str, data_dir: &Path) -> Result<Store, FromAddrError> {
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
    let channel = if let Some(rest) = address.strip_prefix("grpc+http://") {
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(malformed(address, "want grpc+http://HOST:PORT"));
        }
        connect_http(address, &format!("http://{host}")).await?
    } else if let Some(path) = address.strip_prefix("grpc+unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(malformed(
                address,
                "want an absolute socket path after grpc+unix:",
            ));
        }
        connect_unix(address, PathBuf::from(path)).await?
    } else {
        return Err(FromAddrError::UnknownScheme(address.to_owned()));
    };
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

async fn connect_http(address: &str, uri: &str) -> Result<Channel, FromAddrError> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|e| FromAddrError::Connect(address.to_owned(), e))?;
    endpoint
        .connect()
        .await
        .map_err(|e| FromAddrError::Connect(address.to_owned(), e))
}

async fn connect_unix(address: &str, path: PathBuf) -> Result<Channel, FromAddrError> {
    // The URI is required by tonic but unused: every connection goes to the socket.
    let endpoint = Endpoint::from_static("http://localhost");
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| FromAddrError::Connect(address.to_owned(), e))
}
