//! The hosts sharing one database: each one's heartbeat and state, and the
//! reaping of builds whose host stopped heartbeating.
//!
//! A host writes its row every [`HEARTBEAT`]. Every host that has itself
//! been heartbeating for a whole lease (so a database outage, which ages
//! every heartbeat, reaps nothing), on the same tick, ends the running
//! builds of any other host whose heartbeat is older than [`LEASE`]: the build's record gets a final `failed` event
//! (UNAVAILABLE, kind `host_lost`) naming the host. The update that ends
//! a build only matches a build still running, so of several hosts reaping
//! at once exactly one writes its final event. A host starting under an id
//! that has running builds (it was killed and restarted) ends them the same
//! way at once: nothing of that earlier run goes on. The heartbeat also
//! stops this host's builds that an operator cancelled through another host
//! (`cancel_requested`), within one [`HEARTBEAT`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;

use crate::db::{Database, DbError};
use crate::proto::kiln_v1::{self, build_event::Event as WireEvent, BuildEvent};
pub use crate::server::health::HostState;

/// How often a host writes its heartbeat (and reaps).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A host whose heartbeat is older than this is taken for dead.
pub const LEASE: Duration = Duration::from_secs(10);

/// The `kind` of the failure a reaped build ends with.
pub const HOST_LOST: &str = "host_lost";

/// This host's row, kept up to date by its heartbeat task.
#[derive(Clone)]
pub(super) struct HostHandle {
    host_id: String,
    state: Arc<Mutex<HostState>>,
    heartbeat: Arc<tokio::task::JoinHandle<()>>,
    on_cancel: CancelHandler,
}

/// What stops a build of this host that an operator cancelled through
/// another host; set once the executor exists.
pub(super) type CancelHandler = Arc<std::sync::OnceLock<Box<dyn Fn(&str) + Send + Sync>>>;

impl HostHandle {
    pub(super) fn on_cancel(&self, stop: Box<dyn Fn(&str) + Send + Sync>) {
        let _ = self.on_cancel.set(stop);
    }

    pub(super) fn set_state(&self, state: HostState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// Stops the heartbeat and writes the row's last state.
    pub(super) async fn stop(&self, db: &Database) {
        self.heartbeat.abort();
        self.set_state(HostState::Stopped);
        if let Err(e) = beat(db, &self.host_id, HostState::Stopped).await {
            tracing::warn!(error = %e, "could not record this host as stopped");
        }
    }
}

/// Registers `host_id` (serving), ends what an earlier run of it left
/// running, and starts its heartbeat.
pub(super) async fn register(
    db: &Database,
    host_id: &str,
    address: &str,
) -> Result<HostHandle, DbError> {
    let client = db.client().await?;
    client
        .execute(
            "INSERT INTO hosts (host_id, address, state) VALUES ($1, $2, 'serving') \
             ON CONFLICT (host_id) DO UPDATE SET address = $2, state = 'serving', \
               started_at = now(), heartbeat_at = now()",
            &[&host_id, &address],
        )
        .await
        .map_err(db.query_error("registering this host"))?;
    drop(client);
    let ended = end_builds_of(
        db,
        host_id,
        &format!("kiln host {host_id} ({address}) restarted while the build ran"),
    )
    .await?;
    if ended > 0 {
        tracing::warn!(
            builds = ended,
            "ended builds an earlier run of this host left running"
        );
    }
    let state = Arc::new(Mutex::new(HostState::Serving));
    let on_cancel = CancelHandler::default();
    let heartbeat = tokio::spawn(heartbeat(
        db.clone(),
        host_id.to_owned(),
        state.clone(),
        on_cancel.clone(),
    ));
    Ok(HostHandle {
        host_id: host_id.to_owned(),
        state,
        heartbeat: Arc::new(heartbeat),
        on_cancel,
    })
}

async fn heartbeat(
    db: Database,
    host_id: String,
    state: Arc<Mutex<HostState>>,
    on_cancel: CancelHandler,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when this host's heartbeats have been recorded without a gap.
    // After the database was away, every host's heartbeat is old: a host
    // reaps only once it has itself beaten for a whole lease again, by
    // which time every live host has too.
    let mut beating_since: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let now = *state.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = beat(&db, &host_id, now).await {
            if beating_since.take().is_some() {
                tracing::warn!(error = %e, "heartbeat not recorded; retrying every {HEARTBEAT:?}");
            }
            continue;
        }
        let since = *beating_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= LEASE + HEARTBEAT {
            if let Err(e) = reap(&db, &host_id).await {
                tracing::warn!(error = %e, "reaping the builds of dead hosts failed");
            }
        }
        if let Some(stop) = on_cancel.get() {
            match cancelled(&db, &host_id).await {
                Ok(ids) => ids.iter().for_each(|id| stop(id)),
                Err(e) => tracing::warn!(error = %e, "reading cancelled builds failed"),
            }
        }
    }
}

/// This host's running builds that an operator cancelled through another
/// host.
async fn cancelled(db: &Database, host_id: &str) -> Result<Vec<String>, DbError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT build_id FROM builds \
             WHERE host_id = $1 AND state = 'running' AND cancel_requested",
            &[&host_id],
        )
        .await
        .map_err(db.query_error("reading cancelled builds"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn beat(db: &Database, host_id: &str, state: HostState) -> Result<(), DbError> {
    let client = db.client().await?;
    client
        .execute(
            "UPDATE hosts SET heartbeat_at = now(), state = $2 WHERE host_id = $1",
            &[&host_id, &state.name()],
        )
        .await
        .map_err(db.query_error("writing the heartbeat"))?;
    Ok(())
}

/// Ends the running builds of every other host whose lease ran out.
async fn reap(db: &Database, me: &str) -> Result<(), DbError> {
    let client = db.client().await?;
    let lease = i64::try_from(LEASE.as_secs()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT DISTINCT h.host_id, h.address, h.state FROM hosts h \
             JOIN builds b ON b.host_id = h.host_id AND b.state = 'running' \
             WHERE h.host_id <> $1 AND h.heartbeat_at < now() - make_interval(secs => $2)",
            &[&me, &(lease as f64)],
        )
        .await
        .map_err(db.query_error("finding dead hosts"))?;
    drop(client);
    for row in rows {
        let (host, address, last_state): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let why = if last_state == HostState::Stopped.name() {
            format!("kiln host {host} ({address}) stopped while the build ran")
        } else {
            format!(
                "kiln host {host} ({address}) stopped answering while the build ran \
                 (no heartbeat for over {}s)",
                LEASE.as_secs()
            )
        };
        let ended = end_builds_of(db, &host, &why).await?;
        if ended > 0 {
            tracing::warn!(host = %host, builds = ended, "ended the builds of a lost host");
        }
    }
    Ok(())
}

/// Ends every running build of `host` with a `host_lost` failure saying
/// `why`; how many it ended.
async fn end_builds_of(db: &Database, host: &str, why: &str) -> Result<u64, DbError> {
    let mut client = db.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(db.query_error("starting to end a lost host's builds"))?;
    let ended = tx
        .query(
            "UPDATE builds SET state = 'failed', phase = 'lost', last_seq = last_seq + 1, \
               ended_at = now() \
             WHERE host_id = $1 AND state = 'running' RETURNING build_id, last_seq",
            &[&host],
        )
        .await
        .map_err(db.query_error("ending a lost host's builds"))?;
    for row in &ended {
        let (id, seq): (String, i64) = (row.get(0), row.get(1));
        let event = BuildEvent {
            build_id: id.clone(),
            event: Some(WireEvent::Failed(lost(why))),
        };
        tx.execute(
            "INSERT INTO build_events (build_id, seq, event) VALUES ($1, $2, $3) \
             ON CONFLICT (build_id, seq) DO UPDATE SET event = excluded.event",
            &[&id, &seq, &event.encode_to_vec()],
        )
        .await
        .map_err(db.query_error("recording a lost build's end"))?;
    }
    tx.commit()
        .await
        .map_err(db.query_error("committing a lost host's builds"))?;
    Ok(ended.len() as u64)
}

/// The failure a build of a lost host ends with.
pub fn lost(why: &str) -> kiln_v1::Failed {
    kiln_v1::Failed {
        code: tonic::Code::Unavailable as i32,
        message: why.to_owned(),
        kind: HOST_LOST.to_owned(),
        ..Default::default()
    }
}
