//! Path infos through the wire message and back, every field the wire
//! check guards broken once and refused naming that field, and the embedded
//! (`redb`) store: put, get, list, replace, and what it holds surviving a
//! reopen, or refused as corrupt when the record no longer decodes.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use futures::StreamExt;

use super::redb::RedbPathInfoService;
use super::*;
use crate::castore::{B3Digest, PathComponent, SymlinkTarget};
use crate::proto::snix_castore;

/// Store path basenames (hash parts in nixbase32, 32 characters).
const HELLO: &str = "0bcdfghijklmnpqrsvwxyz0123456789-hello-2.12";
const GLIBC: &str = "1bcdfghijklmnpqrsvwxyz0123456789-glibc-2.38";
const DRV: &str = "2bcdfghijklmnpqrsvwxyz0123456789-hello-2.12.drv";
const OTHER: &str = "3bcdfghijklmnpqrsvwxyz0123456789-other";

fn path(basename: &str) -> StorePath {
    StorePath::from_basename(basename).unwrap()
}

fn sha256_ca(method: Method) -> String {
    let hash = Hash::from_digest(HashAlgorithm::Sha256, &[7; 32]).unwrap();
    ContentAddress::Fixed { method, hash }.to_string()
}

/// A path info with every optional field set: references (itself
/// included), a deriver, two signatures, a content address.
fn full_info() -> PathInfo {
    PathInfo {
        store_path: path(HELLO),
        node: Node::Directory {
            digest: B3Digest::from([1; 32]),
            size: 3,
        },
        references: [path(HELLO), path(GLIBC)].into_iter().collect(),
        nar_sha256: [2; 32],
        nar_size: 4096,
        deriver: Some(path(DRV)),
        signatures: vec![
            Signature {
                name: "cache.nixos.org-1".to_owned(),
                data: vec![3; 64],
            },
            Signature {
                name: "kiln-1".to_owned(),
                data: vec![4; 64],
            },
        ],
        ca: Some(sha256_ca(Method::Recursive)),
    }
}

/// A path info with nothing optional: no references, deriver, signatures
/// or content address.
fn bare_info(basename: &str) -> PathInfo {
    PathInfo {
        store_path: path(basename),
        node: Node::File {
            digest: B3Digest::from([5; 32]),
            size: 11,
            executable: false,
        },
        references: BTreeSet::new(),
        nar_sha256: [6; 32],
        nar_size: 128,
        deriver: None,
        signatures: Vec::new(),
        ca: None,
    }
}

fn round_trip(info: &PathInfo) -> PathInfo {
    PathInfo::try_from_wire(info.to_wire()).unwrap()
}

#[test]
fn a_full_path_info_survives_the_wire() {
    let info = full_info();
    assert_eq!(round_trip(&info), info);
}

#[test]
fn a_bare_path_info_survives_the_wire() {
    let info = bare_info(OTHER);
    assert_eq!(round_trip(&info), info);
    let wire = info.to_wire();
    let narinfo = wire.narinfo.unwrap();
    assert!(narinfo.deriver.is_none());
    assert!(narinfo.ca.is_none());
}

#[test]
fn every_node_kind_survives_the_wire() {
    let nodes = [
        Node::File {
            digest: B3Digest::from([8; 32]),
            size: 0,
            executable: true,
        },
        Node::Symlink {
            target: SymlinkTarget::try_from(&b"../lib/libfoo.so"[..]).unwrap(),
        },
        Node::Directory {
            digest: B3Digest::from([9; 32]),
            size: 0,
        },
    ];
    for node in nodes {
        let info = PathInfo {
            node: node.clone(),
            ..bare_info(OTHER)
        };
        assert_eq!(round_trip(&info).node, node);
    }
}

/// Each of Nix's content address kinds maps to its own wire value and
/// back, so a swapped row in either table shows.
#[test]
fn every_content_address_kind_survives_the_wire() {
    let mut addresses = Vec::new();
    let mut wire_kinds = BTreeSet::new();
    for algorithm in HashAlgorithm::ALL {
        let digest = vec![0x5a; algorithm.size()];
        let hash = Hash::from_digest(algorithm, &digest).unwrap();
        for method in [Method::Recursive, Method::Flat] {
            addresses.push(ContentAddress::Fixed { method, hash }.to_string());
        }
    }
    let text = Hash::from_digest(HashAlgorithm::Sha256, &[0x33; 32]).unwrap();
    addresses.push(ContentAddress::Text { hash: text }.to_string());
    for ca in &addresses {
        let info = PathInfo {
            ca: Some(ca.clone()),
            ..bare_info(OTHER)
        };
        let wire = info.to_wire();
        let wire_ca = wire.narinfo.as_ref().unwrap().ca.clone().unwrap();
        wire_kinds.insert(wire_ca.r#type);
        assert_eq!(
            PathInfo::try_from_wire(wire).unwrap().ca.as_deref(),
            Some(ca.as_str())
        );
    }
    assert_eq!(wire_kinds.len(), 9, "nine kinds, nine wire values");
    // And the wire value is the one the proto names for the kind.
    let recursive_sha256 = PathInfo {
        ca: Some(sha256_ca(Method::Recursive)),
        ..bare_info(OTHER)
    };
    let flat_sha256 = PathInfo {
        ca: Some(sha256_ca(Method::Flat)),
        ..bare_info(OTHER)
    };
    let kind = |info: &PathInfo| info.to_wire().narinfo.unwrap().ca.unwrap().r#type;
    assert_eq!(kind(&recursive_sha256), CaHash::NarSha256 as i32);
    assert_eq!(kind(&flat_sha256), CaHash::FlatSha256 as i32);
}

#[test]
fn the_wire_message_names_references_and_deriver_as_snix_does() {
    let wire = full_info().to_wire();
    let narinfo = wire.narinfo.as_ref().unwrap();
    // References in store path order, names beside digests.
    let mut expected: Vec<StorePath> = vec![path(HELLO), path(GLIBC)];
    expected.sort();
    let names: Vec<String> = expected.iter().map(StorePath::basename).collect();
    assert_eq!(narinfo.reference_names, names);
    for (digest, path) in wire.references.iter().zip(&expected) {
        assert_eq!(digest.as_ref(), path.hash());
    }
    // The deriver's name goes without `.drv`.
    let deriver = narinfo.deriver.as_ref().unwrap();
    assert_eq!(deriver.name, "hello-2.12");
    assert_eq!(deriver.digest.as_ref(), path(DRV).hash());
    // The node carries the store path's basename.
    let (name, _) = wire.node.clone().unwrap().try_into_named().unwrap();
    assert_eq!(name, PathComponent::try_from(HELLO).unwrap());
}

/// The name inside the wire node, whatever its kind.
fn node_name(wire: &mut snix_store::PathInfo) -> &mut bytes::Bytes {
    use snix_castore::entry::Entry;
    match wire.node.as_mut().unwrap().entry.as_mut().unwrap() {
        Entry::Directory(d) => &mut d.name,
        Entry::File(f) => &mut f.name,
        Entry::Symlink(s) => &mut s.name,
    }
}

fn narinfo(wire: &mut snix_store::PathInfo) -> &mut snix_store::NarInfo {
    wire.narinfo.as_mut().unwrap()
}

/// One broken rule: what, how to break a good message, the field the
/// error must name.
type Case = (&'static str, fn(&mut snix_store::PathInfo), &'static str);

const CASES: &[Case] = &[
    ("no node", |w| w.node = None, "node"),
    (
        "a node of no kind",
        |w| w.node = Some(snix_castore::Entry { entry: None }),
        "node",
    ),
    (
        "a node whose directory digest is short",
        |w| {
            use snix_castore::entry::Entry;
            if let Some(Entry::Directory(d)) = w.node.as_mut().unwrap().entry.as_mut() {
                d.digest = vec![1; 31].into();
            }
        },
        "node",
    ),
    (
        "a node named with a slash",
        |w| *node_name(w) = format!("{HELLO}/bin").into_bytes().into(),
        "node",
    ),
    (
        "a node name that is no store path",
        |w| *node_name(w) = bytes::Bytes::from_static(b"hello"),
        "node.name",
    ),
    (
        "a node name whose hash part is not nixbase32",
        // `e` is not in Nix's alphabet.
        |w| *node_name(w) = bytes::Bytes::from_static(b"ebcdfghijklmnpqrsvwxyz0123456789-hello"),
        "node.name",
    ),
    (
        "a node name with a bad store path name",
        |w| *node_name(w) = bytes::Bytes::from_static(b"0bcdfghijklmnpqrsvwxyz0123456789-a b"),
        "node.name",
    ),
    (
        "a node name that is not UTF-8",
        |w| *node_name(w) = bytes::Bytes::from_static(&[0xff, 0xfe]),
        "node.name",
    ),
    ("no narinfo", |w| w.narinfo = None, "narinfo"),
    (
        "a 31-byte NAR hash",
        |w| narinfo(w).nar_sha256 = vec![2; 31].into(),
        "narinfo.nar_sha256",
    ),
    (
        "an empty NAR hash",
        |w| narinfo(w).nar_sha256 = bytes::Bytes::new(),
        "narinfo.nar_sha256",
    ),
    (
        "a reference without a name",
        |w| {
            narinfo(w).reference_names.pop();
        },
        "narinfo.reference_names",
    ),
    (
        "a name without a reference",
        |w| {
            w.references.pop();
        },
        "narinfo.reference_names",
    ),
    (
        "a reference name that is no store path",
        |w| narinfo(w).reference_names[1] = "glibc".to_owned(),
        "narinfo.reference_names[1]",
    ),
    (
        "a reference digest of another path",
        |w| w.references[1] = path(OTHER).hash().to_vec().into(),
        "references[1]",
    ),
    (
        "a reference digest of 19 bytes",
        |w| w.references[0] = path(GLIBC).hash()[..19].to_vec().into(),
        "references[0]",
    ),
    (
        "a deriver digest of 19 bytes",
        |w| narinfo(w).deriver.as_mut().unwrap().digest = vec![1; 19].into(),
        "narinfo.deriver.digest",
    ),
    (
        "a deriver with a bad name",
        |w| narinfo(w).deriver.as_mut().unwrap().name = "hello 2.12".to_owned(),
        "narinfo.deriver.name",
    ),
    (
        "a content address of unknown kind",
        |w| narinfo(w).ca.as_mut().unwrap().r#type = 99,
        "narinfo.ca.type",
    ),
    (
        "a content address digest of the wrong length",
        |w| narinfo(w).ca.as_mut().unwrap().digest = vec![7; 20].into(),
        "narinfo.ca.digest",
    ),
];

#[test]
fn each_broken_field_is_refused_by_name() {
    // The good message passes, so each failure below is its own rule's.
    let good = full_info().to_wire();
    PathInfo::try_from_wire(good.clone()).unwrap();
    for (what, break_it, field) in CASES {
        let mut wire = good.clone();
        break_it(&mut wire);
        match PathInfo::try_from_wire(wire) {
            Err(PathInfoError::Invalid {
                field: got,
                problem,
            }) => {
                assert_eq!(got, *field, "{what}: wrong field ({problem})");
                assert!(!problem.is_empty(), "{what}: no problem stated");
            }
            other => panic!("{what}: want Invalid {{ field: {field} }}, got {other:?}"),
        }
    }
}

#[test]
fn the_error_message_names_the_field() {
    let mut wire = full_info().to_wire();
    narinfo(&mut wire).nar_sha256 = vec![2; 31].into();
    let err = PathInfo::try_from_wire(wire).unwrap_err();
    assert_eq!(
        err.to_string(),
        "path info: narinfo.nar_sha256: 31 bytes, want 32"
    );
}

// ---------------------------------------------------------------------------
// The embedded store.

fn open(dir: &tempfile::TempDir) -> RedbPathInfoService {
    RedbPathInfoService::open(&dir.path().join("pathinfo.redb")).unwrap()
}

async fn list_all(service: &RedbPathInfoService) -> Vec<PathInfo> {
    let mut all: Vec<PathInfo> = service.list().map(|r| r.unwrap()).collect::<Vec<_>>().await;
    all.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    all
}

#[tokio::test]
async fn put_then_get_gives_back_what_was_put() {
    let dir = tempfile::tempdir().unwrap();
    let service = open(&dir);
    let info = full_info();
    assert_eq!(service.put(info.clone()).await.unwrap(), info);
    let got = service.get(info.store_path.hash()).await.unwrap();
    assert_eq!(got, Some(info));
}

#[tokio::test]
async fn an_unknown_path_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let service = open(&dir);
    assert_eq!(service.get(path(OTHER).hash()).await.unwrap(), None);
    service.put(full_info()).await.unwrap();
    assert_eq!(service.get(path(OTHER).hash()).await.unwrap(), None);
    // A path that is only referred to is not known either.
    assert_eq!(service.get(path(GLIBC).hash()).await.unwrap(), None);
}

#[tokio::test]
async fn a_second_put_of_a_path_replaces_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let service = open(&dir);
    service.put(full_info()).await.unwrap();
    let newer = PathInfo {
        nar_size: 8192,
        signatures: Vec::new(),
        ..full_info()
    };
    service.put(newer.clone()).await.unwrap();
    assert_eq!(
        service.get(newer.store_path.hash()).await.unwrap(),
        Some(newer.clone())
    );
    assert_eq!(list_all(&service).await, vec![newer]);
}

#[tokio::test]
async fn list_gives_every_path_once() {
    let dir = tempfile::tempdir().unwrap();
    let service = open(&dir);
    assert!(list_all(&service).await.is_empty());
    let infos = vec![full_info(), bare_info(GLIBC), bare_info(OTHER)];
    for info in &infos {
        service.put(info.clone()).await.unwrap();
    }
    let mut expected = infos;
    expected.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    assert_eq!(list_all(&service).await, expected);
}

#[tokio::test]
async fn what_was_put_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let infos = vec![full_info(), bare_info(OTHER)];
    {
        let service = open(&dir);
        for info in &infos {
            service.put(info.clone()).await.unwrap();
        }
    }
    // Dropped: redb allows one open database per file, so this reopen
    // fails unless the first one was closed.
    let service = open(&dir);
    for info in &infos {
        assert_eq!(
            service.get(info.store_path.hash()).await.unwrap().as_ref(),
            Some(info)
        );
    }
    assert_eq!(list_all(&service).await.len(), 2);
}

#[tokio::test]
async fn a_record_that_no_longer_decodes_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pathinfo.redb");
    let bad = path(OTHER);
    {
        // The table as redb.rs lays it out: digest → encoded wire message.
        // The message decodes but has no node.
        let table: ::redb::TableDefinition<&[u8], &[u8]> =
            ::redb::TableDefinition::new("path_infos");
        let db = ::redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            let mut wire = bare_info(OTHER).to_wire();
            wire.node = None;
            let encoded = prost::Message::encode_to_vec(&wire);
            t.insert(bad.hash().as_slice(), encoded.as_slice()).unwrap();
            t.insert(path(GLIBC).hash().as_slice(), &b"\xff\xff\xff"[..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let service = RedbPathInfoService::open(&file).unwrap();
    match service.get(bad.hash()).await {
        Err(PathInfoError::Corrupt(key, inner)) => {
            assert_eq!(key, bad.hash_part());
            assert!(
                matches!(*inner, PathInfoError::Invalid { ref field, .. } if field == "node"),
                "{inner:?}"
            );
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
    match service.get(path(GLIBC).hash()).await {
        Err(PathInfoError::Corrupt(key, inner)) => {
            assert_eq!(key, path(GLIBC).hash_part());
            assert!(
                matches!(*inner, PathInfoError::Invalid { ref field, .. } if field == "encoding"),
                "{inner:?}"
            );
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
    // Listing reports each bad record instead of stopping or hiding it.
    let listed: Vec<_> = service.list().collect().await;
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .all(|r| matches!(r, Err(PathInfoError::Corrupt(..)))));
}

#[test]
fn a_record_stored_under_another_path_is_corrupt() {
    use prost::Message;
    let info = bare_info(OTHER);
    let bytes = info.to_wire().encode_to_vec();
    assert_eq!(
        super::decode_stored(info.store_path.hash(), &bytes).expect("its own key"),
        info
    );
    let elsewhere = path(HELLO);
    let err = super::decode_stored(elsewhere.hash(), &bytes).expect_err("another key");
    assert!(err.to_string().contains(&elsewhere.hash_part()), "{err}");
}
