//! A kiln server in-process for the executor's end-to-end tests: embedded
//! castore in a temp dir, QEMU/TCG (or KVM where the host has it) booting the
//! real kernel and agent, served on 127.0.0.1:0, spoken to over gRPC.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln::castore::{ingest, Node, Store, WireNode};
use kiln::executor::plan::Limits;
use kiln::executor::{Executor, ExecutorConfig};
use kiln::guest_image::Artifacts;
use kiln::proto::{snix_build, snix_castore, tvix_build, tvix_castore};
use kiln::vmm::choose::choose;
use kiln::vmm::host::{AccelChoice, VmmChoice};
use tonic::transport::Channel;

/// The store basename busybox gets in test requests.
pub const BUSYBOX: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";
/// Applets linked next to busybox in the test toolset.
const APPLETS: &[&str] = &[
    "cat", "echo", "env", "ln", "ls", "mkdir", "sh", "sleep", "test", "touch", "grep", "id",
    "hostname", "pwd", "true", "false", "kill", "dd", "head", "wc", "rm", "chmod", "yes", "sort",
    "ip",
];

/// Options a test may change.
#[derive(Clone)]
pub struct Options {
    pub max_vms: usize,
    pub max_queue: usize,
    pub timeout: Duration,
    pub max_log_bytes: u64,
    pub memory_budget_mib: u64,
    /// Scratch limits (fault tests).
    pub scratch: kiln::executor::scratch::ScratchLimits,
    /// What a build's inputs may expand to.
    pub inputs: kiln::castore::materialise::Limits,
    /// Replaces the default kernel/agent artifacts (fault tests).
    pub artifacts: Option<Artifacts>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_vms: 2,
            max_queue: 16,
            timeout: Duration::from_secs(300),
            max_log_bytes: 8 * 1024 * 1024,
            memory_budget_mib: 8192,
            artifacts: None,
            scratch: Default::default(),
            inputs: Default::default(),
        }
    }
}

/// A running server.
pub struct TestServer {
    pub addr: String,
    pub store: Store,
    pub data_dir: PathBuf,
    pub busybox: Node,
    _tmp: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Why the VM tests cannot run here, if they cannot.
pub fn missing_prerequisites() -> Option<String> {
    let artifacts = Artifacts::default();
    if let Err(e) = artifacts.locate() {
        return Some(e.to_string());
    }
    if kiln::vmm::virtiofsd::find_binary().is_none() {
        return Some("virtiofsd not found (run `make deps`)".into());
    }
    if which("qemu-system-x86_64").is_none() {
        return Some("qemu-system-x86_64 not found (run `make deps`)".into());
    }
    None
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Starts a server, or returns `None` after saying loudly why it cannot.
pub async fn start(opts: Options) -> Option<TestServer> {
    if let Some(why) = missing_prerequisites() {
        eprintln!("SKIPPED: VM test cannot run on this host: {why}");
        if std::env::var_os("KILN_REQUIRE_VM_TESTS").is_some() {
            panic!("KILN_REQUIRE_VM_TESTS is set but VM tests cannot run: {why}");
        }
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let store = kiln::castore::from_addr("", &data_dir).await.unwrap();
    let chosen = choose(VmmChoice::Auto, AccelChoice::Auto, false)
        .await
        .unwrap();
    let config = ExecutorConfig {
        data_dir: data_dir.clone(),
        cache_dir: tmp.path().join("cache"),
        artifacts: opts.artifacts.clone().unwrap_or_default(),
        limits: Limits {
            min_guest_memory_mib: 512,
            guest_overhead_mib: 256,
            max_guest_memory_mib: 4096,
            vcpus: 1,
            nested_virt_available: chosen.nested_available,
            ro_path_allowlist: vec![],
        },
        timeout: opts.timeout,
        max_log_bytes: opts.max_log_bytes,
        scratch: opts.scratch,
        inputs: opts.inputs,
        max_vms: opts.max_vms,
        memory_budget_mib: opts.memory_budget_mib,
        max_queue: opts.max_queue,
        request_budget_bytes: kiln::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES,
        kept_builds: 64,
        kept_log_bytes: 1 << 20,
    };
    let executor = Arc::new(Executor::open(config, store.clone(), chosen.runner).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serve_store = store.clone();
    let task = tokio::spawn(async move {
        kiln::server::serve(
            kiln::server::Bound::Tcp(listener),
            serve_store,
            executor,
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
    });
    let busybox = ingest_busybox(&store, tmp.path()).await;
    Some(TestServer {
        addr,
        store,
        data_dir,
        busybox,
        _tmp: tmp,
        shutdown: Some(tx),
        task: Some(task),
    })
}

async fn ingest_busybox(store: &Store, tmp: &Path) -> Node {
    let root = tmp.join("busybox-input");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    ingest::ingest_path(store, &root).await.unwrap()
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        kiln::cli::connect(&self.addr).await.unwrap()
    }

    pub async fn snix(&self) -> snix_build::build_service_client::BuildServiceClient<Channel> {
        snix_build::build_service_client::BuildServiceClient::new(self.channel().await)
    }

    pub async fn tvix(&self) -> tvix_build::build_service_client::BuildServiceClient<Channel> {
        tvix_build::build_service_client::BuildServiceClient::new(self.channel().await)
    }

    /// The busybox input as a snix entry named [`BUSYBOX`].
    pub fn busybox_entry(&self) -> snix_castore::Entry {
        self.busybox.to_snix_entry(BUSYBOX.as_bytes())
    }

    /// The busybox input as a tvix node named [`BUSYBOX`].
    pub fn busybox_node(&self) -> tvix_castore::Node {
        self.busybox.to_tvix_node(BUSYBOX.as_bytes())
    }

    /// A Nix-shaped snix request running `script` with busybox's sh.
    pub fn snix_request(&self, script: &str, outputs: &[&str]) -> snix_build::BuildRequest {
        let sh = format!("/nix/store/{BUSYBOX}/bin/sh");
        let mut env = vec![
            ("HOME".to_string(), "/homeless-shelter".to_string()),
            ("PATH".to_string(), format!("/nix/store/{BUSYBOX}/bin")),
            ("TMPDIR".to_string(), "/build".to_string()),
        ];
        for (i, o) in outputs.iter().enumerate() {
            let key = if i == 0 {
                "out".to_string()
            } else {
                format!("out{i}")
            };
            env.push((key, format!("/{o}")));
        }
        env.sort();
        snix_build::BuildRequest {
            inputs: vec![self.busybox_entry()],
            command_args: vec![sh, "-c".into(), script.into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: outputs.iter().map(|o| o.to_string()).collect(),
            environment_vars: env
                .into_iter()
                .map(|(key, v)| snix_build::build_request::EnvVar {
                    key,
                    value: v.into_bytes().into(),
                })
                .collect(),
            constraints: Some(snix_build::build_request::BuildConstraints {
                system: "x86_64-linux".into(),
                ..Default::default()
            }),
            additional_files: vec![],
            refscan_needles: vec![],
        }
    }

    /// Reads a blob's bytes from the store.
    pub async fn read_blob(&self, digest: &kiln::castore::B3Digest) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut r = self.store.blobs.open_read(digest).await.unwrap().unwrap();
        let mut out = Vec::new();
        r.reader.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Builds `req` over `snix.build.v1` and returns the bytes of its first
    /// output, which must be a file.
    pub async fn build_first_file(&self, req: snix_build::BuildRequest) -> Vec<u8> {
        let resp = self.snix().await.do_build(req).await.unwrap().into_inner();
        self.read_file_entry(resp.outputs[0].output.as_ref().unwrap())
            .await
    }

    /// Reads a file output's bytes.
    pub async fn read_file_entry(&self, e: &snix_castore::Entry) -> Vec<u8> {
        let node = e.clone().try_into_anonymous().unwrap();
        match node {
            Node::File { digest, .. } => self.read_blob(&digest).await,
            other => panic!("expected a file output, got {other:?}"),
        }
    }

    /// Whether the health service answers SERVING, within 5 s.
    pub async fn healthy(&self) -> bool {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let mut client = HealthClient::new(self.channel().await);
        let check = client.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(Ok(answer)) => {
                answer.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }
            _ => false,
        }
    }

    /// Asserts no process or build directory of this server is left.
    pub async fn assert_nothing_left(&self) {
        let runs = self.data_dir.join("runs");
        // Cleanup runs when the build task ends; give it a moment.
        for _ in 0..50 {
            if leftovers(&runs).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("left behind: {:?}", leftovers(&runs));
    }

    pub async fn stop(mut self) {
        self.assert_nothing_left().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Build directories and processes that mention `runs`.
pub fn leftovers(runs: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runs) {
        for e in entries.flatten() {
            found.push(format!("dir {}", e.path().display()));
        }
    }
    let needle = runs.as_os_str().as_encoded_bytes();
    for pid in processes_mentioning(needle) {
        found.push(format!("process {pid}"));
    }
    found
}

/// PIDs of `program` (by the name of its executable) whose command line
/// mentions `runs`.
pub fn build_processes(runs: &Path, program: &str) -> Vec<i32> {
    processes_mentioning(runs.as_os_str().as_encoded_bytes())
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .and_then(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .map(|a| a.ends_with(program.as_bytes()))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// PIDs whose command line contains `needle`.
pub fn processes_mentioning(needle: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            // Zombies have an empty cmdline and hold nothing.
            if cmd.windows(needle.len()).any(|w| w == needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Submits `req` through `kiln.v1.BuildEvents` on `channel` and returns the
/// event stream once the builder has printed a line starting with `marker`.
pub async fn submit_until_log(
    channel: Channel,
    req: snix_build::BuildRequest,
    marker: &[u8],
) -> tonic::Streaming<kiln::proto::kiln_v1::BuildEvent> {
    use kiln::proto::kiln_v1::build_event::Event;
    use kiln::proto::kiln_v1::{submit_request, SubmitRequest};
    let mut client = kiln::proto::kiln_v1::build_events_client::BuildEventsClient::new(channel);
    let mut stream = client
        .submit(SubmitRequest {
            request: Some(submit_request::Request::Snix(req)),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(180), stream.message())
            .await
            .expect("the builder should print within 180 s")
            .unwrap()
            .expect("the stream ended before the builder printed");
        match ev.event {
            Some(Event::Log(c)) if c.data.starts_with(marker) => return stream,
            Some(Event::Failed(f)) => panic!("build failed before printing {marker:?}: {f:?}"),
            _ => {}
        }
    }
}

/// This process's resident set size, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
