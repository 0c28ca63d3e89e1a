//! Turning `kiln serve`'s network flags into a working setup, or into the
//! reason networked builds are refused. The table is installed before any
//! helper can run, and a host that cannot police the helpers gives no
//! network at all: there is never an unpoliced helper.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use super::firewall::{Firewall, NFT_BINARY};
use super::passt::PASST_BINARY;
use super::policy::{EgressPolicy, FloodLimits};
use super::{HelperIds, NetworkConfig};
use crate::vmm::host::Probe;

/// Largest `/etc/services` handed to builds.
const MAX_SERVICES_BYTES: u64 = 1 << 20;

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkFlags {
    /// `--no-network`.
    pub disabled: bool,
    /// `--network-allow`.
    pub allow: Vec<IpNet>,
    /// `--network-dns`.
    pub dns: Option<IpAddr>,
}

/// The outcome: a configuration and its installed table, or why not.
#[derive(Debug)]
pub enum NetworkSetup {
    /// Builds that ask get network; keep the table for as long as they may.
    Ready {
        /// For the executor.
        config: NetworkConfig,
        /// Removes the table when dropped.
        firewall: Firewall,
    },
    /// Builds that ask are refused, with this reason.
    Unavailable(String),
}

impl NetworkSetup {
    /// Sets up what `flags` ask for on this host.
    pub fn from_flags(flags: &NetworkFlags) -> NetworkSetup {
        if flags.disabled {
            return NetworkSetup::Unavailable(
                "the operator turned it off with --no-network".into(),
            );
        }
        let probe = Probe::system();
        let Some(passt) = probe.find(PASST_BINARY) else {
            return NetworkSetup::Unavailable(
                "passt, the NAT helper, is not installed (apt-get install passt)".into(),
            );
        };
        let Some(nft) = probe.find(NFT_BINARY) else {
            return NetworkSetup::Unavailable(
                "nft, which polices the NAT helpers, is not installed (apt-get install nftables)"
                    .into(),
            );
        };
        let policy = EgressPolicy {
            allow: flags.allow.clone(),
            dns: match flags.dns {
                Some(dns) => vec![dns],
                None => host_resolvers(Path::new("/etc/resolv.conf")),
            },
            flood: FloodLimits::default(),
        };
        match Firewall::install(&nft, &policy) {
            Ok(firewall) => NetworkSetup::Ready {
                config: NetworkConfig {
                    passt,
                    dns: flags.dns,
                    ids: HelperIds::default(),
                    services: host_services(Path::new("/etc/services")),
                    policy,
                },
                firewall,
            },
            Err(e) => NetworkSetup::Unavailable(format!(
                "the egress policy could not be installed: {}",
                chain(&e)
            )),
        }
    }
}

/// `e` and its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The `nameserver` addresses of a resolv.conf (the resolvers passt
/// forwards to when no `--network-dns` is given).
pub fn host_resolvers(path: &Path) -> Vec<IpAddr> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

/// The host's `/etc/services` (as Nix gives it to fixed-output
/// derivations), empty when missing, not UTF-8 or over 1 MiB.
fn host_services(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) if m.len() <= MAX_SERVICES_BYTES => std::fs::read_to_string(path).unwrap_or_default(),
        _ => String::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn resolvers_are_the_nameserver_lines() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(
            &conf,
            "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver ::1\nnameserver bogus\noptions edns0\n",
        )
        .unwrap();
        assert_eq!(
            host_resolvers(&conf),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert!(host_resolvers(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn no_network_is_a_reason_not_a_setup() {
        let setup = NetworkSetup::from_flags(&NetworkFlags {
            disabled: true,
            ..Default::default()
        });
        assert!(
            matches!(&setup, NetworkSetup::Unavailable(why) if why.contains("--no-network")),
            "{setup:?}"
        );
    }
}
