//! `kiln doctor`: what this host can do for kiln, one line per fact, each
//! with what to do about it.
//!
//! [`doctor`] detects the host ([`HostFacts::detect`]), asks the same
//! [`select()`] the server uses which VMM and acceleration the given flags
//! lead to, checks the guest artifacts, prints the result and returns it as a
//! [`DoctorReport`] (so tests and callers can look at single checks).

use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use crate::guest_image::Artifacts;
use crate::vmm::host::{self, select, AccelChoice, HostFacts, SelectError, Selection, VmmChoice};
use crate::vmm::Transport;

mod checks;
mod network;

use checks::{
    artifact_checks, cloud_hypervisor_check, kvm_check, nested_check, qemu_check, selection_check,
    virtiofsd_check,
};

/// Errors of `kiln doctor`.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// Writing the report failed.
    #[error("printing the report")]
    Print(#[source] std::io::Error),
}

/// What to examine: the same settings `kiln serve` would run with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DoctorOptions {
    /// `--vmm`.
    pub vmm: VmmChoice,
    /// `--accel`.
    pub accel: AccelChoice,
    /// The configured guest kernel is PVM-enabled.
    pub kernel_is_pvm: bool,
    /// Kernel, modules, agent and busybox.
    pub artifacts: Artifacts,
    /// Where the server caches base initramfs images (`base-*.cpio`).
    pub image_cache_dir: Option<PathBuf>,
    /// `--no-network`, `--network-allow`, `--network-dns`; `None`: leave the
    /// network line out (the unit tests of the other lines).
    pub network: Option<crate::vmm::net::NetworkFlags>,
}

/// How one fact bears on running builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Worth knowing, nothing to do.
    Info,
    /// Builds work, but slower or with less than they could.
    Warn,
    /// Builds cannot run until this is fixed.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "ok",
            Self::Info => "info",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was looked at (`kvm`, `nested`, `qemu`, ...).
    pub topic: &'static str,
    /// How it bears on builds.
    pub status: Status,
    /// What was found.
    pub finding: String,
    /// What to do about it, when there is something to do.
    pub advice: Option<String>,
}

/// Everything `kiln doctor` found.
#[derive(Debug, Clone)]
pub struct DoctorReport {
    /// The detected host.
    pub facts: HostFacts,
    /// What the flags select on this host, or why they cannot work.
    pub selection: Result<Selection, SelectError>,
    /// One entry per line printed, in order.
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// The check about `topic`.
    pub fn check(&self, topic: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.topic == topic)
    }

    /// True when nothing stops builds from running.
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(
                f,
                "{:<5} {:<17} {}",
                check.status, check.topic, check.finding
            )?;
            if let Some(advice) = &check.advice {
                writeln!(f, "{:<23} -> {advice}", "")?;
            }
        }
        let verdict = if self.ready() {
            "builds can run on this host"
        } else {
            "builds cannot run until the FAIL lines are fixed"
        };
        writeln!(f, "{verdict}")
    }
}

/// Detects the host, prints the report to `out` and returns it.
pub async fn doctor(
    opts: &DoctorOptions,
    out: &mut (dyn Write + Send),
) -> Result<DoctorReport, DoctorError> {
    let facts = HostFacts::detect().await;
    let report = assess(facts, opts);
    write!(out, "{report}").map_err(DoctorError::Print)?;
    Ok(report)
}

/// The report for a host with `facts` (reads only the artifact files).
pub fn assess(facts: HostFacts, opts: &DoctorOptions) -> DoctorReport {
    let selection = select(opts.vmm, opts.accel, &facts, opts.kernel_is_pvm);
    let mut checks = vec![
        kvm_check(&facts, opts.kernel_is_pvm),
        nested_check(&facts, selection.as_ref().ok()),
        qemu_check(&facts, selection.as_ref().ok()),
        cloud_hypervisor_check(&facts, opts.kernel_is_pvm),
        virtiofsd_check(&facts),
    ];
    // The modules the selected backend's guests load (the runner says which
    // transport it uses); without a selection, those of every transport.
    let transports = match &selection {
        Ok(s) => vec![host::runner(s, &facts).transport()],
        Err(_) => Transport::ALL.to_vec(),
    };
    checks.extend(artifact_checks(
        &opts.artifacts,
        opts.image_cache_dir.as_deref(),
        &transports,
    ));
    if let Some(flags) = &opts.network {
        let vhost_user = match &selection {
            Ok(s) => host::runner(s, &facts).vhost_user_net(),
            Err(_) => false,
        };
        checks.push(network::network_check(flags, vhost_user));
    }
    checks.push(selection_check(opts, &selection));
    DoctorReport {
        facts,
        selection,
        checks,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use std::path::Path;

    use super::*;
    use crate::vmm::host::{Accel, CpuVendor, DevKvm, KvmKind, Tool, Vmm};

    fn tool(name: &str) -> Option<Tool> {
        Some(Tool {
            path: format!("/usr/bin/{name}").into(),
            version: Some(format!("{name} 1.14.0")),
        })
    }

    fn pvm_host() -> HostFacts {
        HostFacts {
            kvm: KvmKind::Pvm,
            dev_kvm: DevKvm::Usable,
            nested: None,
            qemu: tool("qemu-system-x86_64"),
            cloud_hypervisor: None,
            virtiofsd: tool("virtiofsd"),
        }
    }

    /// Artifacts in a temp dir: the kernel with `modules`, agent, busybox.
    fn artifacts(dir: &Path, modules: &[&str]) -> Artifacts {
        let a = Artifacts {
            kernel_dir: dir.join("kernel"),
            agent: dir.join("agent"),
            busybox: dir.join("busybox"),
        };
        std::fs::create_dir_all(a.modules_dir()).unwrap();
        std::fs::write(a.vmlinux(), vec![0u8; 2 << 20]).unwrap();
        std::fs::write(a.kernel_dir.join("VERSION"), "linux-image-test 6.1\n").unwrap();
        for m in modules {
            std::fs::write(a.modules_dir().join(format!("{m}.ko")), b"ko").unwrap();
        }
        std::fs::write(&a.agent, b"agent").unwrap();
        std::fs::write(&a.busybox, b"busybox").unwrap();
        a
    }

    #[test]
    fn pvm_host_with_nothing_built_explains_tcg_and_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DoctorOptions {
            artifacts: Artifacts {
                kernel_dir: dir.path().join("kernel"),
                agent: dir.path().join("agent"),
                busybox: dir.path().join("busybox"),
            },
            ..DoctorOptions::default()
        };
        let report = assess(pvm_host(), &opts);

        let kvm = report.check("kvm").unwrap();
        assert_eq!(kvm.status, Status::Warn);
        assert!(kvm.finding.contains("PVM"), "{}", kvm.finding);
        assert!(kvm.advice.as_deref().unwrap().contains("TCG"));
        let sel = report.selection.as_ref().unwrap();
        assert_eq!((sel.vmm, sel.accel), (Vmm::Qemu, Accel::Tcg));
        let line = report.check("selection").unwrap();
        assert_eq!(line.status, Status::Warn);
        assert!(
            line.finding
                .starts_with("--vmm auto --accel auto picks qemu with tcg"),
            "{}",
            line.finding
        );
        assert_eq!(report.check("nested").unwrap().status, Status::Info);
        assert_eq!(report.check("guest kernel").unwrap().status, Status::Fail);
        assert_eq!(
            report.check("guest agent").unwrap().advice.as_deref(),
            Some("make agent")
        );
        assert!(!report.ready());
        let text = report.to_string();
        assert!(text.contains("FAIL  guest kernel"), "{text}");
        assert!(
            text.ends_with("builds cannot run until the FAIL lines are fixed\n"),
            "{text}"
        );
    }

    #[test]
    fn hardware_host_with_everything_is_ready_on_cloud_hypervisor() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("images");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(cache.join("base-0123.cpio"), b"").unwrap();
        let opts = DoctorOptions {
            artifacts: artifacts(dir.path(), Transport::Pci.guest_modules()),
            image_cache_dir: Some(cache),
            ..DoctorOptions::default()
        };
        let facts = HostFacts {
            kvm: KvmKind::Hardware {
                vendor: CpuVendor::Amd,
            },
            nested: Some(true),
            cloud_hypervisor: tool("cloud-hypervisor"),
            ..pvm_host()
        };
        let report = assess(facts, &opts);
        let bad: Vec<_> = report
            .checks
            .iter()
            .filter(|c| !matches!(c.status, Status::Ok | Status::Info))
            .collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(report.ready());
        let sel = report.selection.as_ref().unwrap();
        assert_eq!(sel.vmm, Vmm::CloudHypervisor);
        let kernel = &report.check("guest kernel").unwrap().finding;
        assert!(kernel.contains("version linux-image-test 6.1"), "{kernel}");
        assert!(report
            .check("base initramfs")
            .unwrap()
            .finding
            .starts_with("1 cached"));
    }

    #[test]
    fn missing_backend_modules_and_tools_fail_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        // Modules for virtio-mmio only; explicitly selecting cloud-hypervisor
        // needs virtio_pci.
        let opts = DoctorOptions {
            vmm: VmmChoice::CloudHypervisor,
            artifacts: artifacts(dir.path(), Transport::Mmio.guest_modules()),
            ..DoctorOptions::default()
        };
        let facts = HostFacts {
            kvm: KvmKind::Hardware {
                vendor: CpuVendor::Intel,
            },
            nested: Some(false),
            cloud_hypervisor: tool("cloud-hypervisor"),
            virtiofsd: None,
            ..pvm_host()
        };
        let report = assess(facts, &opts);
        let kernel = report.check("guest kernel").unwrap();
        assert_eq!(kernel.status, Status::Fail);
        assert!(kernel.finding.contains("virtio_pci"), "{}", kernel.finding);
        assert_eq!(report.check("virtiofsd").unwrap().status, Status::Fail);
        let nested = report.check("nested").unwrap();
        assert_eq!(nested.status, Status::Warn);
        assert!(nested.advice.as_deref().unwrap().contains("nested=1"));
    }

    #[test]
    fn a_virtiofsd_too_old_for_the_command_line_builds_give_it_fails() {
        let old = HostFacts {
            virtiofsd: Some(Tool {
                path: "/usr/libexec/virtiofsd".into(),
                version: Some("virtiofsd 1.5.0".into()),
            }),
            ..pvm_host()
        };
        let line = assess(old, &DoctorOptions::default())
            .check("virtiofsd")
            .unwrap()
            .clone();
        assert_eq!(line.status, Status::Fail);
        assert!(
            line.finding.starts_with(
                "/usr/libexec/virtiofsd (virtiofsd 1.5.0): builds need virtiofsd 1.13.0"
            ),
            "{}",
            line.finding
        );
        assert!(line.advice.unwrap().contains("cargo install virtiofsd"));

        let fine = assess(pvm_host(), &DoctorOptions::default());
        assert_eq!(fine.check("virtiofsd").unwrap().status, Status::Ok);
        let missing = HostFacts {
            virtiofsd: None,
            ..pvm_host()
        };
        let line = assess(missing, &DoctorOptions::default())
            .check("virtiofsd")
            .unwrap()
            .clone();
        assert_eq!(
            line.finding,
            "virtiofsd not found on PATH, in ~/.cargo/bin or in /usr/libexec"
        );
    }

    #[test]
    fn explicit_impossible_flags_fail_the_selection_line() {
        let opts = DoctorOptions {
            accel: AccelChoice::Kvm,
            ..DoctorOptions::default()
        };
        let report = assess(pvm_host(), &opts);
        let line = report.check("selection").unwrap();
        assert_eq!(line.status, Status::Fail);
        assert!(
            line.finding.contains("--accel kvm needs hardware KVM"),
            "{}",
            line.finding
        );
    }

    /// The real host. On the PVM machines kiln is developed on, auto must pick
    /// QEMU with TCG and say why.
    #[tokio::test]
    async fn this_host() {
        let opts = DoctorOptions::default();
        let mut out = Vec::new();
        let report = doctor(&opts, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        eprintln!("{text}");
        assert_eq!(text, report.to_string());
        assert_eq!(
            text.lines().count(),
            report.checks.len() + report.checks.iter().filter(|c| c.advice.is_some()).count() + 1
        );
        if report.facts.kvm != KvmKind::Pvm {
            test_skip!(
                "the PVM assertions of this_host, because this host's KVM is {}",
                report.facts.kvm
            );
            return;
        }
        let sel = report
            .selection
            .as_ref()
            .expect("QEMU is installed by make deps");
        assert_eq!((sel.vmm, sel.accel), (Vmm::Qemu, Accel::Tcg));
        assert!(sel.warning.is_some());
        assert_eq!(report.check("kvm").unwrap().status, Status::Warn);
        assert!(text.contains("PVM (kvm_pvm)"), "{text}");
    }
}
