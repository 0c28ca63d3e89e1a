//! The directory stores, each behaviour on every backend (the embedded
//! redb file and PostgreSQL, started by the test on loopback): closure
//! under references, all-or-nothing batches, breadth-first recursive gets;
//! then what each keeps: the file across a reopen, the database across
//! hosts (two pools) and a server restart.

#![allow(clippy::unwrap_used)]

mod harness;

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use harness::postgres;
use kiln::castore::directory_service::postgres::PostgresDirectoryService;
use kiln::castore::directory_service::redb::RedbDirectoryService;
use kiln::castore::directory_service::{DirectoryError, DirectoryService};
use kiln::castore::{B3Digest, Directory, Node, PathComponent};
use kiln::db::Database;
use kiln::proto::tvix_castore;

/// A store on one backend and what it lives in (a temporary directory, a
/// PostgreSQL server), dropped with it.
struct Backend {
    store: Arc<dyn DirectoryService>,
    _home: Box<dyn std::any::Any>,
}

fn redb_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDirectoryService::open(&dir.path().join("d.redb")).unwrap();
    Backend {
        store: Arc::new(store),
        _home: Box::new(dir),
    }
}

async fn postgres_backend() -> Option<Backend> {
    let (pg, db) = postgres::database().await?;
    Some(Backend {
        store: Arc::new(PostgresDirectoryService::new(db)),
        _home: Box::new(pg),
    })
}

/// One test per behaviour and backend: `on_redb::<behaviour>` and
/// `on_postgres::<behaviour>`, each calling `<behaviour>(store)`.
macro_rules! on_each_backend {
    ($($behaviour:ident),* $(,)?) => {
        mod on_redb {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let backend = super::redb_backend();
                    super::$behaviour(&*backend.store).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let Some(backend) = super::postgres_backend().await else {
                        return;
                    };
                    super::$behaviour(&*backend.store).await;
                }
            )*
        }
    };
}

on_each_backend!(
    children_must_be_known_first,
    recursive_get_is_root_first_breadth_first_each_once,
    missing_root_ends_the_stream_with_not_found,
    both_size_conventions_are_accepted_and_kept,
    a_wide_tree_comes_back_whole_and_in_order,
    count_counts_distinct_directories,
);

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
    store: &dyn DirectoryService,
    root: &B3Digest,
) -> Result<Vec<Directory>, DirectoryError> {
    store.get_recursive(root).try_collect().await
}

async fn children_must_be_known_first(store: &dyn DirectoryService) {
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

async fn recursive_get_is_root_first_breadth_first_each_once(store: &dyn DirectoryService) {
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

    let got = collect(store, &root.digest()).await.unwrap();
    assert_eq!(got, vec![root, left, right, shared, empty, deep]);
}

async fn missing_root_ends_the_stream_with_not_found(store: &dyn DirectoryService) {
    let unknown = B3Digest::of(b"unknown");
    let err = collect(store, &unknown).await.unwrap_err();
    assert!(
        matches!(err, DirectoryError::NotFound(d) if d == unknown),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("directory {unknown} not found"));
}

async fn both_size_conventions_are_accepted_and_kept(store: &dyn DirectoryService) {
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

async fn a_wide_tree_comes_back_whole_and_in_order(store: &dyn DirectoryService) {
    // More children than one query of a level asks for.
    let leaves: Vec<Directory> = (0..1100).map(|i| with_file(&format!("f{i}"))).collect();
    let names: Vec<String> = (0..leaves.len()).map(|i| format!("d{i:04}")).collect();
    let children: Vec<(&str, &Directory)> = names.iter().map(String::as_str).zip(&leaves).collect();
    let root = with_children(&children);
    let mut batch = leaves.clone();
    batch.push(root.clone());
    assert_eq!(store.put_many(batch).await.unwrap(), root.digest());

    let got = collect(store, &root.digest()).await.unwrap();
    let mut want = vec![root.clone()];
    // Children in the order the root names them (by name).
    want.extend(
        root.child_directories()
            .map(|d| leaves.iter().find(|l| l.digest() == d).unwrap().clone()),
    );
    assert_eq!(got.len(), leaves.len() + 1);
    assert_eq!(got, want);
}

async fn count_counts_distinct_directories(store: &dyn DirectoryService) {
    assert_eq!(store.count().await.unwrap(), Some(0));
    let leaf = with_file("counted");
    let root = with_children(&[("leaf", &leaf)]);
    // The same directory twice in one batch, and again later: one each.
    store
        .put_many(vec![leaf.clone(), leaf.clone(), root.clone()])
        .await
        .unwrap();
    store.put(leaf).await.unwrap();
    assert_eq!(store.count().await.unwrap(), Some(2));
}

#[tokio::test]
async fn two_hosts_share_the_database_and_survive_its_restart() {
    let Some((pg, host_a)) = postgres::database().await else {
        return;
    };
    let host_b = Database::connect(&pg.url(), Duration::from_secs(10))
        .await
        .unwrap();
    let (a, b) = (
        PostgresDirectoryService::new(host_a),
        PostgresDirectoryService::new(host_b),
    );
    let leaf = with_file("shared");
    let root = with_children(&[("leaf", &leaf)]);
    a.put(leaf.clone()).await.unwrap();
    // B sees A's leaf: as a directory, and as a known child of its put.
    assert_eq!(b.get(&leaf.digest()).await.unwrap(), Some(leaf.clone()));
    b.put(root.clone()).await.unwrap();
    assert_eq!(
        collect(&a, &root.digest()).await.unwrap(),
        vec![root.clone(), leaf.clone()]
    );

    // Restarted between calls: the next call reconnects.
    pg.stop().unwrap();
    pg.start_again().unwrap();
    assert_eq!(a.get(&root.digest()).await.unwrap(), Some(root.clone()));
    assert_eq!(b.count().await.unwrap(), Some(2));

    // Stopped: the call fails as unavailable, naming the database.
    pg.stop().unwrap();
    let err = a.get(&root.digest()).await.unwrap_err();
    let db = err.database().expect("a database error");
    assert!(db.is_unavailable(), "{err:?}");
    assert!(
        db.to_string().contains(&format!("127.0.0.1:{}", pg.port())),
        "{db}"
    );
    let err = collect(&b, &root.digest()).await.unwrap_err();
    assert!(
        err.database().is_some_and(|e| e.is_unavailable()),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_directory_swapped_in_the_shared_database_is_refused() {
    let Some((_pg, db)) = postgres::database().await else {
        return;
    };
    let store = PostgresDirectoryService::new(db.clone());
    let (honest, other) = (with_file("honest"), with_file("other"));
    store.put(honest.clone()).await.unwrap();
    // Someone with access to the database (not kiln) puts other bytes under
    // the honest key.
    let client = db.client().await.unwrap();
    client
        .execute(
            "UPDATE directories SET encoded = $2 WHERE digest = $1",
            &[&honest.digest().as_bytes().as_slice(), &other.encode()],
        )
        .await
        .unwrap();
    let err = store.get(&honest.digest()).await.unwrap_err();
    assert!(
        matches!(err, DirectoryError::WrongDigest { digest, actual }
            if digest == honest.digest() && actual == other.digest()),
        "{err:?}"
    );
}
