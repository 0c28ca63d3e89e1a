//! Steps 2a and 3, the inputs: checked before a VM slot is taken, then
//! materialised into the build's read-only share.
//!
//! Every input's directories are fetched and what they expand to on disk is
//! checked against the operator's limits first (a few KB of directories can
//! stand for millions of entries); then each input is written beneath a
//! handle of the share, hardlinked from the blob store where possible,
//! cancellably and under the build's deadline. Errors name the input by its
//! index and name.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::castore::materialise::{self, Control, Expansion, Limits, MaterialiseError};
use crate::castore::{B3Digest, Directory, PathComponent, Store};
use crate::executor::error::{BuildError, Precondition};
use crate::executor::request::BuildRequest;
use crate::executor::run::Steps;

/// The fetched directories of one input.
pub(crate) type InputTree = HashMap<B3Digest, Directory>;

/// Step 2a: fetches every input's directories and checks what they all
/// expand to against `limits`.
pub(crate) async fn check(
    store: &Store,
    req: &BuildRequest,
    limits: &Limits,
) -> Result<Vec<InputTree>, BuildError> {
    let mut trees = Vec::with_capacity(req.inputs.len());
    let mut total = Expansion::default();
    for (index, (name, node)) in req.inputs.iter().enumerate() {
        let tree = materialise::fetch_tree(store, node)
            .await
            .map_err(|e| input_error(index, name, e))?;
        let expansion =
            materialise::expansion(node, &tree).map_err(|e| input_error(index, name, e))?;
        total = total.plus(expansion);
        trees.push(tree);
    }
    total.check(limits).map_err(|e| Precondition::Inputs {
        detail: format!("inputs: {e}"),
    })?;
    Ok(trees)
}

/// Step 3: inputs into the read-only share, scratch paths created, all
/// through directory handles.
pub(crate) async fn materialise(
    store: &Store,
    steps: &Steps<'_>,
    trees: Vec<InputTree>,
    min_free_bytes: u64,
) -> Result<(), BuildError> {
    let Steps { req, ws, .. } = *steps;
    let inputs = ws
        .inputs_dir()
        .map_err(|e| BuildError::infra("open the inputs share", e))?;
    let control = Control {
        cancel: Some(steps.cancel.clone()),
        deadline: Some(steps.deadline),
        min_free_bytes,
    };
    for (index, ((name, node), tree)) in req.inputs.iter().zip(trees).enumerate() {
        let dir = inputs
            .try_clone()
            .map_err(|e| BuildError::infra("open the inputs share", e))?;
        let origin = PathBuf::from(format!("/{}/{name}", req.inputs_dir));
        materialise::materialise_at(
            store,
            dir,
            name.to_os_str().to_owned(),
            node,
            tree,
            origin,
            control.clone(),
        )
        .await
        .map_err(|e| match e {
            MaterialiseError::Cancelled => BuildError::Cancelled,
            MaterialiseError::Deadline => BuildError::Timeout {
                secs: steps.timeout_secs(),
                log_tail: Vec::new(),
            },
            e => input_error(index, name, e),
        })?;
    }
    let scratch = ws
        .scratch_dir()
        .map_err(|e| BuildError::infra("open the scratch share", e))?;
    for s in &req.scratch_paths {
        scratch
            .create_dir_all(std::path::Path::new(s.as_str()), 0o755)
            .map_err(|e| BuildError::infra("create scratch directories", e))?;
    }
    Ok(())
}

/// A materialise failure of input `index`, naming it.
fn input_error(index: usize, name: &PathComponent, e: MaterialiseError) -> BuildError {
    match e.missing() {
        Some((what, digest)) => BuildError::MissingInput {
            index,
            name: name.to_string(),
            what,
            digest,
        },
        None => match e {
            MaterialiseError::TooLarge { .. } => Precondition::Inputs {
                detail: format!("inputs[{index}] ({name}): {e}"),
            }
            .into(),
            e => BuildError::infra("materialise inputs", e),
        },
    }
}
