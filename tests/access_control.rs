//! Access control over gRPC: bearer tokens, TLS and mutual TLS, against an
//! in-process server on 127.0.0.1:0 (and a unix socket). No VM is booted:
//! the executor's VM runner refuses to start anything, and the build calls
//! used are invalid requests, which an authenticated caller sees refused as
//! INVALID_ARGUMENT and an unauthenticated one as UNAUTHENTICATED before
//! any validation. Certificates are generated here, at test time.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln::auth::{Security, SecurityOptions};
use kiln::castore::{B3Digest, Store};
use kiln::client::{connect, ClientSecurity, ClientSecurityOptions, KilnChannel};
use kiln::executor::plan::Limits;
use kiln::executor::{Executor, ExecutorConfig};
use kiln::guest_image::Artifacts;
use kiln::proto::{kiln_v1, snix_build, snix_castore, tvix_build, tvix_castore};
use kiln::server::Bound;
use kiln::vmm::{RunningVm, VmRunner, VmSpec, VmmError};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::{Code, Status};

const TOKEN: &str = "kiln-test-token-0123456789";

/// A VM runner that never boots anything: these tests must not need VMs.
struct NoVms;

#[async_trait::async_trait]
impl VmRunner for NoVms {
    fn name(&self) -> &'static str {
        "none"
    }
    fn accel(&self) -> &'static str {
        "none"
    }
    async fn start(&self, _spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        Err(VmmError::Unsupported(
            "the access-control tests boot no VM".into(),
        ))
    }
}

/// A running in-process server.
struct Server {
    /// `HOST:PORT` (TCP) or the socket path.
    addr: String,
    store: Store,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start(security: Security) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Self::start_on(Bound::Tcp(listener), addr, security).await
    }

    async fn start_unix(socket: &Path, security: Security) -> Self {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let bound = Bound::Unix(listener, socket.to_owned());
        Self::start_on(bound, socket.display().to_string(), security).await
    }

    async fn start_on(bound: Bound, addr: String, security: Security) -> Self {
        let data = tempfile::tempdir().unwrap();
        let store = kiln::castore::from_addr("", &data.path().join("data"))
            .await
            .unwrap();
        let config = ExecutorConfig {
            scratch: Default::default(),
            inputs: Default::default(),
            data_dir: data.path().join("data"),
            cache_dir: data.path().join("cache"),
            artifacts: Artifacts::default(),
            limits: Limits {
                min_guest_memory_mib: 512,
                guest_overhead_mib: 256,
                max_guest_memory_mib: 4096,
                vcpus: 1,
                nested_virt_available: false,
                ro_path_allowlist: vec![],
            },
            timeout: Duration::from_secs(60),
            max_log_bytes: 1 << 20,
            max_vms: 1,
            memory_budget_mib: 4096,
            max_queue: 4,
            request_budget_bytes: kiln::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES,
            kept_builds: 8,
            kept_log_bytes: 1 << 16,
        };
        let executor = Arc::new(Executor::open(config, store.clone(), Arc::new(NoVms)).unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve_store = store.clone();
        let task = tokio::spawn(async move {
            kiln::server::serve_with(bound, serve_store, executor, security, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            store,
            shutdown: Some(tx),
            task: Some(task),
            _data: data,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops")
                .expect("server task");
        }
    }
}

/// Files a test writes: token files, PEM certificates and keys.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// A CA and what it signed.
struct Pki {
    ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "kiln test");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_leaf(&self) -> (String, String) {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client_leaf(&self) -> (String, String) {
        self.leaf(&["builder.example"], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Server security: TLS from `pki` (if any), client CA, token file.
fn server_security(
    files: &Files,
    pki: Option<&Pki>,
    client_ca: Option<&Pki>,
    tokens: Option<&str>,
) -> Security {
    let mut options = SecurityOptions::default();
    if let Some(pki) = pki {
        let (cert, key) = pki.server_leaf();
        options.tls_cert = Some(files.write("server.pem", &cert));
        options.tls_key = Some(files.write("server.key", &key));
    }
    if let Some(ca) = client_ca {
        options.tls_client_ca = Some(files.write("client-ca.pem", &ca.ca_pem));
    }
    if let Some(tokens) = tokens {
        options.auth_tokens = Some(files.write("tokens", tokens));
    }
    Security::load(&options).unwrap()
}

/// Client security: trust `ca` (if any), present `identity`, send `token`.
fn client_security(
    files: &Files,
    ca: Option<&Pki>,
    identity: Option<(String, String)>,
    token: Option<&str>,
) -> ClientSecurity {
    let unique = uuid::Uuid::new_v4();
    let mut options = ClientSecurityOptions::default();
    if let Some(ca) = ca {
        options.tls_ca = Some(files.write(&format!("ca-{unique}.pem"), &ca.ca_pem));
    }
    if let Some((cert, key)) = identity {
        options.tls_cert = Some(files.write(&format!("client-{unique}.pem"), &cert));
        options.tls_key = Some(files.write(&format!("client-{unique}.key"), &key));
    }
    if let Some(token) = token {
        options.token_file = Some(files.write(&format!("token-{unique}"), token));
    }
    ClientSecurity::load(&options).unwrap()
}

/// Every service but health, called once: the answer, or the status.
async fn call_every_service(channel: &KilnChannel) -> Vec<(&'static str, Result<(), Status>)> {
    let blob = bytes::Bytes::from_static(b"access control");
    let digest = B3Digest::of(&blob).to_bytes();
    let empty_dir = B3Digest::of(b"").to_bytes();
    let mut results = Vec::new();

    let mut tvix_blobs = tvix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    let chunk = tvix_castore::BlobChunk { data: blob.clone() };
    let put = tvix_blobs
        .put(futures::stream::iter([chunk]))
        .await
        .map(|r| assert_eq!(r.into_inner().digest, digest, "tvix blob put digest"));
    results.push(("tvix blob put", put));

    let mut snix_blobs = snix_castore::blob_service_client::BlobServiceClient::new(channel.clone());
    let stat = snix_blobs
        .stat(snix_castore::StatBlobRequest {
            digest: digest.clone(),
            ..Default::default()
        })
        .await
        .map(drop);
    results.push(("snix blob stat", stat));

    let mut tvix_dirs =
        tvix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    let put = tvix_dirs
        .put(futures::stream::iter([tvix_castore::Directory::default()]))
        .await
        .map(|r| assert_eq!(r.into_inner().root_digest, empty_dir, "tvix directory put"));
    results.push(("tvix directory put", put));

    let mut snix_dirs =
        snix_castore::directory_service_client::DirectoryServiceClient::new(channel.clone());
    let get = async {
        let request = snix_castore::GetDirectoryRequest {
            by_what: Some(snix_castore::get_directory_request::ByWhat::Digest(
                empty_dir.clone(),
            )),
            recursive: false,
        };
        let mut stream = snix_dirs.get(request).await?.into_inner();
        let first = stream.message().await?;
        assert!(first.is_some(), "snix directory get returns the directory");
        Ok(())
    }
    .await;
    results.push(("snix directory get", get));

    let mut tvix_build = tvix_build::build_service_client::BuildServiceClient::new(channel.clone());
    let build = tvix_build
        .do_build(tvix_build::BuildRequest::default())
        .await
        .map(drop);
    results.push(("tvix build", build));

    let mut snix_build = snix_build::build_service_client::BuildServiceClient::new(channel.clone());
    let build = snix_build
        .do_build(snix_build::BuildRequest::default())
        .await
        .map(drop);
    results.push(("snix build", build));

    let mut events = kiln_v1::build_events_client::BuildEventsClient::new(channel.clone());
    let submit = events
        .submit(kiln_v1::SubmitRequest {
            request: Some(kiln_v1::submit_request::Request::Snix(
                snix_build::BuildRequest::default(),
            )),
        })
        .await
        .map(drop);
    results.push(("kiln events submit", submit));
    let watch = events
        .watch(kiln_v1::WatchRequest {
            build_id: "no-such-build".into(),
        })
        .await
        .map(drop);
    results.push(("kiln events watch", watch));

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let list = async {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await?
            .into_inner();
        let answer = stream.message().await?;
        assert!(answer.is_some(), "reflection lists the services");
        Ok(())
    }
    .await;
    results.push(("reflection", list));
    results
}

/// Whether the health service answers SERVING.
async fn health_serving(channel: &KilnChannel) -> Result<bool, Status> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let answer = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(answer.into_inner().status
        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// What an authenticated caller gets from [`call_every_service`].
fn assert_served(results: &[(&str, Result<(), Status>)]) {
    for (name, result) in results {
        let expected = match *name {
            "tvix build" | "snix build" | "kiln events submit" => Some(Code::InvalidArgument),
            "kiln events watch" => Some(Code::NotFound),
            _ => None,
        };
        match (result, expected) {
            (Ok(()), None) => {}
            (Err(status), Some(code)) if status.code() == code => {}
            _ => panic!("{name}: expected {expected:?} (None = OK), got {result:?}"),
        }
    }
}

/// Every call refused as UNAUTHENTICATED.
fn assert_refused(results: &[(&str, Result<(), Status>)], why: &str) {
    assert_eq!(results.len(), 9);
    for (name, result) in results {
        match result {
            Err(status) if status.code() == Code::Unauthenticated => {}
            other => panic!("{why}: {name} must be UNAUTHENTICATED, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bearer_tokens_guard_every_service_but_health() {
    let files = Files::new();
    let server = Server::start(server_security(
        &files,
        None,
        None,
        Some("# comment\nother-token\n  kiln-test-token-0123456789  \n"),
    ))
    .await;
    let blob_digest = B3Digest::of(b"access control");

    for (why, token) in [
        ("no token", None),
        ("wrong token", Some("kiln-test-token-012345678")),
        ("a token's prefix", Some("kiln")),
    ] {
        let security = client_security(&files, None, None, token);
        let channel = connect(&server.addr, &security).await.unwrap();
        let results = call_every_service(&channel).await;
        assert_refused(&results, why);
        if let Some((_, Err(status))) = results.first() {
            assert!(
                !status.message().contains(TOKEN),
                "the refusal must not echo tokens: {status:?}"
            );
        }
        assert!(
            !server.store.blobs.has(&blob_digest).await.unwrap(),
            "{why}: a refused put must store nothing"
        );
        assert!(
            health_serving(&channel).await.unwrap(),
            "{why}: health stays open"
        );
    }

    // A malformed authorization header is refused too.
    let mut snix_blobs = snix_castore::blob_service_client::BlobServiceClient::new(
        connect(&server.addr, &ClientSecurity::none())
            .await
            .unwrap(),
    );
    let mut request = tonic::Request::new(snix_castore::StatBlobRequest {
        digest: blob_digest.to_bytes(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", TOKEN.parse().unwrap());
    let status = snix_blobs.stat(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{status:?}");

    for token in [TOKEN, "other-token"] {
        let security = client_security(&files, None, None, Some(token));
        let channel = connect(&server.addr, &security).await.unwrap();
        assert_served(&call_every_service(&channel).await);
    }
    assert!(server.store.blobs.has(&blob_digest).await.unwrap());
    server.stop().await;
}

#[tokio::test]
async fn tls_refuses_plaintext_and_untrusted_servers() {
    let files = Files::new();
    let pki = Pki::new("kiln test CA");
    let server = Server::start(server_security(&files, Some(&pki), None, None)).await;

    let plaintext = async {
        let channel = connect(&server.addr, &ClientSecurity::none()).await?;
        let results = call_every_service(&channel).await;
        Ok::<_, kiln::client::ConnectError>(results)
    }
    .await;
    if let Ok(results) = plaintext {
        for (name, result) in results {
            assert!(
                result.is_err(),
                "{name}: a plaintext call to a TLS server must fail"
            );
        }
    }

    let stranger = Pki::new("some other CA");
    let untrusted = client_security(&files, Some(&stranger), None, None);
    let addr = format!("https://{}", server.addr);
    match connect(&addr, &untrusted).await {
        Err(_) => {}
        Ok(channel) => {
            for (name, result) in call_every_service(&channel).await {
                assert!(
                    result.is_err(),
                    "{name}: a server of an untrusted CA must be refused"
                );
            }
        }
    }

    let trusted = client_security(&files, Some(&pki), None, None);
    for addr in [server.addr.clone(), format!("https://{}", server.addr)] {
        let channel = connect(&addr, &trusted).await.unwrap();
        assert_served(&call_every_service(&channel).await);
    }
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_of_the_client_ca() {
    let files = Files::new();
    let server_pki = Pki::new("kiln server CA");
    let client_pki = Pki::new("kiln client CA");
    let server = Server::start(server_security(
        &files,
        Some(&server_pki),
        Some(&client_pki),
        None,
    ))
    .await;
    let addr = format!("https://{}", server.addr);

    // Without a certificate the connection opens (health must stay
    // reachable) but every other call is refused.
    let anonymous = client_security(&files, Some(&server_pki), None, Some(TOKEN));
    let channel = connect(&addr, &anonymous).await.unwrap();
    assert_refused(&call_every_service(&channel).await, "no client certificate");
    assert!(health_serving(&channel).await.unwrap());

    // A certificate from another CA fails the handshake.
    let stranger = Pki::new("some other CA");
    let forged = client_security(
        &files,
        Some(&server_pki),
        Some(stranger.client_leaf()),
        None,
    );
    match connect(&addr, &forged).await {
        Err(_) => {}
        Ok(channel) => {
            for (name, result) in call_every_service(&channel).await {
                let status = result.expect_err("a foreign certificate must be refused");
                assert_ne!(status.code(), Code::Ok, "{name}");
            }
        }
    }

    let member = client_security(
        &files,
        Some(&server_pki),
        Some(client_pki.client_leaf()),
        None,
    );
    let channel = connect(&addr, &member).await.unwrap();
    assert_served(&call_every_service(&channel).await);
    server.stop().await;
}

#[tokio::test]
async fn certificates_or_tokens_over_a_unix_socket_and_the_remote_castore() {
    let files = Files::new();
    let server_pki = Pki::new("kiln server CA");
    let client_pki = Pki::new("kiln client CA");
    let socket = files.0.path().join("kiln.sock");
    let server = Server::start_unix(
        &socket,
        server_security(
            &files,
            Some(&server_pki),
            Some(&client_pki),
            Some(&format!("{TOKEN}\n")),
        ),
    )
    .await;
    let addr = format!("grpc+unix:{}", socket.display());

    let anonymous = client_security(&files, Some(&server_pki), None, None);
    let channel = connect(&addr, &anonymous).await.unwrap();
    assert_refused(
        &call_every_service(&channel).await,
        "unix socket, no credential",
    );

    // Either credential is enough when both are configured.
    let with_token = client_security(&files, Some(&server_pki), None, Some(TOKEN));
    let with_cert = client_security(
        &files,
        Some(&server_pki),
        Some(client_pki.client_leaf()),
        None,
    );
    for security in [&with_token, &with_cert] {
        let channel = connect(&addr, security).await.unwrap();
        assert_served(&call_every_service(&channel).await);
    }

    // The remote castore backend goes through the same connect.
    let tree = files.0.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("file"), b"through the remote castore").unwrap();
    let nowhere = Path::new("/nonexistent");
    let refused = kiln::castore::from_addr::from_addr_with(&addr, nowhere, &anonymous)
        .await
        .unwrap();
    assert!(kiln::castore::ingest::ingest_path(&refused, &tree)
        .await
        .is_err());
    let remote = kiln::castore::from_addr::from_addr_with(&addr, nowhere, &with_token)
        .await
        .unwrap();
    let node = kiln::castore::ingest::ingest_path(&remote, &tree)
        .await
        .unwrap();
    let kiln::castore::Node::Directory { digest, .. } = node else {
        panic!("a directory was ingested: {node:?}");
    };
    assert!(server
        .store
        .directories
        .get(&digest)
        .await
        .unwrap()
        .is_some());
    server.stop().await;
}

#[tokio::test]
async fn kiln_castore_cli_sends_the_token_and_speaks_tls() {
    let files = Files::new();
    let pki = Pki::new("kiln test CA");
    let server = Server::start(server_security(
        &files,
        Some(&pki),
        None,
        Some(&format!("{TOKEN}\n")),
    ))
    .await;
    let ca = files.write("cli-ca.pem", &pki.ca_pem);
    let token = files.write("cli-token", &format!("{TOKEN}\n"));
    let input = files.write("input.txt", "imported by the CLI");
    let addr = format!("https://{}", server.addr);
    let kiln = |extra: &[&Path]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(["castore", "import", "--addr", &addr, "--tls-ca"]);
        command.arg(&ca);
        for arg in extra {
            command.arg(arg);
        }
        command.arg(&input);
        command
    };

    let output = tokio::task::spawn_blocking({
        let mut command = kiln(&[]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success(), "import without a token must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Bearer"),
        "the error says what is missing: {stderr}"
    );

    let output = tokio::task::spawn_blocking({
        let mut command = kiln(&[Path::new("--token-file"), &token]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "import with the token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = B3Digest::of(b"imported by the CLI");
    assert!(stdout.starts_with(&format!("file:{expected}:")), "{stdout}");
    assert!(server.store.blobs.has(&expected).await.unwrap());
    server.stop().await;
}

#[tokio::test]
async fn kiln_build_cli_presents_its_client_certificate() {
    let files = Files::new();
    let server_pki = Pki::new("kiln server CA");
    let client_pki = Pki::new("kiln client CA");
    let socket = files.0.path().join("kiln.sock");
    let server = Server::start_unix(
        &socket,
        server_security(&files, Some(&server_pki), Some(&client_pki), None),
    )
    .await;
    let ca = files.write("cli-ca.pem", &server_pki.ca_pem);
    let (cert, key) = client_pki.client_leaf();
    let cert = files.write("cli-client.pem", &cert);
    let key = files.write("cli-client.key", &key);
    // An empty snix request: an authenticated caller gets INVALID_ARGUMENT.
    let request = files.write("request.json", r#"{"snix": {}}"#);
    let addr = format!("unix:{}", socket.display());
    let run = |extra: Vec<PathBuf>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(["build", "--addr", &addr, "--tls-ca"]);
        command.arg(&ca).args(extra).arg(&request);
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };

    let output = run(vec![]).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Unauthenticated"), "{stderr}");

    let with_cert = vec!["--tls-cert".into(), cert, "--tls-key".into(), key];
    let output = run(with_cert).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("InvalidArgument") && !stderr.contains("Unauthenticated"),
        "{stderr}"
    );
    server.stop().await;
}
