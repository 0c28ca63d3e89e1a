//! A kiln server in this process, configured like `kiln serve`'s defaults
//! (512 MiB + 256 MiB guest RAM, 1 vCPU), and the client calls the bench
//! makes: `snix.build.v1.DoBuild` and `kiln.v1.BuildEvents.Submit`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use kiln::castore::{ingest, Node, Store};
use kiln::client::{submit_and_follow, EventSink, FollowError};
use kiln::executor::plan::Limits;
use kiln::executor::{Executor, ExecutorConfig};
use kiln::grpc::BUILD_ID_HEADER;
use kiln::guest_image::Artifacts;
use kiln::proto::kiln_v1::{submit_request, Phase, Started, SubmitRequest};
use kiln::proto::snix_build::build_request::{BuildConstraints, EnvVar};
use kiln::proto::snix_build::build_service_client::BuildServiceClient;
use kiln::proto::{snix_build, snix_castore};
use kiln::vmm::choose::choose;
use kiln::vmm::host::{AccelChoice, VmmChoice};
use kiln::vmm::VmRunner;
use tonic::transport::Channel;

/// Store basename of the busybox input (the builder `true` comes from it).
pub const BUSYBOX: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";
/// How often a failed build is retried before the bench gives up.
pub const RETRIES: usize = 2;

/// A running in-process server.
pub struct BenchServer {
    /// Where clients connect.
    pub addr: String,
    /// Its castore (for ingesting inputs).
    pub store: Store,
    /// The VMM backend it boots with (also used for the bare boots).
    pub runner: Arc<dyn VmRunner>,
    /// Kernel, modules, agent, busybox.
    pub artifacts: Artifacts,
    /// Where the cached base initramfs is written.
    pub cache_dir: PathBuf,
    /// Why builds get no network here, when they do not.
    pub network_unavailable: Option<String>,
    /// The egress table, kept for as long as the server runs.
    _firewall: Option<kiln::vmm::net::Firewall>,
    busybox: Node,
    failures: std::sync::Mutex<Vec<String>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts a server with its data under `work`, allowing `max_vms` VMs.
pub async fn start(work: &Path, max_vms: usize) -> anyhow::Result<BenchServer> {
    let artifacts = Artifacts::from_env().map_err(anyhow::Error::msg)?;
    artifacts
        .locate()
        .context("the guest artifacts are missing")?;
    let data_dir = work.join("data");
    let cache_dir = work.join("cache");
    let store = kiln::castore::from_addr("", &data_dir)
        .await
        .context("opening the embedded castore")?;
    let chosen = choose(VmmChoice::Auto, AccelChoice::Auto, false)
        .await
        .context("choosing a VMM")?;
    // As `kiln serve` sets it up by default: egress to public addresses.
    let (network, network_unavailable, firewall) =
        match kiln::vmm::net::NetworkSetup::from_flags(&Default::default()) {
            kiln::vmm::net::NetworkSetup::Ready { config, firewall } => {
                (Some(config), None, Some(firewall))
            }
            kiln::vmm::net::NetworkSetup::Unavailable(why) => (None, Some(why), None),
        };
    // `kiln serve`'s defaults, but for the VMs the bench may run at once,
    // a shorter timeout and smaller logs.
    let config = ExecutorConfig {
        data_dir,
        cache_dir: cache_dir.clone(),
        artifacts: artifacts.clone(),
        limits: Limits {
            nested_virt_available: chosen.nested_available,
            network_unavailable: network_unavailable.clone(),
            ..Limits::default()
        },
        timeout: Duration::from_secs(600),
        max_log_bytes: 8 << 20,
        max_vms,
        memory_budget_mib: 1024 * max_vms as u64,
        kept_log_bytes: 1 << 20,
        network,
        ..ExecutorConfig::default()
    };
    let runner = chosen.runner.clone();
    let executor = Arc::new(Executor::open(config, store.clone(), chosen.runner)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serve_store = store.clone();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        let bound = kiln::server::Bound::Tcp(listener);
        if let Err(e) = kiln::server::serve(bound, serve_store, executor, shutdown).await {
            eprintln!("kiln-bench: the server stopped: {e:#}");
        }
    });
    let busybox = ingest_busybox(&store, work).await?;
    Ok(BenchServer {
        addr,
        store,
        runner,
        artifacts,
        cache_dir,
        network_unavailable,
        _firewall: firewall,
        busybox,
        failures: Default::default(),
        shutdown: Some(tx),
    })
}

async fn ingest_busybox(store: &Store, work: &Path) -> anyhow::Result<Node> {
    let root = work.join("busybox-input");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(kiln::guest_image::DEFAULT_BUSYBOX, bin.join("busybox"))?;
    for applet in ["true", "sh"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(ingest::ingest_path(store, &root).await?)
}

/// When each phase of a submitted build was seen, and its guest RAM.
struct Timing {
    started: Instant,
    phases: Vec<(String, Duration)>,
    memory_mib: Option<u64>,
}

impl EventSink for Timing {
    fn phase(&mut self, _build_id: &str, p: &Phase) {
        self.phases.push((p.name.clone(), self.started.elapsed()));
    }

    fn started(&mut self, _build_id: &str, s: &Started) {
        self.memory_mib = Some(s.guest_memory_bytes >> 20);
    }
}

/// How one build went, seen from the client.
pub struct Finished {
    /// The server's build id.
    pub id: String,
    /// Request sent to answer received.
    pub wall: Duration,
    /// Request sent to each `kiln.v1` phase (only for [`BenchServer::submit`]).
    pub phases: Vec<(String, Duration)>,
    /// Guest RAM the build got, MiB (only for [`BenchServer::submit`]).
    pub memory_mib: Option<u64>,
}

impl Finished {
    /// When phase `name` was seen.
    pub fn phase(&self, name: &str) -> Option<Duration> {
        self.phases.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
    }
}

impl BenchServer {
    /// A new client connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(kiln::cli::connect(&self.addr).await?)
    }

    /// A trivial build (`true` from busybox) with `extra` inputs (named
    /// store basenames sorting after busybox's), no outputs.
    pub fn trivial_request(&self, extra: &[(String, Node)]) -> snix_build::BuildRequest {
        let bin = format!("/nix/store/{BUSYBOX}/bin");
        let mut inputs: Vec<snix_castore::Entry> =
            vec![self.busybox.to_snix_entry(BUSYBOX.as_bytes())];
        inputs.extend(
            extra
                .iter()
                .map(|(n, node)| node.to_snix_entry(n.as_bytes())),
        );
        let env = [
            ("HOME", "/homeless-shelter"),
            ("PATH", bin.as_str()),
            ("TMPDIR", "/build"),
        ];
        snix_build::BuildRequest {
            inputs,
            command_args: vec![format!("{bin}/true")],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: vec![],
            environment_vars: env
                .iter()
                .map(|(k, v)| EnvVar {
                    key: (*k).into(),
                    value: v.as_bytes().to_vec().into(),
                })
                .collect(),
            constraints: Some(BuildConstraints {
                system: "x86_64-linux".into(),
                ..Default::default()
            }),
            additional_files: vec![],
            refscan_needles: vec![],
        }
    }

    /// Runs `req` with `DoBuild` on a new connection (connecting is not
    /// timed). A failed build is recorded (see [`BenchServer::failures`])
    /// and retried, up to [`RETRIES`] times.
    pub async fn do_build(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        self.retrying("DoBuild", || self.do_build_once(req.clone()))
            .await
    }

    /// Runs `req` with `Submit`, timing each phase event as it arrives;
    /// retried like [`BenchServer::do_build`].
    pub async fn submit(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        self.retrying("Submit", || self.submit_once(req.clone()))
            .await
    }

    /// Builds that failed and were retried, with why.
    pub fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn retrying<F, Fut>(&self, what: &str, mut once: F) -> anyhow::Result<Finished>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Finished>>,
    {
        let mut attempt = 0;
        loop {
            match once().await {
                Ok(done) => return Ok(done),
                Err(e) if attempt < RETRIES => {
                    attempt += 1;
                    let why = format!("{what}: {e:#}");
                    eprintln!("kiln-bench: a build failed, retrying: {why}");
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(why);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn do_build_once(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        let channel = self.channel().await?;
        let started = Instant::now();
        let resp = BuildServiceClient::new(channel)
            .do_build(req)
            .await
            .map_err(|s| {
                let id = s
                    .metadata()
                    .get(BUILD_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                anyhow!("build {id} failed ({:?}): {}", s.code(), s.message())
            })?;
        let wall = started.elapsed();
        let id = resp
            .metadata()
            .get(BUILD_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Finished {
            id,
            wall,
            phases: vec![],
            memory_mib: None,
        })
    }

    async fn submit_once(&self, req: snix_build::BuildRequest) -> anyhow::Result<Finished> {
        let channel = self.channel().await?;
        let request = SubmitRequest {
            request: Some(submit_request::Request::Snix(req)),
            argv0: String::new(),
            limits: None,
        };
        let mut timing = Timing {
            started: Instant::now(),
            phases: Vec::new(),
            memory_mib: None,
        };
        match submit_and_follow(channel, request, &mut timing).await {
            Ok(done) => Ok(Finished {
                id: done.build_id,
                wall: timing.started.elapsed(),
                phases: timing.phases,
                memory_mib: timing.memory_mib,
            }),
            Err(FollowError::Failed { build_id, failed }) => bail!(
                "build {build_id} failed ({}): {}; log tail: {}",
                failed.kind,
                failed.message,
                String::from_utf8_lossy(&failed.log_tail)
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops serving.
    pub fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
