//! Wire → domain: both request layouts validated into the one
//! [`BuildRequest`] the executor runs.
//!
//! `snix.build.v1` carries every field; the seed's `tvix.build.v1` layout
//! gets the Nix defaults (working dir `build`, inputs in `nix/store`, scratch
//! paths `build` and `nix/store`, outputs at `nix/store/<basename>`). The
//! rules themselves (paths, ordering, sizes, relations) live with the domain
//! type in [`crate::executor::request`].
//!
//! `kiln.v1.SubmitRequest` wraps either layout and may add `argv0`, the
//! builder's `argv[0]` when it must differ from `command_args[0]` (Nix
//! passes the builder's basename). The plain `DoBuild` faces have no such
//! field: their builders get argv = `command_args`, as upstream clients
//! expect.

use std::time::Duration;

use crate::castore::{Node, PathComponent};
use crate::executor::error::{invalid, InvalidRequest};
use crate::executor::request::{
    rel, sorted_abs_paths, sorted_rel_paths, validate_env, validate_inputs, AdditionalFile,
    BuildRequest, Constraints, Layout,
};
use crate::executor::ClientLimits;
use crate::proto::kiln_v1::{submit_request, SubmitRequest};
use crate::proto::{snix_build, tvix_build};

/// Validates a `kiln.v1.SubmitRequest`: the build request it wraps (either
/// layout) and its `argv0` (empty: argv[0] is `command_args[0]`).
pub fn from_submit(req: &SubmitRequest) -> Result<BuildRequest, InvalidRequest> {
    let request = match &req.request {
        Some(submit_request::Request::Tvix(w)) => from_tvix(w)?,
        Some(submit_request::Request::Snix(w)) => from_snix(w)?,
        None => {
            return Err(invalid(
                "request",
                "neither a tvix nor a snix build request",
            ))
        }
    };
    if req.argv0.is_empty() {
        return Ok(request);
    }
    request.with_argv0(req.argv0.clone())
}

/// The limits a `kiln.v1.SubmitRequest` asks for, with the gRPC deadline:
/// a 0 in `BuildLimits` means "the server's", the shorter of the deadline
/// and `timeout_secs` wins, and the executor lowers all of them to its own
/// ([`ClientLimits::within`]).
pub fn client_limits(req: &SubmitRequest, deadline: Option<Duration>) -> ClientLimits {
    let asked = req.limits.unwrap_or_default();
    let nonzero = |v: u64| (v > 0).then_some(v);
    let timeout = nonzero(asked.timeout_secs).map(Duration::from_secs);
    ClientLimits {
        timeout: match (deadline, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        max_silent: nonzero(asked.max_silent_secs).map(Duration::from_secs),
        max_log_bytes: nonzero(asked.max_log_bytes),
        bypass_result_cache: false,
    }
}

/// Validates a `snix.build.v1` request.
pub fn from_snix(req: &snix_build::BuildRequest) -> Result<BuildRequest, InvalidRequest> {
    let inputs = validate_inputs(
        req.inputs
            .iter()
            .map(|e| Node::try_from_snix_entry(e.clone())),
    )?;
    let working_dir = rel("working_dir", &req.working_dir)?;
    let scratch_paths = sorted_rel_paths("scratch_paths", &req.scratch_paths)?;
    let inputs_dir = rel("inputs_dir", &req.inputs_dir)?;
    let outputs = req
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| rel(&format!("outputs[{i}]"), o))
        .collect::<Result<Vec<_>, _>>()?;
    let constraints = match &req.constraints {
        None => Constraints::default(),
        Some(c) => {
            if c.system.is_empty() {
                return Err(invalid(
                    "constraints.system",
                    "must be set when constraints are present",
                ));
            }
            Constraints {
                system: c.system.clone(),
                min_memory: c.min_memory,
                available_ro_paths: sorted_abs_paths(
                    "constraints.available_ro_paths",
                    &c.available_ro_paths,
                )?,
                network_access: c.network_access,
                provide_bin_sh: c.provide_bin_sh,
            }
        }
    };
    let additional_files = req
        .additional_files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(AdditionalFile {
                path: rel(&format!("additional_files[{i}].path"), &f.path)?,
                contents: f.contents.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, InvalidRequest>>()?;
    let environment_vars = validate_env(
        req.environment_vars
            .iter()
            .map(|e| (e.key.as_str(), &e.value[..])),
    )?;
    let request = BuildRequest {
        inputs,
        command_args: req.command_args.clone(),
        argv0: None,
        working_dir,
        scratch_paths,
        inputs_dir,
        outputs,
        environment_vars,
        constraints,
        additional_files,
        refscan_needles: req.refscan_needles.clone(),
        layout: Layout::Snix,
        wire_echo: None,
    };
    request.check_relations()?;
    Ok(request)
}

/// Validates a seed-layout `tvix.build.v1` request, applying Nix defaults.
pub fn from_tvix(req: &tvix_build::BuildRequest) -> Result<BuildRequest, InvalidRequest> {
    let inputs = validate_inputs(
        req.inputs
            .iter()
            .map(|n| Node::try_from_tvix_node(n.clone())),
    )?;
    let store = rel("inputs_dir", "nix/store")?;
    let outputs = req
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let field = format!("outputs[{i}]");
            PathComponent::try_from(o.as_bytes())
                .map_err(|e| invalid(&field, format!("{o:?} is not a store basename: {e}")))?;
            store.join(o).map_err(|e| invalid(&field, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let constraints = match &req.constraints {
        None => Constraints::default(),
        Some(c) => Constraints {
            system: c.system.clone(),
            min_memory: c.min_memory,
            available_ro_paths: sorted_abs_paths(
                "constraints.available_ro_paths",
                &c.available_ro_paths,
            )?,
            network_access: false,
            provide_bin_sh: false,
        },
    };
    let environment_vars = validate_env(
        req.environment_vars
            .iter()
            .map(|e| (e.key.as_str(), &e.value[..])),
    )?;
    let request = BuildRequest {
        inputs,
        command_args: req.command_args.clone(),
        argv0: None,
        working_dir: rel("working_dir", "build")?,
        scratch_paths: vec![rel("scratch_paths", "build")?, store.clone()],
        inputs_dir: store,
        outputs,
        environment_vars,
        constraints,
        additional_files: Vec::new(),
        refscan_needles: Vec::new(),
        layout: Layout::Tvix,
        // Kept encoded: a byte string the size of the message, where the
        // decoded message would keep the whole receive buffer alive.
        wire_echo: Some(prost::Message::encode_to_vec(req).into()),
    };
    request.check_relations()?;
    Ok(request)
}

/// Fuzzing entry point: arbitrary bytes decoded as either layout and
/// validated. Must never panic (fuzz/ and tests/fuzz_smoke.rs drive it).
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    use prost::Message;
    if let Ok(req) = snix_build::BuildRequest::decode(data) {
        if let Ok(valid) = from_snix(&req) {
            let _ = crate::executor::plan::plan(&valid, &fuzz_limits());
        }
    }
    if let Ok(req) = tvix_build::BuildRequest::decode(data) {
        if let Ok(valid) = from_tvix(&req) {
            let _ = crate::executor::plan::plan(&valid, &fuzz_limits());
        }
    }
}

fn fuzz_limits() -> crate::executor::plan::Limits {
    crate::executor::plan::Limits {
        nested_virt_available: true,
        ro_path_allowlist: vec!["/opt".into()],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
