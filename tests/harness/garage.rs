//! A real Garage cluster (an S3-compatible distributed object store) for one
//! test: `n` nodes on free loopback ports in a temporary directory, joined,
//! given a layout, with a bucket [`BUCKET`] and a fixed access key allowed on
//! it. Every node serves S3; nodes can be stopped and started again. All
//! nodes are killed and their directories removed on drop.
//!
//! The binary is `$KILN_GARAGE`, else the one `make deps` builds into
//! [`DEFAULT_BINARY`].

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `make deps` installs Garage.
pub const DEFAULT_BINARY: &str = "/var/cache/kiln/tools/garage-2.5.0/bin/garage";
/// The bucket every cluster has.
pub const BUCKET: &str = "kiln";
/// The access key allowed on [`BUCKET`] (Garage checks the lengths).
pub const KEY_ID: &str = "GK6b696c6e2d746573742d6b6579";
/// Its secret.
pub const SECRET: &str = "6b696c6e2d746573742d7365637265742d6b696c6e2d746573742d73656372";
/// The S3 region the nodes announce.
pub const REGION: &str = "garage";
/// How long a node, or the cluster, gets to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// The Garage binary tests use.
pub fn binary() -> PathBuf {
    std::env::var_os("KILN_GARAGE").map_or_else(|| PathBuf::from(DEFAULT_BINARY), PathBuf::from)
}

/// Why Garage tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    let bin = binary();
    if !bin.exists() {
        return Some(format!(
            "no Garage binary at {} (set KILN_GARAGE, or `make deps` builds it)",
            bin.display()
        ));
    }
    None
}

struct Node {
    config: PathBuf,
    log: PathBuf,
    rpc: u16,
    s3: u16,
    child: Option<Child>,
}

/// A running cluster.
pub struct Garage {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn wait_for_port(port: u16, what: &str, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not listen on 127.0.0.1:{port} within {STARTUP:?}; log: {}",
                tail(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or_default().to_owned()
}

impl Garage {
    /// `nodes` nodes storing each object `replication` times, up and
    /// serving [`BUCKET`] to [`KEY_ID`].
    pub fn start(nodes: usize, replication: usize) -> Result<Garage, String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-garage-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut garage = Garage {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..nodes {
            let (rpc, s3) = (free_port()?, free_port()?);
            let node_dir = garage.dir.path().join(format!("node{i}"));
            let config = node_dir.join("garage.toml");
            std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
            let toml = format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = {replication}\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 s3_region = \"{REGION}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                d = node_dir.display(),
                secret = "6b696c6e".repeat(8),
            );
            std::fs::write(&config, toml).map_err(|e| e.to_string())?;
            garage.nodes.push(Node {
                log: node_dir.join("server.log"),
                config,
                rpc,
                s3,
                child: None,
            });
        }
        for i in 0..nodes {
            garage.start_node(i)?;
        }
        let ids = (0..nodes)
            .map(|i| garage.cli(i, &["node", "id", "-q"]))
            .collect::<Result<Vec<_>, _>>()?;
        for id in &ids[1..] {
            garage.cli_retrying(0, &["node", "connect", id.trim()])?;
        }
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        let short: Vec<&str> = ids
            .iter()
            .map(|id| id.trim().split('@').next().unwrap_or(""))
            .collect();
        assign.extend(short.iter().copied());
        garage.cli_retrying(0, &assign)?;
        garage.cli_retrying(0, &["layout", "apply", "--version", "1"])?;
        garage.cli_retrying(0, &["bucket", "create", BUCKET])?;
        garage.cli_retrying(0, &["key", "import", "--yes", "-n", "kiln", KEY_ID, SECRET])?;
        garage.cli_retrying(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "kiln",
            ],
        )?;
        Ok(garage)
    }

    /// Node `i`'s S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3)
    }

    /// The `--blob-store` address of [`BUCKET`] under `prefix`, through node 0.
    pub fn address(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint={}&region={REGION}",
            self.endpoint(0)
        )
    }

    /// A credentials file (`KEY_ID:SECRET`) for `--blob-store-credentials`.
    pub fn credentials_file(&self) -> PathBuf {
        let path = self.dir.path().join("credentials");
        if !path.exists() {
            std::fs::write(&path, format!("{KEY_ID}:{SECRET}\n")).unwrap();
        }
        path
    }

    /// Kills node `i` (as a crash would).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` (again) and waits until it listens.
    pub fn start_node(&mut self, i: usize) -> Result<(), String> {
        self.stop_node(i);
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary().display()))?;
        node.child = Some(child);
        let what = format!("garage node {i}");
        wait_for_port(node.rpc, &what, &node.log)?;
        wait_for_port(node.s3, &what, &node.log)
    }

    /// Runs the CLI against node `i`; its stdout.
    fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(binary())
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("garage {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "garage {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Garage::cli`], tried again while the cluster settles.
    fn cli_retrying(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            match self.cli(i, args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }
}
