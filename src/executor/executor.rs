//! The executor: one fresh microVM per build request.
//!
//! A build goes through these steps, each a named function:
//! 1. `plan` — constraints checked, VM sized, agent job written (pure);
//! 2. `admit` — wait for a VM slot and guest memory (bounded queue);
//! 3. `materialise_inputs` — castore nodes become the read-only share,
//!    hardlinked from the blob store where possible;
//! 4. `boot` — one virtiofsd per share, the initramfs (cached base + job),
//!    then the VMM;
//! 5. `supervise` — the agent's log streamed into the build log until its
//!    report, with timeout, cancellation and log limit;
//! 6. `collect_outputs` — every declared output must exist; each is scanned
//!    for needles and ingested into the castore, moving file bytes.
//!
//! Everything a build holds (VMM, virtiofsd, its directory) is owned by
//! guards that release it on every path, including cancellation: the build
//! runs as its own task, and a dropped client only cancels a token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_guest::contract::{self, Outcome, Report};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use crate::castore::materialise::{self, Control, Expansion, MaterialiseError};
use crate::castore::{self, Node, Store};
use crate::executor::admission::Admission;
use crate::executor::collect;
use crate::executor::error::BuildError;
use crate::executor::events::{BuildLog, Registry};
use crate::executor::paths::RelPath;
use crate::executor::plan::{self, VmPlan};
use crate::executor::request::BuildRequest;
use crate::executor::supervise::{self, supervise};
use crate::executor::workspace::Workspace;
use crate::guest_image;
use crate::proto::kiln_v1::{self, build_event::Event};
use crate::vmm::virtiofsd::Virtiofsd;
use crate::vmm::{FsShare, VmRunner, VmSpec};

pub use crate::executor::config::ExecutorConfig;

/// A successful build: each output in request order, with its needles.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// (output path, castore node, indexes of needles found).
    pub outputs: Vec<(RelPath, Node, Vec<u64>)>,
    /// The agent's report.
    pub report: Report,
}

/// Runs builds.
pub struct Executor {
    config: ExecutorConfig,
    store: Store,
    runner: Arc<dyn VmRunner>,
    admission: Admission,
    registry: Registry,
    base_image: OnceCell<PathBuf>,
}

impl Executor {
    /// An executor booting VMs with `runner` and storing into `store`.
    pub fn new(config: ExecutorConfig, store: Store, runner: Arc<dyn VmRunner>) -> Self {
        Self {
            admission: Admission::new(config.max_vms, config.memory_budget_mib, config.max_queue),
            registry: Registry::new(config.kept_builds, config.kept_log_bytes),
            config,
            store,
            runner,
            base_image: OnceCell::new(),
        }
    }

    /// Like [`Executor::new`], after sweeping what a crashed kiln left in
    /// the runs directory (processes, build directories).
    pub fn open(
        config: ExecutorConfig,
        store: Store,
        runner: Arc<dyn VmRunner>,
    ) -> std::io::Result<Self> {
        let runs = config.data_dir.join("runs");
        let swept = crate::executor::workspace::sweep(&runs)?;
        if !swept.killed.is_empty() || !swept.removed.is_empty() {
            tracing::warn!(
                killed = ?swept.killed,
                removed = swept.removed.len(),
                "swept leftovers of an earlier kiln"
            );
        }
        Ok(Self::new(config, store, runner))
    }

    /// The build logs this server keeps.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The memory budget of held requests, bytes.
    pub fn request_budget_bytes(&self) -> usize {
        self.config.request_budget_bytes
    }

    /// The castore builds read from and write to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where build directories live.
    pub fn runs_dir(&self) -> PathBuf {
        self.config.data_dir.join("runs")
    }

    /// Starts a build as its own task. The returned token cancels it; the
    /// handle yields its result once everything it held is released.
    pub fn start(
        self: &Arc<Self>,
        req: BuildRequest,
        client_deadline: Option<Duration>,
    ) -> (
        Arc<BuildLog>,
        CancellationToken,
        tokio::task::JoinHandle<Result<BuildOutcome, BuildError>>,
    ) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let log = self.registry.create(id.clone());
        let cancel = CancellationToken::new();
        let timeout = client_deadline.map_or(self.config.timeout, |d| d.min(self.config.timeout));
        let this = self.clone();
        let task_log = log.clone();
        let task_cancel = cancel.clone();
        let span = info_span!("build", id = %id);
        let handle = tokio::spawn(
            async move {
                let started = Instant::now();
                let result = this.run(&req, &task_log, &task_cancel, timeout).await;
                match &result {
                    Ok(outcome) => {
                        info!(elapsed_ms = started.elapsed().as_millis() as u64, outputs = outcome.outputs.len(), "build succeeded");
                        for (path, node, needles) in &outcome.outputs {
                            task_log.emit(Event::Output(kiln_v1::Output {
                                path: path.to_string(),
                                entry: Some(node.to_snix_entry(b"")),
                                needles: needles.clone(),
                            }));
                        }
                    }
                    Err(e) => {
                        info!(elapsed_ms = started.elapsed().as_millis() as u64, kind = e.kind(), error = %e, "build failed");
                        task_log.emit(Event::Failed(e.to_failed()));
                    }
                }
                result
            }
            .instrument(span),
        );
        (log, cancel, handle)
    }

    async fn run(
        &self,
        req: &BuildRequest,
        log: &BuildLog,
        cancel: &CancellationToken,
        timeout: Duration,
    ) -> Result<BuildOutcome, BuildError> {
        let deadline = Instant::now() + timeout;
        let plan = plan::plan(req, &self.config.limits)?;
        let trees = self.check_inputs(req).await?;
        log.phase("queued");
        let ticket = tokio::select! {
            t = self.admission.admit(plan.memory_mib).instrument(info_span!("admit")) => t?,
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        log.emit(Event::Started(kiln_v1::Started {
            vmm: self.runner.name().into(),
            accel: self.runner.accel().into(),
            guest_memory_bytes: plan.memory_mib * 1024 * 1024,
            vcpus: plan.vcpus,
        }));
        info!(
            memory_mib = plan.memory_mib,
            vmm = self.runner.name(),
            "admitted"
        );
        let ws = Workspace::create(&self.runs_dir(), log.id())
            .map_err(|e| BuildError::infra("create build directory", &e))?;
        let steps = Steps {
            req,
            plan: &plan,
            ws: &ws,
            log,
            cancel,
            deadline,
            timeout,
        };
        let result = self.run_steps(&steps, trees, ticket).await;
        // Removing the build directory is timed on its own (it grows with
        // the inputs); it runs off the async workers, on every path.
        ws.remove().instrument(info_span!("cleanup")).await;
        result
    }

    /// Steps 3 to 6, in the build's directory.
    async fn run_steps(
        &self,
        steps: &Steps<'_>,
        trees: Vec<InputTree>,
        ticket: crate::executor::admission::Ticket,
    ) -> Result<BuildOutcome, BuildError> {
        let Steps { log, deadline, .. } = *steps;
        log.phase("materialise");
        self.materialise_inputs(steps, trees)
            .instrument(info_span!("materialise"))
            .await?;

        log.phase("boot");
        let remaining = deadline.saturating_duration_since(Instant::now());
        let report = self
            .boot_and_supervise(
                steps.req,
                steps.plan,
                steps.ws,
                log,
                steps.cancel,
                remaining,
            )
            .await?;
        // The VM and its daemons are gone: its slot and memory go back now,
        // not after ingest.
        drop(ticket);
        info!(
            boot_ms = report.boot_ms,
            setup_ms = report.setup_ms,
            build_ms = report.build_ms,
            "agent report"
        );
        match &report.outcome {
            Outcome::Exited { code: 0 } => {}
            Outcome::Exited { code } => {
                return Err(BuildError::BuilderExited {
                    code: *code,
                    log_tail: log.tail(),
                })
            }
            Outcome::Signaled { signal } => {
                return Err(BuildError::BuilderSignaled {
                    signal: *signal,
                    log_tail: log.tail(),
                })
            }
            Outcome::AgentFailed { step, message } => {
                return Err(BuildError::AgentFailed {
                    step: step.clone(),
                    message: message.clone(),
                    log_tail: log.tail(),
                })
            }
        }

        log.phase("ingest");
        let outputs = collect::collect_outputs(
            &self.store,
            steps,
            &self.config.scratch,
            self.config.inputs.max_entries,
        )
        .instrument(info_span!("ingest"))
        .await?;
        Ok(BuildOutcome { outputs, report })
    }

    /// Step 2a, before a VM slot is taken: every input's directories are
    /// fetched and what they expand to on disk is checked against the
    /// operator's limits (a few KB of directories can stand for millions
    /// of entries).
    async fn check_inputs(&self, req: &BuildRequest) -> Result<Vec<InputTree>, BuildError> {
        let mut trees = Vec::with_capacity(req.inputs.len());
        let mut total = Expansion::default();
        for (index, (name, node)) in req.inputs.iter().enumerate() {
            let tree = materialise::fetch_tree(&self.store, node)
                .await
                .map_err(|e| input_error(index, name, e))?;
            let expansion =
                materialise::expansion(node, &tree).map_err(|e| input_error(index, name, e))?;
            total = total.plus(expansion);
            trees.push(tree);
        }
        total.check(&self.config.inputs).map_err(|e| {
            BuildError::Precondition(format!(
                "inputs: {e} (set by --max-input-entries, --max-input-mib)"
            ))
        })?;
        Ok(trees)
    }

    /// Step 3: inputs into the read-only share, scratch paths created, all
    /// through directory handles, cancellably and under the deadline.
    async fn materialise_inputs(
        &self,
        steps: &Steps<'_>,
        trees: Vec<InputTree>,
    ) -> Result<(), BuildError> {
        let Steps { req, ws, .. } = *steps;
        let inputs = ws
            .inputs_dir()
            .map_err(|e| BuildError::infra("open the inputs share", &e))?;
        let control = Control {
            cancel: Some(steps.cancel.clone()),
            deadline: Some(steps.deadline),
            min_free_bytes: self.config.scratch.min_free_bytes,
        };
        for (index, ((name, node), tree)) in req.inputs.iter().zip(trees).enumerate() {
            let dir = inputs
                .try_clone()
                .map_err(|e| BuildError::infra("open the inputs share", &e))?;
            let origin = PathBuf::from(format!("/{}/{name}", req.inputs_dir));
            materialise::materialise_at(
                &self.store,
                dir,
                name.to_os_str().to_owned(),
                node,
                tree,
                origin,
                control.clone(),
            )
            .await
            .map_err(|e| match e {
                MaterialiseError::Cancelled => BuildError::Cancelled,
                MaterialiseError::Deadline => BuildError::Timeout {
                    secs: steps.timeout_secs(),
                    log_tail: Vec::new(),
                },
                e => input_error(index, name, e),
            })?;
        }
        let scratch = ws
            .scratch_dir()
            .map_err(|e| BuildError::infra("open the scratch share", &e))?;
        for s in &req.scratch_paths {
            scratch
                .create_dir_all(std::path::Path::new(s.as_str()), 0o755)
                .map_err(|e| BuildError::infra("create scratch directories", &e))?;
        }
        Ok(())
    }

    /// Steps 4 and 5: virtiofsd, initramfs, VMM, supervision.
    async fn boot_and_supervise(
        &self,
        req: &BuildRequest,
        plan: &VmPlan,
        ws: &Workspace,
        log: &BuildLog,
        cancel: &CancellationToken,
        timeout: Duration,
    ) -> Result<Report, BuildError> {
        let vm_dir = ws.vm();
        let mut shares = vec![
            (contract::INPUTS_TAG.to_string(), ws.inputs(), true),
            (contract::SCRATCH_TAG.to_string(), ws.scratch(), false),
        ];
        shares.extend(
            plan.ro_shares
                .iter()
                .map(|s| (s.tag.clone(), s.path.clone(), true)),
        );
        let (mut daemons, fs_shares) = async {
            let mut daemons = Vec::new();
            let mut fs_shares = Vec::new();
            for (tag, dir, read_only) in shares {
                let socket = vm_dir.join(format!("{tag}.sock"));
                let daemon = Virtiofsd::spawn(&dir, &socket, read_only)
                    .await
                    .map_err(|e| BuildError::infra("start virtiofsd", &e))?;
                daemons.push(daemon);
                fs_shares.push(FsShare {
                    tag,
                    socket,
                    source: dir.clone(),
                });
            }
            Ok::<_, BuildError>((daemons, fs_shares))
        }
        .instrument(info_span!("virtiofsd"))
        .await?;

        let initramfs_span = info_span!("initramfs");
        let base = self
            .base_image
            .get_or_try_init(|| async {
                let artifacts = self.config.artifacts.clone();
                let cache = self.config.cache_dir.clone();
                tokio::task::spawn_blocking(move || guest_image::base_image(&artifacts, &cache))
                    .await
                    .map_err(|e| BuildError::Infrastructure {
                        step: "build base initramfs",
                        message: e.to_string(),
                    })?
                    .map_err(|e| BuildError::infra("build base initramfs", &e))
            })
            .instrument(initramfs_span.clone())
            .await?
            .clone();
        let mut job = plan::job(req, plan);
        job.modules = self
            .runner
            .guest_modules()
            .iter()
            .map(|m| m.to_string())
            .collect();
        let initramfs = vm_dir.join("initramfs.cpio");
        initramfs_span
            .in_scope(|| guest_image::build_initramfs(&base, &job, &initramfs))
            .map_err(|e| BuildError::infra("write initramfs", &e))?;
        drop(initramfs_span);

        let spec = VmSpec {
            id: log.id().to_owned(),
            kernel: self.config.artifacts.vmlinux(),
            initramfs,
            cmdline: guest_image::kernel_cmdline(),
            memory_mib: plan.memory_mib,
            vcpus: plan.vcpus,
            nested_virt: plan.nested_virt,
            shares: fs_shares,
            run_dir: vm_dir.clone(),
            serial_log: vm_dir.join("serial.log"),
            deadline: Instant::now() + timeout,
        };
        let mut vm = self
            .runner
            .start(&spec)
            .instrument(info_span!("vmm_start"))
            .await
            .map_err(|e| BuildError::infra("start the VMM", &e))?;
        let channel = vm
            .take_channel()
            .await
            .map_err(|e| BuildError::infra("connect the guest channel", &e))?;
        info!(pid = vm.pid(), "VM started");
        let daemon_died = async {
            let (why, _, _) =
                futures::future::select_all(daemons.iter_mut().map(|d| Box::pin(d.exited()))).await;
            why
        };
        let serial_log = spec.serial_log.clone();
        let serial_tail = move || {
            let text = std::fs::read(&serial_log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        let limits = supervise::Limits {
            timeout,
            max_log_bytes: self.config.max_log_bytes,
        };
        let supervised = supervise(
            vm.as_mut(),
            channel,
            log,
            &limits,
            cancel,
            daemon_died,
            serial_tail,
        );
        let watched = async {
            tokio::select! {
                r = supervised => r,
                e = crate::executor::scratch::watch(ws.scratch(), self.config.scratch, log) => Err(e),
            }
        };
        let result = watched.instrument(info_span!("supervise")).await;
        async {
            vm.kill().await;
            drop(daemons);
        }
        .instrument(info_span!("teardown"))
        .await;
        result
    }
}

/// What one build's steps share.
pub(crate) struct Steps<'a> {
    pub(crate) req: &'a BuildRequest,
    pub(crate) plan: &'a VmPlan,
    pub(crate) ws: &'a Workspace,
    pub(crate) log: &'a BuildLog,
    pub(crate) cancel: &'a CancellationToken,
    /// When the build's time is up (`timeout` after it started).
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
}

impl Steps<'_> {
    /// The whole build's time limit, for messages.
    pub(crate) fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs()
    }
}

/// The fetched directories of one input.
type InputTree = std::collections::HashMap<castore::B3Digest, castore::Directory>;

/// A materialise failure of input `index`, naming it.
fn input_error(index: usize, name: &castore::PathComponent, e: MaterialiseError) -> BuildError {
    match e.missing() {
        Some((what, digest)) => BuildError::MissingInput { what, digest },
        None => match e {
            MaterialiseError::TooLarge { .. } => {
                BuildError::Precondition(format!("inputs[{index}] ({name}): {e}"))
            }
            e => BuildError::infra("materialise inputs", &e),
        },
    }
}
