//! Access control over gRPC: bearer tokens, TLS and mutual TLS, against an
//! in-process server on 127.0.0.1:0 (and a unix socket). No VM is booted:
//! the executor's VM runner refuses to start anything, and the build calls
//! used are invalid requests, which an authenticated caller sees refused as
//! INVALID_ARGUMENT and an unauthenticated one as UNAUTHENTICATED before
//! any validation. Certificates are generated here, at test time.
//!
//! This file holds the tests over gRPC; the parts beside it: `server` (the
//! server under test), `credentials` (CAs, certificates, token files),
//! `calls` (one call to every service and what its results must be) and
//! `cli` (the `kiln` subcommands as authenticated clients).

#![allow(clippy::unwrap_used)]

mod calls;
mod cli;
mod credentials;
mod server;
mod tenants;

use std::path::Path;

use kiln::castore::B3Digest;
use kiln::client::{connect, ClientSecurity};
use kiln::proto::snix_castore;
use tonic::Code;

use calls::{assert_refused, assert_served, call_every_service, health_serving};
use credentials::{client_security, server_security, Files, Pki, TOKEN};
use server::Server;

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
