//! The embedded blob store: atomic, verified, read-only blobs; failed or
//! cancelled uploads leave nothing behind; the executable variant.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use kiln::castore::blob::embedded::EmbeddedBlobService;
use kiln::castore::blob::{BlobError, BlobService};
use kiln::castore::{grpc_services, B3Digest, Store};
use kiln::hostfs::Dir;
use std::ffi::OsStr;
use tokio::io::AsyncReadExt;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn put_stores_a_read_only_file_named_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = EmbeddedBlobService::open(dir.path()).unwrap();
    let stored = blobs.put(&mut &b"some bytes"[..]).await.unwrap();
    let digest = B3Digest::of(b"some bytes");
    assert_eq!(stored.digest, digest);
    assert_eq!(stored.size, 10);

    let hex = digest.to_hex();
    let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    assert_eq!(blobs.local_path(&digest).await.unwrap(), Some(path.clone()));
    assert_eq!(fs::read(&path).unwrap(), b"some bytes");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert!(files_under(&dir.path().join("blobs-tmp")).is_empty());

    let mut blob = blobs.open_read(&digest).await.unwrap().unwrap();
    assert_eq!(blob.size, Some(10));
    let mut back = Vec::new();
    blob.reader.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"some bytes");

    // Putting the same bytes again is a no-op that answers the same.
    assert_eq!(blobs.put(&mut &b"some bytes"[..]).await.unwrap(), stored);
    assert_eq!(files_under(&dir.path().join("blobs")).len(), 1);
    assert!(blobs
        .local_path(&B3Digest::of(b"absent"))
        .await
        .unwrap()
        .is_none());
    assert!(blobs
        .open_read(&B3Digest::of(b"absent"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_failing_source_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = EmbeddedBlobService::open(dir.path()).unwrap();
    let chunks = vec![
        Ok(Bytes::from(vec![7u8; 100_000])),
        Err(std::io::Error::other("source broke")),
    ];
    let mut reader = tokio_util::io::StreamReader::new(futures::stream::iter(chunks));
    let err = blobs.put(&mut reader).await.unwrap_err();
    assert!(matches!(err, BlobError::ReadSource(_)), "{err:?}");
    assert!(files_under(&dir.path().join("blobs")).is_empty());
    assert!(files_under(&dir.path().join("blobs-tmp")).is_empty());
}

#[tokio::test]
async fn a_cancelled_grpc_upload_is_not_stored() {
    use kiln::proto::tvix_castore::{blob_service_client::BlobServiceClient, BlobChunk};
    let dir = tempfile::tempdir().unwrap();
    let store: Store = kiln::castore::from_addr("", dir.path()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let router = grpc_services(store).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut client = BlobServiceClient::connect(address).await.unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let upload = tokio::spawn(async move {
        client
            .put(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    sender
        .send(BlobChunk {
            data: Bytes::from(vec![1u8; 50_000]),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    upload.abort();
    drop(sender);

    // The server notices the reset and drops its temporary file.
    let tmp = dir.path().join("blobs-tmp");
    for _ in 0..50 {
        if files_under(&tmp).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        files_under(&tmp).is_empty(),
        "temporary file left: {:?}",
        files_under(&tmp)
    );
    assert!(
        files_under(&dir.path().join("blobs")).is_empty(),
        "a truncated blob was stored"
    );
}

#[tokio::test]
async fn executable_variant_is_made_once() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = EmbeddedBlobService::open(dir.path()).unwrap();
    let stored = blobs.put(&mut &b"#!/bin/sh\n"[..]).await.unwrap();
    let first = blobs
        .local_executable_path(&stored.digest)
        .await
        .unwrap()
        .unwrap();
    let second = blobs
        .local_executable_path(&stored.digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, second);
    let metadata = fs::metadata(&first).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o555);
    assert_ne!(
        metadata.ino(),
        fs::metadata(blobs.local_path(&stored.digest).await.unwrap().unwrap())
            .unwrap()
            .ino(),
        "a separate inode, so the 0444 blob keeps its mode"
    );
    assert!(blobs
        .local_executable_path(&B3Digest::of(b"absent"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn put_opened_copies_and_put_taken_renames_the_hashed_inode() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = EmbeddedBlobService::open(&dir.path().join("store")).unwrap();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let handle = Dir::open(&work).unwrap();
    let source = work.join("a-file");
    fs::write(&source, b"file contents").unwrap();
    let opened = handle.open_file(OsStr::new("a-file")).unwrap();
    let copied = blobs.put_opened(opened, &source).await.unwrap();
    assert_eq!(copied.digest, B3Digest::of(b"file contents"));
    assert!(source.exists(), "copy leaves the source");
    assert_eq!(
        fs::metadata(&source).unwrap().permissions().mode() & 0o777,
        0o644
    );

    let output = work.join("an-output");
    fs::write(&output, b"output contents").unwrap();
    fs::set_permissions(&output, fs::Permissions::from_mode(0o664)).unwrap();
    let inode = fs::metadata(&output).unwrap().ino();
    let name = OsStr::new("an-output");
    let file = handle.open_file(name).unwrap();
    let moved = blobs.put_taken(&handle, name, file, &output).await.unwrap();
    assert!(!output.exists(), "taking removes the file from the tree");
    let stored = blobs.local_path(&moved.digest).await.unwrap().unwrap();
    let meta = fs::metadata(&stored).unwrap();
    assert_eq!(meta.ino(), inode, "renamed, not copied");
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(
        (meta.uid(), meta.gid()),
        (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw()
        ),
        "owned by kiln's user"
    );

    // Taking content the store already has just drops the file.
    fs::write(&output, b"output contents").unwrap();
    let file = handle.open_file(name).unwrap();
    assert_eq!(
        blobs.put_taken(&handle, name, file, &output).await.unwrap(),
        moved
    );
    assert!(!output.exists());

    // A symlink is never opened as a file.
    std::os::unix::fs::symlink(&stored, work.join("link")).unwrap();
    assert!(handle.open_file(OsStr::new("link")).is_err());
}
