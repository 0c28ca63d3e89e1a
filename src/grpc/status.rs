//! Domain → wire for failures: the one deliberate mapping from build errors
//! to gRPC status codes (documented in README), and the `kiln.v1.Failed`
//! detail every status carries.
//!
//! | failure | code |
//! |---|---|
//! | invalid request | INVALID_ARGUMENT |
//! | unknown input blob or directory | FAILED_PRECONDITION |
//! | constraint this host cannot meet (system, memory, ro path, kvm, network, inputs, budget) | FAILED_PRECONDITION |
//! | builder exited non-zero or was killed by a signal | ABORTED |
//! | a declared output is missing | ABORTED |
//! | a declared output is invalid (reached through a symlink, a fifo/socket/device, unstorable name) | ABORTED |
//! | build log over the limit | ABORTED |
//! | scratch space over the limit, or the data disk below its reserve | ABORTED |
//! | the guest agent failed (mount, module, exec) | INTERNAL |
//! | the VM died without a report (crash, kernel panic, VMM or virtiofsd killed) | UNAVAILABLE |
//! | host-side infrastructure failed (spawning, store I/O) | UNAVAILABLE |
//! | the build ran out of time | DEADLINE_EXCEEDED |
//! | the client cancelled, or an operator (`kiln cancel`) | CANCELLED |
//! | the server is shutting down (no new builds; a build outlasting `--shutdown-grace`) | UNAVAILABLE |
//! | the queue or the request memory budget is full | RESOURCE_EXHAUSTED |
//!
//! Clients need not parse messages: the detail has the kind, the
//! precondition, the exit code or signal, and the log tail. The error's
//! cause chain is printed here, once.

use prost::Message;
use tonic::{Code, Status};

use crate::executor::error::BuildError;
use crate::executor::events::StopReason;
use crate::proto::kiln_v1;

/// The gRPC code a failure maps to.
pub fn code(e: &BuildError) -> Code {
    match e {
        BuildError::Invalid(_) => Code::InvalidArgument,
        BuildError::Precondition(_) | BuildError::MissingInput { .. } => Code::FailedPrecondition,
        BuildError::QueueFull(_) | BuildError::TenantLimit(_) => Code::ResourceExhausted,
        BuildError::BuilderExited { .. }
        | BuildError::BuilderSignaled { .. }
        | BuildError::MissingOutput { .. }
        | BuildError::InvalidOutput { .. }
        | BuildError::LogLimit { .. }
        | BuildError::ScratchFull { .. }
        | BuildError::ScratchEntries { .. } => Code::Aborted,
        BuildError::AgentFailed { .. } => Code::Internal,
        BuildError::VmCrashed { .. } | BuildError::Infrastructure { .. } => Code::Unavailable,
        BuildError::Timeout { .. } | BuildError::Silent { .. } => Code::DeadlineExceeded,
        BuildError::Cancelled | BuildError::Stopped(StopReason::Operator) => Code::Cancelled,
        BuildError::Stopped(StopReason::Shutdown { .. }) | BuildError::ShuttingDown => {
            Code::Unavailable
        }
    }
}

/// The `kiln.v1.Failed` event / status detail for a failure.
pub fn failed(e: &BuildError) -> kiln_v1::Failed {
    let (exit_code, signal) = e.builder_status();
    kiln_v1::Failed {
        code: code(e) as i32,
        message: e.report(),
        kind: e.kind().to_owned(),
        exit_code,
        signal,
        log_tail: e.log_tail().to_vec().into(),
        precondition: e
            .precondition()
            .map_or_else(String::new, |p| p.kind().to_owned()),
    }
}

/// The gRPC status: the message and its causes, the log tail appended, and
/// the `kiln.v1.Failed` detail.
pub fn status(e: &BuildError) -> Status {
    let mut message = e.report();
    let tail = e.log_tail();
    if !tail.is_empty() {
        message.push_str("\n--- last lines of the build log ---\n");
        message.push_str(&String::from_utf8_lossy(tail));
    }
    // gRPC carries messages in a header: keep it printable.
    let message: String = message
        .chars()
        .filter(|c| *c == '\n' || !c.is_control())
        .collect();
    Status::with_details(code(e), message, failed(e).encode_to_vec().into())
}

/// Decodes the `kiln.v1.Failed` detail from a status kiln returned; `None`
/// for a status without one (empty bytes would decode as an empty message).
pub fn failed_detail(status: &Status) -> Option<kiln_v1::Failed> {
    if status.details().is_empty() {
        return None;
    }
    kiln_v1::Failed::decode(status.details()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::error::Precondition;

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
                BuildError::InvalidOutput {
                    path: "/nix/store/x-out/fifo".into(),
                    reason: "is a fifo".into(),
                    log_tail: vec![],
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
                BuildError::infra("boot the VM", std::io::Error::other("x")),
                Code::Unavailable,
            ),
            (
                BuildError::Timeout {
                    secs: 1,
                    log_tail: vec![],
                },
                Code::DeadlineExceeded,
            ),
            (
                BuildError::Silent {
                    secs: 1,
                    log_tail: vec![],
                },
                Code::DeadlineExceeded,
            ),
            (BuildError::Cancelled, Code::Cancelled),
            (BuildError::Stopped(StopReason::Operator), Code::Cancelled),
            (
                BuildError::Stopped(StopReason::Shutdown { grace_secs: 5 }),
                Code::Unavailable,
            ),
            (BuildError::ShuttingDown, Code::Unavailable),
            (
                BuildError::QueueFull("full".into()),
                Code::ResourceExhausted,
            ),
            (
                Precondition::Network {
                    why: "--no-network".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
        ];
        for (err, code_wanted) in cases {
            assert_eq!(code(&err), code_wanted, "{err}");
        }
    }

    #[test]
    fn status_carries_exit_code_and_log_tail() {
        let err = BuildError::BuilderExited {
            code: 3,
            log_tail: b"oops\n".to_vec(),
        };
        let status = status(&err);
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.message().contains("status 3"));
        assert!(status.message().contains("oops"));
        let detail = failed_detail(&status).expect("detail decodes");
        assert_eq!(detail.exit_code, Some(3));
        assert_eq!(detail.kind, "builder_failed");
        assert_eq!(detail.precondition, "");
        assert_eq!(&detail.log_tail[..], b"oops\n");
    }

    #[test]
    fn the_chain_is_printed_once_and_preconditions_are_named() {
        let io = std::io::Error::other("socket gone");
        let status = status(&BuildError::infra("boot the VM", io));
        assert_eq!(status.message(), "boot the VM: socket gone");

        let status = status_of_precondition();
        let detail = failed_detail(&status).expect("detail decodes");
        assert_eq!(detail.kind, "precondition");
        assert_eq!(detail.precondition, "ro_path");
        assert!(status.message().contains("/opt/x"), "{}", status.message());
    }

    #[test]
    fn a_status_without_a_detail_has_none() {
        assert!(failed_detail(&Status::internal("plain")).is_none());
    }

    fn status_of_precondition() -> Status {
        status(&BuildError::from(Precondition::RoPath {
            path: "/opt/x".into(),
        }))
    }
}
