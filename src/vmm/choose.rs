//! From the operator's `--vmm`/`--accel` to a ready [`VmRunner`]: detects the
//! host, applies the selection table ([`host::select`]) and builds the backend.

use std::sync::Arc;

use crate::vmm::cloud_hypervisor::CloudHypervisorRunner;
use crate::vmm::host::{self, AccelChoice, HostFacts, Selection, SelectError, Vmm, VmmChoice};
use crate::vmm::qemu::QemuRunner;
use crate::vmm::VmRunner;

/// The backend builds will use.
pub struct Chosen {
    /// The runner.
    pub runner: Arc<dyn VmRunner>,
    /// What was picked and why.
    pub selection: Selection,
    /// Whether builds can be given `/dev/kvm`.
    pub nested_available: bool,
    /// What detection found.
    pub facts: HostFacts,
}

/// Detects the host and builds the runner the flags ask for.
pub async fn choose(vmm: VmmChoice, accel: AccelChoice, kernel_is_pvm: bool) -> Result<Chosen, SelectError> {
    let facts = HostFacts::detect().await;
    let selection = host::select(vmm, accel, &facts, kernel_is_pvm)?;
    if let Some(w) = &selection.warning {
        tracing::warn!("{w}");
    }
    tracing::info!(vmm = %selection.vmm, reason = %selection.reason, "VMM selected");
    let runner: Arc<dyn VmRunner> = match selection.vmm {
        Vmm::Qemu => {
            let binary = facts.qemu.as_ref().map(|t| t.path.clone()).unwrap_or_else(|| "qemu-system-x86_64".into());
            let accel = match selection.accel {
                host::Accel::Kvm => crate::vmm::qemu::Accel::Kvm,
                host::Accel::Tcg => crate::vmm::qemu::Accel::Tcg,
            };
            Arc::new(QemuRunner { accel, binary })
        }
        Vmm::CloudHypervisor => {
            let binary = facts
                .cloud_hypervisor
                .as_ref()
                .map(|t| t.path.clone())
                .unwrap_or_else(|| "cloud-hypervisor".into());
            Arc::new(CloudHypervisorRunner::new(binary))
        }
    };
    let nested_available = selection.nested_available(&facts);
    Ok(Chosen { runner, selection, nested_available, facts })
}
