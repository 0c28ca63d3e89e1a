//! kiln's Prometheus metrics (`kiln serve --metrics-listen ADDR`).
//!
//! - [`Metrics`]: the registry and every metric in it, names and help in
//!   one place (the README's table lists the same).
//! - [`build`]: a build's events become its counter and phase histograms
//!   (the executor's [`crate::executor::events::BuildObserver`] seam).
//! - [`gauges`]: what the server holds now (VMs, queue, guest memory,
//!   castore), read when Prometheus scrapes.
//! - [`http`]: the listener serving `GET /metrics`.
//! - [`labels`]: the label sets, every value from a closed set.
//!
//! The text is the Prometheus exposition format 0.0.4, written by
//! `prometheus-client` (the official Rust client) from a registry this
//! server owns: no global state, so tests build their own.

pub mod build;
pub mod gauges;
pub mod http;
pub mod labels;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::executor::events::ObserverFactory;
use labels::{BootLabels, BuildLabels, BuildScope, DurationLabels, TenantLabels};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Bucket bounds of every duration histogram, seconds: from 5 ms (a warm
/// VM's job hand-over) to an hour (the default build timeout).
pub const BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// A family of duration histograms labelled `L`.
pub type Durations<L> = Family<L, Histogram, fn() -> Histogram>;
/// A family of gauges, labelled by tenant (no label today).
pub type Gauges = Family<TenantLabels, Gauge>;

fn durations<L: Clone + std::hash::Hash + Eq>() -> Durations<L> {
    Family::new_with_constructor(|| Histogram::new(BUCKETS))
}

/// Metrics could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Binding the listener failed.
    #[error("binding the metrics listener {0}")]
    Bind(String, #[source] std::io::Error),
    /// Writing the text failed (a metric that cannot be encoded).
    #[error("encoding the metrics")]
    Encode(#[source] std::fmt::Error),
}

/// Every metric kiln serves.
pub struct Metrics {
    registry: Registry,
    /// Builds by layout, outcome and failure kind.
    pub builds: Family<BuildLabels, Counter>,
    /// Whole builds, by layout and outcome.
    pub build_duration: Durations<DurationLabels>,
    /// Waiting for a VM slot (or a warm VM).
    pub queue_wait: Durations<TenantLabels>,
    /// Inputs into the build's share.
    pub materialise: Durations<TenantLabels>,
    /// VM boot, cold or warm.
    pub vm_boot: Durations<BootLabels>,
    /// The agent's sandbox set-up.
    pub agent_setup: Durations<TenantLabels>,
    /// The builder's run.
    pub builder_run: Durations<TenantLabels>,
    /// Outputs into the castore.
    pub ingest: Durations<TenantLabels>,
    /// Builds answered from their tenant's result cache.
    pub result_cache_hits: Family<TenantLabels, Counter>,
    /// VMs holding a slot.
    pub vms_running: Gauges,
    /// `--max-vms`.
    pub vms_max: Gauges,
    /// Warm pool VMs booted and waiting for a build.
    pub warm_vms_waiting: Gauges,
    /// Warm pool VMs booting.
    pub warm_vms_booting: Gauges,
    /// Builds waiting for a VM.
    pub builds_queued: Gauges,
    /// Guest memory of the running VMs, bytes.
    pub guest_memory_in_use: Gauges,
    /// `--memory-budget-mib`, bytes.
    pub guest_memory_budget: Gauges,
    /// Distinct blobs in the castore.
    pub castore_blobs: Gauges,
    /// Their bytes.
    pub castore_blob_bytes: Gauges,
    /// Directories in the castore.
    pub castore_directories: Gauges,
}

impl Metrics {
    /// Every metric, registered and empty.
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            builds: Family::default(),
            build_duration: durations(),
            queue_wait: durations(),
            materialise: durations(),
            vm_boot: durations(),
            agent_setup: durations(),
            builder_run: durations(),
            ingest: durations(),
            result_cache_hits: Family::default(),
            vms_running: Gauges::default(),
            vms_max: Gauges::default(),
            warm_vms_waiting: Gauges::default(),
            warm_vms_booting: Gauges::default(),
            builds_queued: Gauges::default(),
            guest_memory_in_use: Gauges::default(),
            guest_memory_budget: Gauges::default(),
            castore_blobs: Gauges::default(),
            castore_blob_bytes: Gauges::default(),
            castore_directories: Gauges::default(),
        };
        m.register();
        m
    }

    /// Names, units and help of every metric. The client adds `_total` to
    /// counters and the unit to the name.
    fn register(&mut self) {
        let r = &mut self.registry;
        let s = Unit::Seconds;
        let b = Unit::Bytes;
        r.register(
            "kiln_builds",
            "Builds ended, by request layout, outcome (succeeded, failed, cancelled, refused) and failure kind",
            self.builds.clone(),
        );
        r.register_with_unit(
            "kiln_build_duration",
            "Whole builds, request to release",
            s.clone(),
            self.build_duration.clone(),
        );
        r.register_with_unit(
            "kiln_build_queue_wait",
            "Time builds waited for a VM slot or a warm VM",
            s.clone(),
            self.queue_wait.clone(),
        );
        r.register_with_unit(
            "kiln_build_materialise",
            "Time materialising builds' inputs",
            s.clone(),
            self.materialise.clone(),
        );
        r.register_with_unit(
            "kiln_vm_boot",
            "Time from boot to the builder's start, less the agent's set-up; vm is cold or warm",
            s.clone(),
            self.vm_boot.clone(),
        );
        r.register_with_unit(
            "kiln_agent_setup",
            "The guest agent's sandbox set-up, as it measured it",
            s.clone(),
            self.agent_setup.clone(),
        );
        r.register_with_unit(
            "kiln_builder_run",
            "The builder's run, as the agent measured it (until stopped, when it was)",
            s.clone(),
            self.builder_run.clone(),
        );
        r.register_with_unit(
            "kiln_build_ingest",
            "Time scanning and storing builds' outputs",
            s,
            self.ingest.clone(),
        );
        r.register(
            "kiln_result_cache_hits",
            "Builds answered from their tenant's result cache, without a VM (also counted in kiln_builds)",
            self.result_cache_hits.clone(),
        );
        r.register(
            "kiln_vms_running",
            "VMs holding a VM slot: builds' and the warm pool's",
            self.vms_running.clone(),
        );
        r.register("kiln_vms_max", "VM slots (--max-vms)", self.vms_max.clone());
        r.register(
            "kiln_warm_vms_waiting",
            "Warm pool VMs booted and waiting for a build",
            self.warm_vms_waiting.clone(),
        );
        r.register(
            "kiln_warm_vms_booting",
            "Warm pool VMs booting",
            self.warm_vms_booting.clone(),
        );
        r.register(
            "kiln_builds_queued",
            "Builds waiting for a VM slot and guest memory",
            self.builds_queued.clone(),
        );
        r.register_with_unit(
            "kiln_guest_memory_in_use",
            "Guest memory of the VMs holding a slot",
            b.clone(),
            self.guest_memory_in_use.clone(),
        );
        r.register_with_unit(
            "kiln_guest_memory_budget",
            "Guest memory all VMs may take together (--memory-budget-mib)",
            b.clone(),
            self.guest_memory_budget.clone(),
        );
        r.register(
            "kiln_castore_blobs",
            "Distinct blobs in the embedded castore",
            self.castore_blobs.clone(),
        );
        r.register_with_unit(
            "kiln_castore_blob",
            "Bytes of the blobs in the embedded castore",
            b,
            self.castore_blob_bytes.clone(),
        );
        r.register(
            "kiln_castore_directories",
            "Directories in the embedded castore",
            self.castore_directories.clone(),
        );
    }

    /// Follows every build of an executor (`Executor::add_observer`).
    pub fn observer(self: &Arc<Self>) -> ObserverFactory {
        let metrics = self.clone();
        Arc::new(move |_id, req, tenant| {
            Box::new(build::BuildTimer::new(
                metrics.clone(),
                BuildScope::of(req, tenant),
                Instant::now(),
            ))
        })
    }

    /// The text of every metric as it stands.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry).map_err(MetricsError::Encode)?;
        Ok(text)
    }
}

/// Has `executor` followed by fresh [`Metrics`] and returns them: what
/// `kiln serve --metrics-listen` does before serving them with
/// [`http::serve`].
pub fn follow(executor: &mut crate::executor::Executor) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    executor.add_observer(metrics.observer());
    metrics
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
