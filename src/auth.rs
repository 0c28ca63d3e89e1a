//! Who may call kiln: the server's security settings (TLS and client
//! authentication) and the tower layer that enforces them.
//!
//! A caller is authenticated by either
//! - a TLS client certificate that chains to the configured client CA
//!   (`--tls-client-ca`; rustls verifies it during the handshake), or
//! - an `authorization: Bearer <token>` header whose token is one of the
//!   lines of the token file (`--auth-tokens`) or of the operator token file
//!   (`--operator-tokens`), compared in constant time. Both files are read
//!   at start-up and again on [`Security::reload`] (SIGHUP).
//!
//! With any of these configured, [`AuthLayer`] sits on the server builder in
//! front of every service, so none can be forgotten: any call without an
//! accepted credential gets `UNAUTHENTICATED`, and a call to the operator
//! service `kiln.v1.Admin` without an operator token gets
//! `PERMISSION_DENIED`. The one exception is `grpc.health.v1.Health`, which
//! load balancers and probes must reach without credentials; it reveals
//! only whether kiln is serving. Without authentication every caller is
//! served, the operator service included.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::{self, Either, Ready};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tonic::transport::ServerTlsConfig;
use tonic::Status;
use tower::{Layer, Service};

use crate::tls::{self, TlsError};

/// Paths under this prefix are served without credentials.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";
/// Paths under this prefix need an operator credential.
const OPERATOR_PREFIX: &str = "/kiln.v1.Admin/";

/// Loading the security settings failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A certificate was given without its key, or a key without its certificate.
    #[error("--tls-cert and --tls-key must be given together")]
    IncompleteIdentity,
    /// Client certificates were asked for without TLS.
    #[error("--tls-client-ca needs TLS (--tls-cert and --tls-key)")]
    ClientCaWithoutTls,
    /// Reading TLS material failed.
    #[error("loading TLS material")]
    Tls(#[source] TlsError),
    /// The token file could not be read.
    #[error("reading the token file {0}")]
    ReadTokens(PathBuf, #[source] std::io::Error),
    /// A line of the token file is not a usable token.
    #[error("token file {path}, line {line}: {problem}")]
    BadToken {
        /// The token file.
        path: PathBuf,
        /// 1-based line number (the token itself is not repeated).
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The token file holds no token.
    #[error("token file {0} holds no token (one token per line; blank lines and # comments are skipped)")]
    NoTokens(PathBuf),
}

/// Where the server's security settings come from (all optional).
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    /// PEM certificate chain the server presents; enables TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to; enables mTLS.
    pub tls_client_ca: Option<PathBuf>,
    /// File of accepted bearer tokens, one per line.
    pub auth_tokens: Option<PathBuf>,
    /// File of operator bearer tokens (the admin service, and everything
    /// else), one per line.
    pub operator_tokens: Option<PathBuf>,
}

/// The server's loaded security settings: TLS, and who may call.
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<ServerTlsConfig>,
    policy: Option<Arc<Policy>>,
}

/// What a caller must present.
#[derive(Debug)]
struct Policy {
    client_certs: bool,
    /// The token files, re-read by [`Security::reload`].
    files: TokenFiles,
    tokens: RwLock<Accepted>,
}

/// Where the accepted tokens come from.
#[derive(Debug, Clone, Default)]
struct TokenFiles {
    clients: Option<PathBuf>,
    operators: Option<PathBuf>,
}

/// The tokens accepted now.
#[derive(Debug, Default)]
struct Accepted {
    clients: Option<Tokens>,
    operators: Option<Tokens>,
}

impl TokenFiles {
    fn load(&self) -> Result<Accepted, AuthError> {
        let read = |path: &Option<PathBuf>| path.as_deref().map(Tokens::from_file).transpose();
        Ok(Accepted {
            clients: read(&self.clients)?,
            operators: read(&self.operators)?,
        })
    }
}

/// Who a caller proved to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Client,
    Operator,
}

impl Security {
    /// No TLS and no authentication: every caller is served.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads every file `options` names (once; later changes to the files
    /// need a restart).
    pub fn load(options: &SecurityOptions) -> Result<Self, AuthError> {
        let tls = match (&options.tls_cert, &options.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls::server_config(cert, key, options.tls_client_ca.as_deref())
                    .map_err(AuthError::Tls)?,
            ),
            (None, None) if options.tls_client_ca.is_some() => {
                return Err(AuthError::ClientCaWithoutTls)
            }
            (None, None) => None,
            _ => return Err(AuthError::IncompleteIdentity),
        };
        let files = TokenFiles {
            clients: options.auth_tokens.clone(),
            operators: options.operator_tokens.clone(),
        };
        let tokens = files.load()?;
        let client_certs = options.tls_client_ca.is_some();
        let any = client_certs || tokens.clients.is_some() || tokens.operators.is_some();
        let policy = any.then(|| {
            Arc::new(Policy {
                client_certs,
                files,
                tokens: RwLock::new(tokens),
            })
        });
        Ok(Self { tls, policy })
    }

    /// Re-reads the token files (SIGHUP). On an error nothing changes: the
    /// tokens accepted so far stay accepted. Answers one line per file
    /// saying what changed, never a token.
    pub fn reload(&self) -> Result<Vec<String>, AuthError> {
        let Some(policy) = &self.policy else {
            return Ok(Vec::new());
        };
        let new = policy.files.load()?;
        let mut tokens = policy.tokens.write().unwrap_or_else(|p| p.into_inner());
        let changes = [
            (
                "tokens",
                &policy.files.clients,
                &tokens.clients,
                &new.clients,
            ),
            (
                "operator tokens",
                &policy.files.operators,
                &tokens.operators,
                &new.operators,
            ),
        ]
        .into_iter()
        .filter_map(|(what, path, old, new)| {
            let (path, old, new) = (path.as_ref()?, old.as_ref()?, new.as_ref()?);
            Some(format!(
                "{what} {}: {} accepted ({} added, {} removed)",
                path.display(),
                new.len(),
                new.not_in(old),
                old.not_in(new),
            ))
        })
        .collect();
        *tokens = new;
        Ok(changes)
    }

    /// The TLS configuration, if the server speaks TLS.
    pub fn tls(&self) -> Option<&ServerTlsConfig> {
        self.tls.as_ref()
    }

    /// Whether callers must authenticate.
    pub fn requires_authentication(&self) -> bool {
        self.policy.is_some()
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        let transport = if self.tls.is_some() {
            "TLS"
        } else {
            "plaintext"
        };
        let auth = match self.policy.as_deref() {
            None => "no client authentication".to_owned(),
            Some(policy) => {
                let mut ways = Vec::new();
                if policy.client_certs {
                    ways.push("client certificates".to_owned());
                }
                let tokens = policy.tokens.read().unwrap_or_else(|p| p.into_inner());
                if let Some(tokens) = &tokens.clients {
                    ways.push(format!("{} bearer token(s)", tokens.len()));
                }
                if let Some(tokens) = &tokens.operators {
                    ways.push(format!("{} operator token(s)", tokens.len()));
                }
                format!("callers authenticate with {}", ways.join(" or "))
            }
        };
        format!("{transport}, {auth}")
    }

    /// The layer that enforces these settings (passes every call through
    /// when no authentication is configured).
    pub fn layer(&self) -> AuthLayer {
        AuthLayer {
            policy: self.policy.clone(),
        }
    }
}

/// Accepted bearer tokens, kept as SHA-256 digests so that comparing takes
/// the same time whatever the length or content of the presented token.
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.digests.len())
    }
}

impl Tokens {
    /// Reads a token file: one token per line, surrounding whitespace
    /// ignored, blank lines and lines starting with `#` skipped. A token is
    /// printable ASCII without spaces (it travels in an HTTP header).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AuthError::ReadTokens(path.to_owned(), e))?;
        warn_if_readable_by_others(path);
        let bad = |line, problem| AuthError::BadToken {
            path: path.to_owned(),
            line,
            problem,
        };
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    index + 1,
                    "a token must be printable ASCII without spaces",
                ));
            }
            digests.push(digest(token.as_bytes()));
        }
        if digests.is_empty() {
            return Err(AuthError::NoTokens(path.to_owned()));
        }
        Ok(Self { digests })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no token is accepted (never true for a loaded file).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is an accepted token. Every accepted token is
    /// compared, in constant time, so timing reveals neither which token
    /// matched nor how much of one did.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, accepted| {
                acc | accepted.ct_eq(&presented)
            });
        matched.into()
    }

    /// How many of these tokens `other` does not accept.
    fn not_in(&self, other: &Tokens) -> usize {
        self.digests
            .iter()
            .filter(|d| !other.digests.contains(d))
            .count()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the token file is readable by group or others; chmod 600 it"
            );
        }
    }
}

impl Policy {
    /// Whether `request` may proceed; otherwise the status to answer with.
    fn check<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        if path.starts_with(OPEN_PREFIX) {
            return Ok(());
        }
        let caller = self.caller(request)?;
        if path.starts_with(OPERATOR_PREFIX) && caller != Caller::Operator {
            return Err(Status::permission_denied(
                "kiln.v1.Admin needs an operator token (kiln serve --operator-tokens)",
            ));
        }
        Ok(())
    }

    /// Who presented what: a bearer token is checked when one is sent
    /// (operator tokens first), a client certificate otherwise.
    fn caller<B>(&self, request: &http::Request<B>) -> Result<Caller, Status> {
        let certified = self.client_certs && has_client_certificate(request);
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
            return if certified {
                Ok(Caller::Client)
            } else {
                Err(Status::unauthenticated(self.what_is_required(&tokens)))
            };
        };
        let token = bearer_token(value).ok_or_else(|| {
            Status::unauthenticated("the authorization header is not `Bearer <token>`")
        })?;
        let accepts = |set: &Option<Tokens>| set.as_ref().is_some_and(|t| t.accepts(token));
        if accepts(&tokens.operators) {
            Ok(Caller::Operator)
        } else if accepts(&tokens.clients) || certified {
            Ok(Caller::Client)
        } else if tokens.clients.is_none() && tokens.operators.is_none() {
            // No tokens are taken at all: say what is.
            Err(Status::unauthenticated(self.what_is_required(&tokens)))
        } else {
            Err(Status::unauthenticated("the bearer token is not accepted"))
        }
    }

    fn what_is_required(&self, tokens: &Accepted) -> &'static str {
        if self.client_certs {
            if tokens.clients.is_some() || tokens.operators.is_some() {
                return "kiln requires a client certificate signed by its client CA or an `authorization: Bearer <token>` header";
            }
            return "kiln requires a client certificate signed by its client CA";
        }
        "kiln requires an `authorization: Bearer <token>` header"
    }
}

/// Whether the connection carried a client certificate. rustls has already
/// checked it against the client CA: an unverifiable one fails the handshake.
fn has_client_certificate<B>(request: &http::Request<B>) -> bool {
    let extensions = request.extensions();
    let tcp = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    let unix = || {
        extensions
            .get::<TlsConnectInfo<UdsConnectInfo>>()
            .and_then(|info| info.peer_certs())
    };
    tcp.or_else(unix).is_some_and(|certs| !certs.is_empty())
}

/// The token of an `authorization` value `Bearer <token>` (the scheme is
/// case-insensitive, as in RFC 6750).
fn bearer_token(value: &http::HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// Tower layer refusing unauthenticated calls (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Option<Arc<Policy>>,
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if let Some(policy) = &self.policy {
            if let Err(status) = policy.check(&request) {
                tracing::info!(
                    path = request.uri().path(),
                    reason = status.message(),
                    "refused an unauthenticated call"
                );
                return Either::Left(future::ready(Ok(status.into_http())));
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn token_file_lines() {
        let (_dir, path) = token_file("# operators\n  alpha-token  \n\nbeta\n");
        let tokens = Tokens::from_file(&path).expect("loads");
        assert_eq!(tokens.len(), 2);
        assert!(tokens.accepts(b"alpha-token"));
        assert!(tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"alpha"));
        assert!(!tokens.accepts(b"beta "));
        assert!(!tokens.accepts(b"# operators"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn token_file_errors_name_the_problem() {
        let (_dir, path) = token_file("\n# nothing\n");
        assert!(matches!(
            Tokens::from_file(&path),
            Err(AuthError::NoTokens(_))
        ));
        let (_dir, path) = token_file("good\nhas space\n");
        let err = Tokens::from_file(&path).expect_err("refused");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(
            !err.to_string().contains("has space"),
            "token leaked: {err}"
        );
        let err = Tokens::from_file(Path::new("/nonexistent/tokens")).expect_err("missing");
        assert!(matches!(err, AuthError::ReadTokens(..)));
    }

    #[test]
    fn options_must_fit_together() {
        let path = Some(PathBuf::from("/nonexistent"));
        let half = SecurityOptions {
            tls_cert: path.clone(),
            ..Default::default()
        };
        assert!(matches!(
            Security::load(&half),
            Err(AuthError::IncompleteIdentity)
        ));
        let ca_only = SecurityOptions {
            tls_client_ca: path,
            ..Default::default()
        };
        assert!(matches!(
            Security::load(&ca_only),
            Err(AuthError::ClientCaWithoutTls)
        ));
        let none = Security::load(&SecurityOptions::default()).expect("nothing to load");
        assert!(!none.requires_authentication());
        assert!(none.tls().is_none());
    }

    fn policy_of(
        client_certs: bool,
        clients: Option<PathBuf>,
        operators: Option<PathBuf>,
    ) -> Policy {
        let files = TokenFiles { clients, operators };
        let tokens = RwLock::new(files.load().expect("loads"));
        Policy {
            client_certs,
            files,
            tokens,
        }
    }

    fn request(path: &str, authorization: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some(value) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn policy_checks_bearer_tokens_and_leaves_health_open() {
        let (_dir, path) = token_file("secret\n");
        let policy = policy_of(false, Some(path), None);
        let call = "/snix.castore.v1.BlobService/Stat";
        assert!(policy.check(&request(call, Some("Bearer secret"))).is_ok());
        assert!(policy.check(&request(call, Some("bearer secret"))).is_ok());
        for refused in [None, Some("Bearer wrong"), Some("secret"), Some("Bearer ")] {
            let status = policy.check(&request(call, refused)).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        assert!(policy
            .check(&request("/grpc.health.v1.Health/Check", None))
            .is_ok());
        // Without TLS there is no certificate to accept.
        let certs_only = policy_of(true, None, None);
        let status = certs_only
            .check(&request(call, Some("Bearer secret")))
            .expect_err("refused");
        assert!(status.message().contains("client certificate"));
    }

    #[test]
    fn the_admin_service_needs_an_operator_token() {
        let (_dir, clients) = token_file("client\n");
        let (_dir2, operators) = token_file("boss\n");
        let policy = policy_of(false, Some(clients), Some(operators));
        let admin = "/kiln.v1.Admin/ListBuilds";
        let build = "/snix.build.v1.BuildService/DoBuild";
        assert!(policy.check(&request(admin, Some("Bearer boss"))).is_ok());
        assert!(policy.check(&request(build, Some("Bearer boss"))).is_ok());
        assert!(policy.check(&request(build, Some("Bearer client"))).is_ok());
        let status = policy
            .check(&request(admin, Some("Bearer client")))
            .expect_err("a client is no operator");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let status = policy.check(&request(admin, None)).expect_err("nobody");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn reload_swaps_tokens_and_keeps_them_on_error() {
        let (dir, path) = token_file("retired-token\nkept-token\n");
        let security = Security::load(&SecurityOptions {
            auth_tokens: Some(path.clone()),
            ..Default::default()
        })
        .expect("loads");
        let layer_policy = security.layer().policy.expect("policy");
        let call = "/snix.castore.v1.BlobService/Stat";
        std::fs::write(&path, "kept-token\nfresh-token\n").expect("write");
        let changes = security.reload().expect("reloads");
        assert_eq!(changes.len(), 1);
        assert!(
            changes[0].contains("2 accepted (1 added, 1 removed)"),
            "{changes:?}"
        );
        assert!(
            !changes[0].contains("fresh-token") && !changes[0].contains("retired-token"),
            "token leaked: {changes:?}"
        );
        assert!(layer_policy
            .check(&request(call, Some("Bearer fresh-token")))
            .is_ok());
        assert!(layer_policy
            .check(&request(call, Some("Bearer retired-token")))
            .is_err());
        // A broken file changes nothing.
        std::fs::write(&path, "has space\n").expect("write");
        security.reload().expect_err("refused");
        assert!(layer_policy
            .check(&request(call, Some("Bearer fresh-token")))
            .is_ok());
        drop(dir);
    }
}
