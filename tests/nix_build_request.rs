//! Derivations produced by real Nix 2.8 (`tests/fixtures/nix/*.drv`, made
//! from `conformance.nix`) are parsed, printed back byte for byte, and turned
//! into build requests set up the way Nix's sandbox runs them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln::castore::{B3Digest, Node};
use kiln::nix::build_request::{
    build_request, pass_as_file_name, BuildRequestError, RequestOptions,
};
use kiln::nix::{Derivation, StorePath};
use kiln::proto::snix_build::BuildRequest;

const TOOLSET: &str = "/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static";

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nix")
}

/// `(attribute, store path of the .drv)` from `drvs.txt`.
fn manifest() -> Vec<(String, StorePath)> {
    let text = std::fs::read_to_string(fixture_dir().join("drvs.txt")).unwrap();
    text.lines()
        .map(|line| {
            let (attr, path) = line.split_once(' ').unwrap();
            (attr.to_owned(), path.parse().unwrap())
        })
        .collect()
}

fn fixture(attr: &str) -> Derivation {
    Derivation::read(&fixture_dir().join(format!("{attr}.drv"))).unwrap()
}

/// Output paths of every fixture derivation, by drv path, as the closure
/// import would find them.
fn outputs_of() -> BTreeMap<StorePath, BTreeMap<String, StorePath>> {
    manifest()
        .into_iter()
        .map(|(attr, drv_path)| {
            let outputs = fixture(&attr)
                .outputs
                .into_iter()
                .map(|(name, o)| (name, o.path.unwrap()))
                .collect();
            (drv_path, outputs)
        })
        .collect()
}

/// A stand-in node per store path: the request only names inputs.
fn node(path: &StorePath) -> Node {
    Node::File {
        digest: B3Digest::of(path.to_string().as_bytes()),
        size: 1,
        executable: true,
    }
}

/// The direct inputs of a fixture as the request needs them.
fn inputs(drv: &Derivation) -> BTreeMap<StorePath, Node> {
    let outputs_of = outputs_of();
    let mut inputs: BTreeMap<StorePath, Node> = drv
        .input_sources
        .iter()
        .map(|p| (p.clone(), node(p)))
        .collect();
    for (input_drv, names) in &drv.input_derivations {
        for name in names {
            let path = outputs_of[input_drv][name].clone();
            inputs.insert(path.clone(), node(&path));
        }
    }
    inputs
}

fn request(attr: &str) -> BuildRequest {
    let drv = fixture(attr);
    let options = RequestOptions {
        build_cores: 2,
        ..RequestOptions::default()
    };
    build_request(&drv, &inputs(&drv), &outputs_of(), &options).unwrap()
}

fn env(request: &BuildRequest) -> BTreeMap<String, String> {
    request
        .environment_vars
        .iter()
        .map(|v| (v.key.clone(), String::from_utf8(v.value.to_vec()).unwrap()))
        .collect()
}

#[test]
fn every_fixture_round_trips() {
    for (attr, drv_path) in manifest() {
        let bytes = std::fs::read(fixture_dir().join(format!("{attr}.drv"))).unwrap();
        let drv = Derivation::parse(&bytes).unwrap();
        assert_eq!(drv.to_aterm(), bytes, "{attr}");
        assert!(drv_path.is_derivation());
        assert_eq!(drv.system, "x86_64-linux");
        assert!(
            drv.input_sources.contains(&TOOLSET.parse().unwrap()),
            "{attr}"
        );
    }
}

#[test]
fn environment_is_what_nix_2_8_gives_the_builder() {
    let request = request("environment");
    let env = env(&request);
    // Exactly what the builder saw under `nix-store --realise` here (its
    // output `env` file), minus SHLVL which busybox sh adds itself.
    let expected: BTreeMap<&str, &str> = [
        ("HOME", "/homeless-shelter"),
        ("NIX_BUILD_CORES", "2"),
        ("NIX_BUILD_TOP", "/build"),
        ("NIX_LOG_FD", "2"),
        ("NIX_STORE", "/nix/store"),
        (
            "PATH",
            "/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static/bin",
        ),
        ("PWD", "/build"),
        ("TEMP", "/build"),
        ("TEMPDIR", "/build"),
        ("TERM", "xterm-256color"),
        ("TMP", "/build"),
        ("TMPDIR", "/build"),
        (
            "builder",
            "/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static/bin/busybox",
        ),
        ("custom", "a \"quoted\" value\twith\\escapes\nand lines"),
        ("name", "environment"),
        (
            "out",
            "/nix/store/rzxv61krbrd8hrq53fg6k4fh3gi78sms-environment",
        ),
        ("system", "x86_64-linux"),
    ]
    .into_iter()
    .collect();
    let got: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got, expected);
    let keys: Vec<&String> = request.environment_vars.iter().map(|v| &v.key).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted by key");

    assert_eq!(request.command_args[0], format!("{TOOLSET}/bin/busybox"));
    assert_eq!(&request.command_args[1..3], ["sh", "-e"]);
    assert_eq!(request.working_dir, "build");
    assert_eq!(request.scratch_paths, ["build", "nix/store"]);
    assert_eq!(request.inputs_dir, "nix/store");
    assert_eq!(
        request.outputs,
        ["nix/store/rzxv61krbrd8hrq53fg6k4fh3gi78sms-environment"]
    );
    let constraints = request.constraints.unwrap();
    assert_eq!(constraints.system, "x86_64-linux");
    assert!(
        !constraints.provide_bin_sh,
        "Debian's Nix 2.8 has no /bin/sh"
    );
    assert!(!constraints.network_access);
    assert!(request.additional_files.is_empty());
}

#[test]
fn pass_as_file_becomes_an_additional_file() {
    let request = request("passAsFile");
    let env = env(&request);
    // The name Nix used here (the build's `path` output file).
    let file = ".attr-1df9jhyajhb0gqqsh06ln0s7kwdiigwm70jiggd8g8kchq8ygd32";
    assert_eq!(pass_as_file_name("bigText"), file);
    assert_eq!(env["bigTextPath"], format!("/build/{file}"));
    assert!(
        !env.contains_key("bigText"),
        "the variable itself is removed"
    );
    assert_eq!(env["passAsFile"], "bigText");
    assert_eq!(request.additional_files.len(), 1);
    let added = &request.additional_files[0];
    assert_eq!(added.path, format!("build/{file}"));
    assert_eq!(&added.contents[..], b"line one\nline two\n\"quoted\"\n");
}

#[test]
fn several_outputs_in_output_name_order() {
    let request = request("multi");
    let drv = fixture("multi");
    let expected: Vec<String> = ["dev", "doc", "out"]
        .iter()
        .map(|name| {
            format!(
                "nix/store/{}",
                drv.outputs[*name].path.as_ref().unwrap().basename()
            )
        })
        .collect();
    assert_eq!(request.outputs, expected);
    // Needle i is output i; then the inputs.
    for (i, name) in ["dev", "doc", "out"].iter().enumerate() {
        let path = drv.outputs[*name].path.as_ref().unwrap();
        assert_eq!(request.refscan_needles[i], path.hash_part());
    }
    assert_eq!(
        request.refscan_needles[3],
        "ky1751a7z5nxdxdiaq44ps81zs13fdya"
    );
}

#[test]
fn dependent_gets_the_outputs_of_its_input_derivations() {
    let request = request("dependent");
    let names: Vec<String> = request
        .inputs
        .iter()
        .map(|e| match e.entry.as_ref().unwrap() {
            kiln::proto::snix_castore::entry::Entry::File(f) => {
                String::from_utf8(f.name.to_vec()).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "inputs sorted by name");
    for needed in [
        "iip5v76m027kzk269748hrhgf8gmp3zx-file-output",
        "jcakvsr4vhn9n0ql68qw3qhi653q1lcf-multi-output-dev",
        "6662w6fn9x2n8v0b752v0vgsq38bgahv-multi-output",
        "0xwyjmgl3k97ivgsnk2qg4wccfrfswrz-tree-output",
        "ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static",
    ] {
        assert!(names.iter().any(|n| n == needed), "{needed} missing");
        let hash = &needed[..32];
        assert!(request.refscan_needles.iter().any(|n| n == hash));
    }
    assert_eq!(names.len(), 5);
}

#[test]
fn missing_inputs_are_named() {
    let drv = fixture("dependent");
    let mut inputs = inputs(&drv);
    let file_output: StorePath = "/nix/store/iip5v76m027kzk269748hrhgf8gmp3zx-file-output"
        .parse()
        .unwrap();
    inputs.remove(&file_output);
    let err = build_request(&drv, &inputs, &outputs_of(), &RequestOptions::default()).unwrap_err();
    assert!(
        matches!(err, BuildRequestError::MissingInput(ref p) if p == &file_output.to_string()),
        "{err}"
    );
}

#[test]
fn fixed_output_derivations_get_network_and_nix_output_checked() {
    let request = request("fixed");
    let env = env(&request);
    assert_eq!(env["NIX_OUTPUT_CHECKED"], "1");
    assert!(request.constraints.unwrap().network_access);
}

#[test]
fn structured_attributes_become_attrs_files_like_nix_wrote_them() {
    let request = request("structured");
    let env = env(&request);
    assert!(!env.contains_key("name"), "no derivation variables");
    assert!(!env.contains_key("PATH") || env["PATH"] == "/path-not-set");
    assert_eq!(env["NIX_ATTRS_JSON_FILE"], "/build/.attrs.json");
    assert_eq!(env["NIX_ATTRS_SH_FILE"], "/build/.attrs.sh");
    let files: BTreeMap<&str, &[u8]> = request
        .additional_files
        .iter()
        .map(|f| (f.path.as_str(), &f.contents[..]))
        .collect();
    // What the builder copied out of /build under `nix-store --realise`.
    let nix_json = std::fs::read(fixture_dir().join("structured.attrs.json")).unwrap();
    let nix_sh = std::fs::read(fixture_dir().join("structured.attrs.sh")).unwrap();
    assert_eq!(files["build/.attrs.json"], nix_json.as_slice());
    assert_eq!(files["build/.attrs.sh"], nix_sh.as_slice());
    assert_eq!(files.len(), 2);
}
