//! Any [`PathInfoService`] as `snix.store.v1.PathInfoService`.
//!
//! `Get` answers NOT_FOUND for an unknown path and INVALID_ARGUMENT for a
//! digest that is not 20 bytes; `Put` validates the message (each problem
//! named, INVALID_ARGUMENT) and refuses a tree whose root is not in the
//! castore (FAILED_PRECONDITION naming it); `CalculateNAR` streams the NAR
//! out of the castore into the hasher. Each call sees the caller's view of
//! the castore ([`Scoping`]): a path whose tree the caller cannot see is
//! not found, not listed, and cannot be put.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::{PathInfo, PathInfoError, PathInfoService};
use crate::castore::scoped::Scoping;
use crate::castore::wire::WireNode;
use crate::castore::{Node, Store};
use crate::nix::nar::nar_hash;
use crate::proto::snix_store;
use crate::proto::snix_store::path_info_service_server::PathInfoServiceServer;
use crate::tenant::Identity;

/// The service over `service`, checking trees against each caller's view
/// of `castore`.
pub fn path_info_server(
    service: Arc<dyn PathInfoService>,
    castore: Store,
    scoping: Scoping,
) -> PathInfoServiceServer<PathInfoServiceWrapper> {
    PathInfoServiceServer::new(PathInfoServiceWrapper {
        service,
        castore,
        scoping,
    })
    .max_decoding_message_size(crate::castore::grpc_server::MAX_MESSAGE_SIZE)
    .max_encoding_message_size(crate::castore::grpc_server::MAX_MESSAGE_SIZE)
}

/// A failed path-info store as a status: UNAVAILABLE when the store could
/// not be reached, INTERNAL when the shared database refused a statement.
fn store_status(e: &PathInfoError) -> Status {
    match e {
        PathInfoError::Postgres(db) if !db.is_unavailable() => {
            let chain = crate::nix::daemon::error_chain(e);
            tracing::warn!(error = %chain, "path-info store");
            Status::internal(chain)
        }
        _ => internal(e),
    }
}

/// The handlers.
pub struct PathInfoServiceWrapper {
    service: Arc<dyn PathInfoService>,
    castore: Store,
    scoping: Scoping,
}

fn internal(e: &dyn std::error::Error) -> Status {
    tracing::warn!(error = %crate::nix::daemon::error_chain(e), "path-info store");
    Status::unavailable(crate::nix::daemon::error_chain(e))
}

impl PathInfoServiceWrapper {
    /// The castore as the caller of `request` sees it.
    fn castore_for<T>(&self, request: &Request<T>) -> Store {
        self.scoping
            .store_for(&self.castore, &Identity::of(request.extensions()))
    }
}

/// Whether `node`'s tree is in `castore` (a symlink has no tree).
async fn root_present(castore: &Store, node: &Node) -> Result<bool, Status> {
    match node {
        Node::Directory { digest, .. } => castore
            .directories
            .get(digest)
            .await
            .map(|d| d.is_some())
            .map_err(|e| internal(&e)),
        Node::File { digest, .. } => castore.blobs.has(digest).await.map_err(|e| internal(&e)),
        Node::Symlink { .. } => Ok(true),
    }
}

#[tonic::async_trait]
impl snix_store::path_info_service_server::PathInfoService for PathInfoServiceWrapper {
    type ListStream = BoxStream<'static, Result<snix_store::PathInfo, Status>>;

    async fn get(
        &self,
        request: Request<snix_store::GetPathInfoRequest>,
    ) -> Result<Response<snix_store::PathInfo>, Status> {
        let castore = self.castore_for(&request);
        let Some(snix_store::get_path_info_request::ByWhat::ByOutputHash(digest)) =
            request.into_inner().by_what
        else {
            return Err(Status::invalid_argument("by_output_hash is missing"));
        };
        let digest: [u8; 20] = digest.as_ref().try_into().map_err(|_| {
            Status::invalid_argument(format!("by_output_hash is {} bytes, want 20", digest.len()))
        })?;
        match self
            .service
            .get(&digest)
            .await
            .map_err(|e| store_status(&e))?
        {
            // A path whose tree the caller cannot see is not there for it.
            Some(info) if root_present(&castore, &info.node).await? => {
                Ok(Response::new(info.to_wire()))
            }
            _ => Err(Status::not_found(format!(
                "no path info for {}",
                crate::nix::nixbase32::encode(&digest)
            ))),
        }
    }

    async fn put(
        &self,
        request: Request<snix_store::PathInfo>,
    ) -> Result<Response<snix_store::PathInfo>, Status> {
        let castore = self.castore_for(&request);
        let info = PathInfo::try_from_wire(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !root_present(&castore, &info.node).await? {
            return Err(Status::failed_precondition(format!(
                "the tree of {} ({:?}) is not in the castore",
                info.store_path, info.node
            )));
        }
        let stored = self.service.put(info).await.map_err(|e| store_status(&e))?;
        Ok(Response::new(stored.to_wire()))
    }

    async fn calculate_nar(
        &self,
        request: Request<crate::proto::snix_castore::Entry>,
    ) -> Result<Response<snix_store::CalculateNarResponse>, Status> {
        let castore = self.castore_for(&request);
        let (_, node) = request
            .into_inner()
            .try_into_named()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !root_present(&castore, &node).await? {
            return Err(Status::not_found("the tree is not in the castore"));
        }
        let hash = nar_hash(&castore, &node)
            .await
            .map_err(|e| Status::failed_precondition(crate::nix::daemon::error_chain(&e)))?;
        Ok(Response::new(snix_store::CalculateNarResponse {
            nar_size: hash.size,
            nar_sha256: bytes::Bytes::copy_from_slice(hash.hash.digest()),
        }))
    }

    async fn list(
        &self,
        request: Request<snix_store::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let castore = self.castore_for(&request);
        let stream = self.service.list().filter_map(move |item| {
            let castore = castore.clone();
            async move {
                match item {
                    Ok(info) => match root_present(&castore, &info.node).await {
                        Ok(true) => Some(Ok(info.to_wire())),
                        Ok(false) => None,
                        Err(status) => Some(Err(status)),
                    },
                    Err(e) => Some(Err(store_status(&e))),
                }
            }
        });
        Ok(Response::new(stream.boxed()))
    }
}
