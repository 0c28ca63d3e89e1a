//! One tonic server carrying every service on one listener (TCP or unix
//! socket): castore (tvix and snix names), build (tvix and snix layouts),
//! kiln's build events, gRPC health and reflection.
//!
//! Entry point: [`serve_with`], which runs until `shutdown` resolves, with
//! the [`Security`] settings (TLS, client authentication) applied to the
//! whole server; [`serve`] is the same without either; [`serve_services`]
//! also carries the path-info store (`snix.store.v1.PathInfoService`) of
//! the Nix front.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::auth::Security;
use crate::castore::Store;
use crate::executor::Executor;
use crate::grpc::BuildService;
use crate::nix::path_info::PathInfoService;
use crate::proto::{self, kiln_v1, snix_build, tvix_build};

mod cut;
pub mod health;
mod hpack;
mod unix_authority;

use cut::Cut;
use unix_authority::AuthorityFix;

/// Largest message any service of this server accepts (a build with many
/// inputs is large): the one limit, defined with the castore services.
pub use crate::castore::grpc_server::MAX_MESSAGE_SIZE;
/// [`MAX_MESSAGE_SIZE`] under its former name here, kept while `cli/drv.rs`,
/// `cli/build.rs` and `tests/security_limits.rs` still use it.
pub use crate::castore::grpc_server::MAX_MESSAGE_SIZE as MAX_MESSAGE_BYTES;

/// Where to listen: `HOST:PORT`, or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix socket path (anything containing `/`, or `unix:` prefixed).
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if s.contains('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor a unix socket path: {e}"))
    }
}

/// Permissions of a unix socket kiln creates (`--unix-socket-mode`,
/// `--nix-daemon-socket-mode`): written in octal (`0600`, `660`, `0o660`),
/// at most `0777`. A type of its own so that a config file writes it as the
/// string `"0600"` (a TOML integer has no leading-zero octal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 => Ok(Self(mode)),
            _ => Err(format!(
                "{s:?} is not an octal permission mode (0000 to 0777)"
            )),
        }
    }
}

impl std::fmt::Display for SocketMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listener failed.
    #[error("binding {0}")]
    Bind(String, #[source] std::io::Error),
    /// The TLS configuration was refused.
    #[error("configuring TLS")]
    Tls(#[source] tonic::transport::Error),
    /// Building the reflection service failed.
    #[error("building gRPC reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving")]
    Transport(#[source] tonic::transport::Error),
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Bound {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener, PathBuf),
}

/// Permissions of kiln's unix socket unless told otherwise: only kiln's
/// own user may connect.
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o600;

impl Listen {
    /// Binds the listener (a stale unix socket file is replaced); a unix
    /// socket gets [`DEFAULT_UNIX_SOCKET_MODE`].
    pub async fn bind(&self) -> Result<Bound, ServeError> {
        self.bind_with_mode(DEFAULT_UNIX_SOCKET_MODE).await
    }

    /// Binds the listener; a unix socket gets permissions `mode` whatever
    /// the umask (connecting needs write permission on the socket file).
    pub async fn bind_with_mode(&self, mode: u32) -> Result<Bound, ServeError> {
        match self {
            Listen::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(Bound::Tcp)
                .map_err(|e| ServeError::Bind(addr.to_string(), e)),
            Listen::Unix(path) => bind_unix(path, mode)
                .map(|l| Bound::Unix(l, path.clone()))
                .map_err(|e| ServeError::Bind(path.display().to_string(), e)),
        }
    }
}

/// Binds a unix socket at `path` that is never reachable with other
/// permissions than `mode`: it is bound inside a fresh 0700 directory next
/// to `path`, chmodded there, and only then renamed into place.
pub(crate) fn bind_unix(path: &std::path::Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".kiln-socket-")
        .tempdir_in(parent)?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// Serves every kiln service on `listener` until `shutdown` resolves,
/// without TLS and without client authentication.
pub async fn serve(
    listener: Bound,
    store: Store,
    executor: Arc<Executor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, store, executor, Security::none(), shutdown).await
}

/// Serves every kiln service on `listener` until `shutdown` resolves, with
/// `security`: TLS if configured, and, if client authentication is
/// configured, one [`crate::auth::AuthLayer`] in front of every service
/// (only `grpc.health.v1.Health` stays open). Open calls may finish.
pub async fn serve_with(
    listener: Bound,
    store: Store,
    executor: Arc<Executor>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let never_cut = CancellationToken::new();
    serve_until(listener, store, executor, security, shutdown, never_cut).await
}

/// Like [`serve_with`]; cancelling `cut` then closes every connection, so
/// the calls still open end (and the builds they run are cancelled).
pub async fn serve_until(
    listener: Bound,
    store: Store,
    executor: Arc<Executor>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cut: CancellationToken,
) -> Result<(), ServeError> {
    let services = Services {
        store,
        executor,
        path_info: None,
        health: None,
    };
    serve_services(listener, services, security, shutdown, cut).await
}

/// What one server carries.
#[derive(Clone)]
pub struct Services {
    /// The castore.
    pub store: Store,
    /// The builds.
    pub executor: Arc<Executor>,
    /// The path-info store, served as `snix.store.v1.PathInfoService` when
    /// given.
    pub path_info: Option<Arc<dyn PathInfoService>>,
    /// What the host says about itself: the build services are
    /// NOT_SERVING in `grpc.health.v1` while it is full or draining.
    pub health: Option<health::HostHealth>,
}

/// Like [`serve_until`], with every service in `services`.
pub async fn serve_services(
    listener: Bound,
    services: Services,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cut: CancellationToken,
) -> Result<(), ServeError> {
    let Services {
        store,
        executor,
        path_info,
        health: host_health,
    } = services;
    // The castore and the path infos are scoped like the builds: a caller
    // sees what its tenant's builds may use.
    let scoping = executor.scoping().clone();
    let path_info = path_info.map(|service| {
        crate::nix::path_info::grpc_server::path_info_server(
            service,
            store.clone(),
            scoping.clone(),
        )
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let admin = crate::grpc::admin::AdminService::new(executor.clone());
    let builds = BuildService::new(executor);
    let castore = crate::castore::grpc_services_scoped(store, scoping);
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for service in BUILD_SERVICES {
        health_reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let host_id = host_health
        .as_ref()
        .and_then(|h| h.host_id().map(str::to_owned));
    if let Some(host_health) = host_health {
        tokio::spawn(report_build_health(host_health, health_reporter.clone()));
    }

    let mut server = Server::builder();
    let plaintext = security.tls().is_none();
    if let Some(tls) = security.tls() {
        server = server.tls_config(tls.clone()).map_err(ServeError::Tls)?;
    }
    tracing::info!(security = %security.describe(), "access control");
    let host_header = host_id
        .as_deref()
        .and_then(|id| hyper::header::HeaderValue::from_str(id).ok());
    let router = server
        .layer(security.layer())
        .layer(tower::util::MapResponseLayer::new(
            move |mut response: hyper::Response<_>| {
                if let Some(v) = &host_header {
                    response
                        .headers_mut()
                        .insert(health::HOST_HEADER, v.clone());
                }
                response
            },
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(castore.tvix_blobs)
        .add_service(castore.tvix_directories)
        .add_service(castore.snix_blobs)
        .add_service(castore.snix_directories)
        .add_service(
            tvix_build::build_service_server::BuildServiceServer::new(builds.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            snix_build::build_service_server::BuildServiceServer::new(builds.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            kiln_v1::build_events_server::BuildEventsServer::new(builds)
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(kiln_v1::admin_server::AdminServer::new(admin))
        .add_optional_service(path_info);
    // Load balancers and probes see a stopping server as not serving while
    // its open calls finish.
    let shutdown = async move {
        shutdown.await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };

    match listener {
        Bound::Tcp(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving");
            }
            // Without TCP_NODELAY a small frame (a phase event, a log line)
            // that follows another unacknowledged one waits for the peer's
            // delayed ACK: up to 40 ms on Linux, on every streamed event.
            let incoming = TcpListenerStream::new(listener).map(move |conn| {
                conn.map(|c| {
                    if let Err(e) = c.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
                    }
                    Cut::new(c, cut.clone())
                })
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(ServeError::Transport)
        }
        Bound::Unix(listener, path) => {
            tracing::info!(socket = %path.display(), "serving");
            // Inside TLS the header frames cannot be seen: C-core clients
            // then set an authority valid for the certificate anyway.
            let incoming = UnixListenerStream::new(listener).map(move |conn| {
                conn.map(|c| Cut::new(AuthorityFix::new(c, plaintext), cut.clone()))
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(ServeError::Transport)
        }
    }
}

/// The services that start builds, by their `grpc.health.v1` names.
pub const BUILD_SERVICES: [&str; 3] = [
    "tvix.build.v1.BuildService",
    "snix.build.v1.BuildService",
    "kiln.v1.BuildEvents",
];

/// Keeps the build services' health at the host's state: NOT_SERVING while
/// it is full or draining.
async fn report_build_health(
    host: health::HostHealth,
    reporter: tonic_health::server::HealthReporter,
) {
    let mut state = host.subscribe();
    loop {
        let status = if state.borrow_and_update().takes_builds() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in BUILD_SERVICES {
            reporter.set_service_status(service, status).await;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "127.0.0.1:8000".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:8000".parse().expect("addr")))
        );
        assert_eq!(
            "/run/kiln.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/kiln.sock".into()))
        );
        assert_eq!(
            "unix:kiln.sock".parse::<Listen>(),
            Ok(Listen::Unix("kiln.sock".into()))
        );
        assert!("localhost".parse::<Listen>().is_err());
    }

    #[test]
    fn parses_socket_modes_in_octal() {
        assert_eq!("0600".parse::<SocketMode>(), Ok(SocketMode(0o600)));
        assert_eq!("660".parse::<SocketMode>(), Ok(SocketMode(0o660)));
        assert_eq!("0o660".parse::<SocketMode>(), Ok(SocketMode(0o660)));
        assert!("0999".parse::<SocketMode>().is_err());
        assert!("01000".parse::<SocketMode>().is_err());
        assert_eq!(SocketMode(0o600).to_string(), "0600");
    }
}
