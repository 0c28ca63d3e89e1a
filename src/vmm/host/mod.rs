//! What this host can run VMs with: the kind of KVM behind `/dev/kvm`, whether
//! it opens, nested virtualisation, and which VMMs and virtiofsd are installed.
//!
//! Detection only reads and probes ([`HostFacts::detect`]); deciding what to
//! use is the pure [`select()`] in [`select`](mod@select), so the decision
//! table is unit-tested against made-up hosts.
//!
//! Why the KVM *kind* matters: a host may have a working `/dev/kvm` that is
//! served by `kvm_pvm`, a paravirtual KVM that runs only PVM-patched guest
//! kernels. A stock kernel under it passes the firmware and then spins for
//! ever, so such a host counts as having no hardware KVM unless the configured
//! guest kernel is PVM-capable.

use std::fmt;
use std::path::{Path, PathBuf};

mod probe;
pub mod select;

use super::cloud_hypervisor::CloudHypervisorRunner;
use super::qemu::QemuRunner;
use super::VmRunner;

use probe::tool;
pub use probe::{
    Probe, CLOUD_HYPERVISOR_BINARY, MIN_VIRTIOFSD_VERSION, QEMU_BINARY, VIRTIOFSD_BINARY,
    VIRTIOFSD_SEARCHED,
};
pub use select::{
    kvm_usable, select, Accel, AccelChoice, NoKvm, SelectError, Selection, Vmm, VmmChoice,
};

/// CPU vendor of a hardware KVM module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// `kvm_intel` (VMX).
    Intel,
    /// `kvm_amd` (SVM).
    Amd,
}

impl fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Intel => "intel",
            Self::Amd => "amd",
        })
    }
}

/// Which KVM implementation is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// `kvm_intel` or `kvm_amd`: runs any guest kernel.
    Hardware {
        /// Whose virtualisation extensions.
        vendor: CpuVendor,
    },
    /// `kvm_pvm`: runs only PVM-patched guest kernels.
    Pvm,
    /// No KVM vendor module at all.
    None,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hardware { vendor } => write!(f, "hardware ({vendor})"),
            Self::Pvm => f.write_str("PVM (kvm_pvm)"),
            Self::None => f.write_str("none"),
        }
    }
}

/// Whether this process can open `/dev/kvm` read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevKvm {
    /// It opens.
    Usable,
    /// The device node does not exist.
    Missing,
    /// It exists but opening it failed (permissions, ...): the OS error.
    Unusable(String),
}

/// An installed program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// First line of its `--version` output; `None` if that failed.
    pub version: Option<String>,
}

/// Everything detection found out about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The loaded KVM implementation.
    pub kvm: KvmKind,
    /// Whether `/dev/kvm` opens.
    pub dev_kvm: DevKvm,
    /// The hardware KVM module's `nested` parameter; `None` without a
    /// hardware KVM module (PVM offers no nested virtualisation).
    pub nested: Option<bool>,
    /// `qemu-system-x86_64`, if installed.
    pub qemu: Option<Tool>,
    /// `cloud-hypervisor`, if installed.
    pub cloud_hypervisor: Option<Tool>,
    /// `virtiofsd`, if installed.
    pub virtiofsd: Option<Tool>,
}

impl HostFacts {
    /// Detects the real host.
    pub async fn detect() -> Self {
        Self::detect_with(&Probe::system()).await
    }

    /// Detects the host as seen through `probe`. Never fails: whatever cannot
    /// be found is reported as absent.
    pub async fn detect_with(probe: &Probe) -> Self {
        let kvm = kvm_kind(&probe.sys_module);
        let nested = match kvm {
            KvmKind::Hardware { vendor } => nested_param(&probe.sys_module, vendor),
            KvmKind::Pvm | KvmKind::None => None,
        };
        let (qemu, cloud_hypervisor, virtiofsd) = tokio::join!(
            tool(probe, QEMU_BINARY),
            tool(probe, CLOUD_HYPERVISOR_BINARY),
            tool(probe, VIRTIOFSD_BINARY),
        );
        Self {
            kvm,
            dev_kvm: dev_kvm(&probe.dev_kvm),
            nested,
            qemu,
            cloud_hypervisor,
            virtiofsd,
        }
    }
}

/// The backend `selection` names, using the binaries detection found (or the
/// bare names, looked up in PATH, if `facts` lacks them).
pub fn runner(selection: &Selection, facts: &HostFacts) -> Box<dyn VmRunner> {
    let binary = |tool: &Option<Tool>, name: &str| {
        tool.as_ref()
            .map_or_else(|| PathBuf::from(name), |t| t.path.clone())
    };
    match selection.vmm {
        Vmm::CloudHypervisor => Box::new(CloudHypervisorRunner::new(binary(
            &facts.cloud_hypervisor,
            CLOUD_HYPERVISOR_BINARY,
        ))),
        Vmm::Qemu => Box::new(QemuRunner {
            accel: selection.accel,
            binary: binary(&facts.qemu, QEMU_BINARY),
            tb_size_mib: crate::vmm::qemu::TCG_TB_SIZE_MIB,
        }),
    }
}

/// PVM is checked first: it is the case where trusting `/dev/kvm` would
/// hang every build.
fn kvm_kind(sys_module: &Path) -> KvmKind {
    if sys_module.join("kvm_pvm").exists() {
        KvmKind::Pvm
    } else if sys_module.join("kvm_intel").exists() {
        KvmKind::Hardware {
            vendor: CpuVendor::Intel,
        }
    } else if sys_module.join("kvm_amd").exists() {
        KvmKind::Hardware {
            vendor: CpuVendor::Amd,
        }
    } else {
        KvmKind::None
    }
}

/// `kvm_intel` says `Y`/`N`, `kvm_amd` says `1`/`0`.
fn nested_param(sys_module: &Path, vendor: CpuVendor) -> Option<bool> {
    let module = match vendor {
        CpuVendor::Intel => "kvm_intel",
        CpuVendor::Amd => "kvm_amd",
    };
    let value = std::fs::read_to_string(sys_module.join(module).join("parameters/nested")).ok()?;
    match value.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

fn dev_kvm(path: &Path) -> DevKvm {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => DevKvm::Usable,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DevKvm::Missing,
        Err(e) => DevKvm::Unusable(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sys/module/kvm")).unwrap();
            std::fs::create_dir_all(dir.path().join("bin")).unwrap();
            Self { dir }
        }
        fn module(&self, name: &str, nested: Option<&str>) -> &Self {
            let params = self
                .dir
                .path()
                .join("sys/module")
                .join(name)
                .join("parameters");
            std::fs::create_dir_all(&params).unwrap();
            if let Some(value) = nested {
                std::fs::write(params.join("nested"), format!("{value}\n")).unwrap();
            }
            self
        }
        fn program(&self, name: &str, script: &str) -> &Self {
            let path = self.dir.path().join("bin").join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            self
        }
        fn dev_kvm(&self) -> &Self {
            std::fs::write(self.dir.path().join("kvm"), b"").unwrap();
            self
        }
        fn probe(&self) -> Probe {
            Probe {
                sys_module: self.dir.path().join("sys/module"),
                dev_kvm: self.dir.path().join("kvm"),
                search_path: vec![self.dir.path().join("bin")],
                virtiofsd_dirs: vec![],
            }
        }
    }

    #[test]
    fn runner_follows_the_selection_with_the_detected_binaries() {
        let facts = HostFacts {
            kvm: KvmKind::Hardware {
                vendor: CpuVendor::Intel,
            },
            dev_kvm: DevKvm::Usable,
            nested: Some(true),
            qemu: Some(Tool {
                path: "/opt/qemu/bin/qemu-system-x86_64".into(),
                version: None,
            }),
            cloud_hypervisor: None,
            virtiofsd: None,
        };
        let qemu_kvm = select(VmmChoice::Auto, AccelChoice::Auto, &facts, false).unwrap();
        let r = runner(&qemu_kvm, &facts);
        assert_eq!((r.name(), r.accel()), ("qemu", "kvm"));
        assert_eq!(r.transport(), crate::vmm::Transport::Mmio);
        let tcg = select(VmmChoice::Qemu, AccelChoice::Tcg, &facts, false).unwrap();
        assert_eq!(runner(&tcg, &facts).accel(), "tcg");
        let ch = Selection {
            vmm: Vmm::CloudHypervisor,
            accel: Accel::Kvm,
            reason: String::new(),
            warning: None,
        };
        let r = runner(&ch, &facts);
        assert_eq!((r.name(), r.accel()), ("cloud-hypervisor", "kvm"));
        assert_eq!(r.transport(), crate::vmm::Transport::Pci);
    }

    #[tokio::test]
    async fn intel_host_with_nested_and_every_tool() {
        let host = FakeHost::new();
        host.module("kvm_intel", Some("Y"))
            .dev_kvm()
            .program("qemu-system-x86_64", "echo 'QEMU emulator version 9.0.0'")
            .program("cloud-hypervisor", "echo 'cloud-hypervisor v41.0'")
            .program("virtiofsd", "echo; echo 'virtiofsd 1.14.0'");
        let facts = HostFacts::detect_with(&host.probe()).await;
        assert_eq!(
            facts.kvm,
            KvmKind::Hardware {
                vendor: CpuVendor::Intel
            }
        );
        assert_eq!(facts.dev_kvm, DevKvm::Usable);
        assert_eq!(facts.nested, Some(true));
        assert_eq!(
            facts.qemu.unwrap().version.as_deref(),
            Some("QEMU emulator version 9.0.0")
        );
        let ch = facts.cloud_hypervisor.unwrap();
        assert_eq!(ch.path, host.dir.path().join("bin/cloud-hypervisor"));
        assert_eq!(ch.version.as_deref(), Some("cloud-hypervisor v41.0"));
        assert_eq!(
            facts.virtiofsd.unwrap().version.as_deref(),
            Some("virtiofsd 1.14.0")
        );
    }

    #[tokio::test]
    async fn amd_host_without_nested_and_a_broken_tool() {
        let host = FakeHost::new();
        host.module("kvm_amd", Some("0"))
            .dev_kvm()
            .program("qemu-system-x86_64", "exit 1");
        let facts = HostFacts::detect_with(&host.probe()).await;
        assert_eq!(
            facts.kvm,
            KvmKind::Hardware {
                vendor: CpuVendor::Amd
            }
        );
        assert_eq!(facts.nested, Some(false));
        let qemu = facts.qemu.unwrap();
        assert_eq!(qemu.version, None, "a failing --version gives no version");
        assert_eq!(facts.cloud_hypervisor, None);
        assert_eq!(facts.virtiofsd, None);
    }

    #[tokio::test]
    async fn pvm_host_has_no_nested_and_missing_dev_kvm_is_seen() {
        let host = FakeHost::new();
        host.module("kvm_pvm", None);
        let facts = HostFacts::detect_with(&host.probe()).await;
        assert_eq!(facts.kvm, KvmKind::Pvm);
        assert_eq!(facts.nested, None);
        assert_eq!(facts.dev_kvm, DevKvm::Missing);
    }

    #[tokio::test]
    async fn no_kvm_module_and_unopenable_dev_kvm() {
        let host = FakeHost::new();
        // A directory cannot be opened read-write: stands in for EACCES.
        std::fs::create_dir(host.dir.path().join("kvm")).unwrap();
        let facts = HostFacts::detect_with(&host.probe()).await;
        assert_eq!(facts.kvm, KvmKind::None);
        assert!(
            matches!(facts.dev_kvm, DevKvm::Unusable(_)),
            "{:?}",
            facts.dev_kvm
        );
    }

    #[test]
    fn non_executable_files_and_directories_are_not_tools() {
        let host = FakeHost::new();
        let probe = host.probe();
        let path = host.dir.path().join("bin/virtiofsd");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(probe.find("virtiofsd"), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(probe.find("virtiofsd"), Some(path));
        std::fs::create_dir(host.dir.path().join("bin/qemu-system-x86_64")).unwrap();
        assert_eq!(probe.find("qemu-system-x86_64"), None);
    }

    /// virtiofsd is looked for on the search path first, then in its own
    /// directories; other tools only on the search path.
    #[test]
    fn virtiofsd_is_found_on_the_path_before_its_own_dirs() {
        let host = FakeHost::new();
        let libexec = host.dir.path().join("libexec");
        std::fs::create_dir(&libexec).unwrap();
        let probe = Probe {
            virtiofsd_dirs: vec![libexec.clone()],
            ..host.probe()
        };
        let exe = |path: &Path| {
            std::fs::write(path, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        exe(&libexec.join("virtiofsd"));
        exe(&libexec.join("cloud-hypervisor"));
        assert_eq!(probe.find("virtiofsd"), Some(libexec.join("virtiofsd")));
        assert_eq!(
            probe.find("cloud-hypervisor"),
            None,
            "libexec is virtiofsd's only"
        );
        host.program("virtiofsd", "true");
        assert_eq!(
            probe.find("virtiofsd"),
            Some(host.dir.path().join("bin/virtiofsd"))
        );
        assert_eq!(
            probe.dirs_for("virtiofsd"),
            [host.dir.path().join("bin"), libexec]
        );
    }

    /// Builds and doctor agree: the binary the builds' lookup returns is the
    /// one detection reports.
    #[tokio::test]
    async fn builds_and_detection_find_the_same_virtiofsd() {
        let facts = HostFacts::detect().await;
        assert_eq!(
            crate::vmm::virtiofsd::find_binary(),
            facts.virtiofsd.map(|t| t.path)
        );
        assert_eq!(
            Probe::system().dirs_for(VIRTIOFSD_BINARY).last(),
            Some(&PathBuf::from("/usr/libexec"))
        );
    }
}
