//! Blobs in a real Garage cluster on loopback (`--blob-store s3://…`), each
//! "host" a data dir with its own bounded cache: streaming round trips,
//! another host fetching into its cache and hardlinking builds' inputs from
//! it, eviction, ingest through the batch, a node down, the whole store down
//! (UNAVAILABLE naming the store, nothing cached), and corrupt objects.

#![allow(clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::object_store::{ObjectStoreExt, PutPayload};
use harness::garage::{self, Garage};
use kiln::castore::blob::cached::CachedBlobService;
use kiln::castore::blob::object_store::ObjectStoreBlobs;
use kiln::castore::blob::{BlobError, BlobService};
use kiln::castore::directory_service::redb::RedbDirectoryService;
use kiln::castore::from_addr::{open_blob_store, FromAddrError};
use kiln::castore::{B3Digest, Node, Store};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const GIB: u64 = 1 << 30;

/// `len` pseudo-random bytes, generated as read (never whole in memory).
struct Generated {
    left: u64,
    state: u64,
}

impl Generated {
    fn new(len: u64, seed: u64) -> Generated {
        Generated {
            left: len,
            state: seed | 1,
        }
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = buf
            .remaining()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut out = vec![0u8; n];
        for byte in &mut out {
            // xorshift64
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *byte = self.state as u8;
        }
        buf.put_slice(&out);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

async fn digest_of(mut reader: impl AsyncRead + Unpin) -> std::io::Result<(B3Digest, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((hasher.finalize().into(), hasher.count()));
        }
        hasher.update(&buf[..n]);
    }
}

/// One host's blobs: the store at `address` behind a cache in `data_dir`.
fn host(garage: &Garage, address: &str, data_dir: &Path, budget: u64) -> CachedBlobService {
    let remote = ObjectStoreBlobs::from_address(address, Some(&garage.credentials_file())).unwrap();
    CachedBlobService::open(remote, &data_dir.join("blob-cache"), budget).unwrap()
}

fn start(nodes: usize, replication: usize) -> Option<Garage> {
    if !harness::can_run(garage::unavailable()) {
        return None;
    }
    let started = Instant::now();
    let garage = Garage::start(nodes, replication).unwrap();
    eprintln!("garage: {nodes} node(s) up in {:?}", started.elapsed());
    Some(garage)
}

fn cache_files(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(data_dir.join("blob-cache/blobs")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_blob_streams_in_and_another_host_hardlinks_it_from_its_cache() {
    let Some(garage) = start(1, 1) else { return };
    let work = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (work.path().join("a"), work.path().join("b"));
    let address = garage.address("round-trip");
    let a = open_blob_store(&address, &a_dir, GIB, Some(&garage.credentials_file()))
        .await
        .unwrap();

    let size = 48 << 20;
    let (expected, _) = digest_of(Generated::new(size, 42)).await.unwrap();
    let started = Instant::now();
    let stored = a.put(&mut Generated::new(size, 42)).await.unwrap();
    eprintln!("48 MiB put in {:?}", started.elapsed());
    assert_eq!((stored.digest, stored.size), (expected, size));

    // Host B: reads stream from the store, verified.
    let b = host(&garage, &address, &b_dir, GIB);
    let blob = b.open_read(&expected).await.unwrap().unwrap();
    assert_eq!(blob.size, Some(size));
    assert_eq!(digest_of(blob.reader).await.unwrap(), (expected, size));

    // A build's input on B: a tree made on A, materialised on B by
    // hardlinks from B's cache (the directories stand for the shared
    // database).
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/small"), b"small input").unwrap();
    let directories = Arc::new(RedbDirectoryService::open(&work.path().join("dirs.redb")).unwrap());
    let store_a = Store {
        blobs: a,
        directories: directories.clone(),
    };
    let root = kiln::castore::ingest::ingest_path(&store_a, &tree)
        .await
        .unwrap();
    let store_b = Store {
        blobs: Arc::new(b.clone()),
        directories,
    };
    let target = b_dir.join("runs/build-1");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    kiln::castore::materialise::materialise(&store_b, &root, &target)
        .await
        .unwrap();
    let input = std::fs::metadata(target.join("sub/small")).unwrap();
    let cached = b
        .local_path(&B3Digest::of(b"small input"))
        .await
        .unwrap()
        .unwrap();
    assert!(cached.starts_with(b_dir.join("blob-cache")));
    assert_eq!(input.ino(), std::fs::metadata(&cached).unwrap().ino());
    assert!(matches!(root, Node::Directory { .. }));

    // The large blob too: fetched once into the cache, then linkable.
    let path = b.local_path(&expected).await.unwrap().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    std::fs::hard_link(&path, b_dir.join("runs/big")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_keeps_to_its_budget_and_evicted_blobs_come_back_from_the_store() {
    let Some(garage) = start(1, 1) else { return };
    let work = tempfile::tempdir().unwrap();
    let address = garage.address("bounded");
    let budget = 3 << 20;
    let blobs = host(&garage, &address, work.path(), budget);
    let mut digests = Vec::new();
    for seed in 1..=6 {
        let stored = blobs.put(&mut Generated::new(1 << 20, seed)).await.unwrap();
        digests.push(stored.digest);
        let on_disk: u64 = cache_files(work.path())
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(
            on_disk <= budget,
            "{on_disk} bytes cached over a budget of {budget}"
        );
    }
    assert_eq!(cache_files(work.path()).len(), 3);
    // The oldest went; it is still in the store, and fetched back.
    let first = &digests[0];
    assert!(!work
        .path()
        .join("blob-cache")
        .join("blobs")
        .join(&first.to_hex()[..2])
        .join(first.to_hex())
        .exists());
    assert!(blobs.has(first).await.unwrap());
    let path = blobs.local_path(first).await.unwrap().unwrap();
    assert_eq!(
        digest_of(tokio::fs::File::open(path).await.unwrap())
            .await
            .unwrap()
            .0,
        *first
    );
    assert!(blobs.cached_bytes() <= budget);
}

#[tokio::test(flavor = "multi_thread")]
async fn ingesting_a_tree_uploads_every_file_before_it_answers() {
    let Some(garage) = start(1, 1) else { return };
    let work = tempfile::tempdir().unwrap();
    let address = garage.address("ingest");
    let blobs = host(&garage, &address, &work.path().join("a"), GIB);
    let tree = work.path().join("a/out");
    let mut expected = Vec::new();
    for i in 0..40u32 {
        let dir = tree.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let data = format!("file {i} ").repeat(1 + i as usize * 50);
        std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
        expected.push(B3Digest::of(data.as_bytes()));
    }
    std::fs::write(tree.join("large"), vec![9u8; 12 << 20]).unwrap();
    expected.push(B3Digest::of(&vec![9u8; 12 << 20]));
    let store = Store {
        blobs: Arc::new(blobs),
        directories: Arc::new(RedbDirectoryService::open(&work.path().join("dirs.redb")).unwrap()),
    };
    kiln::castore::ingest::ingest_path_moving(&store, &tree)
        .await
        .unwrap();
    // Another host's view of the store: everything is there.
    let remote =
        ObjectStoreBlobs::from_address(&address, Some(&garage.credentials_file())).unwrap();
    for digest in &expected {
        assert!(remote.has(digest).await.unwrap(), "{digest} not uploaded");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_of_three_nodes_down_puts_and_reads_go_on() {
    let Some(mut garage) = start(3, 3) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let address = garage.address("replicated");
    let a = host(&garage, &address, &work.path().join("a"), GIB);
    let before = a.put(&mut Generated::new(2 << 20, 7)).await.unwrap();
    garage.stop_node(2);
    let started = Instant::now();
    let after = a.put(&mut Generated::new(9 << 20, 8)).await.unwrap();
    eprintln!("put with a node down in {:?}", started.elapsed());
    let b = host(&garage, &address, &work.path().join("b"), GIB);
    for stored in [before, after] {
        let blob = b.open_read(&stored.digest).await.unwrap().unwrap();
        assert_eq!(
            digest_of(blob.reader).await.unwrap(),
            (stored.digest, stored.size)
        );
        assert!(b.local_path(&stored.digest).await.unwrap().is_some());
    }
    garage.start_node(2).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_store_is_unavailable_naming_it_and_nothing_is_cached() {
    let Some(mut garage) = start(1, 1) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let address = garage.address("down");
    let data_dir = work.path().join("a");
    let store = Store {
        blobs: open_blob_store(&address, &data_dir, GIB, Some(&garage.credentials_file()))
            .await
            .unwrap(),
        directories: Arc::new(RedbDirectoryService::open(&work.path().join("dirs.redb")).unwrap()),
    };
    garage.stop_node(0);

    let started = Instant::now();
    let err = store
        .blobs
        .put(&mut &b"never acknowledged"[..])
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, BlobError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("s3://kiln/down at {}", garage.endpoint(0))),
        "{text}"
    );
    assert!(!text.contains(garage::SECRET), "{text}");
    assert!(took < Duration::from_secs(20), "failed only after {took:?}");
    assert!(cache_files(&data_dir).is_empty());
    assert_eq!(
        std::fs::read_dir(data_dir.join("blob-cache/blobs-tmp"))
            .unwrap()
            .count(),
        0
    );

    // Over gRPC: UNAVAILABLE, naming the store.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router =
        kiln::castore::grpc_services(store).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    use kiln::proto::snix_castore::blob_service_client::BlobServiceClient;
    let mut client = BlobServiceClient::connect(url).await.unwrap();
    let chunk = kiln::proto::snix_castore::BlobChunk {
        data: bytes::Bytes::from_static(b"over grpc"),
    };
    let status = client
        .put(futures::stream::iter([chunk]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("s3://kiln/down at"), "{status:?}");
    assert!(cache_files(&data_dir).is_empty());

    // At start, a store that does not answer fails at once, naming it.
    let Err(err) = open_blob_store(
        &address,
        &work.path().join("b"),
        GIB,
        Some(&garage.credentials_file()),
    )
    .await
    else {
        panic!("opened a store that is down");
    };
    assert!(matches!(err, FromAddrError::Probe { .. }), "{err:?}");
    assert!(format!("{err}").contains(&address), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_object_is_refused_and_never_cached() {
    let Some(garage) = start(1, 1) else { return };
    let work = tempfile::tempdir().unwrap();
    let address = garage.address("corrupt");
    let blobs = host(&garage, &address, work.path(), GIB);
    let digest = B3Digest::of(b"the bytes that should be there");
    let remote = blobs.remote();
    remote
        .store()
        .put(
            &remote.key(&digest),
            PutPayload::from_static(b"something else"),
        )
        .await
        .unwrap();

    let err = blobs.local_path(&digest).await.unwrap_err();
    assert!(matches!(err, BlobError::Fetch { .. }), "{err:?}");
    let blob = blobs.open_read(&digest).await.unwrap().unwrap();
    let err = digest_of(blob.reader).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(cache_files(work.path()).is_empty());
    assert_eq!(blobs.cached_bytes(), 0);
}
