//! The `kiln` subcommands as clients: `kiln castore import` sends its token
//! and speaks TLS, `kiln build` presents its client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::castore::B3Digest;

use crate::credentials::{server_security, Files, Pki, TOKEN};
use crate::server::Server;

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
