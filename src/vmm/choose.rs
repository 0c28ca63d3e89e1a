//! From the operator's `--vmm`/`--accel` to a ready [`VmRunner`]: detects the
//! host, applies the selection table ([`host::select()`]) and builds the
//! backend ([`host::runner()`]).

use std::sync::Arc;

use crate::vmm::host::{self, AccelChoice, HostFacts, SelectError, Selection, VmmChoice};
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
pub async fn choose(
    vmm: VmmChoice,
    accel: AccelChoice,
    kernel_is_pvm: bool,
) -> Result<Chosen, SelectError> {
    let facts = HostFacts::detect().await;
    let selection = host::select(vmm, accel, &facts, kernel_is_pvm)?;
    if let Some(w) = &selection.warning {
        tracing::warn!("{w}");
    }
    tracing::info!(vmm = %selection.vmm, reason = %selection.reason, "VMM selected");
    let runner = Arc::from(host::runner(&selection, &facts));
    let nested_available = selection.nested_available(&facts);
    Ok(Chosen {
        runner,
        selection,
        nested_available,
        facts,
    })
}
