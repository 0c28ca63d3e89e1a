//! `kiln build --drv /nix/store/….drv [--addr URL] [--out DIR]`: builds a Nix
//! derivation on a kiln server and prints each output path with its NAR hash
//! in the form `nix-store --query --hash` prints, so the two can be compared.
//!
//! Steps, for the derivation and, first, every input derivation whose
//! outputs the local Nix store lacks (see [`crate::nix::closure::plan`]):
//! 1. collect the input closure: local store paths (with their closure from
//!    Nix's database) and outputs kiln built earlier in this run (with the
//!    references the server's refscan found in them);
//! 2. import the local paths into the server's castore;
//! 3. turn the derivation into a `snix.build.v1.BuildRequest`
//!    ([`crate::nix::build_request`]);
//! 4. submit it through `kiln.v1.BuildEvents/Submit` with the builder's
//!    basename as its `argv[0]`, as Nix runs it, streaming the builder's
//!    log to stderr (or, against a server without kiln's events, plain
//!    `snix.build.v1.BuildService/DoBuild`, which cannot carry `argv[0]`);
//! 5. record the outputs and their references.
//!
//! Finally the requested derivation's outputs are NAR-hashed by streaming
//! them out of the castore, printed, and with `--out DIR` materialised as
//! `DIR/<store basename>`.
//!
//! Here: the run as a whole. [`builds`]: steps 1–3 and 5 for one
//! derivation; [`submit`]: step 4; [`error`]: what can fail.

mod builds;
mod error;
mod submit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::castore::blob::grpc::GrpcBlobService;
use crate::castore::directory_service::grpc::GrpcDirectoryService;
use crate::castore::{materialise, Node, Store};
use crate::client::{connect, ClientSecurity};
use crate::nix::build_request::RequestOptions;
use crate::nix::closure::{self, BuildPlan};
use crate::nix::nar::{nar_hash, NarHash};
use crate::nix::{Derivation, StorePath};

use builds::Run;
use error::inconsistent;
pub use error::DrvError;

/// What to build and where.
pub struct DrvOptions {
    /// The kiln server (see [`crate::client`] for the forms).
    pub addr: String,
    /// TLS and credentials for reaching it.
    pub security: ClientSecurity,
    /// The `.drv` file, in `/nix/store` (symlinks to it are followed).
    pub drv: PathBuf,
    /// Where to materialise the outputs, as `DIR/<store basename>`.
    pub out: Option<PathBuf>,
    /// `NIX_BUILD_CORES` for the builds; default: this machine's cores,
    /// which is what Nix's default `cores = 0` means.
    pub build_cores: Option<u32>,
    /// Build even what the server's result cache would answer.
    pub rebuild: bool,
}

/// One output of the requested derivation, built by kiln.
#[derive(Debug, Clone)]
pub struct BuiltOutput {
    /// The output's name (`out`, `dev`, …).
    pub name: String,
    /// Its store path.
    pub path: StorePath,
    /// Its tree in the server's castore.
    pub node: Node,
    /// NAR hash and size, comparable with `nix-store --query --hash`.
    pub nar_hash: NarHash,
}

/// Builds, then prints `<output path> sha256:<nixbase32>` per output on
/// stdout (the builder's log goes to stderr).
pub async fn run(options: &DrvOptions) -> Result<(), DrvError> {
    for output in build_drv(options).await? {
        println!("{} {}", output.path, output.nar_hash);
    }
    Ok(())
}

/// Builds the derivation (and missing inputs first); its outputs in
/// output-name order.
pub async fn build_drv(options: &DrvOptions) -> Result<Vec<BuiltOutput>, DrvError> {
    let root = derivation_path(&options.drv)?;
    let channel = connect(&options.addr, &options.security).await?;
    let store = Store {
        blobs: Arc::new(GrpcBlobService::new(channel.clone())),
        directories: Arc::new(GrpcDirectoryService::new(channel.clone())),
    };
    let mut request_options = RequestOptions::default();
    if let Some(cores) = options.build_cores {
        request_options.build_cores = cores;
    }
    let plan = closure::plan(&root)?;
    let outputs_of = plan.outputs_of();
    let mut run = Run {
        store: &store,
        channel,
        outputs_of: &outputs_of,
        request_options,
        rebuild: options.rebuild,
        imported: BTreeMap::new(),
        built: BTreeMap::new(),
    };
    for drv_path in &plan.order {
        run.build_one(&plan, drv_path).await?;
    }
    let root_drv = derivation(&plan, &root)?;
    let mut results = Vec::new();
    for (name, output) in &root_drv.outputs {
        let path = output
            .path
            .clone()
            .ok_or_else(|| inconsistent(&root, "output without a path"))?;
        let node = run
            .built
            .get(&path)
            .ok_or_else(|| inconsistent(&root, "output not built"))?
            .node
            .clone();
        let hash = nar_hash(&store, &node)
            .await
            .map_err(|source| DrvError::Hash {
                path: path.clone(),
                source,
            })?;
        results.push(BuiltOutput {
            name: name.clone(),
            path,
            node,
            nar_hash: hash,
        });
    }
    if let Some(dir) = &options.out {
        materialise_all(&store, &results, dir).await?;
    }
    Ok(results)
}

async fn materialise_all(
    store: &Store,
    outputs: &[BuiltOutput],
    dir: &Path,
) -> Result<(), DrvError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| DrvError::CreateOut(dir.to_owned(), e))?;
    for output in outputs {
        let target = dir.join(output.path.basename());
        materialise(store, &output.node, &target)
            .await
            .map_err(|source| DrvError::Materialise {
                path: output.path.clone(),
                target: target.clone(),
                source: Box::new(source),
            })?;
    }
    Ok(())
}

/// The store path of the `.drv` file `path` is or links to.
fn derivation_path(path: &Path) -> Result<StorePath, DrvError> {
    let not_drv = |source| DrvError::NotADerivation {
        path: path.to_owned(),
        source,
    };
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let text = resolved.to_str().ok_or_else(|| not_drv(None))?;
    let store_path = StorePath::from_absolute_path(text).map_err(|e| not_drv(Some(e)))?;
    if !store_path.is_derivation() {
        return Err(not_drv(None));
    }
    Ok(store_path)
}

fn derivation<'a>(plan: &'a BuildPlan, path: &StorePath) -> Result<&'a Derivation, DrvError> {
    plan.derivations
        .get(path)
        .ok_or_else(|| inconsistent(path, "derivation missing from the plan"))
}
