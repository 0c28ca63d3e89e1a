//! What the network lab needs from this host: the gate (which binaries,
//! root), running `ip`, and finding processes by network namespace.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::harness::gate::vm_unavailable;

/// Why the network tests cannot run here, if they cannot: what the lab
/// needs ([`lab_unavailable`]), kiln's NAT helper and firewall (`passt`,
/// `nft`) and what booting VMs needs.
pub fn unavailable() -> Option<String> {
    lab_unavailable()
        .or_else(|| missing(&[("nft", "nftables"), ("passt", "passt")]))
        .or_else(vm_unavailable)
}

/// Why a [`NetLab`] cannot be built here, if it cannot: root, `ip`,
/// `dnsmasq` and `python3`.
pub fn lab_unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("network namespaces and veth pairs need root".into());
    }
    missing(&[
        ("ip", "iproute2"),
        ("dnsmasq", "dnsmasq-base"),
        ("python3", "python3"),
    ])
}

fn missing(binaries: &[(&str, &str)]) -> Option<String> {
    binaries.iter().find_map(|(bin, package)| {
        find_binary(bin).is_none().then(|| {
            format!(
                "`{bin}` is not installed (Debian package {package}); the network tests need it"
            )
        })
    })
}

/// `name` on `PATH`, or in the sbin directories a non-login `PATH` lacks.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub(super) fn ip(args: &[&str]) -> Output {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ip ARGS`; the error names the command and says why it failed.
pub(super) fn try_ip(args: &[&str]) -> Result<Output, String> {
    let ip = find_binary("ip").ok_or("ip (iproute2) is not installed")?;
    let out = Command::new(ip)
        .args(args)
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

/// The identity of network namespace `name`: the inode `/proc/PID/ns/net`
/// of its processes links to (`net:[INODE]`).
pub(super) fn namespace_inode(name: &str) -> u64 {
    std::fs::metadata(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("network namespace {name}: {e}"))
        .ino()
}

/// PIDs other than this process in the network namespace `inode`.
pub fn processes_in(inode: u64) -> Vec<i32> {
    let link = format!("net:[{inode}]");
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/ns/net"))
                        .is_ok_and(|l| l.as_os_str() == link.as_str())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid`'s program (its first argument) is named `program`.
pub fn runs_program(pid: i32, program: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| {
            c.split(|b| *b == 0)
                .next()
                .map(|a| a == program.as_bytes() || a.ends_with(format!("/{program}").as_bytes()))
        })
        .unwrap_or(false)
}

pub(super) fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A process's command line, for messages.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}
