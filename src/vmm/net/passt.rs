//! The NAT helper of one networked build: a `passt` process.
//!
//! passt is a user-mode network stack: it speaks Ethernet with the guest
//! and turns the guest's connections into ordinary sockets of its own on
//! the host. kiln starts it as root with `--runas` a helper uid of the
//! build's own ([`super::policy::NAT_UID_BASE`]), so it drops to that uid
//! before it handles a packet, and the nftables table polices every socket
//! it opens. It forwards no port to the guest (nothing on the host or in
//! another build can connect in), answers the guest's DNS queries to
//! [`GUEST_DNS`](super::GUEST_DNS) by asking the upstream resolver, and
//! exits when its VM disconnects (`--one-off`).
//!
//! For QEMU the guest's Ethernet is one end of a socket pair kiln creates:
//! passt gets the other end (`--fd`), so there is no socket file to create
//! (passt drops to the helper uid before it would bind one, and the build's
//! run directory is root's) and nothing else can connect to it.

use std::ffi::OsString;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{NetEndpoint, GUEST_ADDRESS, GUEST_DNS, GUEST_GATEWAY, GUEST_PREFIX};

/// The binary name kiln looks for.
pub const PASST_BINARY: &str = "passt";

/// Where vhost-user helpers' sockets live, one directory per helper uid.
pub const NAT_SOCKET_ROOT: &str = "/run/kiln-net";

/// How long passt may take to create its socket.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// How long a helper on a socket pair is watched before the VM boots: it
/// checks its arguments and sets itself up in a few milliseconds.
const SETTLE: Duration = Duration::from_millis(50);

/// Why a NAT helper did not start.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// Starting the process failed.
    #[error("spawning {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before its socket existed.
    #[error("passt exited before it was ready ({status}): {stderr}")]
    Exited {
        /// How it ended.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// Its socket did not appear in time.
    #[error("passt did not create {socket} within {limit:?}")]
    NotReady {
        /// The socket it was told to create.
        socket: PathBuf,
        /// The time it had.
        limit: Duration,
    },
    /// The socket pair for the guest's Ethernet could not be made.
    #[error("creating the socket pair for the guest's network")]
    SocketPair(#[source] std::io::Error),
    /// The helper's private resolv.conf could not be written.
    #[error("writing the NAT helper's resolv.conf")]
    ResolvConf(#[source] std::io::Error),
    /// The vhost-user socket's directory could not be made.
    #[error("creating the NAT helper's socket directory under {NAT_SOCKET_ROOT}")]
    SocketDir(#[source] std::io::Error),
}

/// What one helper is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstSpec {
    /// The passt binary.
    pub binary: PathBuf,
    /// The unix socket the VMM connects to, in vhost-user mode; in QEMU's
    /// stream mode the helper gets a socket-pair end instead.
    pub socket: PathBuf,
    /// Helper uid and gid (the same number).
    pub uid: u32,
    /// Upstream resolver; `None`: passt's own choice (the host's
    /// `/etc/resolv.conf`). passt forwards to the first nameserver of the
    /// resolv.conf it reads, so for an explicit one it is started in a
    /// mount namespace of its own where `/etc/resolv.conf` names it.
    pub dns: Option<IpAddr>,
    /// Serve vhost-user (cloud-hypervisor) instead of QEMU's stream socket.
    pub vhost_user: bool,
}

/// The arguments after the binary, `fd` being the helper's end of the
/// socket pair in stream mode. Pure, so it is tested without passt.
pub fn args(spec: &PasstSpec, fd: Option<i32>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["--foreground", "--quiet", "--stderr", "--one-off"]);
    push(&["--runas", &format!("{}:{}", spec.uid, spec.uid)]);
    match fd {
        Some(fd) => push(&["--fd", &fd.to_string()]),
        None => {
            if spec.vhost_user {
                push(&["--vhost-user"]);
            }
            a.push("--socket".into());
            a.push(spec.socket.clone().into());
        }
    }
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    // IPv4 only, with fixed addresses: the agent configures the guest
    // itself, so no DHCP, NDP or router advertisements are answered.
    push(&[
        "--ipv4-only",
        "--no-dhcp",
        "--no-ndp",
        "--no-dhcpv6",
        "--no-ra",
    ]);
    push(&["--address", &GUEST_ADDRESS.to_string()]);
    push(&["--netmask", &GUEST_PREFIX.to_string()]);
    push(&["--gateway", &GUEST_GATEWAY.to_string()]);
    push(&["--dns-forward", &GUEST_DNS.to_string()]);
    // The gateway address is not the host's loopback (passt maps it there
    // by default), and no port of the host or the guest is forwarded.
    push(&["--no-map-gw", "--tcp-ports", "none", "--udp-ports", "none"]);
    a
}

/// A running helper.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
    socket: PathBuf,
    /// kiln's end of the socket pair (stream mode), which the VMM inherits.
    vmm_end: Option<OwnedFd>,
}

impl Passt {
    /// Starts passt for `spec`. In stream mode it gets one end of a new
    /// socket pair and the other is kept for the VMM; in vhost-user mode
    /// this waits until its socket exists.
    pub async fn spawn(spec: &PasstSpec) -> Result<Self, PasstError> {
        if spec.vhost_user {
            return Self::spawn_vhost_user(spec).await;
        }
        let (vmm_end, helper_end) =
            std::os::unix::net::UnixStream::pair().map_err(PasstError::SocketPair)?;
        let (vmm_end, helper_end) = (OwnedFd::from(vmm_end), OwnedFd::from(helper_end));
        let helper_fd = helper_end.as_raw_fd();
        let resolv = match spec.dns {
            Some(dns) => Some(private_resolv_conf(&spec.socket, dns)?),
            None => None,
        };
        let mut cmd = Command::new(&spec.binary);
        cmd.args(args(spec, Some(helper_fd)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // passt inherits its end (std opens both CLOEXEC).
                if libc::fcntl(helper_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(source) = &resolv {
                    bind_resolv_conf(source)?;
                }
                Ok(())
            });
        }
        let child = crate::vmm::child::spawn(cmd).map_err(|source| PasstError::Spawn {
            binary: spec.binary.clone(),
            source,
        })?;
        // The helper holds its own copy now.
        drop(helper_end);
        let mut passt = Passt {
            child: Some(child),
            socket: spec.socket.clone(),
            vmm_end: Some(vmm_end),
        };
        passt.settled().await?;
        Ok(passt)
    }

    /// vhost-user mode (cloud-hypervisor): passt creates its socket after
    /// dropping to the helper uid, so the socket lives in a directory that
    /// uid owns, `NAT_SOCKET_ROOT/<uid>` (the root is root's, 0711: no one
    /// can list it; the uid is held by this build alone while it runs).
    async fn spawn_vhost_user(spec: &PasstSpec) -> Result<Self, PasstError> {
        let dir =
            socket_dir(Path::new(NAT_SOCKET_ROOT), spec.uid).map_err(PasstError::SocketDir)?;
        let socket = dir.join("vhost.sock");
        let resolv = match spec.dns {
            Some(dns) => Some(private_resolv_conf(&spec.socket, dns)?),
            None => None,
        };
        let helper_spec = PasstSpec {
            socket: socket.clone(),
            ..spec.clone()
        };
        let mut cmd = Command::new(&spec.binary);
        cmd.args(args(&helper_spec, None))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(source) = resolv {
            // SAFETY: the closure runs in the forked child before exec and
            // only makes async-signal-safe calls (unshare, mount).
            unsafe {
                cmd.pre_exec(move || bind_resolv_conf(&source));
            }
        }
        let child = crate::vmm::child::spawn(cmd).map_err(|source| PasstError::Spawn {
            binary: spec.binary.clone(),
            source,
        })?;
        let mut passt = Passt {
            child: Some(child),
            socket,
            vmm_end: None,
        };
        passt.ready().await?;
        Ok(passt)
    }

    /// Where the VMM reaches this helper.
    pub fn endpoint(&self) -> NetEndpoint {
        match &self.vmm_end {
            Some(fd) => NetEndpoint::Fd(fd.as_raw_fd()),
            None => NetEndpoint::Socket(self.socket.clone()),
        }
    }

    /// Gives passt a moment to refuse its arguments or environment, so
    /// such a failure is reported as the helper's, before a VM boots.
    async fn settled(&mut self) -> Result<(), PasstError> {
        tokio::time::sleep(SETTLE).await;
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let stderr = self.stderr().await;
                return Err(PasstError::Exited {
                    status: crate::vmm::child::describe(status),
                    stderr,
                });
            }
        }
        Ok(())
    }

    /// Waits, bounded, for the socket; fails at once if passt exits.
    async fn ready(&mut self) -> Result<(), PasstError> {
        let start = Instant::now();
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let stderr = self.stderr().await;
                    return Err(PasstError::Exited {
                        status: crate::vmm::child::describe(status),
                        stderr,
                    });
                }
            }
            if start.elapsed() > READY_LIMIT {
                return Err(PasstError::NotReady {
                    socket: self.socket.clone(),
                    limit: READY_LIMIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the exited process wrote to stderr, bounded.
    async fn stderr(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let Some(mut pipe) = self.child.as_mut().and_then(|c| c.stderr.take()) else {
            return String::new();
        };
        let mut buf = Vec::new();
        let _ = (&mut pipe).take(4096).read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).trim().to_owned()
    }

    /// The socket the VMM connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The helper's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Resolves when the helper exits, with a sentence saying so: before
    /// the VM is gone, the build has lost its network.
    pub async fn exited(&mut self) -> String {
        let Some(child) = self.child.as_mut() else {
            return "the NAT helper (passt) was already stopped".into();
        };
        let status = child.wait().await;
        let stderr = self.stderr().await;
        let said = if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        };
        match status {
            Ok(status) => format!(
                "the NAT helper (passt) exited ({}){said}",
                crate::vmm::child::describe(status)
            ),
            Err(e) => format!("the NAT helper (passt): waiting failed: {e}"),
        }
    }

    /// Kills the helper and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.vmm_end = None;
        self.remove_socket();
    }

    /// Removes the vhost-user socket and its directory (stream mode has
    /// neither).
    fn remove_socket(&self) {
        if self.vmm_end.is_none() && self.socket.starts_with(NAT_SOCKET_ROOT) {
            if let Some(dir) = self.socket.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL, then a short bounded reap, as for virtiofsd.
            let _ = child.start_kill();
            for _ in 0..100 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.remove_socket();
    }
}

/// `root/<uid>`, fresh, owned by the helper uid, 0700, under a root that is
/// root's and 0711 (traversable, not listable).
fn socket_dir(root: &Path, uid: u32) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    let dir = root.join(uid.to_string());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
    Ok(dir)
}

/// Writes `nameserver DNS` next to `socket` (in the build's run dir) for
/// [`bind_resolv_conf`]; the path as a C string, made before the fork.
fn private_resolv_conf(socket: &Path, dns: IpAddr) -> Result<std::ffi::CString, PasstError> {
    use std::os::unix::ffi::OsStrExt;
    let path = socket.with_file_name("passt-resolv.conf");
    std::fs::write(&path, format!("nameserver {dns}\n")).map_err(PasstError::ResolvConf)?;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| PasstError::ResolvConf(std::io::Error::other("the path contains NUL")))
}

/// In the forked child, before exec: a private mount namespace whose
/// `/etc/resolv.conf` is `source`. Only async-signal-safe calls.
fn bind_resolv_conf(source: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: unshare and mount take plain arguments; every string is a
    // NUL-terminated C string alive for the calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Nothing done here may leak back into kiln's namespace.
        let root = c"/".as_ptr();
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(
            std::ptr::null(),
            root,
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let target = c"/etc/resolv.conf".as_ptr();
        if libc::mount(
            source.as_ptr(),
            target,
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn spec() -> PasstSpec {
        PasstSpec {
            binary: "/usr/bin/passt".into(),
            socket: "/r/net.sock".into(),
            uid: 0x7FE0_0003,
            dns: Some("10.251.1.1".parse().unwrap()),
            vhost_user: false,
        }
    }

    fn strings(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn value(a: &[String], flag: &str) -> Option<String> {
        a.iter().position(|x| x == flag).map(|i| a[i + 1].clone())
    }

    #[test]
    fn runs_as_the_helper_uid_with_fixed_guest_addresses_and_no_forwarding() {
        let a = strings(&args(&spec(), Some(5)));
        assert_eq!(value(&a, "--runas").unwrap(), "2145386499:2145386499");
        assert_eq!(value(&a, "--fd").unwrap(), "5");
        assert_eq!(value(&a, "--socket"), None);
        assert_eq!(value(&a, "--address").unwrap(), "10.0.2.15");
        assert_eq!(value(&a, "--netmask").unwrap(), "24");
        assert_eq!(value(&a, "--gateway").unwrap(), "10.0.2.2");
        assert_eq!(value(&a, "--dns-forward").unwrap(), "10.0.2.3");
        assert_eq!(value(&a, "--tcp-ports").unwrap(), "none");
        assert_eq!(value(&a, "--udp-ports").unwrap(), "none");
        for flag in ["--foreground", "--one-off", "--no-map-gw", "--ipv4-only"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing: {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--vhost-user"));
    }

    #[test]
    fn the_vhost_user_socket_dir_belongs_to_the_helper_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::Uid::effective().is_root() {
            test_skip!("the vhost-user socket dir test chowns to a helper uid (root)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("net");
        let uid = 0x7FE0_0042;
        std::fs::create_dir_all(root.join(uid.to_string()).join("stale")).unwrap();
        let dir = socket_dir(&root, uid).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, uid));
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "stale entries left"
        );
        let root_mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(root_mode & 0o777, 0o711);
    }

    #[test]
    fn vhost_user_for_cloud_hypervisor_on_a_socket() {
        let a = strings(&args(
            &PasstSpec {
                vhost_user: true,
                dns: None,
                ..spec()
            },
            None,
        ));
        assert!(a.iter().any(|x| x == "--vhost-user"));
        assert_eq!(value(&a, "--socket").unwrap(), "/r/net.sock");
        assert_eq!(value(&a, "--dns"), None);
    }
}
