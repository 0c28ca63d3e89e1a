//! The key covers what affects a build and only that; a record answers
//! only while its outputs are whole in the asking tenant's view.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use super::*;
use crate::castore::from_addr::temp_store;
use crate::castore::scoped::{Grants, Scoping};
use crate::executor::request::{EnvVar, Layout};
use crate::executor::tests::request;
use crate::tenant::Identity;
use kiln_guest::contract::Outcome;

fn tenant(name: &str) -> Tenant {
    Tenant::parse(name).unwrap()
}

fn validated() -> BuildRequest {
    crate::grpc::request::from_snix(&request(vec![])).unwrap()
}

fn report() -> Report {
    Report {
        outcome: Outcome::Exited { code: 0 },
        boot_ms: 1,
        setup_ms: 2,
        build_ms: 3,
        waited_ms: None,
    }
}

#[test]
fn the_key_is_the_tenant_and_what_affects_the_build() {
    let req = validated();
    let a = key(&tenant("a"), &req);
    assert_eq!(a, key(&tenant("a"), &req.clone()), "stable");
    assert_ne!(a, key(&tenant("b"), &req), "per tenant");

    let mut other_layout = req.clone();
    other_layout.layout = Layout::Tvix;
    assert_eq!(
        a,
        key(&tenant("a"), &other_layout),
        "the answer's shape is not in it"
    );

    type Change = Box<dyn Fn(&mut BuildRequest)>;
    let changes: Vec<Change> = vec![
        Box::new(|r| r.command_args.push("x".into())),
        Box::new(|r| r.argv0 = Some("sh".into())),
        Box::new(|r| {
            r.environment_vars.push(EnvVar {
                key: "K".into(),
                value: b"v".to_vec(),
            })
        }),
        Box::new(|r| r.constraints.system.push('x')),
        Box::new(|r| r.constraints.min_memory += 1),
        Box::new(|r| r.constraints.network_access = !r.constraints.network_access),
        Box::new(|r| r.constraints.provide_bin_sh = !r.constraints.provide_bin_sh),
        Box::new(|r| r.refscan_needles.push("n".into())),
        Box::new(|r| r.outputs.push(RelPath::parse("nix/store/other").unwrap())),
    ];
    for (i, change) in changes.iter().enumerate() {
        let mut changed = req.clone();
        change(&mut changed);
        assert_ne!(a, key(&tenant("a"), &changed), "change {i} is in the key");
    }

    // Length prefixes: moving bytes between neighbouring values changes it.
    let mut ab = req.clone();
    ab.command_args = vec!["ab".into(), "c".into()];
    let mut a_bc = req.clone();
    a_bc.command_args = vec!["a".into(), "bc".into()];
    assert_ne!(key(&tenant("a"), &ab), key(&tenant("a"), &a_bc));
}

#[tokio::test]
async fn a_record_answers_while_its_outputs_are_in_the_tenants_view() {
    let base = temp_store();
    let scoping = Scoping::by_tenant(Grants::in_memory().unwrap());
    let a = scoping.store_for(&base.store, &Identity::client(tenant("a")));
    let b = scoping.store_for(&base.store, &Identity::client(tenant("b")));
    let mut bytes: &[u8] = b"the output";
    let stored = a.blobs.put(&mut bytes).await.unwrap();
    let recorded = Recorded {
        build_id: "first".into(),
        built_at_unix: 1_700_000_000,
        outputs: vec![BuiltOutput {
            path: RelPath::parse("nix/store/out").unwrap(),
            node: Node::File {
                digest: stored.digest,
                size: stored.size,
                executable: false,
            },
            needles: vec![0],
        }],
        report: report(),
    };
    let cache = ResultCache::in_memory().unwrap();
    let k = key(&tenant("a"), &validated());
    assert!(cache.lookup(k, &a).await.unwrap().is_none(), "nothing yet");
    cache.record(k, &recorded).await.unwrap();

    let hit = cache.lookup(k, &a).await.unwrap().expect("a hit");
    assert_eq!(hit.build_id, "first");
    assert_eq!(hit.outputs, recorded.outputs);
    assert_eq!(hit.report, recorded.report);
    // The same key through a view that lacks the output: a miss.
    assert!(cache.lookup(k, &b).await.unwrap().is_none());

    // A record of a directory whose tree is gone: a miss.
    let gone = Recorded {
        outputs: vec![BuiltOutput {
            path: RelPath::parse("nix/store/dir").unwrap(),
            node: Node::Directory {
                digest: B3Digest::from(*blake3::hash(b"no such directory").as_bytes()),
                size: 1,
            },
            needles: vec![],
        }],
        ..recorded
    };
    cache.record(k, &gone).await.unwrap();
    assert!(cache.lookup(k, &a).await.unwrap().is_none());
}

#[test]
fn a_damaged_record_is_a_miss_not_an_error() {
    assert!(decode(b"not json").is_none());
    assert!(decode(br#"{"build_id":"x","built_at_unix":0,"outputs":[{"path":"/abs","node":{"type":"symlink","target":[120]},"needles":[]}],"report":{"outcome":{"kind":"exited","code":0},"boot_ms":0,"setup_ms":0,"build_ms":0}}"#).is_none(), "an absolute path is refused");
}
