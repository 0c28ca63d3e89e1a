//! gRPC round trips against a real tonic server on 127.0.0.1:0 (and a unix
//! socket), for both package names, plus the remote backend talking to it.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use kiln::castore::{from_addr, grpc_services, B3Digest, Directory, Node, PathComponent, Store};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::Code;

/// Serves an embedded store in `dir` on a fresh TCP port; answers the address.
async fn serve_tcp(dir: &Path) -> (Store, String) {
    let store = from_addr("", dir).await.expect("embedded store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = grpc_services(store.clone()).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    (store, format!("http://{address}"))
}

fn name(text: &str) -> PathComponent {
    PathComponent::try_from(text).unwrap()
}

/// A leaf with one file and a root holding the leaf and a symlink.
fn two_level_tree(file_digest: B3Digest, file_size: u64) -> (Directory, Directory) {
    let mut leaf = Directory::new();
    let file = Node::File {
        digest: file_digest,
        size: file_size,
        executable: true,
    };
    leaf.add(name("data.bin"), file).unwrap();
    let mut root = Directory::new();
    root.add(name("leaf"), leaf.as_node()).unwrap();
    let target = b"leaf/data.bin"[..].try_into().unwrap();
    root.add(name("link"), Node::Symlink { target }).unwrap();
    (leaf, root)
}

fn big_blob() -> Vec<u8> {
    (0..200 * 1024u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// The same scenario through one package's generated client.
macro_rules! round_trip {
    ($test:ident, $pkg:ident) => {
        #[tokio::test]
        async fn $test() {
            use kiln::proto::$pkg as pkg;
            use pkg::blob_service_client::BlobServiceClient;
            use pkg::directory_service_client::DirectoryServiceClient;
            use pkg::get_directory_request::ByWhat;

            let dir = tempfile::tempdir().unwrap();
            let (_store, address) = serve_tcp(dir.path()).await;
            let mut blobs = BlobServiceClient::connect(address.clone()).await.unwrap();
            let mut directories = DirectoryServiceClient::connect(address).await.unwrap();

            // Put a blob in three uneven chunks.
            let data = big_blob();
            let chunks: Vec<pkg::BlobChunk> =
                [&data[..1000], &data[1000..150_000], &data[150_000..]]
                    .iter()
                    .map(|part| pkg::BlobChunk {
                        data: Bytes::copy_from_slice(part),
                    })
                    .collect();
            let put = blobs
                .put(futures::stream::iter(chunks))
                .await
                .unwrap()
                .into_inner();
            let digest = B3Digest::of(&data);
            assert_eq!(put.digest, digest.to_bytes());

            // Stat and read it back, in chunks of at most 64 KiB.
            let stat = pkg::StatBlobRequest {
                digest: digest.to_bytes(),
                ..Default::default()
            };
            blobs
                .stat(stat.clone())
                .await
                .expect("stat of a stored blob");
            let read = pkg::ReadBlobRequest {
                digest: digest.to_bytes(),
            };
            let mut stream = blobs.read(read).await.unwrap().into_inner();
            let mut back = Vec::new();
            let mut count = 0;
            while let Some(chunk) = stream.message().await.unwrap() {
                assert!(chunk.data.len() <= 64 * 1024);
                back.extend_from_slice(&chunk.data);
                count += 1;
            }
            assert_eq!(back, data);
            assert!(count >= 4, "read came in {count} chunks");

            // Bad and unknown digests.
            let short = pkg::StatBlobRequest {
                digest: Bytes::from(vec![1u8; 31]),
                ..Default::default()
            };
            let status = blobs.stat(short).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(status.message(), "digest: 31 bytes, want 32");
            let unknown = B3Digest::of(b"never stored");
            let status = blobs
                .read(pkg::ReadBlobRequest {
                    digest: unknown.to_bytes(),
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound);
            assert!(
                status.message().contains(&unknown.to_hex()),
                "{}",
                status.message()
            );
            let status = blobs
                .stat(pkg::StatBlobRequest {
                    digest: unknown.to_bytes(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound);

            // Directories, leaves first.
            let (leaf, root) = two_level_tree(digest, data.len() as u64);
            let sent = vec![pkg::Directory::from(&leaf), pkg::Directory::from(&root)];
            let answer = directories
                .put(futures::stream::iter(sent))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(answer.root_digest, root.digest().to_bytes());

            // Get recursive: root first, then the leaf.
            let get = |recursive| pkg::GetDirectoryRequest {
                by_what: Some(ByWhat::Digest(root.digest().to_bytes())),
                recursive,
            };
            let mut stream = directories.get(get(true)).await.unwrap().into_inner();
            let mut received = Vec::new();
            while let Some(directory) = stream.message().await.unwrap() {
                received.push(Directory::try_from(directory).unwrap());
            }
            assert_eq!(received, vec![root.clone(), leaf.clone()]);
            let mut stream = directories.get(get(false)).await.unwrap().into_inner();
            assert_eq!(
                Directory::try_from(stream.message().await.unwrap().unwrap()).unwrap(),
                root
            );
            assert!(stream.message().await.unwrap().is_none());

            // A parent whose child is unknown is refused, naming the child.
            let (orphan_leaf, orphan_root) = two_level_tree(B3Digest::of(b"other"), 5);
            let status = directories
                .put(futures::stream::iter(vec![pkg::Directory::from(
                    &orphan_root,
                )]))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains(&orphan_leaf.digest().to_hex()),
                "{}",
                status.message()
            );

            // An invalid directory is refused, naming where.
            let mut unsorted = pkg::Directory::from(&leaf);
            unsorted.files.push(unsorted.files[0].clone());
            let status = directories
                .put(futures::stream::iter(vec![unsorted]))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(
                status.message(),
                "directory #0.files[1].name: duplicate name \"data.bin\""
            );

            // Get: unknown, malformed, unset.
            let unknown_dir = pkg::GetDirectoryRequest {
                by_what: Some(ByWhat::Digest(unknown.to_bytes())),
                recursive: true,
            };
            let status = directories.get(unknown_dir).await.unwrap_err();
            assert_eq!(status.code(), Code::NotFound);
            assert!(status.message().contains(&unknown.to_hex()));
            let short_dir = pkg::GetDirectoryRequest {
                by_what: Some(ByWhat::Digest(Bytes::from_static(b"short"))),
                recursive: false,
            };
            let status = directories.get(short_dir).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(status.message(), "digest: 5 bytes, want 32");
            let unset = pkg::GetDirectoryRequest {
                by_what: None,
                recursive: false,
            };
            assert_eq!(
                directories.get(unset).await.unwrap_err().code(),
                Code::InvalidArgument
            );
            let status = directories
                .put(futures::stream::iter(Vec::<pkg::Directory>::new()))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);

            // And the server still serves.
            blobs.stat(stat).await.expect("still serving after errors");
        }
    };
}

round_trip!(tvix_package_round_trip, tvix_castore);
round_trip!(snix_package_round_trip, snix_castore);

#[tokio::test]
async fn packages_share_one_store() {
    use kiln::proto::{snix_castore, tvix_castore};
    let dir = tempfile::tempdir().unwrap();
    let (_store, address) = serve_tcp(dir.path()).await;
    let mut tvix = tvix_castore::blob_service_client::BlobServiceClient::connect(address.clone())
        .await
        .unwrap();
    let mut snix = snix_castore::blob_service_client::BlobServiceClient::connect(address)
        .await
        .unwrap();
    let chunk = tvix_castore::BlobChunk {
        data: Bytes::from_static(b"shared"),
    };
    let digest = tvix
        .put(futures::stream::iter(vec![chunk]))
        .await
        .unwrap()
        .into_inner()
        .digest;
    let stat = snix_castore::StatBlobRequest {
        digest,
        ..Default::default()
    };
    snix.stat(stat)
        .await
        .expect("put through tvix, visible through snix");
}

/// Stores a tree through `remote`, reads it back through it, and checks the
/// server's own store holds the same.
async fn exercise_remote(remote: &Store, server_store: &Store) {
    let data = big_blob();
    let stored = remote.blobs.put(&mut &data[..]).await.unwrap();
    assert_eq!(stored.digest, B3Digest::of(&data));
    assert_eq!(stored.size, data.len() as u64);
    assert!(remote.blobs.has(&stored.digest).await.unwrap());
    assert!(server_store.blobs.has(&stored.digest).await.unwrap());
    assert!(!remote.blobs.has(&B3Digest::of(b"nope")).await.unwrap());
    assert!(remote
        .blobs
        .open_read(&B3Digest::of(b"nope"))
        .await
        .unwrap()
        .is_none());
    let mut blob = remote
        .blobs
        .open_read(&stored.digest)
        .await
        .unwrap()
        .unwrap();
    let mut back = Vec::new();
    blob.reader.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);

    let (leaf, root) = two_level_tree(stored.digest, stored.size);
    let root_digest = remote
        .directories
        .put_many(vec![leaf.clone(), root.clone()])
        .await
        .unwrap();
    assert_eq!(root_digest, root.digest());
    assert_eq!(
        remote.directories.get(&root_digest).await.unwrap(),
        Some(root.clone())
    );
    assert_eq!(
        server_store.directories.get(&leaf.digest()).await.unwrap(),
        Some(leaf.clone())
    );
    let all: Vec<Directory> =
        futures::TryStreamExt::try_collect(remote.directories.get_recursive(&root_digest))
            .await
            .unwrap();
    assert_eq!(all, vec![root.clone(), leaf]);
    assert_eq!(
        remote
            .directories
            .get(&B3Digest::of(b"nope"))
            .await
            .unwrap(),
        None
    );

    // The remote refuses a parent whose child is unknown, and we see why.
    let (_, orphan_root) = two_level_tree(B3Digest::of(b"other"), 5);
    let err = remote.directories.put(orphan_root).await.unwrap_err();
    let kiln::castore::directory_service::DirectoryError::RemotePut(status) = &err else {
        panic!("want RemotePut, got {err:?}");
    };
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn remote_backend_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let (server_store, address) = serve_tcp(dir.path()).await;
    let address = address.replace("http://", "grpc+http://");
    let remote = from_addr(&address, Path::new("/nonexistent"))
        .await
        .unwrap();
    exercise_remote(&remote, &server_store).await;
}

#[tokio::test]
async fn remote_backend_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server_store = from_addr("embedded", dir.path()).await.unwrap();
    let socket = dir.path().join("castore.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let router =
        grpc_services(server_store.clone()).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
    let remote = from_addr(
        &format!("grpc+unix:{}", socket.display()),
        Path::new("/nonexistent"),
    )
    .await
    .unwrap();
    exercise_remote(&remote, &server_store).await;
}

#[tokio::test]
async fn addresses_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "ftp://x",
        "grpc+http://",
        "grpc+unix:relative.sock",
        "embedded:relative",
    ] {
        let err = from_addr(bad, dir.path()).await.err().expect("refused");
        assert!(err.to_string().contains(bad), "{err}");
    }
    let unreachable = from_addr("grpc+unix:/nonexistent/kiln.sock", dir.path()).await;
    assert!(unreachable.is_err());
}

#[tokio::test]
async fn directories_larger_than_4_mib_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (_server_store, address) = serve_tcp(dir.path()).await;
    let remote = from_addr(
        &address.replace("http://", "grpc+http://"),
        Path::new("/nonexistent"),
    )
    .await
    .unwrap();
    let mut huge = Directory::new();
    for i in 0..100_000u32 {
        let node = Node::File {
            digest: B3Digest::of(&i.to_le_bytes()),
            size: u64::from(i),
            executable: false,
        };
        huge.add(name(&format!("file-{i:06}")), node).unwrap();
    }
    assert!(huge.encode().len() > 4 * 1024 * 1024);
    let digest = remote.directories.put(huge.clone()).await.unwrap();
    assert_eq!(remote.directories.get(&digest).await.unwrap(), Some(huge));
}
