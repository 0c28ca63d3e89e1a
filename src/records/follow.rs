//! Reading a build's recorded events: what `Watch` and `Logs` answer for a
//! build another host runs (or ran).

use std::sync::Arc;

use prost::Message;
use tonic::Status;

use super::{Records, POLL};
use crate::db::DbError;
use crate::grpc::events::EventStream;
use crate::proto::kiln_v1::{build_event::Event as WireEvent, BuildEvent};
use crate::tenant::{Identity, Tenant};

/// Events read per query.
const PAGE: i64 = 500;

/// A recorded build, as its record says.
#[derive(Debug, Clone)]
pub struct RecordedBuild {
    /// The build's id.
    pub id: String,
    /// Who asked for it.
    pub tenant: String,
    /// The host that runs (or ran) it.
    pub host_id: String,
    /// `running`, `completed` or `failed`.
    pub state: String,
}

/// A running build as its record shows it, for listings.
#[derive(Debug, Clone)]
pub struct RunningBuild {
    /// The build's id.
    pub id: String,
    /// Who asked for it.
    pub tenant: String,
    /// The host running it.
    pub host_id: String,
    /// The phase it is in (empty before its first).
    pub phase: String,
    /// When it was recorded, seconds since the Unix epoch.
    pub submitted_unix_secs: u64,
    /// Seconds since then, by the database's clock.
    pub age_secs: u64,
}

/// Running builds listed at most.
const MAX_LISTED: i64 = 1000;

impl Records {
    /// The builds running on any host that `who` may see, oldest first (at
    /// most [`MAX_LISTED`]).
    pub async fn running(&self, who: &Identity) -> Result<Vec<RunningBuild>, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                "SELECT build_id, tenant, host_id, phase, \
                   extract(epoch FROM submitted_at)::float8, \
                   extract(epoch FROM now() - submitted_at)::float8 \
                 FROM builds WHERE state = 'running' ORDER BY submitted_at LIMIT $1",
                &[&MAX_LISTED],
            )
            .await
            .map_err(self.db.query_error("listing running builds"))?;
        let secs = |v: f64| {
            if v.is_finite() && v > 0.0 {
                v as u64
            } else {
                0
            }
        };
        Ok(rows
            .iter()
            .map(|row| RunningBuild {
                id: row.get(0),
                tenant: row.get(1),
                host_id: row.get(2),
                phase: row.get(3),
                submitted_unix_secs: secs(row.get(4)),
                age_secs: secs(row.get(5)),
            })
            .filter(|b| Tenant::parse(&b.tenant).is_ok_and(|owner| who.may_see(&owner)))
            .collect())
    }

    /// The record of build `id`, if there is one `who` may see (another
    /// tenant's build is `None`, like an unknown id).
    pub async fn find(&self, id: &str, who: &Identity) -> Result<Option<RecordedBuild>, DbError> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                "SELECT tenant, host_id, state FROM builds WHERE build_id = $1",
                &[&id],
            )
            .await
            .map_err(self.db.query_error("reading a build record"))?;
        Ok(row
            .map(|row| RecordedBuild {
                id: id.to_owned(),
                tenant: row.get(0),
                host_id: row.get(1),
                state: row.get(2),
            })
            .filter(|b| Tenant::parse(&b.tenant).is_ok_and(|owner| who.may_see(&owner))))
    }

    /// The recorded events of `build` from the first; with `live`, then new
    /// ones as they are stored, until its final event.
    pub fn follow(self: &Arc<Self>, build: RecordedBuild, live: bool) -> EventStream {
        let records = self.clone();
        Box::pin(async_stream::stream! {
            let mut after: i64 = 0;
            loop {
                let page = match records.events_after(&build.id, after).await {
                    Ok(page) => page,
                    Err(e) => {
                        yield Err(Status::unavailable(format!(
                            "reading build {} from the shared records: {e}", build.id
                        )));
                        return;
                    }
                };
                let full_page = page.len() as i64 == PAGE;
                for (seq, event) in page {
                    after = seq;
                    let done = matches!(
                        event.event,
                        Some(WireEvent::Completed(_) | WireEvent::Failed(_))
                    );
                    yield Ok(event);
                    if done {
                        return;
                    }
                }
                if full_page {
                    continue;
                }
                if !live {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }

    /// Up to [`PAGE`] events of build `id` after number `after`, in order.
    async fn events_after(&self, id: &str, after: i64) -> Result<Vec<(i64, BuildEvent)>, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                "SELECT seq, event FROM build_events WHERE build_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
                &[&id, &after, &PAGE],
            )
            .await
            .map_err(self.db.query_error("reading build events"))?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let seq: i64 = row.get(0);
                let bytes: &[u8] = row.get(1);
                // An event kiln cannot decode was not written by it: skip
                // it rather than end the stream.
                BuildEvent::decode(bytes).ok().map(|e| (seq, e))
            })
            .collect())
    }
}
