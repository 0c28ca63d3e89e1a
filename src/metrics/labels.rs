//! The label sets of kiln's metrics, each value from a closed set: what
//! the server knows of a build (its layout, how it ended, its failure kind,
//! cold or warm VM), never an id, a path or a message.
//!
//! Every set has a [`Tenant`] slot: the `tenant` label of a build of a
//! named tenant (the operator's token file and certificate rule bound how
//! many there are); a build of the tenant `default`, which is every build
//! of a server without authentication, has no tenant label at all.

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};

use crate::executor::error::BuildError;
use crate::executor::request::{BuildRequest, Layout};

/// Whose build it is: no label for the tenant `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tenant(pub Option<String>);

impl EncodeLabelSet for Tenant {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(name) => ("tenant", name.as_str()).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
}

/// What every metric of one build is labelled with, fixed at its start.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuildScope {
    /// Whose build.
    pub tenant: Tenant,
    /// The wire layout it came in: `tvix` or `snix`.
    pub layout: &'static str,
}

impl BuildScope {
    /// The scope of the build `req` that `tenant` asks for.
    pub fn of(req: &BuildRequest, tenant: &crate::tenant::Tenant) -> Self {
        let named = tenant.as_str() != crate::tenant::DEFAULT_TENANT;
        Self {
            tenant: Tenant(named.then(|| tenant.to_string())),
            layout: layout(req.layout),
        }
    }
}

/// A layout's label value.
pub fn layout(layout: Layout) -> &'static str {
    match layout {
        Layout::Tvix => "tvix",
        Layout::Snix => "snix",
    }
}

/// `kiln_builds_total`: how a build ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct BuildLabels {
    /// Whose build.
    #[prometheus(flatten)]
    pub tenant: Tenant,
    /// `tvix` or `snix`.
    pub layout: &'static str,
    /// See [`outcome`].
    pub outcome: &'static str,
    /// [`BuildError::kind`], or `none` for a build that succeeded.
    pub kind: &'static str,
}

/// `kiln_build_duration_seconds`: a build's whole time by how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DurationLabels {
    /// Whose build.
    #[prometheus(flatten)]
    pub tenant: Tenant,
    /// `tvix` or `snix`.
    pub layout: &'static str,
    /// See [`outcome`].
    pub outcome: &'static str,
}

/// The phase histograms but boot: the tenant only.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet,
)]
pub struct TenantLabels {
    /// Whose build (or nobody's: the server's gauges).
    #[prometheus(flatten)]
    pub tenant: Tenant,
}

/// `kiln_vm_boot_seconds`: which kind of VM booted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct BootLabels {
    /// Whose build.
    #[prometheus(flatten)]
    pub tenant: Tenant,
    /// `cold` (booted for the build) or `warm` (taken from the pool).
    pub vm: &'static str,
}

/// How a build ended, from its result: `succeeded`; `cancelled` (the
/// client went away or cancelled, an operator cancelled it, or a shutdown's
/// grace ran out); `refused` (it never got a VM: an invalid request, a
/// precondition the host cannot meet, a missing input, a full queue, a
/// server shutting down); `failed` (everything else: the builder's fault, a limit, the
/// VM's or the host's).
pub fn outcome(result: Result<(), &BuildError>) -> (&'static str, &'static str) {
    let Err(error) = result else {
        return ("succeeded", "none");
    };
    let kind = error.kind();
    let outcome = match error {
        BuildError::Cancelled | BuildError::Stopped(_) => "cancelled",
        BuildError::Invalid(_)
        | BuildError::Precondition(_)
        | BuildError::MissingInput { .. }
        | BuildError::QueueFull(_)
        | BuildError::TenantLimit(_)
        | BuildError::ShuttingDown => "refused",
        _ => "failed",
    };
    (outcome, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_come_from_a_closed_set() {
        assert_eq!(outcome(Ok(())), ("succeeded", "none"));
        assert_eq!(
            outcome(Err(&BuildError::Cancelled)),
            ("cancelled", "cancelled")
        );
        assert_eq!(
            outcome(Err(&BuildError::QueueFull("full".into()))),
            ("refused", "queue_full")
        );
        let exited = BuildError::BuilderExited {
            code: 1,
            log_tail: b"/nix/store/some-path".to_vec(),
        };
        assert_eq!(outcome(Err(&exited)), ("failed", "builder_failed"));
        let infra = BuildError::infra("boot the VM", std::io::Error::other("/some/path"));
        assert_eq!(outcome(Err(&infra)), ("failed", "infrastructure"));
    }
}
