//! What the server holds right now, read when Prometheus scrapes: VM slots
//! and guest memory from admission, the warm pool's VMs, the queue, and
//! the castore's counts.
//!
//! Every read is cheap: counters the executor keeps, the embedded blob
//! store's counts (kept as blobs are stored, after one walk of the store
//! the first time they are asked for: see `castore::blob::counts`), and
//! the directory database's entry count (which redb keeps in its tree's
//! header). A gauge whose source cannot say (a remote castore, the blob
//! walk still running, the executor gone) is left out of the scrape rather
//! than reported as zero.

use std::sync::Weak;

use crate::castore::Store;
use crate::executor::Executor;
use crate::metrics::labels::TenantLabels;
use crate::metrics::{Gauges, Metrics};

/// Where the gauges are read from.
#[derive(Clone)]
pub struct Sources {
    /// The executor, weakly: metrics never keep it (or its pool) alive.
    pub executor: Weak<Executor>,
    /// The castore.
    pub store: Store,
    /// What the host says about itself, answered at `/healthz`.
    pub health: Option<crate::server::health::HostHealth>,
}

/// Sets `gauge` (no tenant) to `value`, or leaves it out when unknown.
fn set(gauge: &Gauges, value: Option<u64>) {
    let labels = TenantLabels::default();
    match value {
        Some(v) => {
            gauge
                .get_or_create(&labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        None => {
            gauge.remove(&labels);
        }
    }
}

/// Reads every gauge's source into `metrics`.
pub async fn refresh(metrics: &Metrics, sources: &Sources) {
    refresh_executor(metrics, sources.executor.upgrade().as_deref());
    let blobs = sources.store.blobs.stats();
    set(&metrics.castore_blobs, blobs.map(|s| s.blobs));
    set(&metrics.castore_blob_bytes, blobs.map(|s| s.bytes));
    let directories = match sources.store.directories.count().await {
        Ok(count) => count,
        Err(e) => {
            tracing::warn!(error = %e, "counting the castore's directories");
            None
        }
    };
    set(&metrics.castore_directories, directories);
}

fn refresh_executor(metrics: &Metrics, executor: Option<&Executor>) {
    let admission = executor.map(Executor::admission);
    let vms = admission.map(|a| a.vms());
    let memory = admission.map(|a| a.memory_mib());
    // Each named tenant's share beside the server's total (a series with a
    // tenant label); tenants that neither run nor wait drop out.
    for family in [
        &metrics.vms_running,
        &metrics.builds_queued,
        &metrics.guest_memory_in_use,
    ] {
        family.clear();
    }
    for usage in admission.map(|a| a.tenants()).unwrap_or_default() {
        if usage.tenant.as_str() == crate::tenant::DEFAULT_TENANT {
            continue;
        }
        let labels = TenantLabels {
            tenant: crate::metrics::labels::Tenant(Some(usage.tenant.to_string())),
        };
        let gauge = |family: &Gauges, value: u64| {
            family
                .get_or_create(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&metrics.vms_running, usage.vms as u64);
        gauge(&metrics.builds_queued, usage.queued as u64);
        gauge(&metrics.guest_memory_in_use, usage.memory_mib << 20);
    }
    set(&metrics.vms_running, vms.map(|(held, _)| held as u64));
    set(&metrics.vms_max, vms.map(|(_, max)| max as u64));
    set(&metrics.builds_queued, admission.map(|a| a.queued() as u64));
    set(
        &metrics.guest_memory_in_use,
        memory.map(|(held, _)| held << 20),
    );
    set(
        &metrics.guest_memory_budget,
        memory.map(|(_, budget)| budget << 20),
    );
    // Without a pool there are no pool VMs: zero, not unknown.
    let pool = executor.map(|e| e.pool().map_or((0, 0), |p| p.counts()));
    set(&metrics.warm_vms_waiting, pool.map(|(w, _)| w as u64));
    set(&metrics.warm_vms_booting, pool.map(|(_, b)| b as u64));
}
