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
//! 4. submit it through `kiln.v1.BuildEvents/Submit`, streaming the builder's
//!    log to stderr (or, against a server without kiln's events, plain
//!    `snix.build.v1.BuildService/DoBuild`);
//! 5. record the outputs and their references.
//!
//! Finally the requested derivation's outputs are NAR-hashed by streaming
//! them out of the castore, printed, and with `--out DIR` materialised as
//! `DIR/<store basename>`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::Code;

use crate::castore::blob::grpc::GrpcBlobService;
use crate::castore::directory_service::grpc::GrpcDirectoryService;
use crate::castore::materialise::MaterialiseError;
use crate::castore::wire::WireNode;
use crate::castore::{materialise, Node, Store, ValidationError};
use crate::client::{connect, ClientSecurity, ConnectError, KilnChannel};
use crate::nix::build_request::{build_request, output_paths, BuildRequestError, RequestOptions};
use crate::nix::closure::{self, BuildPlan, ClosureError, OutputsOf};
use crate::nix::fixed_output;
use crate::nix::nar::{nar_hash, NarError, NarHash};
use crate::nix::store_path::StorePathError;
use crate::nix::{Derivation, StorePath};
use crate::proto::kiln_v1::build_event::Event;
use crate::proto::kiln_v1::build_events_client::BuildEventsClient;
use crate::proto::kiln_v1::{submit_request, SubmitRequest};
use crate::proto::snix_build;
use crate::proto::snix_build::build_service_client::BuildServiceClient;
use crate::server::MAX_MESSAGE_BYTES;

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
    },
    /// The build ran and failed.
    #[error("building {drv} failed ({kind}{exit}): {message}", exit = exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default())]
    BuildFailed {
        /// The derivation.
        drv: StorePath,
        /// kiln's failure kind (builder_failed, timeout, …).
        kind: String,
        /// The builder's exit code, if it exited.
        exit_code: Option<i32>,
        /// The server's message.
        message: String,
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

/// An output kiln built during this run: its tree and what it refers to.
struct Built {
    node: Node,
    references: BTreeSet<StorePath>,
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

/// The state of one `kiln build --drv` run.
struct Run<'a> {
    store: &'a Store,
    channel: KilnChannel,
    outputs_of: &'a OutputsOf,
    request_options: RequestOptions,
    /// Local store paths already imported into the castore.
    imported: BTreeMap<StorePath, Node>,
    /// Outputs built by kiln in this run.
    built: BTreeMap<StorePath, Built>,
}

impl Run<'_> {
    async fn build_one(&mut self, plan: &BuildPlan, drv_path: &StorePath) -> Result<(), DrvError> {
        let drv = derivation(plan, drv_path)?;
        let roots = closure::input_roots(drv_path, drv, self.outputs_of)?;
        let inputs = self.input_closure(roots).await?;
        let request = build_request(drv, &inputs, self.outputs_of, &self.request_options).map_err(
            |source| DrvError::Request {
                drv: drv_path.clone(),
                source: Box::new(source),
            },
        )?;
        eprintln!("kiln: building {drv_path}");
        let (request, response) = match submit(&self.channel, drv_path, request.clone()).await {
            Err(e) if drv.is_fixed_output() && refuses_network(&e) => {
                // Nix gives fixed-output builds the network; a kiln server
                // has none. The declared hash is checked below either way.
                eprintln!("kiln: the server offers no network; building {drv_path} offline");
                let mut offline = request;
                if let Some(c) = offline.constraints.as_mut() {
                    c.network_access = false;
                }
                let response = submit(&self.channel, drv_path, offline.clone()).await?;
                (offline, response)
            }
            result => (request, result?),
        };
        self.record_outputs(drv_path, drv, &inputs, &request, response)?;
        if drv.is_fixed_output() {
            self.verify_fixed_output(drv_path, drv).await?;
        }
        Ok(())
    }

    async fn verify_fixed_output(
        &self,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> Result<(), DrvError> {
        for output in drv.outputs.values() {
            let Some(path) = &output.path else { continue };
            let built = self
                .built
                .get(path)
                .ok_or_else(|| inconsistent(drv_path, "output not recorded"))?;
            fixed_output::verify(self.store, output, &built.node)
                .await
                .map_err(|source| DrvError::FixedOutput {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Every store path the build needs, as castore nodes: the closure of
    /// `roots` over kiln-built outputs' references and Nix's database.
    async fn input_closure(
        &mut self,
        roots: BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, Node>, DrvError> {
        let mut inputs = BTreeMap::new();
        let mut local = BTreeSet::new();
        let mut pending: Vec<StorePath> = roots.into_iter().collect();
        while let Some(path) = pending.pop() {
            if inputs.contains_key(&path) || local.contains(&path) {
                continue;
            }
            match self.built.get(&path) {
                Some(built) => {
                    pending.extend(built.references.iter().cloned());
                    inputs.insert(path, built.node.clone());
                }
                None => {
                    local.insert(path);
                }
            }
        }
        let local = closure::requisites(&local)?;
        let missing: BTreeSet<StorePath> = local
            .iter()
            .filter(|p| !self.imported.contains_key(*p))
            .cloned()
            .collect();
        self.imported
            .extend(closure::import(self.store, &missing).await?);
        for path in local {
            let node = self
                .imported
                .get(&path)
                .ok_or_else(|| inconsistent(&path, "input not imported"))?;
            inputs.insert(path, node.clone());
        }
        Ok(inputs)
    }

    fn record_outputs(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
        inputs: &BTreeMap<StorePath, Node>,
        request: &snix_build::BuildRequest,
        response: snix_build::BuildResponse,
    ) -> Result<(), DrvError> {
        let outputs = output_paths(drv).map_err(|source| DrvError::Request {
            drv: drv_path.clone(),
            source: Box::new(source),
        })?;
        if response.outputs.len() != outputs.len() {
            return Err(bad(drv_path, "wrong number of outputs"));
        }
        // Needle `i` is the hash part of one of the outputs or inputs.
        let by_hash: BTreeMap<String, &StorePath> = outputs
            .iter()
            .chain(inputs.keys())
            .map(|p| (p.hash_part(), p))
            .collect();
        for (path, output) in outputs.iter().zip(response.outputs) {
            let entry = output
                .output
                .ok_or_else(|| bad(drv_path, "output without entry"))?;
            let node = entry
                .try_into_anonymous()
                .map_err(|source| DrvError::InvalidOutput {
                    path: path.clone(),
                    source,
                })?;
            let mut references = BTreeSet::new();
            for index in output.needles {
                let needle = usize::try_from(index)
                    .ok()
                    .and_then(|i| request.refscan_needles.get(i))
                    .and_then(|hash| by_hash.get(hash))
                    .ok_or_else(|| bad(drv_path, "needle index out of range"))?;
                references.insert((*needle).clone());
            }
            self.built.insert(path.clone(), Built { node, references });
        }
        Ok(())
    }
}

/// Whether the server refused a build because it asked for network access.
fn refuses_network(error: &DrvError) -> bool {
    match error {
        DrvError::Submit { code, message, .. } => {
            *code == Code::FailedPrecondition && message.contains("network")
        }
        DrvError::BuildFailed { kind, message, .. } => {
            kind == "precondition" && message.contains("network")
        }
        _ => false,
    }
}

/// Submits through kiln's event stream (log to stderr); falls back to plain
/// `DoBuild` when the server does not offer it.
async fn submit(
    channel: &KilnChannel,
    drv: &StorePath,
    request: snix_build::BuildRequest,
) -> Result<snix_build::BuildResponse, DrvError> {
    let failed = |status: tonic::Status| DrvError::Submit {
        drv: drv.clone(),
        code: status.code(),
        message: status.message().to_owned(),
    };
    let submit = SubmitRequest {
        request: Some(submit_request::Request::Snix(request.clone())),
    };
    let mut events = BuildEventsClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = match events.submit(submit).await {
        Ok(stream) => stream.into_inner(),
        Err(status) if status.code() == Code::Unimplemented => {
            let mut client = BuildServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            return client
                .do_build(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(failed);
        }
        Err(status) => return Err(failed(status)),
    };
    let mut stderr = std::io::stderr();
    while let Some(event) = stream.message().await.map_err(failed)? {
        match event.event {
            Some(Event::Log(chunk)) => {
                // The log is best effort: a closed stderr must not fail the build.
                let _ = stderr.write_all(&chunk.data);
            }
            Some(Event::Completed(completed)) => {
                return completed
                    .snix
                    .ok_or_else(|| bad(drv, "completed without a snix response"));
            }
            Some(Event::Failed(f)) => {
                let _ = stderr.write_all(&f.log_tail);
                return Err(DrvError::BuildFailed {
                    drv: drv.clone(),
                    kind: f.kind,
                    exit_code: f.exit_code,
                    message: f.message,
                });
            }
            _ => {}
        }
    }
    Err(bad(drv, "event stream ended before the build did"))
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

fn bad(drv: &StorePath, problem: &str) -> DrvError {
    DrvError::BadResponse {
        drv: drv.clone(),
        problem: problem.to_owned(),
    }
}

fn inconsistent(drv: &StorePath, problem: &'static str) -> DrvError {
    DrvError::Inconsistent {
        drv: drv.clone(),
        problem,
    }
}
