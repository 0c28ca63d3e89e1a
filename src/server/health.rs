//! What a host says about itself to load balancers: serving, full (every
//! VM slot busy: a new build would queue), draining (stopping: no new
//! builds) or stopped.
//!
//! One [`HostHealth`] per server. It is told when the server starts to
//! drain, and follows the executor ([`HostHealth::follow`]) for whether it
//! is full. Three places read it:
//! - `grpc.health.v1.Health`: the build services (`tvix.build.v1.
//!   BuildService`, `snix.build.v1.BuildService`, `kiln.v1.BuildEvents`)
//!   are NOT_SERVING while full or draining; the server as a whole (`""`)
//!   and the castore stay SERVING until it stops, as they still answer.
//! - `GET /healthz` on the metrics listener: 200 `serving` or `full`, 503
//!   `draining` or `stopped` — whether a balancer may send the host
//!   anything (a full host still queues builds); a balancer that reads
//!   bodies can skip `full` hosts too.
//! - HAProxy's agent protocol ([`serve_lb_agent`], `--lb-agent-listen`):
//!   the weight a balancer should give the host — 100% serving, 0% full
//!   (new builds go to hosts with room; README's configuration lists every
//!   host a second time as a backup, so when every host is full builds
//!   still queue somewhere), `drain` while draining.
//! - the shared host records (`--database`), for operators.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::executor::Executor;

/// Response header naming the host that answered ([`HostHealth::named`]).
pub const HOST_HEADER: &str = "x-kiln-host";

/// How often the executor's load is looked at.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// What a host announces about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Taking builds; a new build starts at once.
    Serving,
    /// Taking builds, but every VM slot is busy: a new build would queue.
    Full,
    /// Stopping: no new builds; running ones finish.
    Draining,
    /// Stopped.
    Stopped,
}

impl HostState {
    /// The state's name, as stored and as `/healthz` says it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Full => "full",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }

    /// Whether a load balancer should send this host new builds.
    pub fn takes_builds(self) -> bool {
        self == Self::Serving
    }

    /// Whether the host answers calls at all (a full host still queues
    /// builds): what `/healthz` answers 200 for.
    pub fn is_up(self) -> bool {
        matches!(self, Self::Serving | Self::Full)
    }

    /// The line HAProxy's agent check reads ([`serve_lb_agent`]).
    pub fn agent_line(self) -> &'static str {
        match self {
            Self::Serving => "ready up 100%\n",
            Self::Full => "ready up 0%\n",
            Self::Draining => "drain\n",
            Self::Stopped => "down\n",
        }
    }
}

/// A host's state, shared by what reports it. Cheap to clone.
#[derive(Clone)]
pub struct HostHealth {
    state: Arc<watch::Sender<HostState>>,
    host_id: Option<Arc<str>>,
}

impl Default for HostHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl HostHealth {
    /// A serving host.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(HostState::Serving)),
            host_id: None,
        }
    }

    /// The same, for the host named `host_id`: every response of the
    /// server then carries it in the [`HOST_HEADER`] header (which host of
    /// several behind a load balancer answered).
    pub fn named(host_id: &str) -> Self {
        Self {
            host_id: Some(host_id.into()),
            ..Self::new()
        }
    }

    /// The host's name, when it has one.
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    /// The state now.
    pub fn state(&self) -> HostState {
        *self.state.borrow()
    }

    /// Follows the state's changes.
    pub fn subscribe(&self) -> watch::Receiver<HostState> {
        self.state.subscribe()
    }

    /// The host stops taking builds, for good.
    pub fn drain(&self) {
        self.state.send_replace(HostState::Draining);
    }

    /// The host has stopped.
    pub fn stopped(&self) {
        self.state.send_replace(HostState::Stopped);
    }

    /// Keeps the state at full or serving by the executor's load until the
    /// host drains, or the executor is gone.
    pub async fn follow(self, executor: std::sync::Weak<Executor>) {
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(executor) = executor.upgrade() else {
                return;
            };
            let full = is_full(&executor);
            drop(executor);
            let mut ended = false;
            self.state.send_if_modified(|state| match *state {
                HostState::Draining | HostState::Stopped => {
                    ended = true;
                    false
                }
                _ => {
                    let now = if full {
                        HostState::Full
                    } else {
                        HostState::Serving
                    };
                    std::mem::replace(state, now) != now
                }
            });
            if ended {
                return;
            }
        }
    }
}

/// Whether a new build would have to queue: builds waiting already, or as
/// many running as there are VM slots.
pub fn is_full(executor: &Executor) -> bool {
    let admission = executor.admission();
    let (_, max_vms) = admission.vms();
    admission.queued() > 0 || executor.registry().running().len() >= max_vms
}

/// Answers HAProxy's agent check (`agent-check` on a `server` line) on
/// `listener` until `shutdown`: each connection gets the host's
/// [`HostState::agent_line`] and is closed; nothing it sends is read.
pub async fn serve_lb_agent(
    listener: tokio::net::TcpListener,
    health: HostHealth,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::io::AsyncWriteExt;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "answering load balancer agent checks");
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, _)) => {
                let line = health.state().agent_line();
                tokio::spawn(async move {
                    // A balancer that went away meanwhile: nothing to do.
                    let _ = tokio::time::timeout(AGENT_WRITE_TIMEOUT, async {
                        stream.write_all(line.as_bytes()).await?;
                        stream.shutdown().await
                    })
                    .await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an agent check");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long writing one agent answer may take.
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_agent_answers_the_state_and_closes() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = HostHealth::new();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve_lb_agent(listener, health.clone(), stop.clone()));
        let read = || async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut line = String::new();
            s.read_to_string(&mut line).await.expect("read");
            line
        };
        assert_eq!(read().await, "ready up 100%\n");
        health.state.send_replace(HostState::Full);
        assert_eq!(read().await, "ready up 0%\n");
        health.drain();
        assert_eq!(read().await, "drain\n");
        stop.cancel();
    }
}
