//! Planning: checks a validated request against what this host offers and
//! decides the VM (memory, vCPUs, nested virtualisation, extra read-only
//! shares) and the agent's job. Pure code, no I/O.

use std::path::PathBuf;

use kiln_guest::contract::Job;

use crate::executor::error::{BuildError, Precondition};
use crate::executor::request::BuildRequest;

/// The system this host builds for.
pub const HOST_SYSTEM: &str = "x86_64-linux";
/// The read-only path that asks for nested virtualisation.
pub const DEV_KVM: &str = "/dev/kvm";
const MIB: u64 = 1024 * 1024;

/// What the operator allows and the host can do; the inputs of planning.
/// Its `Default` (the `kiln serve` defaults) is in [`crate::executor::config`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Guest RAM when the request asks for little or nothing, MiB.
    pub min_guest_memory_mib: u64,
    /// The guest's own needs (kernel, initramfs, agent, page cache) added on
    /// top of `min_memory`, MiB.
    pub guest_overhead_mib: u64,
    /// Largest VM the operator allows, MiB.
    pub max_guest_memory_mib: u64,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Whether this host can give a guest working `/dev/kvm`.
    pub nested_virt_available: bool,
    /// Host paths a request may ask for read-only (besides `/dev/kvm`).
    pub ro_path_allowlist: Vec<PathBuf>,
    /// Why this server gives builds no network, when it does not
    /// (`--no-network`, no passt, no nft); `None`: it does.
    pub network_unavailable: Option<String>,
}

/// An extra read-only share: a host path visible at the same guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoShare {
    /// virtiofs tag.
    pub tag: String,
    /// The host path (also the guest path).
    pub path: PathBuf,
}

/// The VM a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// VMX/SVM and `/dev/kvm` for the build.
    pub nested_virt: bool,
    /// Operator allow-listed read-only paths.
    pub ro_shares: Vec<RoShare>,
    /// One network device behind the egress policy (the request asked).
    pub network: bool,
}

/// Checks the constraints and sizes the VM.
pub fn plan(req: &BuildRequest, limits: &Limits) -> Result<VmPlan, BuildError> {
    let c = &req.constraints;
    if !c.system.is_empty() && c.system != HOST_SYSTEM {
        return Err(Precondition::System {
            requested: c.system.clone(),
            host: HOST_SYSTEM,
        }
        .into());
    }
    if c.network_access {
        if let Some(why) = &limits.network_unavailable {
            return Err(Precondition::Network { why: why.clone() }.into());
        }
    }
    let memory_mib = guest_memory_mib(c.min_memory, limits)?;
    let mut nested_virt = false;
    let mut ro_shares = Vec::new();
    for p in &c.available_ro_paths {
        if p.as_str() == DEV_KVM {
            if !limits.nested_virt_available {
                return Err(Precondition::NestedVirt.into());
            }
            nested_virt = true;
        } else if limits
            .ro_path_allowlist
            .iter()
            .any(|a| a.as_os_str() == p.as_str())
        {
            ro_shares.push(RoShare {
                tag: format!("kiln-ro{}", ro_shares.len()),
                path: PathBuf::from(p.as_str()),
            });
        } else {
            return Err(Precondition::RoPath {
                path: p.to_string(),
            }
            .into());
        }
    }
    Ok(VmPlan {
        memory_mib,
        vcpus: limits.vcpus,
        nested_virt,
        ro_shares,
        network: c.network_access,
    })
}

/// The agent's job for `req` on `plan`, less the kernel modules (the
/// backend decides those). Built only when the VM boots, so a queued build
/// holds its request once.
pub fn job(req: &BuildRequest, plan: &VmPlan) -> Job {
    Job {
        command_args: req.command_args.clone(),
        argv0: req.argv0.clone(),
        env: req
            .environment_vars
            .iter()
            .map(|e| (e.key.as_bytes().to_vec(), e.value.clone()))
            .collect(),
        working_dir: req.working_dir.to_string(),
        scratch_paths: req.scratch_paths.iter().map(ToString::to_string).collect(),
        inputs_dir: req.inputs_dir.to_string(),
        additional_files: req
            .additional_files
            .iter()
            .map(|f| (f.path.to_string(), f.contents.clone()))
            .collect(),
        provide_bin_sh: req.constraints.provide_bin_sh,
        kvm: plan.nested_virt,
        ro_paths: plan
            .ro_shares
            .iter()
            .map(|s| (s.tag.clone(), s.path.display().to_string()))
            .collect(),
        modules: Vec::new(),
        cores: plan.vcpus,
        // Filled in with the server's network when the VM boots.
        network: None,
    }
}

/// Guest RAM: `min_memory` plus the guest's overhead, at least the minimum,
/// rounded up to 64 MiB; over the operator's maximum is refused.
pub fn guest_memory_mib(min_memory: u64, limits: &Limits) -> Result<u64, BuildError> {
    let wanted = min_memory
        .div_ceil(MIB)
        .saturating_add(limits.guest_overhead_mib);
    let mib = wanted
        .max(limits.min_guest_memory_mib)
        .div_ceil(64)
        .saturating_mul(64);
    if mib > limits.max_guest_memory_mib {
        return Err(Precondition::Memory {
            min_memory,
            needed_mib: mib,
            max_mib: limits.max_guest_memory_mib,
        }
        .into());
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_guest_memory_mib: 4096,
            nested_virt_available: true,
            ro_path_allowlist: vec![PathBuf::from("/opt/tools")],
            ..Limits::default()
        }
    }

    #[test]
    fn memory_covers_min_memory_plus_overhead_rounded_up() {
        let l = limits();
        assert_eq!(guest_memory_mib(0, &l).expect("fits"), 512);
        assert_eq!(guest_memory_mib(1000 * MIB, &l).expect("fits"), 1280);
        assert_eq!(guest_memory_mib(1000 * MIB + 1, &l).expect("fits"), 1280);
        assert_eq!(guest_memory_mib(1025 * MIB, &l).expect("fits"), 1344);
        assert!(guest_memory_mib(u64::MAX, &l).is_err());
        assert!(guest_memory_mib(4000 * MIB, &l).is_err());
    }
}
