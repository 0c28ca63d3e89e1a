//! The individual checks of `kiln doctor`: one function per fact, each
//! turning what detection found into a [`Check`] with advice.

use std::path::{Path, PathBuf};

use super::{Check, DoctorOptions, Status};
use crate::guest_image::Artifacts;
use crate::vmm::host::{
    kvm_usable, Accel, DevKvm, HostFacts, KvmKind, SelectError, Selection, Tool, Vmm,
    MIN_VIRTIOFSD_VERSION, VIRTIOFSD_SEARCHED,
};
use crate::vmm::Transport;

fn check(topic: &'static str, status: Status, finding: String, advice: Option<&str>) -> Check {
    Check {
        topic,
        status,
        finding,
        advice: advice.map(str::to_owned),
    }
}

pub(super) fn kvm_check(facts: &HostFacts, kernel_is_pvm: bool) -> Check {
    let dev = match &facts.dev_kvm {
        DevKvm::Usable => "/dev/kvm opens".to_owned(),
        DevKvm::Missing => "/dev/kvm is missing".to_owned(),
        DevKvm::Unusable(e) => format!("/dev/kvm does not open ({e})"),
    };
    let finding = format!("{}; {dev}", facts.kvm);
    match (facts.kvm, kvm_usable(facts, kernel_is_pvm)) {
        (_, Ok(())) => check("kvm", Status::Ok, finding, None),
        (KvmKind::Pvm, Err(_)) if !kernel_is_pvm => check(
            "kvm",
            Status::Warn,
            format!("{finding}; PVM only runs PVM-enabled guest kernels and the configured one is stock, so this host counts as having no hardware KVM"),
            Some("builds fall back to QEMU's software emulation (TCG); for KVM speed run kiln on a host with VT-x/AMD-V (kvm_intel/kvm_amd), or boot a PVM-enabled guest kernel and pass --pvm-kernel"),
        ),
        (KvmKind::None, Err(_)) => check(
            "kvm",
            Status::Warn,
            finding,
            Some("if the CPU has VT-x/AMD-V (grep -E 'vmx|svm' /proc/cpuinfo), `modprobe kvm_intel` or `modprobe kvm_amd`; otherwise builds run under TCG"),
        ),
        (_, Err(_)) => check(
            "kvm",
            Status::Warn,
            finding,
            Some("run kiln as root or give its user access to /dev/kvm (the kvm group); until then builds run under TCG"),
        ),
    }
}

pub(super) fn nested_check(facts: &HostFacts, selection: Option<&Selection>) -> Check {
    let under_tcg = selection.is_some_and(|s| s.accel == Accel::Tcg);
    match (facts.kvm, facts.nested) {
        (KvmKind::Hardware { vendor }, Some(true)) => check(
            "nested",
            Status::Ok,
            format!("kvm_{vendor} allows nested virtualisation: builds may ask for /dev/kvm"),
            None,
        ),
        (KvmKind::Hardware { vendor }, nested) => check(
            "nested",
            Status::Warn,
            format!(
                "kvm_{vendor} nested={}: builds asking for /dev/kvm are refused",
                if nested.is_some() { "off" } else { "unknown" }
            ),
            Some(&format!(
                "modprobe -r kvm_{vendor} && modprobe kvm_{vendor} nested=1 (persist it in /etc/modprobe.d)"
            )),
        ),
        (_, _) if under_tcg => check(
            "nested",
            Status::Info,
            "no nested virtualisation from the host KVM, but under TCG the emulated CPU offers VMX/SVM: builds asking for /dev/kvm get a (slow) nested KVM".to_owned(),
            None,
        ),
        (_, _) => check(
            "nested",
            Status::Warn,
            format!("{} offers no nested virtualisation: builds asking for /dev/kvm are refused", facts.kvm),
            Some("use --accel tcg (emulated VMX/SVM) or a host with kvm_intel/kvm_amd nested=1"),
        ),
    }
}

fn describe_tool(tool: &Tool) -> String {
    match &tool.version {
        Some(version) => format!("{} ({version})", tool.path.display()),
        None => format!("{} (its --version failed)", tool.path.display()),
    }
}

pub(super) fn qemu_check(facts: &HostFacts, selection: Option<&Selection>) -> Check {
    match &facts.qemu {
        Some(tool) => check("qemu", Status::Ok, describe_tool(tool), None),
        None => {
            let needed = !selection.is_some_and(|s| s.vmm == Vmm::CloudHypervisor);
            check(
                "qemu",
                if needed { Status::Fail } else { Status::Info },
                "qemu-system-x86_64 not found".to_owned(),
                Some("apt-get install qemu-system-x86 (or `make deps`)"),
            )
        }
    }
}

pub(super) fn cloud_hypervisor_check(facts: &HostFacts, kernel_is_pvm: bool) -> Check {
    match (&facts.cloud_hypervisor, kvm_usable(facts, kernel_is_pvm)) {
        (Some(tool), Ok(())) => check("cloud-hypervisor", Status::Ok, describe_tool(tool), None),
        (Some(tool), Err(_)) => check(
            "cloud-hypervisor",
            Status::Info,
            format!("{}; unused here: it needs hardware KVM", describe_tool(tool)),
            None,
        ),
        (None, Ok(())) => check(
            "cloud-hypervisor",
            Status::Info,
            "not installed: builds use QEMU with KVM".to_owned(),
            Some("for the production backend put a cloud-hypervisor release binary on PATH (it is not packaged in Debian)"),
        ),
        (None, Err(_)) => check(
            "cloud-hypervisor",
            Status::Info,
            "not installed, and not usable here anyway: it needs hardware KVM".to_owned(),
            None,
        ),
    }
}

pub(super) fn virtiofsd_check(facts: &HostFacts) -> Check {
    const INSTALL: &str = "apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked (or `make virtiofsd`)";
    let Some(tool) = &facts.virtiofsd else {
        return check(
            "virtiofsd",
            Status::Fail,
            format!("virtiofsd not found {VIRTIOFSD_SEARCHED}"),
            Some(INSTALL),
        );
    };
    let (major, minor, patch) = MIN_VIRTIOFSD_VERSION;
    let min = format!("{major}.{minor}.{patch}");
    // This is the binary builds run (the same lookup), so its version decides.
    match tool.version.as_deref().map(virtiofsd_version) {
        Some(Some(version)) if version >= MIN_VIRTIOFSD_VERSION => {
            check("virtiofsd", Status::Ok, describe_tool(tool), None)
        }
        Some(Some(_)) => check(
            "virtiofsd",
            Status::Fail,
            format!(
                "{}: builds need virtiofsd {min} or newer",
                describe_tool(tool)
            ),
            Some(INSTALL),
        ),
        _ => check(
            "virtiofsd",
            Status::Warn,
            format!(
                "{}: not a version kiln recognises (builds need the Rust virtiofsd {min} or newer)",
                describe_tool(tool)
            ),
            Some(INSTALL),
        ),
    }
}

/// `virtiofsd 1.14.0` (what the Rust virtiofsd's `--version` prints) as
/// numbers; `None` for anything else, such as QEMU's old C daemon.
fn virtiofsd_version(line: &str) -> Option<(u32, u32, u32)> {
    let mut parts = line.strip_prefix("virtiofsd ")?.trim().splitn(3, '.');
    let mut next = || parts.next()?.parse::<u32>().ok();
    Some((next()?, next()?, next()?))
}

/// `transports`: those of the backends builds may use (the selected one's,
/// or every one when nothing could be selected); the guest kernel must have
/// the modules of each.
pub(super) fn artifact_checks(
    artifacts: &Artifacts,
    cache_dir: Option<&Path>,
    transports: &[Transport],
) -> Vec<Check> {
    let mut checks = Vec::new();
    let vmlinux = artifacts.vmlinux();
    let modules = module_names(&artifacts.modules_dir());
    let mut needed: Vec<&str> = Vec::new();
    for module in transports.iter().flat_map(|t| t.guest_modules()) {
        if !needed.contains(module) {
            needed.push(module);
        }
    }
    let missing: Vec<&str> = match &modules {
        Some(names) => needed
            .iter()
            .copied()
            .filter(|m| !names.iter().any(|n| n == m))
            .collect(),
        None => needed.clone(),
    };
    checks.push(match (file_size(&vmlinux), &modules) {
        (Some(_), Some(_)) if !missing.is_empty() => check(
            "guest kernel",
            Status::Fail,
            format!(
                "{} lacks modules the guest needs: {}",
                artifacts.modules_dir().display(),
                missing.join(" ")
            ),
            Some("make kernel"),
        ),
        (Some(size), Some(names)) if !names.is_empty() => check(
            "guest kernel",
            Status::Ok,
            format!(
                "{} ({}), {} modules, version {}",
                vmlinux.display(),
                mib(size),
                names.len(),
                artifacts
                    .kernel_version()
                    .unwrap_or_else(|| "unrecorded".into())
            ),
            None,
        ),
        (Some(_), _) => check(
            "guest kernel",
            Status::Fail,
            format!("{} has no modules", artifacts.modules_dir().display()),
            Some("make kernel"),
        ),
        (None, _) => check(
            "guest kernel",
            Status::Fail,
            format!("{} not found", vmlinux.display()),
            Some("make kernel"),
        ),
    });
    checks.push(file_check("guest agent", &artifacts.agent, "make agent"));
    checks.push(file_check(
        "busybox",
        &artifacts.busybox,
        "apt-get install busybox-static",
    ));
    checks.push(base_image_check(cache_dir));
    checks
}

fn file_check(topic: &'static str, path: &Path, fix: &str) -> Check {
    match file_size(path) {
        Some(size) => check(
            topic,
            Status::Ok,
            format!("{} ({})", path.display(), mib(size)),
            None,
        ),
        None => check(
            topic,
            Status::Fail,
            format!("{} not found", path.display()),
            Some(fix),
        ),
    }
}

fn base_image_check(cache_dir: Option<&Path>) -> Check {
    let Some(dir) = cache_dir else {
        return check(
            "base initramfs",
            Status::Info,
            "no image cache directory given; kiln builds the base image on first use".to_owned(),
            None,
        );
    };
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("base-") && n.ends_with(".cpio"))
        })
        .collect();
    images.sort();
    match images.as_slice() {
        [] => check(
            "base initramfs",
            Status::Info,
            format!(
                "none cached in {} yet; kiln writes it on the first build",
                dir.display()
            ),
            None,
        ),
        found => check(
            "base initramfs",
            Status::Ok,
            format!("{} cached in {}", found.len(), dir.display()),
            None,
        ),
    }
}

pub(super) fn selection_check(
    opts: &DoctorOptions,
    selection: &Result<Selection, SelectError>,
) -> Check {
    let flags = format!(
        "--vmm {} --accel {}",
        value_name(opts.vmm),
        value_name(opts.accel)
    );
    match selection {
        // A warning already says why; the reason would repeat it.
        Ok(s) => match &s.warning {
            Some(warning) => check(
                "selection",
                Status::Warn,
                format!("{flags} picks {} with {}", s.vmm, s.accel),
                Some(warning),
            ),
            None => check(
                "selection",
                Status::Ok,
                format!("{flags} picks {} with {}: {}", s.vmm, s.accel, s.reason),
                None,
            ),
        },
        Err(e) => check("selection", Status::Fail, format!("{flags}: {e}"), None),
    }
}

/// The flag spelling of a clap value (`cloud-hypervisor`, `auto`).
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

fn module_names(dir: &Path) -> Option<Vec<String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".ko")
                    .map(str::to_owned)
            })
            .collect(),
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_versions_are_read_from_the_rust_daemons_line_only() {
        assert_eq!(virtiofsd_version("virtiofsd 1.14.0"), Some((1, 14, 0)));
        assert_eq!(virtiofsd_version("virtiofsd 1.13.3"), Some((1, 13, 3)));
        // QEMU's C daemon (/usr/lib/qemu/virtiofsd) has another command line.
        assert_eq!(
            virtiofsd_version("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            None
        );
        assert_eq!(virtiofsd_version("virtiofsd 1.x"), None);
    }
}
