//! VMM backends: boot one short-lived microVM for one build.
//!
//! A build VM's whole life is a [`session::VmSession`]: it starts one
//! virtiofsd per share ([`virtiofsd`]), writes the initramfs, describes the
//! VM as a [`VmSpec`] and hands it to a [`VmRunner`] (the backend), which
//! starts the VMM process and returns a [`RunningVm`] that yields the guest
//! channel (the agent's byte stream, see `kiln_guest::contract`) and waits
//! for the VMM to exit. Backends see only socket paths, never share daemons.
//! [`host`] detects what this host offers and picks the backend;
//! [`transport`] owns the guest modules each backend's devices need.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub mod child;
pub mod choose;
pub mod cloud_hypervisor;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod net;
pub mod qemu;
pub mod session;
pub mod transport;
pub mod virtiofsd;

pub use transport::Transport;

/// One virtiofs share: a vhost-user-fs socket served by a virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    /// virtiofs tag the guest mounts by.
    pub tag: String,
    /// vhost-user socket the virtiofsd for this share listens on.
    pub socket: PathBuf,
    /// The host directory the virtiofsd serves (for messages, and for
    /// runners that stand in for a guest in tests).
    pub source: PathBuf,
}

/// Everything a backend needs to boot one build VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Build id, used in process names and log lines.
    pub id: String,
    /// PVH-bootable uncompressed kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Initramfs: the cached base image followed by the per-build job archive,
    /// concatenated into this one file.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Expose virtualisation extensions (VMX/SVM) to the guest.
    pub nested_virt: bool,
    /// virtiofs shares, in the order the guest expects them.
    pub shares: Vec<FsShare>,
    /// The guest's one network device, for a build that asked for network;
    /// `None`: the VM has no network device at all.
    pub net: Option<net::NetDevice>,
    /// Directory owned by this build for VMM sockets and logs; removed by the
    /// executor when the build ends.
    pub run_dir: PathBuf,
    /// File the guest's serial console (kernel messages) is written to.
    pub serial_log: PathBuf,
    /// When the build's time is up: a backend's own waits (boot, API
    /// calls, the guest channel) end by then, not by a fixed limit.
    pub deadline: std::time::Instant,
}

/// How the VMM process ended. Its `Display` is a phrase for error messages
/// (`exit code 3`, `the guest rebooted after a kernel panic (...)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The VMM exited by itself (the guest powered off, or the VMM failed),
    /// or was killed.
    Exited {
        /// Exit code, if it exited normally.
        code: Option<i32>,
        /// Signal that ended it, if any.
        signal: Option<i32>,
    },
    /// The guest reset itself (a reboot, or a kernel panic under `panic=-1`)
    /// and the backend killed the VMM so the job could not run a second time.
    GuestRebooted {
        /// The guest kernel's `Kernel panic - not syncing: ...` line from
        /// the serial console, if it printed one.
        panic: Option<String>,
    },
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited {
                code: Some(code), ..
            } => write!(f, "exit code {code}"),
            Self::Exited {
                signal: Some(signal),
                ..
            } => write!(f, "killed by signal {signal}"),
            Self::Exited { .. } => f.write_str("unknown status"),
            Self::GuestRebooted { panic: Some(line) } => write!(
                f,
                "the guest rebooted after a kernel panic ({line}), so the VMM was killed"
            ),
            Self::GuestRebooted { panic: None } => {
                f.write_str("the guest rebooted, so the VMM was killed")
            }
        }
    }
}

/// Errors of a VMM backend, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM process could not be started.
    #[error("spawning {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest channel was not connected by the build's deadline
    /// ([`VmSpec::deadline`]); how long was waited.
    #[error(
        "the VMM did not connect the guest channel by the build's deadline ({0:?} after start)"
    )]
    ChannelTimeout(Duration),
    /// The guest channel failed.
    #[error("guest channel")]
    Channel(#[source] std::io::Error),
    /// A VMM API call failed.
    #[error("VMM API request {call} failed: {detail}")]
    Api {
        /// The call.
        call: &'static str,
        /// What the VMM said.
        detail: String,
    },
    /// Waiting for the VMM process failed.
    #[error("waiting for the VMM")]
    Wait(#[source] std::io::Error),
    /// The spec asks for something this backend cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// The guest channel: the agent's byte stream and, where the VMM's channel
/// is two-way, the way back for the acknowledgement of the agent's report
/// (see `kiln_guest::contract::ACK`).
pub struct GuestChannel {
    /// Frames from the agent.
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Where to send [`kiln_guest::contract::ACK`], if the channel is two-way.
    pub ack: Option<Box<dyn AsyncWrite + Send + Unpin>>,
}

/// A VMM backend (QEMU microvm, cloud-hypervisor).
#[async_trait::async_trait]
pub trait VmRunner: Send + Sync {
    /// Short name for logs and `kiln doctor` (`qemu`, `cloud-hypervisor`).
    fn name(&self) -> &'static str;
    /// Acceleration in use (`kvm`, `tcg`).
    fn accel(&self) -> &'static str;
    /// Starts the VMM and boots `spec`. The VM runs until the guest powers
    /// off or [`RunningVm::kill`] is called.
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError>;
    /// How this backend's virtio devices reach the guest; the guest loads
    /// [`Transport::guest_modules`] of it. Every backend that boots a guest
    /// says which; the default only serves runners that never boot one.
    fn transport(&self) -> Transport {
        Transport::Mmio
    }
    /// Whether the guest channel is two-way, so a warm VM can be sent its
    /// job after boot ([`crate::executor::pool`]). cloud-hypervisor's
    /// console channel is one-way (its stdout), so it has no warm pool.
    fn two_way_channel(&self) -> bool {
        true
    }
    /// Whether the NAT helper must serve vhost-user (cloud-hypervisor)
    /// rather than QEMU's stream socket.
    fn vhost_user_net(&self) -> bool {
        false
    }
}

impl<'a> dyn VmRunner + 'a {
    /// The kernel modules the guest loads, in order:
    /// `self.transport().guest_modules()`.
    pub fn guest_modules(&self) -> &'static [&'static str] {
        self.transport().guest_modules()
    }
}

/// A VM that has been started. Dropping it kills the VMM process.
#[async_trait::async_trait]
pub trait RunningVm: Send {
    /// The guest channel; `None` after the first call.
    async fn take_channel(&mut self) -> Result<GuestChannel, VmmError>;
    /// Waits for the VMM process to exit.
    async fn wait(&mut self) -> Result<VmExit, VmmError>;
    /// Stops the VM now (graceful shutdown where the VMM has one, then SIGKILL)
    /// and reaps the process.
    async fn kill(&mut self);
    /// PID of the VMM process, for leak checks and diagnostics.
    fn pid(&self) -> Option<u32>;
}
