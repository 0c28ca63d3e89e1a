//! `kiln.v1.Admin`: the builds that have not ended, cancelling one, a
//! build's log. A caller sees and stops only its own tenant's builds
//! (another tenant's build id is NOT_FOUND, exactly like an unknown one);
//! an operator credential, or any caller of a server without
//! authentication, sees every build.

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
use crate::tenant::Identity;

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
        tenant: build.tenant.to_string(),
        phase: build.phase.map_or("checking", |p| p.name()).to_owned(),
        age_secs: build.age.as_secs(),
        submitted_unix_secs: build
            .submitted
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        guest_memory_bytes: vm.map_or(0, |vm| vm.guest_memory_bytes),
        vcpus: vm.map_or(0, |vm| vm.vcpus),
        warm: vm.is_some_and(|vm| vm.warm),
        host: String::new(),
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
        request: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        let who = Identity::of(request.extensions());
        let records = self.executor.records();
        let here = records.map_or("", |r| r.host_id());
        let mut builds: Vec<_> = self
            .executor
            .running()
            .iter()
            .filter(|build| who.may_see(&build.tenant))
            .map(|build| kiln_v1::BuildSummary {
                host: here.to_owned(),
                ..wire_summary(build)
            })
            .collect();
        // With shared records, the other hosts' running builds too.
        if let Some(records) = records {
            let elsewhere = records.running(&who).await.map_err(|e| {
                Status::unavailable(format!("listing the shared build records: {e}"))
            })?;
            let known: std::collections::HashSet<String> =
                builds.iter().map(|b| b.build_id.clone()).collect();
            builds.extend(
                elsewhere
                    .into_iter()
                    .filter(|b| b.host_id != here && !known.contains(&b.id))
                    .map(|b| kiln_v1::BuildSummary {
                        build_id: b.id,
                        tenant: b.tenant,
                        phase: if b.phase.is_empty() {
                            "checking".to_owned()
                        } else {
                            b.phase
                        },
                        age_secs: b.age_secs,
                        submitted_unix_secs: b.submitted_unix_secs,
                        host: b.host_id,
                        ..Default::default()
                    }),
            );
        }
        Ok(Response::new(ListBuildsResponse { builds }))
    }

    async fn cancel_build(
        &self,
        request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        let who = Identity::of(request.extensions());
        let id = request.into_inner().build_id;
        if !self.executor.stop_build(&id, &who, StopReason::Operator) {
            // Running on another host sharing the records: it stops the
            // build at its next heartbeat.
            let elsewhere = match self.executor.records() {
                Some(records) => records.request_cancel(&id, &who).await.map_err(|e| {
                    Status::unavailable(format!("build_id {id:?}: the shared build records: {e}"))
                })?,
                None => false,
            };
            if !elsewhere {
                return Err(Status::not_found(format!(
                    "build_id: no build {id:?} is running on this server"
                )));
            }
        }
        tracing::info!(build = %id, by = %who.tenant, "build cancelled through kiln.v1.Admin");
        Ok(Response::new(CancelBuildResponse {}))
    }

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let who = Identity::of(request.extensions());
        let LogsRequest { build_id, follow } = request.into_inner();
        if let Some(log) = self.executor.registry().get_for(&build_id, &who) {
            return Ok(Response::new(stream_log(log, (), follow)));
        }
        match crate::grpc::events::recorded(&self.executor, &build_id, &who).await? {
            Some((records, build)) => Ok(Response::new(records.follow(build, follow))),
            None => Err(unknown(&build_id)),
        }
    }
}
