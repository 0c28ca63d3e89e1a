//! Who may call kiln: the server's security settings (TLS and client
//! authentication) and the tower layer that enforces them.
//!
//! A caller is authenticated by either
//! - a TLS client certificate that chains to the configured client CA
//!   (`--tls-client-ca`; rustls verifies it during the handshake), its
//!   tenant read from it by the operator's rule ([`cert`],
//!   `--tenant-from-cert`), or
//! - an `authorization: Bearer <token>` header whose token is one of the
//!   lines of the token file (`--auth-tokens`) or of the operator token file
//!   (`--operator-tokens`), compared in constant time, each line naming its
//!   tenant ([`tokens`]). Both files are read at start-up and again on
//!   [`Security::reload`] (SIGHUP).
//!
//! With any of these configured, [`AuthLayer`] sits on the server builder in
//! front of every service, so none can be forgotten: any call without an
//! accepted credential gets `UNAUTHENTICATED`; an accepted one gets the
//! caller's [`Identity`] in its request extensions, which every service
//! scopes its answers by (a client sees its own tenant's builds and data, an
//! operator token sees everything). The one exception is
//! `grpc.health.v1.Health`, which load balancers and probes must reach
//! without credentials; it reveals only whether kiln is serving. Without
//! authentication every caller is served as the one tenant `default` that
//! sees everything, unless the server was given a fixed identity
//! ([`Security::fixed`]: the Nix front's private backend).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::{self, Either, Ready};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tonic::transport::ServerTlsConfig;
use tonic::Status;
use tower::{Layer, Service};

use crate::tenant::Identity;
use crate::tls::{self, TlsError};

pub mod cert;
pub mod tokens;

pub use cert::CertTenantRule;
pub use tokens::Tokens;

/// Paths under this prefix are served without credentials.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

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
    #[error("token file {0} holds no token (one `TENANT TOKEN` or `TOKEN` per line; blank lines and # comments are skipped)")]
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
    /// File of accepted bearer tokens, `TENANT TOKEN` (or `TOKEN`) per line.
    pub auth_tokens: Option<PathBuf>,
    /// File of operator bearer tokens (they see every tenant's builds and
    /// data), lines as in `auth_tokens`.
    pub operator_tokens: Option<PathBuf>,
    /// Which tenant a client certificate names.
    pub tenant_from_cert: CertTenantRule,
}

/// The server's loaded security settings: TLS, and who may call.
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<ServerTlsConfig>,
    policy: Option<Arc<Policy>>,
    /// Without a policy: the identity every caller gets.
    fixed: Option<Identity>,
}

/// What a caller must present.
#[derive(Debug)]
struct Policy {
    /// Whether client certificates are accepted, and the tenant rule.
    client_certs: Option<CertTenantRule>,
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

impl Security {
    /// No TLS and no authentication: every caller is served.
    pub fn none() -> Self {
        Self::default()
    }

    /// No TLS and no authentication, every caller served as `identity`
    /// (a private socket only kiln itself connects to, like the Nix
    /// front's backend, acting for the tenant its clients belong to).
    pub fn fixed(identity: Identity) -> Self {
        Self {
            fixed: Some(identity),
            ..Self::default()
        }
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
        let client_certs = options
            .tls_client_ca
            .is_some()
            .then(|| options.tenant_from_cert.clone());
        let any = client_certs.is_some() || tokens.clients.is_some() || tokens.operators.is_some();
        let policy = any.then(|| {
            Arc::new(Policy {
                client_certs,
                files,
                tokens: RwLock::new(tokens),
            })
        });
        Ok(Self {
            tls,
            policy,
            fixed: None,
        })
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
                if let Some(rule) = &policy.client_certs {
                    ways.push(format!("client certificates (tenant by {rule})"));
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
            fixed: self.fixed.clone(),
        }
    }

    /// The tenants the token files name now (for the start-up log).
    pub fn tenants(&self) -> Vec<crate::tenant::Tenant> {
        let Some(policy) = &self.policy else {
            return Vec::new();
        };
        let tokens = policy.tokens.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = [&tokens.clients, &tokens.operators]
            .into_iter()
            .flatten()
            .flat_map(|t| t.tenants())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

impl Policy {
    /// Who `request` comes from; `None` for the open health service;
    /// otherwise the status to answer with.
    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Identity>, Status> {
        if request.uri().path().starts_with(OPEN_PREFIX) {
            return Ok(None);
        }
        self.caller(request).map(Some)
    }

    /// Who presented what: a bearer token is checked when one is sent
    /// (operator tokens first), a client certificate otherwise (or when
    /// the token is not accepted).
    fn caller<B>(&self, request: &http::Request<B>) -> Result<Identity, Status> {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let refused = |why: &str| match self.by_certificate(request) {
            Some(identity) => identity,
            None => Err(Status::unauthenticated(why)),
        };
        let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
            return refused(self.what_is_required(&tokens));
        };
        let token = bearer_token(value).ok_or_else(|| {
            Status::unauthenticated("the authorization header is not `Bearer <token>`")
        })?;
        let tenant_in = |set: &Option<Tokens>| set.as_ref().and_then(|t| t.tenant_of(token));
        if let Some(tenant) = tenant_in(&tokens.operators) {
            Ok(Identity::operator(tenant))
        } else if let Some(tenant) = tenant_in(&tokens.clients) {
            Ok(Identity::client(tenant))
        } else if tokens.clients.is_none() && tokens.operators.is_none() {
            // No tokens are taken at all: say what is.
            refused(self.what_is_required(&tokens))
        } else {
            refused("the bearer token is not accepted")
        }
    }

    /// The identity of the connection's client certificate, when
    /// certificates are accepted and one was presented.
    fn by_certificate<B>(&self, request: &http::Request<B>) -> Option<Result<Identity, Status>> {
        let rule = self.client_certs.as_ref()?;
        let leaf = client_certificate(request)?;
        Some(
            rule.tenant_of(&leaf)
                .map(Identity::client)
                .map_err(Status::unauthenticated),
        )
    }

    fn what_is_required(&self, tokens: &Accepted) -> &'static str {
        if self.client_certs.is_some() {
            if tokens.clients.is_some() || tokens.operators.is_some() {
                return "kiln requires a client certificate signed by its client CA or an `authorization: Bearer <token>` header";
            }
            return "kiln requires a client certificate signed by its client CA";
        }
        "kiln requires an `authorization: Bearer <token>` header"
    }
}

/// The leaf certificate the connection carried, DER. rustls has already
/// checked it against the client CA: an unverifiable one fails the handshake.
fn client_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    let extensions = request.extensions();
    let tcp = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    let unix = || {
        extensions
            .get::<TlsConnectInfo<UdsConnectInfo>>()
            .and_then(|info| info.peer_certs())
    };
    let certs = tcp.or_else(unix)?;
    certs.first().map(|leaf| leaf.as_ref().to_vec())
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
    fixed: Option<Identity>,
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            policy: self.policy.clone(),
            fixed: self.fixed.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
    fixed: Option<Identity>,
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

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let identity = match &self.policy {
            Some(policy) => match policy.check(&request) {
                Ok(identity) => identity,
                Err(status) => {
                    tracing::info!(
                        path = request.uri().path(),
                        reason = status.message(),
                        "refused an unauthenticated call"
                    );
                    return Either::Left(future::ready(Ok(status.into_http())));
                }
            },
            None => self.fixed.clone(),
        };
        if let Some(identity) = identity {
            request.extensions_mut().insert(identity);
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::Tenant;

    use tokens::tests::token_file;

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
            client_certs: client_certs.then(CertTenantRule::default),
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
        assert_eq!(
            policy
                .check(&request(call, Some("Bearer secret")))
                .expect("accepted"),
            Some(Identity::client(Tenant::default_tenant()))
        );
        assert!(policy.check(&request(call, Some("bearer secret"))).is_ok());
        for refused in [None, Some("Bearer wrong"), Some("secret"), Some("Bearer ")] {
            let status = policy.check(&request(call, refused)).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        assert_eq!(
            policy
                .check(&request("/grpc.health.v1.Health/Check", None))
                .expect("open"),
            None
        );
        // Without TLS there is no certificate to accept.
        let certs_only = policy_of(true, None, None);
        let status = certs_only
            .check(&request(call, Some("Bearer secret")))
            .expect_err("refused");
        assert!(status.message().contains("client certificate"));
    }

    #[test]
    fn every_token_names_a_tenant_and_operators_see_everything() {
        let (_dir, clients) = token_file("team-a a-token\nteam-b b-token\nbare-token\n");
        let (_dir2, operators) = token_file("ops boss\n");
        let policy = policy_of(false, Some(clients), Some(operators));
        let admin = "/kiln.v1.Admin/ListBuilds";
        let build = "/snix.build.v1.BuildService/DoBuild";
        let who = |path, token: &str| {
            policy
                .check(&request(path, Some(&format!("Bearer {token}"))))
                .expect("accepted")
                .expect("an identity")
        };
        let tenant = |name| Tenant::parse(name).expect("tenant");
        assert_eq!(who(build, "a-token"), Identity::client(tenant("team-a")));
        assert_eq!(who(admin, "b-token"), Identity::client(tenant("team-b")));
        assert_eq!(
            who(build, "bare-token"),
            Identity::client(Tenant::default_tenant())
        );
        assert_eq!(who(admin, "boss"), Identity::operator(tenant("ops")));
        assert!(who(admin, "boss").sees_everything);
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
        std::fs::write(&path, "has two spaces\n").expect("write");
        security.reload().expect_err("refused");
        assert!(layer_policy
            .check(&request(call, Some("Bearer fresh-token")))
            .is_ok());
        drop(dir);
    }
}
