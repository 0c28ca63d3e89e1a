//! The client-side `kiln` subcommands: `build`, `castore import|export`,
//! `doctor`. `main.rs` only parses arguments and calls into here.

pub mod build;
pub mod castore;
pub mod doctor;

use tonic::transport::{Channel, Endpoint, Uri};

/// Errors reaching a kiln server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not one kiln understands.
    #[error("address {0:?}: expected http://HOST:PORT, grpc+http://HOST:PORT, unix:/PATH or grpc+unix:/PATH")]
    BadAddress(String),
    /// Connecting failed.
    #[error("connecting to {0}")]
    Connect(String, #[source] tonic::transport::Error),
}

/// Connects to a kiln server by URL: `http://HOST:PORT`, `grpc+http://HOST:PORT`,
/// `HOST:PORT`, `unix:/PATH` or `grpc+unix:/PATH`.
pub async fn connect(addr: &str) -> Result<Channel, ClientError> {
    let bad = || ClientError::BadAddress(addr.to_owned());
    if let Some(path) = addr
        .strip_prefix("grpc+unix:")
        .or_else(|| addr.strip_prefix("unix:"))
    {
        let path = path.trim_start_matches("//").to_owned();
        if path.is_empty() {
            return Err(bad());
        }
        // The URI is a placeholder: every connection goes to the socket.
        let endpoint = Endpoint::try_from("http://[::1]:50051").map_err(|_| bad())?;
        return endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| ClientError::Connect(addr.to_owned(), e));
    }
    let url = match addr.strip_prefix("grpc+") {
        Some(rest) => rest.to_owned(),
        None if addr.contains("://") => addr.to_owned(),
        None => format!("http://{addr}"),
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(bad());
    }
    Endpoint::try_from(url)
        .map_err(|_| bad())?
        .connect()
        .await
        .map_err(|e| ClientError::Connect(addr.to_owned(), e))
}
