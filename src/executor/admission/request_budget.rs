//! The host memory requests take, bounded apart from the queue's length.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::executor::error::BuildError;

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
