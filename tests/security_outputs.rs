//! The host trusts nothing a build wrote (issue 11, items 1, 2, 3, 5, 7),
//! driven from outside over gRPC with real VMs: outputs reached through
//! build-made symlinks, links inside outputs, fifo outputs, sparse outputs,
//! a 30 000-level tree left behind, and input DAGs that expand to millions
//! of entries. A decoy directory on the host stands in for host secrets: it
//! must stay untouched and unread into the store, no blob may be lost, the
//! server must keep answering health checks, and nothing may be left.

#![allow(clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::castore::materialise::Limits;
use kiln::castore::{B3Digest, Directory, Node, PathComponent, WireNode};
use kiln::proto::snix_build;
use tonic::Code;

use harness::{Options, TestServer};

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

/// A host directory holding a file the builds try to reach.
struct Decoy {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    contents: Vec<u8>,
}

impl Decoy {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("decoy");
        std::fs::create_dir(&dir).unwrap();
        let contents = format!("kiln-decoy-{}\n", uuid::Uuid::new_v4()).into_bytes();
        std::fs::write(dir.join("secret"), &contents).unwrap();
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        Decoy {
            _tmp: tmp,
            dir,
            contents,
        }
    }

    /// The decoy is where it was, as it was, and not in the store.
    async fn assert_untouched(&self, server: &TestServer) {
        let secret = self.dir.join("secret");
        let meta = std::fs::symlink_metadata(&secret).expect("the decoy is still there");
        assert!(meta.is_file());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o640,
            "decoy mode changed"
        );
        assert_eq!(meta.uid(), 0, "decoy owner changed");
        assert_eq!(std::fs::read(&secret).unwrap(), self.contents);
        let digest = B3Digest::of(&self.contents);
        assert!(
            !server.store.blobs.has(&digest).await.unwrap(),
            "the decoy's contents reached the store"
        );
    }
}

/// Every blob file of the embedded store.
fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(data_dir.join("blobs")).unwrap().flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            files.push(f.path());
        }
    }
    files.sort();
    files
}

async fn build_err(server: &TestServer, req: snix_build::BuildRequest) -> tonic::Status {
    server.snix().await.do_build(req).await.unwrap_err()
}

fn kind(status: &tonic::Status) -> String {
    kiln::grpc::status::failed_detail(status).unwrap().kind
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_through_symlinks_fifos_sparse_files_and_too_many_entries_are_refused() {
    let Some(server) = harness::start(Options {
        scratch: kiln::executor::scratch::ScratchLimits {
            max_bytes: 64 << 20,
            min_free_bytes: 1 << 30,
        },
        inputs: Limits {
            max_entries: 1000,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let decoy = Decoy::new();
    let blobs_before = blob_files(&server.data_dir);
    let blobs_dir = server.data_dir.join("blobs");

    // A parent of the declared output is a symlink to a host directory; a
    // second link points into the blob store.
    let script = format!(
        "ln -s {} /build/l; ln -s {} /build/b; echo linked",
        decoy.dir.display(),
        blobs_dir.display()
    );
    let mut req = server.snix_request(&script, &["build/l/secret"]);
    req.outputs = vec!["build/l/secret".into()];
    let status = build_err(&server, req).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(kind(&status), "invalid_output", "{status:?}");
    assert!(
        status.message().contains("/build/l") && status.message().contains("symlink"),
        "{}",
        status.message()
    );
    decoy.assert_untouched(&server).await;
    assert_eq!(blob_files(&server.data_dir), blobs_before, "a blob moved");

    // A fifo is the builder's fault, named as the guest saw it.
    let status = build_err(&server, server.snix_request("busybox mkfifo $out", &[OUT])).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(kind(&status), "invalid_output", "{status:?}");
    assert!(
        status.message().contains(&format!("/{OUT}")) && status.message().contains("fifo"),
        "{}",
        status.message()
    );

    // A sparse 16 GiB file occupies nothing, but ingest would hash and store
    // 16 GiB: it counts in full against the 64 MiB limit.
    let status = build_err(&server, server.snix_request("truncate -s 16G $out", &[OUT])).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(kind(&status), "scratch_full", "{status:?}");

    // Empty files take no space, but each is an entry ingest holds in
    // memory: they count against the entry limit inputs have too.
    let many = "mkdir $out; cd $out; for i in $(busybox seq 1500); do : > f$i; done";
    let status = build_err(&server, server.snix_request(many, &[OUT])).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(kind(&status), "scratch_full", "{status:?}");
    assert!(status.message().contains("entries"), "{}", status.message());

    assert!(server.healthy().await);
    decoy.assert_untouched(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn links_inside_outputs_are_stored_as_links_and_a_deep_tree_is_removed() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let decoy = Decoy::new();
    let needle = String::from_utf8(decoy.contents.clone()).unwrap();
    // The output holds links to the decoy; /build is left with 30 000
    // nested directories. No path can name that depth, so the tree is grown
    // from the top: each round moves it 100 levels further down.
    let chunk = vec!["d"; 100].join("/");
    let script = format!(
        "mkdir $out; ln -s {dir} $out/dir; ln -s {dir}/secret $out/file; echo data > $out/own; \
         set -e; cd /build; mkdir -p t/{chunk}; \
         for i in $(busybox seq 299); do mkdir -p n/{chunk}; busybox mv t n/{chunk}/t; busybox mv n t; done; \
         echo deep",
        dir = decoy.dir.display(),
    );
    let mut req = server.snix_request(&script, &[OUT]);
    req.refscan_needles = vec![needle.trim().to_string()];
    let resp = server
        .snix()
        .await
        .do_build(req)
        .await
        .unwrap()
        .into_inner();
    let output = &resp.outputs[0];
    assert!(
        output.needles.is_empty(),
        "refscan read the decoy: {output:?}"
    );
    let node = output.output.clone().unwrap().try_into_anonymous().unwrap();
    let Node::Directory { digest, .. } = node else {
        panic!("expected a directory, got {node:?}");
    };
    let dir = server
        .store
        .directories
        .get(&digest)
        .await
        .unwrap()
        .unwrap();
    let get = |name: &str| dir.get(&PathComponent::try_from(name).unwrap()).cloned();
    assert!(matches!(get("dir"), Some(Node::Symlink { .. })), "{dir:?}");
    assert!(matches!(get("file"), Some(Node::Symlink { .. })), "{dir:?}");
    assert!(matches!(get("own"), Some(Node::File { .. })), "{dir:?}");
    // The stored blob belongs to kiln and is read-only.
    let Some(Node::File { digest, .. }) = get("own") else {
        unreachable!()
    };
    let blob = server
        .store
        .blobs
        .local_path(&digest)
        .await
        .unwrap()
        .unwrap();
    let meta = std::fs::metadata(&blob).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "blob owned by a guest id");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    decoy.assert_untouched(&server).await;
    assert!(server.healthy().await);
    server.stop().await;
}

/// `D0 = {a: D1, b: D1}`, …, down to a file: stored as `levels + 1`
/// directories, it expands to 2^levels copies of the file.
async fn doubling_dag(server: &TestServer, levels: usize) -> Node {
    let mut child = Node::File {
        digest: B3Digest::of(b""),
        size: 0,
        executable: false,
    };
    server
        .store
        .blobs
        .put(&mut std::io::Cursor::new(Vec::new()))
        .await
        .unwrap();
    let mut dirs = Vec::new();
    for _ in 0..levels {
        let mut d = Directory::new();
        d.add(PathComponent::try_from("a").unwrap(), child.clone())
            .unwrap();
        d.add(PathComponent::try_from("b").unwrap(), child.clone())
            .unwrap();
        child = d.as_node();
        dirs.push(d);
    }
    server.store.directories.put_many(dirs).await.unwrap();
    child
}

/// A chain of `levels` directories, one inside the other.
async fn chain(server: &TestServer, levels: usize) -> Node {
    let mut child = Directory::new().as_node();
    let mut dirs = vec![Directory::new()];
    for _ in 0..levels {
        let mut d = Directory::new();
        d.add(PathComponent::try_from("d").unwrap(), child).unwrap();
        child = d.as_node();
        dirs.push(d);
    }
    server.store.directories.put_many(dirs).await.unwrap();
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_expanding_past_the_limits_are_refused_before_a_vm() {
    let Some(server) = harness::start(Options {
        inputs: Limits {
            max_entries: 100_000,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await
    else {
        return;
    };
    // 20 levels: a few KB of directories standing for 2 million entries.
    let dag = doubling_dag(&server, 20).await;
    let mut req = server.snix_request("echo never > $out", &[OUT]);
    req.inputs
        .push(dag.to_snix_entry(b"2bcdfghijklmnpqrsvwxyz0123456789-dag"));
    let started = std::time::Instant::now();
    let status = build_err(&server, req).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("entries") && status.message().contains("100000"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );

    // Deeper than a path can be.
    let deep = chain(&server, 3000).await;
    let mut req = server.snix_request("echo never > $out", &[OUT]);
    req.inputs
        .push(deep.to_snix_entry(b"2bcdfghijklmnpqrsvwxyz0123456789-deep"));
    let status = build_err(&server, req).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("levels"), "{}", status.message());

    assert!(server.healthy().await);
    server.stop().await;
}
