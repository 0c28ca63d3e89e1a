//! Kiln servers in this process, configured like `kiln serve`'s defaults
//! (512 MiB + 256 MiB guest RAM, 1 vCPU) except where [`Options`] says:
//! the warm pool, the guest kernel, TCG's code cache, network. The first
//! one ([`start`]) chooses the VMM as `kiln serve --vmm auto` does; the
//! others ([`BenchServer::sibling`]) boot with the same choice, so every
//! comparison in a run is on one VMM. The requests the bench sends are in
//! [`crate::builds`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln::castore::{ingest, Node, Store};
use kiln::executor::config::defaults;
use kiln::executor::plan::Limits;
use kiln::executor::pool::PoolStats;
use kiln::executor::{Executor, ExecutorConfig};
use kiln::guest_image::{Artifacts, KernelChoice};
use kiln::vmm::choose::{choose, Chosen};
use kiln::vmm::host::{Accel, AccelChoice, Vmm, VmmChoice, QEMU_BINARY};
use kiln::vmm::qemu::QemuRunner;
use kiln::vmm::VmRunner;

use crate::machine;

/// Store basename of the busybox input (the builders come from it).
pub const BUSYBOX: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";
/// The busybox applets the bench's builders call.
const APPLETS: &[&str] = &["true", "sh", "dd", "gzip", "sha256sum"];
/// How long the pool may take to have its VMs waiting.
pub const POOL_WAIT: Duration = Duration::from_secs(60);
/// The servers' limit on one build's wall time.
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a stopped server's VMs may take to go.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// How a bench server differs from `kiln serve`'s defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent VMs (the guest memory budget is 1 GiB per VM).
    pub max_vms: usize,
    /// VMs kept booted ahead of builds (`--warm-vms`); 0: none.
    pub warm_vms: usize,
    /// The guest kernel; `None`: `KILN_KERNEL`, else kiln's own.
    pub kernel: Option<KernelChoice>,
    /// TCG's code cache, MiB, instead of kiln's (0: QEMU's default);
    /// only under QEMU/TCG (see [`BenchServer::is_tcg`]).
    pub tb_size_mib: Option<u32>,
    /// Builds may ask for network (egress to public addresses, as `kiln
    /// serve` sets it up). One server at a time: the egress table is per
    /// process.
    pub network: bool,
}

impl Options {
    /// No pool, the configured kernel, kiln's QEMU settings, no network.
    pub fn cold(max_vms: usize) -> Self {
        Self {
            max_vms,
            warm_vms: 0,
            kernel: None,
            tb_size_mib: None,
            network: false,
        }
    }

    /// As [`Options::cold`], with a pool of `warm_vms`.
    pub fn warm(max_vms: usize, warm_vms: usize) -> Self {
        Self {
            warm_vms,
            ..Self::cold(max_vms)
        }
    }
}

/// The VMM every server of a run boots with.
#[derive(Clone)]
struct Host {
    runner: Arc<dyn VmRunner>,
    nested_available: bool,
    /// The QEMU binary, when the choice is QEMU/TCG (for other code caches).
    tcg_qemu: Option<PathBuf>,
}

impl Host {
    fn new(chosen: Chosen) -> Self {
        let tcg = chosen.selection.vmm == Vmm::Qemu && chosen.selection.accel == Accel::Tcg;
        let tcg_qemu = tcg.then(|| {
            chosen
                .facts
                .qemu
                .as_ref()
                .map_or_else(|| PathBuf::from(QEMU_BINARY), |t| t.path.clone())
        });
        Self {
            runner: chosen.runner,
            nested_available: chosen.nested_available,
            tcg_qemu,
        }
    }

    /// The runner for `tb_size_mib`: the chosen one, or QEMU/TCG with that
    /// code cache.
    fn runner(&self, tb_size_mib: Option<u32>) -> anyhow::Result<Arc<dyn VmRunner>> {
        let Some(tb_size_mib) = tb_size_mib else {
            return Ok(self.runner.clone());
        };
        let Some(binary) = &self.tcg_qemu else {
            bail!(
                "a TCG code cache size was asked for, but builds run on {} / {}",
                self.runner.name(),
                self.runner.accel()
            );
        };
        Ok(Arc::new(QemuRunner {
            accel: Accel::Tcg,
            binary: binary.clone(),
            tb_size_mib,
        }))
    }
}

/// Builds that failed and were retried, shared by a run's servers.
pub type Failures = Arc<Mutex<Vec<String>>>;

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
    /// The busybox input every request carries.
    pub busybox: Node,
    /// Shared with the run's other servers.
    pub failures: Failures,
    /// Its data, cache and inputs.
    work: PathBuf,
    /// Its build directories (each VMM's command line names its own).
    runs_dir: PathBuf,
    /// Where siblings put their data.
    root: PathBuf,
    host: Host,
    executor: Arc<Executor>,
    /// The egress table, kept for as long as the server runs.
    _firewall: Option<kiln::vmm::net::Firewall>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
}

/// The artifacts a server with `kernel` boots (see [`Options::kernel`]),
/// checked to exist.
pub fn artifacts(kernel: Option<&KernelChoice>) -> anyhow::Result<Artifacts> {
    let mut artifacts = Artifacts::from_env().map_err(anyhow::Error::msg)?;
    if let Some(kernel) = kernel {
        artifacts.kernel_dir = kernel.dir(Path::new(defaults::CACHE_DIR));
    }
    artifacts
        .locate()
        .context("the guest artifacts are missing")?;
    Ok(artifacts)
}

/// Starts the run's first server, with its data under `root/main`,
/// choosing the VMM for the whole run.
pub async fn start(root: &Path, options: &Options) -> anyhow::Result<BenchServer> {
    let chosen = choose(VmmChoice::Auto, AccelChoice::Auto, false)
        .await
        .context("choosing a VMM")?;
    let host = Host::new(chosen);
    start_in(root, "main", options, host, Failures::default()).await
}

impl BenchServer {
    /// Starts another server on the same VMM, with its data under
    /// `<root>/<name>` and its failed builds recorded with this one's.
    pub async fn sibling(&self, name: &str, options: &Options) -> anyhow::Result<BenchServer> {
        start_in(
            &self.root,
            name,
            options,
            self.host.clone(),
            self.failures.clone(),
        )
        .await
        .with_context(|| format!("starting the {name} server"))
    }

    /// Whether builds run under QEMU/TCG (so [`Options::tb_size_mib`] applies).
    pub fn is_tcg(&self) -> bool {
        self.host.tcg_qemu.is_some()
    }

    /// What appears in the command line of this server's VMMs (its runs
    /// directory), and no other server's.
    pub fn vmm_pattern(&self) -> String {
        format!("{}/", self.runs_dir.display())
    }

    /// What appears in the command line of this server's pool VMs only.
    pub fn warm_vmm_pattern(&self) -> String {
        format!("{}/warm-", self.runs_dir.display())
    }

    /// Why servers of this run can have no warm pool, if they cannot.
    pub fn pool_unavailable(&self) -> Option<String> {
        (!self.runner.two_way_channel()).then(|| {
            format!(
                "{} has a one-way guest channel, so kiln runs it without a warm pool",
                self.runner.name()
            )
        })
    }

    /// The pool's counters, when this server has a pool.
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.executor.pool().map(|p| p.stats())
    }

    /// Waits until `n` pool VMs wait and none boots, at most [`POOL_WAIT`].
    pub async fn wait_for_pool(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + POOL_WAIT;
        loop {
            let Some(stats) = self.pool_stats() else {
                bail!(
                    "this server has no warm pool ({} has a one-way guest channel, or warm_vms is 0)",
                    self.runner.name()
                );
            };
            if stats.waiting >= n && stats.booting == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the warm pool did not have {n} VM(s) waiting within {} s: {stats:?}",
                    POOL_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving and waits (at most a minute) until every VM of this
    /// server, pool VMs included, is gone; then removes its data.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(serving) = self.serving.take() {
            let _ = tokio::time::timeout(STOP_WAIT, serving).await;
        }
        let pattern = self.vmm_pattern();
        let work = self.work.clone();
        // The last handle on the executor: dropping it stops the pool.
        drop(self);
        let deadline = Instant::now() + STOP_WAIT;
        while !machine::vmms(&pattern).is_empty() {
            if Instant::now() > deadline {
                bail!(
                    "VMs under {pattern} still run {} s after their server stopped",
                    STOP_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = kiln::executor::workspace::remove_tree(&work);
        Ok(())
    }
}

async fn start_in(
    root: &Path,
    name: &str,
    options: &Options,
    host: Host,
    failures: Failures,
) -> anyhow::Result<BenchServer> {
    let artifacts = artifacts(options.kernel.as_ref())?;
    let work = root.join(name);
    let data_dir = work.join("data");
    let cache_dir = work.join("cache");
    let store = kiln::castore::from_addr("", &data_dir)
        .await
        .context("opening the embedded castore")?;
    let (network, network_unavailable, firewall) = network(options.network);
    let runner = host.runner(options.tb_size_mib)?;
    // `kiln serve`'s defaults, but for the VMs the bench may run at once,
    // a shorter timeout (the slowest bench build takes seconds; a hung one
    // is retried after this) and smaller logs.
    let config = ExecutorConfig {
        data_dir: data_dir.clone(),
        cache_dir: cache_dir.clone(),
        artifacts: artifacts.clone(),
        limits: Limits {
            nested_virt_available: host.nested_available,
            network_unavailable: network_unavailable.clone(),
            ..Limits::default()
        },
        timeout: BUILD_TIMEOUT,
        max_log_bytes: 8 << 20,
        max_vms: options.max_vms,
        memory_budget_mib: 1024 * options.max_vms as u64,
        warm_vms: options.warm_vms,
        kept_log_bytes: 1 << 20,
        network,
        ..ExecutorConfig::default()
    };
    let executor = Arc::new(Executor::open(config, store.clone(), runner.clone())?);
    executor.start_pool();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let (store, executor) = (store.clone(), executor.clone());
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            let bound = kiln::server::Bound::Tcp(listener);
            if let Err(e) = kiln::server::serve(bound, store, executor, shutdown).await {
                eprintln!("kiln-bench: the server stopped: {e:#}");
            }
        })
    };
    let busybox = ingest_busybox(&store, &work).await?;
    Ok(BenchServer {
        addr,
        store,
        runner,
        artifacts,
        cache_dir,
        network_unavailable,
        busybox,
        failures,
        runs_dir: data_dir.join("runs"),
        work,
        root: root.to_owned(),
        host,
        executor,
        _firewall: firewall,
        shutdown: Some(tx),
        serving: Some(serving),
    })
}

type Network = (
    Option<kiln::vmm::net::NetworkConfig>,
    Option<String>,
    Option<kiln::vmm::net::Firewall>,
);

/// Network as `kiln serve` sets it up by default, or none.
fn network(wanted: bool) -> Network {
    if !wanted {
        let why = kiln::executor::config::NO_NETWORK_CONFIGURED.to_owned();
        return (None, Some(why), None);
    }
    match kiln::vmm::net::NetworkSetup::from_flags(&Default::default()) {
        kiln::vmm::net::NetworkSetup::Ready { config, firewall } => {
            (Some(config), None, Some(firewall))
        }
        kiln::vmm::net::NetworkSetup::Unavailable(why) => (None, Some(why), None),
    }
}

async fn ingest_busybox(store: &Store, work: &Path) -> anyhow::Result<Node> {
    let root = work.join("busybox-input");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(kiln::guest_image::DEFAULT_BUSYBOX, bin.join("busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(ingest::ingest_path(store, &root).await?)
}
