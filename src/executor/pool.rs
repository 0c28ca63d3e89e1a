//! The warm pool (`kiln serve --warm-vms N`): VMs booted before their
//! requests arrive, each given exactly one build.
//!
//! A warm VM is booted like any other ([`VmSession::boot`]) with its two
//! shares attached to its own, empty build directory and the agent in warm
//! mode (`kiln_guest::contract`, "Job in"): it loads its modules, opens the
//! channel, says [`FrameKind::Ready`] and waits. A build that fits
//! ([`Pool::fits`]: the pool's memory size and vCPUs, no nested
//! virtualisation, no network, no extra read-only shares) claims one: its
//! inputs are materialised into that VM's inputs directory, its job goes
//! over the channel, and from then on it is an ordinary build — supervised,
//! torn down, its directory removed. A pool VM is never given a second job,
//! and nothing it held outlives it.
//!
//! The rules:
//! - Pool VMs hold an admission [`Ticket`] like any VM, so they count
//!   against `--max-vms` and the guest memory budget; the claiming build
//!   inherits it.
//! - The refill ([`drive`]) only boots when a slot and memory are free *now*
//!   and no build is waiting for them ([`Admission::try_admit`], the queue
//!   and [`Pool::demand`]): the pool never makes a build wait.
//! - A build that needs capacity the pool holds evicts idle pool VMs, and
//!   waits for booting ones to finish (then claims or evicts them) rather
//!   than queue behind them ([`crate::executor::run`]'s placement).
//! - A pool VM that dies while waiting (the VMM or a virtiofsd exits) is
//!   dropped from the pool, torn down, and replaced by the refill; it is
//!   never handed to a build. Boot failures back off exponentially.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_guest::contract::{self, FrameKind, Job};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::executor::admission::Ticket;
use crate::executor::error::BuildError;
use crate::executor::plan::VmPlan;
use crate::executor::workspace::Workspace;
use crate::executor::Executor;
use crate::vmm::session::{Guest, SessionSpec, Share, VmSession};
use crate::vmm::GuestChannel;

/// How long a pool VM may take from start to [`FrameKind::Ready`].
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the refill looks, besides when it is told to.
const TICK: Duration = Duration::from_millis(500);
/// The longest pause after boot failures in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// VMs kept booted and waiting.
    pub size: usize,
    /// Their guest RAM, MiB (the size a request asking for little gets).
    pub memory_mib: u64,
    /// Their vCPUs.
    pub vcpus: u32,
}

/// Counters of the pool's life, for logs, tests and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// VMs that booted to [`FrameKind::Ready`].
    pub booted: u64,
    /// VMs that failed to boot.
    pub boot_failures: u64,
    /// VMs given to a build.
    pub assigned: u64,
    /// VMs that died while waiting.
    pub died_waiting: u64,
    /// Idle VMs stopped to make room for a build the pool could not serve.
    pub evicted: u64,
    /// VMs waiting right now.
    pub waiting: usize,
    /// VMs booting right now.
    pub booting: usize,
}

/// A booted VM waiting for its job, now one build's.
pub struct WarmVm {
    /// The pool's name for it (its build directory's name).
    pub id: String,
    /// The VM and its daemons.
    pub session: VmSession,
    /// Its channel, as from a fresh VM: it starts with [`contract::MAGIC`].
    pub channel: GuestChannel,
    /// Its build directory, whose inputs and scratch it shares.
    pub workspace: Workspace,
    /// Its VM slot and memory.
    pub ticket: Ticket,
}

impl WarmVm {
    /// Stops it without a build (eviction, a claim given up).
    pub async fn discard(self) {
        self.session.end().await;
        self.workspace.remove().await;
    }
}

/// Sends `job` to a warm VM over its channel's way back; after this the VM
/// runs it like a cold VM runs the job of its initramfs.
pub async fn send_job(channel: &mut GuestChannel, job: &Job) -> Result<(), BuildError> {
    let message = contract::encode_job_message(job)
        .map_err(|e| BuildError::infra("encode the job for the warm VM", e))?;
    if message.len() > contract::MAX_JOB_BYTES as usize + 4 {
        return Err(BuildError::infra(
            "send the job to the warm VM",
            std::io::Error::other(format!(
                "the job is {} bytes, over the {}-byte limit",
                message.len(),
                contract::MAX_JOB_BYTES
            )),
        ));
    }
    let Some(writer) = channel.ack.as_mut() else {
        return Err(BuildError::infra(
            "send the job to the warm VM",
            std::io::Error::other("its channel is one-way"),
        ));
    };
    let sent = async {
        writer.write_all(&message).await?;
        writer.flush().await
    };
    sent.await
        .map_err(|e| BuildError::infra("send the job to the warm VM", e))
}

struct Waiting {
    id: String,
    claim: oneshot::Sender<oneshot::Sender<WarmVm>>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Waiting>,
    stats: PoolStats,
    failures_in_a_row: u32,
    not_before: Option<Instant>,
}

/// The warm pool of one executor.
pub struct Pool {
    config: PoolConfig,
    state: Mutex<State>,
    /// Wakes the refill.
    refill: Notify,
    /// Wakes builds waiting for a booting VM.
    changed: Notify,
    /// Builds placing themselves right now: the refill holds off.
    demand: AtomicUsize,
    shutdown: CancellationToken,
}

/// Held by a build while it looks for capacity; the refill waits meanwhile.
pub struct Demand<'a>(&'a AtomicUsize);

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    /// An empty pool keeping `config.size` VMs once [`drive`] runs.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            refill: Notify::new(),
            changed: Notify::new(),
            demand: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
        }
    }

    /// What it keeps.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters, now.
    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats {
            waiting: s.waiting.len(),
            ..s.stats
        }
    }

    /// Whether a build planned as `plan` may run in a pool VM.
    pub fn fits(&self, plan: &VmPlan) -> bool {
        plan.memory_mib == self.config.memory_mib
            && plan.vcpus == self.config.vcpus
            && !plan.nested_virt
            && !plan.network
            && plan.ro_shares.is_empty()
    }

    /// Marks a build looking for capacity until the guard drops.
    pub fn demand(&self) -> Demand<'_> {
        self.demand.fetch_add(1, Ordering::SeqCst);
        Demand(&self.demand)
    }

    /// VMs waiting and booting.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.waiting.len(), s.stats.booting)
    }

    /// Takes the oldest waiting VM that is still alive, if any. Dropping
    /// the future before it resolves gives the VM back to nobody: it is
    /// torn down.
    pub async fn claim(&self) -> Option<WarmVm> {
        loop {
            let waiting = self.lock().waiting.pop_front()?;
            let (reply, answer) = oneshot::channel();
            // A VM that died meanwhile has dropped its end.
            if waiting.claim.send(reply).is_err() {
                continue;
            }
            if let Ok(vm) = answer.await {
                self.lock().stats.assigned += 1;
                self.refill.notify_one();
                return Some(vm);
            }
        }
    }

    /// Stops one idle VM to free its slot and memory; false if none was
    /// idle.
    pub async fn evict_one(&self) -> bool {
        let Some(vm) = self.claim().await else {
            return false;
        };
        {
            let mut s = self.lock();
            s.stats.assigned -= 1;
            s.stats.evicted += 1;
        }
        info!(vm = %vm.id, "evicted an idle warm VM for a build it cannot serve");
        vm.discard().await;
        true
    }

    /// Resolves when a VM became ready or died, or after `at_most`.
    pub async fn changed(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changed.notified()).await;
    }

    /// Stops the refill and every waiting VM.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    fn wants_another(&self) -> bool {
        let s = self.lock();
        s.waiting.len() + s.stats.booting < self.config.size
            && s.not_before.is_none_or(|t| Instant::now() >= t)
            && !self.shutdown.is_cancelled()
    }

    fn booting_started(&self) {
        self.lock().stats.booting += 1;
    }

    fn boot_failed(&self) {
        let mut s = self.lock();
        s.stats.booting -= 1;
        s.stats.boot_failures += 1;
        s.failures_in_a_row += 1;
        let pause = Duration::from_secs(1 << s.failures_in_a_row.min(6)).min(MAX_BACKOFF);
        s.not_before = Some(Instant::now() + pause);
        drop(s);
        self.changed.notify_waiters();
    }

    fn ready(&self, waiting: Waiting) {
        let mut s = self.lock();
        s.stats.booting -= 1;
        s.stats.booted += 1;
        s.failures_in_a_row = 0;
        s.not_before = None;
        s.waiting.push_back(waiting);
        drop(s);
        self.changed.notify_waiters();
    }

    fn died(&self, id: &str) {
        let mut s = self.lock();
        s.waiting.retain(|w| w.id != id);
        s.stats.died_waiting += 1;
        drop(s);
        self.changed.notify_waiters();
        self.refill.notify_one();
    }
}

/// The refill: keeps the pool at its size while the executor lives. Holds
/// the executor only while it starts a boot, so dropping the executor ends
/// it.
pub async fn drive(executor: Weak<Executor>, pool: Arc<Pool>) {
    loop {
        {
            let Some(executor) = executor.upgrade() else {
                return;
            };
            while pool.wants_another()
                && pool.demand.load(Ordering::SeqCst) == 0
                && executor.admission().queued() == 0
            {
                let Some(ticket) = executor.admission().try_admit(pool.config.memory_mib) else {
                    break;
                };
                pool.booting_started();
                tokio::spawn(boot_one(executor.clone(), pool.clone(), ticket));
            }
        }
        tokio::select! {
            _ = pool.shutdown.cancelled() => return,
            _ = pool.refill.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Boots one pool VM, then waits with it until a build claims it, it dies,
/// or the pool shuts down.
async fn boot_one(executor: Arc<Executor>, pool: Arc<Pool>, ticket: Ticket) {
    let id = format!("warm-{}", uuid::Uuid::new_v4().simple());
    let span = info_span!("warm_vm", id = %id);
    let booted = boot(&executor, &pool.config, &id)
        .instrument(span.clone())
        .await;
    // The executor may go away while this VM waits.
    drop(executor);
    let (mut session, channel, workspace) = match booted {
        Ok(vm) => vm,
        Err(why) => {
            warn!(parent: &span, error = %why, "a warm VM did not boot");
            pool.boot_failed();
            return;
        }
    };
    let (claim, claimed) = oneshot::channel();
    pool.ready(Waiting {
        id: id.clone(),
        claim,
    });
    info!(parent: &span, "warm VM waiting");
    let parts = session.parts();
    let (vm, mut daemons) = (parts.vm, parts.daemons);
    let ended = tokio::select! {
        claim = claimed => claim.map_err(|_| "the pool let it go".to_owned()),
        exit = vm.wait() => Err(match exit {
            Ok(exit) => format!("the VMM exited ({exit})"),
            Err(e) => format!("waiting for the VMM failed: {e}"),
        }),
        why = daemons.first_exit() => Err(why),
        _ = pool.shutdown.cancelled() => Err("the pool is shutting down".to_owned()),
    };
    match ended {
        Ok(reply) => {
            let vm = WarmVm {
                id,
                session,
                channel,
                workspace,
                ticket,
            };
            // A claimer that gave up: nobody gets this VM.
            if let Err(vm) = reply.send(vm) {
                vm.discard().await;
                pool.refill.notify_one();
            }
        }
        Err(why) => {
            if !pool.shutdown.is_cancelled() {
                warn!(parent: &span, reason = %why, "a warm VM died while waiting; replacing it");
                pool.died(&id);
            }
            session.end().await;
            workspace.remove().await;
            drop(ticket);
        }
    }
}

/// A pool VM booted to [`FrameKind::Ready`]: its session, its channel
/// (rewound to [`contract::MAGIC`]) and its build directory.
async fn boot(
    executor: &Executor,
    config: &PoolConfig,
    id: &str,
) -> Result<(VmSession, GuestChannel, Workspace), String> {
    let workspace = Workspace::create(&executor.runs_dir(), id)
        .map_err(|e| format!("creating its directory: {e}"))?;
    let shares = vec![
        Share {
            tag: contract::INPUTS_TAG.into(),
            source: workspace.inputs(),
            read_only: true,
        },
        Share {
            tag: contract::SCRATCH_TAG.into(),
            source: workspace.scratch(),
            read_only: false,
        },
    ];
    let spec = SessionSpec {
        id: id.to_owned(),
        shares,
        guest: Guest::Warm,
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        nested_virt: false,
        run_dir: workspace.vm(),
        deadline: Instant::now() + BOOT_TIMEOUT,
        network: None,
    };
    let booted = async {
        let (session, channel) = executor
            .boot_session(spec)
            .await
            .map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
        match tokio::time::timeout(BOOT_TIMEOUT, ready(channel)).await {
            Ok(Ok(channel)) => Ok((session, channel)),
            Ok(Err(why)) => Err(format!(
                "{why}; last guest console lines:\n{}",
                session.serial_tail()
            )),
            Err(_) => Err(format!(
                "no Ready from the agent within {BOOT_TIMEOUT:?}; last guest console lines:\n{}",
                session.serial_tail()
            )),
        }
    };
    match booted.await {
        Ok((session, channel)) => Ok((session, channel, workspace)),
        Err(why) => {
            workspace.remove().await;
            Err(why)
        }
    }
}

/// Reads [`contract::MAGIC`] and the empty [`FrameKind::Ready`] frame, the
/// only bytes a warm agent writes before its job; hands back a channel that
/// starts with [`contract::MAGIC`] again, as supervision expects.
async fn ready(channel: GuestChannel) -> Result<GuestChannel, String> {
    let GuestChannel { mut reader, ack } = channel;
    let mut expected = contract::MAGIC.to_vec();
    contract::encode_frame(FrameKind::Ready, &[], &mut expected);
    let mut got = vec![0u8; expected.len()];
    reader
        .read_exact(&mut got)
        .await
        .map_err(|e| format!("reading the agent's Ready: {e}"))?;
    if got != expected {
        return Err(format!(
            "the agent did not say Ready (got {:?})",
            String::from_utf8_lossy(&got)
        ));
    }
    let rewound = std::io::Cursor::new(contract::MAGIC.to_vec()).chain(reader);
    Ok(GuestChannel {
        reader: Box::new(rewound),
        ack,
    })
}
