//! The per-build directory on the host and its clean-up.
//!
//! ```text
//! <data_dir>/runs/<build id>/
//!     inputs/     read-only share: one entry per input (hardlinks into the blob store)
//!     scratch/    read-write share: one directory per scratch path; outputs land here
//!     vm/         VMM and virtiofsd sockets, the serial log, the initramfs
//! ```
//!
//! [`Workspace::remove`] removes the whole tree off the async workers; the
//! executor awaits it on every path, and dropping a workspace is the
//! fallback. Removal walks through directory handles, never through a link
//! a build left, at any depth ([`crate::hostfs::remove`]). A kiln that
//! crashed cannot remove anything, so [`sweep`] runs at start-up: it kills
//! processes whose command line names the runs directory (VMMs, virtiofsd)
//! and removes what is left, moving aside what it cannot remove.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::hostfs::{self, Dir};

/// A build's directory tree, removed on drop.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    removed: bool,
}

impl Workspace {
    /// Creates `<runs_dir>/<id>/{inputs,scratch,vm}`. The runs directory and
    /// the build's own are root's alone (0700): nothing a build wrote is
    /// reachable by other host users. The shares are 0755 so the guest's
    /// build user can enter them where they are mounted whole.
    pub fn create(runs_dir: &Path, id: &str) -> io::Result<Self> {
        let root = runs_dir.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(runs_dir)?;
        fs::set_permissions(runs_dir, fs::Permissions::from_mode(0o700))?;
        fs::DirBuilder::new().mode(0o700).create(&root)?;
        let ws = Self {
            root,
            removed: false,
        };
        fs::set_permissions(&ws.root, fs::Permissions::from_mode(0o700))?;
        for (d, mode) in [
            (ws.inputs(), 0o755),
            (ws.scratch(), 0o755),
            (ws.vm(), 0o700),
        ] {
            fs::create_dir(&d)?;
            fs::set_permissions(&d, fs::Permissions::from_mode(mode))?;
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

    /// A handle on the scratch share: everything the build wrote is reached
    /// through it ([`crate::hostfs`]).
    pub fn scratch_dir(&self) -> io::Result<Dir> {
        Dir::open(&self.scratch())
    }

    /// A handle on the inputs share.
    pub fn inputs_dir(&self) -> io::Result<Dir> {
        Dir::open(&self.inputs())
    }

    /// VMM files: sockets, serial log, initramfs.
    pub fn vm(&self) -> PathBuf {
        self.root.join("vm")
    }

    /// Removes the tree on a blocking thread, so a huge or deep tree does
    /// not stall the async workers; resolves once it is gone.
    pub async fn remove(mut self) {
        self.removed = true;
        let root = self.root.clone();
        let removed = tokio::task::spawn_blocking(move || remove_tree(&root)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn_left(&self.root, &e),
            Err(e) => warn_left(&self.root, &io::Error::other(e)),
        }
    }
}

fn warn_left(path: &Path, e: &io::Error) {
    tracing::warn!(path = %path.display(), error = %e, "could not remove build directory");
}

impl Drop for Workspace {
    /// The fallback when [`Workspace::remove`] was not reached (a panic, a
    /// runtime shutting down): off the async workers, on a plain thread,
    /// which a runtime shutting down does not discard as it does queued
    /// blocking tasks.
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let root = std::mem::take(&mut self.root);
        let remove = move || {
            if let Err(e) = remove_tree(&root) {
                warn_left(&root, &e);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("kiln-remove".into())
            .spawn(remove)
        {
            tracing::warn!(error = %e, "could not start a thread to remove a build directory");
        }
    }
}

/// Removes a tree a build may have written (read-only or unreadable
/// directories, symlinks anywhere, any depth) without following a link.
/// Blocking.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    hostfs::remove::remove_path(path)
}

/// What [`sweep`] found and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Processes killed.
    pub killed: Vec<i32>,
    /// Build directories removed.
    pub removed: Vec<PathBuf>,
    /// Build directories that could not be removed, moved aside to
    /// `<data_dir>/runs-unremovable/` for an operator to look at.
    pub moved_aside: Vec<PathBuf>,
}

/// Kills leftover processes of a previous kiln and removes its build
/// directories. What cannot be removed is logged and moved aside, so kiln
/// still starts.
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
    let runs = Dir::open(runs_dir)?;
    for (name, _) in runs.entries()? {
        let path = runs_dir.join(&name);
        match hostfs::remove::remove_all(&runs, &name) {
            Ok(()) => report.removed.push(path),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover build directory; moving it aside");
                report.moved_aside.push(move_aside(runs_dir, &runs, &name)?);
            }
        }
    }
    Ok(report)
}

/// Renames `name` out of the runs directory into `runs-unremovable/` next
/// to it, under a name that does not collide.
fn move_aside(runs_dir: &Path, runs: &Dir, name: &std::ffi::OsStr) -> io::Result<PathBuf> {
    let aside = runs_dir.with_file_name("runs-unremovable");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&aside)?;
    let aside_dir = Dir::open(&aside)?;
    let mut target = name.to_owned();
    target.push(format!(".{}", uuid::Uuid::new_v4().simple()));
    runs.rename(name, &aside_dir, &target)?;
    Ok(aside.join(target))
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

    /// A workspace with a read-only directory and a link out of it.
    fn workspace_with_traps(runs: &Path, id: &str, outside: &Path) -> Workspace {
        let ws = Workspace::create(runs, id).expect("create");
        let ro = ws.scratch().join("out");
        fs::create_dir(&ro).expect("mkdir");
        fs::write(ro.join("f"), b"x").expect("write");
        std::os::unix::fs::symlink(outside, ro.join("l")).expect("symlink");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).expect("chmod");
        ws
    }

    #[tokio::test]
    async fn workspace_is_removed_with_read_only_dirs_and_links_out_of_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("keep"), b"decoy").expect("write");
        let runs = tmp.path().join("runs");
        let ws = workspace_with_traps(&runs, "b1", &outside);
        assert_eq!(
            fs::metadata(ws.root()).expect("root").permissions().mode() & 0o777,
            0o700
        );
        let root = ws.root().to_path_buf();
        ws.remove().await;
        assert!(!root.exists());

        // Dropped without remove(): the fallback thread removes it.
        let ws = workspace_with_traps(&runs, "b2", &outside);
        let root = ws.root().to_path_buf();
        drop(ws);
        for _ in 0..100 {
            if !root.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!root.exists());
        assert_eq!(fs::read(outside.join("keep")).expect("decoy"), b"decoy");
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
        assert!(report.moved_aside.is_empty(), "{report:?}");
        assert!(report.killed.contains(&(child.id() as i32)), "{report:?}");
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert_eq!(report.removed, vec![runs.join("stale")]);
        assert!(!runs.join("stale").exists());
    }

    #[test]
    fn sweep_removes_a_deep_tree_and_moves_aside_what_it_cannot_remove() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        let runs = data.join("runs");
        fs::create_dir_all(&runs).expect("mkdir");
        // Deeper than any path can name: a path-based removal fails on it.
        let top = Dir::open(&runs).expect("open");
        let mut dir = top
            .create_or_open_dir(std::ffi::OsStr::new("deep"), 0o755)
            .expect("deep");
        for _ in 0..3000 {
            dir = dir
                .create_or_open_dir(std::ffi::OsStr::new("d"), 0o755)
                .expect("d");
        }
        // A mount point cannot be removed (EBUSY) while mounted.
        let busy = runs.join("busy");
        fs::create_dir_all(busy.join("m")).expect("mkdir");
        let mounted = nix::mount::mount(
            Some("tmpfs"),
            &busy.join("m"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        let report = sweep(&runs).expect("sweep");
        assert!(report.removed.contains(&runs.join("deep")), "{report:?}");
        if let Err(e) = mounted {
            test_skip!("the moved-aside half needs to mount a tmpfs (root): {e}");
            return;
        }
        assert_eq!(report.moved_aside.len(), 1, "{report:?}");
        let aside = &report.moved_aside[0];
        assert!(
            aside.starts_with(data.join("runs-unremovable")),
            "{aside:?}"
        );
        assert!(fs::read_dir(&runs).expect("runs").next().is_none());
        nix::mount::umount(&aside.join("m")).expect("umount");
        remove_tree(aside).expect("remove");
    }
}
