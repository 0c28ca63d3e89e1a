//! The one validated build request both wire layouts map into.
//!
//! `snix.build.v1` carries every field; the seed's `tvix.build.v1` layout
//! gets the Nix defaults (working dir `build`, inputs in `nix/store`, scratch
//! paths `build` and `nix/store`, outputs at `nix/store/<basename>`).
//!
//! Ordering decisions (PROTOCOL.md §2): inputs, environment variables,
//! scratch paths and read-only paths must be strictly sorted (duplicates and
//! disorder are rejected, as upstream does). Outputs are accepted in any order
//! — newer snix clients send them in output-name order — but never twice;
//! responses follow the request's order (snix) or are sorted by name (tvix).

use crate::castore::{Node, PathComponent};
use crate::executor::error::{invalid, InvalidRequest};
use crate::executor::paths::{AbsPath, PathError, RelPath};

mod relations;

/// Linux refuses to exec with a single argument or environment string longer
/// than this (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Bound on argv + environment together (a quarter of the 8 MiB default stack).
pub const MAX_ARGS_ENV_TOTAL: usize = 2 * 1024 * 1024;
/// Bound on the number of inputs one request may name.
pub const MAX_INPUTS: usize = 65_536;
/// Bound on the total size of `additional_files` (the gRPC message limit
/// bounds it anyway; this says so in the request's own terms).
pub const MAX_ADDITIONAL_FILES_BYTES: usize = 64 * 1024 * 1024;
/// Bound on the number of `additional_files`. Nix writes one per
/// `passAsFile` attribute (two with structured attrs); every file costs the
/// agent a create and the request a path check.
pub const MAX_ADDITIONAL_FILES: usize = 4096;
/// Bound on the number of `refscan_needles`. snix sends one needle (a
/// 32-character nixbase32 hash) per input and per output store path, so this
/// is [`MAX_INPUTS`] with room for the outputs. The scanner's automaton costs
/// about 50 times the needles' bytes, which [`MAX_REFSCAN_NEEDLES_BYTES`] caps.
pub const MAX_REFSCAN_NEEDLES: usize = MAX_INPUTS + 4096;
/// Bound on the summed length of all `refscan_needles`: every allowed needle
/// at the 32 bytes of a Nix store hash, so at most ~2 MiB of needles and
/// ~100 MiB of scanner per build.
pub const MAX_REFSCAN_NEEDLES_BYTES: usize = MAX_REFSCAN_NEEDLES * 32;

/// Which wire layout a request came in; decides the response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The seed's `tvix.build.v1`.
    Tvix,
    /// Today's `snix.build.v1`.
    Snix,
}

/// One environment variable; both parts are raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// Non-empty, no `=` and no NUL.
    pub key: String,
    /// Any bytes but NUL, at most [`MAX_ARG_STRLEN`] together with the key.
    pub value: Vec<u8>,
}

/// A file placed into the sandbox before the build starts (`passAsFile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionalFile {
    /// Inside some scratch path.
    pub path: RelPath,
    /// The file's bytes.
    pub contents: Vec<u8>,
}

/// What the build needs from the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Constraints {
    /// Nix system double the build must run on (e.g. `x86_64-linux`); empty
    /// when the client stated no constraints.
    pub system: String,
    /// Bytes of memory the build needs; the guest gets at least this much.
    pub min_memory: u64,
    /// Host paths the build needs read-only, sorted; `/dev/kvm` means nested
    /// virtualisation.
    pub available_ro_paths: Vec<AbsPath>,
    /// The build wants network access.
    pub network_access: bool,
    /// The build wants a static shell at `/bin/sh`.
    pub provide_bin_sh: bool,
}

/// A validated build request. Every field's contract holds once constructed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// Root nodes visible at `/<inputs_dir>/<name>`, strictly sorted by name.
    pub inputs: Vec<(PathComponent, Node)>,
    /// argv of the builder; non-empty, no NUL. `command_args[0]` is the
    /// program executed, and also its `argv[0]` unless [`Self::argv0`] says
    /// otherwise.
    pub command_args: Vec<String>,
    /// The builder's `argv[0]` when it must differ from `command_args[0]`:
    /// Nix passes the basename of the derivation's builder (`sh` for
    /// `/nix/store/…-bash/bin/sh`), and a builder that looks at `$0` sees
    /// it. `None`: argv is `command_args` as sent (what `tvix.build.v1` and
    /// `snix.build.v1` clients expect). When set: non-empty, no NUL, shorter
    /// than [`MAX_ARG_STRLEN`], and counted in [`MAX_ARGS_ENV_TOTAL`]. Any
    /// other string is allowed, `/` included: the kernel does not care what
    /// argv[0] says, and neither does the executor.
    pub argv0: Option<String>,
    /// The builder's working directory.
    pub working_dir: RelPath,
    /// Writable directories, strictly sorted.
    pub scratch_paths: Vec<RelPath>,
    /// Where inputs appear.
    pub inputs_dir: RelPath,
    /// Paths the build must produce, each inside a scratch path, unique, in
    /// the order the client sent them.
    pub outputs: Vec<RelPath>,
    /// The builder's whole environment, strictly sorted by key.
    pub environment_vars: Vec<EnvVar>,
    /// Host requirements.
    pub constraints: Constraints,
    /// Files to create before the build, each inside a scratch path.
    pub additional_files: Vec<AdditionalFile>,
    /// Strings whose occurrences in outputs are reported.
    pub refscan_needles: Vec<String>,
    /// The layout it arrived in.
    pub layout: Layout,
    /// The request as its client encoded it, for a layout whose answer
    /// repeats it (`tvix.build.v1`'s `Build.build_request`); opaque to the
    /// executor, which hands it back in the outcome.
    pub wire_echo: Option<bytes::Bytes>,
}

impl BuildRequest {
    /// Approximately how many bytes of heap this request holds: its strings,
    /// byte buffers and lists, with a flat overhead per element. What the
    /// queued-request budget ([`crate::executor::admission::RequestBudget`])
    /// counts; an estimate, not an allocator measurement.
    pub fn heap_size(&self) -> usize {
        use std::mem::size_of;
        let path = |p: &RelPath| size_of::<RelPath>() + p.as_str().len();
        let input = |(name, node): &(PathComponent, Node)| {
            let target = match node {
                Node::Symlink { target } => target.as_bytes().len(),
                _ => 0,
            };
            size_of::<(PathComponent, Node)>() + name.as_bytes().len() + target
        };
        let c = &self.constraints;
        self.inputs.iter().map(input).sum::<usize>()
            + self
                .command_args
                .iter()
                .chain(&self.argv0)
                .map(|a| size_of::<String>() + a.len())
                .sum::<usize>()
            + path(&self.working_dir)
            + path(&self.inputs_dir)
            + self.scratch_paths.iter().map(path).sum::<usize>()
            + self.outputs.iter().map(path).sum::<usize>()
            + self
                .environment_vars
                .iter()
                .map(|e| size_of::<EnvVar>() + e.key.len() + e.value.len())
                .sum::<usize>()
            + c.system.len()
            + c.available_ro_paths
                .iter()
                .map(|p| size_of::<AbsPath>() + p.as_str().len())
                .sum::<usize>()
            + self
                .additional_files
                .iter()
                .map(|f| size_of::<AdditionalFile>() + f.path.as_str().len() + f.contents.len())
                .sum::<usize>()
            + self
                .refscan_needles
                .iter()
                .map(|n| size_of::<String>() + n.len())
                .sum::<usize>()
            + self.wire_echo.as_ref().map_or(0, |e| e.len())
    }

    /// The same request with the builder's `argv[0]` set to `argv0` (see
    /// [`Self::argv0`]), checked by the same rules as the command itself.
    /// How `kiln.v1.SubmitRequest.argv0` and in-process fronts (a derivation
    /// built the way Nix runs it) set it.
    pub fn with_argv0(mut self, argv0: String) -> Result<Self, InvalidRequest> {
        self.argv0 = Some(argv0);
        self.check_command()?;
        Ok(self)
    }

    /// Guest path of a relative sandbox path, for messages.
    pub fn guest_path(p: &RelPath) -> String {
        format!("/{p}")
    }
}

pub(crate) fn rel(field: &str, s: &str) -> Result<RelPath, InvalidRequest> {
    RelPath::parse(s).map_err(|e: PathError| invalid(field, e))
}

pub(crate) fn sorted_rel_paths(
    field: &str,
    items: &[String],
) -> Result<Vec<RelPath>, InvalidRequest> {
    let paths = items
        .iter()
        .enumerate()
        .map(|(i, s)| rel(&format!("{field}[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    check_strictly_sorted(field, &paths, |p| p.as_str().as_bytes())?;
    Ok(paths)
}

pub(crate) fn sorted_abs_paths(
    field: &str,
    items: &[String],
) -> Result<Vec<AbsPath>, InvalidRequest> {
    let paths = items
        .iter()
        .enumerate()
        .map(|(i, s)| AbsPath::parse(s).map_err(|e| invalid(format!("{field}[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    check_strictly_sorted(field, &paths, |p| p.as_str().as_bytes())?;
    Ok(paths)
}

pub(crate) fn check_strictly_sorted<T>(
    field: &str,
    items: &[T],
    key: impl Fn(&T) -> &[u8],
) -> Result<(), InvalidRequest> {
    for (i, pair) in items.windows(2).enumerate() {
        let (a, b) = (key(&pair[0]), key(&pair[1]));
        if a == b {
            return Err(invalid(
                format!("{field}[{}]", i + 1),
                format!("duplicate {:?}", String::from_utf8_lossy(b)),
            ));
        }
        if a > b {
            return Err(invalid(
                format!("{field}[{}]", i + 1),
                format!(
                    "not sorted: {:?} after {:?}",
                    String::from_utf8_lossy(b),
                    String::from_utf8_lossy(a)
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_inputs<E: std::fmt::Display>(
    items: impl ExactSizeIterator<Item = Result<(PathComponent, Node), E>>,
) -> Result<Vec<(PathComponent, Node)>, InvalidRequest> {
    if items.len() > MAX_INPUTS {
        return Err(invalid(
            "inputs",
            format!("{} inputs, over the limit of {MAX_INPUTS}", items.len()),
        ));
    }
    let inputs = items
        .enumerate()
        .map(|(i, r)| r.map_err(|e| invalid(format!("inputs[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    check_strictly_sorted("inputs", &inputs, |(name, _)| name.as_ref())?;
    Ok(inputs)
}

pub(crate) fn validate_env<'a>(
    items: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<EnvVar>, InvalidRequest> {
    let vars = items
        .enumerate()
        .map(|(i, (key, value))| {
            if key.is_empty() {
                return Err(invalid(format!("environment_vars[{i}].key"), "is empty"));
            }
            if key.contains('=') || key.contains('\0') {
                return Err(invalid(format!("environment_vars[{i}].key"), format!("{key:?} contains `=` or NUL")));
            }
            if value.contains(&0) {
                return Err(invalid(format!("environment_vars[{i}].value"), format!("value of {key:?} contains a NUL byte")));
            }
            if key.len() + value.len() + 1 >= MAX_ARG_STRLEN {
                return Err(invalid(
                    format!("environment_vars[{i}].value"),
                    format!(
                        "{key:?} is {} bytes, over the {MAX_ARG_STRLEN}-byte limit Linux sets for one environment string",
                        value.len()
                    ),
                ));
            }
            Ok(EnvVar { key: key.to_owned(), value: value.to_vec() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_strictly_sorted("environment_vars", &vars, |v| v.key.as_bytes())?;
    Ok(vars)
}
