//! The operator's configuration of the executor, and its defaults.
//!
//! Every default of `kiln serve` is one named constant in [`defaults`]. The
//! `kiln serve` flags, [`ExecutorConfig`]'s `Default`, and the `Default`s of
//! the plan limits ([`plan::Limits`]) and of what a build's inputs may
//! expand to ([`castore::materialise::Limits`]) are all built from those
//! constants. To change a default, change it there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::castore;
use crate::executor::plan;
use crate::executor::scratch::ScratchLimits;
use crate::guest_image::Artifacts;
use crate::vmm::net::NetworkConfig;

/// The defaults of `kiln serve`. Each constant names the flag that
/// overrides it.
pub mod defaults {
    use std::time::Duration;

    /// Embedded castore and build directories (`--data-dir`).
    pub const DATA_DIR: &str = "/var/lib/kiln";
    /// Kiln's cache: kernel artifacts, agent, base initramfs images
    /// (`--cache-dir`; the layout is the one `make kernel` and `make agent`
    /// fill).
    pub const CACHE_DIR: &str = "/var/cache/kiln";

    /// Wall-clock limit of one build (`--timeout-secs`): an hour, since a
    /// client deadline can shorten it.
    pub const TIMEOUT: Duration = Duration::from_secs(3600);
    /// Builder output allowed per build before it is stopped
    /// (`--max-log-bytes`): 64 MiB.
    pub const MAX_LOG_BYTES: u64 = 64 << 20;
    /// Disk space one build's scratch directories may take
    /// (`--max-scratch-mib`): 20 GiB.
    pub const MAX_SCRATCH_BYTES: u64 = 20 << 30;
    /// Free space kept on the data disk: running builds are stopped and
    /// inputs are not copied below it (`--min-free-disk-mib`): 1 GiB.
    pub const MIN_FREE_DISK_BYTES: u64 = 1 << 30;

    /// Entries the inputs of one build may expand to on disk, every copy of
    /// a directory referenced twice counted (`--max-input-entries`).
    pub const MAX_INPUT_ENTRIES: u64 = 1_000_000;
    /// File bytes the inputs of one build may expand to (`--max-input-mib`):
    /// 64 GiB.
    pub const MAX_INPUT_BYTES: u64 = 64 << 30;
    /// Directory levels of the inputs (no flag): Linux cannot name a path
    /// deeper than 2048 components (PATH_MAX), and no tool can use one.
    pub const MAX_INPUT_DEPTH: u64 = 2048;

    /// Concurrent VMs (`--max-vms`).
    pub const MAX_VMS: usize = 2;
    /// Total guest RAM of all running VMs, MiB (`--memory-budget-mib`).
    pub const MEMORY_BUDGET_MIB: u64 = 8192;
    /// Builds allowed to wait for a VM (`--max-queue`).
    pub const MAX_QUEUE: usize = 64;
    /// VMs `kiln serve` keeps booted ahead of their builds (`--warm-vms`).
    /// One: the next small build starts without a boot, at the cost of one
    /// idle VM's host memory (measured in docs/bench.md), and with the
    /// default two VM slots the other stays free for cold boots.
    pub const WARM_VMS: usize = 1;
    /// Memory all requests held (queued or running) may take together
    /// (`--max-request-memory-mib`): the
    /// [`crate::executor::admission::RequestBudget`] default, 1 GiB.
    pub const REQUEST_BUDGET_BYTES: usize =
        crate::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES;
    /// Builds whose logs are kept for `Watch` after they end (no flag).
    pub const KEPT_BUILDS: usize = 256;
    /// How long running builds may go on after SIGTERM before they are
    /// cancelled (`--shutdown-grace`): long enough for a typical build to
    /// finish, well inside systemd's default stop timeout of 90 s.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
    /// Log bytes kept per build (no flag): 4 MiB.
    pub const KEPT_LOG_BYTES: usize = 4 << 20;

    /// Guest RAM when a request asks for little or nothing, MiB (no flag).
    pub const MIN_GUEST_MEMORY_MIB: u64 = 512;
    /// The guest's own needs (kernel, initramfs, agent, page cache) added
    /// to a request's `min_memory`, MiB (no flag).
    pub const GUEST_OVERHEAD_MIB: u64 = 256;
    /// Largest VM one build may get, MiB (`--max-guest-memory-mib`).
    pub const MAX_GUEST_MEMORY_MIB: u64 = 8192;
    /// vCPUs per VM (`--vcpus`).
    pub const VCPUS: u32 = 1;
}

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
    pub scratch: ScratchLimits,
    /// What the inputs of one build may expand to on disk (entries, bytes,
    /// depth), checked before a VM slot is taken.
    pub inputs: castore::materialise::Limits,
    /// Concurrent VMs.
    pub max_vms: usize,
    /// Total guest RAM of all running VMs, MiB.
    pub memory_budget_mib: u64,
    /// Builds allowed to wait for a VM.
    pub max_queue: usize,
    /// Each tenant's own VM, queue and memory limits and its weight
    /// ([`crate::executor::admission`]).
    pub tenants: crate::executor::admission::TenantPolicy,
    /// VMs kept booted ahead of their builds ([`crate::executor::pool`]);
    /// 0: none, every build boots its own.
    pub warm_vms: usize,
    /// Bytes all requests this server holds (queued or running) may take
    /// in memory together ([`crate::executor::admission::RequestBudget`]).
    pub request_budget_bytes: usize,
    /// Builds whose logs are kept.
    pub kept_builds: usize,
    /// Log bytes kept per build.
    pub kept_log_bytes: usize,
    /// How builds that ask for network get it; `None`: they are refused
    /// (and `limits.network_unavailable` says why).
    pub network: Option<NetworkConfig>,
}

/// Why an executor configured without [`ExecutorConfig::network`] refuses
/// networked builds.
pub const NO_NETWORK_CONFIGURED: &str = "no network is configured";

impl ExecutorConfig {
    /// The [`defaults`] with the data directory at `data_dir` and kiln's
    /// cache at `cache_dir`: base images in [`image_cache_dir`], the kernel
    /// and agent in their places below it ([`Artifacts::in_cache_dir`]).
    pub fn in_dirs(data_dir: PathBuf, cache_dir: &Path) -> Self {
        Self {
            data_dir,
            cache_dir: image_cache_dir(cache_dir),
            artifacts: Artifacts::in_cache_dir(cache_dir),
            limits: plan::Limits::default(),
            timeout: defaults::TIMEOUT,
            max_log_bytes: defaults::MAX_LOG_BYTES,
            scratch: ScratchLimits {
                max_bytes: defaults::MAX_SCRATCH_BYTES,
                min_free_bytes: defaults::MIN_FREE_DISK_BYTES,
            },
            inputs: castore::materialise::Limits::default(),
            max_vms: defaults::MAX_VMS,
            memory_budget_mib: defaults::MEMORY_BUDGET_MIB,
            max_queue: defaults::MAX_QUEUE,
            tenants: crate::executor::admission::TenantPolicy::default(),
            warm_vms: 0,
            request_budget_bytes: defaults::REQUEST_BUDGET_BYTES,
            kept_builds: defaults::KEPT_BUILDS,
            kept_log_bytes: defaults::KEPT_LOG_BYTES,
            network: None,
        }
    }
}

impl Default for ExecutorConfig {
    /// `kiln serve` without flags: every value from [`defaults`], data in
    /// [`defaults::DATA_DIR`] (`/var/lib/kiln`), base images in
    /// `/var/cache/kiln/initramfs` and the kernel and agent where `make`
    /// installs them under [`defaults::CACHE_DIR`] (the same paths as
    /// [`Artifacts::default`]). The plan limits say the host offers no
    /// nested virtualisation: whoever chose the VMM knows better and sets it.
    fn default() -> Self {
        Self::in_dirs(defaults::DATA_DIR.into(), Path::new(defaults::CACHE_DIR))
    }
}

impl Default for plan::Limits {
    /// [`defaults::MIN_GUEST_MEMORY_MIB`] (512) plus
    /// [`defaults::GUEST_OVERHEAD_MIB`] (256) up to
    /// [`defaults::MAX_GUEST_MEMORY_MIB`] (8192), [`defaults::VCPUS`] (1)
    /// vCPU, no nested virtualisation, no read-only paths allowed, no
    /// network (`kiln serve` sets one up unless `--no-network`).
    fn default() -> Self {
        Self {
            min_guest_memory_mib: defaults::MIN_GUEST_MEMORY_MIB,
            guest_overhead_mib: defaults::GUEST_OVERHEAD_MIB,
            max_guest_memory_mib: defaults::MAX_GUEST_MEMORY_MIB,
            vcpus: defaults::VCPUS,
            nested_virt_available: false,
            ro_path_allowlist: Vec::new(),
            network_unavailable: Some(NO_NETWORK_CONFIGURED.into()),
        }
    }
}

impl Default for castore::materialise::Limits {
    /// What `kiln serve` lets a build's inputs expand to:
    /// [`defaults::MAX_INPUT_ENTRIES`] (1 000 000),
    /// [`defaults::MAX_INPUT_BYTES`] (64 GiB), [`defaults::MAX_INPUT_DEPTH`]
    /// (2048 levels), [`defaults::MIN_FREE_DISK_BYTES`] (1 GiB) kept free.
    fn default() -> Self {
        Self {
            max_entries: defaults::MAX_INPUT_ENTRIES,
            max_bytes: defaults::MAX_INPUT_BYTES,
            max_depth: defaults::MAX_INPUT_DEPTH,
            min_free_bytes: defaults::MIN_FREE_DISK_BYTES,
        }
    }
}

/// Where base initramfs images are cached under kiln's cache directory
/// (`<cache_dir>/initramfs`), for the executor and `kiln doctor`.
pub fn image_cache_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("initramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_kiln_serve_without_flags() {
        let config = ExecutorConfig::default();
        assert_eq!(config.data_dir, Path::new("/var/lib/kiln"));
        assert_eq!(config.cache_dir, Path::new("/var/cache/kiln/initramfs"));
        // guest_image names the same places for the kernel and agent.
        assert_eq!(config.artifacts, Artifacts::default());
        // One disk reserve, for scratch and for copied inputs alike.
        assert_eq!(config.scratch.min_free_bytes, config.inputs.min_free_bytes);
        // scratch.rs has a Default of its own; it must not drift.
        let scratch = ScratchLimits::default();
        assert_eq!(config.scratch.max_bytes, scratch.max_bytes);
        assert_eq!(config.scratch.min_free_bytes, scratch.min_free_bytes);
    }

    #[test]
    fn the_default_plan_limits_fit_a_small_request() {
        let limits = plan::Limits::default();
        let memory = plan::guest_memory_mib(0, &limits).expect("fits");
        assert_eq!(memory, defaults::MIN_GUEST_MEMORY_MIB);
        assert!(memory <= defaults::MEMORY_BUDGET_MIB);
    }
}
