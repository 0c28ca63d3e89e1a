//! The operator's configuration of the executor.

use std::path::PathBuf;
use std::time::Duration;

use crate::castore;
use crate::executor::plan;
use crate::guest_image::Artifacts;

/// Operator configuration of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Build directories go to `<data_dir>/runs`.
    pub data_dir: PathBuf,
    /// Where base initramfs images are cached (`base-<hash>.cpio`).
    pub cache_dir: PathBuf,
    /// Kernel, modules, agent, shell.
    pub artifacts: Artifacts,
    /// VM sizing and what the host offers.
    pub limits: plan::Limits,
    /// Default wall-clock limit of one build (a client deadline can shorten it).
    pub timeout: Duration,
    /// Builder output allowed per build before it is stopped.
    pub max_log_bytes: u64,
    /// Scratch space per build and the disk reserve.
    pub scratch: crate::executor::scratch::ScratchLimits,
    /// What the inputs of one build may expand to on disk (entries, bytes,
    /// depth), checked before a VM slot is taken.
    pub inputs: castore::materialise::Limits,
    /// Concurrent VMs.
    pub max_vms: usize,
    /// Total guest RAM of all running VMs, MiB.
    pub memory_budget_mib: u64,
    /// Builds allowed to wait for a VM.
    pub max_queue: usize,
    /// Bytes all requests this server holds (queued or running) may take
    /// in memory together ([`crate::executor::admission::RequestBudget`]).
    pub request_budget_bytes: usize,
    /// Builds whose logs are kept.
    pub kept_builds: usize,
    /// Log bytes kept per build.
    pub kept_log_bytes: usize,
}
