//! The client side of kiln: connecting to a kiln server — its build
//! services or its castore — with the client's TLS and bearer-token
//! settings (here), and following a build's events to its end
//! ([`follow`]). The CLI, the remote castore backend, the bench and the
//! tests all connect and follow through here.
//!
//! Addresses: `http://HOST:PORT`, `https://HOST:PORT`, the same with a
//! `grpc+` prefix, a bare `HOST:PORT`, or a unix socket as `unix:/PATH` or
//! `grpc+unix:/PATH` (`//` after the colon is allowed). TLS is used for
//! `https` and, when a CA is given, for bare addresses and unix sockets; the
//! server's certificate must then name the host (`localhost` for a socket).

use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tower::Service;

use crate::tls::{self, TlsError};

pub mod follow;

pub use follow::{
    bypass_result_cache, bypassing_result_cache, submit_and_follow, Completion, EventSink, Follow,
    FollowError,
};

/// Connecting failed, or the client's settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not one kiln understands.
    #[error("address {0:?}: expected http(s)://HOST:PORT, grpc+http(s)://HOST:PORT, HOST:PORT, unix:/PATH or grpc+unix:/PATH")]
    BadAddress(String),
    /// The address says plaintext but TLS settings were given.
    #[error("address {0:?} is plaintext http:// but --tls-ca was given; use https://")]
    PlaintextWithTls(String),
    /// The address says TLS but no CA to verify the server was given.
    #[error("address {0:?} uses TLS: give the server's CA with --tls-ca")]
    TlsWithoutCa(String),
    /// A client certificate was given without its key, or the other way round.
    #[error("--tls-cert and --tls-key must be given together")]
    IncompleteIdentity,
    /// A client certificate was given without a CA (TLS is off).
    #[error("--tls-cert needs --tls-ca (client certificates only travel over TLS)")]
    IdentityWithoutCa,
    /// Reading TLS material failed.
    #[error("loading TLS material")]
    Tls(#[source] TlsError),
    /// The token file could not be read.
    #[error("reading the token file {0}")]
    ReadToken(PathBuf, #[source] std::io::Error),
    /// The token file holds no usable token.
    #[error("token file {0}: want one token (printable ASCII without spaces) on its first non-comment line")]
    BadToken(PathBuf),
    /// Setting up or connecting the transport failed.
    #[error("connecting to {0}")]
    Connect(String, #[source] tonic::transport::Error),
}

/// Where the client's security settings come from (all optional).
#[derive(Debug, Clone, Default)]
pub struct ClientSecurityOptions {
    /// PEM CA the server's certificate must chain to; enables TLS.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// File whose first non-empty, non-`#` line is the bearer token.
    pub token_file: Option<PathBuf>,
}

/// The client's loaded security settings.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    tls: Option<ClientTlsConfig>,
    authorization: Option<http::HeaderValue>,
}

impl std::fmt::Debug for ClientSecurity {
    /// Says what is configured, never the key or the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("tls", &self.tls.is_some())
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

impl ClientSecurity {
    /// Plaintext, no credentials.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads every file `options` names.
    pub fn load(options: &ClientSecurityOptions) -> Result<Self, ConnectError> {
        let identity = match (&options.tls_cert, &options.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err(ConnectError::IncompleteIdentity),
        };
        let tls = match (&options.tls_ca, identity) {
            (Some(ca), identity) => {
                Some(tls::client_config(ca, identity).map_err(ConnectError::Tls)?)
            }
            (None, Some(_)) => return Err(ConnectError::IdentityWithoutCa),
            (None, None) => None,
        };
        let authorization = options.token_file.as_deref().map(read_token).transpose()?;
        Ok(Self { tls, authorization })
    }
}

fn read_token(path: &Path) -> Result<http::HeaderValue, ConnectError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConnectError::ReadToken(path.to_owned(), e))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(bearer)
        .ok_or_else(|| ConnectError::BadToken(path.to_owned()))
}

fn bearer(token: &str) -> Option<http::HeaderValue> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut value = http::HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A connection to a kiln server that sends the client's bearer token (if
/// any) with every call. Use it like a tonic [`Channel`].
#[derive(Debug, Clone)]
pub struct KilnChannel {
    inner: Channel,
    authorization: Option<http::HeaderValue>,
}

impl From<Channel> for KilnChannel {
    /// A channel without credentials.
    fn from(inner: Channel) -> Self {
        Self {
            inner,
            authorization: None,
        }
    }
}

impl KilnChannel {
    /// The underlying channel (calls through it carry no token).
    pub fn into_inner(self) -> Channel {
        self.inner
    }
}

impl Service<http::Request<Body>> for KilnChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        self.inner.call(request)
    }
}

/// Where an address points.
enum Target {
    Tcp { url: String, tls: bool },
    Unix(PathBuf),
}

fn parse(addr: &str, security: &ClientSecurity) -> Result<Target, ConnectError> {
    let bad = || ConnectError::BadAddress(addr.to_owned());
    if let Some(path) = addr
        .strip_prefix("grpc+unix:")
        .or_else(|| addr.strip_prefix("unix:"))
    {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(bad());
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let rest = addr.strip_prefix("grpc+").unwrap_or(addr);
    let (tls, host) = if let Some(host) = rest.strip_prefix("https://") {
        (true, host)
    } else if let Some(host) = rest.strip_prefix("http://") {
        if security.tls.is_some() {
            return Err(ConnectError::PlaintextWithTls(addr.to_owned()));
        }
        (false, host)
    } else if rest.contains("://") || rest.len() != addr.len() {
        return Err(bad());
    } else {
        (security.tls.is_some(), rest)
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    let scheme = if tls { "https" } else { "http" };
    Ok(Target::Tcp {
        url: format!("{scheme}://{host}"),
        tls,
    })
}

/// Connects to the kiln server at `addr` (forms in the module docs).
pub async fn connect(addr: &str, security: &ClientSecurity) -> Result<KilnChannel, ConnectError> {
    let failed = |e| ConnectError::Connect(addr.to_owned(), e);
    let channel = match parse(addr, security)? {
        Target::Tcp { url, tls } => {
            let endpoint = Endpoint::from_shared(url)
                .map_err(|_| ConnectError::BadAddress(addr.to_owned()))?;
            with_tls(endpoint, tls, addr, security)?
                .connect()
                .await
                .map_err(failed)?
        }
        Target::Unix(path) => {
            // The URI only carries the scheme and the TLS server name:
            // every connection goes to the socket.
            let tls = security.tls.is_some();
            let placeholder = if tls {
                "https://localhost"
            } else {
                "http://localhost"
            };
            let endpoint = with_tls(Endpoint::from_static(placeholder), tls, addr, security)?;
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(failed)?
        }
    };
    Ok(KilnChannel {
        inner: channel,
        authorization: security.authorization.clone(),
    })
}

fn with_tls(
    endpoint: Endpoint,
    tls: bool,
    addr: &str,
    security: &ClientSecurity,
) -> Result<Endpoint, ConnectError> {
    if !tls {
        return Ok(endpoint);
    }
    let config = security
        .tls
        .clone()
        .ok_or_else(|| ConnectError::TlsWithoutCa(addr.to_owned()))?;
    endpoint
        .tls_config(config)
        .map_err(|e| ConnectError::Connect(addr.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(addr: &str, security: &ClientSecurity) -> Result<(String, bool), String> {
        match parse(addr, security) {
            Ok(Target::Tcp { url, tls }) => Ok((url, tls)),
            Ok(Target::Unix(path)) => Ok((format!("unix {}", path.display()), false)),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn address_forms() {
        let plain = ClientSecurity::none();
        let tls = ClientSecurity {
            tls: Some(ClientTlsConfig::new()),
            authorization: None,
        };
        let http = |s: &str| Ok((format!("http://{s}"), false));
        let https = |s: &str| Ok((format!("https://{s}"), true));
        assert_eq!(url("http://h:1", &plain), http("h:1"));
        assert_eq!(url("grpc+http://h:1/", &plain), http("h:1"));
        assert_eq!(url("h:1", &plain), http("h:1"));
        assert_eq!(url("h:1", &tls), https("h:1"));
        assert_eq!(url("grpc+https://h:1", &tls), https("h:1"));
        assert_eq!(url("https://h:1", &plain), https("h:1"));
        assert_eq!(
            url("unix:/run/k.sock", &plain),
            Ok(("unix /run/k.sock".into(), false))
        );
        assert_eq!(
            url("grpc+unix:///run/k.sock", &plain),
            Ok(("unix /run/k.sock".into(), false))
        );
        assert!(url("http://h:1", &tls)
            .expect_err("conflict")
            .contains("use https://"));
        for bad in [
            "ftp://h:1",
            "grpc+h:1",
            "http://",
            "http://h:1/path",
            "unix:",
        ] {
            assert!(url(bad, &plain).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_file_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "# mine\n\n  s3cret \nother\n").expect("write");
        let value = read_token(&path).expect("token");
        assert_eq!(value.as_bytes(), b"Bearer s3cret");
        assert!(value.is_sensitive());
        std::fs::write(&path, "two words\n").expect("write");
        assert!(matches!(read_token(&path), Err(ConnectError::BadToken(_))));
        std::fs::write(&path, "# only a comment\n").expect("write");
        assert!(matches!(read_token(&path), Err(ConnectError::BadToken(_))));
    }

    #[test]
    fn debug_shows_no_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "very-secret-token\n").expect("write");
        let key = dir.path().join("key.pem");
        let pem =
            |label: &str| format!("-----BEGIN {label}-----\nc2VjcmV0a2V5\n-----END {label}-----\n");
        std::fs::write(&key, pem("PRIVATE KEY")).expect("write");
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, pem("CERTIFICATE")).expect("write");
        let security = ClientSecurity::load(&ClientSecurityOptions {
            tls_ca: Some(cert.clone()),
            tls_cert: Some(cert),
            tls_key: Some(key),
            token_file: Some(token),
        })
        .expect("loads");
        let shown = format!("{security:?}");
        // Exactly this: neither the key's bytes nor the token appear.
        assert_eq!(shown, "ClientSecurity { tls: true, token: true }");
    }

    #[test]
    fn options_must_fit_together() {
        let half = ClientSecurityOptions {
            tls_key: Some("/k".into()),
            ..Default::default()
        };
        assert!(matches!(
            ClientSecurity::load(&half),
            Err(ConnectError::IncompleteIdentity)
        ));
        let no_ca = ClientSecurityOptions {
            tls_cert: Some("/c".into()),
            tls_key: Some("/k".into()),
            ..Default::default()
        };
        assert!(matches!(
            ClientSecurity::load(&no_ca),
            Err(ConnectError::IdentityWithoutCa)
        ));
    }
}
