//! The cache's rules against an in-memory object store.

use std::io::Write;
use std::sync::Arc;

use ::object_store::memory::InMemory;
use ::object_store::{ObjectStoreExt, PutPayload};
use tokio::io::AsyncReadExt;

use super::*;

struct Rig {
    service: CachedBlobService,
    remote: ObjectStoreBlobs,
    dir: tempfile::TempDir,
}

fn rig(budget: u64) -> Rig {
    let remote = ObjectStoreBlobs::new(Arc::new(InMemory::new()), "p", "memory".into());
    let dir = tempfile::tempdir().unwrap();
    let service =
        CachedBlobService::open(remote.clone(), &dir.path().join("cache"), budget).unwrap();
    Rig {
        service,
        remote,
        dir,
    }
}

fn other_host(rig: &Rig, budget: u64) -> CachedBlobService {
    CachedBlobService::open(rig.remote.clone(), &rig.dir.path().join("other"), budget).unwrap()
}

async fn read_all(service: &CachedBlobService, digest: &B3Digest) -> Vec<u8> {
    let mut blob = service.open_read(digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    blob.reader.read_to_end(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_put_is_remote_then_cached_and_another_host_fetches_it() {
    let rig = rig(1 << 30);
    let stored = rig.service.put(&mut &b"shared bytes"[..]).await.unwrap();
    assert!(rig.remote.has(&stored.digest).await.unwrap());
    assert!(rig.service.inner.cache.has(&stored.digest).await.unwrap());

    let other = other_host(&rig, 1 << 30);
    assert!(other.has(&stored.digest).await.unwrap());
    assert!(!other.inner.cache.has(&stored.digest).await.unwrap());
    assert_eq!(read_all(&other, &stored.digest).await, b"shared bytes");
    // A read streams; only a local path fetches into the cache.
    assert!(!other.inner.cache.has(&stored.digest).await.unwrap());
    let path = other.local_path(&stored.digest).await.unwrap().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"shared bytes");
    let exe = other
        .local_executable_path(&stored.digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fs::read(exe).unwrap(), b"shared bytes");
    assert_eq!(other.cached_bytes(), 2 * 12);
    assert!(other
        .local_path(&B3Digest::of(b"absent"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn concurrent_fetches_share_one_download() {
    let rig = rig(1 << 30);
    let data = vec![7u8; 3 << 20];
    let stored = rig.service.put(&mut &data[..]).await.unwrap();
    let other = other_host(&rig, 1 << 30);
    let fetches = (0..8).map(|_| other.local_path(&stored.digest));
    let paths = futures::future::join_all(fetches).await;
    for path in paths {
        assert_eq!(
            path.unwrap().unwrap(),
            other.inner.cache.blob_path(&stored.digest)
        );
    }
    assert_eq!(other.cached_bytes(), 3 << 20);
    assert!(other.inner.fetches.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_corrupt_object_is_refused_and_not_cached() {
    let rig = rig(1 << 30);
    let digest = B3Digest::of(b"what should be there");
    rig.remote
        .store()
        .put(
            &rig.remote.key(&digest),
            PutPayload::from_static(b"garbage"),
        )
        .await
        .unwrap();
    let err = rig.service.local_path(&digest).await.unwrap_err();
    assert!(matches!(err, BlobError::Fetch { .. }), "{err:?}");
    assert!(!rig.service.inner.cache.has(&digest).await.unwrap());
    assert_eq!(rig.service.cached_bytes(), 0);
    let tmp = rig.dir.path().join("cache/blobs-tmp");
    assert_eq!(fs::read_dir(tmp).unwrap().count(), 0);
}

#[tokio::test]
async fn the_least_recently_used_blobs_go_over_budget() {
    let rig = rig(25);
    let a = rig.service.put(&mut &[b'a'; 10][..]).await.unwrap();
    let b = rig.service.put(&mut &[b'b'; 10][..]).await.unwrap();
    // a is used again, so b is now the oldest.
    assert!(rig.service.local_path(&a.digest).await.unwrap().is_some());
    let c = rig.service.put(&mut &[b'c'; 10][..]).await.unwrap();
    let cache = &rig.service.inner.cache;
    assert!(cache.has(&a.digest).await.unwrap());
    assert!(!cache.has(&b.digest).await.unwrap());
    assert!(cache.has(&c.digest).await.unwrap());
    assert_eq!(rig.service.cached_bytes(), 20);
    // Evicted from the cache only: still in the store, fetched back.
    assert!(rig.service.has(&b.digest).await.unwrap());
    assert!(rig.service.local_path(&b.digest).await.unwrap().is_some());
    assert!(!cache.has(&a.digest).await.unwrap());

    // Reopened, the cache learns its size back and keeps to the budget.
    drop(rig.service);
    let reopened =
        CachedBlobService::open(rig.remote.clone(), &rig.dir.path().join("cache"), 10).unwrap();
    assert_eq!(reopened.cached_bytes(), 10);
}

#[tokio::test]
async fn a_batch_uploads_everything_before_naming_it() {
    let rig = rig(1 << 30);
    let tree = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for i in 0..20u8 {
        let name = format!("f{i}");
        let mut f = fs::File::create(tree.path().join(&name)).unwrap();
        f.write_all(&vec![i; 1000 + usize::from(i)]).unwrap();
        files.push(name);
    }
    let dir = Dir::open(tree.path()).unwrap();
    let opened = files
        .iter()
        .map(|n| (OsString::from(n), dir.open_regular(OsStr::new(n)).unwrap()))
        .collect();
    let mut batch = rig.service.batch();
    let answers = batch.put_taken(&dir, opened).await.unwrap();
    let digests: Vec<_> = answers.into_iter().map(|a| a.unwrap().digest).collect();
    for d in &digests {
        assert!(!rig.remote.has(d).await.unwrap());
        assert!(!rig.service.inner.cache.has(d).await.unwrap());
    }
    assert_eq!(fs::read_dir(tree.path()).unwrap().count(), 0);
    batch.commit().await.unwrap();
    for (i, d) in digests.iter().enumerate() {
        assert!(rig.remote.has(d).await.unwrap());
        let path = rig.service.local_path(d).await.unwrap().unwrap();
        assert_eq!(fs::read(path).unwrap().len(), 1000 + i);
    }
}
