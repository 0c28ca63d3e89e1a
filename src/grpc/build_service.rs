//! The gRPC faces of the executor: `tvix.build.v1` and `snix.build.v1`
//! `DoBuild`, and kiln's `kiln.v1.BuildEvents` (submit and follow live, or
//! watch a build by id).
//!
//! Every call runs its build as a separate task (see [`Executor::start`]);
//! the call holds a guard that cancels the build when the client goes away,
//! so the VM and virtiofsd are killed at once and the build directory is
//! removed.
//!
//! A build holds one copy of its request: the wire message is dropped once
//! validated, and the `tvix.build.v1` answer's echo of the request is kept as
//! its encoded bytes until the build ends. Each held request takes its
//! [`BuildRequest::heap_size`] of the server's [`RequestBudget`] until then.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::executor::admission::{RequestBudget, RequestPermit};
use crate::executor::error::BuildError;
use crate::executor::events::BuildLog;
use crate::executor::executor::{BuildOutcome, Executor};
use crate::executor::request::BuildRequest;
use crate::proto::kiln_v1::build_event::Event;
use crate::proto::kiln_v1::build_events_server::BuildEvents;
use crate::proto::kiln_v1::{self, submit_request, BuildEvent, SubmitRequest, WatchRequest};
use crate::proto::{snix_build, tvix_build};

/// Response metadata key carrying the build id (for `Watch`).
pub const BUILD_ID_HEADER: &str = "x-kiln-build-id";

/// Serves `tvix.build.v1`, `snix.build.v1` and `kiln.v1.BuildEvents`.
#[derive(Clone)]
pub struct BuildService {
    executor: Arc<Executor>,
    budget: Arc<RequestBudget>,
}

impl BuildService {
    /// Wraps an executor, with the default request memory budget
    /// ([`crate::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES`]).
    pub fn new(executor: Arc<Executor>) -> Self {
        let budget = RequestBudget::new(executor.request_budget_bytes());
        Self::with_request_budget(executor, budget)
    }

    /// Wraps an executor; the requests it holds share `budget`.
    pub fn with_request_budget(executor: Arc<Executor>, budget: RequestBudget) -> Self {
        Self {
            executor,
            budget: Arc::new(budget),
        }
    }

    /// Reserves a validated request's size (plus `extra` bytes held beside
    /// it) in the budget, or answers RESOURCE_EXHAUSTED.
    fn reserve(&self, req: &BuildRequest, extra: usize) -> Result<RequestPermit, Status> {
        self.budget
            .reserve(req.heap_size() + extra)
            .map_err(|e| e.to_status())
    }

    /// Runs a validated request to its end, cancelling it if this future is
    /// dropped (the client went away). The request's budget is given back
    /// once the build has ended.
    async fn run(
        &self,
        req: BuildRequest,
        deadline: Option<Duration>,
        _permit: RequestPermit,
    ) -> (Arc<BuildLog>, Result<BuildOutcome, BuildError>) {
        let (log, cancel, handle) = self.executor.start(req, deadline);
        let _cancel_on_drop = cancel.drop_guard();
        let result = match handle.await {
            Ok(r) => r,
            Err(e) => Err(BuildError::Infrastructure {
                step: "build task",
                message: e.to_string(),
            }),
        };
        (log, result)
    }
}

/// Ends a `DoBuild`'s event log the way `Submit`'s ends, so a `Watch` on
/// its `x-kiln-build-id` finishes too: `Completed` with the answer, or
/// `Failed` when the answer could not be made (the executor has already
/// emitted `Failed` for a failed build).
fn answer<T: Clone>(
    log: &BuildLog,
    result: Result<BuildOutcome, BuildError>,
    respond: impl FnOnce(&BuildOutcome) -> Result<T, BuildError>,
    event: impl FnOnce(T, &BuildOutcome) -> Event,
) -> Result<T, Status> {
    let outcome = result.map_err(|e| e.to_status())?;
    match respond(&outcome) {
        Ok(answer) => {
            log.emit(event(answer.clone(), &outcome));
            Ok(answer)
        }
        Err(e) => {
            log.emit(Event::Failed(e.to_failed()));
            Err(e.to_status())
        }
    }
}

/// The client's deadline from the `grpc-timeout` header, if any.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn with_id<T>(id: &str, result: Result<T, Status>) -> Result<Response<T>, Status> {
    let value = MetadataValue::try_from(id).ok();
    match result {
        Ok(body) => {
            let mut resp = Response::new(body);
            if let Some(v) = value {
                resp.metadata_mut().insert(BUILD_ID_HEADER, v);
            }
            Ok(resp)
        }
        Err(mut status) => {
            if let Some(v) = value {
                status.metadata_mut().insert(BUILD_ID_HEADER, v);
            }
            Err(status)
        }
    }
}

/// The `tvix.build.v1` request as the client sent it, kept encoded while its
/// build runs: a byte string the size of the message, where the decoded
/// message would also keep the whole receive buffer alive beneath its
/// fields.
struct TvixEcho(Bytes);

impl TvixEcho {
    fn keep(wire: &tvix_build::BuildRequest) -> Self {
        Self(wire.encode_to_vec().into())
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The request again; it was encoded by this process, so decoding it
    /// fails only on a bug.
    fn request(&self) -> Result<tvix_build::BuildRequest, BuildError> {
        tvix_build::BuildRequest::decode(self.0.clone()).map_err(|e| BuildError::Infrastructure {
            step: "echo the request",
            message: e.to_string(),
        })
    }

    fn response(&self, outcome: &BuildOutcome) -> Result<tvix_build::Build, BuildError> {
        Ok(tvix_response(self.request()?, outcome))
    }
}

/// Validates a `tvix.build.v1` request, keeping only its encoded echo.
fn from_tvix(wire: tvix_build::BuildRequest) -> Result<(BuildRequest, TvixEcho), Status> {
    let req =
        crate::grpc::request::from_tvix(&wire).map_err(|e| BuildError::from(e).to_status())?;
    Ok((req, TvixEcho::keep(&wire)))
}

/// Validates a `snix.build.v1` request; the wire message is dropped here.
fn from_snix(wire: snix_build::BuildRequest) -> Result<BuildRequest, Status> {
    crate::grpc::request::from_snix(&wire).map_err(|e| BuildError::from(e).to_status())
}

/// The `tvix.build.v1` answer: the request echoed, outputs named by
/// basename and sorted by name.
pub fn tvix_response(wire: tvix_build::BuildRequest, outcome: &BuildOutcome) -> tvix_build::Build {
    let mut outputs: Vec<_> = outcome
        .outputs
        .iter()
        .map(|(path, node, _)| {
            let name = path.as_str().rsplit('/').next().unwrap_or(path.as_str());
            node.to_tvix_node(name.as_bytes())
        })
        .collect();
    outputs.sort_by(|a, b| tvix_node_name(a).cmp(tvix_node_name(b)));
    tvix_build::Build {
        build_request: Some(wire),
        outputs,
    }
}

fn tvix_node_name(n: &crate::proto::tvix_castore::Node) -> &[u8] {
    use crate::proto::tvix_castore::node::Node as N;
    match &n.node {
        Some(N::Directory(d)) => &d.name,
        Some(N::File(f)) => &f.name,
        Some(N::Symlink(s)) => &s.name,
        None => &[],
    }
}

/// The `snix.build.v1` answer: anonymous outputs in request order, with
/// their needles.
pub fn snix_response(outcome: &BuildOutcome) -> snix_build::BuildResponse {
    snix_build::BuildResponse {
        outputs: outcome
            .outputs
            .iter()
            .map(|(_, node, needles)| snix_build::build_response::Output {
                output: Some(node.to_snix_entry(b"")),
                needles: needles.clone(),
            })
            .collect(),
    }
}

fn completed(
    tvix: Option<tvix_build::Build>,
    snix: Option<snix_build::BuildResponse>,
    outcome: &BuildOutcome,
) -> Event {
    Event::Completed(kiln_v1::Completed {
        tvix,
        snix,
        duration_ms: outcome.report.boot_ms + outcome.report.setup_ms + outcome.report.build_ms,
    })
}

#[tonic::async_trait]
impl tvix_build::build_service_server::BuildService for BuildService {
    async fn do_build(
        &self,
        request: Request<tvix_build::BuildRequest>,
    ) -> Result<Response<tvix_build::Build>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let (req, echo) = from_tvix(request.into_inner())?;
        let permit = self.reserve(&req, echo.len())?;
        let (log, result) = self.run(req, deadline, permit).await;
        let answer = answer(
            &log,
            result,
            |o| echo.response(o),
            |tvix, o| completed(Some(tvix), None, o),
        );
        with_id(log.id(), answer)
    }
}

#[tonic::async_trait]
impl snix_build::build_service_server::BuildService for BuildService {
    async fn do_build(
        &self,
        request: Request<snix_build::BuildRequest>,
    ) -> Result<Response<snix_build::BuildResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let req = from_snix(request.into_inner())?;
        let permit = self.reserve(&req, 0)?;
        let (log, result) = self.run(req, deadline, permit).await;
        let answer = answer(
            &log,
            result,
            |o| Ok(snix_response(o)),
            |snix, o| completed(None, Some(snix), o),
        );
        with_id(log.id(), answer)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<BuildEvent, Status>> + Send>>;

/// Streams a build's history, then its live events, until it ends.
fn follow(log: Arc<BuildLog>, guard: Option<tokio_util::sync::DropGuard>) -> EventStream {
    Box::pin(async_stream::stream! {
        let _guard = guard;
        let (history, rx) = log.subscribe();
        let mut done = false;
        for ev in history {
            done = matches!(ev.event, Some(Event::Completed(_)) | Some(Event::Failed(_)));
            yield Ok(ev);
            if done { break; }
        }
        if let (false, Some(mut rx)) = (done, rx) {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let end = matches!(ev.event, Some(Event::Completed(_)) | Some(Event::Failed(_)));
                        yield Ok(ev);
                        if end { break; }
                    }
                    Err(RecvError::Lagged(n)) => {
                        yield Ok(BuildEvent {
                            build_id: log.id().to_owned(),
                            event: Some(Event::Phase(kiln_v1::Phase { name: format!("lagged: {n} events skipped") })),
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
        let (req, echo) = match request.into_inner().request {
            Some(submit_request::Request::Tvix(w)) => {
                let (req, echo) = from_tvix(w)?;
                (req, Some(echo))
            }
            Some(submit_request::Request::Snix(w)) => (from_snix(w)?, None),
            None => {
                return Err(Status::invalid_argument(
                    "request: neither a tvix nor a snix build request",
                ))
            }
        };
        let permit = self.reserve(&req, echo.as_ref().map_or(0, TvixEcho::len))?;
        let (log, cancel, handle) = self.executor.start(req, deadline);
        let task_log = log.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Ok(outcome)) = handle.await {
                let ev = match echo.map(|e| e.response(&outcome)) {
                    Some(Ok(tvix)) => completed(Some(tvix), None, &outcome),
                    Some(Err(e)) => Event::Failed(e.to_failed()),
                    None => completed(None, Some(snix_response(&outcome)), &outcome),
                };
                task_log.emit(ev);
            }
        });
        let id = log.id().to_owned();
        with_id(&id, Ok(follow(log, Some(cancel.drop_guard()))))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().build_id;
        let log = self.executor.registry().get(&id).ok_or_else(|| {
            Status::not_found(format!("build_id: no build {id:?} is known to this server"))
        })?;
        Ok(Response::new(follow(log, None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", MetadataValue::from_static("1500m"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(1500)));
        m.insert("grpc-timeout", MetadataValue::from_static("2S"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", MetadataValue::from_static("x"));
        assert_eq!(grpc_timeout(&m), None);
    }
}
