//! A blob store reached over gRPC (`tvix.castore.v1.BlobService`), e.g.
//! another kiln host sharing its store.
//!
//! Bytes read from the remote are verified against the digest asked for;
//! bytes put are hashed locally and compared with the digest answered.

use crate::client::KilnChannel;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;
use tonic::Code;

use super::{BlobError, BlobReader, BlobService, StoredBlob, VerifyingReader, CHUNK_SIZE};
use crate::castore::digest::B3Digest;
use crate::castore::grpc_server::MAX_MESSAGE_SIZE;
use crate::proto::tvix_castore::blob_service_client::BlobServiceClient;
use crate::proto::tvix_castore::{BlobChunk, ReadBlobRequest, StatBlobRequest};

/// Blobs kept by a remote castore.
#[derive(Debug, Clone)]
pub struct GrpcBlobService {
    client: BlobServiceClient<KilnChannel>,
}

impl GrpcBlobService {
    /// Uses an established channel.
    pub fn new(channel: impl Into<KilnChannel>) -> Self {
        GrpcBlobService {
            client: BlobServiceClient::new(channel.into())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }
}

#[async_trait::async_trait]
impl BlobService for GrpcBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        let request = StatBlobRequest {
            digest: digest.to_bytes(),
            ..Default::default()
        };
        match self.client.clone().stat(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(BlobError::RemoteStat(Box::new(status))),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError> {
        let request = ReadBlobRequest {
            digest: digest.to_bytes(),
        };
        let stream = match self.client.clone().read(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(BlobError::RemoteRead(Box::new(status))),
        };
        let bytes = stream.map(|chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|status| std::io::Error::other(BlobError::RemoteRead(Box::new(status))))
        });
        let reader = VerifyingReader::new(StreamReader::new(bytes), *digest);
        Ok(Some(BlobReader {
            reader: Box::pin(reader),
            size: None,
        }))
    }

    async fn put(
        &self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<StoredBlob, BlobError> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<BlobChunk>(4);
        let mut client = self.client.clone();
        let call = client.put(ReceiverStream::new(receiver));
        let pump = async move {
            let mut hasher = blake3::Hasher::new();
            loop {
                let mut buf = vec![0u8; CHUNK_SIZE];
                let n = reader.read(&mut buf).await.map_err(BlobError::ReadSource)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                hasher.update(&buf);
                let chunk = BlobChunk { data: buf.into() };
                if sender.send(chunk).await.is_err() {
                    // The call ended early; its status says why.
                    break;
                }
            }
            Ok::<_, BlobError>(StoredBlob {
                digest: hasher.finalize().into(),
                size: hasher.count(),
            })
        };
        // Run the upload and the call side by side; if reading the source
        // fails, returning drops the call, which cancels the upload so the
        // remote never stores a truncated blob.
        tokio::pin!(call);
        let local = tokio::select! {
            local = pump => local?,
            early = &mut call => {
                let status = match early {
                    Err(status) => status,
                    Ok(_) => tonic::Status::internal("answered before the upload ended"),
                };
                return Err(BlobError::RemotePut(Box::new(status)));
            }
        };
        let answer = call
            .await
            .map_err(|status| BlobError::RemotePut(Box::new(status)))?
            .into_inner();
        let remote = B3Digest::try_from(&answer.digest).map_err(BlobError::RemoteDigest)?;
        if remote != local.digest {
            return Err(BlobError::DigestMismatch {
                remote,
                local: local.digest,
            });
        }
        Ok(local)
    }
}
