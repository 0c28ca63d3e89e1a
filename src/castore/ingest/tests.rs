//! Ingest's durability order: every blob of a tree is durable before any of
//! its directories is stored, and after an ingest answers everything it
//! stored is there and whole.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use futures::TryStreamExt;
use tokio::io::AsyncReadExt;

use super::{ingest, IngestError, IngestMode};
use crate::castore::blob::embedded::durable::recorder::Recorder;
use crate::castore::blob::embedded::EmbeddedBlobService;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::directory_service::{DirectoryError, DirectoryService};
use crate::castore::{B3Digest, Directory, Node, Store};

/// The redb store, noting for each put how many flushes the blob store
/// had made by then and which blobs were named.
struct Watched {
    inner: RedbDirectoryService,
    recorder: Arc<Recorder>,
    puts: Mutex<Vec<(usize, BTreeSet<u64>)>>,
}

#[async_trait::async_trait]
impl DirectoryService for Watched {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        self.inner.get(digest).await
    }

    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>> {
        self.inner.get_recursive(root)
    }

    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        let flushes = self.recorder.calls().len();
        let named = self.recorder.named();
        self.puts.lock().unwrap().push((flushes, named));
        self.inner.put_many(directories).await
    }
}

/// An embedded store under `dir/store` whose blob flushes are recorded
/// (and fail from the `fail_from`th on) and whose directory puts are
/// watched.
fn watched_store(dir: &Path, fail_from: Option<usize>) -> (Store, Arc<Recorder>, Arc<Watched>) {
    let data = dir.join("store");
    EmbeddedBlobService::open(&data).unwrap();
    let recorder = Arc::new(Recorder::new(&data, fail_from));
    let blobs = EmbeddedBlobService::open_with(&data, recorder.clone()).unwrap();
    let directories = Arc::new(Watched {
        inner: RedbDirectoryService::open(&data.join("directories.redb")).unwrap(),
        recorder: recorder.clone(),
        puts: Mutex::new(Vec::new()),
    });
    let store = Store {
        blobs: Arc::new(blobs),
        directories: directories.clone(),
    };
    (store, recorder, directories)
}

/// A small build output: nested directories, an executable, repeated
/// contents, an empty file, one large enough to be memory-mapped, a
/// symlink.
fn output(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("share/doc")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("share/doc/README"), b"read me\n").unwrap();
    fs::write(root.join("share/doc/COPY"), b"read me\n").unwrap();
    fs::write(root.join("share/empty"), b"").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(root.join("share/big.bin"), big).unwrap();
    std::os::unix::fs::symlink("share/doc/README", root.join("readme")).unwrap();
}

/// The digests and sizes of every file under the root node.
async fn files_of(store: &Store, root: &Node) -> Vec<(B3Digest, u64)> {
    let Node::Directory { digest, .. } = root else {
        panic!("the output is a directory")
    };
    let directories: Vec<Directory> = store
        .directories
        .get_recursive(digest)
        .try_collect()
        .await
        .unwrap();
    let mut files = Vec::new();
    for directory in &directories {
        for (_, node) in directory.nodes() {
            if let Node::File { digest, size, .. } = node {
                files.push((*digest, *size));
            }
        }
    }
    files
}

#[tokio::test]
async fn after_an_ingest_every_blob_is_readable_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = watched_store(dir.path(), None);
    let root = dir.path().join("out");
    output(&root);
    let node = ingest(&store, &root, IngestMode::Move).await.unwrap();
    let files = files_of(&store, &node).await;
    assert_eq!(files.len(), 5);
    for (digest, size) in files {
        let mut reader = store.blobs.open_read(&digest).await.unwrap().unwrap();
        let mut bytes = Vec::new();
        reader.reader.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(B3Digest::of(&bytes), digest, "the blob verifies");
    }
    assert!(!root.join("share/big.bin").exists(), "files were moved");
}

#[tokio::test]
async fn directories_are_stored_after_every_blob_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder, directories) = watched_store(dir.path(), None);
    let root = dir.path().join("out");
    output(&root);
    ingest(&store, &root, IngestMode::Move).await.unwrap();
    let puts = directories.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 1, "all directories in one put");
    let (flushes_before, named) = &puts[0];
    let calls = recorder.calls();
    assert_eq!(
        *flushes_before,
        calls.len(),
        "no blob flush after the directories were stored"
    );
    assert_eq!(named.len(), 4, "every distinct blob named by then");
    // Every name was flushed before the directories were stored: each
    // blob's shard directory after the blob was named.
    let blobs = dir.path().join("store/blobs");
    for shard in fs::read_dir(&blobs).unwrap() {
        let shard = shard.unwrap();
        let shard_ino = shard.metadata().unwrap().ino();
        for blob in fs::read_dir(shard.path()).unwrap() {
            let ino = blob.unwrap().metadata().unwrap().ino();
            assert!(calls.iter().any(|c| c.named.contains(&ino)
                && c.flushed
                    == crate::castore::blob::embedded::durable::recorder::Flushed::Fsync(
                        shard_ino
                    )));
        }
    }
}

#[tokio::test]
async fn an_ingest_failing_at_any_flush_stores_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder, _) = watched_store(dir.path(), None);
    output(&dir.path().join("out"));
    ingest(&store, &dir.path().join("out"), IngestMode::Move)
        .await
        .unwrap();
    let flushes = recorder.calls().len();

    for fail_from in 0..flushes {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, directories) = watched_store(dir.path(), Some(fail_from));
        let root = dir.path().join("out");
        output(&root);
        let result = ingest(&store, &root, IngestMode::Move).await;
        assert!(
            matches!(result, Err(IngestError::CommitFiles { .. })),
            "failing from flush {fail_from}: {result:?}"
        );
        assert!(
            directories.puts.lock().unwrap().is_empty(),
            "failing from flush {fail_from}: a directory was stored"
        );
    }
}
