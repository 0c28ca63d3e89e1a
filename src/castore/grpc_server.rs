//! Thin wrappers turning any [`Store`] into the castore gRPC services, under
//! both package names (`tvix.castore.v1` and `snix.castore.v1`).
//!
//! The wire messages of the two packages are converted to the domain types
//! right here; the shared handlers below only see validated values, and the
//! store each call sees is its caller's view ([`Scoping`]: a tenant's own
//! content only, when callers authenticate). Bad
//! digests answer `INVALID_ARGUMENT` naming the problem, unknown blobs and
//! directories answer `NOT_FOUND` naming the digest.
//!
//! Memory per call is bounded, whatever a client streams: a blob `Put` holds
//! one message while its bytes go to the store, a directory `Put` writes
//! what it received in batches of [`PUT_BATCH_BYTES`], reads go out in
//! 64 KiB chunks or one directory at a time, and no message may exceed
//! [`MAX_MESSAGE_SIZE`].

use std::error::Error;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio_util::io::{ReaderStream, StreamReader};
use tonic::transport::server::Router;
use tonic::{Request, Response, Status, Streaming};

use super::blob::{BlobError, CHUNK_SIZE};
use super::digest::B3Digest;
use super::directory::Directory;
use super::directory_service::DirectoryError;
use super::errors::ValidationError;
use super::scoped::Scoping;
use super::Store;
use crate::db::DbError;
use crate::proto::{snix_castore, tvix_castore};
use crate::tenant::Identity;

/// The four castore services over one store, ready to add to a tonic server.
pub struct CastoreServices {
    /// `tvix.castore.v1.BlobService`.
    pub tvix_blobs: tvix_castore::blob_service_server::BlobServiceServer<BlobServiceWrapper>,
    /// `tvix.castore.v1.DirectoryService`.
    pub tvix_directories:
        tvix_castore::directory_service_server::DirectoryServiceServer<DirectoryServiceWrapper>,
    /// `snix.castore.v1.BlobService`.
    pub snix_blobs: snix_castore::blob_service_server::BlobServiceServer<BlobServiceWrapper>,
    /// `snix.castore.v1.DirectoryService`.
    pub snix_directories:
        snix_castore::directory_service_server::DirectoryServiceServer<DirectoryServiceWrapper>,
}

impl CastoreServices {
    /// Starts a router on `server` carrying the four services.
    pub fn into_router(self, server: &mut tonic::transport::Server) -> Router {
        let router = server.add_service(self.tvix_blobs);
        router
            .add_service(self.tvix_directories)
            .add_service(self.snix_blobs)
            .add_service(self.snix_directories)
    }

    /// Adds all four services to a tonic router.
    pub fn add_to(self, router: Router) -> Router {
        router
            .add_service(self.tvix_blobs)
            .add_service(self.tvix_directories)
            .add_service(self.snix_blobs)
            .add_service(self.snix_directories)
    }
}

/// Largest message kiln's gRPC services accept or send, and its clients
/// too: the one limit (the server re-exports it for the build services). A
/// directory with tens of thousands of entries, or a build request with many
/// inputs, exceeds tonic's default of 4 MiB. It is also what one blob chunk
/// or one directory can cost a castore call in memory.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Encoded bytes of directories a `DirectoryService.Put` call collects
/// before writing them to the store. Each batch is checked against what is
/// stored plus the batch itself (children first), so the store stays closed
/// under references while a call of any length holds at most one batch (and
/// one message beyond it). A call that fails part-way may leave its earlier
/// batches stored: complete trees nothing refers to yet, harmless in a
/// content-addressed store. Validated directories take about six times
/// their encoded size in memory, so a 2 MiB batch costs some 12 MiB (the
/// whole stream used to be held: +680 MiB for 160 MiB sent); each write is
/// one redb transaction, so batches much smaller would cost commits.
pub const PUT_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// The castore gRPC services serving all of `store` to every caller.
pub fn grpc_services(store: Store) -> CastoreServices {
    grpc_services_scoped(store, Scoping::none())
}

/// The castore gRPC services serving each caller its view of `store`.
pub fn grpc_services_scoped(store: Store, scoping: Scoping) -> CastoreServices {
    use snix_castore::blob_service_server::BlobServiceServer as SnixBlobs;
    use snix_castore::directory_service_server::DirectoryServiceServer as SnixDirectories;
    use tvix_castore::blob_service_server::BlobServiceServer as TvixBlobs;
    use tvix_castore::directory_service_server::DirectoryServiceServer as TvixDirectories;

    let blobs = BlobServiceWrapper {
        store: store.clone(),
        scoping: scoping.clone(),
    };
    let directories = DirectoryServiceWrapper { store, scoping };
    CastoreServices {
        tvix_blobs: TvixBlobs::new(blobs.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        tvix_directories: TvixDirectories::new(directories.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        snix_blobs: SnixBlobs::new(blobs)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        snix_directories: SnixDirectories::new(directories)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
    }
}

/// Serves `BlobService` (both packages) from a store.
#[derive(Clone)]
pub struct BlobServiceWrapper {
    store: Store,
    scoping: Scoping,
}

/// Serves `DirectoryService` (both packages) from a store.
#[derive(Clone)]
pub struct DirectoryServiceWrapper {
    store: Store,
    scoping: Scoping,
}

/// The store as the caller of `request` may see it.
fn view<T>(store: &Store, scoping: &Scoping, request: &Request<T>) -> Store {
    scoping.store_for(store, &Identity::of(request.extensions()))
}

fn invalid(error: ValidationError) -> Status {
    Status::invalid_argument(error.to_string())
}

fn parse_digest(bytes: &Bytes) -> Result<B3Digest, Status> {
    B3Digest::try_from(bytes).map_err(|e| invalid(e.within("digest")))
}

/// The error and its causes on one line.
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn blob_status(error: BlobError) -> Status {
    match &error {
        BlobError::ReadSource(_) => Status::cancelled(chain(&error)),
        BlobError::Grants(g) if g.database().is_some_and(DbError::is_unavailable) => {
            Status::unavailable(chain(&error))
        }
        // The shared object store is down or refused: another try, or
        // another host, may do better.
        BlobError::Unavailable { .. } | BlobError::Fetch { .. } => {
            Status::unavailable(chain(&error))
        }
        _ => Status::internal(chain(&error)),
    }
}

fn directory_status(error: DirectoryError) -> Status {
    match error {
        DirectoryError::NotFound(_) => Status::not_found(error.to_string()),
        DirectoryError::UnknownChild { .. } | DirectoryError::EmptyBatch => {
            Status::invalid_argument(error.to_string())
        }
        // The chain names the database (its address without a password).
        _ if error.database().is_some_and(DbError::is_unavailable) => {
            Status::unavailable(chain(&error))
        }
        _ => Status::internal(chain(&error)),
    }
}

async fn stat_blob(store: &Store, digest: &Bytes) -> Result<(), Status> {
    let digest = parse_digest(digest)?;
    match store.blobs.has(&digest).await.map_err(blob_status)? {
        true => Ok(()),
        false => Err(Status::not_found(format!("blob {digest} not found"))),
    }
}

async fn read_blob(
    store: &Store,
    digest: &Bytes,
) -> Result<impl Stream<Item = Result<Bytes, Status>> + Send + 'static, Status> {
    let digest = parse_digest(digest)?;
    let blob = store.blobs.open_read(&digest).await.map_err(blob_status)?;
    let blob = blob.ok_or_else(|| Status::not_found(format!("blob {digest} not found")))?;
    let chunks = ReaderStream::with_capacity(blob.reader, CHUNK_SIZE);
    Ok(chunks.map_err(move |e| Status::internal(format!("reading blob {digest}: {e}"))))
}

async fn put_blob(
    store: &Store,
    chunks: impl Stream<Item = Result<Bytes, Status>> + Send + Unpin,
) -> Result<B3Digest, Status> {
    let mut reader = StreamReader::new(chunks.map_err(std::io::Error::other));
    let stored = store.blobs.put(&mut reader).await.map_err(blob_status)?;
    tracing::debug!(digest = %stored.digest, size = stored.size, "blob stored");
    Ok(stored.digest)
}

async fn get_directories(
    store: &Store,
    digest: Option<&Bytes>,
    recursive: bool,
) -> Result<BoxStream<'static, Result<Directory, Status>>, Status> {
    let digest =
        digest.ok_or_else(|| Status::invalid_argument("by_what: not set, want a digest"))?;
    let digest = parse_digest(digest)?;
    if !recursive {
        let directory = store
            .directories
            .get(&digest)
            .await
            .map_err(directory_status)?;
        let directory =
            directory.ok_or_else(|| directory_status(DirectoryError::NotFound(digest)))?;
        return Ok(Box::pin(futures::stream::once(async { Ok(directory) })));
    }
    let mut directories = store.directories.get_recursive(&digest);
    // A missing root is the call's status, not an error inside the stream.
    let first = match directories.next().await {
        Some(first) => first.map_err(directory_status)?,
        None => return Err(directory_status(DirectoryError::NotFound(digest))),
    };
    let rest = directories.map_err(directory_status);
    Ok(Box::pin(
        futures::stream::once(async { Ok(first) }).chain(rest),
    ))
}

/// One received directory: its encoded size and the validated directory.
type Received = (usize, Result<Directory, ValidationError>);

async fn put_directories(
    store: &Store,
    directories: impl Stream<Item = Result<Received, Status>> + Send + Unpin,
) -> Result<B3Digest, Status> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    let mut root = None;
    let mut directories = directories.enumerate();
    while let Some((index, received)) = directories.next().await {
        let (size, directory) = received?;
        let directory = directory.map_err(|e| invalid(e.within(format!("directory #{index}"))))?;
        batch.push(directory);
        batch_bytes += size;
        if batch_bytes >= PUT_BATCH_BYTES {
            root = Some(write_batch(store, std::mem::take(&mut batch)).await?);
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        root = Some(write_batch(store, batch).await?);
    }
    root.ok_or_else(|| Status::invalid_argument("no directories sent"))
}

async fn write_batch(store: &Store, batch: Vec<Directory>) -> Result<B3Digest, Status> {
    store
        .directories
        .put_many(batch)
        .await
        .map_err(directory_status)
}

macro_rules! package_services {
    ($pkg:ident) => {
        #[tonic::async_trait]
        impl $pkg::blob_service_server::BlobService for BlobServiceWrapper {
            async fn stat(
                &self,
                request: Request<$pkg::StatBlobRequest>,
            ) -> Result<Response<$pkg::StatBlobResponse>, Status> {
                // No chunking and no bao: an empty answer means "present".
                let store = view(&self.store, &self.scoping, &request);
                stat_blob(&store, &request.into_inner().digest).await?;
                Ok(Response::new($pkg::StatBlobResponse::default()))
            }

            type ReadStream = BoxStream<'static, Result<$pkg::BlobChunk, Status>>;

            async fn read(
                &self,
                request: Request<$pkg::ReadBlobRequest>,
            ) -> Result<Response<Self::ReadStream>, Status> {
                let store = view(&self.store, &self.scoping, &request);
                let chunks = read_blob(&store, &request.into_inner().digest).await?;
                Ok(Response::new(Box::pin(
                    chunks.map_ok(|data| $pkg::BlobChunk { data }),
                )))
            }

            async fn put(
                &self,
                request: Request<Streaming<$pkg::BlobChunk>>,
            ) -> Result<Response<$pkg::PutBlobResponse>, Status> {
                let store = view(&self.store, &self.scoping, &request);
                let chunks = request.into_inner().map_ok(|chunk| chunk.data);
                let digest = put_blob(&store, chunks).await?;
                Ok(Response::new($pkg::PutBlobResponse {
                    digest: digest.to_bytes(),
                }))
            }
        }

        #[tonic::async_trait]
        impl $pkg::directory_service_server::DirectoryService for DirectoryServiceWrapper {
            type GetStream = BoxStream<'static, Result<$pkg::Directory, Status>>;

            async fn get(
                &self,
                request: Request<$pkg::GetDirectoryRequest>,
            ) -> Result<Response<Self::GetStream>, Status> {
                let store = view(&self.store, &self.scoping, &request);
                let request = request.into_inner();
                let digest = request.by_what.map(|by_what| match by_what {
                    $pkg::get_directory_request::ByWhat::Digest(digest) => digest,
                });
                let directories =
                    get_directories(&store, digest.as_ref(), request.recursive).await?;
                Ok(Response::new(Box::pin(
                    directories.map_ok(|directory| $pkg::Directory::from(&directory)),
                )))
            }

            async fn put(
                &self,
                request: Request<Streaming<$pkg::Directory>>,
            ) -> Result<Response<$pkg::PutDirectoryResponse>, Status> {
                let store = view(&self.store, &self.scoping, &request);
                let directories = request.into_inner().map_ok(|wire| {
                    (
                        prost::Message::encoded_len(&wire),
                        Directory::try_from(wire),
                    )
                });
                let root = put_directories(&store, directories).await?;
                Ok(Response::new($pkg::PutDirectoryResponse {
                    root_digest: root.to_bytes(),
                }))
            }
        }
    };
}

package_services!(tvix_castore);
package_services!(snix_castore);
