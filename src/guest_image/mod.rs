//! What a build VM boots: the kernel artifacts and the initramfs.
//!
//! - [`Artifacts`]: where the kernel (`vmlinux`), its modules, the agent and
//!   the static shell live; [`Artifacts::locate`] checks them and names the
//!   `make` target that produces a missing one.
//! - [`base_image`]: the agent as `/init`, the modules and the shell, written
//!   once as a cpio archive and cached under its content hash.
//! - [`build_initramfs`]: per build, the base image followed by a small
//!   archive holding the job (Linux unpacks concatenated archives).
//!
//! The archives are written by [`cpio`], in Rust: nothing here runs a shell
//! tool.

pub mod cpio;
mod image;

use std::path::{Path, PathBuf};

pub use image::{
    base_image, build_initramfs, build_warm_initramfs, job_archive, strip_module_signature,
};

/// Where `make kernel` puts kiln's own kernel (`kernels/build-kiln.sh`),
/// the default.
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/kiln/kernel-kiln";
/// Where `make kernel` puts the Debian cloud kernel and its modules
/// (`kernels/debian-cloud.sh`), the fallback.
pub const DEBIAN_KERNEL_DIR: &str = "/var/cache/kiln/kernel-debian";
/// The environment variable `kiln` reads for `--kernel` (and the test
/// suite and bench for the kernel they boot).
pub const KERNEL_ENV: &str = "KILN_KERNEL";

/// Which guest kernel a kiln boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    /// kiln's own: allnoconfig plus `kernels/kiln.config`, no modules
    /// (`<cache>/kernel-kiln`).
    Kiln,
    /// Debian's cloud kernel and the modules kiln loads
    /// (`<cache>/kernel-debian`).
    DebianCloud,
    /// A kernel directory of the same layout.
    Dir(PathBuf),
}

impl KernelChoice {
    /// `kiln`, `debian-cloud`, or a directory (anything with a `/`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "kiln" => Ok(Self::Kiln),
            "debian-cloud" => Ok(Self::DebianCloud),
            dir if dir.contains('/') => Ok(Self::Dir(PathBuf::from(dir))),
            other => Err(format!(
                "unknown kernel {other:?}: expected kiln, debian-cloud or a directory path"
            )),
        }
    }

    /// [`KERNEL_ENV`] when set, else [`KernelChoice::Kiln`].
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(KERNEL_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map_err(|e| format!("{KERNEL_ENV}: {e}")),
            _ => Ok(Self::Kiln),
        }
    }

    /// The kernel directory below kiln's cache directory.
    pub fn dir(&self, cache_dir: &Path) -> PathBuf {
        match self {
            Self::Kiln => cache_dir.join("kernel-kiln"),
            Self::DebianCloud => cache_dir.join("kernel-debian"),
            Self::Dir(dir) => dir.clone(),
        }
    }
}
/// Where `make agent` installs the static agent.
pub const DEFAULT_AGENT: &str = "/var/cache/kiln/agent/kiln-agent";
/// The static busybox of Debian's `busybox-static`.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Errors of this module, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    /// A required artifact is not where it should be.
    #[error("{what} not found at {path} (run `{make}` to create it)")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The command that produces it.
        make: &'static str,
    },
    /// Reading an artifact failed.
    #[error("reading {path}")]
    ReadArtifact {
        /// The artifact.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing an archive failed.
    #[error("writing {path}")]
    WriteImage {
        /// The archive being written.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The job could not be encoded.
    #[error("encoding the job")]
    EncodeJob(#[source] serde_json::Error),
}

/// The files a build VM is made of. Defaults are the well-known cache paths
/// the Makefile fills; each can be overridden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// Directory with `vmlinux`, `modules/<name>.ko` and `VERSION`.
    pub kernel_dir: PathBuf,
    /// The static guest agent binary.
    pub agent: PathBuf,
    /// A static busybox, provided as `/bin/sh` when a build asks for it.
    pub busybox: PathBuf,
}

impl Default for Artifacts {
    fn default() -> Self {
        Self {
            kernel_dir: DEFAULT_KERNEL_DIR.into(),
            agent: DEFAULT_AGENT.into(),
            busybox: DEFAULT_BUSYBOX.into(),
        }
    }
}

impl Artifacts {
    /// The artifacts under one cache directory (kiln's kernel in
    /// `<dir>/kernel-kiln`, `<dir>/agent/kiln-agent`), with the default busybox.
    pub fn in_cache_dir(dir: &Path) -> Self {
        Self {
            kernel_dir: KernelChoice::Kiln.dir(dir),
            agent: dir.join("agent/kiln-agent"),
            busybox: DEFAULT_BUSYBOX.into(),
        }
    }

    /// The defaults with the kernel [`KERNEL_ENV`] names, as `kiln serve`
    /// picks it without `--kernel` (the test suite and the bench boot this).
    pub fn from_env() -> Result<Self, String> {
        let cache = Path::new(crate::executor::config::defaults::CACHE_DIR);
        Ok(Self {
            kernel_dir: KernelChoice::from_env()?.dir(cache),
            ..Self::default()
        })
    }

    /// Which kind of kernel [`Artifacts::kernel_dir`] holds, from its
    /// `VERSION` (written by `kernels/build-kiln.sh` or `debian-cloud.sh`).
    pub fn kernel_kind(&self) -> &'static str {
        match self.kernel_version() {
            Some(v) if v.split_whitespace().nth(2) == Some("kiln") => {
                "kiln's own (allnoconfig + kernels/kiln.config, no modules)"
            }
            Some(v) if v.starts_with("linux-image-") => "the Debian cloud kernel (fallback)",
            Some(_) => "an operator-supplied kernel",
            None => "unknown (no VERSION file)",
        }
    }

    /// The PVH kernel.
    pub fn vmlinux(&self) -> PathBuf {
        self.kernel_dir.join("vmlinux")
    }

    /// The directory of flat `<name>.ko` modules.
    pub fn modules_dir(&self) -> PathBuf {
        self.kernel_dir.join("modules")
    }

    /// The kernel's version line (`<package> <version>`), if recorded.
    pub fn kernel_version(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.kernel_dir.join("VERSION")).ok()?;
        Some(text.trim().to_string())
    }

    /// Checks that every artifact exists; the error names the first missing
    /// one and the make target that creates it.
    pub fn locate(&self) -> Result<(), GuestImageError> {
        let checks: [(&'static str, PathBuf, &'static str); 4] = [
            ("guest kernel", self.vmlinux(), "make kernel"),
            ("guest kernel modules", self.modules_dir(), "make kernel"),
            ("guest agent", self.agent.clone(), "make agent"),
            (
                "static busybox",
                self.busybox.clone(),
                "make apt (busybox-static)",
            ),
        ];
        for (what, path, make) in checks {
            if !path.exists() {
                return Err(GuestImageError::Missing { what, path, make });
            }
        }
        Ok(())
    }

    /// Lines for `kiln doctor`: each artifact, where it is and what it is.
    pub fn describe(&self) -> Vec<String> {
        let size = |p: &Path| match std::fs::metadata(p) {
            Ok(m) => format!("{} ({:.1} MiB)", p.display(), m.len() as f64 / 1048576.0),
            Err(_) => format!("{} MISSING", p.display()),
        };
        let modules = match std::fs::read_dir(self.modules_dir()) {
            Ok(dir) => {
                let mut names: Vec<String> = dir
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".ko")
                            .map(str::to_string)
                    })
                    .collect();
                names.sort();
                format!("{} [{}]", self.modules_dir().display(), names.join(" "))
            }
            Err(_) => format!(
                "{} MISSING (run `make kernel`)",
                self.modules_dir().display()
            ),
        };
        vec![
            format!("kernel:  {}", size(&self.vmlinux())),
            format!(
                "         version {}",
                self.kernel_version().unwrap_or_else(|| "unknown".into())
            ),
            format!("         {}", self.kernel_kind()),
            format!("modules: {modules}"),
            format!("agent:   {}", size(&self.agent)),
            format!("busybox: {}", size(&self.busybox)),
        ]
    }
}

/// The kernel command line for build VMs: kernel messages on the serial
/// port (the agent's channel is a virtio port, see `kiln_guest::contract`),
/// a panic ends the VM at once (with the VMM's no-reboot), warnings and worse
/// only (serial output is slow under emulation), and no time spent on absent
/// hardware.
///
/// Under TCG the QEMU backend appends `tsc_early_khz=<host TSC rate>`
/// (measured, see `vmm::qemu::host_tsc_khz`): microvm has no HPET or PM
/// timer, so the TSC is the guest's only clocksource and must run at its
/// true rate; a fixed guess would make guest time run fast or slow.
pub fn kernel_cmdline() -> String {
    [
        "console=ttyS0",
        "loglevel=4",
        "panic=-1",
        "reboot=t",
        "rdinit=/init",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "tsc=reliable",
        "no_timer_check",
        "random.trust_cpu=on",
    ]
    .join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn locate_names_the_missing_file_and_its_make_target() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::in_cache_dir(dir.path());
        let err = a.locate().unwrap_err().to_string();
        assert!(
            err.contains("guest kernel") && err.contains("vmlinux") && err.contains("make kernel"),
            "{err}"
        );
        std::fs::create_dir_all(a.modules_dir()).unwrap();
        std::fs::write(a.vmlinux(), b"elf").unwrap();
        let err = a.locate().unwrap_err().to_string();
        assert!(
            err.contains("kiln-agent") && err.contains("make agent"),
            "{err}"
        );
    }

    #[test]
    fn describe_reports_missing_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let lines = Artifacts::in_cache_dir(dir.path()).describe().join("\n");
        assert!(lines.contains("vmlinux MISSING"), "{lines}");
        assert!(lines.contains("make kernel"), "{lines}");
    }

    #[test]
    fn cmdline_keeps_the_kernel_console_off_the_channel() {
        let c = kernel_cmdline();
        assert!(c.contains("console=ttyS0") && !c.contains("hvc0"), "{c}");
        assert!(c.contains("panic=-1"));
    }
}
