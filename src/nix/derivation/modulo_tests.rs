//! `hashDerivationModulo` against derivations Nix 2.8 wrote
//! (tests/fixtures/nix/modulo): kiln must compute the very output paths.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use super::*;

const FIXED: &[u8] = include_bytes!("../../../tests/fixtures/nix/modulo/modulo-fixed.drv");
const BASE: &[u8] = include_bytes!("../../../tests/fixtures/nix/modulo/modulo-base.drv");
const MULTI: &[u8] = include_bytes!("../../../tests/fixtures/nix/modulo/modulo-multi.drv");

fn path(s: &str) -> StorePath {
    s.parse().unwrap()
}

/// The three derivations and the unmasked hashes of the first two.
fn graph() -> (Derivation, BTreeMap<StorePath, [u8; 32]>) {
    let fixed = Derivation::parse(FIXED).unwrap();
    let base = Derivation::parse(BASE).unwrap();
    let mut hashes = BTreeMap::new();
    let fixed_hash = fixed.hash_modulo("modulo-fixed", false, &hashes).unwrap();
    hashes.insert(
        path("/nix/store/0a24zwic8jkzvz9zpihzkqd9l5wmn95s-modulo-fixed.drv"),
        fixed_hash,
    );
    base.check_output_paths("modulo-base", &hashes).unwrap();
    let base_hash = base.hash_modulo("modulo-base", false, &hashes).unwrap();
    hashes.insert(
        path("/nix/store/0zv8g455rzzv8ynmrfwqlfkzbg18slx3-modulo-base.drv"),
        base_hash,
    );
    (Derivation::parse(MULTI).unwrap(), hashes)
}

#[test]
fn nixs_output_paths_are_recomputed() {
    let fixed = Derivation::parse(FIXED).unwrap();
    fixed
        .check_output_paths("modulo-fixed", &BTreeMap::new())
        .unwrap();
    let (multi, hashes) = graph();
    multi.check_output_paths("modulo-multi", &hashes).unwrap();
    let paths = multi
        .expected_output_paths("modulo-multi", &hashes)
        .unwrap();
    assert_eq!(
        paths["dev"].to_string(),
        "/nix/store/85zh253mvgf01dxnywwzxbx1qy843g36-modulo-multi-dev"
    );
    assert_eq!(
        paths["out"].to_string(),
        "/nix/store/v8x4xf515728q45skb70bs8n66b8bg10-modulo-multi"
    );
}

#[test]
fn a_derivation_claiming_another_output_path_is_refused() {
    let (mut multi, hashes) = graph();
    let stolen = path("/nix/store/wjic8pz3j8y9z9jccn38241hkdaaf8gm-modulo-base");
    multi.outputs.get_mut("out").unwrap().path = Some(stolen.clone());
    multi
        .environment
        .insert("out".into(), stolen.to_string().into_bytes());
    let err = multi
        .check_output_paths("modulo-multi", &hashes)
        .unwrap_err();
    assert!(matches!(err, OutputPathError::WrongPath { .. }), "{err}");
}

#[test]
fn a_changed_builder_or_input_changes_the_paths() {
    let (mut multi, hashes) = graph();
    multi.arguments.push("extra".into());
    let err = multi
        .check_output_paths("modulo-multi", &hashes)
        .unwrap_err();
    assert!(matches!(err, OutputPathError::WrongPath { .. }), "{err}");
    let (multi, mut hashes) = graph();
    hashes.values_mut().next().unwrap()[0] ^= 1;
    assert!(multi.check_output_paths("modulo-multi", &hashes).is_err());
    let (multi, _) = graph();
    let err = multi
        .check_output_paths("modulo-multi", &BTreeMap::new())
        .unwrap_err();
    assert!(matches!(err, OutputPathError::MissingInput(_)), "{err}");
}

#[test]
fn an_output_variable_must_hold_its_path() {
    let (mut multi, hashes) = graph();
    multi
        .environment
        .insert("dev".into(), b"/tmp/elsewhere".to_vec());
    let err = multi
        .check_output_paths("modulo-multi", &hashes)
        .unwrap_err();
    assert!(
        matches!(err, OutputPathError::WrongEnvironment { ref output, .. } if output == "dev"),
        "{err}"
    );
}
