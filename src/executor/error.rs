//! Why a build did not produce its outputs: the executor's one error type.
//!
//! Causes are kept as `#[source]` and not repeated in messages; the chain is
//! printed once, by [`BuildError::report`], at the wire edge and in the log
//! line of a failed build. The mapping to gRPC status codes is the wire
//! side's (`crate::grpc::status`), in one table.

use crate::executor::events::StopReason;

/// A request that broke a rule: the field and the rule, for INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct InvalidRequest {
    /// The offending field, e.g. `environment_vars[3].key`.
    pub field: String,
    /// What is wrong with it.
    pub rule: String,
}

pub(crate) fn invalid(field: impl Into<String>, rule: impl ToString) -> InvalidRequest {
    InvalidRequest {
        field: field.into(),
        rule: rule.to_string(),
    }
}

/// A constraint this server cannot meet. Clients match on
/// [`Precondition::kind`] (`kiln.v1.Failed.precondition`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Precondition {
    /// The request is for another system.
    #[error("constraints.system {requested:?} cannot be built here: this host builds {host}")]
    System {
        /// What the request asked for.
        requested: String,
        /// What this host builds.
        host: &'static str,
    },
    /// The VM the request needs is larger than the operator's maximum.
    #[error("constraints.min_memory: {min_memory} bytes needs a {needed_mib} MiB VM, over this server's maximum of {max_mib} MiB (--max-guest-memory-mib)")]
    Memory {
        /// The request's `min_memory`, bytes.
        min_memory: u64,
        /// The VM it needs, MiB.
        needed_mib: u64,
        /// The maximum, MiB.
        max_mib: u64,
    },
    /// `/dev/kvm` was asked for, and this host cannot give a guest nested
    /// virtualisation.
    #[error("constraints.available_ro_paths: /dev/kvm was asked for, but this host cannot give a guest nested virtualisation")]
    NestedVirt,
    /// A read-only path that is not on the operator's allow-list.
    #[error("constraints.available_ro_paths: {path} is not on this server's allow-list (see --allow-ro-path)")]
    RoPath {
        /// The path asked for.
        path: String,
    },
    /// The build asks for network access, which this server does not give.
    #[error("constraints.network_access: this server gives builds no network ({why})")]
    Network {
        /// Why not (the operator's `--no-network`, or what the host lacks).
        why: String,
    },
    /// The inputs expand to more than the operator allows on disk.
    #[error("{detail} (set by --max-input-entries, --max-input-mib)")]
    Inputs {
        /// Which input (or all of them) and by how much.
        detail: String,
    },
    /// The VM is larger than the whole guest memory budget: it could never
    /// be admitted.
    #[error("the VM needs {needed_mib} MiB, more than this server's total guest memory budget of {budget_mib} MiB (--memory-budget-mib)")]
    Budget {
        /// The VM's memory, MiB.
        needed_mib: u64,
        /// The budget, MiB.
        budget_mib: u64,
    },
}

impl Precondition {
    /// Machine-readable name, as in `kiln.v1.Failed.precondition`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::System { .. } => "system",
            Self::Memory { .. } => "memory",
            Self::NestedVirt => "nested_virt",
            Self::RoPath { .. } => "ro_path",
            Self::Network { .. } => "network",
            Self::Inputs { .. } => "inputs",
            Self::Budget { .. } => "budget",
        }
    }
}

/// A host-side cause, kept whole until the wire edge prints it.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A build failure with its context.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The request broke a rule.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    /// The host cannot give what the request needs.
    #[error(transparent)]
    Precondition(#[from] Precondition),
    /// An input blob or directory is not in the castore.
    #[error("inputs[{index}] ({name}): {what} {digest} is not in the castore")]
    MissingInput {
        /// The input's index in the request.
        index: usize,
        /// The input's name.
        name: String,
        /// `blob` or `directory`.
        what: &'static str,
        /// Hex digest.
        digest: String,
    },
    /// The queue of waiting builds is full.
    #[error("{0}")]
    QueueFull(String),
    /// The build's tenant is at one of its limits (`--tenant-limit`): it
    /// may not run or wait now, or never fits them.
    #[error("{0}")]
    TenantLimit(String),
    /// The builder exited with a non-zero status.
    #[error("builder exited with status {code}")]
    BuilderExited {
        /// Exit status.
        code: i32,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The builder was killed by a signal.
    #[error("builder was killed by signal {signal}")]
    BuilderSignaled {
        /// Signal number.
        signal: i32,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The builder succeeded but did not produce a declared output.
    #[error("builder did not produce output /{path}")]
    MissingOutput {
        /// The missing output.
        path: String,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// A declared output, or something inside it, is not what kiln can
    /// store: a parent that is a symlink or not a directory, a fifo, socket
    /// or device node, a name or link target castore cannot hold. The
    /// builder's fault.
    #[error("output {path} is invalid: {reason}")]
    InvalidOutput {
        /// The path as the guest saw it.
        path: String,
        /// What is wrong with it.
        reason: String,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The log grew past the server's limit; the build was stopped.
    #[error("build log exceeded the limit of {limit} bytes; the build was stopped")]
    LogLimit {
        /// The limit in bytes.
        limit: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The build's scratch space grew past its limit, or the disk past its
    /// reserve; the build was stopped.
    #[error("scratch space exhausted: the build used {used} bytes (limit {limit}), {free} bytes free on the data disk (reserve {reserve}); the build was stopped")]
    ScratchFull {
        /// Bytes the scratch tree occupied.
        used: u64,
        /// The per-build limit.
        limit: u64,
        /// Free bytes on the data filesystem.
        free: u64,
        /// The reserve kiln keeps free.
        reserve: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The build left more entries in its scratch tree than ingest may
    /// hold (the `--max-input-entries` bound, which inputs obey too).
    #[error("the build left {entries} entries in its scratch directories, over the limit of {limit} (--max-input-entries)")]
    ScratchEntries {
        /// Entries found.
        entries: u64,
        /// The limit.
        limit: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The guest agent failed before or while running the builder.
    #[error("guest agent failed at step {step}: {message}")]
    AgentFailed {
        /// The agent's step.
        step: String,
        /// The agent's message.
        message: String,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The VM ended without the agent's report.
    #[error("the VM died without reporting a result: {reason}")]
    VmCrashed {
        /// What was seen (VMM exit status, last kernel lines).
        reason: String,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// A host-side step failed.
    #[error("{step}")]
    Infrastructure {
        /// The step (`materialise inputs`, `boot the VM`, ...).
        step: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The build ran out of time.
    #[error("build timed out after {secs} s")]
    Timeout {
        /// The timeout that applied.
        secs: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The builder wrote nothing to stdout or stderr for longer than the
    /// client's silence limit (Nix's `max-silent-time`).
    #[error("builder produced no output for {secs} seconds; the build was stopped")]
    Silent {
        /// The silence limit that applied.
        secs: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The client went away or cancelled.
    #[error("build cancelled by the client")]
    Cancelled,
    /// The host stopped the build: an operator, or a shutdown whose grace
    /// ran out.
    #[error("{}", stopped_message(.0))]
    Stopped(StopReason),
    /// The server is shutting down and starts no more builds.
    #[error("kiln is shutting down and starts no new builds; send the build to another server or retry after it restarts")]
    ShuttingDown,
}

fn stopped_message(reason: &StopReason) -> String {
    match reason {
        StopReason::Operator => "build cancelled by an operator (kiln cancel)".to_owned(),
        StopReason::Shutdown { grace_secs } => format!(
            "build cancelled: kiln shut down and the build outlasted the shutdown grace of {grace_secs} s (--shutdown-grace)"
        ),
    }
}

impl BuildError {
    /// A host-side step failed because of `source`.
    pub fn infra(step: &'static str, source: impl Into<Cause>) -> Self {
        Self::Infrastructure {
            step,
            source: source.into(),
        }
    }

    /// The message with its whole cause chain, each cause once.
    pub fn report(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        message
    }

    /// Machine-readable kind, as in `kiln.v1.Failed.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request",
            Self::Precondition(_) => "precondition",
            Self::MissingInput { .. } => "missing_input",
            Self::QueueFull(_) => "queue_full",
            Self::TenantLimit(_) => "tenant_limit",
            Self::BuilderExited { .. } | Self::BuilderSignaled { .. } => "builder_failed",
            Self::MissingOutput { .. } => "missing_output",
            Self::InvalidOutput { .. } => "invalid_output",
            Self::LogLimit { .. } => "log_limit",
            Self::ScratchFull { .. } | Self::ScratchEntries { .. } => "scratch_full",
            Self::AgentFailed { .. } => "agent_failed",
            Self::VmCrashed { .. } => "vm_crashed",
            Self::Infrastructure { .. } => "infrastructure",
            Self::Timeout { .. } => "timeout",
            Self::Silent { .. } => "silent",
            Self::Cancelled => "cancelled",
            Self::Stopped(StopReason::Operator) => "cancelled_by_operator",
            Self::Stopped(StopReason::Shutdown { .. }) => "shutdown",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// The log tail this failure carries (empty if none).
    pub fn log_tail(&self) -> &[u8] {
        match self {
            Self::BuilderExited { log_tail, .. }
            | Self::BuilderSignaled { log_tail, .. }
            | Self::MissingOutput { log_tail, .. }
            | Self::InvalidOutput { log_tail, .. }
            | Self::LogLimit { log_tail, .. }
            | Self::ScratchFull { log_tail, .. }
            | Self::ScratchEntries { log_tail, .. }
            | Self::AgentFailed { log_tail, .. }
            | Self::VmCrashed { log_tail, .. }
            | Self::Timeout { log_tail, .. }
            | Self::Silent { log_tail, .. } => log_tail,
            _ => &[],
        }
    }

    /// The builder's exit status or signal, when it ended the build.
    pub fn builder_status(&self) -> (Option<i32>, Option<i32>) {
        match self {
            Self::BuilderExited { code, .. } => (Some(*code), None),
            Self::BuilderSignaled { signal, .. } => (None, Some(*signal)),
            _ => (None, None),
        }
    }

    /// The precondition, when that is why.
    pub fn precondition(&self) -> Option<&Precondition> {
        match self {
            Self::Precondition(p) => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = BuildError::infra("open the scratch share", io);
        assert_eq!(err.to_string(), "open the scratch share");
        assert_eq!(err.report(), "open the scratch share: no such file");
    }

    #[test]
    fn preconditions_name_their_kind() {
        let err = BuildError::from(Precondition::Network {
            why: "--no-network".into(),
        });
        assert_eq!(err.kind(), "precondition");
        assert_eq!(err.precondition().map(Precondition::kind), Some("network"));
        assert!(err.to_string().contains("network_access"), "{err}");
    }
}
