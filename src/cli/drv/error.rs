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
    /// A fixed-output derivation produced something else than it declared.
    #[error("fixed output {path} rejected")]
    FixedOutput {
        /// The output path.
        path: StorePath,
        /// Why.
        #[source]
        source: fixed_output::FixedOutputError,
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
