//! `kiln.v1.Admin`: what an operator sees and stops — the builds that have
//! not ended, cancelling one, any build's log. Who may call it is the auth
//! layer's to decide (`crate::auth`: an operator credential when callers
//! authenticate); nothing here checks it again.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::executor::events::{BuildSummary, StopReason};
use crate::executor::run::Executor;
use crate::grpc::events::{stream_log, EventStream};
use crate::proto::kiln_v1::admin_server::Admin;
use crate::proto::kiln_v1::{
    self, CancelBuildRequest, CancelBuildResponse, ListBuildsRequest, ListBuildsResponse,
    LogsRequest,
};

/// The tenant every build belongs to until tenants are configured.
pub const DEFAULT_TENANT: &str = "default";

/// Serves `kiln.v1.Admin` over an executor.
#[derive(Clone)]
pub struct AdminService {
    executor: Arc<Executor>,
}

impl AdminService {
    /// The operator face of `executor`.
    pub fn new(executor: Arc<Executor>) -> Self {
        Self { executor }
    }
}

/// One running build as `kiln.v1.BuildSummary`.
fn wire_summary(build: &BuildSummary) -> kiln_v1::BuildSummary {
    let vm = build.vm.as_ref();
    kiln_v1::BuildSummary {
        build_id: build.id.clone(),
        tenant: DEFAULT_TENANT.to_owned(),
        phase: build.phase.map_or("checking", |p| p.name()).to_owned(),
        age_secs: build.age.as_secs(),
        submitted_unix_secs: build
            .submitted
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        guest_memory_bytes: vm.map_or(0, |vm| vm.guest_memory_bytes),
        vcpus: vm.map_or(0, |vm| vm.vcpus),
        warm: vm.is_some_and(|vm| vm.warm),
    }
}

fn unknown(id: &str) -> Status {
    Status::not_found(format!("build_id: no build {id:?} is known to this server"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    type LogsStream = EventStream;

    async fn list_builds(
        &self,
        _request: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        let builds = self.executor.running().iter().map(wire_summary).collect();
        Ok(Response::new(ListBuildsResponse { builds }))
    }

    async fn cancel_build(
        &self,
        request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        let id = request.into_inner().build_id;
        if !self.executor.stop_build(&id, StopReason::Operator) {
            return Err(Status::not_found(format!(
                "build_id: no build {id:?} is running on this server"
            )));
        }
        tracing::info!(build = %id, "build cancelled by an operator");
        Ok(Response::new(CancelBuildResponse {}))
    }

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let LogsRequest { build_id, follow } = request.into_inner();
        let log = self
            .executor
            .registry()
            .get(&build_id)
            .ok_or_else(|| unknown(&build_id))?;
        Ok(Response::new(stream_log(log, (), follow)))
    }
}
