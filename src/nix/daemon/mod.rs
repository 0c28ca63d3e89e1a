//! The Nix worker protocol in front of kiln: what `nix-daemon` speaks, so
//! that a stock Nix (2.8 through current) uses kiln as a remote builder
//! (`ssh-ng://…`, running `kiln nix-daemon --stdio`) or as a remote store
//! (`unix://…`, served by `kiln serve --nix-daemon-socket`).
//!
//! Where things are:
//! - [`wire`]: the primitive encoding (words, padded strings, framed
//!   streams), bounded; [`protocol`]: the protocol's numbers;
//!   [`types`]: path infos, derived paths, inline derivations, build results.
//! - [`session`]: one connection, handshake then requests; [`add`]: the
//!   operations that add paths; [`build`]: the ones that build.
//! - [`logger`]: what the daemon writes while it works (log lines, errors).
//! - [`store`]: the [`Daemon`] every connection shares: castore, path-info
//!   store, the kiln server that builds, and how clients are trusted.
//!
//! Every path Nix sends is ingested into the castore as it streams and
//! recorded in the path-info store ([`crate::nix::path_info`]) only once
//! its NAR hash is checked; every build is a kiln build in a fresh VM.

mod add;
mod build;
#[cfg(test)]
mod captured_tests;
pub mod logger;
pub mod protocol;
mod session;
pub mod store;
pub mod types;
pub mod wire;

use std::path::Path;
use std::sync::Arc;

pub use build::BuildOptions;
pub use protocol::ProtocolVersion;
pub use session::serve_connection;
pub use store::{Daemon, DaemonConfig, StoreError};

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's bytes are out of step.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Writing to the client failed.
    #[error("writing to the client")]
    Write(#[source] std::io::Error),
    /// The client did not start with Nix's magic word.
    #[error("the client is not a Nix client (first word {0:#x})")]
    Magic(u64),
    /// The client's protocol is older than 1.34.
    #[error("the Nix client speaks worker protocol {0}, older than Nix 2.8's 1.34")]
    TooOld(ProtocolVersion),
    /// An operation number kiln does not know.
    #[error("unknown worker operation {0}")]
    UnknownOp(u64),
    /// The store failed while a reply was already under way.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every cause of `error`, joined by `: `.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Serves one client on this process's stdin and stdout (what an
/// `ssh-ng://` remote builder runs), until it hangs up.
pub async fn serve_stdio(daemon: &Daemon) -> Result<(), SessionError> {
    serve_connection(daemon, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves clients on a unix socket at `path` until `shutdown` resolves;
/// each connection on its own task. The socket is created with `mode`
/// (who may connect is who may use kiln's store and builds).
pub async fn serve_unix(
    daemon: Arc<Daemon>,
    path: &Path,
    mode: u32,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let listener = crate::server::bind_unix(path, mode)?;
    tracing::info!(socket = %path.display(), "serving the Nix worker protocol");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a Nix client");
                        continue;
                    }
                };
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    let (reader, writer) = stream.into_split();
                    if let Err(e) = serve_connection(&daemon, reader, writer).await {
                        tracing::warn!(error = %error_chain(&e), "nix client connection failed");
                    }
                });
            }
            () = &mut shutdown => return Ok(()),
        }
    }
}
