//! The executor: one fresh microVM per build request.
//!
//! A build goes through these steps, each a named function:
//! 1. `plan` — constraints checked, VM sized (pure, [`plan`]);
//! 2. `inputs::check` — input trees fetched and their expansion bounded,
//!    then `admit` — wait for a VM slot and guest memory (bounded queue);
//! 3. `inputs::materialise` — castore nodes become the read-only share;
//! 4. `boot` — a [`VmSession`]: virtiofsd per share, initramfs, VMM;
//! 5. `supervise` — the agent's log streamed into the build log until its
//!    report, with timeout, cancellation, log and scratch limits;
//! 6. `collect::collect_outputs` — every declared output is scanned for
//!    needles and ingested into the castore.
//!
//! Everything a build holds (the session, its directory, its admission
//! ticket) is owned by a value that releases it on every path, including
//! cancellation: the build runs as its own task, and a dropped client only
//! cancels a token. The executor alone writes a build's events, and the
//! last one is always [`Event::Completed`] or [`Event::Failed`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_guest::contract::{self, Outcome, Report};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use crate::castore::{Node, Store};
use crate::executor::admission::{Admission, Ticket};
use crate::executor::collect;
use crate::executor::error::BuildError;
use crate::executor::events::{BuildLog, Event, Phase, Registry, VmStarted};
use crate::executor::inputs::{self, InputTree};
use crate::executor::paths::RelPath;
use crate::executor::plan::{self, VmPlan};
use crate::executor::request::{BuildRequest, Layout};
use crate::executor::supervise::{self, supervise};
use crate::executor::workspace::Workspace;
use crate::vmm::session::{Guest, GuestBoot, SessionNetwork, SessionSpec, Share, VmSession};
use crate::vmm::{GuestChannel, VmRunner};

pub use crate::executor::config::ExecutorConfig;

/// One stored output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// The output's path, as in the request (relative to the guest's `/`).
    pub path: RelPath,
    /// Its castore node.
    pub node: Node,
    /// Indexes of the request's needles found in it.
    pub needles: Vec<u64>,
}

/// A successful build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// Each output, in request order.
    pub outputs: Vec<BuiltOutput>,
    /// The agent's report.
    pub report: Report,
    /// The layout the request came in, which decides the answer's shape.
    pub layout: Layout,
    /// The request's [`BuildRequest::wire_echo`], for answers that repeat it.
    pub wire_echo: Option<Bytes>,
}

/// What a build task yields; the same values end its event log.
pub type BuildResult = Result<Arc<BuildOutcome>, Arc<BuildError>>;

/// A started build: its log, the token that cancels it, and its task.
pub struct Started {
    /// The build's events.
    pub log: Arc<BuildLog>,
    /// Cancels the build (the VM is killed, everything released).
    pub cancel: CancellationToken,
    /// Yields the result once everything the build held is released.
    pub task: tokio::task::JoinHandle<BuildResult>,
}

/// Runs builds.
pub struct Executor {
    config: ExecutorConfig,
    store: Store,
    runner: Arc<dyn VmRunner>,
    admission: Admission,
    registry: Registry,
    guest: GuestBoot,
}

impl Executor {
    /// An executor booting VMs with `runner` and storing into `store`.
    pub fn new(config: ExecutorConfig, store: Store, runner: Arc<dyn VmRunner>) -> Self {
        Self {
            admission: Admission::new(config.max_vms, config.memory_budget_mib, config.max_queue),
            registry: Registry::new(config.kept_builds, config.kept_log_bytes),
            guest: GuestBoot::new(config.artifacts.clone(), config.cache_dir.clone()),
            config,
            store,
            runner,
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
    pub fn runs_dir(&self) -> std::path::PathBuf {
        self.config.data_dir.join("runs")
    }

    /// Starts a build as its own task, under the server's limits lowered
    /// by the client's.
    pub fn start(self: &Arc<Self>, req: BuildRequest, client: ClientLimits) -> Started {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let log = self.registry.create(id.clone());
        let cancel = CancellationToken::new();
        let limits = client.within(&self.config);
        let this = self.clone();
        let (task_log, task_cancel) = (log.clone(), cancel.clone());
        let span = info_span!("build", id = %id);
        let task = tokio::spawn(
            async move {
                let started = Instant::now();
                let result = this.run(&req, &task_log, &task_cancel, limits).await;
                finish(&task_log, result, started.elapsed())
            }
            .instrument(span),
        );
        Started { log, cancel, task }
    }

    /// Steps 1 to 6; the build directory is removed on every path.
    async fn run(
        &self,
        req: &BuildRequest,
        log: &BuildLog,
        cancel: &CancellationToken,
        limits: ClientLimits,
    ) -> Result<BuildOutcome, BuildError> {
        let timeout = limits.timeout.unwrap_or(self.config.timeout);
        let deadline = Instant::now() + timeout;
        let plan = plan::plan(req, &self.config.limits)?;
        let trees = inputs::check(&self.store, req, &self.config.inputs).await?;
        log.phase(Phase::Queued);
        let ticket = tokio::select! {
            t = self.admission.admit(plan.memory_mib).instrument(info_span!("admit")) => t?,
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        log.emit(Event::Started(VmStarted {
            vmm: self.runner.name(),
            accel: self.runner.accel(),
            guest_memory_bytes: plan.memory_mib * 1024 * 1024,
            vcpus: plan.vcpus,
        }));
        info!(
            memory_mib = plan.memory_mib,
            vmm = self.runner.name(),
            "admitted"
        );
        let ws = Workspace::create(&self.runs_dir(), log.id())
            .map_err(|e| BuildError::infra("create build directory", e))?;
        let steps = Steps {
            req,
            plan: &plan,
            ws: &ws,
            log,
            cancel,
            deadline,
            timeout,
            max_silent: limits.max_silent,
            max_log_bytes: limits.max_log_bytes.unwrap_or(self.config.max_log_bytes),
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
        ticket: Ticket,
    ) -> Result<BuildOutcome, BuildError> {
        let log = steps.log;
        log.phase(Phase::Materialise);
        inputs::materialise(
            &self.store,
            steps,
            trees,
            self.config.scratch.min_free_bytes,
        )
        .instrument(info_span!("materialise"))
        .await?;

        log.phase(Phase::Boot);
        let (session, channel) = self.boot(steps).await?;
        let report = self.supervise(steps, session, channel).await?;
        // The VM and its daemons are gone: its slot and memory go back now,
        // not after ingest.
        drop(ticket);
        info!(
            boot_ms = report.boot_ms,
            setup_ms = report.setup_ms,
            build_ms = report.build_ms,
            "agent report"
        );
        builder_succeeded(&report, log)?;

        log.phase(Phase::Ingest);
        let outputs = collect::collect_outputs(
            &self.store,
            steps,
            &self.config.scratch,
            self.config.inputs.max_entries,
        )
        .instrument(info_span!("ingest"))
        .await?;
        Ok(BuildOutcome {
            outputs,
            report,
            layout: steps.req.layout,
            wire_echo: steps.req.wire_echo.clone(),
        })
    }

    /// Step 4: the build's VM, with its shares and its job.
    async fn boot(&self, steps: &Steps<'_>) -> Result<(VmSession, GuestChannel), BuildError> {
        let Steps { req, plan, ws, .. } = *steps;
        let mut shares = vec![
            Share {
                tag: contract::INPUTS_TAG.into(),
                source: ws.inputs(),
                read_only: true,
            },
            Share {
                tag: contract::SCRATCH_TAG.into(),
                source: ws.scratch(),
                read_only: false,
            },
        ];
        shares.extend(plan.ro_shares.iter().map(|s| Share {
            tag: s.tag.clone(),
            source: s.path.clone(),
            read_only: true,
        }));
        let mut job = plan::job(req, plan);
        let network = match (&self.config.network, plan.network) {
            (Some(config), true) => {
                job.network = Some(config.guest());
                let id = config.ids.acquire().ok_or_else(|| {
                    BuildError::infra(
                        "take a NAT helper id",
                        std::io::Error::other("all helper ids are in use"),
                    )
                })?;
                Some(SessionNetwork {
                    passt: config.passt.clone(),
                    id,
                    dns: config.dns,
                })
            }
            // plan() refused the request when the server has no network.
            _ => None,
        };
        let spec = SessionSpec {
            id: steps.log.id().to_owned(),
            shares,
            guest: Guest::Agent(Box::new(job)),
            memory_mib: plan.memory_mib,
            vcpus: plan.vcpus,
            nested_virt: plan.nested_virt,
            run_dir: ws.vm(),
            deadline: steps.deadline,
            network,
        };
        VmSession::boot(self.runner.as_ref(), &self.guest, spec)
            .instrument(info_span!("boot"))
            .await
            .map_err(|e| BuildError::infra("boot the VM", e))
    }

    /// Step 5: the VM runs to its report (or is stopped), then is torn down.
    async fn supervise(
        &self,
        steps: &Steps<'_>,
        mut session: VmSession,
        channel: GuestChannel,
    ) -> Result<Report, BuildError> {
        let limits = supervise::Limits {
            timeout: steps.deadline.saturating_duration_since(Instant::now()),
            max_log_bytes: steps.max_log_bytes,
            max_silent: steps.max_silent,
        };
        let supervised = supervise(session.parts(), channel, steps.log, &limits, steps.cancel);
        let scratch =
            crate::executor::scratch::watch(steps.ws.scratch(), self.config.scratch, steps.log);
        let result = async {
            tokio::select! {
                r = supervised => r,
                e = scratch => Err(e),
            }
        }
        .instrument(info_span!("supervise"))
        .await;
        session.end().await;
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
    /// The builder's silence limit, if any.
    pub(crate) max_silent: Option<Duration>,
    /// Builder output allowed.
    pub(crate) max_log_bytes: u64,
}

/// Limits a client asks for one build (a gRPC deadline, `kiln.v1`'s
/// `BuildLimits`, Nix's `SetOptions`): each can only lower the server's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// The whole build's wall-clock time.
    pub timeout: Option<Duration>,
    /// How long the builder may write nothing.
    pub max_silent: Option<Duration>,
    /// Builder output allowed, bytes.
    pub max_log_bytes: Option<u64>,
}

impl ClientLimits {
    /// Only a deadline (what the plain build services' clients can say).
    pub fn deadline(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }

    /// These limits lowered to the server's: the timeout and log size are
    /// always set afterwards; the silence limit stays the client's (the
    /// server has none of its own).
    pub fn within(self, config: &ExecutorConfig) -> Self {
        Self {
            timeout: Some(
                self.timeout
                    .map_or(config.timeout, |t| t.min(config.timeout)),
            ),
            max_silent: self.max_silent,
            max_log_bytes: Some(
                self.max_log_bytes
                    .map_or(config.max_log_bytes, |b| b.min(config.max_log_bytes)),
            ),
        }
    }
}

impl Steps<'_> {
    /// The whole build's time limit, for messages.
    pub(crate) fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs()
    }
}

/// The builder's own outcome, as the agent reported it.
fn builder_succeeded(report: &Report, log: &BuildLog) -> Result<(), BuildError> {
    match &report.outcome {
        Outcome::Exited { code: 0 } => Ok(()),
        Outcome::Exited { code } => Err(BuildError::BuilderExited {
            code: *code,
            log_tail: log.tail(),
        }),
        Outcome::Signaled { signal } => Err(BuildError::BuilderSignaled {
            signal: *signal,
            log_tail: log.tail(),
        }),
        Outcome::AgentFailed { step, message } => Err(BuildError::AgentFailed {
            step: step.clone(),
            message: message.clone(),
            log_tail: log.tail(),
        }),
    }
}

/// Ends a build's log: its outputs and `Completed`, or `Failed`; one log
/// line either way.
fn finish(log: &BuildLog, result: Result<BuildOutcome, BuildError>, took: Duration) -> BuildResult {
    let elapsed_ms = took.as_millis() as u64;
    match result {
        Ok(outcome) => {
            info!(
                elapsed_ms,
                outputs = outcome.outputs.len(),
                "build succeeded"
            );
            for output in &outcome.outputs {
                log.emit(Event::Output(output.clone()));
            }
            let outcome = Arc::new(outcome);
            log.emit(Event::Completed(outcome.clone()));
            Ok(outcome)
        }
        Err(e) => {
            info!(elapsed_ms, kind = e.kind(), error = %e.report(), "build failed");
            let e = Arc::new(e);
            log.emit(Event::Failed(e.clone()));
            Err(e)
        }
    }
}
