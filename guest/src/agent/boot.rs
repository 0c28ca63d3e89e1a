//! The agent's own environment, before any sandbox: the pseudo filesystems,
//! the kernel modules the job names, `/dev/kvm` when asked, and the virtiofs
//! shares under `/kiln/shares`.

use std::fs::File;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use kiln_guest::contract::{INPUTS_TAG, MODULES_DIR, SCRATCH_TAG};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

use super::error::{early_mount, kvm, AgentError, Step};

/// Mount point of [`INPUTS_TAG`].
pub const INPUTS_MNT: &str = "/kiln/shares/inputs";
/// Mount point of [`SCRATCH_TAG`].
pub const SCRATCH_MNT: &str = "/kiln/shares/scratch";

/// How long a share's tag may take to appear after its driver loaded.
const SHARE_WAIT: Duration = Duration::from_secs(3);

/// Mounts /proc, /sys and /dev (devtmpfs) for the agent.
pub fn early_mounts() -> Result<(), AgentError> {
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        std::fs::create_dir_all(target).step(early_mount, || format!("creating {target}"))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        match mount(Some(fstype), target, Some(fstype), flags, None::<&str>) {
            // The kernel may have mounted devtmpfs itself (CONFIG_DEVTMPFS_MOUNT).
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(early_mount(format!("{fstype} on {target}"), e.into())),
        }
    }
    Ok(())
}

/// Loads `names` from [`MODULES_DIR`], in order. Each module's own
/// dependencies (its `depends=` modinfo) are loaded first, so a list in the
/// wrong order still works. A module already loaded or built in is fine.
pub fn load_modules<S: AsRef<str>>(names: &[S]) -> Result<(), AgentError> {
    let mut loaded = Vec::new();
    for name in names {
        load_module(name.as_ref(), &mut loaded, 0)?;
    }
    Ok(())
}

/// Best effort to reach the host channel when the job's own module list
/// could not be used: the console over either virtio transport, whichever
/// this VM has. Failures are ignored; the report is what matters now.
pub fn load_console_fallback() {
    for transport in ["virtio_mmio", "virtio_pci"] {
        let _ = load_modules(&[transport, "virtio_console"]);
    }
}

fn load_module(name: &str, loaded: &mut Vec<String>, depth: usize) -> Result<(), AgentError> {
    if loaded.iter().any(|m| m == name) {
        return Ok(());
    }
    let path = format!("{MODULES_DIR}/{name}.ko");
    let fail = |source: std::io::Error| AgentError::Module {
        name: name.to_string(),
        path: path.clone(),
        source,
    };
    if depth > 16 {
        return Err(fail(std::io::Error::other(
            "module dependencies nest too deep (a cycle?)",
        )));
    }
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        // A kernel without module support (kernels/minimal.config) has all
        // of them built in; there is nothing to load.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && !Path::new("/proc/modules").exists() =>
        {
            loaded.push(name.to_string());
            return Ok(());
        }
        Err(e) => return Err(fail(e)),
    };
    for dep in depends(&bytes) {
        load_module(&dep, loaded, depth + 1)?;
    }
    let file = File::open(&path).map_err(fail)?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(fail(e.into())),
    }
    loaded.push(name.to_string());
    Ok(())
}

/// The module names in a `.ko`'s `depends=` modinfo entry.
pub fn depends(ko: &[u8]) -> Vec<String> {
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

/// Makes `/dev/kvm` available: loads irqbypass, kvm and the vendor module
/// matching the CPU's virtualisation flag, unless KVM is already there
/// (built in). Returns the device's `major:minor`.
pub fn enable_kvm() -> Result<(u64, u64), AgentError> {
    const DEV: &str = "/sys/class/misc/kvm/dev";
    if !Path::new(DEV).exists() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
            .step(kvm, || "reading /proc/cpuinfo".into())?;
        let vendor = vendor_module(&cpuinfo).ok_or_else(|| AgentError::Kvm {
            what: "/dev/kvm was asked for".into(),
            source: std::io::Error::other("the guest CPU has neither svm nor vmx (was the VM started with nested virtualisation?)"),
        })?;
        load_modules(&["irqbypass", "kvm", vendor])?;
    }
    let dev = std::fs::read_to_string(DEV).step(kvm, || format!("reading {DEV}"))?;
    parse_dev(&dev).ok_or_else(|| AgentError::Kvm {
        what: format!("parsing {DEV}"),
        source: std::io::Error::other(format!("unexpected contents {dev:?}")),
    })
}

/// `kvm_amd` for `svm`, `kvm_intel` for `vmx`, from /proc/cpuinfo's flags.
pub fn vendor_module(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let mut words = flags.split_whitespace();
    if words.clone().any(|w| w == "svm") {
        Some("kvm_amd")
    } else if words.any(|w| w == "vmx") {
        Some("kvm_intel")
    } else {
        None
    }
}

/// Parses `MAJOR:MINOR\n`.
pub fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Mounts the inputs share read-only and the scratch share read-write.
pub fn mount_shares() -> Result<(), AgentError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_virtiofs(INPUTS_TAG, INPUTS_MNT, nosuid | MsFlags::MS_RDONLY)?;
    mount_virtiofs(SCRATCH_TAG, SCRATCH_MNT, nosuid)
}

/// Mounts the virtiofs share `tag` at `target` (an agent path, created if
/// missing); see [`mount_virtiofs_on`].
pub fn mount_virtiofs(tag: &str, target: &str, flags: MsFlags) -> Result<(), AgentError> {
    std::fs::create_dir_all(target).map_err(|source| AgentError::Share {
        tag: tag.into(),
        target: target.into(),
        source,
    })?;
    mount_virtiofs_on(tag, target, target, flags)
}

/// Mounts the virtiofs share `tag` on `target` (which must exist; inside
/// the sandbox a `/proc/self/fd/N` path, shown in errors as `shown`),
/// waiting briefly for the tag to be registered (the device probe may still
/// be running).
pub fn mount_virtiofs_on(
    tag: &str,
    target: &str,
    shown: &str,
    flags: MsFlags,
) -> Result<(), AgentError> {
    let fail = |source: std::io::Error| AgentError::Share {
        tag: tag.into(),
        target: shown.into(),
        source,
    };
    let start = Instant::now();
    loop {
        match mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>) {
            Ok(()) => return Ok(()),
            Err(Errno::ENOENT | Errno::ENODEV) if start.elapsed() < SHARE_WAIT => {
                sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(fail(e.into())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn picks_the_vendor_module_from_cpu_flags() {
        assert_eq!(
            vendor_module("processor: 0\nflags\t\t: fpu svm lm\n"),
            Some("kvm_amd")
        );
        assert_eq!(vendor_module("flags\t\t: fpu vmx\n"), Some("kvm_intel"));
        assert_eq!(vendor_module("flags\t\t: fpu svmx\n"), None);
        assert_eq!(vendor_module(""), None);
    }

    #[test]
    fn reads_dependencies_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0name=virtiofs\0";
        assert_eq!(
            depends(ko),
            vec!["virtio".to_string(), "virtio_ring".to_string()]
        );
        assert!(depends(b"\0depends=\0name=fuse\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
    }

    #[test]
    fn parses_device_numbers() {
        assert_eq!(parse_dev("10:232\n"), Some((10, 232)));
        assert_eq!(parse_dev("10"), None);
    }
}
