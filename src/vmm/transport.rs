//! How a VM's virtio devices reach the guest, and the kernel modules the
//! guest loads for them.
//!
//! QEMU's microvm puts its devices on virtio-mmio, cloud-hypervisor on
//! virtio-pci; everything above the transport (the console the agent talks
//! on, fuse and virtiofs for the shares) is the same. This is the one list of
//! guest modules: each runner names its [`Transport`]
//! (`VmRunner::transport`), the executor puts that transport's modules in
//! the job, `kiln doctor` checks the guest kernel has them, the bench's bare
//! boot loads them, and a test below checks that `kernels/debian-cloud.sh`
//! installs every one. (Nested virtualisation's `irqbypass`, `kvm` and
//! `kvm_intel`/`kvm_amd` are the agent's own business: it loads them only
//! when a build asks for `/dev/kvm`.)

use std::fmt;

/// A virtio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// virtio-mmio: devices at fixed addresses the VMM puts on the kernel
    /// command line (QEMU microvm).
    Mmio,
    /// virtio-pci: devices on a PCI bus (cloud-hypervisor).
    Pci,
}

/// virtio over mmio, fuse and virtiofs, the console; see [`Transport::guest_modules`].
const MMIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "fuse",
    "virtiofs",
    "virtio_console",
];

/// virtio over pci, fuse and virtiofs, the console; see [`Transport::guest_modules`].
const PCI_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
    "virtio_console",
];

impl Transport {
    /// Every transport.
    pub const ALL: [Self; 2] = [Self::Mmio, Self::Pci];

    /// The kernel modules a guest on this transport loads, in load order:
    /// each comes after every module its `depends=` names (`virtio` needs
    /// `virtio_ring`; `virtio_pci` needs both `virtio_pci_*_dev`; `virtiofs`
    /// needs `fuse`), so loading them one by one in this order works even
    /// without the agent's own dependency resolution.
    pub const fn guest_modules(self) -> &'static [&'static str] {
        match self {
            Self::Mmio => MMIO_MODULES,
            Self::Pci => PCI_MODULES,
        }
    }

    /// `mmio` or `pci`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtio-{}", self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use std::path::Path;

    use super::*;

    /// The `MODULES=( ... )` array of `kernels/debian-cloud.sh`, in order.
    fn script_modules() -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/debian-cloud.sh");
        let script = std::fs::read_to_string(&path).unwrap();
        let start = script
            .find("\nMODULES=(")
            .unwrap_or_else(|| panic!("no MODULES=( array in {}", path.display()));
        let body = &script[start + "\nMODULES=(".len()..];
        let end = body.find(')').unwrap();
        body[..end].split_whitespace().map(str::to_owned).collect()
    }

    /// The kernel package step installs exactly what the guests load: every
    /// module of every transport is in the script's list, and in the same
    /// relative order (the script checks its list against the modules'
    /// `depends=`, so that order is a valid load order).
    #[test]
    fn kernel_script_installs_every_module_of_both_transports_in_load_order() {
        let installed = script_modules();
        assert!(installed.len() >= 8, "parsed {installed:?}");
        for transport in Transport::ALL {
            let positions: Vec<usize> = transport
                .guest_modules()
                .iter()
                .map(|m| {
                    installed.iter().position(|i| i == m).unwrap_or_else(|| {
                        panic!(
                            "{transport} needs {m}, which kernels/debian-cloud.sh does not install \
                             (its MODULES: {installed:?})"
                        )
                    })
                })
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "{transport} loads {:?}, in another order than kernels/debian-cloud.sh's {installed:?}",
                transport.guest_modules()
            );
        }
    }

    #[test]
    fn the_lists_differ_in_the_transport_modules_only() {
        let mmio = Transport::Mmio.guest_modules();
        let pci = Transport::Pci.guest_modules();
        assert!(mmio.contains(&"virtio_mmio") && !mmio.contains(&"virtio_pci"));
        assert!(pci.contains(&"virtio_pci") && !pci.contains(&"virtio_mmio"));
        let common = |list: &[&'static str]| -> Vec<&'static str> {
            list.iter()
                .copied()
                .filter(|m| !m.starts_with("virtio_mmio") && !m.starts_with("virtio_pci"))
                .collect()
        };
        assert_eq!(
            common(mmio),
            [
                "virtio_ring",
                "virtio",
                "fuse",
                "virtiofs",
                "virtio_console"
            ]
        );
        assert_eq!(common(pci), common(mmio));
        assert_eq!(Transport::Pci.to_string(), "virtio-pci");
    }

    /// The module names in a `.ko`'s `depends=` modinfo entry.
    fn depends(ko: &[u8]) -> Vec<String> {
        const KEY: &[u8] = b"\0depends=";
        let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
            return Vec::new();
        };
        let rest = &ko[at + KEY.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end])
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect()
    }

    /// Against the installed guest kernel (`make kernel`): every dependency
    /// of every listed module is listed, and earlier.
    #[test]
    fn each_module_comes_after_its_dependencies_in_the_installed_kernel() {
        let dir = Path::new(crate::guest_image::DEBIAN_KERNEL_DIR).join("modules");
        if !dir.is_dir() {
            test_skip!(
                "each_module_comes_after_its_dependencies_in_the_installed_kernel, \
                 because {} does not exist (make kernel)",
                dir.display()
            );
            return;
        }
        for transport in Transport::ALL {
            let list = transport.guest_modules();
            for (i, m) in list.iter().enumerate() {
                let ko = std::fs::read(dir.join(format!("{m}.ko"))).unwrap();
                for dep in depends(&ko) {
                    let at = list.iter().position(|l| *l == dep);
                    assert!(
                        at.is_some_and(|at| at < i),
                        "{transport}: {m} depends on {dep}, which is not listed before it in {list:?}"
                    );
                }
            }
        }
    }
}
