//! The `DoBuild` faces of the executor, `tvix.build.v1` and `snix.build.v1`,
//! and what every build call shares (the request budget, the build-id
//! header, the client's deadline). `kiln.v1.BuildEvents` is in
//! [`crate::grpc::events`].
//!
//! Every call runs its build as a separate task (see [`Executor::start`]);
//! the call holds a guard that cancels the build when the client goes away,
//! so the VM and virtiofsd are killed at once and the build directory is
//! removed.
//!
//! A build holds one copy of its request: the wire message is dropped once
//! validated (a `tvix.build.v1` request keeps its encoded echo for the
//! answer). Each held request takes its [`BuildRequest::heap_size`] of the
//! server's [`RequestBudget`] until its build ends.

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::executor::admission::{RequestBudget, RequestPermit};
use crate::executor::error::{BuildError, InvalidRequest};
use crate::executor::request::BuildRequest;
use crate::executor::result_cache;
use crate::executor::run::{BuildOutcome, ClientLimits, Executor};
use crate::grpc::{answer, request, status};
use crate::proto::{snix_build, tvix_build};
use crate::tenant::Identity;

/// Response metadata key carrying the build id (for `Watch`).
pub const BUILD_ID_HEADER: &str = "x-kiln-build-id";

/// Serves `tvix.build.v1`, `snix.build.v1` and `kiln.v1.BuildEvents`.
#[derive(Clone)]
pub struct BuildService {
    executor: Arc<Executor>,
    budget: Arc<RequestBudget>,
}

impl BuildService {
    /// Wraps an executor, with its configured request memory budget.
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

    pub(crate) fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// A validated request with its place in the budget, or the status that
    /// refuses it; every refusal leaves one log line with its reason.
    pub(crate) fn admit_request(
        &self,
        face: &'static str,
        validated: Result<BuildRequest, InvalidRequest>,
    ) -> Result<(RequestPermit, BuildRequest), Status> {
        let refused = |e: BuildError| {
            tracing::info!(face, kind = e.kind(), reason = %e.report(), "request rejected");
            status::status(&e)
        };
        let req = validated.map_err(|e| refused(e.into()))?;
        let permit = self.budget.reserve(req.heap_size()).map_err(refused)?;
        Ok((permit, req))
    }

    /// Runs a request to its end, cancelling it if this future is dropped
    /// (the client went away). The request's budget is given back once the
    /// build has ended.
    async fn run(
        &self,
        face: &'static str,
        validated: Result<BuildRequest, InvalidRequest>,
        limits: ClientLimits,
        who: Identity,
    ) -> (Option<String>, Result<Arc<BuildOutcome>, Status>) {
        let (_permit, req) = match self.admit_request(face, validated) {
            Ok(admitted) => admitted,
            Err(status) => return (None, Err(status)),
        };
        let started = self.executor.start(req, limits, &who);
        let _cancel_on_drop = started.cancel.drop_guard();
        let result = match started.task.await {
            Ok(r) => r.map_err(|e| status::status(&e)),
            Err(e) => Err(Status::internal(format!("the build task failed: {e}"))),
        };
        (Some(started.log.id().to_owned()), result)
    }
}

/// What a plain `DoBuild` client can ask for in its headers: a deadline
/// (`grpc-timeout`) and a bypass of the result cache
/// (`x-kiln-result-cache: bypass`).
pub fn header_limits(metadata: &MetadataMap) -> ClientLimits {
    ClientLimits {
        bypass_result_cache: bypasses_result_cache(metadata),
        ..ClientLimits::deadline(grpc_timeout(metadata))
    }
}

/// Whether the request asks to build even when the result cache would
/// answer.
pub fn bypasses_result_cache(metadata: &MetadataMap) -> bool {
    metadata
        .get(result_cache::BYPASS_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(result_cache::BYPASS))
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

/// The answer, with the build id in its metadata (success or failure).
pub(crate) fn with_id<T>(id: &str, result: Result<T, Status>) -> Result<Response<T>, Status> {
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

/// A `DoBuild` answer: with the build id when a build was started, and
/// `x-kiln-result-cache: hit` when the result cache answered it.
fn respond<T>(
    id: Option<String>,
    hit: bool,
    result: Result<T, Status>,
) -> Result<Response<T>, Status> {
    let mut answer = match id {
        Some(id) => with_id(&id, result),
        None => result.map(Response::new),
    };
    if let (true, Ok(response)) = (hit, &mut answer) {
        response.metadata_mut().insert(
            result_cache::BYPASS_HEADER,
            MetadataValue::from_static(result_cache::HIT),
        );
    }
    answer
}

/// Whether a build's result came from the result cache.
fn cache_hit(result: &Result<Arc<BuildOutcome>, Status>) -> bool {
    result.as_ref().is_ok_and(|o| o.cache_hit.is_some())
}

#[tonic::async_trait]
impl tvix_build::build_service_server::BuildService for BuildService {
    async fn do_build(
        &self,
        request: Request<tvix_build::BuildRequest>,
    ) -> Result<Response<tvix_build::Build>, Status> {
        let limits = header_limits(request.metadata());
        let who = Identity::of(request.extensions());
        let validated = request::from_tvix(&request.into_inner());
        let (id, result) = self.run("tvix DoBuild", validated, limits, who).await;
        let hit = cache_hit(&result);
        respond(id, hit, result.and_then(|o| answer::tvix(&o)))
    }
}

#[tonic::async_trait]
impl snix_build::build_service_server::BuildService for BuildService {
    async fn do_build(
        &self,
        request: Request<snix_build::BuildRequest>,
    ) -> Result<Response<snix_build::BuildResponse>, Status> {
        let limits = header_limits(request.metadata());
        let who = Identity::of(request.extensions());
        let validated = request::from_snix(&request.into_inner());
        let (id, result) = self.run("snix DoBuild", validated, limits, who).await;
        let hit = cache_hit(&result);
        respond(id, hit, result.map(|o| answer::snix(&o)))
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
