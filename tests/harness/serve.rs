//! A `kiln serve` child process booting real VMs, for the tests of the
//! binary itself (signals, token files, tenants, operator commands).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::castore::Node;
use kiln::client::{ClientSecurity, ClientSecurityOptions, KilnChannel};
use kiln::proto::snix_build;

use super::BUSYBOX;

/// The output path of [`Serve::request`].
pub const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
/// How long anything here may take before the test calls it hung.
pub const LIMIT: Duration = Duration::from_secs(120);

/// A `kiln serve` child on a loopback port with its own data and cache
/// directories; killed on drop if a test failed before it exited.
pub struct Serve {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// The toolset's node (stored before the server started).
    pub busybox: Node,
}

impl Serve {
    /// Starts `kiln serve` with `args` once the toolset is in its store.
    pub async fn start(args: &[&str]) -> Serve {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Serve::start`], with `env` set for the server.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        // The embedded store has one owner: the toolset goes in first.
        let busybox = {
            let store = kiln::castore::from_addr("", &data_dir).await.unwrap();
            super::server::ingest_busybox(&store, dir.path()).await
        };
        for d in ["kernel-kiln", "kernel-debian", "agent"] {
            std::os::unix::fs::symlink(Path::new("/var/cache/kiln").join(d), cache_dir.join(d))
                .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(["--warm-vms", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            dir,
            addr: format!("http://127.0.0.1:{port}"),
            busybox,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "kiln serve did not listen:\n{}",
                serve.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn runs(&self) -> PathBuf {
        self.path("data").join("runs")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A channel sending the token in `token_file`, if any.
    pub async fn channel(&self, token_file: Option<&Path>) -> KilnChannel {
        let security = ClientSecurity::load(&ClientSecurityOptions {
            token_file: token_file.map(Path::to_owned),
            ..Default::default()
        })
        .unwrap();
        kiln::client::connect(&self.addr, &security).await.unwrap()
    }

    pub fn request(&self, script: &str) -> snix_build::BuildRequest {
        super::nix_request(
            self.busybox.to_snix_entry(BUSYBOX.as_bytes()),
            script,
            &[OUT],
        )
    }

    /// Runs `kiln ARGS --addr <this server>` to its end (bounded).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .args(["--addr", &self.addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kiln {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// Waits (bounded) until nothing of any build is left: no build
    /// directory, no process (VMM, virtiofsd) working in one.
    pub async fn nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = super::leftovers(&self.runs());
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: {left:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Stores the toolset again through this server as the holder of
    /// `token_file`: with tenants, a tenant sees only what it stored (the
    /// bytes are already there, so this only records that it has them).
    pub async fn upload_toolset(&self, token_file: &Path) {
        let security = ClientSecurity::load(&ClientSecurityOptions {
            token_file: Some(token_file.to_owned()),
            ..Default::default()
        })
        .unwrap();
        let address = self.addr.replace("http://", "grpc+http://");
        let tmp = tempfile::tempdir().unwrap();
        let store = kiln::castore::from_addr::from_addr_with(&address, tmp.path(), &security)
            .await
            .unwrap();
        let node = super::server::ingest_busybox(&store, tmp.path()).await;
        assert_eq!(node, self.busybox, "the same toolset");
    }
}

/// Writes `text` to a new 0600 file `name` in the server's directory.
pub fn secret_file(serve_dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = serve_dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
    path
}

/// Starts `req` over `Submit` and returns its stream once its log says
/// `marker` (so the builder runs).
pub async fn running(
    channel: KilnChannel,
    req: snix_build::BuildRequest,
    marker: &[u8],
) -> kiln::client::Follow {
    tokio::time::timeout(LIMIT, super::submit_until_log(channel, req, marker))
        .await
        .expect("the build did not start")
}

/// A free loopback port: bound, then released (the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET /healthz` on a `--metrics-listen` port: status code and body;
/// `(0, "")` when nothing answers there.
pub fn healthz(port: u16) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
    )
}
