//! NAR serialisation and hashing against real Nix: `nix-store --dump` must
//! produce the same bytes as kiln's host-path NAR, `nix-hash` the same hash,
//! and the castore-tree NAR must equal the host-path NAR for the same tree.
//! Skips loudly where Nix is not installed.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use async_trait::async_trait;
use kiln::castore::{B3Digest, Directory, Node, PathComponent, SymlinkTarget};
use kiln::nix::nar::{self, BlobRead, SourceError, TreeSource};

/// Whether `nix-store` runs here; says `SKIPPED:` for the comparison with
/// Nix when it does not.
fn nix_available() -> bool {
    let found = Command::new("nix-store").arg("--version").output().is_ok();
    if !found {
        harness::skip(
            "the comparison with Nix: `nix-store` is not installed (apt-get install nix-bin)",
        );
    }
    found
}

/// Every kind of node NAR knows, and file sizes around the 8-byte padding.
fn fixture_tree(root: &Path) {
    std::fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    for len in [1usize, 7, 8, 9, 15, 16, 17] {
        std::fs::write(root.join(format!("len-{len}")), vec![b'x'; len]).unwrap();
    }
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("nested/big"), &big).unwrap();
    std::fs::write(root.join("nested/deeper/deepest/leaf"), b"leaf\n").unwrap();
    let exe = root.join("nested/run.sh");
    std::fs::write(&exe, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("nested/deeper", root.join("link-to-dir")).unwrap();
    symlink("/does/not/exist", root.join("dangling")).unwrap();
    symlink("../len-1", root.join("nested/up")).unwrap();
    // Names that sort differently as bytes than case-insensitively.
    std::fs::write(root.join("B"), b"upper").unwrap();
    std::fs::write(root.join("a"), b"lower").unwrap();
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-store --dump: {out:?}");
    out.stdout
}

fn nix_hash(path: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-hash: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn host_nar_equals_nix_store_dump() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fixture_tree(&root);
    let cases = [
        root.clone(),
        root.join("empty-dir"),
        root.join("empty-file"),
        root.join("len-9"),
        root.join("nested/run.sh"),
        root.join("link-to-dir"),
    ];
    for path in cases {
        let mut ours = Vec::new();
        nar::write_path_nar(&path, &mut ours).unwrap();
        assert_eq!(ours, nix_dump(&path), "NAR bytes differ for {path:?}");
        let hash = nar::nar_hash_path(&path).unwrap();
        assert_eq!(
            hash.to_nixbase32(),
            nix_hash(&path),
            "hash differs for {path:?}"
        );
        assert_eq!(hash.size, ours.len() as u64);
    }
}

/// An in-memory castore, filled by walking a host path: enough to check the
/// streaming castore NAR without depending on the store backends.
#[derive(Default)]
struct MemoryTree {
    directories: Mutex<HashMap<B3Digest, Directory>>,
    blobs: Mutex<HashMap<B3Digest, Vec<u8>>>,
}

impl MemoryTree {
    fn ingest(&self, path: &Path) -> Node {
        let meta = std::fs::symlink_metadata(path).unwrap();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).unwrap();
            let target = SymlinkTarget::try_from(target.as_os_str().as_bytes()).unwrap();
            return Node::Symlink { target };
        }
        if meta.is_file() {
            let data = std::fs::read(path).unwrap();
            let digest = B3Digest::of(&data);
            let size = data.len() as u64;
            self.blobs.lock().unwrap().insert(digest, data);
            return Node::File {
                digest,
                size,
                executable: meta.permissions().mode() & 0o100 != 0,
            };
        }
        let mut directory = Directory::new();
        for entry in std::fs::read_dir(path).unwrap() {
            let entry = entry.unwrap();
            let name = PathComponent::try_from(entry.file_name().as_bytes()).unwrap();
            directory.add(name, self.ingest(&entry.path())).unwrap();
        }
        let node = directory.as_node();
        self.directories
            .lock()
            .unwrap()
            .insert(directory.digest(), directory);
        node
    }
}

#[async_trait]
impl TreeSource for MemoryTree {
    async fn directory(&self, digest: &B3Digest) -> Result<Option<Directory>, SourceError> {
        Ok(self.directories.lock().unwrap().get(digest).cloned())
    }

    async fn blob(&self, digest: &B3Digest) -> Result<Option<BlobRead>, SourceError> {
        let data = self.blobs.lock().unwrap().get(digest).cloned();
        Ok(data.map(|d| Box::pin(std::io::Cursor::new(d)) as BlobRead))
    }
}

#[tokio::test]
async fn castore_nar_equals_host_nar() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fixture_tree(&root);
    let tree = MemoryTree::default();
    for path in [
        root.clone(),
        root.join("empty-dir"),
        root.join("nested/run.sh"),
    ] {
        let node = tree.ingest(&path);
        let mut from_castore = Vec::new();
        nar::write_nar(&tree, &node, &mut from_castore)
            .await
            .unwrap();
        let mut from_host = Vec::new();
        nar::write_path_nar(&path, &mut from_host).unwrap();
        assert_eq!(from_castore, from_host, "{path:?}");
        let hash = nar::nar_hash(&tree, &node).await.unwrap();
        assert_eq!(hash, nar::nar_hash_path(&path).unwrap());
    }
}

#[tokio::test]
async fn castore_nar_reports_broken_trees() {
    let tree = MemoryTree::default();
    let data = b"four".to_vec();
    let digest = B3Digest::of(&data);
    tree.blobs.lock().unwrap().insert(digest, data);
    let lying = Node::File {
        digest,
        size: 5,
        executable: false,
    };
    let err = nar::nar_hash(&tree, &lying).await.unwrap_err();
    assert!(
        matches!(
            err,
            nar::NarError::BlobSize {
                expected: 5,
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
    let missing = Node::Directory {
        digest: B3Digest::of(b"nothing"),
        size: 0,
    };
    let err = nar::nar_hash(&tree, &missing).await.unwrap_err();
    assert!(matches!(err, nar::NarError::MissingDirectory(_)), "{err}");
}

/// The real castore: ingest the fixture into an embedded store, then hash
/// the NAR streamed out of it and compare with Nix.
#[tokio::test]
async fn embedded_store_nar_hash_equals_nix_hash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fixture_tree(&root);
    let store = kiln::castore::from_addr::embedded(&dir.path().join("store")).unwrap();
    let node = kiln::castore::ingest(&store, &root, kiln::castore::IngestMode::Copy)
        .await
        .unwrap();
    let hash = nar::nar_hash(&store, &node).await.unwrap();
    assert_eq!(hash, nar::nar_hash_path(&root).unwrap());
    if nix_available() {
        assert_eq!(hash.to_nixbase32(), nix_hash(&root));
    }
}

/// Fixed outputs are checked like Nix checks them: flat sha256 of the file,
/// or sha256 of the NAR for `r:sha256` (every algorithm and form is in
/// `kiln::nix::fixed_output`'s unit tests).
#[tokio::test]
async fn fixed_output_hashes_are_checked() {
    use kiln::nix::derivation::Output;
    use kiln::nix::fixed_output::{verify, FixedOutputError};

    let dir = tempfile::tempdir().unwrap();
    let store = kiln::castore::from_addr::embedded(&dir.path().join("store")).unwrap();
    let file = dir.path().join("fixed");
    std::fs::write(&file, b"fixed\n").unwrap();
    let node = kiln::castore::ingest(&store, &file, kiln::castore::IngestMode::Copy)
        .await
        .unwrap();
    let declared = |algo: &str, hash: &str| Output {
        path: None,
        hash_algorithm: algo.to_owned(),
        hash: hash.to_owned(),
    };
    // `echo fixed | sha256sum`, as in conformance.nix's fixed derivation.
    let flat = "0c3071418e6356e614898c84ed064ca95e88551bc0811b534bdf1952ecdae534";
    verify(&store, &declared("sha256", flat), &node)
        .await
        .unwrap();
    let recursive = nar::nar_hash_path(&file).unwrap().to_hex();
    verify(&store, &declared("r:sha256", &recursive), &node)
        .await
        .unwrap();
    let err = verify(&store, &declared("sha256", &recursive), &node)
        .await
        .unwrap_err();
    assert!(matches!(err, FixedOutputError::Mismatch { .. }), "{err}");
    let err = verify(&store, &declared("sha3", flat), &node)
        .await
        .unwrap_err();
    assert!(matches!(err, FixedOutputError::Algorithm { .. }), "{err}");

    let tree = dir.path().join("tree");
    fixture_tree(&tree);
    let tree_node = kiln::castore::ingest(&store, &tree, kiln::castore::IngestMode::Copy)
        .await
        .unwrap();
    let err = verify(&store, &declared("sha256", flat), &tree_node)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FixedOutputError::NotAFile {
                kind: "directory",
                ..
            }
        ),
        "{err}"
    );
}
