//! Build records shared by several hosts through PostgreSQL (`kiln serve
//! --database`): every build's events, so that any host answers `Watch`
//! and `Logs` for a build running on another, and the hosts themselves,
//! so that a build whose host died ends with a clear failure.
//!
//! - Writing ([`Records::observer`]): each build's events are encoded as
//!   the `kiln.v1.BuildEvent`s its watchers get and numbered from 1. The
//!   observer runs under the build log's lock, so it only queues them; one
//!   writer task per host stores them in batches, one transaction each.
//!   While the database is away the writer retries the same batch; log
//!   chunks queued past [`MAX_PENDING_LOG_BYTES`] are dropped (a `lagged`
//!   phase says how many), lifecycle events never are.
//! - Reading ([`Records::follow`], in [`follow`]): the stored events of a
//!   build from the first, then new ones as they are stored (polled every
//!   [`POLL`]), until the final one.
//! - Hosts ([`hosts`]): each host's row carries a heartbeat and its state
//!   (serving, full, draining, stopped); every host reaps the running
//!   builds of hosts whose heartbeat is older than [`hosts::LEASE`],
//!   ending each with a `host_lost` failure (UNAVAILABLE).

pub mod follow;
pub mod hosts;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_guest::contract::Report;
use prost::Message;
use tokio::sync::mpsc;

use crate::db::{Database, DbError};
use crate::executor::events::{BuildObserver, Event, ObserverFactory};
use crate::proto::kiln_v1::{self, build_event::Event as WireEvent, BuildEvent};
use crate::tenant::Tenant;

pub use hosts::HostState;

/// Log bytes queued for the database at most, over all builds of a host;
/// past it, log chunks are dropped until the writer catches up.
pub const MAX_PENDING_LOG_BYTES: usize = 64 << 20;

/// How often a follower of another host's build looks for new events.
pub const POLL: Duration = Duration::from_millis(200);

/// Writes queued at most into one transaction.
const BATCH: usize = 512;

/// A build's state in its record.
pub mod state {
    /// Not ended.
    pub const RUNNING: &str = "running";
    /// Ended with `completed`.
    pub const COMPLETED: &str = "completed";
    /// Ended with `failed`.
    pub const FAILED: &str = "failed";
}

/// One thing for the writer to store.
enum Write {
    /// A new build.
    Begin { id: String, tenant: String },
    /// The build's event number `seq`.
    Event {
        id: String,
        seq: i64,
        encoded: Vec<u8>,
        phase: Option<String>,
        /// The state the build ends in, for its final event.
        ends: Option<&'static str>,
        /// Log bytes of the event, given back to the budget once stored.
        log_bytes: usize,
    },
}

/// This host's side of the shared build records.
pub struct Records {
    db: Database,
    host_id: String,
    queue: mpsc::UnboundedSender<Write>,
    pending_log: Arc<AtomicUsize>,
    hosts: hosts::HostHandle,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("db", &self.db)
            .field("host_id", &self.host_id)
            .finish()
    }
}

impl Records {
    /// Registers this host as `host_id`, reachable at `address`, ends the
    /// builds an earlier run of it left running, and starts the writer
    /// and the heartbeat (which also reaps dead hosts' builds).
    pub async fn start(
        db: Database,
        host_id: &str,
        address: &str,
    ) -> Result<Arc<Records>, DbError> {
        let hosts = hosts::register(&db, host_id, address).await?;
        let pending_log = Arc::new(AtomicUsize::new(0));
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(
            db.clone(),
            host_id.to_owned(),
            rx,
            pending_log.clone(),
        ));
        Ok(Arc::new(Records {
            db,
            host_id: host_id.to_owned(),
            queue,
            pending_log,
            hosts,
        }))
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Sets the state this host announces from its next heartbeat on.
    pub fn set_state(&self, state: HostState) {
        self.hosts.set_state(state);
    }

    /// Marks this host stopped now (its running builds are not reaped as
    /// lost while it drains: it is still heartbeating until this).
    pub async fn stopped(&self) {
        self.hosts.stop(&self.db).await;
    }

    /// Has `stop` called with the id of each of this host's running builds
    /// that an operator cancelled through another host.
    pub fn on_cancel(&self, stop: impl Fn(&str) + Send + Sync + 'static) {
        self.hosts.on_cancel(Box::new(stop));
    }

    /// Asks the host running build `id` to stop it (within a heartbeat);
    /// false if there is no such running build `who` may see.
    pub async fn request_cancel(
        &self,
        id: &str,
        who: &crate::tenant::Identity,
    ) -> Result<bool, DbError> {
        match self.find(id, who).await? {
            Some(build) if build.state == state::RUNNING => {}
            _ => return Ok(false),
        }
        let client = self.db.client().await?;
        let n = client
            .execute(
                "UPDATE builds SET cancel_requested = true \
                 WHERE build_id = $1 AND state = 'running'",
                &[&id],
            )
            .await
            .map_err(self.db.query_error("recording a cancellation"))?;
        Ok(n == 1)
    }

    /// Has every build recorded: the factory to give
    /// [`crate::executor::Executor::add_observer`].
    pub fn observer(self: &Arc<Self>) -> ObserverFactory {
        let records = self.clone();
        Arc::new(move |id, _req, tenant| {
            records.begin(id, tenant);
            Box::new(Recorder {
                id: id.to_owned(),
                seq: 0,
                queue: records.queue.clone(),
                pending_log: records.pending_log.clone(),
                dropped: 0,
            })
        })
    }

    fn begin(&self, id: &str, tenant: &Tenant) {
        let _ = self.queue.send(Write::Begin {
            id: id.to_owned(),
            tenant: tenant.as_str().to_owned(),
        });
    }
}

/// The observer of one build: numbers and queues its events.
struct Recorder {
    id: String,
    seq: i64,
    queue: mpsc::UnboundedSender<Write>,
    pending_log: Arc<AtomicUsize>,
    /// Log chunks dropped since the last one queued.
    dropped: u64,
}

impl Recorder {
    fn queue(&mut self, wire: BuildEvent, log_bytes: usize) {
        self.seq += 1;
        let (phase, ends) = match &wire.event {
            Some(WireEvent::Phase(p)) => (Some(p.name.clone()), None),
            Some(WireEvent::Completed(_)) => (None, Some(state::COMPLETED)),
            Some(WireEvent::Failed(_)) => (None, Some(state::FAILED)),
            _ => (None, None),
        };
        let _ = self.queue.send(Write::Event {
            id: self.id.clone(),
            seq: self.seq,
            encoded: wire.encode_to_vec(),
            phase,
            ends,
            log_bytes,
        });
    }
}

impl BuildObserver for Recorder {
    fn event(&mut self, event: &Event, _at: Instant) {
        let log_bytes = match event {
            Event::Log { data, .. } => data.len(),
            _ => 0,
        };
        if log_bytes > 0 {
            let pending = self.pending_log.fetch_add(log_bytes, Ordering::Relaxed);
            if pending + log_bytes > MAX_PENDING_LOG_BYTES {
                self.pending_log.fetch_sub(log_bytes, Ordering::Relaxed);
                self.dropped += 1;
                return;
            }
        }
        if self.dropped > 0 {
            let lagged = BuildEvent {
                build_id: self.id.clone(),
                event: Some(WireEvent::Phase(kiln_v1::Phase {
                    name: format!("lagged: {} log chunks not recorded", self.dropped),
                })),
            };
            self.dropped = 0;
            // A lagged note is not a phase the build is in.
            self.seq += 1;
            let _ = self.queue.send(Write::Event {
                id: self.id.clone(),
                seq: self.seq,
                encoded: lagged.encode_to_vec(),
                phase: None,
                ends: None,
                log_bytes: 0,
            });
        }
        self.queue(crate::grpc::events::wire(&self.id, event), log_bytes);
    }

    fn report(&mut self, _report: &Report, _at: Instant) {}
}

/// The writer: stores queued writes in batches until every sender is gone.
async fn write(
    db: Database,
    host_id: String,
    mut rx: mpsc::UnboundedReceiver<Write>,
    pending_log: Arc<AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut delay = Duration::from_millis(100);
        loop {
            match store(&db, &host_id, &batch).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(database = %db.name(), "build records are stored again");
                        failing = false;
                    }
                    break;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "storing build records failed; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        let stored: usize = batch
            .iter()
            .map(|w| match w {
                Write::Event { log_bytes, .. } => *log_bytes,
                Write::Begin { .. } => 0,
            })
            .sum();
        pending_log.fetch_sub(stored, Ordering::Relaxed);
        batch.clear();
    }
}

/// Stores `batch` in one transaction. Rows already there (a retried batch
/// whose commit was lost) are left as they are.
async fn store(db: &Database, host: &str, batch: &[Write]) -> Result<(), DbError> {
    let mut client = db.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(db.query_error("starting a build records transaction"))?;
    let begin = tx
        .prepare_cached(
            "INSERT INTO builds (build_id, tenant, host_id, state) \
             SELECT $1, $2, $3, 'running' ON CONFLICT (build_id) DO NOTHING",
        )
        .await
        .map_err(db.query_error("preparing a build record"))?;
    let event = tx
        .prepare_cached(
            "INSERT INTO build_events (build_id, seq, event) VALUES ($1, $2, $3) \
             ON CONFLICT (build_id, seq) DO NOTHING",
        )
        .await
        .map_err(db.query_error("preparing a build event"))?;
    let update = tx
        .prepare_cached(
            "UPDATE builds SET last_seq = greatest(last_seq, $2), \
               phase = coalesce($3, phase), \
               state = CASE WHEN state = 'running' THEN coalesce($4, state) ELSE state END, \
               ended_at = CASE WHEN $4::text IS NOT NULL AND ended_at IS NULL THEN now() ELSE ended_at END \
             WHERE build_id = $1",
        )
        .await
        .map_err(db.query_error("preparing a build update"))?;
    for w in batch {
        match w {
            Write::Begin { id, tenant } => {
                tx.execute(&begin, &[id, tenant, &host])
                    .await
                    .map_err(db.query_error("recording a build"))?;
            }
            Write::Event {
                id,
                seq,
                encoded,
                phase,
                ends,
                ..
            } => {
                tx.execute(&event, &[id, seq, encoded])
                    .await
                    .map_err(db.query_error("recording a build event"))?;
                tx.execute(&update, &[id, seq, phase, ends])
                    .await
                    .map_err(db.query_error("updating a build record"))?;
            }
        }
    }
    tx.commit()
        .await
        .map_err(db.query_error("committing build records"))
}
