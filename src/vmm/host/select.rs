//! Choosing the VMM and the acceleration from the operator's flags and the
//! detected [`HostFacts`]: a pure function, so the whole table is tested.
//!
//! `auto` prefers, in order: cloud-hypervisor on hardware KVM (when it is
//! installed), QEMU with KVM, QEMU with TCG (with a warning: software
//! emulation is several times slower). Explicit choices are honoured or
//! refused with the reason; they never silently fall back.

use std::fmt;

use super::{DevKvm, HostFacts, KvmKind};

/// `--vmm`: which VMM to run builds on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VmmChoice {
    /// cloud-hypervisor on hardware KVM when installed, else QEMU.
    #[default]
    Auto,
    /// cloud-hypervisor (needs hardware KVM).
    CloudHypervisor,
    /// QEMU microvm.
    Qemu,
}

/// `--accel`: how the VMM runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when usable, else TCG.
    #[default]
    Auto,
    /// KVM (hardware virtualisation).
    Kvm,
    /// TCG (QEMU's software emulation).
    Tcg,
}

/// A VMM backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// cloud-hypervisor.
    CloudHypervisor,
    /// QEMU microvm.
    Qemu,
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Qemu => "qemu",
        })
    }
}

/// How guest code runs: the one acceleration type, chosen here and used by
/// the QEMU backend (`-accel`, `-cpu`); cloud-hypervisor is always KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (works everywhere, slower).
    Tcg,
}

impl Accel {
    /// The name QEMU and kiln's flags use (`kvm`, `tcg`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What builds will run on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The VMM.
    pub vmm: Vmm,
    /// The acceleration.
    pub accel: Accel,
    /// One sentence on why this was picked.
    pub reason: String,
    /// Set when `auto` had to fall back to something slow.
    pub warning: Option<String>,
}

impl Selection {
    /// Whether builds can be given `/dev/kvm` (nested virtualisation). Under
    /// TCG the emulated CPU offers VMX/SVM itself; under KVM the host module
    /// must allow nesting.
    pub fn nested_available(&self, facts: &HostFacts) -> bool {
        match self.accel {
            Accel::Tcg => true,
            Accel::Kvm => facts.nested == Some(true),
        }
    }
}

/// Why hardware KVM cannot be used on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKvm {
    /// No KVM vendor module is loaded.
    NoModule,
    /// `/dev/kvm` is PVM and the configured guest kernel is a stock one.
    PvmStockKernel,
    /// `/dev/kvm` does not exist.
    DevKvmMissing,
    /// `/dev/kvm` exists but does not open: the OS error.
    DevKvmUnusable(String),
}

impl fmt::Display for NoKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoModule => {
                f.write_str("no KVM module is loaded (neither kvm_intel nor kvm_amd)")
            }
            Self::PvmStockKernel => f.write_str(
                "/dev/kvm is served by kvm_pvm, which only runs PVM-enabled guest kernels, \
                 and the configured guest kernel is a stock one",
            ),
            Self::DevKvmMissing => f.write_str("/dev/kvm does not exist"),
            Self::DevKvmUnusable(e) => write!(f, "/dev/kvm cannot be opened ({e})"),
        }
    }
}

/// An explicit choice this host cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The flags ask for KVM, the host has none usable.
    #[error("{flag} needs hardware KVM, but {why}; use --vmm qemu --accel tcg (or auto) instead")]
    NeedsKvm {
        /// The flag that asked for it (`--vmm cloud-hypervisor`, `--accel kvm`).
        flag: &'static str,
        /// Why there is none.
        why: NoKvm,
    },
    /// cloud-hypervisor has no software emulation.
    #[error(
        "--vmm cloud-hypervisor --accel tcg cannot work: cloud-hypervisor only runs on KVM; \
         use --vmm qemu for TCG"
    )]
    CloudHypervisorTcg,
    /// The chosen (or only possible) VMM is not installed.
    #[error("{vmm} is needed but not installed: {hint}")]
    NotInstalled {
        /// The missing VMM.
        vmm: Vmm,
        /// How to get it.
        hint: &'static str,
    },
}

const QEMU_HINT: &str = "apt-get install qemu-system-x86 (or run `make deps`)";
const CH_HINT: &str = "install a cloud-hypervisor release binary on PATH \
                       (it is not packaged in Debian), or use --vmm qemu";

/// Whether hardware KVM can run this deployment's guest kernel here.
/// `kernel_is_pvm`: the configured guest kernel is PVM-enabled.
pub fn kvm_usable(facts: &HostFacts, kernel_is_pvm: bool) -> Result<(), NoKvm> {
    match facts.kvm {
        KvmKind::None => return Err(NoKvm::NoModule),
        KvmKind::Pvm if !kernel_is_pvm => return Err(NoKvm::PvmStockKernel),
        KvmKind::Pvm | KvmKind::Hardware { .. } => {}
    }
    match &facts.dev_kvm {
        DevKvm::Usable => Ok(()),
        DevKvm::Missing => Err(NoKvm::DevKvmMissing),
        DevKvm::Unusable(e) => Err(NoKvm::DevKvmUnusable(e.clone())),
    }
}

/// Picks the VMM and acceleration for `vmm`/`accel` on the host `facts`
/// describes. `kernel_is_pvm`: the configured guest kernel is PVM-enabled
/// (only then does a PVM `/dev/kvm` count as KVM).
pub fn select(
    vmm: VmmChoice,
    accel: AccelChoice,
    facts: &HostFacts,
    kernel_is_pvm: bool,
) -> Result<Selection, SelectError> {
    let kvm = kvm_usable(facts, kernel_is_pvm);
    let has_ch = facts.cloud_hypervisor.is_some();
    let has_qemu = facts.qemu.is_some();
    let need_qemu = || -> Result<(), SelectError> {
        if has_qemu {
            Ok(())
        } else {
            Err(SelectError::NotInstalled {
                vmm: Vmm::Qemu,
                hint: QEMU_HINT,
            })
        }
    };
    let pick = |vmm, accel, reason: String, warning| Selection {
        vmm,
        accel,
        reason,
        warning,
    };
    let kvm_reason = || format!("KVM is usable ({})", facts.kvm);

    match (vmm, accel) {
        (VmmChoice::CloudHypervisor, AccelChoice::Tcg) => Err(SelectError::CloudHypervisorTcg),
        (VmmChoice::CloudHypervisor, AccelChoice::Auto | AccelChoice::Kvm) => {
            kvm.map_err(|why| SelectError::NeedsKvm {
                flag: "--vmm cloud-hypervisor",
                why,
            })?;
            if !has_ch {
                return Err(SelectError::NotInstalled {
                    vmm: Vmm::CloudHypervisor,
                    hint: CH_HINT,
                });
            }
            Ok(pick(
                Vmm::CloudHypervisor,
                Accel::Kvm,
                format!("--vmm cloud-hypervisor was asked for and {}", kvm_reason()),
                None,
            ))
        }
        (VmmChoice::Qemu | VmmChoice::Auto, AccelChoice::Tcg) => {
            need_qemu()?;
            Ok(pick(
                Vmm::Qemu,
                Accel::Tcg,
                "--accel tcg was asked for; only QEMU emulates".into(),
                None,
            ))
        }
        (VmmChoice::Qemu, AccelChoice::Kvm) => {
            kvm.map_err(|why| SelectError::NeedsKvm {
                flag: "--accel kvm",
                why,
            })?;
            need_qemu()?;
            Ok(pick(
                Vmm::Qemu,
                Accel::Kvm,
                format!("--vmm qemu --accel kvm was asked for and {}", kvm_reason()),
                None,
            ))
        }
        (VmmChoice::Auto, AccelChoice::Kvm) => {
            kvm.map_err(|why| SelectError::NeedsKvm {
                flag: "--accel kvm",
                why,
            })?;
            if has_ch {
                Ok(pick(
                    Vmm::CloudHypervisor,
                    Accel::Kvm,
                    format!("{} and cloud-hypervisor is installed", kvm_reason()),
                    None,
                ))
            } else {
                need_qemu()?;
                Ok(pick(
                    Vmm::Qemu,
                    Accel::Kvm,
                    format!("{}; cloud-hypervisor is not installed", kvm_reason()),
                    None,
                ))
            }
        }
        (VmmChoice::Auto | VmmChoice::Qemu, AccelChoice::Auto) => match kvm {
            Ok(()) if has_ch && vmm == VmmChoice::Auto => Ok(pick(
                Vmm::CloudHypervisor,
                Accel::Kvm,
                format!("{} and cloud-hypervisor is installed", kvm_reason()),
                None,
            )),
            Ok(()) => {
                need_qemu()?;
                let why = if vmm == VmmChoice::Qemu {
                    format!("--vmm qemu was asked for and {}", kvm_reason())
                } else {
                    format!("{}; cloud-hypervisor is not installed", kvm_reason())
                };
                Ok(pick(Vmm::Qemu, Accel::Kvm, why, None))
            }
            Err(why) => {
                need_qemu()?;
                Ok(pick(
                    Vmm::Qemu,
                    Accel::Tcg,
                    format!("no usable hardware KVM: {why}"),
                    Some(format!(
                        "builds run under QEMU's software emulation (TCG), several times \
                         slower than KVM, because {why}"
                    )),
                ))
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::vmm::host::{CpuVendor, Tool};

    fn tool(name: &str) -> Option<Tool> {
        Some(Tool {
            path: format!("/usr/bin/{name}").into(),
            version: None,
        })
    }

    fn host(kvm: KvmKind, dev_kvm: DevKvm, ch: bool, qemu: bool) -> HostFacts {
        HostFacts {
            kvm,
            dev_kvm,
            nested: None,
            qemu: qemu.then(|| tool("qemu-system-x86_64")).flatten(),
            cloud_hypervisor: ch.then(|| tool("cloud-hypervisor")).flatten(),
            virtiofsd: tool("virtiofsd"),
        }
    }

    const INTEL: KvmKind = KvmKind::Hardware {
        vendor: CpuVendor::Intel,
    };

    /// The outcome in a few characters: `ch/kvm`, `qemu/tcg!` (`!` = warned),
    /// or the error: `E:kvm`, `E:ch-tcg`, `E:no-ch`, `E:no-qemu`.
    fn code(outcome: Result<Selection, SelectError>) -> String {
        match outcome {
            Ok(s) => {
                let vmm = match s.vmm {
                    Vmm::CloudHypervisor => "ch",
                    Vmm::Qemu => "qemu",
                };
                let warned = if s.warning.is_some() { "!" } else { "" };
                format!("{vmm}/{}{warned}", s.accel)
            }
            Err(SelectError::NeedsKvm { .. }) => "E:kvm".into(),
            Err(SelectError::CloudHypervisorTcg) => "E:ch-tcg".into(),
            Err(SelectError::NotInstalled {
                vmm: Vmm::CloudHypervisor,
                ..
            }) => "E:no-ch".into(),
            Err(SelectError::NotInstalled { vmm: Vmm::Qemu, .. }) => "E:no-qemu".into(),
        }
    }

    /// Every flag combination on every kind of host. Columns, in order:
    /// vmm auto/auto-kvm/auto-tcg, cloud-hypervisor auto/kvm/tcg, qemu auto/kvm/tcg.
    #[test]
    fn the_whole_selection_table() {
        use AccelChoice as A;
        use VmmChoice as V;
        let flags = [
            (V::Auto, A::Auto),
            (V::Auto, A::Kvm),
            (V::Auto, A::Tcg),
            (V::CloudHypervisor, A::Auto),
            (V::CloudHypervisor, A::Kvm),
            (V::CloudHypervisor, A::Tcg),
            (V::Qemu, A::Auto),
            (V::Qemu, A::Kvm),
            (V::Qemu, A::Tcg),
        ];
        let ok = || DevKvm::Usable;
        #[rustfmt::skip]
        let table: Vec<(&str, HostFacts, bool, [&str; 9])> = vec![
            ("hardware, both VMMs", host(INTEL, ok(), true, true), false,
             ["ch/kvm", "ch/kvm", "qemu/tcg", "ch/kvm", "ch/kvm", "E:ch-tcg", "qemu/kvm", "qemu/kvm", "qemu/tcg"]),
            ("hardware, QEMU only", host(INTEL, ok(), false, true), false,
             ["qemu/kvm", "qemu/kvm", "qemu/tcg", "E:no-ch", "E:no-ch", "E:ch-tcg", "qemu/kvm", "qemu/kvm", "qemu/tcg"]),
            ("hardware, cloud-hypervisor only", host(INTEL, ok(), true, false), false,
             ["ch/kvm", "ch/kvm", "E:no-qemu", "ch/kvm", "ch/kvm", "E:ch-tcg", "E:no-qemu", "E:no-qemu", "E:no-qemu"]),
            ("hardware, no VMM", host(INTEL, ok(), false, false), false,
             ["E:no-qemu", "E:no-qemu", "E:no-qemu", "E:no-ch", "E:no-ch", "E:ch-tcg", "E:no-qemu", "E:no-qemu", "E:no-qemu"]),
            ("hardware, /dev/kvm denied", host(INTEL, DevKvm::Unusable("EACCES".into()), true, true), false,
             ["qemu/tcg!", "E:kvm", "qemu/tcg", "E:kvm", "E:kvm", "E:ch-tcg", "qemu/tcg!", "E:kvm", "qemu/tcg"]),
            ("PVM, stock kernel", host(KvmKind::Pvm, ok(), true, true), false,
             ["qemu/tcg!", "E:kvm", "qemu/tcg", "E:kvm", "E:kvm", "E:ch-tcg", "qemu/tcg!", "E:kvm", "qemu/tcg"]),
            ("PVM, PVM kernel", host(KvmKind::Pvm, ok(), true, true), true,
             ["ch/kvm", "ch/kvm", "qemu/tcg", "ch/kvm", "ch/kvm", "E:ch-tcg", "qemu/kvm", "qemu/kvm", "qemu/tcg"]),
            ("PVM, PVM kernel, QEMU only", host(KvmKind::Pvm, ok(), false, true), true,
             ["qemu/kvm", "qemu/kvm", "qemu/tcg", "E:no-ch", "E:no-ch", "E:ch-tcg", "qemu/kvm", "qemu/kvm", "qemu/tcg"]),
            ("no KVM", host(KvmKind::None, DevKvm::Missing, true, true), false,
             ["qemu/tcg!", "E:kvm", "qemu/tcg", "E:kvm", "E:kvm", "E:ch-tcg", "qemu/tcg!", "E:kvm", "qemu/tcg"]),
            ("no KVM, no VMM", host(KvmKind::None, DevKvm::Missing, false, false), false,
             ["E:no-qemu", "E:kvm", "E:no-qemu", "E:kvm", "E:kvm", "E:ch-tcg", "E:no-qemu", "E:kvm", "E:no-qemu"]),
        ];
        let mut wrong = Vec::new();
        for (name, facts, pvm_kernel, expected) in &table {
            for ((vmm, accel), want) in flags.iter().zip(expected) {
                let got = code(select(*vmm, *accel, facts, *pvm_kernel));
                if got != *want {
                    wrong.push(format!(
                        "{name}: --vmm {vmm:?} --accel {accel:?}: got {got}, want {want}"
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn pvm_refusals_and_warnings_say_why() {
        let pvm = host(KvmKind::Pvm, DevKvm::Usable, true, true);
        let err = select(VmmChoice::Auto, AccelChoice::Kvm, &pvm, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("--accel kvm needs hardware KVM, but /dev/kvm is served by kvm_pvm"),
            "{msg}"
        );
        assert!(msg.contains("use --vmm qemu --accel tcg"), "{msg}");

        let err = select(VmmChoice::CloudHypervisor, AccelChoice::Auto, &pvm, false).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--vmm cloud-hypervisor needs hardware KVM"),
            "{err}"
        );

        let auto = select(VmmChoice::Auto, AccelChoice::Auto, &pvm, false).unwrap();
        let warning = auto.warning.unwrap();
        assert!(warning.contains("TCG"), "{warning}");
        assert!(warning.contains("kvm_pvm"), "{warning}");
        assert!(
            auto.reason.contains("no usable hardware KVM"),
            "{}",
            auto.reason
        );
    }

    #[test]
    fn missing_tools_say_how_to_get_them() {
        let bare = host(INTEL, DevKvm::Usable, false, false);
        let err = select(VmmChoice::Qemu, AccelChoice::Tcg, &bare, false).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install qemu-system-x86"),
            "{err}"
        );
        let err = select(VmmChoice::CloudHypervisor, AccelChoice::Kvm, &bare, false).unwrap_err();
        assert!(err.to_string().contains("not packaged in Debian"), "{err}");
    }

    #[test]
    fn nested_follows_the_module_under_kvm_and_is_free_under_tcg() {
        let mut facts = host(INTEL, DevKvm::Usable, false, true);
        let kvm = select(VmmChoice::Qemu, AccelChoice::Kvm, &facts, false).unwrap();
        let tcg = select(VmmChoice::Qemu, AccelChoice::Tcg, &facts, false).unwrap();
        facts.nested = Some(false);
        assert!(!kvm.nested_available(&facts));
        assert!(tcg.nested_available(&facts));
        facts.nested = Some(true);
        assert!(kvm.nested_available(&facts));
        facts.nested = None;
        assert!(!kvm.nested_available(&facts));
    }
}
