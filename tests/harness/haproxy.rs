//! A real HAProxy in front of kiln hosts, configured as README's "Running
//! several hosts" says: gRPC (HTTP/2 cleartext) on a loopback port,
//! least-connections balancing, each host checked over HTTP at its
//! `/healthz` (up or not: a draining host answers 503) and weighted by its
//! agent (`--lb-agent-listen`: a full host gets 0%, so new builds go to
//! hosts with room; each host is listed again as a backup for when none
//! has room), a refused connection retried on another host.
//! Killed on drop.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's HAProxy.
pub const BINARY: &str = "/usr/sbin/haproxy";

/// Why HAProxy tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    (!Path::new(BINARY).exists())
        .then(|| format!("{BINARY} is missing (Debian's haproxy; `make deps` installs it)"))
}

/// One kiln host behind the balancer.
pub struct Backend {
    /// Its name in HAProxy's config and logs.
    pub name: String,
    /// Its gRPC port on 127.0.0.1.
    pub port: u16,
    /// Its metrics port on 127.0.0.1 (`/healthz`).
    pub health_port: u16,
    /// Its `--lb-agent-listen` port on 127.0.0.1.
    pub agent_port: u16,
}

/// The running balancer.
pub struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

/// The configuration README documents, for `backends`, listening on
/// `port`. Checks every 300 ms here (README: 1 s) so tests wait less.
pub fn config(port: u16, backends: &[Backend]) -> String {
    let mut servers = String::new();
    for b in backends {
        servers.push_str(&format!(
            "    server {} 127.0.0.1:{} proto h2 weight 100 check port {} check-proto h1 inter 300ms fall 1 rise 1 agent-check agent-port {} agent-inter 300ms\n",
            b.name, b.port, b.health_port, b.agent_port
        ));
    }
    // The same hosts again, used only when no host has room (every agent
    // said 0%): then builds queue on them, least busy first.
    for b in backends {
        servers.push_str(&format!(
            "    server {}-spare 127.0.0.1:{} proto h2 backup check port {} check-proto h1 inter 300ms fall 1 rise 1\n",
            b.name, b.port, b.health_port
        ));
    }
    format!(
        "global
    maxconn 1000

defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response

frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend kiln

backend kiln
    balance leastconn
    option allbackups
    option httpchk GET /healthz
    http-check expect status 200
{servers}"
    )
}

impl Haproxy {
    /// Starts HAProxy in front of `backends` on a free loopback port.
    pub fn start(backends: &[Backend]) -> Result<Haproxy, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config(port, backends)).map_err(|e| e.to_string())?;
        let check = Command::new(BINARY)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .map_err(|e| format!("haproxy -c: {e}"))?;
        if !check.status.success() {
            return Err(format!(
                "haproxy refused its config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            ));
        }
        let log =
            std::fs::File::create(dir.path().join("haproxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new(BINARY)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting haproxy: {e}"))?;
        let proxy = Haproxy { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("haproxy did not listen:\n{}", proxy.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proxy)
    }

    /// `http://127.0.0.1:PORT`, for gRPC clients.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What HAProxy printed (server state changes among it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
