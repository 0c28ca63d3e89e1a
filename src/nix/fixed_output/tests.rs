//! Declarations in every algorithm, mode and form checked against outputs in
//! a real (embedded) castore, with hashes other programs computed
//! ([`crate::nix::hash::vectors`]); and each way a declaration or an output
//! is refused.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use super::*;
use crate::castore::{ingest, IngestMode, Store};
use crate::nix::hash::vectors::{Forms, CONTENTS, VECTORS};

fn declared(hash_algorithm: &str, hash: &str) -> Output {
    Output {
        path: None,
        hash_algorithm: hash_algorithm.to_owned(),
        hash: hash.to_owned(),
    }
}

/// Every form Nix reads one digest in.
fn every_form(algorithm: HashAlgorithm, forms: &Forms) -> Vec<String> {
    vec![
        forms.base16.to_owned(),
        forms.base16.to_ascii_uppercase(),
        forms.nixbase32.to_owned(),
        forms.base64.to_owned(),
        format!("{algorithm}-{}", forms.base64),
        format!("{algorithm}:{}", forms.nixbase32),
    ]
}

/// An embedded store holding `fixed` ([`CONTENTS`]), the same executable,
/// and a small tree; their nodes.
struct Fixture {
    store: Store,
    file: Node,
    executable: Node,
    tree: Node,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::castore::from_addr::embedded(&dir.path().join("store")).unwrap();
    let add = |path: &Path| {
        let store = &store;
        let path = path.to_owned();
        async move { ingest(store, &path, IngestMode::Copy).await.unwrap() }
    };
    let file = dir.path().join("fixed");
    std::fs::write(&file, CONTENTS).unwrap();
    let exe = dir.path().join("exe");
    std::fs::write(&exe, CONTENTS).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // What the pinned tree hashes below were computed over.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("a"), CONTENTS).unwrap();
    std::fs::write(tree.join("b"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        tree.join("b"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a", tree.join("c")).unwrap();
    Fixture {
        file: add(&file).await,
        executable: add(&exe).await,
        tree: add(&tree).await,
        store,
        _dir: dir,
    }
}

#[tokio::test]
async fn accepts_every_algorithm_mode_and_form() {
    let f = fixture().await;
    for v in &VECTORS {
        let a = v.algorithm;
        for (prefix, forms) in [("", &v.flat), ("r:", &v.recursive)] {
            for hash in every_form(a, forms) {
                let output = declared(&format!("{prefix}{a}"), &hash);
                verify(&f.store, &output, &f.file)
                    .await
                    .unwrap_or_else(|e| panic!("{prefix}{a} {hash}: {e}"));
            }
        }
    }
    for hash in every_form(HashAlgorithm::Sha256, &VECTORS[2].flat) {
        verify(&f.store, &declared("text:sha256", &hash), &f.file)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn hashes_a_tree_recursively_like_nix() {
    // `nix-hash --type A tree`, equal to `nix-store --dump tree | Asum`, for
    // the tree `fixture` builds: a (`fixed\n`), b (`#!/bin/sh\n`, mode 755),
    // c -> a, d/ (empty).
    let f = fixture().await;
    let pinned = [
        ("md5", "4f0f17d3f1ce7d9af73cdedf54344650"),
        ("sha1", "82ae9983ac2c295322a4752e24984687795a8ff7"),
        (
            "sha256",
            "2dfd46a2b391f43a1fc3576d1d9a25ca8d1df46abb704dee49653cabe71168c7",
        ),
        (
            "sha512",
            "1e9d465956af6a1a63ea73cf43e148679953e747907a998279d29021cd0b7c71\
             bc254e6b71165f7f5c045359cf8da1b07a7c2ee9ce0661c393e75f40ef6d5c33",
        ),
    ];
    for (algorithm, hex) in pinned {
        let output = declared(&format!("r:{algorithm}"), hex);
        verify(&f.store, &output, &f.tree)
            .await
            .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
    }
}

#[tokio::test]
async fn a_mismatch_names_both_hashes_in_sri_form() {
    let f = fixture().await;
    // The recursive hash declared for a flat output: Nix's classic mistake.
    let output = declared("sha256", VECTORS[2].recursive.base16);
    let err = verify(&f.store, &output, &f.file).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "hash mismatch:\n  \
         specified: sha256-N8z8zjE1gJtQA9jNt9BzmdII3NGO59dM4e9+iSUVwx8=\n  \
         got:       sha256-DDBxQY5jVuYUiYyE7QZMqV6IVRvAgRtTS98ZUuza5TQ="
    );
    // Every algorithm: flat declared, recursive computed.
    for v in &VECTORS {
        let a = v.algorithm;
        let output = declared(&format!("r:{a}"), v.flat.nixbase32);
        match verify(&f.store, &output, &f.file).await {
            Err(FixedOutputError::Mismatch(m)) => {
                assert_eq!(m.specified.to_sri(), format!("{a}-{}", v.flat.base64));
                assert_eq!(m.got.to_sri(), format!("{a}-{}", v.recursive.base64));
            }
            other => panic!("{a}: {other:?}"),
        }
    }
}

#[test]
fn an_unknown_algorithm_is_named_with_its_field() {
    let hash = VECTORS[2].flat.base16;
    for value in ["sha3", "r:blake3", "", "text:", "SHA256", "x:sha256"] {
        let err = FixedOutputHash::of(&declared(value, hash)).unwrap_err();
        assert!(
            matches!(err, FixedOutputError::Algorithm { .. }),
            "{value}: {err:?}"
        );
        assert!(
            err.to_string().starts_with(&format!("hashAlgo {value:?} ")),
            "{err}"
        );
    }
    let err = FixedOutputHash::of(&declared("text:sha1", VECTORS[1].flat.base16)).unwrap_err();
    assert!(
        matches!(err, FixedOutputError::TextNeedsSha256 { .. }),
        "{err:?}"
    );
}

#[test]
fn a_malformed_hash_is_named_with_its_field() {
    let sha256 = &VECTORS[2].flat;
    let sri_of_sha512 = format!("sha512-{}", VECTORS[3].flat.base64);
    let sri_prefix_only = format!("sha512-{}", sha256.base64);
    let short = &sha256.base16[..63];
    let bad_char = format!("z{}", &sha256.base16[1..]);
    type Expected = fn(&HashError) -> bool;
    let cases: [(&str, Expected); 6] = [
        (short, |e| matches!(e, HashError::Length { len: 63, .. })),
        (&bad_char, |e| matches!(e, HashError::Base16(_))),
        (&sri_prefix_only, |e| {
            matches!(e, HashError::OtherAlgorithm { .. })
        }),
        (&sri_of_sha512, |e| {
            matches!(e, HashError::OtherAlgorithm { .. })
        }),
        // sha1's hash where sha256 is declared.
        (VECTORS[1].flat.base16, |e| {
            matches!(e, HashError::Length { len: 40, .. })
        }),
        ("", |e| matches!(e, HashError::Length { len: 0, .. })),
    ];
    for (value, expected) in cases {
        let err = FixedOutputHash::of(&declared("sha256", value)).unwrap_err();
        match &err {
            FixedOutputError::Hash { source, .. } if expected(source) => {}
            other => panic!("{value}: {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!("hash {value:?} (outputHash) is not a sha256 hash")
        );
    }
}

#[tokio::test]
async fn a_flat_output_must_be_a_plain_file() {
    let f = fixture().await;
    let hash = VECTORS[2].flat.base16;
    for mode in ["sha256", "text:sha256"] {
        let err = verify(&f.store, &declared(mode, hash), &f.tree)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FixedOutputError::NotAFile {
                    kind: "directory",
                    ..
                }
            ),
            "{mode}: {err:?}"
        );
        // Nix 2.8 refuses it too: "should be a non-executable regular file
        // since recursive hashing is not enabled (outputHashMode=flat)".
        let err = verify(&f.store, &declared(mode, hash), &f.executable)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FixedOutputError::Executable { .. }),
            "{mode}: {err:?}"
        );
    }
}
