//! The `network` line of `kiln doctor`: whether builds that ask for network
//! can get it on this host, with the flags given, and why not.

use std::io::Write;
use std::process::{Command, Stdio};

use super::{Check, Status};
use crate::vmm::host::Probe;
use crate::vmm::net::firewall::NFT_BINARY;
use crate::vmm::net::passt::PASST_BINARY;
use crate::vmm::net::policy::{EgressPolicy, FloodLimits};
use crate::vmm::net::setup::host_resolvers;
use crate::vmm::net::NetworkFlags;

/// Looks for passt and nft, has the kernel check the egress table (`nft
/// --check`: nothing is installed), and for cloud-hypervisor asks whether
/// this passt serves vhost-user.
pub fn network_check(flags: &NetworkFlags, vhost_user: bool) -> Check {
    let check = |status, finding: String, advice: Option<&str>| Check {
        topic: "network",
        status,
        finding,
        advice: advice.map(str::to_owned),
    };
    if flags.disabled {
        return check(
            Status::Info,
            "off (--no-network): builds that ask for network are refused".into(),
            None,
        );
    }
    let probe = Probe::system();
    let Some(passt) = probe.find(PASST_BINARY) else {
        return check(
            Status::Warn,
            "passt (the NAT helper) not found: builds that ask for network are refused".into(),
            Some("apt-get install passt (make deps does)"),
        );
    };
    let Some(nft) = probe.find(NFT_BINARY) else {
        return check(
            Status::Warn,
            "nft not found, so the NAT helpers cannot be policed: builds that ask for network are refused".into(),
            Some("apt-get install nftables (make deps does)"),
        );
    };
    let dns = match flags.dns {
        Some(dns) => vec![dns],
        None => host_resolvers(std::path::Path::new("/etc/resolv.conf")),
    };
    let policy = EgressPolicy {
        allow: flags.allow.clone(),
        dns: dns.clone(),
        flood: FloodLimits::default(),
    };
    if let Err(why) = nft_check(&nft, &policy.ruleset("kiln_doctor")) {
        return check(
            Status::Warn,
            format!("the kernel refuses kiln's egress table ({why}): builds that ask for network are refused"),
            Some("run kiln as root on a kernel with nftables (nf_tables, fib, ct count)"),
        );
    }
    if vhost_user && !passt_speaks_vhost_user(&passt) {
        return check(
            Status::Warn,
            format!("{} has no --vhost-user, which cloud-hypervisor needs: networked builds will fail to boot", passt.display()),
            Some("install a passt from 2024-11 or later, or use --vmm qemu"),
        );
    }
    let allowed = if flags.allow.is_empty() {
        "nothing else".to_owned()
    } else {
        flags
            .allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let resolvers = if dns.is_empty() {
        "none found in /etc/resolv.conf: names will not resolve".to_owned()
    } else {
        dns.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    check(
        if dns.is_empty() { Status::Warn } else { Status::Ok },
        format!(
            "builds that ask reach public addresses only, through {} policed by {}; also allowed: {allowed}; DNS via {resolvers}",
            passt.display(),
            nft.display()
        ),
        dns.is_empty().then_some("give --network-dns ADDR"),
    )
}

/// `nft --check -f -`: whether the kernel would take the table.
fn nft_check(nft: &std::path::Path, rules: &str) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["--check", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Whether `passt --help` lists `--vhost-user`.
fn passt_speaks_vhost_user(passt: &std::path::Path) -> bool {
    Command::new(passt)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).contains("--vhost-user")
        })
        .unwrap_or(false)
}
