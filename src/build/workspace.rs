//! The per-build directory on the host and its clean-up.
//!
//! ```text
//! <data_dir>/runs/<build id>/
//!     inputs/     read-only share: one entry per input (hardlinks into the blob store)
//!     scratch/    read-write share: one directory per scratch path; outputs land here
//!     vm/         VMM and virtiofsd sockets, the serial log, the initramfs
//! ```
//!
//! [`Workspace`] removes the whole tree when dropped, on every path. A kiln
//! that crashed cannot drop anything, so [`sweep`] runs at start-up: it kills
//! processes whose command line names the runs directory (VMMs, virtiofsd)
//! and removes what is left.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A build's directory tree, removed on drop.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Creates `<runs_dir>/<id>/{inputs,scratch,vm}`.
    pub fn create(runs_dir: &Path, id: &str) -> io::Result<Self> {
        let root = runs_dir.join(id);
        fs::create_dir_all(runs_dir)?;
        fs::create_dir(&root)?;
        let ws = Self { root };
        for d in [ws.inputs(), ws.scratch(), ws.vm()] {
            fs::create_dir(d)?;
        }
        Ok(ws)
    }

    /// The build's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The read-only inputs share.
    pub fn inputs(&self) -> PathBuf {
        self.root.join("inputs")
    }

    /// The read-write scratch share.
    pub fn scratch(&self) -> PathBuf {
        self.root.join("scratch")
    }

    /// VMM files: sockets, serial log, initramfs.
    pub fn vm(&self) -> PathBuf {
        self.root.join("vm")
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.root) {
            tracing::warn!(path = %self.root.display(), error = %e, "could not remove build directory");
        }
    }
}

/// Removes a tree even where the build left read-only directories.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    make_writable(path)?;
    fs::remove_dir_all(path)
}

fn make_writable(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(path)? {
            make_writable(&entry?.path())?;
        }
    }
    Ok(())
}

/// What [`sweep`] found and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Processes killed.
    pub killed: Vec<i32>,
    /// Build directories removed.
    pub removed: Vec<PathBuf>,
}

/// Kills leftover processes of a previous kiln and removes its build
/// directories.
pub fn sweep(runs_dir: &Path) -> io::Result<SweepReport> {
    let mut report = SweepReport::default();
    if !runs_dir.exists() {
        return Ok(report);
    }
    let needle = runs_dir.as_os_str().as_encoded_bytes().to_vec();
    for pid in processes_mentioning(&needle)? {
        // SAFETY: kill(2) with a pid read from /proc and a valid signal has no
        // memory-safety preconditions.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            report.killed.push(pid);
        }
    }
    for entry in fs::read_dir(runs_dir)? {
        let path = entry?.path();
        remove_tree(&path)?;
        report.removed.push(path);
    }
    Ok(report)
}

fn processes_mentioning(needle: &[u8]) -> io::Result<Vec<i32>> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_is_removed_on_drop_even_with_read_only_dirs() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runs = tmp.path().join("runs");
        let ws = Workspace::create(&runs, "b1").expect("create");
        let ro = ws.scratch().join("out");
        fs::create_dir(&ro).expect("mkdir");
        fs::write(ro.join("f"), b"x").expect("write");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).expect("chmod");
        let root = ws.root().to_path_buf();
        drop(ws);
        assert!(!root.exists());
    }

    #[test]
    fn sweep_kills_leftover_processes_and_removes_dirs() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runs = tmp.path().join("runs");
        fs::create_dir_all(runs.join("stale/vm")).expect("mkdir");
        let marker = runs.join("stale/vm/sock");
        // `sh -c CMD NAME`: the marker path becomes $0, visible in cmdline.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 600")
            .arg(&marker)
            .spawn()
            .expect("spawn sh");
        // Until the child has exec'd, its cmdline is still this test's.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let needle = marker.as_os_str().as_encoded_bytes().to_vec();
        for _ in 0..500 {
            let seen = fs::read(&cmdline).unwrap_or_default();
            if seen.windows(needle.len()).any(|w| w == needle) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let report = sweep(&runs).expect("sweep");
        assert!(report.killed.contains(&(child.id() as i32)), "{report:?}");
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert_eq!(report.removed, vec![runs.join("stale")]);
        assert!(!runs.join("stale").exists());
    }
}
