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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_guest::contract::{self, Outcome, Report};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use crate::castore::scoped::Scoping;
use crate::castore::{Node, Store};
use crate::executor::admission::{Admission, Ticket};
use crate::executor::collect;
use crate::executor::error::BuildError;
use crate::executor::events::{
    BuildLog, BuildObserver, BuildSummary, CacheHit, Event, ObserverFactory, Observers, Phase,
    Registry, StopReason, VmStarted,
};
use crate::executor::inputs::{self, InputTree};
use crate::executor::paths::RelPath;
use crate::executor::plan::{self, VmPlan};
use crate::executor::pool::{self, Pool, PoolConfig, WarmVm};
use crate::executor::request::{BuildRequest, Layout};
use crate::executor::result_cache::{self, Recorded, ResultCache};
use crate::executor::supervise::{self, supervise};
use crate::executor::workspace::Workspace;
use crate::tenant::{Identity, Tenant};
use crate::vmm::session::{
    Guest, GuestBoot, SessionError, SessionNetwork, SessionSpec, Share, VmSession,
};
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
    /// Set when the result came from the tenant's result cache (no VM ran;
    /// `report` is the recorded build's).
    pub cache_hit: Option<CacheHit>,
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
    pool: Option<Arc<Pool>>,
    /// Set when the server shuts down: new builds are refused.
    draining: AtomicBool,
    /// `config.limits.ro_path_allowlist` as it is now (replaced on reload).
    ro_path_allowlist: std::sync::RwLock<Vec<std::path::PathBuf>>,
    observers: Vec<ObserverFactory>,
    records: Option<Arc<crate::records::Records>>,
    /// Which part of the store each build's tenant sees (its inputs must
    /// be there; its outputs are granted to it).
    scoping: Scoping,
    /// Recorded successes, per tenant; `None`: every build runs.
    result_cache: Option<ResultCache>,
}

/// Where a build runs: a VM it boots, or a warm one from the pool.
enum Placement {
    Cold(Ticket),
    Warm(Box<WarmVm>),
}

impl Executor {
    /// An executor booting VMs with `runner` and storing into `store`. A
    /// warm pool (`config.warm_vms`) starts filling with
    /// [`Executor::start_pool`].
    pub fn new(config: ExecutorConfig, store: Store, runner: Arc<dyn VmRunner>) -> Self {
        if config.warm_vms > 0 && !runner.two_way_channel() {
            tracing::warn!(
                vmm = runner.name(),
                "no warm pool: this VMM's guest channel is one-way, so a booted VM cannot be sent a job"
            );
        }
        let pool = (config.warm_vms > 0 && runner.two_way_channel()).then(|| {
            let memory_mib = plan::guest_memory_mib(0, &config.limits)
                .unwrap_or(config.limits.min_guest_memory_mib);
            Arc::new(Pool::new(PoolConfig {
                size: config.warm_vms.min(config.max_vms.max(1)),
                memory_mib,
                vcpus: config.limits.vcpus,
            }))
        });
        let config_allowlist = config.limits.ro_path_allowlist.clone();
        Self {
            admission: Admission::new(
                config.max_vms,
                config.memory_budget_mib,
                config.max_queue,
                config.tenants.clone(),
            ),
            registry: Registry::new(config.kept_builds, config.kept_log_bytes),
            guest: GuestBoot::new(config.artifacts.clone(), config.cache_dir.clone()),
            config,
            store,
            runner,
            pool,
            draining: AtomicBool::new(false),
            observers: Vec::new(),
            records: None,
            scoping: Scoping::none(),
            result_cache: None,
            ro_path_allowlist: std::sync::RwLock::new(config_allowlist),
        }
    }

    /// Replaces the read-only paths builds may ask for (`--allow-ro-path`,
    /// re-read on SIGHUP); builds already planned keep theirs.
    pub fn set_ro_path_allowlist(&self, paths: Vec<std::path::PathBuf>) {
        *self
            .ro_path_allowlist
            .write()
            .unwrap_or_else(|p| p.into_inner()) = paths;
    }

    /// The limits a build is planned under now.
    fn plan_limits(&self) -> plan::Limits {
        let allowlist = self
            .ro_path_allowlist
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        plan::Limits {
            ro_path_allowlist: allowlist,
            ..self.config.limits.clone()
        }
    }

    /// Refuses every build started from now on (UNAVAILABLE: the server is
    /// shutting down) and stops the warm pool; running builds go on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stop_pool();
    }

    /// Whether [`Executor::drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The builds that have not ended, oldest first.
    pub fn running(&self) -> Vec<BuildSummary> {
        self.registry
            .running()
            .iter()
            .map(|log| log.summary())
            .collect()
    }

    /// Stops the build `id` for `reason`; false if no such build that
    /// `who` may see is running.
    pub fn stop_build(&self, id: &str, who: &Identity, reason: StopReason) -> bool {
        self.registry
            .get_for(id, who)
            .is_some_and(|log| !log.finished() && log.stop(reason))
    }

    /// Stops every running build for `reason`; how many were stopped.
    pub fn stop_all(&self, reason: StopReason) -> usize {
        self.registry
            .running()
            .iter()
            .filter(|log| log.stop(reason))
            .count()
    }

    /// Has every build from now on followed also by the observer
    /// `factory` makes (the server's metrics, the shared build records).
    pub fn add_observer(&mut self, factory: ObserverFactory) {
        self.observers.push(factory);
    }

    /// Records every build from now on in the records several hosts
    /// share, and answers for builds of other hosts from them.
    pub fn set_records(&mut self, records: Arc<crate::records::Records>) {
        self.add_observer(records.observer());
        self.records = Some(records);
    }

    /// The shared build records, when the server has them (`--database`).
    pub fn records(&self) -> Option<&Arc<crate::records::Records>> {
        self.records.as_ref()
    }

    /// Scopes every build from now on to its tenant's view of the store
    /// (the server's, when callers authenticate).
    pub fn set_scoping(&mut self, scoping: Scoping) {
        self.scoping = scoping;
    }

    /// Answers a request that already succeeded for its tenant from
    /// `cache` from now on ([`crate::executor::result_cache`]).
    pub fn set_result_cache(&mut self, cache: ResultCache) {
        self.result_cache = Some(cache);
    }

    /// How the store is scoped to callers.
    pub fn scoping(&self) -> &Scoping {
        &self.scoping
    }

    /// Starts keeping the warm pool full (nothing without `warm_vms`). The
    /// refill holds the executor weakly: dropping the last `Arc` stops it
    /// and every waiting VM.
    pub fn start_pool(self: &Arc<Self>) {
        if let Some(pool) = &self.pool {
            let config = pool.config();
            info!(
                size = config.size,
                memory_mib = config.memory_mib,
                vcpus = config.vcpus,
                "warm pool on"
            );
            tokio::spawn(pool::drive(Arc::downgrade(self), pool.clone()));
        }
    }

    /// Stops the refill and tears down every waiting pool VM (a server
    /// shutting down); builds in pool VMs go on.
    pub fn stop_pool(&self) {
        if let Some(pool) = &self.pool {
            pool.shut_down();
        }
    }

    /// The warm pool, when there is one.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_deref()
    }

    /// VM slots, guest memory and the queue.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Boots one session on this executor's runner and boot files.
    pub(crate) async fn boot_session(
        &self,
        spec: SessionSpec,
    ) -> Result<(VmSession, GuestChannel), SessionError> {
        VmSession::boot(self.runner.as_ref(), &self.guest, spec).await
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

    /// Starts a build for `who` as its own task, under the server's
    /// limits lowered by the client's.
    pub fn start(
        self: &Arc<Self>,
        req: BuildRequest,
        client: ClientLimits,
        who: &Identity,
    ) -> Started {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let cancel = CancellationToken::new();
        let tenant = who.tenant.clone();
        let mut observers: Vec<_> = self
            .observers
            .iter()
            .map(|make| make(&id, &req, &tenant))
            .collect();
        let observer = match observers.len() {
            0 => None,
            1 => observers.pop(),
            _ => Some(Box::new(Observers(observers)) as Box<dyn BuildObserver>),
        };
        let log =
            self.registry
                .create_observed(id.clone(), tenant.clone(), cancel.clone(), observer);
        let limits = client.within(&self.config);
        let store = self.scoping.store_for(&self.store, who);
        let this = self.clone();
        let (task_log, task_cancel) = (log.clone(), cancel.clone());
        let span = info_span!("build", id = %id, tenant = %tenant);
        let task = tokio::spawn(
            async move {
                let started = Instant::now();
                let result = this
                    .run(&req, &tenant, &store, &task_log, &task_cancel, limits)
                    .await;
                finish(&task_log, result, started.elapsed())
            }
            .instrument(span),
        );
        Started { log, cancel, task }
    }

    /// Steps 1 to 6, reading inputs from and storing outputs into `store`
    /// (the tenant's view); the build directory is removed on every path.
    async fn run(
        &self,
        req: &BuildRequest,
        tenant: &Tenant,
        store: &Store,
        log: &BuildLog,
        cancel: &CancellationToken,
        limits: ClientLimits,
    ) -> Result<BuildOutcome, BuildError> {
        if self.draining() {
            return Err(BuildError::ShuttingDown);
        }
        let timeout = limits.timeout.unwrap_or(self.config.timeout);
        let deadline = Instant::now() + timeout;
        let plan = plan::plan(req, &self.plan_limits())?;
        let trees = inputs::check(store, req, &self.config.inputs).await?;
        let cached = self
            .result_cache
            .as_ref()
            .map(|cache| (cache, result_cache::key(tenant, req)));
        if let Some((cache, key)) = cached.filter(|_| !limits.bypass_result_cache) {
            match cache.lookup(key, store).await {
                Ok(Some(recorded)) => return Ok(answer_from_cache(req, log, recorded)),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e.report(), "result cache unreadable; building"),
            }
        }
        log.phase(Phase::Queued);
        let placed = tokio::select! {
            p = self.place(&plan, tenant).instrument(info_span!("admit")) => p?,
            _ = cancel.cancelled() => return Err(BuildError::Cancelled),
        };
        let (ticket, ws, warm) = match placed {
            Placement::Cold(ticket) => {
                let ws = Workspace::create(&self.runs_dir(), log.id())
                    .map_err(|e| BuildError::infra("create build directory", e))?;
                (ticket, ws, None)
            }
            Placement::Warm(vm) => {
                let WarmVm {
                    id,
                    session,
                    channel,
                    workspace,
                    ticket,
                } = *vm;
                info!(vm = %id, "given a warm VM");
                (ticket, workspace, Some((session, channel)))
            }
        };
        log.emit(Event::Started(VmStarted {
            vmm: self.runner.name(),
            accel: self.runner.accel(),
            guest_memory_bytes: plan.memory_mib * 1024 * 1024,
            vcpus: plan.vcpus,
            warm: warm.is_some(),
        }));
        info!(
            memory_mib = plan.memory_mib,
            vmm = self.runner.name(),
            warm = warm.is_some(),
            "admitted"
        );
        let steps = Steps {
            req,
            store,
            plan: &plan,
            ws: &ws,
            log,
            cancel,
            deadline,
            timeout,
            max_silent: limits.max_silent,
            max_log_bytes: limits.max_log_bytes.unwrap_or(self.config.max_log_bytes),
        };
        let result = self.run_steps(&steps, trees, ticket, warm).await;
        // Removing the build directory is timed on its own (it grows with
        // the inputs); it runs off the async workers, on every path.
        ws.remove().instrument(info_span!("cleanup")).await;
        if let (Some((cache, key)), Ok(outcome)) = (cached, &result) {
            let recorded = Recorded {
                build_id: log.id().to_owned(),
                built_at_unix: unix_now(),
                outputs: outcome.outputs.clone(),
                report: outcome.report.clone(),
            };
            if let Err(e) = cache.record(key, &recorded).await {
                tracing::warn!(error = %e.report(), "the result was not recorded in the result cache");
            }
        }
        result
    }

    /// Step 2's wait: a warm VM when one fits and waits, else a VM slot
    /// and memory for a cold boot. A build never queues behind capacity
    /// the pool holds: it evicts idle pool VMs it cannot use, and waits for
    /// booting ones (which it then claims or evicts) before it queues.
    async fn place(&self, plan: &VmPlan, tenant: &Tenant) -> Result<Placement, BuildError> {
        let admission = &self.admission;
        let Some(pool) = self.pool.as_deref() else {
            return Ok(Placement::Cold(
                admission.admit(tenant, plan.memory_mib).await?,
            ));
        };
        if !admission.can_ever_fit(plan.memory_mib) {
            // admit() refuses it, naming the budget.
            return Ok(Placement::Cold(
                admission.admit(tenant, plan.memory_mib).await?,
            ));
        }
        let fits = pool.fits(plan);
        let _demand = pool.demand();
        loop {
            if fits && admission.tenant_has_room(tenant, plan.memory_mib) {
                if let Some(mut vm) = pool.claim().await {
                    if admission.charge(&mut vm.ticket, tenant) {
                        return Ok(Placement::Warm(Box::new(vm)));
                    }
                    // The tenant's own builds took its room meanwhile: this
                    // VM is ended (never handed on) and the build queues.
                    vm.discard().await;
                    break;
                }
            }
            if let Some(ticket) = admission.try_admit_for(tenant, plan.memory_mib) {
                return Ok(Placement::Cold(ticket));
            }
            if !admission.tenant_has_room(tenant, plan.memory_mib) {
                // Held by its own limits: it waits in its tenant's queue.
                break;
            }
            match pool.counts() {
                (waiting, _) if waiting > 0 => {
                    if !fits {
                        pool.evict_one().await;
                    }
                }
                (_, booting) if booting > 0 => pool.changed(Duration::from_millis(100)).await,
                _ => break,
            }
        }
        Ok(Placement::Cold(
            admission.admit(tenant, plan.memory_mib).await?,
        ))
    }

    /// Steps 3 to 6, in the build's directory (a warm VM's, if it has one).
    async fn run_steps(
        &self,
        steps: &Steps<'_>,
        trees: Vec<InputTree>,
        ticket: Ticket,
        warm: Option<(VmSession, GuestChannel)>,
    ) -> Result<BuildOutcome, BuildError> {
        let log = steps.log;
        log.phase(Phase::Materialise);
        let materialised = inputs::materialise(
            steps.store,
            steps,
            trees,
            self.config.scratch.min_free_bytes,
        )
        .instrument(info_span!("materialise"))
        .await;
        if let Err(e) = materialised {
            if let Some((session, _)) = warm {
                session.end().await;
            }
            return Err(e);
        }

        log.phase(Phase::Boot);
        let (session, channel) = match warm {
            Some((session, mut channel)) => {
                let job = plan::job(steps.req, steps.plan);
                match pool::send_job(&mut channel, &job)
                    .instrument(info_span!("send_job"))
                    .await
                {
                    Ok(()) => (session, channel),
                    Err(e) => {
                        session.end().await;
                        return Err(e);
                    }
                }
            }
            None => self.boot(steps).await?,
        };
        let report = self.supervise(steps, session, channel).await?;
        log.reported(&report);
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
            steps.store,
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
            cache_hit: None,
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

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.shut_down();
        }
    }
}

/// What one build's steps share.
pub(crate) struct Steps<'a> {
    pub(crate) req: &'a BuildRequest,
    /// The build's tenant's view of the store.
    pub(crate) store: &'a Store,
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
    /// Build even when the tenant's result cache would answer
    /// (`x-kiln-result-cache: bypass`, `kiln build --rebuild`).
    pub bypass_result_cache: bool,
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
            bypass_result_cache: self.bypass_result_cache,
        }
    }
}

impl Steps<'_> {
    /// The whole build's time limit, for messages.
    pub(crate) fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs()
    }
}

/// A request answered from its tenant's result cache: no VM, the recorded
/// outputs (each still whole in the tenant's view), the answer in this
/// request's layout.
fn answer_from_cache(req: &BuildRequest, log: &BuildLog, recorded: Recorded) -> BuildOutcome {
    let hit = CacheHit {
        build_id: recorded.build_id,
        built_at_unix: recorded.built_at_unix,
    };
    info!(built_by = %hit.build_id, "answered from the result cache");
    log.emit(Event::CacheHit(hit.clone()));
    BuildOutcome {
        outputs: recorded.outputs,
        report: recorded.report,
        layout: req.layout,
        wire_echo: req.wire_echo.clone(),
        cache_hit: Some(hit),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            let e = match (e, log.stop_reason()) {
                (BuildError::Cancelled, Some(reason)) => BuildError::Stopped(reason),
                (e, _) => e,
            };
            info!(elapsed_ms, kind = e.kind(), error = %e.report(), "build failed");
            let e = Arc::new(e);
            log.emit(Event::Failed(e.clone()));
            Err(e)
        }
    }
}
