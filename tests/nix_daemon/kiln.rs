//! A `kiln serve` process for the Nix daemon suite: kiln's gRPC services on
//! one unix socket, the Nix worker protocol on another; killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The server.
pub struct Kiln {
    child: Child,
    dir: tempfile::TempDir,
}

impl Kiln {
    /// Starts it and waits for both sockets.
    pub fn start() -> Kiln {
        Kiln::start_with(&[])
    }

    /// Starts it with `extra` arguments to `kiln serve`.
    pub fn start_with(extra: &[&str]) -> Kiln {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", dir.path().join("kiln.sock").display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--nix-daemon-socket")
            .arg(dir.path().join("nix.sock"))
            // This suite runs in the host's own network namespace: no
            // network for builds (fixed-output ones retry offline).
            .arg("--no-network")
            .args(["--max-vms", "2"])
            .args(extra)
            .env("RUST_LOG", "kiln=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut kiln = Kiln { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(kiln.grpc_socket().exists() && kiln.nix_socket().exists()) {
            if let Some(status) = kiln.child.try_wait().unwrap() {
                panic!("kiln serve exited ({status}):\n{}", kiln.log());
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not start:\n{}",
                kiln.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        kiln
    }

    /// kiln's gRPC socket.
    pub fn grpc_socket(&self) -> PathBuf {
        self.dir.path().join("kiln.sock")
    }

    /// The Nix worker protocol socket.
    pub fn nix_socket(&self) -> PathBuf {
        self.dir.path().join("nix.sock")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` with its output captured, killing it after `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes on threads so that a chatty child cannot block.
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out_pipe, &mut v).ok();
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err_pipe, &mut v).ok();
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let stderr = err_thread.join().unwrap();
            panic!(
                "{command:?} did not finish within {timeout:?} ({status}):\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}
