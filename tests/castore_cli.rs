//! `kiln castore import` / `export`: the node text form, and the real
//! binary against an in-process castore server.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kiln::castore::{B3Digest, Node, SymlinkTarget};
use kiln::cli::castore::{format_node, parse_node};

#[test]
fn node_text_round_trips() {
    let digest = B3Digest::of(b"x");
    let nodes = [
        Node::Directory { digest, size: 12 },
        Node::File {
            digest,
            size: 1,
            executable: false,
        },
        Node::File {
            digest,
            size: 1,
            executable: true,
        },
        Node::Symlink {
            target: SymlinkTarget::try_from(&b"../a:b"[..]).unwrap(),
        },
    ];
    for node in nodes {
        let text = format_node(&node);
        assert_eq!(parse_node(&text).unwrap(), node, "{text}");
    }
    assert_eq!(
        format_node(&Node::File {
            digest,
            size: 1,
            executable: true
        }),
        format!("file:{digest}:1:executable")
    );
}

#[test]
fn node_text_shorthands_and_errors() {
    let digest = B3Digest::of(b"x");
    let directory = Node::Directory { digest, size: 0 };
    assert_eq!(parse_node(&digest.to_hex()).unwrap(), directory);
    assert_eq!(
        parse_node(&format!("directory:{digest}")).unwrap(),
        directory
    );
    assert_eq!(
        parse_node(&format!("file:{digest}:3:x")).unwrap(),
        Node::File {
            digest,
            size: 3,
            executable: true
        }
    );
    let short = parse_node("directory:abcd:1").unwrap_err().to_string();
    assert!(short.contains("abcd"), "{short}");
    let no_size = parse_node(&format!("file:{digest}"))
        .unwrap_err()
        .to_string();
    assert!(no_size.contains("unknown form"), "{no_size}");
    let bad_size = parse_node(&format!("file:{digest}:big"))
        .unwrap_err()
        .to_string();
    assert!(bad_size.contains("size is not a number"), "{bad_size}");
    assert!(parse_node("symlink:").is_err());
    assert!(parse_node("socket:whatever").is_err());
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn import_then_export_through_a_running_server() {
    let work = tempfile::tempdir().unwrap();
    let store = kiln::castore::from_addr("", &work.path().join("server"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let router = kiln::castore::grpc_services(store.clone())
        .into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let source = work.path().join("tree");
    fs::create_dir_all(source.join("bin")).unwrap();
    fs::write(source.join("bin/run"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(source.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(source.join("data"), b"data\n").unwrap();
    std::os::unix::fs::symlink("bin/run", source.join("link")).unwrap();

    let source_arg = source.to_str().unwrap().to_owned();
    let addr_arg = addr.clone();
    let imported = tokio::task::spawn_blocking(move || {
        kiln(&["castore", "import", "--addr", &addr_arg, &source_arg])
    })
    .await
    .unwrap();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let line = String::from_utf8(imported.stdout)
        .unwrap()
        .trim()
        .to_owned();
    let node = parse_node(&line).unwrap();
    let Node::Directory { digest, .. } = node else {
        panic!("want a directory, got {line}")
    };
    assert!(
        store.directories.get(&digest).await.unwrap().is_some(),
        "the server has it"
    );

    let out = work.path().join("out");
    let out_arg = out.to_str().unwrap().to_owned();
    let (addr_arg, line_arg) = (addr.clone(), line.clone());
    let exported = tokio::task::spawn_blocking(move || {
        kiln(&[
            "castore", "export", "--addr", &addr_arg, &line_arg, &out_arg,
        ])
    })
    .await
    .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert_eq!(fs::read(out.join("data")).unwrap(), b"data\n");
    let run = fs::metadata(out.join("bin/run")).unwrap();
    assert_eq!(run.permissions().mode() & 0o111, 0o111);
    assert_eq!(
        fs::read_link(out.join("link")).unwrap(),
        Path::new("bin/run")
    );

    // Exporting something the server lacks fails, naming the digest.
    let unknown = B3Digest::of(b"unknown");
    let (addr_arg, unknown_arg) = (addr, unknown.to_hex());
    let missing_out = work.path().join("missing").to_str().unwrap().to_owned();
    let failed = tokio::task::spawn_blocking(move || {
        kiln(&[
            "castore",
            "export",
            "--addr",
            &addr_arg,
            &unknown_arg,
            &missing_out,
        ])
    })
    .await
    .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains(&unknown.to_hex()), "{stderr}");
}
