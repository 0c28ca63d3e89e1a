//! `kiln serve` as a process, from outside: what stopping it leaves behind
//! (SIGTERM: nothing; SIGKILL: no process), the unix socket's permissions
//! under umask 000, gRPC C-core clients on that socket, and the host ids of
//! what a builder writes into its scratch share.

#![allow(clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::proto::{snix_build, snix_castore};
use kiln::vmm::virtiofsd::GUEST_ID_HOST_BASE;

/// A `kiln serve` child on a unix socket, with its own data directory.
struct Served {
    child: Child,
    socket: PathBuf,
    data_dir: PathBuf,
    tmp: tempfile::TempDir,
}

impl Served {
    /// Starts the binary under umask 000 and waits until it answers.
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("kiln.sock");
        let data_dir = tmp.path().join("data");
        let log = std::fs::File::create(tmp.path().join("kiln.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--max-vms", "1"])
            // Running builds are cancelled at once on SIGTERM.
            .args(["--shutdown-grace", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: umask(2) is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let served = Self {
            child,
            socket,
            data_dir,
            tmp,
        };
        served.wait_until_serving().await;
        served
    }

    async fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.socket.exists() && kiln::cli::connect(&self.addr()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("kiln serve did not answer within 30 s: {}", self.log());
    }

    fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("kiln.log")).unwrap_or_default()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety
        // preconditions.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the child to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kiln did not exit within {limit:?}: {}", self.log());
    }

    /// Processes (VMM, virtiofsd and its sandbox) naming the data directory.
    fn children(&self) -> Vec<i32> {
        harness::processes_mentioning(self.data_dir.as_os_str().as_encoded_bytes())
    }

    /// Waits until no process names the data directory, at most `limit`.
    async fn assert_no_children_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.children().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.children();
        let cmdlines: Vec<String> = left
            .iter()
            .map(|pid| {
                let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&c).replace('\0', " ")
            })
            .collect();
        assert!(left.is_empty(), "still running: {cmdlines:?}");
    }

    /// A build whose builder runs `script` with busybox, submitted over
    /// kiln's event service; returns once the builder printed `ready`.
    async fn submit_until_ready(&self, script: &str) -> kiln::client::Follow {
        let store = kiln::castore::from_addr(
            &format!("grpc+unix:{}", self.socket.display()),
            self.tmp.path(),
        )
        .await
        .unwrap();
        let busybox = harness::server::ingest_busybox(&store, self.tmp.path()).await;
        let channel = kiln::cli::connect(&self.addr()).await.unwrap();
        let request = sleeper_request(busybox.to_snix_entry(harness::BUSYBOX.as_bytes()), script);
        harness::submit_until_log(channel, request, b"ready").await
    }

    /// The one build directory under `runs/`.
    fn build_dir(&self) -> PathBuf {
        let runs = self.data_dir.join("runs");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs.remove(0)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Nix-shaped request running `script` (which never finishes by itself).
fn sleeper_request(busybox: snix_castore::Entry, script: &str) -> snix_build::BuildRequest {
    harness::nix_request(busybox, script, &["build/out"])
}

/// Host uid/gid of `path`, with a message naming it.
fn owner(path: &Path) -> (u32, u32) {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_vms_and_daemons_and_removes_the_build() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut served = Served::start().await;
    let _events = served
        .submit_until_ready("mkdir /build/d && touch /build/d/f && echo ready && sleep 600")
        .await;

    // What the builder (guest 1000:100) wrote is owned by the dedicated host
    // range, never by host account 1000 or group `users` (100).
    let scratch = served.build_dir().join("scratch");
    let mapped = (GUEST_ID_HOST_BASE + 1000, GUEST_ID_HOST_BASE + 100);
    for made in ["build/d", "build/d/f"] {
        assert_eq!(owner(&scratch.join(made)), mapped, "{made}");
    }
    let (_, store_gid) = owner(&scratch.join("nix/store"));
    assert_ne!(
        store_gid, 100,
        "scratch/nix/store belongs to host group 100"
    );
    assert!(
        served.children().len() >= 2,
        "expected QEMU and virtiofsd to run: {:?}",
        served.children()
    );

    served.signal(libc::SIGTERM);
    let status = served.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "kiln exited with {status}: {}",
        served.log()
    );
    served
        .assert_no_children_within(Duration::from_secs(5))
        .await;
    let runs = served.data_dir.join("runs");
    let left = harness::leftovers(&runs);
    assert!(left.is_empty(), "left behind: {left:?}\n{}", served.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_kiln_leaves_no_vm_or_daemon_running() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut served = Served::start().await;
    let _events = served.submit_until_ready("echo ready && sleep 600").await;
    assert!(
        served.children().len() >= 2,
        "expected QEMU and virtiofsd to run: {:?}",
        served.children()
    );
    served.signal(libc::SIGKILL);
    served.wait_exit(Duration::from_secs(10));
    served
        .assert_no_children_within(Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn the_unix_socket_is_0600_under_umask_000() {
    let served = Served::start().await;
    let mode = std::fs::metadata(&served.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600, "socket mode {:o}", mode & 0o7777);
}

#[tokio::test]
async fn grpc_c_core_clients_can_use_the_unix_socket() {
    if !harness::can_run(harness::python_unavailable("grpc")) {
        return;
    }
    let served = Served::start().await;
    let socket = served.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/independent/unix_authority.py"
            ))
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "grpcio client failed:\n{stdout}\n{stderr}"
    );
}
