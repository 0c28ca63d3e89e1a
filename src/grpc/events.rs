//! `kiln.v1.BuildEvents`: submit a build and follow it live, or watch any
//! build by id; and the domain → wire conversion of build events.
//!
//! A stream ends with the build's final event (`completed` or `failed`),
//! however the build was started (`Submit` or either layout's `DoBuild`),
//! because the executor ends every build's log with one.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::executor::events::{self, BuildLog, Event};
use crate::executor::ClientLimits;
use crate::grpc::build_service::{bypasses_result_cache, grpc_timeout, with_id, BuildService};
use crate::grpc::{answer, request, status};
use crate::proto::kiln_v1::build_event::Event as WireEvent;
use crate::proto::kiln_v1::build_events_server::BuildEvents;
use crate::proto::kiln_v1::{self, BuildEvent, SubmitRequest, WatchRequest};
use crate::records::follow::RecordedBuild;
use crate::records::Records;
use crate::tenant::Identity;

/// A build event as `kiln.v1.BuildEvent`.
pub fn wire(build_id: &str, event: &Event) -> BuildEvent {
    let event = match event {
        Event::Phase(p) => WireEvent::Phase(kiln_v1::Phase {
            name: p.name().to_owned(),
        }),
        Event::Started(s) => WireEvent::Started(kiln_v1::Started {
            vmm: s.vmm.to_owned(),
            accel: s.accel.to_owned(),
            guest_memory_bytes: s.guest_memory_bytes,
            vcpus: s.vcpus,
            warm: s.warm,
        }),
        Event::Log { stream, data } => WireEvent::Log(kiln_v1::LogChunk {
            stream: match stream {
                events::Stream::Stdout => kiln_v1::log_chunk::Stream::Stdout,
                events::Stream::Stderr => kiln_v1::log_chunk::Stream::Stderr,
            } as i32,
            data: data.clone(),
        }),
        Event::CacheHit(hit) => WireEvent::CacheHit(kiln_v1::CacheHit {
            build_id: hit.build_id.clone(),
            built_at_unix: hit.built_at_unix,
        }),
        Event::Output(o) => WireEvent::Output(kiln_v1::Output {
            path: o.path.to_string(),
            entry: Some(o.node.to_snix_entry(b"")),
            needles: o.needles.clone(),
        }),
        Event::Completed(outcome) => WireEvent::Completed(answer::completed(outcome)),
        Event::Failed(e) => WireEvent::Failed(status::failed(e)),
    };
    BuildEvent {
        build_id: build_id.to_owned(),
        event: Some(event),
    }
}

/// A stream of build events, as `Watch`, `Submit` and `Logs` answer.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<BuildEvent, Status>> + Send>>;

/// Streams a build's history, then its live events, until its final event.
/// `guard` lives as long as the stream (a `Submit` cancels its build when
/// the client goes away).
fn follow<G: Send + 'static>(log: Arc<BuildLog>, guard: G) -> EventStream {
    stream_log(log, guard, true)
}

/// A build's history as kept; with `live`, then its live events until its
/// final event.
pub(crate) fn stream_log<G: Send + 'static>(
    log: Arc<BuildLog>,
    guard: G,
    live: bool,
) -> EventStream {
    Box::pin(async_stream::stream! {
        let _guard = guard;
        let (history, rx) = log.subscribe();
        let rx = rx.filter(|_| live);
        let mut done = false;
        for ev in history {
            done = ev.is_final();
            yield Ok(wire(log.id(), &ev));
            if done { break; }
        }
        if let (false, Some(mut rx)) = (done, rx) {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        yield Ok(wire(log.id(), &ev));
                        if ev.is_final() { break; }
                    }
                    Err(RecvError::Lagged(n)) => {
                        yield Ok(BuildEvent {
                            build_id: log.id().to_owned(),
                            event: Some(WireEvent::Phase(kiln_v1::Phase { name: format!("lagged: {n} events skipped") })),
                        });
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        }
    })
}

#[tonic::async_trait]
impl BuildEvents for BuildService {
    type SubmitStream = EventStream;
    type WatchStream = EventStream;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let bypass = bypasses_result_cache(request.metadata());
        let who = Identity::of(request.extensions());
        let submitted = request.into_inner();
        let limits = ClientLimits {
            bypass_result_cache: bypass,
            ..request::client_limits(&submitted, deadline)
        };
        let req = request::from_submit(&submitted);
        let (permit, req) = self.admit_request("Submit", req)?;
        let started = self.executor().start(req, limits, &who);
        // The request's budget is held until the build has ended.
        let task = started.task;
        tokio::spawn(async move {
            let _permit = permit;
            let _ = task.await;
        });
        let id = started.log.id().to_owned();
        let guard = started.cancel.drop_guard();
        with_id(&id, Ok(follow(started.log, guard)))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = Identity::of(request.extensions());
        let id = request.into_inner().build_id;
        // Another tenant's build answers exactly like an unknown id.
        if let Some(log) = self.executor().registry().get_for(&id, &who) {
            return Ok(Response::new(follow(log, ())));
        }
        match recorded(self.executor(), &id, &who).await? {
            Some((records, build)) => Ok(Response::new(records.follow(build, true))),
            None => Err(Status::not_found(format!(
                "build_id: no build {id:?} is known to this server"
            ))),
        }
    }
}

/// The shared record of a build this host does not have, when the server
/// shares records with other hosts (`--database`) and `who` may see it.
pub(crate) async fn recorded(
    executor: &crate::executor::Executor,
    id: &str,
    who: &Identity,
) -> Result<Option<(Arc<Records>, RecordedBuild)>, Status> {
    let Some(records) = executor.records() else {
        return Ok(None);
    };
    match records.find(id, who).await {
        Ok(found) => Ok(found.map(|b| (records.clone(), b))),
        Err(e) => Err(Status::unavailable(format!(
            "build_id {id:?}: looking it up in the shared build records: {e}"
        ))),
    }
}
