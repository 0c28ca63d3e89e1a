//! Building one derivation of the plan: its input closure as castore
//! nodes, the request, the submission (offline again when the server
//! refuses a fixed-output build the network), and what its outputs refer
//! to, for the derivations built after it.

use std::collections::{BTreeMap, BTreeSet};

use crate::castore::wire::WireNode;
use crate::castore::{Node, Store};
use crate::client::KilnChannel;
use crate::nix::build_request::{build_request, output_paths, RequestOptions};
use crate::nix::closure::{self, BuildPlan, OutputsOf};
use crate::nix::fixed_output;
use crate::nix::{Derivation, StorePath};
use crate::proto::snix_build;

use super::derivation;
use super::error::{bad, fixed_output_rejected, inconsistent, DrvError};
use super::submit::{refuses_network, submit};

/// An output kiln built during this run: its tree and what it refers to.
pub(super) struct Built {
    pub(super) node: Node,
    pub(super) references: BTreeSet<StorePath>,
}

/// The state of one `kiln build --drv` run.
pub(super) struct Run<'a> {
    pub(super) store: &'a Store,
    pub(super) channel: KilnChannel,
    pub(super) outputs_of: &'a OutputsOf,
    pub(super) request_options: RequestOptions,
    /// Ask the server to build even what its result cache would answer.
    pub(super) rebuild: bool,
    /// Local store paths already imported into the castore.
    pub(super) imported: BTreeMap<StorePath, Node>,
    /// Outputs built by kiln in this run.
    pub(super) built: BTreeMap<StorePath, Built>,
}

impl Run<'_> {
    /// Builds one derivation of the plan, its inputs already built.
    pub(super) async fn build_one(
        &mut self,
        plan: &BuildPlan,
        drv_path: &StorePath,
    ) -> Result<(), DrvError> {
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
        let (request, response) =
            match submit(&self.channel, drv_path, drv, request.clone(), self.rebuild).await {
                Err(e) if drv.is_fixed_output() && refuses_network(&e) => {
                    // Nix gives fixed-output builds the network; a kiln server
                    // has none. The declared hash is checked below either way.
                    eprintln!("kiln: the server offers no network; building {drv_path} offline");
                    let mut offline = request;
                    if let Some(c) = offline.constraints.as_mut() {
                        c.network_access = false;
                    }
                    let response =
                        submit(&self.channel, drv_path, drv, offline.clone(), self.rebuild).await?;
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
                .map_err(|source| fixed_output_rejected(drv_path, path, source))?;
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
