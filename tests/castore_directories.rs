//! The embedded directory store: closure under references, all-or-nothing
//! batches, breadth-first recursive gets, persistence across reopen.

#![allow(clippy::unwrap_used)]

use futures::TryStreamExt;
use kiln::castore::directory_service::redb::RedbDirectoryService;
use kiln::castore::directory_service::{DirectoryError, DirectoryService};
use kiln::castore::{B3Digest, Directory, Node, PathComponent};

fn name(text: &str) -> PathComponent {
    PathComponent::try_from(text).unwrap()
}

fn with_file(file_name: &str) -> Directory {
    let mut directory = Directory::new();
    let node = Node::File {
        digest: B3Digest::of(file_name.as_bytes()),
        size: 1,
        executable: false,
    };
    directory.add(name(file_name), node).unwrap();
    directory
}

fn with_children(children: &[(&str, &Directory)]) -> Directory {
    let mut directory = Directory::new();
    for (child_name, child) in children {
        directory.add(name(child_name), child.as_node()).unwrap();
    }
    directory
}

async fn collect(
    store: &RedbDirectoryService,
    root: &B3Digest,
) -> Result<Vec<Directory>, DirectoryError> {
    store.get_recursive(root).try_collect().await
}

#[tokio::test]
async fn children_must_be_known_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDirectoryService::open(&dir.path().join("d.redb")).unwrap();
    let leaf = with_file("a");
    let root = with_children(&[("leaf", &leaf)]);

    let err = store.put(root.clone()).await.unwrap_err();
    match err {
        DirectoryError::UnknownChild { parent, child } => {
            assert_eq!(parent, root.digest());
            assert_eq!(child, leaf.digest());
        }
        other => panic!("want UnknownChild, got {other:?}"),
    }
    // Root first in a batch is refused too, and nothing of it is kept.
    let err = store
        .put_many(vec![root.clone(), leaf.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::UnknownChild { .. }),
        "{err:?}"
    );
    assert_eq!(
        store.get(&leaf.digest()).await.unwrap(),
        None,
        "batch is all or nothing"
    );

    assert_eq!(store.put(leaf.clone()).await.unwrap(), leaf.digest());
    assert_eq!(store.put(root.clone()).await.unwrap(), root.digest());
    assert_eq!(store.get(&root.digest()).await.unwrap(), Some(root));
    assert!(matches!(
        store.put_many(vec![]).await,
        Err(DirectoryError::EmptyBatch)
    ));
}

#[tokio::test]
async fn recursive_get_is_root_first_breadth_first_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDirectoryService::open(&dir.path().join("d.redb")).unwrap();
    let deep = with_file("deep");
    let shared = with_children(&[("deep", &deep)]);
    let left = with_children(&[("shared", &shared)]);
    let right = with_children(&[("also-shared", &shared), ("x", &Directory::new())]);
    let root = with_children(&[("left", &left), ("right", &right)]);
    let empty = Directory::new();
    let batch = vec![
        deep.clone(),
        shared.clone(),
        empty.clone(),
        left.clone(),
        right.clone(),
        root.clone(),
    ];
    assert_eq!(store.put_many(batch).await.unwrap(), root.digest());

    let got = collect(&store, &root.digest()).await.unwrap();
    assert_eq!(got, vec![root, left, right, shared, empty, deep]);
}

#[tokio::test]
async fn missing_root_ends_the_stream_with_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDirectoryService::open(&dir.path().join("d.redb")).unwrap();
    let unknown = B3Digest::of(b"unknown");
    let err = collect(&store, &unknown).await.unwrap_err();
    assert!(
        matches!(err, DirectoryError::NotFound(d) if d == unknown),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("directory {unknown} not found"));
}

#[tokio::test]
async fn both_size_conventions_are_accepted_and_kept() {
    use kiln::proto::tvix_castore;
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDirectoryService::open(&dir.path().join("d.redb")).unwrap();
    let leaf = with_file("a");
    store.put(leaf.clone()).await.unwrap();
    // kiln writes snix's 2 x entries + child sizes: 2 for the one-file leaf.
    assert_eq!(leaf.size(), 2);
    // The proto comment's entries + child sizes gives 1; a client may send
    // either (or anything else) and gets it back as sent, under its digest.
    let mut digests = Vec::new();
    for size in [1, 2] {
        let wire = tvix_castore::Directory {
            directories: vec![tvix_castore::DirectoryNode {
                name: "leaf".into(),
                digest: leaf.digest().to_bytes(),
                size,
            }],
            ..Default::default()
        };
        let sent = Directory::try_from(wire).unwrap();
        let digest = store.put(sent.clone()).await.unwrap();
        let back = store.get(&digest).await.unwrap().unwrap();
        assert_eq!(back, sent);
        assert!(matches!(
            back.nodes().next(),
            Some((_, Node::Directory { size: got, .. })) if *got == size
        ));
        digests.push(digest);
    }
    assert_ne!(digests[0], digests[1], "the size is part of the digest");
    assert_eq!(
        digests[1],
        with_children(&[("leaf", &leaf)]).digest(),
        "snix's size is the one kiln itself writes"
    );
}

#[tokio::test]
async fn contents_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.redb");
    let leaf = with_file("persisted");
    {
        let store = RedbDirectoryService::open(&path).unwrap();
        store.put(leaf.clone()).await.unwrap();
    }
    let store = RedbDirectoryService::open(&path).unwrap();
    assert_eq!(store.get(&leaf.digest()).await.unwrap(), Some(leaf));
}
