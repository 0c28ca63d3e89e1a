//! The Nix front's path infos, the tenants' grants and the result cache in
//! PostgreSQL (a server started by each test on loopback): the behaviours
//! their embedded backends are tested for (`src/nix/path_info/tests.rs`,
//! `src/castore/scoped/tests.rs`, `src/executor/result_cache/tests.rs`),
//! here with two hosts (two pools) sharing the database; and the castore
//! and path-info services answering UNAVAILABLE, naming the database, while
//! it is down, and serving again once it is back.

#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use harness::postgres;
use kiln::castore::directory_service::postgres::PostgresDirectoryService;
use kiln::castore::directory_service::DirectoryError;
use kiln::castore::scoped::{Grants, Kind, Scoping};
use kiln::castore::{B3Digest, Directory, Node, PathComponent, Store};
use kiln::db::Database;
use kiln::executor::paths::RelPath;
use kiln::executor::result_cache::{self, Recorded, ResultCache};
use kiln::executor::BuiltOutput;
use kiln::nix::path_info::postgres::{PostgresPathInfoService, LIST_PAGE};
use kiln::nix::path_info::{PathInfo, PathInfoError, PathInfoService, Signature};
use kiln::nix::StorePath;
use kiln::tenant::{Identity, Tenant};
use tokio::io::AsyncReadExt;
use tonic::Code;

/// A second host's pool of the same database.
async fn second_host(pg: &postgres::Postgres) -> Database {
    Database::connect(&pg.url(), Duration::from_secs(10))
        .await
        .unwrap()
}

fn store_path(i: u32) -> StorePath {
    let hash = blake3::hash(&i.to_le_bytes());
    let digest: [u8; 20] = hash.as_bytes()[..20].try_into().unwrap();
    StorePath::from_parts(digest, &format!("path-{i}")).unwrap()
}

/// A path info numbered `i`: referring to itself, signed once.
fn info(i: u32) -> PathInfo {
    PathInfo {
        store_path: store_path(i),
        node: Node::File {
            digest: B3Digest::from([5; 32]),
            size: 11,
            executable: false,
        },
        references: BTreeSet::from([store_path(i)]),
        nar_sha256: [6; 32],
        nar_size: 128 + u64::from(i),
        deriver: None,
        signatures: vec![Signature {
            name: "kiln-1".to_owned(),
            data: vec![7; 64],
        }],
        ca: None,
    }
}

async fn list_all(service: &dyn PathInfoService) -> Vec<Result<PathInfo, PathInfoError>> {
    service.list().collect().await
}

#[tokio::test]
async fn path_infos_are_put_replaced_and_listed_in_pages_across_hosts() {
    let Some((pg, db)) = postgres::database().await else {
        return;
    };
    let a = PostgresPathInfoService::new(db.clone());
    let b = PostgresPathInfoService::new(second_host(&pg).await);
    assert_eq!(a.get(store_path(0).hash()).await.unwrap(), None);
    assert!(list_all(&b).await.is_empty());

    // More than two pages, and a last page that is not full.
    let count = u32::try_from(2 * LIST_PAGE + 3).unwrap();
    for i in 0..count {
        assert_eq!(a.put(info(i)).await.unwrap(), info(i));
    }
    assert_eq!(b.get(store_path(7).hash()).await.unwrap(), Some(info(7)));
    let listed: Vec<PathInfo> = list_all(&b).await.into_iter().map(Result::unwrap).collect();
    let paths: BTreeSet<StorePath> = listed.iter().map(|i| i.store_path.clone()).collect();
    assert_eq!(listed.len(), count as usize, "each once");
    assert_eq!(paths, (0..count).map(store_path).collect());

    // A second put of a path replaces the first, for every host.
    let newer = PathInfo {
        nar_size: 8192,
        signatures: Vec::new(),
        ..info(3)
    };
    b.put(newer.clone()).await.unwrap();
    assert_eq!(a.get(store_path(3).hash()).await.unwrap(), Some(newer));
    assert_eq!(list_all(&a).await.len(), count as usize);

    // A record that no longer decodes is corrupt, named by its path, and
    // the listing reports it and goes on.
    let bad = store_path(count);
    db.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO path_infos (digest, encoded) VALUES ($1, $2)",
            &[&bad.hash().as_slice(), &&b"\xff\xff\xff"[..]],
        )
        .await
        .unwrap();
    match a.get(bad.hash()).await {
        Err(PathInfoError::Corrupt(key, _)) => assert_eq!(key, bad.hash_part()),
        other => panic!("want Corrupt, got {other:?}"),
    }
    let listed = list_all(&b).await;
    assert_eq!(listed.len(), count as usize + 1);
    assert_eq!(listed.iter().filter(|r| r.is_err()).count(), 1);
}

fn tenant(name: &str) -> Tenant {
    Tenant::parse(name).unwrap()
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
    let node = Node::File {
        digest,
        size,
        executable: false,
    };
    dir.add(PathComponent::try_from(name).unwrap(), node)
        .unwrap();
    dir
}

fn parent_of(name: &str, child: &Directory) -> Directory {
    let mut dir = Directory::new();
    dir.add(PathComponent::try_from(name).unwrap(), child.as_node())
        .unwrap();
    dir
}

#[tokio::test]
async fn grants_scope_each_tenant_on_every_host() {
    let Some((pg, db)) = postgres::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = kiln::castore::from_addr("", dir.path()).await.unwrap();
    let host_1 = Scoping::by_tenant(Grants::postgres(db));
    let host_2 = Scoping::by_tenant(Grants::postgres(second_host(&pg).await));
    let a_on_1 = host_1.store_for(&base, &Identity::client(tenant("a")));
    let a_on_2 = host_2.store_for(&base, &Identity::client(tenant("a")));
    let b_on_2 = host_2.store_for(&base, &Identity::client(tenant("b")));

    // What a stored through host 1, a sees through host 2; b does not.
    let secret = put_blob(&a_on_1, b"a's secret").await;
    let shared = put_blob(&a_on_1, b"common bytes").await;
    assert_eq!(read_blob(&a_on_2, &secret).await.unwrap(), b"a's secret");
    assert!(!b_on_2.blobs.has(&secret).await.unwrap());
    assert!(read_blob(&b_on_2, &secret).await.is_none());
    assert!(b_on_2.blobs.local_path(&secret).await.unwrap().is_none());
    assert!(a_on_2.blobs.local_path(&secret).await.unwrap().is_some());
    assert!(b_on_2
        .blobs
        .local_executable_path(&secret)
        .await
        .unwrap()
        .is_none());
    assert!(base.blobs.has(&secret).await.unwrap(), "stored once");
    // Putting the same bytes proves them, and nothing else.
    assert_eq!(put_blob(&b_on_2, b"common bytes").await, shared);
    assert!(b_on_2.blobs.has(&shared).await.unwrap());
    assert!(!b_on_2.blobs.has(&secret).await.unwrap());

    // Directories: a's tree is a's on both hosts; b can neither read it nor
    // name it as a child.
    let leaf = file_dir("secret", secret, 10);
    let root = parent_of("leaf", &leaf);
    a_on_1
        .directories
        .put_many(vec![leaf.clone(), root.clone()])
        .await
        .unwrap();
    let tree: Vec<Directory> = a_on_2
        .directories
        .get_recursive(&root.digest())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(tree, vec![root.clone(), leaf.clone()]);
    assert_eq!(b_on_2.directories.get(&leaf.digest()).await.unwrap(), None);
    let err = b_on_2
        .directories
        .put(parent_of("stolen", &leaf))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::UnknownChild { child, .. } if child == leaf.digest()),
        "{err:?}"
    );

    // The table itself: per tenant and kind, the first unseen named.
    let grants = Grants::postgres(second_host(&pg).await);
    let (a, b) = (tenant("a"), tenant("b"));
    assert!(grants
        .granted(&a, Kind::Directory, &leaf.digest())
        .await
        .unwrap());
    assert!(!grants
        .granted(&a, Kind::Blob, &leaf.digest())
        .await
        .unwrap());
    assert_eq!(
        grants
            .first_unseen(&b, Kind::Blob, vec![shared, secret])
            .await
            .unwrap(),
        Some(1)
    );
    grants
        .grant(&b, Kind::Blob, vec![secret, shared])
        .await
        .unwrap();
    assert_eq!(
        grants
            .first_unseen(&b, Kind::Blob, vec![shared, secret])
            .await
            .unwrap(),
        None
    );
}

fn validated_request() -> kiln::executor::BuildRequest {
    let busybox = Node::Directory {
        digest: B3Digest::from([9; 32]),
        size: 1,
    };
    let req = harness::nix_request(
        busybox.to_snix_entry(harness::BUSYBOX.as_bytes()),
        "true",
        &["nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out"],
    );
    kiln::grpc::request::from_snix(&req).unwrap()
}

fn report() -> kiln_guest::contract::Report {
    kiln_guest::contract::Report {
        outcome: kiln_guest::contract::Outcome::Exited { code: 0 },
        boot_ms: 1,
        setup_ms: 2,
        build_ms: 3,
        waited_ms: None,
    }
}

#[tokio::test]
async fn a_result_recorded_on_one_host_answers_on_another() {
    let Some((pg, db)) = postgres::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = kiln::castore::from_addr("", dir.path()).await.unwrap();
    let scoping = Scoping::by_tenant(Grants::postgres(db.clone()));
    let a = scoping.store_for(&base, &Identity::client(tenant("a")));
    let b = scoping.store_for(&base, &Identity::client(tenant("b")));
    let bytes = b"the output";
    let output = put_blob(&a, bytes).await;
    let recorded = Recorded {
        build_id: "first".into(),
        built_at_unix: 1_700_000_000,
        outputs: vec![BuiltOutput {
            path: RelPath::parse("nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out").unwrap(),
            node: Node::File {
                digest: output,
                size: bytes.len() as u64,
                executable: false,
            },
            needles: vec![0],
        }],
        report: report(),
    };
    let host_1 = ResultCache::postgres(db);
    let host_2 = ResultCache::postgres(second_host(&pg).await);
    let key = result_cache::key(&tenant("a"), &validated_request());
    assert!(
        host_2.lookup(key, &a).await.unwrap().is_none(),
        "nothing yet"
    );
    host_1.record(key, &recorded).await.unwrap();

    let hit = host_2.lookup(key, &a).await.unwrap().expect("a hit");
    assert_eq!(hit.build_id, "first");
    assert_eq!(hit.outputs, recorded.outputs);
    assert_eq!(hit.report, recorded.report);
    // Through a view that lacks the output: a miss.
    assert!(host_2.lookup(key, &b).await.unwrap().is_none());

    // Recorded again over it (a bypassed rebuild): the newer answers.
    let newer = Recorded {
        build_id: "second".into(),
        ..recorded
    };
    host_2.record(key, &newer).await.unwrap();
    let hit = host_1.lookup(key, &a).await.unwrap().expect("a hit");
    assert_eq!(hit.build_id, "second");

    pg.stop().unwrap();
    let err = host_1.lookup(key, &a).await.unwrap_err();
    assert!(
        err.report().contains(&format!("127.0.0.1:{}", pg.port())),
        "{}",
        err.report()
    );
}

/// The castore and path-info services of one store with its directories
/// and path infos in `db` (blobs embedded in `dir`), on a fresh TCP port.
async fn serve(db: Database, dir: &std::path::Path) -> String {
    let embedded = kiln::castore::from_addr("", dir).await.unwrap();
    let store = Store {
        blobs: embedded.blobs,
        directories: Arc::new(PostgresDirectoryService::new(db.clone())),
    };
    let path_infos = Arc::new(PostgresPathInfoService::new(db));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut builder = tonic::transport::Server::builder();
    let router = kiln::castore::grpc_services(store.clone())
        .into_router(&mut builder)
        .add_service(kiln::nix::path_info::grpc_server::path_info_server(
            path_infos,
            store,
            Scoping::none(),
        ));
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{address}")
}

/// The first directory a Get answers (an error before or in the stream).
async fn first_answer(
    client: &mut kiln::proto::snix_castore::directory_service_client::DirectoryServiceClient<
        tonic::transport::Channel,
    >,
    request: kiln::proto::snix_castore::GetDirectoryRequest,
) -> Result<Option<kiln::proto::snix_castore::Directory>, tonic::Status> {
    client.get(request).await?.into_inner().message().await
}

#[tokio::test]
async fn a_stopped_database_is_unavailable_by_name_and_a_restarted_one_serves() {
    use kiln::proto::snix_castore::directory_service_client::DirectoryServiceClient;
    use kiln::proto::snix_castore::{get_directory_request::ByWhat, GetDirectoryRequest};
    use kiln::proto::snix_store::get_path_info_request;
    use kiln::proto::snix_store::path_info_service_client::PathInfoServiceClient;
    use kiln::proto::snix_store::GetPathInfoRequest;

    let Some((pg, db)) = postgres::database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let address = serve(db, dir.path()).await;
    let mut directories = DirectoryServiceClient::connect(address.clone())
        .await
        .unwrap();
    let mut path_infos = PathInfoServiceClient::connect(address).await.unwrap();
    let get_directory = |digest: B3Digest| GetDirectoryRequest {
        by_what: Some(ByWhat::Digest(digest.to_bytes())),
        recursive: false,
    };
    let get_path_info = || GetPathInfoRequest {
        by_what: Some(get_path_info_request::ByWhat::ByOutputHash(
            store_path(1).hash().to_vec().into(),
        )),
    };
    let unknown = B3Digest::from([3; 32]);
    let status = first_answer(&mut directories, get_directory(unknown)).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
    let answer = path_infos.get(get_path_info()).await;
    assert_eq!(answer.unwrap_err().code(), Code::NotFound);

    pg.stop().unwrap();
    let named = format!("127.0.0.1:{}", pg.port());
    let status = first_answer(&mut directories, get_directory(unknown))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&named), "{status:?}");
    let status = path_infos.get(get_path_info()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&named), "{status:?}");

    pg.start_again().unwrap();
    let answer = path_infos.get(get_path_info()).await;
    assert_eq!(answer.unwrap_err().code(), Code::NotFound, "served again");
}
