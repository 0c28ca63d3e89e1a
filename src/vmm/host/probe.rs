//! Where the host's executables are: one lookup ([`Probe::find`]) for
//! builds and `kiln doctor`, and what `--version` says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Tool;

/// QEMU's x86_64 system emulator.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// cloud-hypervisor's executable.
pub const CLOUD_HYPERVISOR_BINARY: &str = "cloud-hypervisor";
/// virtiofsd's executable (the Rust implementation).
pub const VIRTIOFSD_BINARY: &str = "virtiofsd";

/// How long `--version` of one tool may take before it counts as broken.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Where detection looks; [`Probe::system`] for the real host, a temp tree in
/// tests. Builds find their executables through the same [`Probe::find`]
/// (see [`crate::vmm::virtiofsd::find_binary`]), so `kiln doctor` reports
/// exactly the binaries builds run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `/sys/module`.
    pub sys_module: PathBuf,
    /// `/dev/kvm`.
    pub dev_kvm: PathBuf,
    /// Directories searched for executables, in order.
    pub search_path: Vec<PathBuf>,
    /// Extra directories searched for virtiofsd only, after
    /// [`Probe::search_path`] (distributions install it outside PATH).
    pub virtiofsd_dirs: Vec<PathBuf>,
}

/// Where [`Probe::system`] looks for virtiofsd, for messages.
pub const VIRTIOFSD_SEARCHED: &str = "on PATH, in ~/.cargo/bin or in /usr/libexec";

/// The oldest virtiofsd that accepts the command line kiln gives it
/// (`--readonly` arrived in 1.13.0; see [`crate::vmm::virtiofsd::args`]).
pub const MIN_VIRTIOFSD_VERSION: (u32, u32, u32) = (1, 13, 0);

impl Probe {
    /// The real host: `/sys/module`, `/dev/kvm`, `$PATH` followed by
    /// `~/.cargo/bin` (where `cargo install virtiofsd` puts it), and for
    /// virtiofsd `/usr/libexec` (where Debian's and Fedora's packages put
    /// it). Not `/usr/lib/qemu`: the virtiofsd there is QEMU's old C daemon,
    /// whose command line is another one altogether.
    pub fn system() -> Self {
        let mut search_path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        if let Some(home) = std::env::var_os("HOME") {
            search_path.push(Path::new(&home).join(".cargo/bin"));
        }
        Self {
            sys_module: "/sys/module".into(),
            dev_kvm: "/dev/kvm".into(),
            search_path,
            virtiofsd_dirs: vec!["/usr/libexec".into()],
        }
    }

    /// The directories `name` is looked for in, in order.
    pub fn dirs_for(&self, name: &str) -> Vec<PathBuf> {
        let mut dirs = self.search_path.clone();
        if name == VIRTIOFSD_BINARY {
            dirs.extend(self.virtiofsd_dirs.iter().cloned());
        }
        dirs
    }

    /// The executable called `name`: the first regular, executable file of
    /// that name in [`Probe::dirs_for`]. The one lookup of builds and
    /// `kiln doctor`.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        find_executable(name, &self.dirs_for(name))
    }
}

/// The executable `probe` finds for `name`, with its version.
pub(super) async fn tool(probe: &Probe, name: &str) -> Option<Tool> {
    let path = probe.find(name)?;
    let version = version_of(&path).await;
    Some(Tool { path, version })
}

/// The first regular, executable file called `name` in `dirs` (a symlink
/// counts by its target).
fn find_executable(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.iter().map(|dir| dir.join(name)).find(|candidate| {
        std::fs::metadata(candidate)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// First non-empty line `path --version` prints, if it answers in time.
async fn version_of(path: &Path) -> Option<String> {
    let run = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(VERSION_TIMEOUT, run)
        .await
        .ok()?
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}
