//! Checking a fixed-output derivation's result against the hash it declares,
//! as Nix does before accepting the output.
//!
//! A `.drv` output's `hashAlgo` field holds the derivation's
//! `outputHashMode` and `outputHashAlgo` in one: `[r:|text:]<algorithm>`,
//! the algorithm one of md5, sha1, sha256, sha512.
//!
//! - no prefix, "flat": the hash of the file's bytes; the output must be a
//!   regular file, not executable (Nix refuses anything else);
//! - `r:`, "recursive": the hash of the output's NAR serialisation, streamed
//!   once from the castore into the hasher; any file type;
//! - `text:`, content-addressed text: like flat, sha256 only.
//!
//! Its `hash` field is the declared digest. Nix writes base16; derivations
//! from other producers (and ones received over Nix's worker protocol) may
//! carry nixbase32, base64 or SRI, so every form is read ([`Hash::parse`]).
//! A mismatch names both hashes in SRI form, as Nix prints them.

#[cfg(test)]
mod tests;

use std::fmt;

use tokio::io::AsyncReadExt;

use super::derivation::Output;
use super::hash::{Hash, HashAlgorithm, HashError, Hasher};
use super::nar::{nar_hash_with, NarError, TreeSource};
use crate::castore::{B3Digest, Node};

/// What a fixed output's hash is taken over (`outputHashMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The bytes of a single non-executable file.
    Flat,
    /// The NAR serialisation of the output.
    Recursive,
    /// The bytes of a single non-executable file, sha256 only.
    Text,
}

/// `outputHashMode`'s names.
impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Flat => "flat",
            Method::Recursive => "recursive",
            Method::Text => "text",
        })
    }
}

/// A fixed output's declaration, validated: how to hash it and the hash it
/// must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedOutputHash {
    /// What the hash is taken over.
    pub method: Method,
    /// The declared hash; its algorithm is the one to hash with.
    pub hash: Hash,
}

impl FixedOutputHash {
    /// Reads the declaration from a `.drv` output's `hashAlgo` and `hash`.
    pub fn of(output: &Output) -> Result<Self, FixedOutputError> {
        let value = output.hash_algorithm.as_str();
        let (method, name) = if let Some(name) = value.strip_prefix("r:") {
            (Method::Recursive, name)
        } else if let Some(name) = value.strip_prefix("text:") {
            (Method::Text, name)
        } else {
            (Method::Flat, value)
        };
        let algorithm: HashAlgorithm =
            name.parse().map_err(|source| FixedOutputError::Algorithm {
                value: value.to_owned(),
                source,
            })?;
        if method == Method::Text && algorithm != HashAlgorithm::Sha256 {
            return Err(FixedOutputError::TextNeedsSha256 {
                value: value.to_owned(),
            });
        }
        let hash =
            Hash::parse(&output.hash, algorithm).map_err(|source| FixedOutputError::Hash {
                value: output.hash.clone(),
                algorithm,
                source,
            })?;
        Ok(Self { method, hash })
    }
}

/// Why a fixed output is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FixedOutputError {
    /// `hashAlgo` names no mode and algorithm Nix knows.
    #[error("hashAlgo {value:?} (outputHashMode and outputHashAlgo) is invalid")]
    Algorithm {
        /// The field as the `.drv` has it.
        value: String,
        /// What is wrong with it.
        #[source]
        source: HashError,
    },
    /// Text hashing with another algorithm than SHA-256.
    #[error("hashAlgo {value:?}: text hashing takes sha256 only")]
    TextNeedsSha256 {
        /// The field as the `.drv` has it.
        value: String,
    },
    /// `hash` is not a hash of the declared algorithm in any form.
    #[error("hash {value:?} (outputHash) is not a {algorithm} hash")]
    Hash {
        /// The field as the `.drv` has it.
        value: String,
        /// The declared algorithm.
        algorithm: HashAlgorithm,
        /// What is wrong with it.
        #[source]
        source: HashError,
    },
    /// A flat or text output must be a single regular file.
    #[error("a {method} fixed output must be a regular file, the build produced a {kind}")]
    NotAFile {
        /// Flat or text.
        method: Method,
        /// What it is instead.
        kind: &'static str,
    },
    /// A flat or text output must not be executable, as in Nix.
    #[error("a {method} fixed output must be a non-executable file, the build's is executable")]
    Executable {
        /// Flat or text.
        method: Method,
    },
    /// Reading the output from the store failed.
    #[error("reading the output")]
    Read(#[source] NarError),
    /// The output's hash differs from the declared one (boxed: two
    /// SHA-512 digests would make every result large).
    #[error("hash mismatch:\n{0}")]
    Mismatch(Box<Mismatch>),
}

/// A declared hash and the different one the output has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// The declared hash.
    pub specified: Hash,
    /// The output's hash, same algorithm.
    pub got: Hash,
}

/// Two indented lines, SRI form, as Nix prints them after
/// `hash mismatch in fixed-output derivation '…':`.
impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  specified: {}\n  got:       {}",
            self.specified, self.got
        )
    }
}

/// Checks `node` (the built output) against `output`'s declared hash.
pub async fn verify(
    source: &dyn TreeSource,
    output: &Output,
    node: &Node,
) -> Result<(), FixedOutputError> {
    let declared = FixedOutputHash::of(output)?;
    let got = output_hash(source, node, declared.method, declared.hash.algorithm()).await?;
    if got != declared.hash {
        return Err(FixedOutputError::Mismatch(Box::new(Mismatch {
            specified: declared.hash,
            got,
        })));
    }
    Ok(())
}

/// The `algorithm` hash of `node` taken the `method` way.
pub async fn output_hash(
    source: &dyn TreeSource,
    node: &Node,
    method: Method,
    algorithm: HashAlgorithm,
) -> Result<Hash, FixedOutputError> {
    match method {
        Method::Recursive => Ok(nar_hash_with(source, node, algorithm)
            .await
            .map_err(FixedOutputError::Read)?
            .hash),
        Method::Flat | Method::Text => match node {
            Node::File {
                executable: true, ..
            } => Err(FixedOutputError::Executable { method }),
            Node::File { digest, .. } => flat_hash(source, digest, algorithm)
                .await
                .map_err(FixedOutputError::Read),
            other => Err(FixedOutputError::NotAFile {
                method,
                kind: other.kind(),
            }),
        },
    }
}

/// The `algorithm` hash of blob `digest`'s bytes.
async fn flat_hash(
    source: &dyn TreeSource,
    digest: &B3Digest,
    algorithm: HashAlgorithm,
) -> Result<Hash, NarError> {
    let mut reader = source
        .blob(digest)
        .await
        .map_err(|source| NarError::OpenBlob {
            digest: *digest,
            source,
        })?
        .ok_or(NarError::MissingBlob(*digest))?;
    let mut hasher = Hasher::new(algorithm);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(|source| NarError::ReadBlob {
                digest: *digest,
                source,
            })?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hasher.finish())
}
