//! Every algorithm in every form against values other programs computed
//! ([`super::vectors`]), and each way a declared hash can be malformed.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use super::vectors::{Forms, CONTENTS, VECTORS};
use super::*;

fn all_forms(forms: &Forms) -> [&'static str; 3] {
    [forms.base16, forms.nixbase32, forms.base64]
}

#[test]
fn lengths_follow_from_the_digest_size() {
    let lengths: Vec<_> = HashAlgorithm::ALL
        .iter()
        .map(|a| (a.base16_len(), a.nixbase32_len(), a.base64_len()))
        .collect();
    assert_eq!(
        lengths,
        [(32, 26, 24), (40, 32, 28), (64, 52, 44), (128, 103, 88)]
    );
}

#[test]
fn hashes_and_prints_like_coreutils_and_nix() {
    for v in &VECTORS {
        let mut hasher = Hasher::new(v.algorithm);
        // In two pieces, to see that pieces add up.
        hasher.update(&CONTENTS[..2]);
        hasher.update(&CONTENTS[2..]);
        let hash = hasher.finish();
        assert_eq!(hash.algorithm(), v.algorithm);
        assert_eq!(hash.to_base16(), v.flat.base16);
        assert_eq!(hash.to_nixbase32(), v.flat.nixbase32);
        assert_eq!(hash.to_base64(), v.flat.base64);
        let sri = format!("{}-{}", v.algorithm, v.flat.base64);
        assert_eq!(hash.to_sri(), sri);
        assert_eq!(hash.to_string(), sri);
    }
}

#[test]
fn parses_every_form_of_every_algorithm() {
    for v in &VECTORS {
        for forms in [&v.flat, &v.recursive] {
            let expected =
                Hash::from_digest(v.algorithm, &hex::decode(forms.base16).unwrap()).unwrap();
            let a = v.algorithm;
            let mut inputs: Vec<String> = all_forms(forms).map(str::to_owned).to_vec();
            inputs.push(forms.base16.to_ascii_uppercase());
            inputs.push(format!("{a}-{}", forms.base64));
            inputs.extend(all_forms(forms).map(|f| format!("{a}:{f}")));
            for input in inputs {
                assert_eq!(Hash::parse(&input, a), Ok(expected), "{input}");
            }
        }
    }
}

#[test]
fn names_the_algorithm_nix_does_not_know() {
    assert_eq!(
        "sha3".parse::<HashAlgorithm>(),
        Err(HashError::UnknownAlgorithm("sha3".into()))
    );
    let v = &VECTORS[2];
    let err = Hash::parse(&format!("blake3-{}", v.flat.base64), HashAlgorithm::Sha256);
    assert_eq!(err, Err(HashError::UnknownAlgorithm("blake3".into())));
}

#[test]
fn refuses_a_prefix_naming_another_algorithm() {
    // The sha256 vector's base64 under a sha512 SRI prefix, and sha1's
    // hash with an `md5:` prefix.
    let sha256 = &VECTORS[2].flat;
    let err = Hash::parse(&format!("sha512-{}", sha256.base64), HashAlgorithm::Sha256);
    assert_eq!(
        err,
        Err(HashError::OtherAlgorithm {
            expected: HashAlgorithm::Sha256,
            found: HashAlgorithm::Sha512
        })
    );
    let sha1 = &VECTORS[1].flat;
    let err = Hash::parse(&format!("md5:{}", sha1.base16), HashAlgorithm::Sha1);
    assert!(
        matches!(err, Err(HashError::OtherAlgorithm { .. })),
        "{err:?}"
    );
}

#[test]
fn refuses_wrong_lengths() {
    for v in &VECTORS {
        let a = v.algorithm;
        // One character short of each form, and the other algorithms' forms.
        for form in all_forms(&v.flat) {
            let short = &form[..form.len() - 1];
            assert_eq!(
                Hash::parse(short, a),
                Err(HashError::Length {
                    algorithm: a,
                    len: short.len()
                }),
                "{short}"
            );
        }
        for other in VECTORS.iter().filter(|o| o.algorithm != a) {
            for form in all_forms(&other.flat) {
                assert!(Hash::parse(form, a).is_err(), "{a} accepted {form}");
            }
        }
        let sri = format!("{a}-{}", v.flat.base16);
        assert_eq!(
            Hash::parse(&sri, a),
            Err(HashError::SriLength {
                algorithm: a,
                len: v.flat.base16.len()
            })
        );
    }
    assert_eq!(
        Hash::parse("", HashAlgorithm::Sha256),
        Err(HashError::Length {
            algorithm: HashAlgorithm::Sha256,
            len: 0
        })
    );
    let message = Hash::parse("abc", HashAlgorithm::Sha256)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "3 characters; a sha256 hash has 64 (base16), 52 (nixbase32) or 44 (base64)"
    );
}

#[test]
fn refuses_characters_outside_the_encoding() {
    let v = &VECTORS[2].flat;
    let a = HashAlgorithm::Sha256;
    // `g` is not base16; `e` is not in Nix's alphabet; `!` is not base64.
    let base16 = format!("g{}", &v.base16[1..]);
    assert!(matches!(Hash::parse(&base16, a), Err(HashError::Base16(_))));
    let nixbase32 = format!("e{}", &v.nixbase32[1..]);
    assert!(matches!(
        Hash::parse(&nixbase32, a),
        Err(HashError::Nixbase32(_))
    ));
    let base64 = format!("!{}", &v.base64[1..]);
    assert!(matches!(Hash::parse(&base64, a), Err(HashError::Base64(_))));
    let sri = format!("sha256-{base64}");
    assert!(matches!(Hash::parse(&sri, a), Err(HashError::Base64(_))));
    // A multi-byte character of a valid form's length is refused, not split.
    let utf8 = format!("é{}", &v.base16[2..]);
    assert!(Hash::parse(&utf8, a).is_err());
}

#[test]
fn refuses_base64_that_hides_a_shorter_digest() {
    // 42 characters and `==`: 44 long, but 31 bytes.
    let v = &VECTORS[2].flat;
    let padded = format!("{}==", &v.base64[..42]);
    let err = Hash::parse(&padded, HashAlgorithm::Sha256).unwrap_err();
    assert!(
        matches!(
            err,
            HashError::Base64(_) | HashError::DecodedLength { bytes: 31, .. }
        ),
        "{err:?}"
    );
}
