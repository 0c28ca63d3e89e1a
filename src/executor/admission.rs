//! Admission control: at most `max_vms` VMs at once, at most `memory_budget`
//! MiB of guest RAM in use, and a bounded queue of builds waiting for both.
//! Beyond the queue a build is refused at once (RESOURCE_EXHAUSTED).
//!
//! The host memory requests take is bounded apart from the queue's length:
//! a [`RequestBudget`] sums the approximate size of every request the server
//! holds (waiting or running) and refuses one that would go over it, also at
//! once (RESOURCE_EXHAUSTED), so a queue of maximum-size requests cannot
//! take the host's memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::executor::error::{BuildError, Precondition};

/// Shared limits of one executor.
#[derive(Debug)]
pub struct Admission {
    vms: Arc<Semaphore>,
    max_vms: usize,
    memory: Arc<Semaphore>,
    memory_permits: usize,
    memory_budget_mib: u64,
    max_queue: usize,
    queued: AtomicUsize,
}

/// Held while a VM runs; releases its slot and memory when dropped.
#[derive(Debug)]
pub struct Ticket {
    _vm: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    /// Limits: concurrent VMs, total guest MiB, builds allowed to wait.
    pub fn new(max_vms: usize, memory_budget_mib: u64, max_queue: usize) -> Self {
        let permits = usize::try_from(memory_budget_mib)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            vms: Arc::new(Semaphore::new(max_vms.max(1))),
            max_vms: max_vms.max(1),
            memory: Arc::new(Semaphore::new(permits)),
            memory_permits: permits,
            memory_budget_mib,
            max_queue,
            queued: AtomicUsize::new(0),
        }
    }

    /// Waits for a VM slot and `memory_mib` of the budget. Refuses at once
    /// when the queue is full or the request can never fit.
    pub async fn admit(&self, memory_mib: u64) -> Result<Ticket, BuildError> {
        if memory_mib > self.memory_budget_mib {
            return Err(Precondition::Budget {
                needed_mib: memory_mib,
                budget_mib: self.memory_budget_mib,
            }
            .into());
        }
        // Fast path: capacity free right now, no queueing.
        if let (Ok(vm), Ok(mem)) = (
            self.vms.clone().try_acquire_owned(),
            self.memory
                .clone()
                .try_acquire_many_owned(memory_mib as u32),
        ) {
            return Ok(Ticket {
                _vm: vm,
                _memory: mem,
            });
        }
        let previously = self.queued.fetch_add(1, Ordering::SeqCst);
        let _slot = QueueSlot(&self.queued);
        if previously >= self.max_queue {
            return Err(BuildError::QueueFull(format!(
                "{} builds are already waiting for a VM (limit {}); try again later",
                previously, self.max_queue
            )));
        }
        let closed = |e| BuildError::infra("admission: the executor is shutting down", e);
        let vm = self.vms.clone().acquire_owned().await.map_err(closed)?;
        let memory = self
            .memory
            .clone()
            .acquire_many_owned(memory_mib as u32)
            .await
            .map_err(closed)?;
        Ok(Ticket {
            _vm: vm,
            _memory: memory,
        })
    }

    /// A VM slot and `memory_mib` of the budget if both are free right
    /// now, without queueing (the warm pool's refill: it never waits, so it
    /// never competes with a queued build).
    pub fn try_admit(&self, memory_mib: u64) -> Option<Ticket> {
        let vm = self.vms.clone().try_acquire_owned().ok()?;
        let memory = self
            .memory
            .clone()
            .try_acquire_many_owned(u32::try_from(memory_mib).ok()?)
            .ok()?;
        Some(Ticket {
            _vm: vm,
            _memory: memory,
        })
    }

    /// Whether `memory_mib` fits the budget at all ([`Admission::admit`]
    /// refuses a request that never can).
    pub fn can_ever_fit(&self, memory_mib: u64) -> bool {
        memory_mib <= self.memory_budget_mib
    }

    /// Builds waiting right now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// VMs holding a slot right now (builds' and the warm pool's), and the
    /// most there may be (`--max-vms`).
    pub fn vms(&self) -> (usize, usize) {
        let free = self.vms.available_permits();
        (self.max_vms.saturating_sub(free), self.max_vms)
    }

    /// Guest memory held by running VMs right now, and the budget, MiB.
    pub fn memory_mib(&self) -> (u64, u64) {
        let free = self.memory.available_permits();
        let held = self.memory_permits.saturating_sub(free) as u64;
        (held, self.memory_budget_mib)
    }
}

/// Default of [`RequestBudget`]: 1 GiB, sixteen requests at the 64 MiB
/// gRPC message limit; Nix-shaped requests take kilobytes to a few MiB, so
/// thousands fit.
pub const DEFAULT_REQUEST_BUDGET_BYTES: usize = 1 << 30;

/// Bounds the summed [`crate::executor::BuildRequest::heap_size`] of the
/// requests this server holds.
#[derive(Debug)]
pub struct RequestBudget {
    limit: usize,
    held: Arc<AtomicUsize>,
}

/// A request's share of the budget; given back when dropped.
#[derive(Debug)]
pub struct RequestPermit {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl RequestBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Takes `bytes` of the budget, or refuses at once when they do not fit
    /// beside what is held (no waiting: the request is already in memory).
    pub fn reserve(&self, bytes: usize) -> Result<RequestPermit, BuildError> {
        let limit = self.limit;
        if bytes > limit {
            return Err(BuildError::QueueFull(format!(
                "the request takes about {bytes} bytes, more than this server's whole request memory budget of {limit} bytes"
            )));
        }
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|held| {
                BuildError::QueueFull(format!(
                    "the request takes about {bytes} bytes and requests already held take {held}, over this server's request memory budget of {limit} bytes; try again later"
                ))
            })?;
        Ok(RequestPermit {
            held: self.held.clone(),
            bytes,
        })
    }

    /// Bytes held right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Default for RequestBudget {
    fn default() -> Self {
        Self::new(DEFAULT_REQUEST_BUDGET_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn queue_beyond_the_bound_is_refused() {
        let adm = Arc::new(Admission::new(1, 1024, 1));
        let first = adm.admit(512).await.expect("free slot");
        let waiter = {
            let adm = adm.clone();
            tokio::spawn(async move { adm.admit(512).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(adm.queued(), 1);
        let refused = adm.admit(512).await.expect_err("queue is full");
        assert!(matches!(refused, BuildError::QueueFull(_)));
        assert_eq!(adm.vms(), (1, 1));
        assert_eq!(adm.memory_mib(), (512, 1024));
        drop(first);
        waiter.await.expect("join").expect("admitted after release");
        assert_eq!(adm.queued(), 0);
        assert_eq!(adm.vms(), (0, 1), "the waiter's ticket went with it");
        assert_eq!(adm.memory_mib(), (0, 1024));
    }

    #[tokio::test]
    async fn memory_budget_limits_concurrency() {
        let adm = Admission::new(4, 1000, 4);
        let a = adm.admit(600).await.expect("fits");
        let b = tokio::time::timeout(Duration::from_millis(50), adm.admit(600)).await;
        assert!(b.is_err(), "second VM must wait for memory");
        drop(a);
        assert!(adm.admit(600).await.is_ok());
        assert!(matches!(
            adm.admit(2000).await,
            Err(BuildError::Precondition(Precondition::Budget { .. }))
        ));
    }

    #[test]
    fn request_budget_sums_held_requests() {
        let budget = RequestBudget::new(1000);
        let a = budget.reserve(600).expect("fits");
        let refused = budget.reserve(600).expect_err("600 + 600 > 1000");
        assert!(
            matches!(refused, BuildError::QueueFull(ref m) if m.contains("1000 bytes")),
            "{refused}"
        );
        let b = budget.reserve(400).expect("600 + 400 fits exactly");
        assert_eq!(budget.held(), 1000);
        drop(a);
        assert_eq!(budget.held(), 400);
        let c = budget.reserve(600).expect("fits once the first is gone");
        drop((b, c));
        assert_eq!(budget.held(), 0);
        let too_big = budget.reserve(1001).expect_err("never fits");
        assert!(matches!(too_big, BuildError::QueueFull(_)), "{too_big}");
    }
}
