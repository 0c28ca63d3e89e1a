//! Admission control: at most `max_vms` VMs at once, at most `memory_budget`
//! MiB of guest RAM in use, and a bounded queue of builds waiting for both.
//! Beyond the queue a build is refused at once (RESOURCE_EXHAUSTED).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::build::error::BuildError;

/// Shared limits of one executor.
#[derive(Debug)]
pub struct Admission {
    vms: Arc<Semaphore>,
    memory: Arc<Semaphore>,
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
            memory: Arc::new(Semaphore::new(permits)),
            memory_budget_mib,
            max_queue,
            queued: AtomicUsize::new(0),
        }
    }

    /// Waits for a VM slot and `memory_mib` of the budget. Refuses at once
    /// when the queue is full or the request can never fit.
    pub async fn admit(&self, memory_mib: u64) -> Result<Ticket, BuildError> {
        if memory_mib > self.memory_budget_mib {
            return Err(BuildError::Precondition(format!(
                "the VM needs {memory_mib} MiB, more than this server's total guest memory budget of {} MiB",
                self.memory_budget_mib
            )));
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
        let closed = |_| BuildError::Infrastructure {
            step: "admission",
            message: "executor is shutting down".into(),
        };
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

    /// Builds waiting right now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
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
        drop(first);
        waiter.await.expect("join").expect("admitted after release");
        assert_eq!(adm.queued(), 0);
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
            Err(BuildError::Precondition(_))
        ));
    }
}
