//! A background sampler: a blocking thread that folds a reading of `/proc`
//! into a state every 100 ms while something else (a build, a batch) runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the sampler reads.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A running sampler; [`Sampler::finish`] stops it and yields its state.
pub struct Sampler<T> {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<T>,
}

impl<T: Send + 'static> Sampler<T> {
    /// Starts calling `sample(&mut state)` every [`INTERVAL`], at once first.
    pub fn start(mut state: T, mut sample: impl FnMut(&mut T) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    sample(&mut state);
                    std::thread::sleep(INTERVAL);
                }
                state
            })
        };
        Self { stop, task }
    }

    /// Stops sampling (after the reading under way) and returns the state.
    pub async fn finish(mut self) -> anyhow::Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        Ok((&mut self.task).await?)
    }
}

impl<T> Drop for Sampler<T> {
    /// A sampler given up on (an error on the way) stops too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
