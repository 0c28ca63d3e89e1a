//! Why `kiln build --drv` failed, one variant per step.

use std::path::PathBuf;

use tonic::Code;

use crate::castore::materialise::MaterialiseError;
use crate::castore::ValidationError;
use crate::client::ConnectError;
use crate::nix::build_request::BuildRequestError;
use crate::nix::closure::ClosureError;
use crate::nix::fixed_output;
use crate::nix::nar::NarError;
use crate::nix::store_path::StorePathError;
use crate::nix::StorePath;
use crate::proto::kiln_v1::Failed;

/// Why `kiln build --drv` failed.
#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    /// The path given is not a store derivation.
    #[error("{path} is not a derivation in /nix/store")]
    NotADerivation {
        /// The path given.
        path: PathBuf,
        /// Why, when it is not a store path at all.
        #[source]
        source: Option<StorePathError>,
    },
    /// Connecting to the server failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Reading derivations or the local store failed.
    #[error("collecting the inputs")]
    Inputs(#[source] Box<ClosureError>),
    /// A derivation cannot be expressed as a build request.
    #[error("preparing the build of {drv}")]
    Request {
        /// The derivation.
        drv: StorePath,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<BuildRequestError>,
    },
    /// The server refused the request or the call broke.
    #[error("submitting {drv}: {code:?}: {message}")]
    Submit {
        /// The derivation.
        drv: StorePath,
        /// gRPC code.
        code: Code,
        /// gRPC message.
        message: String,
        /// Which host precondition failed (`kiln.v1.Failed.precondition`
        /// of the status detail), empty if none.
        precondition: String,
    },
    /// The build ran and failed.
    #[error(
        "building {drv} failed ({}{}): {}",
        failed.kind,
        failed.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default(),
        failed.message
    )]
    BuildFailed {
        /// The derivation.
        drv: StorePath,
        /// The server's `kiln.v1.Failed`: kind (builder_failed, timeout,
        /// …), exit code, message, precondition (boxed: it is large).
        failed: Box<Failed>,
    },
    /// The server answered with something that does not fit the request.
    #[error("the server's answer for {drv} is malformed: {problem}")]
    BadResponse {
        /// The derivation.
        drv: StorePath,
        /// What is wrong.
        problem: String,
    },
    /// kiln's own bookkeeping lost track of something (a bug).
    #[error("internal inconsistency at {drv}: {problem}")]
    Inconsistent {
        /// The derivation being handled.
        drv: StorePath,
        /// What went missing.
        problem: &'static str,
    },
    /// An output entry the server returned breaks castore rules.
    #[error("output {path} returned by the server is invalid")]
    InvalidOutput {
        /// The output path.
        path: StorePath,
        /// Why.
        #[source]
        source: ValidationError,
    },
    /// Hashing an output failed.
    #[error("computing the NAR hash of {path}")]
    Hash {
        /// The output path.
        path: StorePath,
        /// Why.
        #[source]
        source: NarError,
    },
    /// A fixed output's declaration is invalid, or the output cannot be
    /// hashed the declared way (e.g. a directory declared flat).
    #[error("fixed output {path} of {drv} rejected")]
    FixedOutput {
        /// The derivation.
        drv: StorePath,
        /// The output path.
        path: StorePath,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<fixed_output::FixedOutputError>,
    },
    /// A fixed output's hash differs from the declared one; worded as Nix
    /// words it, both hashes in SRI form.
    #[error("hash mismatch in fixed-output derivation '{drv}':\n{hashes}\n  output:    {path}")]
    HashMismatch {
        /// The derivation.
        drv: StorePath,
        /// The output path.
        path: StorePath,
        /// Declared and actual hash.
        hashes: Box<fixed_output::Mismatch>,
    },
    /// Creating the `--out` directory failed.
    #[error("creating {0}")]
    CreateOut(PathBuf, #[source] std::io::Error),
    /// Materialising an output failed.
    #[error("materialising {path} at {target}")]
    Materialise {
        /// The output path.
        path: StorePath,
        /// Where.
        target: PathBuf,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<MaterialiseError>,
    },
}

impl From<ClosureError> for DrvError {
    fn from(error: ClosureError) -> Self {
        DrvError::Inputs(Box::new(error))
    }
}

/// Why `drv`'s fixed output `path` was rejected: a mismatch becomes
/// [`DrvError::HashMismatch`], Nix's message, anything else
/// [`DrvError::FixedOutput`].
pub(super) fn fixed_output_rejected(
    drv: &StorePath,
    path: &StorePath,
    error: fixed_output::FixedOutputError,
) -> DrvError {
    match error {
        fixed_output::FixedOutputError::Mismatch(hashes) => DrvError::HashMismatch {
            drv: drv.clone(),
            path: path.clone(),
            hashes,
        },
        source => DrvError::FixedOutput {
            drv: drv.clone(),
            path: path.clone(),
            source: Box::new(source),
        },
    }
}

pub(super) fn bad(drv: &StorePath, problem: &str) -> DrvError {
    DrvError::BadResponse {
        drv: drv.clone(),
        problem: problem.to_owned(),
    }
}

pub(super) fn inconsistent(drv: &StorePath, problem: &'static str) -> DrvError {
    DrvError::Inconsistent {
        drv: drv.clone(),
        problem,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::nix::hash::{Hash, HashAlgorithm};

    /// The wording of Nix 2.8's message (its `got:` aligned like
    /// `specified:`), with the output path after it.
    #[test]
    fn a_hash_mismatch_reads_like_nix() {
        let drv: StorePath = "/nix/store/7gzap6ak3hywcaigdp0b6rcswlvaab92-fixed-wrong.drv"
            .parse()
            .unwrap();
        let path: StorePath = "/nix/store/q362j65vkk2yccl877x2k4867w9v5i0k-fixed-wrong"
            .parse()
            .unwrap();
        let sha256 = |s| Hash::parse(s, HashAlgorithm::Sha256).unwrap();
        let mismatch = fixed_output::Mismatch {
            specified: sha256("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            got: sha256("bb2985ebce55905b4cc370fdd554d913899c900b10cfbb9537138b56a59f775f"),
        };
        let error = fixed_output::FixedOutputError::Mismatch(Box::new(mismatch));
        assert_eq!(
            fixed_output_rejected(&drv, &path, error).to_string(),
            "hash mismatch in fixed-output derivation \
             '/nix/store/7gzap6ak3hywcaigdp0b6rcswlvaab92-fixed-wrong.drv':\n  \
             specified: sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n  \
             got:       sha256-uymF685VkFtMw3D91VTZE4mckAsQz7uVNxOLVqWfd18=\n  \
             output:    /nix/store/q362j65vkk2yccl877x2k4867w9v5i0k-fixed-wrong"
        );
        let error = fixed_output::FixedOutputError::NotAFile {
            method: fixed_output::Method::Flat,
            kind: "directory",
        };
        let error = fixed_output_rejected(&drv, &path, error);
        assert!(matches!(error, DrvError::FixedOutput { .. }), "{error:?}");
    }
}
