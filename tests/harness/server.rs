//! A kiln server in this process for the end-to-end tests: embedded castore
//! in a temp dir, the VMM `kiln serve` would choose (QEMU/TCG here) booting
//! the real kernel and agent, served on 127.0.0.1:0, spoken to over gRPC.

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
use kiln::vmm::{RunningVm, VmRunner, VmSpec, VmmError};
use tonic::transport::Channel;

use super::fixtures::{busybox_tree, nix_request, BUSYBOX};
use super::gate::vm_tests_can_run;
use super::procs::{build_leftovers, leftovers};

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
    /// Memory all held requests may take together.
    pub request_budget_bytes: usize,
    /// VMs kept booted ahead of builds (`kiln serve --warm-vms`); the
    /// suite runs with `kiln serve`'s default.
    pub warm_vms: usize,
    /// Serve Prometheus metrics on a loopback port of their own
    /// (`kiln serve --metrics-listen`): [`TestServer::metrics_addr`].
    pub metrics: bool,
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
            request_budget_bytes: kiln::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES,
            warm_vms: kiln::executor::config::defaults::WARM_VMS,
            metrics: false,
        }
    }
}

/// A running server.
pub struct TestServer {
    pub addr: String,
    pub store: Store,
    pub data_dir: PathBuf,
    pub busybox: Node,
    /// Where the metrics are served (`http://ADDR/metrics`), with
    /// [`Options::metrics`].
    pub metrics_addr: Option<std::net::SocketAddr>,
    metrics_stop: tokio_util::sync::CancellationToken,
    _tmp: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The server's executor, weakly: the server owns it, so stopping the
    /// server drops it (and its warm pool).
    executor: std::sync::Weak<Executor>,
}

/// Starts a server, or returns `None` when VMs cannot boot here (see
/// [`vm_tests_can_run`]: the skip is printed, or the test fails under
/// `KILN_REQUIRE_VM_TESTS`). Call it on the test's own thread, so the skip
/// names the test.
pub async fn start(opts: Options) -> Option<TestServer> {
    if !vm_tests_can_run() {
        return None;
    }
    let chosen = choose(VmmChoice::Auto, AccelChoice::Auto, false)
        .await
        .unwrap();
    Some(serve(opts, chosen.runner, chosen.nested_available).await)
}

/// Starts a server whose VMM boots nothing, for what is refused before a
/// VM is taken (request rules over the wire, host preconditions, missing
/// inputs, budgets): it runs on any host. A build that gets as far as
/// booting fails with UNAVAILABLE.
pub async fn start_without_vms(opts: Options) -> TestServer {
    serve(opts, Arc::new(NoVms), false).await
}

async fn serve(opts: Options, runner: Arc<dyn VmRunner>, nested_virt: bool) -> TestServer {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let store = kiln::castore::from_addr("", &data_dir).await.unwrap();
    let config = ExecutorConfig {
        data_dir: data_dir.clone(),
        cache_dir: tmp.path().join("cache"),
        artifacts: opts
            .artifacts
            .clone()
            .unwrap_or_else(|| Artifacts::from_env().expect("KILN_KERNEL names a kernel")),
        limits: Limits {
            min_guest_memory_mib: 512,
            guest_overhead_mib: 256,
            max_guest_memory_mib: 4096,
            vcpus: 1,
            nested_virt_available: nested_virt,
            ro_path_allowlist: vec![],
            network_unavailable: Some(kiln::executor::config::NO_NETWORK_CONFIGURED.into()),
        },
        timeout: opts.timeout,
        max_log_bytes: opts.max_log_bytes,
        scratch: opts.scratch,
        inputs: opts.inputs,
        max_vms: opts.max_vms,
        memory_budget_mib: opts.memory_budget_mib,
        max_queue: opts.max_queue,
        tenants: Default::default(),
        request_budget_bytes: opts.request_budget_bytes,
        warm_vms: opts.warm_vms,
        kept_builds: 64,
        kept_log_bytes: 1 << 20,
        network: None,
    };
    let mut executor = Executor::open(config, store.clone(), runner).unwrap();
    // As `kiln serve --metrics-listen` wires them.
    let metrics = opts.metrics.then(|| kiln::metrics::follow(&mut executor));
    let executor = Arc::new(executor);
    executor.start_pool();
    let weak = Arc::downgrade(&executor);
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    let mut metrics_addr = None;
    if let Some(metrics) = metrics {
        let listener = kiln::metrics::http::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        metrics_addr = Some(listener.local_addr().unwrap());
        let sources = kiln::metrics::gauges::Sources {
            executor: weak.clone(),
            store: store.clone(),
            health: None,
        };
        tokio::spawn(kiln::metrics::http::serve(
            listener,
            metrics,
            sources,
            metrics_stop.clone(),
        ));
    }
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
    TestServer {
        addr,
        store,
        data_dir,
        busybox,
        metrics_addr,
        metrics_stop,
        _tmp: tmp,
        shutdown: Some(tx),
        task: Some(task),
        executor: weak,
    }
}

/// A VMM that boots nothing.
struct NoVms;

#[async_trait::async_trait]
impl VmRunner for NoVms {
    fn name(&self) -> &'static str {
        "none"
    }

    fn accel(&self) -> &'static str {
        "none"
    }

    async fn start(&self, _spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        Err(VmmError::Unsupported("this test server boots no VM".into()))
    }
}

/// Ingests the toolset ([`busybox_tree`]) built under `tmp`.
pub async fn ingest_busybox(store: &Store, tmp: &Path) -> Node {
    let root = tmp.join("busybox-input");
    busybox_tree(&root);
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

    /// A Nix-shaped snix request running `script` with busybox's sh (see
    /// [`nix_request`]).
    pub fn snix_request(&self, script: &str, outputs: &[&str]) -> snix_build::BuildRequest {
        nix_request(self.busybox_entry(), script, outputs)
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

    /// The warm pool's counters (`None` without a pool).
    pub fn pool_stats(&self) -> Option<kiln::executor::pool::PoolStats> {
        let executor = self.executor.upgrade()?;
        let stats = executor.pool().map(|p| p.stats());
        stats
    }

    /// Waits (bounded, 60 s) until the warm pool's counters satisfy `ok`.
    pub async fn until_pool(
        &self,
        what: &str,
        ok: impl Fn(&kiln::executor::pool::PoolStats) -> bool,
    ) -> kiln::executor::pool::PoolStats {
        for _ in 0..600 {
            if let Some(s) = self.pool_stats().filter(|s| ok(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the warm pool never got to: {what} (now {:?})",
            self.pool_stats()
        );
    }

    /// Asserts no process or build directory of a build is left (the warm
    /// pool's waiting VMs are the server's, not a build's: [`Self::stop`]
    /// checks that they go too).
    pub async fn assert_nothing_left(&self) {
        let runs = self.data_dir.join("runs");
        // Cleanup runs when the build task ends; give it a moment.
        for _ in 0..50 {
            if build_leftovers(&runs).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("left behind: {:?}", build_leftovers(&runs));
    }

    /// Checks no build left anything, stops serving, and checks that the
    /// warm pool's VMs went with the server.
    pub async fn stop(mut self) {
        self.assert_nothing_left().await;
        self.metrics_stop.cancel();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let runs = self.data_dir.join("runs");
        for _ in 0..150 {
            if leftovers(&runs).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("left behind after shutdown: {:?}", leftovers(&runs));
    }
}
