//! snix's `DirectoryNode.size` on trees kiln writes: a nested tree on disk
//! (root → lib → data → empty; files, an executable, a symlink, an empty
//! directory), ingested the way build outputs are, has the root digest
//! computed without kiln; a client following snix's rule, sending wire
//! messages it built itself, gets that same digest from kiln's server (so
//! the two deduplicate); and the tree read back recursively passes the
//! checks snix's validating `DirectoryService` makes.
//!
//! The pinned digests were computed independently of kiln, with Python and
//! the `blake3` PyPI package (blake3 1.x) over hand-assembled protobuf
//! bytes, each size by snix's rule (2 per entry plus each child directory's
//! size):
//!
//! ```text
//! from blake3 import blake3
//! def v(n):                                   # varint
//!     out = b""
//!     while n > 0x7F:
//!         out += bytes([n & 0x7F | 0x80]); n >>= 7
//!     return out + bytes([n])
//! def f(num, data): return v(num << 3 | 2) + v(len(data)) + data    # length-delimited
//! def u(num, n): return v(num << 3) + v(n) if n else b""            # varint, 0 omitted
//! def file(name, data, x=False):
//!     return f(1, name) + f(2, blake3(data).digest()) + u(3, len(data)) + u(4, x)
//! def sub(name, child, size): return f(1, name) + f(2, blake3(child).digest()) + u(3, size)
//! def link(name, target): return f(1, name) + f(2, target)
//! def directory(dirs=(), files=(), links=()):
//!     return (b"".join(f(1, d) for d in dirs) + b"".join(f(2, x) for x in files)
//!             + b"".join(f(3, s) for s in links))
//! empty = directory()                                                          # size 0
//! data = directory(dirs=[sub(b"empty", empty, 0)], files=[file(b"table", b"a b c\n")])  # 2+0 + 2 = 4
//! lib = directory(dirs=[sub(b"data", data, 4)], links=[link(b"link", b"../bin/tool")])  # 2+4 + 2 = 8
//! bin_ = directory(files=[file(b"tool", b"#!/bin/sh\necho tool\n", True)])             # 2
//! root = directory(dirs=[sub(b"bin", bin_, 2), sub(b"lib", lib, 8)],
//!                  files=[file(b"README", b"kiln and snix agree\n")])                  # 2+2 + 2+8 + 2 = 16
//! for d in (root, lib, data): print(blake3(d).hexdigest())
//! ```
//!
//! The same encoder reproduces the one-file and nested digests pinned in
//! `castore_wire.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use futures::TryStreamExt;
use kiln::castore::{from_addr, grpc_services, ingest, B3Digest, IngestMode, Node, Store};
use kiln::proto::{snix_castore, tvix_castore};
use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;

/// The root directory's digest.
const ROOT: &str = "fe06ba309c9b9ea1857a55c72b5a1c8517299365c4aa4386219ae496e70356cb";
/// The size in the root's own node: 2 + 2 (bin) + 2 + 8 (lib) + 2 (README).
const ROOT_SIZE: u64 = 16;
/// `lib`, two levels down the tree.
const LIB: &str = "b06fb60a83b050dc91ed3e7957a6575adc58068bf6f31cbc35da898b9c6fddc2";
/// `lib/data`, holding the empty directory.
const DATA: &str = "27300d6ed119940981e5aee1151429ada7b0732d726ffae951423e7abd71f5b9";

const README: &[u8] = b"kiln and snix agree\n";
const TOOL: &[u8] = b"#!/bin/sh\necho tool\n";
const TABLE: &[u8] = b"a b c\n";

fn write(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The tree on disk.
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("lib/data/empty")).unwrap();
    write(&root.join("README"), README, 0o644);
    write(&root.join("bin/tool"), TOOL, 0o755);
    write(&root.join("lib/data/table"), TABLE, 0o644);
    std::os::unix::fs::symlink("../bin/tool", root.join("lib/link")).unwrap();
}

/// snix's size of a directory, from its wire lists alone: 2 per entry plus
/// the size recorded for each child directory.
fn snix_size(directory: &tvix_castore::Directory) -> u64 {
    let entries = directory.directories.len() + directory.files.len() + directory.symlinks.len();
    let children: u64 = directory.directories.iter().map(|d| d.size).sum();
    2 * entries as u64 + children
}

/// A pinned digest as wire bytes.
fn pinned(hex: &str) -> Bytes {
    hex.parse::<B3Digest>().unwrap().to_bytes()
}

fn digest_of(directory: &tvix_castore::Directory) -> Bytes {
    B3Digest::of(&directory.encode_to_vec()).to_bytes()
}

fn file(name: &str, contents: &[u8], executable: bool) -> tvix_castore::FileNode {
    tvix_castore::FileNode {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: B3Digest::of(contents).to_bytes(),
        size: contents.len() as u64,
        executable,
    }
}

fn sub(name: &str, child: &tvix_castore::Directory) -> tvix_castore::DirectoryNode {
    tvix_castore::DirectoryNode {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: digest_of(child),
        size: snix_size(child),
    }
}

/// The tree as a client following snix's rule describes it, leaves first.
fn client_tree() -> Vec<tvix_castore::Directory> {
    let empty = tvix_castore::Directory::default();
    let data = tvix_castore::Directory {
        directories: vec![sub("empty", &empty)],
        files: vec![file("table", TABLE, false)],
        ..Default::default()
    };
    let lib = tvix_castore::Directory {
        directories: vec![sub("data", &data)],
        symlinks: vec![tvix_castore::SymlinkNode {
            name: "link".into(),
            target: "../bin/tool".into(),
        }],
        ..Default::default()
    };
    let bin = tvix_castore::Directory {
        files: vec![file("tool", TOOL, true)],
        ..Default::default()
    };
    let root = tvix_castore::Directory {
        directories: vec![sub("bin", &bin), sub("lib", &lib)],
        files: vec![file("README", README, false)],
        ..Default::default()
    };
    vec![empty, data, lib, bin, root]
}

/// What snix's validating `DirectoryService` checks on a recursive read:
/// the root comes first, every later directory is referenced by one already
/// received, and every `DirectoryNode.size` equals the snix size of the
/// directory it names.
fn validate_like_snix(root: &B3Digest, received: &[tvix_castore::Directory]) {
    let mut referenced: HashMap<Bytes, u64> = HashMap::new();
    for (index, directory) in received.iter().enumerate() {
        let digest = digest_of(directory);
        if index == 0 {
            assert_eq!(digest, root.to_bytes(), "root first");
        } else {
            let Some(size) = referenced.get(&digest) else {
                panic!("directory #{index} not referenced by an earlier one");
            };
            assert_eq!(*size, snix_size(directory), "size of directory #{index}");
        }
        for child in &directory.directories {
            referenced.insert(child.digest.clone(), child.size);
        }
    }
}

async fn embedded(dir: &Path) -> Store {
    from_addr("", dir).await.unwrap()
}

#[tokio::test]
async fn ingest_writes_snix_sizes_and_the_independent_digest() {
    let work = tempfile::tempdir().unwrap();
    let root: B3Digest = ROOT.parse().unwrap();
    // Copy (`kiln castore import`, the closure import) and Move (build
    // outputs) go through one walk; both must land on the pinned digest.
    for (mode, label) in [(IngestMode::Copy, "copy"), (IngestMode::Move, "move")] {
        let tree = work.path().join(format!("tree-{label}"));
        sample_tree(&tree);
        let store = embedded(&work.path().join(format!("store-{label}"))).await;
        let node = ingest(&store, &tree, mode).await.unwrap();
        assert_eq!(
            node,
            Node::Directory {
                digest: root,
                size: ROOT_SIZE
            },
            "{label}"
        );

        let received: Vec<tvix_castore::Directory> = store
            .directories
            .get_recursive(&root)
            .map_ok(|d| tvix_castore::Directory::from(&d))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(received.len(), 5, "root, bin, lib, data, empty");
        validate_like_snix(&root, &received);
        let digests: Vec<Bytes> = received.iter().map(digest_of).collect();
        assert!(digests.contains(&pinned(LIB)), "{label}: lib");
        assert!(digests.contains(&pinned(DATA)), "{label}: lib/data");
    }
}

#[tokio::test]
async fn a_client_following_snix_rule_gets_the_same_digest() {
    let tree = client_tree();
    let root = tree.last().unwrap();
    assert_eq!(snix_size(root), ROOT_SIZE);
    assert_eq!(digest_of(root), pinned(ROOT));
    assert_eq!(digest_of(&tree[2]), pinned(LIB));
    assert_eq!(digest_of(&tree[1]), pinned(DATA));

    // Both packages carry the same bytes.
    for directory in &tree {
        let bytes = directory.encode_to_vec();
        let snix = snix_castore::Directory::decode(bytes.as_slice()).unwrap();
        assert_eq!(snix.encode_to_vec(), bytes);
    }

    // kiln's server takes the client's tree under snix's package and answers
    // the digest its own ingest gives the same tree on disk: one root, so
    // the two deduplicate.
    let work = tempfile::tempdir().unwrap();
    let store = embedded(&work.path().join("store")).await;
    let disk = work.path().join("tree");
    sample_tree(&disk);
    let ingested = ingest(&store, &disk, IngestMode::Copy).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let router = grpc_services(store.clone()).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    let mut client =
        snix_castore::directory_service_client::DirectoryServiceClient::connect(address)
            .await
            .unwrap();
    let sent: Vec<snix_castore::Directory> = tree
        .iter()
        .map(|d| snix_castore::Directory::decode(d.encode_to_vec().as_slice()).unwrap())
        .collect();
    let answer = client
        .put(futures::stream::iter(sent))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.root_digest, pinned(ROOT));
    assert!(
        matches!(ingested, Node::Directory { digest, .. } if digest.to_bytes() == answer.root_digest)
    );
}
