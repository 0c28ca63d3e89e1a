//! A derivation as a `snix.build.v1.BuildRequest`, set up the way Nix 2.8
//! runs it in its sandbox (PROTOCOL.md §4), so the builder sees the same
//! argv, environment, working directory and files under kiln as under Nix.
//!
//! The environment follows Nix's `initEnv` step by step, because the order
//! decides who wins a clash:
//! 1. `PATH=/path-not-set`, `HOME=/homeless-shelter`, `NIX_STORE=/nix/store`,
//!    `NIX_BUILD_CORES=<n>`: defaults the derivation may override;
//! 2. the derivation's variables, except those named in `passAsFile`: each
//!    of those becomes a file `/build/.attr-<nixbase32 sha256 of its name>`
//!    and a variable `<name>Path` pointing there. With structured
//!    attributes instead: no derivation variables, but `.attrs.json` and
//!    `.attrs.sh` in `/build` and `NIX_ATTRS_{JSON,SH}_FILE` naming them
//!    (see [`super::structured_attrs`]);
//! 3. `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` = `/build`;
//! 4. fixed-output derivations only: `NIX_OUTPUT_CHECKED=1` and the
//!    variables listed in `impureEnvVars`, taken from the caller;
//! 5. `NIX_LOG_FD=2` and `TERM=xterm-256color`.
//!
//! Outputs are listed in output-name order (`out` of a one-output
//! derivation, else e.g. `dev` before `out`), not sorted by path: index `i`
//! of the response is then output `i` of the derivation, which is what
//! current snix clients send; kiln's executor accepts both orders
//! (PROTOCOL.md §2).
//!
//! argv: Nix runs `builder` with `argv[0]` = the builder's basename and the
//! derivation's `args` after it. `snix.build.v1` has no field for an
//! `argv[0]` that differs from the executed path, so [`build_request`]'s
//! `command_args` are `[builder, args…]` and [`builder_argv0`] gives the
//! basename; [`submit_request`] carries both as kiln's
//! `kiln.v1.SubmitRequest` (`argv0`), and an in-process front turns that
//! into the domain request with [`crate::grpc::request::from_submit`].
//!
//! `/bin/sh`: Nix provides only what its `sandbox-paths` setting lists.
//! Debian's `nix-bin` (2.8) is built without a sandbox shell, so that list
//! is empty and builds see no `/bin` at all; [`RequestOptions::default`]
//! mirrors that with `provide_bin_sh = false`.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::derivation::Derivation;
use super::nixbase32;
use super::store_path::StorePath;
use super::structured_attrs::{attrs_files, StructuredAttrsError};
use crate::castore::wire::WireNode;
use crate::castore::{Node, PathComponent};
use crate::proto::kiln_v1::{submit_request, SubmitRequest};
use crate::proto::snix_build::build_request::AdditionalFile;
use crate::proto::{snix_build, snix_castore};

/// Where Nix puts the build directory inside the sandbox.
pub const BUILD_DIR: &str = "/build";

/// Settings that come from the Nix configuration rather than the derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOptions {
    /// `NIX_BUILD_CORES` (Nix's `cores` setting; 0 there means "all").
    pub build_cores: u32,
    /// Whether the sandbox gets a static `/bin/sh`.
    pub provide_bin_sh: bool,
    /// Values for `impureEnvVars` of fixed-output derivations (Nix takes
    /// them from its own environment; unset ones become empty).
    pub impure_env: BTreeMap<String, String>,
}

impl Default for RequestOptions {
    /// All cores of this machine, no `/bin/sh`, no impure variables.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            build_cores: u32::try_from(cores).unwrap_or(u32::MAX),
            provide_bin_sh: false,
            impure_env: BTreeMap::new(),
        }
    }
}

/// Why a derivation cannot be turned into a build request.
#[derive(Debug, thiserror::Error)]
pub enum BuildRequestError {
    /// The structured attributes (`__json`) cannot be handed over.
    #[error("structured attributes")]
    StructuredAttrs(#[source] StructuredAttrsError),
    /// A floating content-addressed output has no path before the build.
    #[error("output {0:?} has no store path (content-addressed derivations are not supported)")]
    FloatingOutput(String),
    /// A direct input of the derivation is missing from the given inputs.
    #[error("input {0} is not among the imported inputs")]
    MissingInput(String),
    /// An input's store basename is not a valid castore name.
    #[error("input {path} cannot be named in the castore")]
    InputName {
        /// The store path.
        path: String,
        /// Why the name is rejected.
        #[source]
        source: crate::castore::ValidationError,
    },
    /// A variable name the build protocol cannot carry (empty, `=` or NUL).
    #[error("environment variable name {0:?} is empty or holds `=` or NUL")]
    VariableName(String),
    /// A variable value holding NUL, which no process environment can carry.
    #[error("environment variable {0:?} holds a NUL byte")]
    VariableValue(String),
}

/// Builds the request for `drv`. `inputs` maps every store path the build
/// needs (the closure of its input sources and of the used outputs of its
/// input derivations) to its castore node; `outputs_of` gives, for each
/// input derivation, the paths of its outputs.
pub fn build_request(
    drv: &Derivation,
    inputs: &BTreeMap<StorePath, Node>,
    outputs_of: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    options: &RequestOptions,
) -> Result<snix_build::BuildRequest, BuildRequestError> {
    check_inputs(drv, inputs, outputs_of)?;
    let outputs = output_paths(drv)?;
    let (environment, additional_files) = environment(drv, options)?;
    let mut command_args = vec![drv.builder.clone()];
    command_args.extend(drv.arguments.iter().cloned());
    Ok(snix_build::BuildRequest {
        inputs: wire_inputs(inputs)?,
        command_args,
        working_dir: "build".to_owned(),
        scratch_paths: vec!["build".to_owned(), "nix/store".to_owned()],
        inputs_dir: "nix/store".to_owned(),
        outputs: outputs
            .iter()
            .map(|p| format!("nix/store/{}", p.basename()))
            .collect(),
        environment_vars: environment
            .into_iter()
            .map(|(key, value)| snix_build::build_request::EnvVar {
                key,
                value: value.into(),
            })
            .collect(),
        constraints: Some(snix_build::build_request::BuildConstraints {
            system: drv.system.clone(),
            min_memory: 0,
            available_ro_paths: Vec::new(),
            network_access: drv.is_fixed_output(),
            provide_bin_sh: options.provide_bin_sh,
        }),
        additional_files,
        refscan_needles: needles(&outputs, inputs.keys()),
    })
}

/// The `argv[0]` Nix gives `builder`: its basename, the part after the last
/// `/` once trailing slashes are dropped (Nix's `baseNameOf`), so `sh` for
/// `/nix/store/…-bash/bin/sh`. `None` when that is `builder` itself (no `/`,
/// e.g. `builtin:fetchurl`, whose handling this leaves as it is) or empty
/// (`/`): `command_args[0]` then stands as `argv[0]`.
pub fn builder_argv0(builder: &str) -> Option<String> {
    let trimmed = builder.trim_end_matches('/');
    let base = trimmed.rsplit('/').next().unwrap_or(trimmed);
    (!base.is_empty() && base != builder).then(|| base.to_owned())
}

/// `request` (made by [`build_request`] for `drv`) as kiln's
/// `kiln.v1.SubmitRequest`, with the builder's `argv[0]` set the way Nix
/// sets it ([`builder_argv0`]).
pub fn submit_request(drv: &Derivation, request: snix_build::BuildRequest) -> SubmitRequest {
    SubmitRequest {
        request: Some(submit_request::Request::Snix(request)),
        argv0: builder_argv0(&drv.builder).unwrap_or_default(),
        limits: None,
    }
}

/// The derivation's output paths, in output-name order.
pub fn output_paths(drv: &Derivation) -> Result<Vec<StorePath>, BuildRequestError> {
    drv.outputs
        .iter()
        .map(|(name, output)| {
            output
                .path
                .clone()
                .ok_or_else(|| BuildRequestError::FloatingOutput(name.clone()))
        })
        .collect()
}

/// The name of the file a `passAsFile` attribute is written to, inside the
/// build directory: `.attr-<nixbase32 of sha256(name)>`.
pub fn pass_as_file_name(attribute: &str) -> String {
    let digest: [u8; 32] = Sha256::digest(attribute.as_bytes()).into();
    format!(".attr-{}", nixbase32::encode(&digest))
}

fn check_inputs(
    drv: &Derivation,
    inputs: &BTreeMap<StorePath, Node>,
    outputs_of: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
) -> Result<(), BuildRequestError> {
    let missing = |what: String| Err(BuildRequestError::MissingInput(what));
    for source in &drv.input_sources {
        if !inputs.contains_key(source) {
            return missing(source.to_string());
        }
    }
    for (input_drv, names) in &drv.input_derivations {
        for name in names {
            match outputs_of.get(input_drv).and_then(|o| o.get(name)) {
                Some(path) if inputs.contains_key(path) => {}
                Some(path) => return missing(path.to_string()),
                None => return missing(format!("output {name:?} of {input_drv}")),
            }
        }
    }
    Ok(())
}

type Environment = BTreeMap<String, Vec<u8>>;

fn environment(
    drv: &Derivation,
    options: &RequestOptions,
) -> Result<(Environment, Vec<AdditionalFile>), BuildRequestError> {
    let mut env = Environment::new();
    let set = |env: &mut Environment, key: &str, value: &str| {
        env.insert(key.to_owned(), value.as_bytes().to_vec());
    };
    set(&mut env, "PATH", "/path-not-set");
    set(&mut env, "HOME", "/homeless-shelter");
    set(&mut env, "NIX_STORE", "/nix/store");
    set(
        &mut env,
        "NIX_BUILD_CORES",
        &options.build_cores.to_string(),
    );

    let mut files = Vec::new();
    if drv.has_structured_attrs() {
        structured_attributes(drv, &mut env, &mut files)?;
    } else {
        derivation_variables(drv, &mut env, &mut files);
    }

    for key in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(&mut env, key, BUILD_DIR);
    }
    if drv.is_fixed_output() {
        set(&mut env, "NIX_OUTPUT_CHECKED", "1");
        for key in impure_env_vars(drv) {
            let value = options.impure_env.get(&key).map_or("", String::as_str);
            set(&mut env, &key, value);
        }
    }
    set(&mut env, "NIX_LOG_FD", "2");
    set(&mut env, "TERM", "xterm-256color");

    for (key, value) in &env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(BuildRequestError::VariableName(key.clone()));
        }
        if value.contains(&0) {
            return Err(BuildRequestError::VariableValue(key.clone()));
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((env, files))
}

/// Step 2 without structured attributes: the derivation's variables, those
/// named in `passAsFile` as files instead.
fn derivation_variables(drv: &Derivation, env: &mut Environment, files: &mut Vec<AdditionalFile>) {
    let pass_as_file: BTreeSet<String> = drv
        .environment
        .get("passAsFile")
        .map(|names| split_words(&String::from_utf8_lossy(names)))
        .unwrap_or_default()
        .into_iter()
        .collect();
    for (key, value) in &drv.environment {
        if pass_as_file.contains(key) {
            let file = pass_as_file_name(key);
            files.push(AdditionalFile {
                path: format!("build/{file}"),
                contents: value.clone().into(),
            });
            let path = format!("{BUILD_DIR}/{file}");
            env.insert(format!("{key}Path"), path.into_bytes());
        } else {
            env.insert(key.clone(), value.clone());
        }
    }
}

/// Step 2 with structured attributes: no variables from the derivation,
/// `.attrs.json` and `.attrs.sh` in the build directory instead.
fn structured_attributes(
    drv: &Derivation,
    env: &mut Environment,
    files: &mut Vec<AdditionalFile>,
) -> Result<(), BuildRequestError> {
    let outputs = drv
        .outputs
        .iter()
        .map(|(name, output)| {
            let path = output
                .path
                .clone()
                .ok_or_else(|| BuildRequestError::FloatingOutput(name.clone()))?;
            Ok((name.clone(), path))
        })
        .collect::<Result<BTreeMap<_, _>, BuildRequestError>>()?;
    let json = drv.environment.get("__json").map_or(&[][..], Vec::as_slice);
    let attrs = attrs_files(json, &outputs).map_err(BuildRequestError::StructuredAttrs)?;
    for (name, contents) in [(".attrs.json", attrs.json), (".attrs.sh", attrs.sh)] {
        files.push(AdditionalFile {
            path: format!("build/{name}"),
            contents: contents.into(),
        });
    }
    env.insert(
        "NIX_ATTRS_JSON_FILE".to_owned(),
        format!("{BUILD_DIR}/.attrs.json").into_bytes(),
    );
    env.insert(
        "NIX_ATTRS_SH_FILE".to_owned(),
        format!("{BUILD_DIR}/.attrs.sh").into_bytes(),
    );
    Ok(())
}

/// `impureEnvVars`: a word list, or with structured attributes a JSON list.
fn impure_env_vars(drv: &Derivation) -> Vec<String> {
    if drv.has_structured_attrs() {
        let json = drv.environment.get("__json").map_or(&[][..], Vec::as_slice);
        let value: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
        return value
            .get("impureEnvVars")
            .and_then(|v| v.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
    }
    drv.environment
        .get("impureEnvVars")
        .map(|v| split_words(&String::from_utf8_lossy(v)))
        .unwrap_or_default()
}

/// Splits on the whitespace Nix's `tokenizeString` uses.
fn split_words(s: &str) -> Vec<String> {
    s.split([' ', '\t', '\n', '\r'])
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn wire_inputs(
    inputs: &BTreeMap<StorePath, Node>,
) -> Result<Vec<snix_castore::Entry>, BuildRequestError> {
    inputs
        .iter()
        .map(|(path, node)| {
            let name = PathComponent::try_from(path.basename().as_str()).map_err(|source| {
                BuildRequestError::InputName {
                    path: path.to_string(),
                    source,
                }
            })?;
            Ok(snix_castore::Entry::from_named(&name, node))
        })
        .collect()
}

/// Hash parts to scan outputs for: the outputs first (needle `i` is output
/// `i`), then every input, without repeats.
fn needles<'a>(
    outputs: &'a [StorePath],
    inputs: impl Iterator<Item = &'a StorePath>,
) -> Vec<String> {
    let mut seen = BTreeSet::new();
    outputs
        .iter()
        .chain(inputs)
        .map(StorePath::hash_part)
        .filter(|h| seen.insert(h.clone()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn argv0_is_the_basename_of_the_builder_as_in_nix() {
        let cases = [
            (
                "/nix/store/0bcdfghijklmnpqrsvwxyz0123456789-bash/bin/sh",
                Some("sh"),
            ),
            (
                "/nix/store/0bcdfghijklmnpqrsvwxyz0123456789-builder.sh",
                Some("0bcdfghijklmnpqrsvwxyz0123456789-builder.sh"),
            ),
            ("/bin/sh", Some("sh")),
            ("./build.sh", Some("build.sh")),
            ("/nix/store/x/bin/sh/", Some("sh")),
            ("/nix/store/x/bin//sh", Some("sh")),
            // No `/`: argv[0] already is the basename (builtins stay as they are).
            ("builtin:fetchurl", None),
            ("sh", None),
            ("/", None),
            ("", None),
        ];
        for (builder, want) in cases {
            assert_eq!(builder_argv0(builder).as_deref(), want, "{builder:?}");
        }
    }

    #[test]
    fn the_submit_request_carries_the_basename_into_the_domain_request() {
        let drv = Derivation {
            outputs: BTreeMap::new(),
            input_derivations: BTreeMap::new(),
            input_sources: BTreeSet::new(),
            system: "x86_64-linux".into(),
            builder: "/nix/store/0bcdfghijklmnpqrsvwxyz0123456789-busybox/bin/busybox".into(),
            arguments: vec!["sh".into(), "-c".into(), "echo $0".into()],
            environment: BTreeMap::new(),
        };
        let request = snix_build::BuildRequest {
            command_args: vec![
                drv.builder.clone(),
                "sh".into(),
                "-c".into(),
                "echo $0".into(),
            ],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            ..Default::default()
        };
        let submit = submit_request(&drv, request);
        assert_eq!(submit.argv0, "busybox");
        let domain = crate::grpc::request::from_submit(&submit).unwrap();
        assert_eq!(domain.argv0.as_deref(), Some("busybox"));
        assert_eq!(domain.command_args[0], drv.builder);
    }
}
