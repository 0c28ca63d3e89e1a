//! The embedded store's durability: what a crash or a failed flush can
//! leave (only whole blobs under their digests), the order of flushes and
//! names, and the single put still flushing before it answers.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::batch::{Limits, Pending};
use super::durable::recorder::{Flushed, Recorder};
use super::durable::FSYNC_EACH_MAX;
use super::EmbeddedBlobService;
use crate::castore::blob::{BlobError, BlobService};
use crate::castore::digest::B3Digest;
use crate::hostfs::{Dir, RegularFile};

/// A store under `dir/store` whose flushes `recorder` sees (opened once
/// without it first, so the shard directories exist and opening flushes
/// nothing the recorder counts).
fn recorded_store(dir: &Path, fail_from: Option<usize>) -> (EmbeddedBlobService, Arc<Recorder>) {
    let data = dir.join("store");
    EmbeddedBlobService::open(&data).unwrap();
    let recorder = Arc::new(Recorder::new(&data, fail_from));
    let store = EmbeddedBlobService::open_with(&data, recorder.clone()).unwrap();
    (store, recorder)
}

/// `count` files of distinct contents in `dir/tree`, mode 0644.
fn tree(dir: &Path, count: usize) -> (PathBuf, Vec<Vec<u8>>) {
    let root = dir.join("tree");
    fs::create_dir_all(&root).unwrap();
    let contents: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("file number {i}\n").repeat(i + 1).into_bytes())
        .collect();
    for (i, bytes) in contents.iter().enumerate() {
        fs::write(root.join(format!("f{i:03}")), bytes).unwrap();
    }
    (root, contents)
}

fn opened(root: &Path, count: usize) -> (Arc<Dir>, Vec<(OsString, RegularFile)>) {
    let dir = Dir::open(root).unwrap();
    let files = (0..count)
        .map(|i| {
            let name = OsString::from(format!("f{i:03}"));
            let file = dir.open_regular(&name).unwrap();
            (name, file)
        })
        .collect();
    (Arc::new(dir), files)
}

/// Every file under `blobs/`: each must be whole, read-only and named by
/// the digest of its bytes. Answers their digests.
fn verified_blobs(store: &EmbeddedBlobService) -> BTreeSet<B3Digest> {
    let mut found = BTreeSet::new();
    for shard in fs::read_dir(&store.inner.blobs).unwrap() {
        for blob in fs::read_dir(shard.unwrap().path()).unwrap() {
            let blob = blob.unwrap();
            let bytes = fs::read(blob.path()).unwrap();
            let digest = B3Digest::of(&bytes);
            assert_eq!(
                blob.file_name().to_str().unwrap(),
                digest.to_hex(),
                "a blob's name is the digest of its bytes"
            );
            let mode = blob.metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o444);
            found.insert(digest);
        }
    }
    found
}

fn digests(contents: &[Vec<u8>]) -> BTreeSet<B3Digest> {
    contents.iter().map(|c| B3Digest::of(c)).collect()
}

/// Stages `count` taken files, `files_per_flush` at most before a flush,
/// then commits.
fn take_and_commit(
    store: &EmbeddedBlobService,
    root: &Path,
    count: usize,
    files_per_flush: usize,
) -> Result<(), BlobError> {
    let (parent, mut files) = opened(root, count);
    let mut pending = Pending::with_limits(Limits {
        files: files_per_flush,
    });
    while !files.is_empty() {
        let rest = files.split_off(files.len().min(3));
        let chunk = std::mem::replace(&mut files, rest);
        for answer in pending.put(store, Some(parent.clone()), chunk)? {
            answer?;
        }
    }
    pending.commit(store)
}

#[test]
fn after_a_commit_every_blob_is_named_whole_and_the_tree_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let (root, contents) = tree(dir.path(), 10);
    take_and_commit(&store, &root, 10, 4).unwrap();
    assert_eq!(verified_blobs(&store), digests(&contents));
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "taken files leave");
    assert!(recorder.calls().iter().all(|c| !c.failed));
}

#[test]
fn bytes_are_flushed_before_they_are_named_and_names_before_commit_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let (root, _) = tree(dir.path(), 10);
    take_and_commit(&store, &root, 10, 4).unwrap();
    let calls = recorder.calls();
    let mut flushed = BTreeSet::new();
    for call in &calls {
        // Whatever was named when this flush came had been flushed before.
        assert!(
            call.named.is_subset(&flushed),
            "a blob was named before its bytes were flushed: {call:?}"
        );
        match call.flushed {
            Flushed::Fsync(ino) => flushed.insert(ino),
            Flushed::Syncfs => panic!("ten files are flushed one by one"),
        };
    }
    // Each shard holding a blob was flushed after the blob was named.
    for shard in fs::read_dir(&store.inner.blobs).unwrap() {
        let shard = shard.unwrap();
        let ino = shard.metadata().unwrap().ino();
        for blob in fs::read_dir(shard.path()).unwrap() {
            let blob_ino = blob.unwrap().metadata().unwrap().ino();
            assert!(
                calls
                    .iter()
                    .any(|c| c.named.contains(&blob_ino) && c.flushed == Flushed::Fsync(ino)),
                "the name of {blob_ino} was never flushed"
            );
        }
    }
}

#[test]
fn a_batch_failing_at_any_flush_leaves_only_whole_blobs() {
    // How many flushes a successful run makes.
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let (root, _) = tree(dir.path(), 10);
    take_and_commit(&store, &root, 10, 4).unwrap();
    let flushes = recorder.calls().len();
    assert!(flushes > 10);

    for fail_from in 0..flushes {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = recorded_store(dir.path(), Some(fail_from));
        let (root, contents) = tree(dir.path(), 10);
        let result = take_and_commit(&store, &root, 10, 4);
        assert!(
            matches!(result, Err(BlobError::Durable(_))),
            "failing from flush {fail_from}: {result:?}"
        );
        let stored = verified_blobs(&store);
        assert!(stored.is_subset(&digests(&contents)));
        // A file leaves its tree only once its blob is named.
        for (i, bytes) in contents.iter().enumerate() {
            let in_tree = root.join(format!("f{i:03}")).exists();
            assert!(
                in_tree || stored.contains(&B3Digest::of(bytes)),
                "failing from flush {fail_from}: f{i:03} is neither in the tree nor stored"
            );
        }
        assert_eq!(
            fs::read_dir(store.inner.tmp.as_path()).unwrap().count(),
            0,
            "nothing left in blobs-tmp"
        );
    }
}

#[test]
fn a_failed_first_flush_names_nothing_and_leaves_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = recorded_store(dir.path(), Some(0));
    let (root, _) = tree(dir.path(), 5);
    assert!(take_and_commit(&store, &root, 5, 64).is_err());
    assert!(verified_blobs(&store).is_empty());
    assert_eq!(fs::read_dir(&root).unwrap().count(), 5);
}

#[test]
fn many_files_are_flushed_with_one_syncfs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let count = FSYNC_EACH_MAX + 10;
    let (root, contents) = tree(dir.path(), count);
    let (_, files) = opened(&root, count);
    let mut pending = Pending::with_limits(Limits { files: 4096 });
    for answer in pending.put(&store, None, files).unwrap() {
        answer.unwrap();
    }
    pending.commit(&store).unwrap();
    let calls = recorder.calls();
    assert_eq!(calls[0].flushed, Flushed::Syncfs, "{calls:?}");
    assert!(calls[0].named.is_empty(), "nothing named before the flush");
    assert_eq!(verified_blobs(&store), digests(&contents));
    assert_eq!(
        fs::read_dir(&root).unwrap().count(),
        count,
        "copying leaves the tree as it was"
    );
}

#[test]
fn repeated_contents_are_stored_once_and_all_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = recorded_store(dir.path(), None);
    let root = dir.path().join("tree");
    fs::create_dir(&root).unwrap();
    for name in ["f000", "f001", "f002"] {
        fs::write(root.join(name), b"the same bytes").unwrap();
    }
    take_and_commit(&store, &root, 3, 64).unwrap();
    assert_eq!(
        verified_blobs(&store),
        BTreeSet::from([B3Digest::of(b"the same bytes")])
    );
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    // Taking them again finds them stored.
    for name in ["f000", "f001"] {
        fs::write(root.join(name), b"the same bytes").unwrap();
    }
    take_and_commit(&store, &root, 2, 64).unwrap();
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
}

#[tokio::test]
async fn a_batch_refuses_more_after_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = recorded_store(dir.path(), Some(0));
    let (root, _) = tree(dir.path(), 2);
    let (_, files) = opened(&root, 2);
    let mut batch = store.batch();
    let mut files = files.into_iter();
    let first = files.next().into_iter().collect();
    batch.put_opened(first).await.unwrap();
    assert!(matches!(batch.commit().await, Err(BlobError::Durable(_))));
    let second = files.collect();
    assert!(matches!(
        batch.put_opened(second).await,
        Err(BlobError::BatchFailed)
    ));
}

#[tokio::test]
async fn a_single_put_flushes_its_bytes_then_its_name_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let stored = store.put(&mut &b"one blob"[..]).await.unwrap();
    let path = store.blob_path(&stored.digest);
    let blob = fs::metadata(&path).unwrap().ino();
    let shard = fs::metadata(path.parent().unwrap()).unwrap().ino();
    let calls = recorder.calls();
    assert_eq!(
        calls.iter().map(|c| c.flushed.clone()).collect::<Vec<_>>(),
        [Flushed::Fsync(blob), Flushed::Fsync(shard)]
    );
    assert!(!calls[0].named.contains(&blob), "named only once flushed");
    assert!(calls[1].named.contains(&blob));
}

#[tokio::test]
async fn a_single_put_fails_when_its_flush_does() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = recorded_store(dir.path(), Some(0));
    assert!(store.put(&mut &b"one blob"[..]).await.is_err());
    assert!(!store.has(&B3Digest::of(b"one blob")).await.unwrap());
}

#[tokio::test]
async fn put_opened_and_put_taken_flush_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = recorded_store(dir.path(), None);
    let (root, contents) = tree(dir.path(), 2);
    let (parent, mut files) = opened(&root, 2);
    let (taken_name, taken) = files.pop().unwrap();
    let (_, copied) = files.pop().unwrap();
    let origin = Path::new("origin");

    let stored = store.put_opened(copied.file, origin).await.unwrap();
    assert_eq!(stored.digest, B3Digest::of(&contents[0]));
    let stored = store
        .put_taken(&parent, &taken_name, taken.file, origin)
        .await
        .unwrap();
    assert_eq!(stored.digest, B3Digest::of(&contents[1]));
    assert!(!root.join(OsStr::new(&taken_name)).exists());

    let calls = recorder.calls();
    assert_eq!(calls.len(), 4, "bytes then name, twice: {calls:?}");
    for blob in &contents {
        let path = store.blob_path(&B3Digest::of(blob));
        let ino = fs::metadata(&path).unwrap().ino();
        let shard = fs::metadata(path.parent().unwrap()).unwrap().ino();
        let bytes_at = calls
            .iter()
            .position(|c| c.flushed == Flushed::Fsync(ino))
            .unwrap();
        let name_at = calls
            .iter()
            .position(|c| c.flushed == Flushed::Fsync(shard) && c.named.contains(&ino))
            .unwrap();
        assert!(!calls[bytes_at].named.contains(&ino));
        assert!(bytes_at < name_at);
    }
}

/// Waits (bounded) for the first count of the store to finish its walk.
async fn counted(store: &EmbeddedBlobService) -> crate::castore::blob::BlobStats {
    for _ in 0..500 {
        if let Some(stats) = store.stats() {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the blob count never finished its walk");
}

#[tokio::test]
async fn counts_each_distinct_blob_once_by_put_and_by_batch() {
    use crate::castore::blob::BlobStats;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedBlobService::open(tmp.path()).expect("open");
    store.put(&mut &b"before"[..]).await.expect("put");
    assert_eq!(counted(&store).await, BlobStats { blobs: 1, bytes: 6 });
    // The same bytes, eight times at once, and one old blob again.
    let puts = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.put(&mut &b"same bytes"[..]).await })
    });
    for put in puts {
        put.await.expect("join").expect("put");
    }
    store.put(&mut &b"before"[..]).await.expect("put again");
    assert_eq!(
        store.stats(),
        Some(BlobStats {
            blobs: 2,
            bytes: 16
        })
    );
    // A batch of host files: new ones counted, known ones not.
    let files = tmp.path().join("files");
    fs::create_dir(&files).expect("mkdir");
    let dir = Dir::open(&files).expect("open the directory");
    let mut opened = Vec::new();
    for (name, bytes) in [("a", &b"before"[..]), ("b", b"fresh!!"), ("c", b"fresh!!")] {
        fs::write(files.join(name), bytes).expect("write");
        let name = OsString::from(name);
        let file = dir.open_regular(&name).expect("open");
        opened.push((name, file));
    }
    let mut batch = store.batch();
    batch.put_opened(opened).await.expect("batch");
    batch.commit().await.expect("commit");
    assert_eq!(
        store.stats(),
        Some(BlobStats {
            blobs: 3,
            bytes: 23
        })
    );
}
