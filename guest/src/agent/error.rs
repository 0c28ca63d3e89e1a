//! The agent's own failures. Each variant is a step of the agent's life; its
//! name (see [`AgentError::step`]) is what the host sees in
//! `Outcome::AgentFailed::step`, and the message carries the cause chain.
//!
//! The agent is one short sequence of steps, so one enum for all of them reads
//! better than one per file: every file reports in the vocabulary of the
//! report.

use std::io;

/// A step of the agent that failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Reading or validating the job file.
    #[error("{0}")]
    Job(String),
    /// Mounting /proc, /sys or /dev for the agent itself.
    #[error("mounting {what}")]
    EarlyMount {
        /// What was being mounted.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Loading a kernel module.
    #[error("loading module {name} ({path})")]
    Module {
        /// Module name.
        name: String,
        /// File it was loaded from.
        path: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Providing `/dev/kvm`.
    #[error("{what}")]
    Kvm {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Opening the host channel.
    #[error("{what}")]
    Channel {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Mounting a virtiofs share.
    #[error("mounting virtiofs share {tag} at {target}")]
    Share {
        /// virtiofs tag.
        tag: String,
        /// Mount point.
        target: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Configuring the network device of a networked build.
    #[error("{what}")]
    Network {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Building the sandbox root.
    #[error("{what}")]
    Sandbox {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Creating something at a path in the sandbox root that cannot be used
    /// as given (a symlink on the way, a file where a directory should be).
    #[error("{what}")]
    SandboxPath {
        /// What was being created.
        what: String,
        /// The component that failed, and why.
        #[source]
        source: super::beneath::PathError,
    },
    /// Starting the builder (fork, credentials, exec).
    #[error("{what}")]
    Exec {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Compiling or installing the builder's syscall filter.
    #[error("{what}")]
    Seccomp {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Watching the builder and forwarding its output.
    #[error("{what}")]
    Supervise {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl AgentError {
    /// The step name reported to the host.
    pub fn step(&self) -> &'static str {
        match self {
            Self::Job(_) => "job",
            Self::EarlyMount { .. } => "early-mount",
            Self::Module { .. } => "module",
            Self::Kvm { .. } => "kvm",
            Self::Channel { .. } => "channel",
            Self::Share { .. } => "share",
            Self::Network { .. } => "network",
            Self::Sandbox { .. } | Self::SandboxPath { .. } => "sandbox",
            Self::Exec { .. } => "exec",
            Self::Seccomp { .. } => "seccomp",
            Self::Supervise { .. } => "supervise",
        }
    }

    /// The message and its whole cause chain, `a: b: c`.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// Shorthand to attach a step and a description to a failed call.
pub trait Step<T> {
    /// Maps the error into `make(what, io_error)`.
    fn step(
        self,
        make: fn(String, io::Error) -> AgentError,
        what: impl FnOnce() -> String,
    ) -> Result<T, AgentError>;
}

impl<T, E: Into<io::Error>> Step<T> for Result<T, E> {
    fn step(
        self,
        make: fn(String, io::Error) -> AgentError,
        what: impl FnOnce() -> String,
    ) -> Result<T, AgentError> {
        self.map_err(|e| make(what(), e.into()))
    }
}

/// Constructors usable with [`Step::step`].
pub fn sandbox(what: String, source: io::Error) -> AgentError {
    AgentError::Sandbox { what, source }
}
/// See [`sandbox`].
pub fn exec(what: String, source: io::Error) -> AgentError {
    AgentError::Exec { what, source }
}
/// See [`sandbox`].
pub fn supervise(what: String, source: io::Error) -> AgentError {
    AgentError::Supervise { what, source }
}
/// See [`sandbox`].
pub fn kvm(what: String, source: io::Error) -> AgentError {
    AgentError::Kvm { what, source }
}
/// See [`sandbox`].
pub fn early_mount(what: String, source: io::Error) -> AgentError {
    AgentError::EarlyMount { what, source }
}
/// See [`sandbox`].
pub fn channel(what: String, source: io::Error) -> AgentError {
    AgentError::Channel { what, source }
}
