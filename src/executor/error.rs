//! Why a build did not produce its outputs, and the one deliberate mapping
//! from those reasons to gRPC status codes (documented in README).
//!
//! | failure | code |
//! |---|---|
//! | invalid request | INVALID_ARGUMENT |
//! | unknown input blob or directory | FAILED_PRECONDITION |
//! | constraint this host cannot meet (system, memory, ro path, kvm, network) | FAILED_PRECONDITION |
//! | builder exited non-zero or was killed by a signal | ABORTED |
//! | a declared output is missing | ABORTED |
//! | a declared output is invalid (reached through a symlink, a fifo/socket/device, unstorable name) | ABORTED |
//! | build log over the limit | ABORTED |
//! | scratch space over the limit, or the data disk below its reserve | ABORTED |
//! | the guest agent failed (mount, module, exec) | INTERNAL |
//! | the VM died without a report (crash, kernel panic, VMM or virtiofsd killed) | UNAVAILABLE |
//! | host-side infrastructure failed (spawning, store I/O) | UNAVAILABLE |
//! | the build ran out of time | DEADLINE_EXCEEDED |
//! | the client cancelled | CANCELLED |
//! | the queue is full | RESOURCE_EXHAUSTED |
//!
//! Every status carries a `kiln.v1.Failed` message in its details (kind,
//! exit code or signal, log tail), so clients need not parse messages.

use prost::Message;
use tonic::{Code, Status};

use crate::proto::kiln_v1;

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

/// A build failure with its context.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The request broke a rule.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    /// The host cannot give what the request needs.
    #[error("{0}")]
    Precondition(String),
    /// An input blob or directory is not in the castore.
    #[error("input {what} {digest} is not in the castore")]
    MissingInput {
        /// `blob` or `directory`.
        what: &'static str,
        /// Hex digest.
        digest: String,
    },
    /// The queue of waiting builds is full.
    #[error("{0}")]
    QueueFull(String),
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
    #[error("{step}: {message}")]
    Infrastructure {
        /// The step (`materialise inputs`, `start virtiofsd`, ...).
        step: &'static str,
        /// The error chain, printed once.
        message: String,
    },
    /// The build ran out of time.
    #[error("build timed out after {secs} s")]
    Timeout {
        /// The timeout that applied.
        secs: u64,
        /// Last lines of the log.
        log_tail: Vec<u8>,
    },
    /// The client went away or cancelled.
    #[error("build cancelled by the client")]
    Cancelled,
}

impl BuildError {
    /// Wraps a host-side error, printing its whole source chain once.
    pub fn infra(step: &'static str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::Infrastructure { step, message }
    }

    /// The gRPC code this failure maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::Precondition(_) | Self::MissingInput { .. } => Code::FailedPrecondition,
            Self::QueueFull(_) => Code::ResourceExhausted,
            Self::BuilderExited { .. }
            | Self::BuilderSignaled { .. }
            | Self::MissingOutput { .. }
            | Self::InvalidOutput { .. }
            | Self::LogLimit { .. }
            | Self::ScratchFull { .. }
            | Self::ScratchEntries { .. } => Code::Aborted,
            Self::AgentFailed { .. } => Code::Internal,
            Self::VmCrashed { .. } | Self::Infrastructure { .. } => Code::Unavailable,
            Self::Timeout { .. } => Code::DeadlineExceeded,
            Self::Cancelled => Code::Cancelled,
        }
    }

    /// Machine-readable kind, as in `kiln.v1.Failed.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request",
            Self::Precondition(_) => "precondition",
            Self::MissingInput { .. } => "missing_input",
            Self::QueueFull(_) => "queue_full",
            Self::BuilderExited { .. } | Self::BuilderSignaled { .. } => "builder_failed",
            Self::MissingOutput { .. } => "missing_output",
            Self::InvalidOutput { .. } => "invalid_output",
            Self::LogLimit { .. } => "log_limit",
            Self::ScratchFull { .. } | Self::ScratchEntries { .. } => "scratch_full",
            Self::AgentFailed { .. } => "agent_failed",
            Self::VmCrashed { .. } => "vm_crashed",
            Self::Infrastructure { .. } => "infrastructure",
            Self::Timeout { .. } => "timeout",
            Self::Cancelled => "cancelled",
        }
    }

    fn log_tail(&self) -> &[u8] {
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
            | Self::Timeout { log_tail, .. } => log_tail,
            _ => &[],
        }
    }

    /// The `kiln.v1.Failed` event / status detail for this failure.
    pub fn to_failed(&self) -> kiln_v1::Failed {
        let (exit_code, signal) = match self {
            Self::BuilderExited { code, .. } => (Some(*code), None),
            Self::BuilderSignaled { signal, .. } => (None, Some(*signal)),
            _ => (None, None),
        };
        kiln_v1::Failed {
            code: self.code() as i32,
            message: self.to_string(),
            kind: self.kind().to_owned(),
            exit_code,
            signal,
            log_tail: self.log_tail().to_vec().into(),
            precondition: String::new(),
        }
    }

    /// The gRPC status: the message with the log tail appended, and the
    /// `kiln.v1.Failed` detail.
    pub fn to_status(&self) -> Status {
        let mut message = self.to_string();
        let tail = self.log_tail();
        if !tail.is_empty() {
            message.push_str("\n--- last lines of the build log ---\n");
            message.push_str(&String::from_utf8_lossy(tail));
        }
        // gRPC carries messages in a header: keep it printable.
        let message: String = message
            .chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect();
        Status::with_details(
            self.code(),
            message,
            self.to_failed().encode_to_vec().into(),
        )
    }
}

/// Decodes the `kiln.v1.Failed` detail from a status kiln returned.
pub fn failed_detail(status: &Status) -> Option<kiln_v1::Failed> {
    kiln_v1::Failed::decode(status.details()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_class_has_its_own_code() {
        let tail = b"line 1\nline 2\n".to_vec();
        let cases = [
            (
                BuildError::BuilderExited {
                    code: 3,
                    log_tail: tail.clone(),
                },
                Code::Aborted,
            ),
            (
                BuildError::AgentFailed {
                    step: "mount".into(),
                    message: "x".into(),
                    log_tail: vec![],
                },
                Code::Internal,
            ),
            (
                BuildError::VmCrashed {
                    reason: "x".into(),
                    log_tail: vec![],
                },
                Code::Unavailable,
            ),
            (
                BuildError::Timeout {
                    secs: 1,
                    log_tail: vec![],
                },
                Code::DeadlineExceeded,
            ),
            (BuildError::Cancelled, Code::Cancelled),
            (
                BuildError::QueueFull("full".into()),
                Code::ResourceExhausted,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn status_carries_exit_code_and_log_tail() {
        let err = BuildError::BuilderExited {
            code: 3,
            log_tail: b"oops\n".to_vec(),
        };
        let status = err.to_status();
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.message().contains("status 3"));
        assert!(status.message().contains("oops"));
        let detail = failed_detail(&status).expect("detail decodes");
        assert_eq!(detail.exit_code, Some(3));
        assert_eq!(detail.kind, "builder_failed");
        assert_eq!(&detail.log_tail[..], b"oops\n");
    }
}
