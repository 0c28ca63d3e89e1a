//! Building for Nix clients: `BuildPaths`/`BuildPathsWithResults` (by
//! `.drv` path, missing input derivations built first) and
//! `BuildDerivation` (a derivation sent inline, its inputs already copied).
//!
//! Each derivation runs as one kiln build, made exactly as `kiln build
//! --drv` makes it ([`crate::nix::build_request`]): same sandbox layout and
//! environment, `argv[0]` the builder's basename, fixed-output builds with
//! network and their declared hash checked. Its log goes to the client live
//! as the lines of a build activity; the outputs are recorded in the
//! path-info store with the references kiln's refscan found.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::logger::split_lines;
use super::protocol::BuildStatus;
use super::session::{OpError, Session};
use super::store::Daemon;
use super::types::{BuildResult, DerivedPath, OutputsSpec, ReadError};
use super::wire::{WireReader, MAX_SHORT};
use crate::castore::wire::WireNode;
use crate::castore::Node;
use crate::client::{submit_and_follow, EventSink, FollowError};
use crate::nix::build_request::{build_request, output_paths, submit_request, RequestOptions};
use crate::nix::fixed_output::{self, FixedOutputHash};
use crate::nix::nar::nar_hash;
use crate::nix::path_info::PathInfo;
use crate::nix::store_path::make::ContentAddress;
use crate::nix::{Derivation, StorePath};
use crate::proto::kiln_v1::{BuildLimits, LogChunk};

/// How many lines of a failed build's log go into the error, as Nix's
/// default `log-lines`.
const LOG_LINES: usize = 10;

/// What the client's `SetOptions` asks of builds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// `max-silent-time`, seconds; 0: none.
    pub max_silent_secs: u64,
    /// `timeout`, seconds; 0: none.
    pub timeout_secs: u64,
    /// `max-build-log-size`, bytes; 0: none.
    pub max_log_bytes: u64,
    /// `cores`; 0: the daemon's default.
    pub build_cores: u64,
    /// `log-lines`; 0: Nix's default of 10.
    pub log_lines: u64,
}

impl BuildOptions {
    /// Reads `SetOptions`' arguments: twelve words, then the overridden
    /// settings by name.
    pub async fn read<R: AsyncRead + Unpin + Send>(
        r: &mut WireReader<R>,
    ) -> Result<Self, ReadError> {
        let _keep_failed = r.u64("keepFailed").await?;
        let _keep_going = r.u64("keepGoing").await?;
        let _try_fallback = r.u64("tryFallback").await?;
        let _verbosity = r.u64("verbosity").await?;
        let _max_build_jobs = r.u64("maxBuildJobs").await?;
        let max_silent_secs = r.u64("maxSilentTime").await?;
        let _use_build_hook = r.u64("useBuildHook").await?;
        let _build_verbosity = r.u64("verboseBuild").await?;
        let _log_type = r.u64("logType").await?;
        let _print_build_trace = r.u64("printBuildTrace").await?;
        let build_cores = r.u64("buildCores").await?;
        let _use_substitutes = r.u64("useSubstitutes").await?;
        let overrides = r.string_pairs("the overridden settings", MAX_SHORT).await?;
        let mut options = BuildOptions {
            max_silent_secs,
            build_cores,
            ..BuildOptions::default()
        };
        for (name, value) in overrides {
            let number = || value.trim().parse::<u64>().ok();
            match name.as_str() {
                "max-silent-time" => {
                    options.max_silent_secs = number().unwrap_or(options.max_silent_secs)
                }
                "timeout" | "build-timeout" => options.timeout_secs = number().unwrap_or(0),
                // Nix's name for it (2.8 to current), and its old alias.
                "max-build-log-size" | "build-max-log-size" => {
                    options.max_log_bytes = number().unwrap_or(0)
                }
                "cores" | "build-cores" => {
                    options.build_cores = number().unwrap_or(options.build_cores)
                }
                "log-lines" => options.log_lines = number().unwrap_or(0),
                _ => {}
            }
        }
        Ok(options)
    }

    /// These options with every limit the client left at 0 taken from the
    /// operator's `defaults`. Nix's ssh-ng client sends no `SetOptions` at
    /// all (2.8 through current), so for remote builders the defaults are
    /// what applies, as a remote Nix daemon's own `nix.conf` would.
    pub fn or_defaults(mut self, defaults: &BuildOptions) -> Self {
        let fill = |v: &mut u64, d: u64| {
            if *v == 0 {
                *v = d;
            }
        };
        fill(&mut self.max_silent_secs, defaults.max_silent_secs);
        fill(&mut self.timeout_secs, defaults.timeout_secs);
        fill(&mut self.max_log_bytes, defaults.max_log_bytes);
        fill(&mut self.build_cores, defaults.build_cores);
        fill(&mut self.log_lines, defaults.log_lines);
        self
    }

    fn limits(&self) -> BuildLimits {
        BuildLimits {
            timeout_secs: self.timeout_secs,
            max_silent_secs: self.max_silent_secs,
            max_log_bytes: self.max_log_bytes,
        }
    }
}

/// What `QueryMissing` answers.
pub struct Missing {
    /// Derivations that would be built.
    pub will_build: BTreeSet<StorePath>,
    /// Paths kiln does not have and cannot build.
    pub unknown: BTreeSet<StorePath>,
}

/// Which derivations building `targets` would run.
pub async fn query_missing(
    daemon: &Daemon,
    targets: &[(String, DerivedPath)],
) -> Result<Missing, OpError> {
    let mut missing = Missing {
        will_build: BTreeSet::new(),
        unknown: BTreeSet::new(),
    };
    let mut pending: Vec<(StorePath, OutputsSpec)> = Vec::new();
    for (_, target) in targets {
        match target {
            DerivedPath::Opaque(path) => {
                if !daemon.is_valid(path).await? {
                    missing.unknown.insert(path.clone());
                }
            }
            DerivedPath::Built { drv, outputs } => pending.push((drv.clone(), outputs.clone())),
        }
    }
    let mut seen = BTreeSet::new();
    while let Some((drv_path, wanted)) = pending.pop() {
        if !seen.insert(drv_path.clone()) {
            continue;
        }
        let drv = match daemon.read_derivation(&drv_path).await? {
            Some(Ok(drv)) => drv,
            _ => {
                missing.unknown.insert(drv_path);
                continue;
            }
        };
        if outputs_valid(daemon, &drv, &wanted).await? {
            continue;
        }
        missing.will_build.insert(drv_path.clone());
        for (input, names) in &drv.input_derivations {
            pending.push((input.clone(), OutputsSpec::Names(names.clone())));
        }
        for source in &drv.input_sources {
            if !daemon.is_valid(source).await? {
                missing.unknown.insert(source.clone());
            }
        }
    }
    Ok(missing)
}

async fn outputs_valid(
    daemon: &Daemon,
    drv: &Derivation,
    wanted: &OutputsSpec,
) -> Result<bool, OpError> {
    for (name, output) in &drv.outputs {
        if let OutputsSpec::Names(names) = wanted {
            if !names.contains(name) {
                continue;
            }
        }
        match &output.path {
            Some(path) if daemon.is_valid(path).await? => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn result(status: BuildStatus, error: impl Into<String>) -> BuildResult {
    let t = now();
    BuildResult {
        status,
        error: error.into(),
        start_time: t,
        stop_time: t,
        built_outputs: BTreeMap::new(),
    }
}

/// Builds each target (`BuildPaths`, `BuildPathsWithResults`).
pub async fn build_paths<R, W>(
    s: &mut Session<'_, R, W>,
    targets: &[(String, DerivedPath)],
) -> Result<Vec<(String, BuildResult)>, OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut results = Vec::new();
    let mut done: BTreeMap<StorePath, BuildResult> = BTreeMap::new();
    for (text, target) in targets {
        let result = match target {
            DerivedPath::Opaque(path) => {
                if s.daemon.is_valid(path).await? {
                    result(BuildStatus::AlreadyValid, "")
                } else {
                    result(
                        BuildStatus::MiscFailure,
                        format!("path '{path}' is not valid in kiln's store and kiln has no substituters"),
                    )
                }
            }
            DerivedPath::Built { drv, .. } => build_by_path(s, drv, &mut done).await?,
        };
        results.push((text.clone(), result));
    }
    Ok(results)
}

/// Builds `root` from its `.drv` in the store, its input derivations with
/// missing outputs first (depth first, each once).
async fn build_by_path<R, W>(
    s: &mut Session<'_, R, W>,
    root: &StorePath,
    done: &mut BTreeMap<StorePath, BuildResult>,
) -> Result<BuildResult, OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    // Read the derivation graph below `root` that needs building.
    let mut derivations: BTreeMap<StorePath, Derivation> = BTreeMap::new();
    let mut order: Vec<StorePath> = Vec::new();
    // (path, children visited?)
    let mut stack: Vec<(StorePath, bool)> = vec![(root.clone(), false)];
    let mut on_stack: BTreeSet<StorePath> = BTreeSet::new();
    while let Some((path, expanded)) = stack.pop() {
        if expanded {
            on_stack.remove(&path);
            order.push(path);
            continue;
        }
        if derivations.contains_key(&path) || done.contains_key(&path) {
            continue;
        }
        if !on_stack.insert(path.clone()) {
            return Ok(result(
                BuildStatus::MiscFailure,
                format!("derivation '{path}' depends on itself"),
            ));
        }
        let drv = match s.daemon.read_derivation(&path).await? {
            None => {
                return Ok(result(
                    BuildStatus::MiscFailure,
                    format!("derivation '{path}' is not valid in kiln's store; copy it first (nix copy --derivation)"),
                ))
            }
            Some(Err(e)) => return Ok(result(BuildStatus::MiscFailure, e)),
            Some(Ok(drv)) => drv,
        };
        stack.push((path.clone(), true));
        for (input, names) in &drv.input_derivations {
            if derivations.contains_key(input) || done.contains_key(input) {
                continue;
            }
            let input_drv = match s.daemon.read_derivation(input).await? {
                Some(Ok(d)) => d,
                None => {
                    return Ok(result(
                        BuildStatus::MiscFailure,
                        format!(
                            "input derivation '{input}' of '{path}' is not valid in kiln's store"
                        ),
                    ))
                }
                Some(Err(e)) => return Ok(result(BuildStatus::MiscFailure, e)),
            };
            if !outputs_valid(s.daemon, &input_drv, &OutputsSpec::Names(names.clone())).await? {
                stack.push((input.clone(), false));
            } else {
                derivations.insert(input.clone(), input_drv);
            }
        }
        derivations.insert(path, drv);
    }
    let outputs_of = outputs_of(&derivations);
    let mut hashes: BTreeMap<StorePath, [u8; 32]> = BTreeMap::new();
    let mut last = result(BuildStatus::AlreadyValid, "");
    for drv_path in order {
        let Some(drv) = derivations.get(&drv_path) else {
            continue;
        };
        let r = if outputs_valid(s.daemon, drv, &OutputsSpec::All).await? {
            result(BuildStatus::AlreadyValid, "")
        } else if let Err(why) = check_output_paths(s.daemon, &drv_path, drv, &mut hashes).await? {
            result(
                BuildStatus::InputRejected,
                format!("derivation '{drv_path}' has incorrect output paths: {why}"),
            )
        } else {
            run(s, &drv_path, drv, &outputs_of).await?
        };
        let failed = !r.status.is_success();
        done.insert(drv_path.clone(), r.clone());
        last = r;
        if failed && &drv_path != root {
            return Ok(result(
                BuildStatus::DependencyFailed,
                format!(
                    "1 dependency of derivation '{root}' failed to build: {drv_path}: {}",
                    last.error
                ),
            ));
        }
    }
    if let Some(r) = done.get(root) {
        last = r.clone();
    }
    if last.status == BuildStatus::AlreadyValid || last.status == BuildStatus::Built {
        if let Some(drv) = derivations.get(root) {
            last.built_outputs = drv
                .outputs
                .iter()
                .filter_map(|(n, o)| Some((n.clone(), o.path.clone()?)))
                .collect();
        }
    }
    Ok(last)
}

/// Most derivations one check reads (nixpkgs' largest closures have tens
/// of thousands).
const MAX_DERIVATIONS: usize = 1 << 20;

/// Checks that `drv`'s output paths are the ones Nix computes for it (see
/// [`crate::nix::derivation`]'s `modulo`), reading its input derivations
/// from the store: a `.drv` a client added cannot name outputs it does not
/// own, so kiln never registers a build under another's path. `hashes`
/// memoises the inputs' hashes across the derivations of one request.
async fn check_output_paths(
    daemon: &Daemon,
    drv_path: &StorePath,
    drv: &Derivation,
    hashes: &mut BTreeMap<StorePath, [u8; 32]>,
) -> Result<Result<(), String>, OpError> {
    let name = |p: &StorePath| p.name().trim_end_matches(".drv").to_owned();
    // Post-order over the inputs whose hashes are not known yet.
    let mut stack: Vec<(StorePath, Option<Derivation>)> = drv
        .input_derivations
        .keys()
        .map(|p| (p.clone(), None))
        .collect();
    while let Some((path, read)) = stack.pop() {
        if hashes.contains_key(&path) {
            continue;
        }
        match read {
            Some(input) => match input.hash_modulo(&name(&path), false, hashes) {
                Ok(h) => {
                    hashes.insert(path, h);
                }
                Err(e) => return Ok(Err(format!("input '{path}': {e}"))),
            },
            None => {
                if stack.len() + hashes.len() > MAX_DERIVATIONS {
                    return Ok(Err(format!(
                        "its closure has more than {MAX_DERIVATIONS} derivations"
                    )));
                }
                let input = match daemon.read_derivation(&path).await? {
                    None => return Ok(Err(format!("input '{path}' is not in kiln's store"))),
                    Some(Err(e)) => return Ok(Err(e)),
                    Some(Ok(d)) => d,
                };
                let pending: Vec<StorePath> = input
                    .input_derivations
                    .keys()
                    .filter(|p| !hashes.contains_key(*p))
                    .cloned()
                    .collect();
                stack.push((path, Some(input)));
                stack.extend(pending.into_iter().map(|p| (p, None)));
            }
        }
    }
    Ok(drv
        .check_output_paths(&name(drv_path), hashes)
        .map_err(|e| e.to_string()))
}

fn outputs_of(
    derivations: &BTreeMap<StorePath, Derivation>,
) -> BTreeMap<StorePath, BTreeMap<String, StorePath>> {
    derivations
        .iter()
        .map(|(p, d)| {
            let outs = d
                .outputs
                .iter()
                .filter_map(|(n, o)| Some((n.clone(), o.path.clone()?)))
                .collect();
            (p.clone(), outs)
        })
        .collect()
}

/// `BuildDerivation`: `drv` as sent, its inputs already in the store.
pub async fn build_inline<R, W>(
    s: &mut Session<'_, R, W>,
    drv_path: &StorePath,
    drv: &Derivation,
) -> Result<BuildResult, OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    if outputs_valid(s.daemon, drv, &OutputsSpec::All).await? {
        let mut r = result(BuildStatus::AlreadyValid, "");
        r.built_outputs = drv
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path.clone()?)))
            .collect();
        return Ok(r);
    }
    run(s, drv_path, drv, &BTreeMap::new()).await
}

/// The features a derivation requires (`requiredSystemFeatures`).
fn required_features(drv: &Derivation) -> BTreeSet<String> {
    if let Some(json) = drv.environment.get("__json") {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
            if let Some(list) = value
                .get("requiredSystemFeatures")
                .and_then(|v| v.as_array())
            {
                return list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
            }
        }
        return BTreeSet::new();
    }
    drv.environment
        .get("requiredSystemFeatures")
        .map(|v| {
            String::from_utf8_lossy(v)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one derivation whose inputs are all valid.
async fn run<R, W>(
    s: &mut Session<'_, R, W>,
    drv_path: &StorePath,
    drv: &Derivation,
    outputs_of: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
) -> Result<BuildResult, OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let start = now();
    let daemon = s.daemon;
    if drv.system != daemon.config.system {
        return Ok(result(
            BuildStatus::MiscFailure,
            format!(
                "a '{}' system is required to build '{drv_path}', but kiln builds for '{}'",
                drv.system, daemon.config.system
            ),
        ));
    }
    let features = required_features(drv);
    let unsupported: Vec<&String> = features
        .iter()
        .filter(|f| f.as_str() != "kvm" && !daemon.config.system_features.contains(*f))
        .collect();
    if !unsupported.is_empty() {
        let list: Vec<&str> = unsupported.iter().map(|s| s.as_str()).collect();
        return Ok(result(
            BuildStatus::MiscFailure,
            format!(
                "'{drv_path}' requires system features {{{}}} that this kiln does not offer",
                list.join(", ")
            ),
        ));
    }
    // The input closure, from the path-info store.
    let mut roots: BTreeSet<StorePath> = drv.input_sources.clone();
    for (input, names) in &drv.input_derivations {
        for name in names {
            match outputs_of.get(input).and_then(|o| o.get(name)) {
                Some(p) => {
                    roots.insert(p.clone());
                }
                None => {
                    return Ok(result(
                        BuildStatus::MiscFailure,
                        format!(
                        "'{drv_path}' needs output '{name}' of '{input}', which has no such output"
                    ),
                    ))
                }
            }
        }
    }
    let mut inputs: BTreeMap<StorePath, Node> = BTreeMap::new();
    let mut pending: Vec<StorePath> = roots.into_iter().collect();
    while let Some(path) = pending.pop() {
        if inputs.contains_key(&path) {
            continue;
        }
        let Some(info) = daemon.info(&path).await? else {
            return Ok(result(
                BuildStatus::MiscFailure,
                format!("input '{path}' of '{drv_path}' is not valid in kiln's store"),
            ));
        };
        pending.extend(
            info.references
                .iter()
                .filter(|r| !inputs.contains_key(*r))
                .cloned(),
        );
        inputs.insert(path, info.node);
    }
    let mut options = RequestOptions::default();
    options.build_cores = match s.options.build_cores {
        0 => daemon.config.build_cores,
        n => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let mut request = match build_request(drv, &inputs, outputs_of, &options) {
        Ok(r) => r,
        Err(e) => {
            return Ok(result(
                BuildStatus::MiscFailure,
                format!(
                    "cannot build '{drv_path}' in kiln: {}",
                    super::error_chain(&e)
                ),
            ))
        }
    };
    if features.contains("kvm") {
        if let Some(c) = request.constraints.as_mut() {
            c.available_ro_paths.push("/dev/kvm".to_owned());
        }
    }
    let outcome = match submit(s, drv_path, drv, request.clone()).await? {
        Err(e) if drv.is_fixed_output() && e.precondition() == Some("network") => {
            s.out
                .message(&format!(
                    "kiln: the server offers no network; building '{drv_path}' offline"
                ))
                .await?;
            if let Some(c) = request.constraints.as_mut() {
                c.network_access = false;
            }
            submit(s, drv_path, drv, request.clone()).await?
        }
        other => other,
    };
    let completion = match outcome {
        Ok(c) => c,
        Err(e) => {
            let mut r = failure(drv_path, &e, s.options.log_lines);
            r.start_time = start;
            return Ok(r);
        }
    };
    let Some(response) = completion.completed.snix else {
        return Ok(result(
            BuildStatus::MiscFailure,
            "the kiln server answered without a snix response",
        ));
    };
    match record_outputs(daemon, drv_path, drv, &inputs, &request, response).await {
        Ok(built) => Ok(BuildResult {
            status: BuildStatus::Built,
            error: String::new(),
            start_time: start,
            stop_time: now(),
            built_outputs: built,
        }),
        Err((status, message)) => {
            let mut r = result(status, message);
            r.start_time = start;
            Ok(r)
        }
    }
}

/// Submits one request, the log to the client as it comes.
async fn submit<R, W>(
    s: &mut Session<'_, R, W>,
    drv_path: &StorePath,
    drv: &Derivation,
    request: crate::proto::snix_build::BuildRequest,
) -> Result<Result<crate::client::Completion, FollowError>, OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut submit = submit_request(drv, request);
    submit.limits = Some(s.options.limits());
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut sink = ChannelSink(tx);
    let channel = s.daemon.builds.clone();
    let activity = s.out.start_build(&drv_path.to_absolute_path()).await?;
    tracing::info!(drv = %drv_path, "nix build starts");
    let mut pending = Vec::new();
    let outcome = {
        let follow = submit_and_follow(channel, submit, &mut sink);
        tokio::pin!(follow);
        loop {
            tokio::select! {
                Some(chunk) = rx.recv() => {
                    for line in split_lines(&mut pending, &chunk) {
                        s.out.log_line(activity, &line).await?;
                    }
                    s.out.flush().await?;
                }
                outcome = &mut follow => break outcome,
            }
        }
    };
    while let Ok(chunk) = rx.try_recv() {
        for line in split_lines(&mut pending, &chunk) {
            s.out.log_line(activity, &line).await?;
        }
    }
    if !pending.is_empty() {
        s.out
            .log_line(activity, &String::from_utf8_lossy(&pending))
            .await?;
    }
    s.out.stop_activity(activity).await?;
    Ok(outcome)
}

/// The builder's log into a channel the session drains.
struct ChannelSink(mpsc::UnboundedSender<Vec<u8>>);

impl EventSink for ChannelSink {
    fn log(&mut self, _build_id: &str, chunk: &LogChunk) {
        // The receiver lives as long as the build is followed.
        let _ = self.0.send(chunk.data.to_vec());
    }
}

/// A failed kiln build as Nix's build result.
fn failure(drv_path: &StorePath, error: &FollowError, log_lines: u64) -> BuildResult {
    let failed = error.failed();
    let kind = failed.map(|f| f.kind.as_str()).unwrap_or("");
    let status = match kind {
        "builder_failed" => BuildStatus::PermanentFailure,
        "timeout" | "silent" => BuildStatus::TimedOut,
        "log_limit" => BuildStatus::LogLimitExceeded,
        "missing_output" | "invalid_output" => BuildStatus::OutputRejected,
        "precondition" | "invalid_request" | "missing_input" => BuildStatus::InputRejected,
        "queue_full" | "tenant_limit" | "vm_crashed" | "infrastructure" | "agent_failed" => {
            BuildStatus::TransientFailure
        }
        _ => BuildStatus::MiscFailure,
    };
    let mut message = match failed {
        Some(f) if kind == "builder_failed" => match (f.exit_code, f.signal) {
            (Some(code), _) => format!("builder for '{drv_path}' failed with exit code {code}"),
            (None, Some(signal)) => {
                format!("builder for '{drv_path}' failed due to signal {signal}")
            }
            _ => format!("builder for '{drv_path}' failed: {}", f.message),
        },
        Some(f) => format!(
            "building '{drv_path}' in kiln failed ({kind}): {}",
            f.message
        ),
        None => format!("building '{drv_path}' in kiln failed: {error}"),
    };
    if let Some(f) = failed {
        let lines = if log_lines == 0 {
            LOG_LINES
        } else {
            usize::try_from(log_lines).unwrap_or(LOG_LINES)
        };
        let tail = String::from_utf8_lossy(&f.log_tail);
        let tail: Vec<&str> = tail.lines().collect();
        let tail = &tail[tail.len().saturating_sub(lines)..];
        if !tail.is_empty() {
            let mut text = Vec::new();
            let _ = write!(text, ";\nlast {} log lines:", tail.len());
            for line in tail {
                let _ = write!(text, "\n> {line}");
            }
            message.push_str(&String::from_utf8_lossy(&text));
        }
    }
    result(status, message)
}

/// Records the outputs of a successful build: references from the refscan,
/// NAR hashes from the castore, a fixed output's declared hash checked.
async fn record_outputs(
    daemon: &Daemon,
    drv_path: &StorePath,
    drv: &Derivation,
    inputs: &BTreeMap<StorePath, Node>,
    request: &crate::proto::snix_build::BuildRequest,
    response: crate::proto::snix_build::BuildResponse,
) -> Result<BTreeMap<String, StorePath>, (BuildStatus, String)> {
    let misc = |m: String| (BuildStatus::MiscFailure, m);
    let paths = output_paths(drv).map_err(|e| misc(format!("'{drv_path}': {e}")))?;
    if response.outputs.len() != paths.len() {
        return Err(misc(format!(
            "kiln returned {} outputs for '{drv_path}', which has {}",
            response.outputs.len(),
            paths.len()
        )));
    }
    let by_hash: BTreeMap<String, &StorePath> = paths
        .iter()
        .chain(inputs.keys())
        .map(|p| (p.hash_part(), p))
        .collect();
    let names: BTreeMap<&StorePath, &String> = drv
        .outputs
        .iter()
        .filter_map(|(n, o)| Some((o.path.as_ref()?, n)))
        .collect();
    let mut infos = Vec::new();
    for (path, output) in paths.iter().zip(response.outputs) {
        let entry = output
            .output
            .ok_or_else(|| misc(format!("output '{path}' came back empty")))?;
        let node = entry
            .try_into_anonymous()
            .map_err(|e| misc(format!("output '{path}' is not a valid tree: {e}")))?;
        let mut references = BTreeSet::new();
        for index in output.needles {
            let needle = usize::try_from(index)
                .ok()
                .and_then(|i| request.refscan_needles.get(i))
                .and_then(|h| by_hash.get(h))
                .ok_or_else(|| {
                    misc(format!(
                        "output '{path}': reference index {index} out of range"
                    ))
                })?;
            references.insert((*needle).clone());
        }
        let output_decl = names
            .get(path)
            .and_then(|n| drv.outputs.get(*n))
            .ok_or_else(|| misc(format!("output '{path}' is not an output of '{drv_path}'")))?;
        let mut ca = None;
        if drv.is_fixed_output() {
            fixed_output::verify(&daemon.castore, output_decl, &node)
                .await
                .map_err(|e| (BuildStatus::OutputRejected, super::error_chain(&e)))?;
            let declared = FixedOutputHash::of(output_decl)
                .map_err(|e| (BuildStatus::OutputRejected, e.to_string()))?;
            ca = Some(ContentAddress::from_fixed_output(&declared).to_string());
        }
        let nar = nar_hash(&daemon.castore, &node)
            .await
            .map_err(|e| misc(format!("hashing output '{path}': {e}")))?;
        let crate::nix::hash::Hash::Sha256(nar_sha256) = nar.hash else {
            return Err(misc("NAR hash is not SHA-256".into()));
        };
        infos.push(PathInfo {
            store_path: path.clone(),
            node,
            references,
            nar_sha256,
            nar_size: nar.size,
            deriver: Some(drv_path.clone()),
            signatures: Vec::new(),
            ca,
        });
    }
    let mut built = BTreeMap::new();
    for info in infos {
        if let Some(name) = names.get(&info.store_path) {
            built.insert((*name).clone(), info.store_path.clone());
        }
        daemon.register(info).await.map_err(|e| {
            misc(format!(
                "recording the outputs of '{drv_path}': {}",
                super::error_chain(&e)
            ))
        })?;
    }
    tracing::info!(drv = %drv_path, outputs = built.len(), "nix build done");
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_defaults_fill_only_what_the_client_left_unset() {
        let defaults = BuildOptions {
            max_silent_secs: 5,
            timeout_secs: 600,
            max_log_bytes: 1 << 20,
            build_cores: 2,
            log_lines: 0,
        };
        let sent = BuildOptions {
            max_silent_secs: 30,
            log_lines: 25,
            ..BuildOptions::default()
        };
        let applied = sent.or_defaults(&defaults);
        assert_eq!(applied.max_silent_secs, 30, "the client's value stays");
        assert_eq!(applied.timeout_secs, 600);
        assert_eq!(applied.max_log_bytes, 1 << 20);
        assert_eq!(applied.build_cores, 2);
        assert_eq!(applied.log_lines, 25);
        let limits = applied.limits();
        assert_eq!(
            (
                limits.timeout_secs,
                limits.max_silent_secs,
                limits.max_log_bytes
            ),
            (600, 30, 1 << 20)
        );
    }
}
