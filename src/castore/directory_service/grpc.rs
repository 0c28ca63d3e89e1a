//! A directory store reached over gRPC (`tvix.castore.v1.DirectoryService`).
//!
//! Everything received is validated, and a recursive get only accepts the
//! root asked for and directories referenced by ones already received.

use std::collections::HashSet;

use crate::client::KilnChannel;
use futures::stream::BoxStream;
use tonic::Code;

use super::{DirectoryError, DirectoryService};
use crate::castore::digest::B3Digest;
use crate::castore::directory::Directory;
use crate::castore::grpc_server::MAX_MESSAGE_SIZE;
use crate::proto::tvix_castore;
use crate::proto::tvix_castore::directory_service_client::DirectoryServiceClient;
use crate::proto::tvix_castore::get_directory_request::ByWhat;
use crate::proto::tvix_castore::GetDirectoryRequest;

/// Directories kept by a remote castore.
#[derive(Debug, Clone)]
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<KilnChannel>,
}

impl GrpcDirectoryService {
    /// Uses an established channel.
    pub fn new(channel: impl Into<KilnChannel>) -> Self {
        GrpcDirectoryService {
            client: DirectoryServiceClient::new(channel.into())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }
}

fn request(digest: &B3Digest, recursive: bool) -> GetDirectoryRequest {
    GetDirectoryRequest {
        by_what: Some(ByWhat::Digest(digest.to_bytes())),
        recursive,
    }
}

#[async_trait::async_trait]
impl DirectoryService for GrpcDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let mut stream = match self.client.clone().get(request(digest, false)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(DirectoryError::RemoteGet(Box::new(status))),
        };
        let wire = match stream.message().await {
            Ok(Some(wire)) => wire,
            Ok(None) => return Ok(None),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(DirectoryError::RemoteGet(Box::new(status))),
        };
        let directory = Directory::try_from(wire).map_err(DirectoryError::RemoteInvalid)?;
        let got = directory.digest();
        if got != *digest {
            return Err(DirectoryError::RemoteUnexpected(got));
        }
        Ok(Some(directory))
    }

    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>> {
        let mut client = self.client.clone();
        let root = *root;
        Box::pin(async_stream::try_stream! {
            let mut stream = client.get(request(&root, true)).await.map_err(|status| {
                if status.code() == Code::NotFound {
                    DirectoryError::NotFound(root)
                } else {
                    DirectoryError::RemoteGet(Box::new(status))
                }
            })?.into_inner();
            // Accept the root and what received directories refer to, each
            // once; anything referred to but never sent means the tree is
            // incomplete.
            let mut referenced = HashSet::from([root]);
            let mut received = HashSet::new();
            while let Some(wire) = stream.message().await.map_err(|status| DirectoryError::RemoteGet(Box::new(status)))? {
                let directory = Directory::try_from(wire).map_err(DirectoryError::RemoteInvalid)?;
                let digest = directory.digest();
                if !referenced.contains(&digest) {
                    Err(DirectoryError::RemoteUnexpected(digest))?;
                }
                if !received.insert(digest) {
                    continue;
                }
                referenced.extend(directory.child_directories());
                yield directory;
            }
            if let Some(missing) = referenced.difference(&received).next() {
                Err(DirectoryError::NotFound(*missing))?;
            }
        })
    }

    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        let last = directories
            .last()
            .ok_or(DirectoryError::EmptyBatch)?
            .digest();
        let wire: Vec<tvix_castore::Directory> = directories.iter().map(Into::into).collect();
        let answer = self
            .client
            .clone()
            .put(futures::stream::iter(wire))
            .await
            .map_err(|status| DirectoryError::RemotePut(Box::new(status)))?
            .into_inner();
        let root =
            B3Digest::try_from(&answer.root_digest).map_err(DirectoryError::RemoteInvalid)?;
        if root != last {
            return Err(DirectoryError::RemoteUnexpected(root));
        }
        Ok(root)
    }
}
