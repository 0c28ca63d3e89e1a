//! Checking a fixed-output derivation's result against the hash it declares,
//! as Nix does before accepting the output: `sha256` hashes the file's
//! contents ("flat"), `r:sha256` hashes the NAR of the tree ("recursive").
//! Nix writes the expected hash in hex in the `.drv`.

use tokio::io::AsyncReadExt;

use sha2::{Digest, Sha256};

use super::derivation::Output;
use super::nar::{nar_hash, NarError, TreeSource};
use crate::castore::Node;

/// Why a fixed output is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FixedOutputError {
    /// kiln checks SHA-256 only.
    #[error("hash algorithm {0:?} is not supported (sha256 and r:sha256 are)")]
    UnsupportedAlgorithm(String),
    /// A flat-hashed output must be a single regular file.
    #[error("a flat fixed output must be a regular file, the build produced a {0}")]
    NotAFile(&'static str),
    /// Reading the output from the store failed.
    #[error("reading the output")]
    Read(#[source] NarError),
    /// The output's hash differs from the declared one.
    #[error("hash mismatch: declared sha256:{expected}, got sha256:{actual}")]
    Mismatch {
        /// Declared, hex.
        expected: String,
        /// Computed, hex.
        actual: String,
    },
}

/// Checks `node` (the built output) against `output`'s declared hash.
pub async fn verify(
    source: &dyn TreeSource,
    output: &Output,
    node: &Node,
) -> Result<(), FixedOutputError> {
    let actual = match output.hash_algorithm.as_str() {
        "r:sha256" => nar_hash(source, node)
            .await
            .map_err(FixedOutputError::Read)?
            .to_hex(),
        "sha256" => flat_sha256(source, node).await?,
        other => return Err(FixedOutputError::UnsupportedAlgorithm(other.to_owned())),
    };
    if actual != output.hash.to_ascii_lowercase() {
        return Err(FixedOutputError::Mismatch {
            expected: output.hash.clone(),
            actual,
        });
    }
    Ok(())
}

async fn flat_sha256(source: &dyn TreeSource, node: &Node) -> Result<String, FixedOutputError> {
    let Node::File { digest, .. } = node else {
        return Err(FixedOutputError::NotAFile(node.kind()));
    };
    let read_err = |source| {
        FixedOutputError::Read(NarError::ReadBlob {
            digest: *digest,
            source,
        })
    };
    let mut reader = source
        .blob(digest)
        .await
        .map_err(|source| {
            FixedOutputError::Read(NarError::OpenBlob {
                digest: *digest,
                source,
            })
        })?
        .ok_or(FixedOutputError::Read(NarError::MissingBlob(*digest)))?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut chunk).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
