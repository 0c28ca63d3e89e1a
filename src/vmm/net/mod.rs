//! Network for the builds that ask for it.
//!
//! A build with `network_access` gets one virtio-net device, `eth0`, wired
//! to a NAT helper of its own ([`passt`]), which turns the guest's traffic
//! into sockets on the host owned by a uid of the build's own; an nftables
//! table ([`policy`], installed by [`firewall`]) lets those sockets reach
//! public addresses only. Builds that do not ask have no network device.
//!
//! The guest side is fixed: address [`GUEST_ADDRESS`]/[`GUEST_PREFIX`],
//! gateway [`GUEST_GATEWAY`], resolver [`GUEST_DNS`] (answered by the
//! helper), configured by the agent before the builder starts.

pub mod firewall;
pub mod passt;
pub mod policy;
pub mod setup;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use firewall::{Firewall, FirewallError};
pub use passt::{Passt, PasstError, PasstSpec};
pub use policy::{EgressPolicy, FloodLimits};
pub use setup::{NetworkFlags, NetworkSetup};

/// The guest's address.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's prefix length.
pub const GUEST_PREFIX: u8 = 24;
/// The guest's default gateway (the helper).
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's resolver (the helper forwards to the upstream one).
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest NIC's MAC address (locally administered; one NIC per VM).
pub const GUEST_MAC: &str = "52:54:00:6b:69:6c";

/// The network device a VMM gives the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// Where the helper's end of the guest's Ethernet is.
    pub endpoint: NetEndpoint,
    /// The NIC's MAC address.
    pub mac: String,
}

/// How the VMM reaches the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEndpoint {
    /// One end of a connected stream socket pair, whose other end the
    /// helper holds (QEMU's `stream` netdev on an inherited descriptor).
    /// The session owns the descriptor; the VMM inherits this number.
    Fd(i32),
    /// A vhost-user socket the helper listens on (cloud-hypervisor).
    Socket(PathBuf),
}

/// How this server gives builds network, when it does.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The passt binary.
    pub passt: PathBuf,
    /// Upstream resolver for the guests' DNS (`None`: the host's
    /// `/etc/resolv.conf`, which passt reads itself).
    pub dns: Option<IpAddr>,
    /// Helper uids, shared by all builds of this server.
    pub ids: HelperIds,
    /// The host's `/etc/services`, given to networked builds.
    pub services: String,
    /// The installed policy (for logs and `kiln doctor`).
    pub policy: EgressPolicy,
}

impl NetworkConfig {
    /// The guest's view of its network.
    pub fn guest(&self) -> kiln_guest::contract::GuestNetwork {
        kiln_guest::contract::GuestNetwork {
            address: GUEST_ADDRESS.to_string(),
            prefix: GUEST_PREFIX,
            gateway: GUEST_GATEWAY.to_string(),
            dns: GUEST_DNS.to_string(),
            services: self.services.clone(),
        }
    }
}

/// The pool of helper uids ([`policy::NAT_UID_BASE`] upwards): a running
/// helper holds one, so two builds never share a uid (and their flood
/// limits).
#[derive(Debug, Clone, Default)]
pub struct HelperIds {
    used: Arc<Mutex<Vec<bool>>>,
}

impl HelperIds {
    /// A free uid, or `None` when all [`policy::NAT_UIDS`] are taken.
    pub fn acquire(&self) -> Option<HelperId> {
        let mut used = self.used.lock().ok()?;
        let free = match used.iter().position(|u| !u) {
            Some(i) => i,
            None if (used.len() as u32) < policy::NAT_UIDS => {
                used.push(false);
                used.len() - 1
            }
            None => return None,
        };
        used[free] = true;
        Some(HelperId {
            index: free,
            pool: self.clone(),
        })
    }
}

/// One helper uid, released on drop.
#[derive(Debug)]
pub struct HelperId {
    index: usize,
    pool: HelperIds,
}

impl HelperId {
    /// The uid (and gid).
    pub fn uid(&self) -> u32 {
        policy::NAT_UID_BASE + self.index as u32
    }
}

impl Drop for HelperId {
    fn drop(&mut self) {
        if let Ok(mut used) = self.pool.used.lock() {
            if let Some(slot) = used.get_mut(self.index) {
                *slot = false;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn helper_ids_are_unique_while_held_and_reused_after() {
        let ids = HelperIds::default();
        let a = ids.acquire().unwrap();
        let b = ids.acquire().unwrap();
        assert_eq!(a.uid(), policy::NAT_UID_BASE);
        assert_eq!(b.uid(), policy::NAT_UID_BASE + 1);
        drop(a);
        assert_eq!(ids.acquire().unwrap().uid(), policy::NAT_UID_BASE);
    }
}
