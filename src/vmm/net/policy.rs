//! The egress policy of networked builds, as one nftables table per kiln
//! process ([`TABLE_PREFIX`]).
//!
//! Every networked build's traffic leaves the host through its own NAT
//! helper ([`super::passt`]), a process that runs as a uid of its own from
//! [`NAT_UID_BASE`]. The table polices exactly the sockets of those uids, in
//! the `output` hook of kiln's network namespace, so what a helper can reach
//! is decided by the kernel, not by the helper:
//!
//! 1. DNS (port 53) to the configured upstream resolvers: allowed;
//! 2. destinations the operator allowed (`--network-allow`): allowed;
//! 3. any address of the host itself (`fib daddr type local`: loopback and
//!    every interface address, whatever they are now or later), broadcast,
//!    multicast and anycast: rejected;
//! 4. [`DENIED_V4`] and [`DENIED_V6`] (private, shared, link-local, loopback,
//!    reserved, multicast ranges): rejected;
//! 5. new connections over [`FloodLimits`] per helper: rejected;
//! 6. everything else (public addresses): allowed.
//!
//! "Rejected" refuses the helper's socket at once (ICMP unreachable, TCP
//! reset); passt 2023 does not relay that to the guest, whose connection
//! then waits for its own timeout (README, Network). Other builds' VMs are
//! not reachable
//! because they have no address on the host: each helper is a user-mode
//! stack that listens on nothing. Pure code: rendering is tested without nft.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

/// The prefix of the tables' names (in the `inet` family, so IPv4 and IPv6
/// alike): each kiln process installs `kiln_<pid>`, so two servers in one
/// network namespace each keep their own table (a packet must pass every
/// table on the hook; the tables are the same policy), and one stopping
/// does not lift the other's.
pub const TABLE_PREFIX: &str = "kiln_";

/// First uid (and gid) of the NAT helpers: helper `n` runs as
/// `NAT_UID_BASE + n`. 0x7FE00000 is in the range systemd leaves
/// unassigned, below the range kiln maps guest ids to in writable shares
/// (`virtiofsd::GUEST_ID_HOST_BASE`, 0x7FF00000), so no host account owns
/// these ids.
pub const NAT_UID_BASE: u32 = 0x7FE0_0000;
/// How many helper ids exist (more than any `--max-vms`).
pub const NAT_UIDS: u32 = 65_536;

/// IPv4 destinations no build reaches unless allowed.
pub const DENIED_V4: &[&str] = &[
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // RFC 1918
    "100.64.0.0/10",   // shared address space (carrier NAT)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, cloud metadata services
    "172.16.0.0/12",   // RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.168.0.0/16",  // RFC 1918
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, broadcast
];

/// IPv6 destinations no build reaches unless allowed.
pub const DENIED_V6: &[&str] = &[
    "::/128",        // unspecified
    "::1/128",       // loopback
    "::ffff:0:0/96", // IPv4-mapped (policed as IPv4 on the wire too)
    "64:ff9b::/96",  // NAT64, which reaches IPv4 private ranges
    "100::/64",      // discard
    "2001:db8::/32", // documentation
    "fc00::/7",      // unique local
    "fe80::/10",     // link-local
    "ff00::/8",      // multicast
];

/// Bounds on what one helper may open, so one build cannot flood the host's
/// connection tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodLimits {
    /// New connections (TCP, UDP flows, ICMP echo) per second, sustained.
    pub new_per_second: u32,
    /// Burst above that rate.
    pub burst: u32,
    /// Connections open at once.
    pub concurrent: u32,
}

impl Default for FloodLimits {
    fn default() -> Self {
        FloodLimits {
            new_per_second: 50,
            burst: 200,
            concurrent: 512,
        }
    }
}

/// What networked builds may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations allowed although denied above (`--network-allow`).
    pub allow: Vec<IpNet>,
    /// Upstream resolvers the helpers forward the guest's DNS queries to;
    /// reachable on port 53 whatever their address.
    pub dns: Vec<IpAddr>,
    /// Per-helper connection bounds.
    pub flood: FloodLimits,
}

impl EgressPolicy {
    /// The whole table `table` as `nft -f` input: replaces any earlier
    /// table of that name atomically (the add-then-delete makes the delete
    /// valid when there was none).
    pub fn ruleset(&self, table: &str) -> String {
        let last_uid = NAT_UID_BASE + (NAT_UIDS - 1);
        let uids = format!("{NAT_UID_BASE}-{last_uid}");
        let (allow4, allow6): (Vec<&IpNet>, Vec<&IpNet>) =
            self.allow.iter().partition(|n| matches!(n, IpNet::V4(_)));
        let (dns4, dns6): (Vec<&IpAddr>, Vec<&IpAddr>) = self.dns.iter().partition(|a| a.is_ipv4());
        let mut t = String::new();
        let _ = writeln!(t, "table inet {table} {{}}");
        let _ = writeln!(t, "delete table inet {table}");
        let _ = writeln!(t, "table inet {table} {{");
        set(
            &mut t,
            "allow4",
            "ipv4_addr",
            allow4.iter().map(|n| n.to_string()),
        );
        set(
            &mut t,
            "allow6",
            "ipv6_addr",
            allow6.iter().map(|n| n.to_string()),
        );
        set(
            &mut t,
            "dns4",
            "ipv4_addr",
            dns4.iter().map(|a| a.to_string()),
        );
        set(
            &mut t,
            "dns6",
            "ipv6_addr",
            dns6.iter().map(|a| a.to_string()),
        );
        set(
            &mut t,
            "deny4",
            "ipv4_addr",
            DENIED_V4.iter().map(|s| s.to_string()),
        );
        set(
            &mut t,
            "deny6",
            "ipv6_addr",
            DENIED_V6.iter().map(|s| s.to_string()),
        );
        let FloodLimits {
            new_per_second,
            burst,
            concurrent,
        } = self.flood;
        let _ = writeln!(
            t,
            "  set helpers_new {{ type uid; size 65536; flags dynamic, timeout; timeout 1m; }}"
        );
        let _ = writeln!(
            t,
            "  set helpers_open {{ type uid; size 65536; flags dynamic; }}"
        );
        let _ = writeln!(t, "  chain output {{");
        let _ = writeln!(
            t,
            "    type filter hook output priority filter; policy accept;"
        );
        let _ = writeln!(t, "    meta skuid {uids} jump nat_helper");
        let _ = writeln!(t, "  }}");
        let _ = writeln!(t, "  chain nat_helper {{");
        let _ = writeln!(
            t,
            "    ip daddr @dns4 meta l4proto {{ tcp, udp }} th dport 53 jump admit"
        );
        let _ = writeln!(
            t,
            "    ip6 daddr @dns6 meta l4proto {{ tcp, udp }} th dport 53 jump admit"
        );
        let _ = writeln!(t, "    ip daddr @allow4 jump admit");
        let _ = writeln!(t, "    ip6 daddr @allow6 jump admit");
        let _ = writeln!(
            t,
            "    fib daddr type {{ local, broadcast, multicast, anycast }} counter reject"
        );
        let _ = writeln!(t, "    ip daddr @deny4 counter reject");
        let _ = writeln!(t, "    ip6 daddr @deny6 counter reject");
        let _ = writeln!(t, "    jump admit");
        let _ = writeln!(t, "  }}");
        let _ = writeln!(t, "  chain admit {{");
        let _ = writeln!(t, "    ct state established,related accept");
        let _ = writeln!(
            t,
            "    ct state new add @helpers_open {{ meta skuid ct count over {concurrent} }} counter reject"
        );
        let _ = writeln!(
            t,
            "    ct state new update @helpers_new {{ meta skuid limit rate over {new_per_second}/second burst {burst} packets }} counter reject"
        );
        let _ = writeln!(t, "    accept");
        let _ = writeln!(t, "  }}");
        let _ = writeln!(t, "}}");
        t
    }
}

/// One named interval set; empty sets are declared without elements.
fn set(t: &mut String, name: &str, kind: &str, elements: impl Iterator<Item = String>) {
    let elements: Vec<String> = elements.collect();
    let _ = write!(t, "  set {name} {{ type {kind}; flags interval;");
    if !elements.is_empty() {
        let _ = write!(t, " elements = {{ {} }};", elements.join(", "));
    }
    let _ = writeln!(t, " }}");
}

/// Whether the policy lets a helper open a connection to `addr` on
/// `port`, by the same rules as [`EgressPolicy::ruleset`] less the host's
/// own addresses and the flood limits (which only the kernel knows). For
/// `kiln doctor` and the tests of the rules' order.
pub fn permits(policy: &EgressPolicy, addr: IpAddr, port: u16) -> bool {
    if port == 53 && policy.dns.contains(&addr) {
        return true;
    }
    if policy.allow.iter().any(|n| n.contains(&addr)) {
        return true;
    }
    let denied = match addr {
        IpAddr::V4(_) => DENIED_V4,
        IpAddr::V6(_) => DENIED_V6,
    };
    !denied
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .any(|n| n.contains(&addr))
}

#[cfg(test)]
#[path = "policy/tests.rs"]
mod tests;
