//! Store paths of content-addressed paths, computed as Nix computes them,
//! and Nix's content-address strings (`text:sha256:…`, `fixed:r:sha256:…`).
//!
//! A store path's digest is the SHA-256 of a fingerprint
//! `<type>:sha256:<inner hash, hex>:/nix/store:<name>`, XOR-folded to 20
//! bytes. The type is `text` (plus `:<reference>` for each reference,
//! sorted) for texts such as `.drv` files, `source` (references likewise,
//! then `:self` if the path refers to itself) for recursive SHA-256, and
//! `output:out` for every other fixed output, whose inner hash is then the
//! SHA-256 of `fixed:out:<r:?><algorithm>:<hex>:`.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};

use super::{StorePath, StorePathError, STORE_DIR};
use crate::nix::fixed_output::{self, FixedOutputHash};
use crate::nix::hash::{Hash, HashAlgorithm, HashError};

/// How a fixed-output path's hash is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Over a single file's bytes.
    Flat,
    /// Over the NAR.
    Recursive,
}

/// A content address, as Nix records it for a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentAddress {
    /// A text (SHA-256 of its bytes), e.g. a `.drv` file.
    Text {
        /// The hash.
        hash: Hash,
    },
    /// A fixed output or an added source.
    Fixed {
        /// What the hash is taken over.
        method: Method,
        /// The hash.
        hash: Hash,
    },
}

/// Why a content-address string cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ContentAddressError {
    /// Neither `text:` nor `fixed:`.
    #[error("want text:sha256:HASH, fixed:r:ALGO:HASH or fixed:ALGO:HASH")]
    Form,
    /// The algorithm or hash is malformed.
    #[error("the hash")]
    Hash(#[source] HashError),
    /// A text not addressed by SHA-256.
    #[error("a text is addressed by sha256 only")]
    TextAlgorithm,
}

impl ContentAddress {
    /// Parses Nix's form.
    pub fn parse(s: &str) -> Result<ContentAddress, ContentAddressError> {
        if let Some(rest) = s.strip_prefix("text:") {
            let hash = parse_prefixed(rest)?;
            if hash.algorithm() != HashAlgorithm::Sha256 {
                return Err(ContentAddressError::TextAlgorithm);
            }
            return Ok(ContentAddress::Text { hash });
        }
        let rest = s.strip_prefix("fixed:").ok_or(ContentAddressError::Form)?;
        let (method, rest) = match rest.strip_prefix("r:") {
            Some(rest) => (Method::Recursive, rest),
            None => (Method::Flat, rest),
        };
        Ok(ContentAddress::Fixed {
            method,
            hash: parse_prefixed(rest)?,
        })
    }

    /// The address of a fixed-output derivation's output.
    pub fn from_fixed_output(declared: &FixedOutputHash) -> ContentAddress {
        match declared.method {
            fixed_output::Method::Text => ContentAddress::Text {
                hash: declared.hash,
            },
            fixed_output::Method::Flat => ContentAddress::Fixed {
                method: Method::Flat,
                hash: declared.hash,
            },
            fixed_output::Method::Recursive => ContentAddress::Fixed {
                method: Method::Recursive,
                hash: declared.hash,
            },
        }
    }
}

/// `<algorithm>:<hash in any encoding>`.
fn parse_prefixed(s: &str) -> Result<Hash, ContentAddressError> {
    let (name, _) = s.split_once(':').ok_or(ContentAddressError::Form)?;
    let algorithm: HashAlgorithm = name.parse().map_err(ContentAddressError::Hash)?;
    Hash::parse(s, algorithm).map_err(ContentAddressError::Hash)
}

/// Nix's form, the hash in nixbase32: `fixed:r:sha256:1b6g…`.
impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, hash) = match self {
            ContentAddress::Text { hash } => ("text:", hash),
            ContentAddress::Fixed {
                method: Method::Recursive,
                hash,
            } => ("fixed:r:", hash),
            ContentAddress::Fixed {
                method: Method::Flat,
                hash,
            } => ("fixed:", hash),
        };
        write!(f, "{prefix}{}:{}", hash.algorithm(), hash.to_nixbase32())
    }
}

/// Why a content-addressed path cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum MakePathError {
    /// The name is not a valid store path name.
    #[error(transparent)]
    Name(#[from] StorePathError),
    /// Only recursive SHA-256 paths may have references.
    #[error(
        "a fixed-output path hashed other than recursively with sha256 cannot have references"
    )]
    References,
}

/// Folds a SHA-256 digest to the 20 bytes of a store path digest.
fn compress(digest: &[u8; 32]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        out[i % 20] ^= b;
    }
    out
}

fn make(kind: &str, inner_hex: &str, name: &str) -> Result<StorePath, MakePathError> {
    let fingerprint = format!("{kind}:sha256:{inner_hex}:{STORE_DIR}:{name}");
    let digest: [u8; 32] = Sha256::digest(fingerprint.as_bytes()).into();
    Ok(StorePath::from_parts(compress(&digest), name)?)
}

fn with_references(mut kind: String, references: &BTreeSet<StorePath>) -> String {
    // Sorted by their absolute paths, which sort as their basenames do.
    for r in references {
        kind.push(':');
        kind.push_str(&r.to_absolute_path());
    }
    kind
}

/// The path of an input-addressed output `output` (`out`, `dev`, …) named
/// `name` (the derivation's name, `-<output>` appended for other outputs
/// than `out`), from the derivation's masked `hashDerivationModulo`.
pub fn make_output_path(
    output: &str,
    hash_modulo: &[u8; 32],
    name: &str,
) -> Result<StorePath, MakePathError> {
    make(&format!("output:{output}"), &hex::encode(hash_modulo), name)
}

/// The path of a text named `name` with SHA-256 `text_sha256`.
pub fn make_text_path(
    name: &str,
    text_sha256: &[u8; 32],
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, MakePathError> {
    make(
        &with_references("text".to_owned(), references),
        &hex::encode(text_sha256),
        name,
    )
}

/// The path of a fixed output or source named `name`: `references` are the
/// others it refers to, `refers_to_itself` whether it also refers to itself.
pub fn make_fixed_output_path(
    name: &str,
    method: Method,
    hash: &Hash,
    references: &BTreeSet<StorePath>,
    refers_to_itself: bool,
) -> Result<StorePath, MakePathError> {
    if method == Method::Recursive && hash.algorithm() == HashAlgorithm::Sha256 {
        let mut kind = with_references("source".to_owned(), references);
        if refers_to_itself {
            kind.push_str(":self");
        }
        return make(&kind, &hash.to_base16(), name);
    }
    if !references.is_empty() || refers_to_itself {
        return Err(MakePathError::References);
    }
    let r = if method == Method::Recursive {
        "r:"
    } else {
        ""
    };
    let inner = format!("fixed:out:{r}{}:{}:", hash.algorithm(), hash.to_base16());
    make(
        "output:out",
        &hex::encode(Sha256::digest(inner.as_bytes())),
        name,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sha256(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    // Vectors from Nix 2.8 (Debian's nix-bin) on this project's machines:
    // `nix-store --add-fixed sha256 hello.txt`, `nix-store --add hello.txt`,
    // `nix-store --add-fixed sha1 hello.txt` (the file holding "hello\n"),
    // `builtins.toFile "greeting" "hello\n"`, and `nix path-info --json` of
    // each for the content address.
    fn ca(s: &str) -> ContentAddress {
        ContentAddress::parse(s).unwrap()
    }

    fn path_of(name: &str, address: &str) -> String {
        let none = BTreeSet::new();
        match ca(address) {
            ContentAddress::Text {
                hash: Hash::Sha256(d),
            } => make_text_path(name, &d, &none),
            ContentAddress::Text { .. } => unreachable!(),
            ContentAddress::Fixed { method, hash } => {
                make_fixed_output_path(name, method, &hash, &none, false)
            }
        }
        .unwrap()
        .to_string()
    }

    const VECTORS: &[(&str, &str, &str)] = &[
        (
            "hello.txt",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt",
        ),
        (
            "hello.txt",
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt",
        ),
        (
            "hello.txt",
            "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm",
            "/nix/store/svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt",
        ),
        (
            "d",
            "fixed:r:sha256:0fzd3xy0rg1gdxfi7wg675q1vs7hh332lz0x4ml9l3arvl37yx9d",
            "/nix/store/4cg53bz5rfmdapmsqn1c66xp8snn6x17-d",
        ),
        (
            "greeting",
            "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "/nix/store/ybf7by4xvcgjhwilsg87rqz9di79bify-greeting",
        ),
    ];

    #[test]
    fn paths_are_the_ones_nix_made() {
        for (name, address, path) in VECTORS {
            assert_eq!(&path_of(name, address), path, "{address}");
        }
        // The text's hash is the SHA-256 of its bytes.
        assert_eq!(
            ca(VECTORS[4].1),
            ContentAddress::Text {
                hash: Hash::Sha256(sha256(b"hello\n"))
            }
        );
    }

    #[test]
    fn content_addresses_round_trip() {
        for (_, address, _) in VECTORS {
            assert_eq!(&ca(address).to_string(), address);
        }
        assert!(ContentAddress::parse("text:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm").is_err());
        assert!(ContentAddress::parse("nar:sha256:x").is_err());
    }

    #[test]
    fn only_recursive_sha256_paths_have_references() {
        let hash = Hash::Sha1([0; 20]);
        let refs: BTreeSet<StorePath> = ["/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x"
            .parse()
            .unwrap()]
        .into();
        assert!(make_fixed_output_path("x", Method::Recursive, &hash, &refs, false).is_err());
    }
}
