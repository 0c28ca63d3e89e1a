//! Per-tenant limits: server defaults (`--tenant-max-vms`,
//! `--tenant-max-queue`, `--tenant-memory-mib`) and per-tenant overrides
//! (`--tenant-limit NAME:max-vms=N,max-queue=N,memory-mib=N,weight=N`).

use std::collections::BTreeMap;

use crate::tenant::Tenant;

/// Highest weight a tenant may be given (a weight is a share of the VMs
/// that free up while builds wait; 1 is the default).
pub const MAX_WEIGHT: u32 = 1000;

/// One tenant's limits; `None` leaves a field to the server's default (and
/// a default of `None` to the server's own limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// VMs the tenant's builds may run at once.
    pub max_vms: Option<usize>,
    /// Builds of the tenant that may wait for a VM.
    pub max_queue: Option<usize>,
    /// Guest memory the tenant's running VMs may hold together, MiB.
    pub memory_mib: Option<u64>,
    /// The tenant's share of freed VMs while builds wait (1 to
    /// [`MAX_WEIGHT`], default 1).
    pub weight: Option<u32>,
}

impl TenantLimits {
    /// These limits, each unset field taken from `defaults`.
    pub fn or(self, defaults: TenantLimits) -> TenantLimits {
        TenantLimits {
            max_vms: self.max_vms.or(defaults.max_vms),
            max_queue: self.max_queue.or(defaults.max_queue),
            memory_mib: self.memory_mib.or(defaults.memory_mib),
            weight: self.weight.or(defaults.weight),
        }
    }

    /// The weight in effect.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1).clamp(1, MAX_WEIGHT)
    }
}

/// The server's tenant limits: defaults for every tenant, and overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantPolicy {
    /// What every tenant gets unless overridden.
    pub defaults: TenantLimits,
    /// Per tenant, over the defaults.
    pub overrides: BTreeMap<Tenant, TenantLimits>,
}

impl TenantPolicy {
    /// `tenant`'s limits in effect.
    pub fn limits_of(&self, tenant: &Tenant) -> TenantLimits {
        match self.overrides.get(tenant) {
            Some(own) => own.or(self.defaults),
            None => self.defaults,
        }
    }

    /// The policy with `overrides` added, a later one for the same tenant
    /// replacing its fields.
    pub fn with_overrides(mut self, overrides: &[TenantOverride]) -> Self {
        for o in overrides {
            let entry = self.overrides.entry(o.tenant.clone()).or_default();
            *entry = o.limits.or(*entry);
        }
        self
    }
}

/// One `--tenant-limit` value: `NAME:key=value,...` with the keys
/// `max-vms`, `max-queue`, `memory-mib` and `weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantOverride {
    /// Whose.
    pub tenant: Tenant,
    /// What it sets.
    pub limits: TenantLimits,
}

impl std::str::FromStr for TenantOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, fields) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: want TENANT:max-vms=N,max-queue=N,memory-mib=N,weight=N")
        })?;
        let tenant = Tenant::parse(name).map_err(|e| e.to_string())?;
        let mut limits = TenantLimits::default();
        for field in fields.split(',').filter(|f| !f.is_empty()) {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("{field:?} in {s:?}: want KEY=NUMBER"))?;
            let number = |what: &str| -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{what} in {s:?}: {value:?} is not a whole number"))
            };
            match key {
                "max-vms" => limits.max_vms = Some(number(key)? as usize),
                "max-queue" => limits.max_queue = Some(number(key)? as usize),
                "memory-mib" => limits.memory_mib = Some(number(key)?),
                "weight" => {
                    let weight = number(key)?;
                    if !(1..=u64::from(MAX_WEIGHT)).contains(&weight) {
                        return Err(format!(
                            "weight in {s:?}: {weight} is not between 1 and {MAX_WEIGHT}"
                        ));
                    }
                    limits.weight = Some(weight as u32);
                }
                other => {
                    return Err(format!(
                        "{other:?} in {s:?} is not a tenant limit: max-vms, max-queue, memory-mib or weight"
                    ))
                }
            }
        }
        if limits == TenantLimits::default() {
            return Err(format!("{s:?} sets no limit"));
        }
        Ok(Self { tenant, limits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> Tenant {
        Tenant::parse(name).expect("tenant")
    }

    #[test]
    fn overrides_parse_and_fall_back_to_the_defaults() {
        let o: TenantOverride = "team-a:max-vms=2,weight=3".parse().expect("parses");
        assert_eq!(o.tenant, tenant("team-a"));
        assert_eq!(o.limits.max_vms, Some(2));
        assert_eq!(o.limits.weight(), 3);
        let later: TenantOverride = "team-a:memory-mib=4096".parse().expect("parses");
        let policy = TenantPolicy {
            defaults: TenantLimits {
                max_vms: Some(4),
                max_queue: Some(10),
                ..TenantLimits::default()
            },
            overrides: BTreeMap::new(),
        }
        .with_overrides(&[o, later]);
        let a = policy.limits_of(&tenant("team-a"));
        assert_eq!(
            (a.max_vms, a.max_queue, a.memory_mib, a.weight()),
            (Some(2), Some(10), Some(4096), 3)
        );
        let b = policy.limits_of(&tenant("team-b"));
        assert_eq!((b.max_vms, b.memory_mib, b.weight()), (Some(4), None, 1));
    }

    #[test]
    fn bad_overrides_are_named() {
        for (text, says) in [
            ("team-a", "want TENANT:"),
            ("bad name:max-vms=1", "not a tenant name"),
            ("a:max-vms", "want KEY=NUMBER"),
            ("a:max-vms=two", "not a whole number"),
            ("a:cpus=2", "not a tenant limit"),
            ("a:weight=0", "between 1 and 1000"),
            ("a:", "sets no limit"),
        ] {
            let err = text.parse::<TenantOverride>().expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
