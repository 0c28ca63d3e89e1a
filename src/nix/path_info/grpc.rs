//! A path-info store reached over gRPC (`snix.store.v1.PathInfoService`),
//! e.g. the kiln server behind `kiln nix-daemon --stdio`. Everything
//! received is validated.

use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::Code;

use super::{invalid, PathInfo, PathInfoError, PathInfoService};
use crate::castore::grpc_server::MAX_MESSAGE_SIZE;
use crate::client::KilnChannel;
use crate::proto::snix_store;
use crate::proto::snix_store::path_info_service_client::PathInfoServiceClient;

/// Path infos kept by a remote store.
#[derive(Debug, Clone)]
pub struct GrpcPathInfoService {
    client: PathInfoServiceClient<KilnChannel>,
}

impl GrpcPathInfoService {
    /// Uses an established channel.
    pub fn new(channel: impl Into<KilnChannel>) -> Self {
        GrpcPathInfoService {
            client: PathInfoServiceClient::new(channel.into())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }
}

#[async_trait::async_trait]
impl PathInfoService for GrpcPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>, PathInfoError> {
        let request = snix_store::GetPathInfoRequest {
            by_what: Some(snix_store::get_path_info_request::ByWhat::ByOutputHash(
                bytes::Bytes::copy_from_slice(digest),
            )),
        };
        let wire = match self.client.clone().get(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(PathInfoError::Remote(Box::new(status))),
        };
        let info = PathInfo::try_from_wire(wire)?;
        if info.store_path.hash() != digest {
            return Err(invalid("node.name", "the remote answered for another path"));
        }
        Ok(Some(info))
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo, PathInfoError> {
        let wire = self
            .client
            .clone()
            .put(info.to_wire())
            .await
            .map_err(|status| PathInfoError::Remote(Box::new(status)))?
            .into_inner();
        PathInfo::try_from_wire(wire)
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let mut client = self.client.clone();
        let stream = async_stream::try_stream! {
            let mut stream = client
                .list(snix_store::ListPathInfoRequest {})
                .await
                .map_err(|status| PathInfoError::Remote(Box::new(status)))?
                .into_inner();
            while let Some(wire) = stream
                .message()
                .await
                .map_err(|status| PathInfoError::Remote(Box::new(status)))?
            {
                yield PathInfo::try_from_wire(wire)?;
            }
        };
        stream.boxed()
    }
}
