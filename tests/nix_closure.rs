//! Finding and importing a derivation's inputs from the local Nix store:
//! the build order of missing input derivations, closures from Nix's
//! database, and store paths ingested into a castore whose NAR hashes equal
//! what Nix recorded. Needs Nix (skips loudly without it).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;
#[path = "fixtures/nix/support.rs"]
mod support;

use std::collections::BTreeSet;

use kiln::nix::closure;
use kiln::nix::nar;

#[test]
fn plan_builds_missing_inputs_first() {
    if !support::nix_available() {
        return;
    }
    let dependent = support::instantiate("dependent");
    let file = support::instantiate("file");
    for attr in ["tree", "multi"] {
        support::realise(&support::instantiate(attr));
    }
    let file_drv = closure::read_derivation(&file).unwrap();
    let file_out = file_drv.outputs["out"].path.clone().unwrap();
    support::try_delete(std::slice::from_ref(&file_out));
    if closure::invalid_paths(std::slice::from_ref(&file_out))
        .unwrap()
        .is_empty()
    {
        harness::skip(format!(
            "{file_out} is still valid (something refers to it), so no input is missing"
        ));
        return;
    }

    let plan = closure::plan(&dependent).unwrap();
    assert_eq!(plan.order, [file.clone(), dependent.clone()]);
    // Every direct input derivation was read, so its outputs are known.
    let outputs_of = plan.outputs_of();
    let drv = &plan.derivations[&dependent];
    let roots = closure::input_roots(&dependent, drv, &outputs_of).unwrap();
    assert!(roots.contains(&file_out));
    assert!(roots.contains(&support::toolset()));
    assert_eq!(roots.len(), 5, "{roots:?}");

    // Once built, nothing is left to build but the derivation itself.
    support::realise(&file);
    assert_eq!(closure::plan(&dependent).unwrap().order, [dependent]);
}

#[tokio::test]
async fn imported_closure_has_nix_s_nar_hashes() {
    if !support::nix_available() {
        return;
    }
    let multi = support::instantiate("multi");
    let outputs = support::realise(&multi);
    let out = outputs.iter().find(|p| p.name() == "multi-output").unwrap();
    let closure = closure::requisites(&BTreeSet::from([out.clone()])).unwrap();
    // `out/bin/tool` names `dev` and its shebang the toolset.
    let names: BTreeSet<&str> = closure.iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["multi-output", "multi-output-dev", "busybox-static"])
    );

    let dir = tempfile::tempdir().unwrap();
    let store = kiln::castore::from_addr::embedded(dir.path()).unwrap();
    let nodes = closure::import(&store, &closure).await.unwrap();
    assert_eq!(
        nodes.keys().collect::<BTreeSet<_>>(),
        closure.iter().collect()
    );
    for (path, node) in &nodes {
        let hash = nar::nar_hash(&store, node).await.unwrap();
        assert_eq!(hash.to_string(), support::query_hash(path), "{path}");
    }
}

#[test]
fn nix_store_errors_are_reported() {
    if !support::nix_available() {
        return;
    }
    let bogus = "/nix/store/00000000000000000000000000000000-not-there"
        .parse()
        .unwrap();
    let err = closure::requisites(&BTreeSet::from([bogus])).unwrap_err();
    assert!(
        matches!(err, closure::ClosureError::NixStoreFailed { .. }),
        "{err}"
    );
    let bogus_drv = "/nix/store/00000000000000000000000000000000-not-there.drv"
        .parse()
        .unwrap();
    let err = closure::plan(&bogus_drv).unwrap_err();
    assert!(
        matches!(err, closure::ClosureError::ReadDerivation { .. }),
        "{err}"
    );
}
