//! Admission control: at most `max_vms` VMs at once, at most `memory_budget`
//! MiB of guest RAM in use, a bounded queue of builds waiting for both, and
//! per tenant the same three limits ([`TenantPolicy`]). Beyond a queue a
//! build is refused at once (RESOURCE_EXHAUSTED, naming the limit).
//!
//! # Fair share
//!
//! Waiting builds queue per tenant, first come first served within one
//! tenant. A VM that frees up goes to the tenants in turn by stride
//! scheduling: each tenant has a pass, the tenant with the lowest pass whose
//! next build its own limits allow is served, and its pass then grows by
//! `STRIDE / weight`. A tenant that starts waiting joins at the pass of the
//! last one served, so it never banks turns while idle and never waits
//! behind another tenant's backlog: its first build is served by the next
//! VM that frees up (or the one after, when another tenant joined at the
//! same moment). With equal weights this is round-robin.
//!
//! When the tenant next in turn needs more memory than is free, nobody else
//! is served ahead of it (so a large build is not starved by smaller ones);
//! a tenant held back by its own limits is skipped.
//!
//! The host memory requests take is bounded apart from the queue's length
//! by a [`RequestBudget`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::executor::error::{BuildError, Precondition};
use crate::tenant::Tenant;

mod limits;
mod request_budget;

pub use limits::{TenantLimits, TenantOverride, TenantPolicy, MAX_WEIGHT};
pub use request_budget::{RequestBudget, RequestPermit, DEFAULT_REQUEST_BUDGET_BYTES};

/// A tenant of weight 1 moves its pass this far per served build.
const STRIDE: u64 = 1 << 20;

/// Shared limits of one executor.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_vms: usize,
    memory_budget_mib: u64,
    max_queue: usize,
    policy: TenantPolicy,
    state: Mutex<State>,
}

/// What is held and who waits, under one lock.
#[derive(Debug, Default)]
struct State {
    vms: usize,
    memory_mib: u64,
    queued: usize,
    tenants: HashMap<Tenant, TenantState>,
    /// The pass of the tenant served last.
    pass: u64,
    next_waiter: u64,
}

#[derive(Debug, Default)]
struct TenantState {
    vms: usize,
    memory_mib: u64,
    pass: u64,
    queue: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    memory_mib: u64,
    ticket: oneshot::Sender<Ticket>,
}

/// Held while a VM runs; releases its slot and memory (and its tenant's
/// share) when dropped.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    memory_mib: u64,
    tenant: Option<Tenant>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let served = {
            let mut state = self.inner.lock();
            state.vms = state.vms.saturating_sub(1);
            state.memory_mib = state.memory_mib.saturating_sub(self.memory_mib);
            if let Some(tenant) = &self.tenant {
                if let Some(t) = state.tenants.get_mut(tenant) {
                    t.vms = t.vms.saturating_sub(1);
                    t.memory_mib = t.memory_mib.saturating_sub(self.memory_mib);
                }
                state.forget_if_idle(tenant);
            }
            self.inner.serve(&mut state)
        };
        hand_out(served);
    }
}

/// What one tenant holds and waits for ([`Admission::tenants`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUsage {
    /// Whose.
    pub tenant: Tenant,
    /// VMs its builds run.
    pub vms: usize,
    /// Their guest memory, MiB.
    pub memory_mib: u64,
    /// Its builds waiting for a VM.
    pub queued: usize,
}

/// Why a tenant's next build cannot start now, by its own limits.
enum Held {
    Vms(usize),
    Memory(u64),
}

impl Admission {
    /// Limits: concurrent VMs, total guest MiB, builds allowed to wait, and
    /// the tenants' own.
    pub fn new(
        max_vms: usize,
        memory_budget_mib: u64,
        max_queue: usize,
        policy: TenantPolicy,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_vms: max_vms.max(1),
                memory_budget_mib,
                max_queue,
                policy,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Waits for a VM slot and `memory_mib` of the budget for a build of
    /// `tenant`, in its turn. Refuses at once when the request can never
    /// fit, or cannot start now and its tenant's queue or the server's is
    /// full.
    pub async fn admit(&self, tenant: &Tenant, memory_mib: u64) -> Result<Ticket, BuildError> {
        let inner = &self.inner;
        let limits = inner.policy.limits_of(tenant);
        if memory_mib > inner.memory_budget_mib {
            return Err(Precondition::Budget {
                needed_mib: memory_mib,
                budget_mib: inner.memory_budget_mib,
            }
            .into());
        }
        if let Some(limit) = limits.memory_mib.filter(|limit| memory_mib > *limit) {
            return Err(BuildError::TenantLimit(format!(
                "the build needs {memory_mib} MiB of guest memory, more than tenant {tenant}'s limit memory-mib={limit}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        let (id, served) = {
            let mut state = inner.lock();
            let id = state.next_waiter;
            state.next_waiter += 1;
            let pass = state.pass;
            let t = state.tenants.entry(tenant.clone()).or_default();
            if t.queue.is_empty() {
                // Joining: no turns banked while idle.
                t.pass = t.pass.max(pass);
            }
            t.queue.push_back(Waiter {
                id,
                memory_mib,
                ticket: tx,
            });
            state.queued += 1;
            let mut served = inner.serve(&mut state);
            if state.is_waiting(tenant, id) {
                if let Some(refusal) = inner.refusal(&state, tenant, memory_mib) {
                    state.withdraw(tenant, id);
                    served.extend(inner.serve(&mut state));
                    drop(state);
                    hand_out(served);
                    return Err(refusal);
                }
            }
            (id, served)
        };
        hand_out(served);
        let mut withdraw = Withdraw {
            inner,
            tenant,
            id,
            armed: true,
        };
        let ticket = rx.await;
        withdraw.armed = false;
        ticket.map_err(|_| {
            BuildError::infra(
                "admission",
                std::io::Error::other("the executor is shutting down"),
            )
        })
    }

    /// A VM slot and `memory_mib` of the budget if both are free right
    /// now and no build waits, without queueing (the warm pool's refill: it
    /// never competes with a queued build). The VM belongs to no tenant
    /// until [`Admission::charge`] gives it one.
    pub fn try_admit(&self, memory_mib: u64) -> Option<Ticket> {
        let mut state = self.inner.lock();
        if state.queued > 0 || !self.inner.fits(&state, memory_mib) {
            return None;
        }
        Some(self.inner.take(&mut state, memory_mib, None))
    }

    /// Like [`Admission::try_admit`], for a build of `tenant` within its
    /// limits.
    pub fn try_admit_for(&self, tenant: &Tenant, memory_mib: u64) -> Option<Ticket> {
        let mut state = self.inner.lock();
        if state.queued > 0
            || !self.inner.fits(&state, memory_mib)
            || self.inner.held(&state, tenant, memory_mib).is_some()
        {
            return None;
        }
        Some(self.inner.take(&mut state, memory_mib, Some(tenant)))
    }

    /// Counts the tenant-less `ticket` (a warm VM's) against `tenant`'s
    /// limits, if they allow one more VM of its size; false leaves it as
    /// it was.
    pub fn charge(&self, ticket: &mut Ticket, tenant: &Tenant) -> bool {
        let mut state = self.inner.lock();
        if ticket.tenant.is_some() || self.inner.held(&state, tenant, ticket.memory_mib).is_some() {
            return false;
        }
        let pass = state.pass;
        let t = state.tenants.entry(tenant.clone()).or_default();
        t.pass = t.pass.max(pass);
        t.vms += 1;
        t.memory_mib += ticket.memory_mib;
        t.pass += STRIDE / u64::from(self.inner.policy.limits_of(tenant).weight());
        ticket.tenant = Some(tenant.clone());
        true
    }

    /// Whether `tenant`'s limits allow it one more VM of `memory_mib` now.
    pub fn tenant_has_room(&self, tenant: &Tenant, memory_mib: u64) -> bool {
        let state = self.inner.lock();
        self.inner.held(&state, tenant, memory_mib).is_none()
    }

    /// Whether `memory_mib` fits the budget at all ([`Admission::admit`]
    /// refuses a request that never can).
    pub fn can_ever_fit(&self, memory_mib: u64) -> bool {
        memory_mib <= self.inner.memory_budget_mib
    }

    /// Each tenant that runs or waits right now: its VMs, their guest
    /// memory (MiB) and its waiting builds.
    pub fn tenants(&self) -> Vec<TenantUsage> {
        let state = self.inner.lock();
        let mut usage: Vec<TenantUsage> = state
            .tenants
            .iter()
            .map(|(tenant, t)| TenantUsage {
                tenant: tenant.clone(),
                vms: t.vms,
                memory_mib: t.memory_mib,
                queued: t.queue.len(),
            })
            .collect();
        usage.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        usage
    }

    /// Builds waiting right now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queued
    }

    /// VMs holding a slot right now (builds' and the warm pool's), and the
    /// most there may be (`--max-vms`).
    pub fn vms(&self) -> (usize, usize) {
        (self.inner.lock().vms, self.inner.max_vms)
    }

    /// Guest memory held by running VMs right now, and the budget, MiB.
    pub fn memory_mib(&self) -> (u64, u64) {
        (self.inner.lock().memory_mib, self.inner.memory_budget_mib)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere
        // does not make it wrong.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fits(&self, state: &State, memory_mib: u64) -> bool {
        state.vms < self.max_vms
            && state
                .memory_mib
                .checked_add(memory_mib)
                .is_some_and(|total| total <= self.memory_budget_mib)
    }

    /// What of `tenant`'s own limits keeps one more VM of `memory_mib`
    /// from starting now.
    fn held(&self, state: &State, tenant: &Tenant, memory_mib: u64) -> Option<Held> {
        let limits = self.policy.limits_of(tenant);
        let (vms, memory) = state
            .tenants
            .get(tenant)
            .map_or((0, 0), |t| (t.vms, t.memory_mib));
        if let Some(max) = limits.max_vms.filter(|max| vms >= *max) {
            return Some(Held::Vms(max));
        }
        if let Some(max) = limits.memory_mib.filter(|max| memory + memory_mib > *max) {
            return Some(Held::Memory(max));
        }
        None
    }

    /// Why a build of `tenant` that did not start must not wait either.
    fn refusal(&self, state: &State, tenant: &Tenant, memory_mib: u64) -> Option<BuildError> {
        let limits = self.policy.limits_of(tenant);
        let waiting = state.tenants.get(tenant).map_or(0, |t| t.queue.len());
        // The build itself is counted among the waiting.
        if let Some(max) = limits.max_queue.filter(|max| waiting > *max) {
            let why = match self.held(state, tenant, memory_mib) {
                Some(Held::Vms(vms)) => {
                    format!("tenant {tenant} runs its limit of VMs (max-vms={vms})")
                }
                Some(Held::Memory(mib)) => format!(
                    "tenant {tenant}'s running VMs hold its guest memory limit (memory-mib={mib}) too nearly for {memory_mib} MiB more"
                ),
                None => "the server's VMs are all in use".to_owned(),
            };
            return Some(BuildError::TenantLimit(format!(
                "{why}, and {} of its builds already wait (max-queue={max}); try again later",
                waiting - 1
            )));
        }
        if state.queued > self.max_queue {
            return Some(BuildError::QueueFull(format!(
                "{} builds are already waiting for a VM (limit {}); try again later",
                state.queued - 1,
                self.max_queue
            )));
        }
        None
    }

    fn take(
        self: &Arc<Self>,
        state: &mut State,
        memory_mib: u64,
        tenant: Option<&Tenant>,
    ) -> Ticket {
        state.vms += 1;
        state.memory_mib += memory_mib;
        if let Some(tenant) = tenant {
            let t = state.tenants.entry(tenant.clone()).or_default();
            t.vms += 1;
            t.memory_mib += memory_mib;
        }
        Ticket {
            inner: self.clone(),
            memory_mib,
            tenant: tenant.cloned(),
        }
    }

    /// Starts waiting builds while VMs and memory allow, tenants in turn
    /// (see the module docs); the tickets go out once the lock is let go.
    fn serve(self: &Arc<Self>, state: &mut State) -> Vec<(oneshot::Sender<Ticket>, Ticket)> {
        let mut served = Vec::new();
        loop {
            let next = state
                .tenants
                .iter()
                .filter_map(|(tenant, t)| {
                    let head = t.queue.front()?;
                    self.held(state, tenant, head.memory_mib)
                        .is_none()
                        .then_some((t.pass, head.id, tenant))
                })
                .min()
                .map(|(_, _, tenant)| tenant.clone());
            let Some(tenant) = next else { break };
            let Some(memory_mib) = state
                .tenants
                .get(&tenant)
                .and_then(|t| t.queue.front())
                .map(|w| w.memory_mib)
            else {
                break;
            };
            if !self.fits(state, memory_mib) {
                // Its turn: nobody passes it while it waits for room.
                break;
            }
            let weight = self.policy.limits_of(&tenant).weight();
            let Some(t) = state.tenants.get_mut(&tenant) else {
                break;
            };
            let Some(waiter) = t.queue.pop_front() else {
                break;
            };
            let pass = t.pass;
            t.pass += STRIDE / u64::from(weight);
            state.pass = pass;
            state.queued -= 1;
            let ticket = self.take(state, waiter.memory_mib, Some(&tenant));
            served.push((waiter.ticket, ticket));
        }
        served
    }
}

impl State {
    fn is_waiting(&self, tenant: &Tenant, id: u64) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|t| t.queue.iter().any(|w| w.id == id))
    }

    /// Takes waiter `id` of `tenant` out of its queue, if it is there.
    fn withdraw(&mut self, tenant: &Tenant, id: u64) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            let before = t.queue.len();
            t.queue.retain(|w| w.id != id);
            self.queued -= before - t.queue.len();
        }
        self.forget_if_idle(tenant);
    }

    /// Drops a tenant that neither runs nor waits (it rejoins at the
    /// current pass, which is what it would get anyway).
    fn forget_if_idle(&mut self, tenant: &Tenant) {
        if self
            .tenants
            .get(tenant)
            .is_some_and(|t| t.vms == 0 && t.queue.is_empty())
        {
            self.tenants.remove(tenant);
        }
    }
}

/// Hands each served build its ticket; a build that stopped waiting in the
/// meantime drops it, which frees the VM for the next one.
fn hand_out(served: Vec<(oneshot::Sender<Ticket>, Ticket)>) {
    for (to, ticket) in served {
        let _unwanted = to.send(ticket);
    }
}

/// Takes a build that stops waiting (it was cancelled) out of its queue.
struct Withdraw<'a> {
    inner: &'a Arc<Inner>,
    tenant: &'a Tenant,
    id: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let served = {
            let mut state = self.inner.lock();
            state.withdraw(self.tenant, self.id);
            self.inner.serve(&mut state)
        };
        hand_out(served);
    }
}

#[cfg(test)]
mod tests;
