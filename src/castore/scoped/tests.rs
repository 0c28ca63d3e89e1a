//! A tenant's view answers for what it may not see exactly as the store
//! answers for what it does not have, and sees what it stored, what it
//! proved it has, and what is below a directory it sees.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use futures::TryStreamExt;
use tokio::io::AsyncReadExt;

use super::{Grants, Scoping};
use crate::castore::directory_service::DirectoryError;
use crate::castore::from_addr::{temp_store, TempStore};
use crate::castore::{ingest, B3Digest, Directory, IngestMode, Node, PathComponent, Store};
use crate::tenant::{Identity, Tenant};

fn tenant(name: &str) -> Identity {
    Identity::client(Tenant::parse(name).unwrap())
}

/// One store, scoped by tenant, and the views of `a` and `b`.
struct Rig {
    base: TempStore,
    scoping: Scoping,
    a: Store,
    b: Store,
}

fn rig() -> Rig {
    let base = temp_store();
    let scoping = Scoping::by_tenant(Grants::in_memory().unwrap());
    let a = scoping.store_for(&base.store, &tenant("a"));
    let b = scoping.store_for(&base.store, &tenant("b"));
    Rig {
        base,
        scoping,
        a,
        b,
    }
}

async fn put_blob(store: &Store, bytes: &[u8]) -> B3Digest {
    let mut reader: &[u8] = bytes;
    store.blobs.put(&mut reader).await.unwrap().digest
}

async fn read_blob(store: &Store, digest: &B3Digest) -> Option<Vec<u8>> {
    let mut blob = store.blobs.open_read(digest).await.unwrap()?;
    let mut bytes = Vec::new();
    blob.reader.read_to_end(&mut bytes).await.unwrap();
    Some(bytes)
}

fn file_dir(name: &str, digest: B3Digest, size: u64) -> Directory {
    let mut dir = Directory::new();
    dir.add(
        PathComponent::try_from(name.as_bytes()).unwrap(),
        Node::File {
            digest,
            size,
            executable: false,
        },
    )
    .unwrap();
    dir
}

fn parent_of(name: &str, child: &Directory) -> Directory {
    let mut dir = Directory::new();
    dir.add(
        PathComponent::try_from(name.as_bytes()).unwrap(),
        child.as_node(),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn another_tenants_blob_is_not_there() {
    let rig = rig();
    let digest = put_blob(&rig.a, b"a's secret").await;
    assert!(rig.a.blobs.has(&digest).await.unwrap());
    assert_eq!(read_blob(&rig.a, &digest).await.unwrap(), b"a's secret");
    assert!(rig.a.blobs.local_path(&digest).await.unwrap().is_some());

    assert!(!rig.b.blobs.has(&digest).await.unwrap());
    assert!(read_blob(&rig.b, &digest).await.is_none());
    assert!(rig.b.blobs.local_path(&digest).await.unwrap().is_none());
    assert!(rig
        .b
        .blobs
        .local_executable_path(&digest)
        .await
        .unwrap()
        .is_none());
    // Exactly what a digest nobody stored answers.
    let unknown = B3Digest::from(*blake3::hash(b"never stored").as_bytes());
    assert!(!rig.b.blobs.has(&unknown).await.unwrap());
    // Stored once on disk: the unscoped store has it.
    assert!(rig.base.store.blobs.has(&digest).await.unwrap());
}

#[tokio::test]
async fn putting_the_same_bytes_proves_them_and_nothing_else() {
    let rig = rig();
    let shared = put_blob(&rig.a, b"common bytes").await;
    let other = put_blob(&rig.a, b"a's other bytes").await;
    assert!(!rig.b.blobs.has(&shared).await.unwrap());

    assert_eq!(put_blob(&rig.b, b"common bytes").await, shared);
    assert_eq!(read_blob(&rig.b, &shared).await.unwrap(), b"common bytes");
    assert!(!rig.b.blobs.has(&other).await.unwrap());
}

#[tokio::test]
async fn another_tenants_directory_is_not_there() {
    let rig = rig();
    let blob = put_blob(&rig.a, b"x").await;
    let leaf = file_dir("x", blob, 1);
    let root = parent_of("leaf", &leaf);
    let digest = rig
        .a
        .directories
        .put_many(vec![leaf.clone(), root.clone()])
        .await
        .unwrap();
    assert_eq!(digest, root.digest());

    assert_eq!(rig.a.directories.get(&digest).await.unwrap(), Some(root));
    let all: Vec<Directory> = rig
        .a
        .directories
        .get_recursive(&digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 2);

    assert_eq!(rig.b.directories.get(&digest).await.unwrap(), None);
    assert_eq!(rig.b.directories.get(&leaf.digest()).await.unwrap(), None);
    let hidden: Result<Vec<Directory>, _> =
        rig.b.directories.get_recursive(&digest).try_collect().await;
    assert!(
        matches!(hidden, Err(DirectoryError::NotFound(d)) if d == digest),
        "{hidden:?}"
    );
}

#[tokio::test]
async fn a_directory_may_name_only_children_the_tenant_sees() {
    let rig = rig();
    let blob = put_blob(&rig.a, b"x").await;
    let leaf = file_dir("x", blob, 1);
    rig.a.directories.put(leaf.clone()).await.unwrap();

    // B names A's directory without having it: as if it were not stored.
    let root = parent_of("stolen", &leaf);
    let refused = rig.b.directories.put(root.clone()).await;
    assert!(
        matches!(
            refused,
            Err(DirectoryError::UnknownChild { parent, child })
                if parent == root.digest() && child == leaf.digest()
        ),
        "{refused:?}"
    );
    assert_eq!(rig.b.directories.get(&leaf.digest()).await.unwrap(), None);

    // Sending the child in the same batch proves it: both are B's now.
    rig.b
        .directories
        .put_many(vec![leaf.clone(), root.clone()])
        .await
        .unwrap();
    assert!(rig
        .b
        .directories
        .get(&leaf.digest())
        .await
        .unwrap()
        .is_some());
    assert!(rig
        .b
        .directories
        .get(&root.digest())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn an_ingested_tree_is_the_ingesting_tenants() {
    let rig = rig();
    let host = tempfile::tempdir().unwrap();
    let out = host.path().join("out");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("top"), b"top file").unwrap();
    std::fs::write(out.join("sub/deep"), b"deep file").unwrap();

    let node = ingest(&rig.a, &out, IngestMode::Copy).await.unwrap();
    let Node::Directory { digest, .. } = node else {
        panic!("a directory: {node:?}");
    };
    let tree: Vec<Directory> = rig
        .a
        .directories
        .get_recursive(&digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(tree.len(), 2);
    let deep = B3Digest::from(*blake3::hash(b"deep file").as_bytes());
    assert_eq!(read_blob(&rig.a, &deep).await.unwrap(), b"deep file");

    assert_eq!(rig.b.directories.get(&digest).await.unwrap(), None);
    assert!(!rig.b.blobs.has(&deep).await.unwrap());
}

#[tokio::test]
async fn operators_and_unauthenticated_callers_see_the_whole_store() {
    let rig = rig();
    let digest = put_blob(&rig.a, b"a's bytes").await;
    let operator = Identity::operator(Tenant::parse("ops").unwrap());
    let ops = rig.scoping.store_for(&rig.base.store, &operator);
    assert!(ops.blobs.has(&digest).await.unwrap());

    let open = Scoping::none().store_for(&rig.base.store, &tenant("b"));
    assert!(open.blobs.has(&digest).await.unwrap());
}
