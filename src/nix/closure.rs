//! A derivation's inputs, found in the local Nix store and imported into a
//! castore.
//!
//! Steps for `kiln build --drv`:
//! 1. [`plan`]: read the derivation and, depth-first, every input derivation
//!    whose needed outputs are not valid in the local store; the result lists
//!    what must be built, dependencies first, the requested derivation last.
//! 2. [`input_roots`]: per derivation, the store paths it names directly
//!    (input sources and the used outputs of input derivations).
//! 3. [`requisites`]: their closure, from Nix's database
//!    (`nix-store --query --requisites`).
//! 4. [`import`]: each store path ingested into the castore, named by its
//!    basename, as the build request's inputs.
//!
//! Nix is asked through its command-line tools, which every Nix install has
//! and which need no daemon when run as root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use futures::{StreamExt, TryStreamExt};

use super::derivation::{Derivation, DerivationError};
use super::store_path::{StorePath, StorePathError};
use crate::castore::ingest::IngestError;
use crate::castore::{ingest, IngestMode, Node, Store};

/// How many store paths are ingested at once.
const PARALLEL_IMPORTS: usize = 4;

/// Output paths of derivations: derivation path -> output name -> path.
pub type OutputsOf = BTreeMap<StorePath, BTreeMap<String, StorePath>>;

/// Why the inputs could not be found or imported.
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    /// `nix-store` could not be started.
    #[error("running `nix-store {args}` (is Nix installed?)")]
    RunNixStore {
        /// The arguments, for the message.
        args: String,
        /// The spawn failure.
        #[source]
        source: std::io::Error,
    },
    /// `nix-store` exited unsuccessfully.
    #[error("`nix-store {args}` failed ({status}): {stderr}")]
    NixStoreFailed {
        /// The arguments, for the message.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `nix-store` printed something that is not a store path.
    #[error("`nix-store` printed {line:?}")]
    NixStoreOutput {
        /// The line.
        line: String,
        /// Why it is not a store path.
        #[source]
        source: StorePathError,
    },
    /// A derivation file could not be read or parsed.
    #[error("derivation {path}")]
    ReadDerivation {
        /// The `.drv` store path.
        path: StorePath,
        /// The failure.
        #[source]
        source: DerivationError,
    },
    /// A derivation uses an output its input derivation does not have.
    #[error("{user} needs output {output:?} of {drv}, which has no such output path")]
    UnknownOutput {
        /// The derivation that uses it.
        user: StorePath,
        /// The input derivation.
        drv: StorePath,
        /// The output name.
        output: String,
    },
    /// The derivation graph loops (impossible for files Nix wrote).
    #[error("derivation {0} depends on itself")]
    Cycle(StorePath),
    /// Ingesting a store path into the castore failed.
    #[error("importing {path} into the castore")]
    Import {
        /// The store path.
        path: StorePath,
        /// The failure (boxed: it is large and rare).
        #[source]
        source: Box<IngestError>,
    },
}

/// What `kiln build --drv` has to build.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// Derivations to build, each after those it depends on; the requested
    /// derivation is last.
    pub order: Vec<StorePath>,
    /// Every derivation read: those in `order` and their direct inputs.
    pub derivations: BTreeMap<StorePath, Derivation>,
}

impl BuildPlan {
    /// Output paths of every derivation read.
    pub fn outputs_of(&self) -> OutputsOf {
        self.derivations
            .iter()
            .map(|(path, drv)| {
                let outputs = drv
                    .outputs
                    .iter()
                    .filter_map(|(name, o)| Some((name.clone(), o.path.clone()?)))
                    .collect();
                (path.clone(), outputs)
            })
            .collect()
    }
}

/// Reads `/nix/store/<…>.drv`.
pub fn read_derivation(path: &StorePath) -> Result<Derivation, ClosureError> {
    Derivation::read(Path::new(&path.to_string())).map_err(|source| ClosureError::ReadDerivation {
        path: path.clone(),
        source,
    })
}

/// Plans the build of `root`: `root` itself, preceded (dependencies first)
/// by every input derivation whose needed outputs are not all valid in the
/// local Nix store.
pub fn plan(root: &StorePath) -> Result<BuildPlan, ClosureError> {
    let mut plan = BuildPlan {
        order: Vec::new(),
        derivations: BTreeMap::new(),
    };
    let drv = read_derivation(root)?;
    visit(root, drv, &mut plan, &mut BTreeSet::new())?;
    Ok(plan)
}

/// Depth-first: plans the missing inputs of `path`, then appends `path`.
fn visit(
    path: &StorePath,
    drv: Derivation,
    plan: &mut BuildPlan,
    in_progress: &mut BTreeSet<StorePath>,
) -> Result<(), ClosureError> {
    in_progress.insert(path.clone());
    let mut to_build = Vec::new();
    for (input, names) in &drv.input_derivations {
        if in_progress.contains(input) {
            return Err(ClosureError::Cycle(input.clone()));
        }
        if plan.order.contains(input) || to_build.iter().any(|(p, _)| p == input) {
            continue;
        }
        let input_drv = match plan.derivations.get(input) {
            Some(known) => known.clone(),
            None => read_derivation(input)?,
        };
        let mut needed = Vec::new();
        for name in names {
            match input_drv.outputs.get(name).and_then(|o| o.path.clone()) {
                Some(out) => needed.push(out),
                None => {
                    return Err(ClosureError::UnknownOutput {
                        user: path.clone(),
                        drv: input.clone(),
                        output: name.clone(),
                    })
                }
            }
        }
        let missing = !invalid_paths(&needed)?.is_empty();
        plan.derivations.insert(input.clone(), input_drv.clone());
        if missing {
            to_build.push((input.clone(), input_drv));
        }
    }
    for (input, input_drv) in to_build {
        if !plan.order.contains(&input) {
            visit(&input, input_drv, plan, in_progress)?;
        }
    }
    in_progress.remove(path);
    plan.derivations.insert(path.clone(), drv);
    plan.order.push(path.clone());
    Ok(())
}

/// The store paths `drv` names directly: its input sources and the used
/// outputs of its input derivations (paths looked up in `outputs_of`).
pub fn input_roots(
    user: &StorePath,
    drv: &Derivation,
    outputs_of: &OutputsOf,
) -> Result<BTreeSet<StorePath>, ClosureError> {
    let mut roots = drv.input_sources.clone();
    for (input, names) in &drv.input_derivations {
        for name in names {
            let path = outputs_of
                .get(input)
                .and_then(|o| o.get(name))
                .ok_or_else(|| ClosureError::UnknownOutput {
                    user: user.clone(),
                    drv: input.clone(),
                    output: name.clone(),
                })?;
            roots.insert(path.clone());
        }
    }
    Ok(roots)
}

/// The closure of `paths` under runtime references, from Nix's database.
pub fn requisites(paths: &BTreeSet<StorePath>) -> Result<BTreeSet<StorePath>, ClosureError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut args = vec!["--query".to_owned(), "--requisites".to_owned()];
    args.extend(paths.iter().map(StorePath::to_string));
    nix_store(&args)
}

/// Those of `paths` that are not valid in the local Nix store.
pub fn invalid_paths(paths: &[StorePath]) -> Result<BTreeSet<StorePath>, ClosureError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut args = vec!["--check-validity".to_owned(), "--print-invalid".to_owned()];
    args.extend(paths.iter().map(StorePath::to_string));
    nix_store(&args)
}

/// Ingests each local store path into `store`, keyed by store path.
pub async fn import(
    store: &Store,
    paths: &BTreeSet<StorePath>,
) -> Result<BTreeMap<StorePath, Node>, ClosureError> {
    futures::stream::iter(paths.iter().cloned())
        .map(|path| async move {
            let node = ingest(store, Path::new(&path.to_string()), IngestMode::Copy)
                .await
                .map_err(|source| ClosureError::Import {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            Ok::<_, ClosureError>((path, node))
        })
        .buffer_unordered(PARALLEL_IMPORTS)
        .try_collect()
        .await
}

/// Runs `nix-store` and parses its output as one store path per line.
fn nix_store(args: &[String]) -> Result<BTreeSet<StorePath>, ClosureError> {
    let shown = shorten(&args.join(" "));
    let output = Command::new("nix-store")
        .args(args)
        .output()
        .map_err(|source| ClosureError::RunNixStore {
            args: shown.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ClosureError::NixStoreFailed {
            args: shown,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.parse().map_err(|source| ClosureError::NixStoreOutput {
                line: line.to_owned(),
                source,
            })
        })
        .collect()
}

/// Keeps error messages readable when many paths are passed.
fn shorten(s: &str) -> String {
    const MAX: usize = 300;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}
