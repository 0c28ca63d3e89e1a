//! One virtiofsd per share.
//!
//! kiln binds the vhost-user socket itself and hands the listening descriptor
//! to virtiofsd with `--fd`, so the socket accepts connections the moment
//! [`Virtiofsd::spawn`] returns: no polling for a path, no race with the VMM.
//! Each daemon is sandboxed (`--sandbox namespace`: its own mount, pid and
//! network namespaces, chrooted into the share) and read-only shares are
//! served with `--readonly`, so the guest cannot write them even as root.
//! Writable shares translate guest ids (see [`GUEST_ID_HOST_BASE`]) so that
//! what the builder creates is owned by a dedicated host id range, never by
//! a host account. Every daemon dies with kiln (see [`super::child`]).
//!
//! Dropping a [`Virtiofsd`] kills and reaps the daemon and removes its socket.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Errors of starting a virtiofsd, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// No virtiofsd binary where [`find_binary`] looks.
    #[error(
        "virtiofsd not found {} (run `make virtiofsd`)",
        super::host::VIRTIOFSD_SEARCHED
    )]
    NotFound,
    /// The shared directory is not a directory.
    #[error("shared directory {0} does not exist or is not a directory")]
    SharedDir(PathBuf),
    /// Binding the vhost-user socket failed.
    #[error("binding the vhost-user socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Starting the process failed.
    #[error("spawning {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The virtiofsd builds run: what host detection finds on this host (see
/// [`super::host::Probe::find`]), so `kiln doctor` reports this very binary.
pub fn find_binary() -> Option<PathBuf> {
    super::host::Probe::system().find(super::host::VIRTIOFSD_BINARY)
}

/// First host id of the range guest ids land on in writable shares: guest
/// uid/gid `g` (1 ≤ g ≤ [`MAPPED_GUEST_IDS`]) is host id
/// `GUEST_ID_HOST_BASE + g`, both ways. 0x7FF00000 lies in the range
/// systemd leaves unassigned (above its container ranges, below its foreign
/// range 0x7FFE0000 and the signed-overflow half), so no host account or
/// container owns these ids.
pub const GUEST_ID_HOST_BASE: u32 = 0x7FF0_0000;
/// How many guest ids, from 1, are mapped into the host range.
pub const MAPPED_GUEST_IDS: u32 = 65535;

/// `--translate-uid`/`--translate-gid` rules for a writable share.
///
/// Guest root (0) is not translated: the agent sets up the share as guest
/// root and virtiofsd must keep host root's rights for that (it creates
/// files with the caller's translated fsuid, and a mapped root would lose
/// access to the root-owned, 0700 build directory). Guest ids 1..=65535 —
/// the builder is 1000:100 — become the dedicated host range, so a build's
/// files never belong to a host account (on Debian, 1000 is the first human
/// user and 100 is `users`). Any higher guest id is refused: creating or
/// chowning a file to it fails in the guest instead of reaching the host.
fn id_translation() -> Vec<OsString> {
    let map = format!("map:1:{}:{MAPPED_GUEST_IDS}", GUEST_ID_HOST_BASE + 1);
    let first_refused = MAPPED_GUEST_IDS + 1;
    // Up to u32::MAX - 1: u32::MAX is "no change" to chown, never an id.
    let forbid = format!("forbid-guest:{first_refused}:{}", u32::MAX - first_refused);
    let mut args = Vec::new();
    for option in ["--translate-uid", "--translate-gid"] {
        for rule in [&map, &forbid] {
            args.push(option.into());
            args.push(rule.into());
        }
    }
    args
}

/// The arguments for one daemon (after the binary), given the inherited
/// listening descriptor. Pure, so it is tested without a daemon.
pub fn args(shared_dir: &Path, fd: i32, read_only: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--shared-dir".into(),
        shared_dir.into(),
        "--fd".into(),
        fd.to_string().into(),
        "--sandbox".into(),
        "namespace".into(),
        // Nothing but the guest changes a share while the VM runs, so the
        // guest may cache everything. A read-only share is never written.
        "--cache".into(),
        if read_only { "always" } else { "auto" }.into(),
        "--log-level".into(),
        "error".into(),
    ];
    if read_only {
        // Nothing is created or chowned on a read-only share: the guest
        // sees the host's ids unchanged.
        args.push("--readonly".into());
    } else {
        args.extend(id_translation());
    }
    args
}

/// A running virtiofsd serving one share.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    socket: PathBuf,
    shared_dir: PathBuf,
}

impl Virtiofsd {
    /// Starts a daemon for `shared_dir` on a new socket at `socket`, with the
    /// binary from [`find_binary`].
    pub async fn spawn(
        shared_dir: &Path,
        socket: &Path,
        read_only: bool,
    ) -> Result<Self, VirtiofsdError> {
        let binary = find_binary().ok_or(VirtiofsdError::NotFound)?;
        Self::spawn_with(&binary, shared_dir, socket, read_only)
    }

    /// Starts `binary` for `shared_dir` on a new socket at `socket`.
    pub fn spawn_with(
        binary: &Path,
        shared_dir: &Path,
        socket: &Path,
        read_only: bool,
    ) -> Result<Self, VirtiofsdError> {
        if !shared_dir.is_dir() {
            return Err(VirtiofsdError::SharedDir(shared_dir.to_path_buf()));
        }
        let bind_err = |source| VirtiofsdError::Bind {
            path: socket.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(socket).map_err(bind_err)?;
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args(args(shared_dir, fd, read_only))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // Let the listening socket survive exec (std opens it CLOEXEC).
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = super::child::spawn(cmd).map_err(|source| VirtiofsdError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        // The daemon holds its own copy of the listener now.
        drop(listener);
        Ok(Self {
            child: Some(child),
            socket: socket.to_path_buf(),
            shared_dir: shared_dir.to_path_buf(),
        })
    }

    /// The vhost-user socket the VMM connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Resolves when the daemon exits, with a sentence saying so. A daemon
    /// exits when its VM disconnects; before that, it means the share is gone.
    pub async fn exited(&mut self) -> String {
        let status = match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => {
                return format!(
                    "virtiofsd for {} was already stopped",
                    self.shared_dir.display()
                )
            }
        };
        match status {
            Ok(status) => format!(
                "virtiofsd for {} exited ({})",
                self.shared_dir.display(),
                super::child::describe(status)
            ),
            Err(e) => format!(
                "virtiofsd for {}: waiting failed: {e}",
                self.shared_dir.display()
            ),
        }
    }

    /// Kills the daemon and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL, then reap: a killed daemon exits at once, so the short
            // blocking wait is bounded; tokio's reaper handles it otherwise.
            let _ = child.start_kill();
            for _ in 0..100 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn read_only_shares_are_readonly_and_fully_cached() {
        let a: Vec<String> = args(Path::new("/s"), 7, true)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            a,
            [
                "--shared-dir",
                "/s",
                "--fd",
                "7",
                "--sandbox",
                "namespace",
                "--cache",
                "always",
                "--log-level",
                "error",
                "--readonly"
            ]
        );
        let rw: Vec<String> = args(Path::new("/s"), 7, false)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert!(!rw.contains(&"--readonly".to_string()));
        assert!(rw.windows(2).any(|w| w == ["--cache", "auto"]));
    }

    #[test]
    fn writable_shares_map_guest_ids_to_the_dedicated_host_range() {
        let rw: Vec<String> = args(Path::new("/s"), 7, false)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        for option in ["--translate-uid", "--translate-gid"] {
            let rules: Vec<&str> = rw
                .windows(2)
                .filter(|w| w[0] == option)
                .map(|w| w[1].as_str())
                .collect();
            assert_eq!(
                rules,
                ["map:1:2146435073:65535", "forbid-guest:65536:4294901759"],
                "{option}"
            );
        }
        let ro: Vec<String> = args(Path::new("/s"), 7, true)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert!(!ro.iter().any(|a| a.starts_with("--translate")), "{ro:?}");
    }

    #[tokio::test]
    async fn socket_accepts_at_once_and_drop_kills_the_daemon() {
        let Some(binary) = find_binary() else {
            test_skip!("socket_accepts_at_once_and_drop_kills_the_daemon because virtiofsd is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let socket = dir.path().join("fs.sock");
        let daemon = Virtiofsd::spawn_with(&binary, &share, &socket, true).unwrap();
        let pid = daemon.pid().unwrap();
        // Connecting must work immediately: the socket was bound before spawn.
        let conn = std::os::unix::net::UnixStream::connect(&socket);
        assert!(conn.is_ok(), "{conn:?}");
        // With --sandbox namespace the daemon forks its server into new
        // namespaces; that process must go too.
        let mut family = vec![pid];
        for _ in 0..100 {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            family.extend(
                children
                    .split_whitespace()
                    .map(|c| c.parse::<u32>().unwrap()),
            );
            if family.len() > 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            family.len() > 1,
            "no sandboxed server process found under {pid}"
        );
        drop(daemon);
        drop(conn);
        assert!(!socket.exists(), "socket left behind");
        let alive = |p: &u32| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Field 3 is the state; a zombie (Z) or a gone process is dead.
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|st| st != "Z")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while family.iter().any(alive) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let survivors: Vec<&u32> = family.iter().filter(|p| alive(p)).collect();
        assert!(
            survivors.is_empty(),
            "virtiofsd processes {survivors:?} (of {family:?}) still run after drop"
        );
    }

    #[test]
    fn refuses_a_missing_shared_dir() {
        let err = Virtiofsd::spawn_with(
            Path::new("/bin/true"),
            Path::new("/nonexistent/x"),
            Path::new("/tmp/x.sock"),
            true,
        )
        .unwrap_err();
        assert!(matches!(err, VirtiofsdError::SharedDir(_)), "{err}");
    }
}
