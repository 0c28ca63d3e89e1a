//! [`BlobBatch`]: host files stored together and made durable together.
//!
//! Storing a tree of many small files one durable blob at a time costs a
//! flush of the disk per file. A batch instead stages each file (hashed,
//! bytes written where needed, nothing flushed yet) and settles durability
//! for many at once. What a batch promises, whatever the backend:
//!
//! - a blob is never visible under its digest before its bytes are durable
//!   (so a crash never leaves a digest naming other or truncated bytes);
//! - once [`BlobBatch::commit`] answers `Ok`, every blob put through the
//!   batch is durable and readable under its digest;
//! - a batch dropped without a commit, or one that failed, leaves the store
//!   as it was plus some whole, durable-before-visible blobs.
//!
//! The default, [`OneByOne`], stores each file durably on its own through
//! [`BlobService::put_opened`] and [`BlobService::put_taken`] (remote stores
//! answer a put only once it is stored); the embedded store batches for real
//! ([`super::embedded`]).

use std::ffi::OsString;
use std::path::Path;

use futures::StreamExt;

use super::{BlobError, BlobService, StoredBlob};
use crate::hostfs::{Dir, RegularFile};

/// How many files [`OneByOne`] stores at once.
const PARALLEL_FILES: usize = 8;

/// What a batch put answers: per file (in the order given) its blob or why
/// it was not stored; the outer error when the batch as a whole failed
/// (making earlier puts durable), after which the batch stores nothing more.
pub type BatchPut = Result<Vec<Result<StoredBlob, BlobError>>, BlobError>;

/// Host files stored together; see the module docs for what is durable when.
#[async_trait::async_trait]
pub trait BlobBatch: Send {
    /// Stores the opened files, leaving them where they are (each named by
    /// its name in messages).
    async fn put_opened(&mut self, files: Vec<(OsString, RegularFile)>) -> BatchPut;

    /// Stores the regular files `files` of `parent` (each opened beneath it)
    /// and takes them out of the tree, like [`BlobService::put_taken`].
    async fn put_taken(&mut self, parent: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut;

    /// Makes every blob put through the batch durable; only then `Ok`.
    async fn commit(&mut self) -> Result<(), BlobError>;
}

/// The batch of backends without one: each file stored durably on its own.
pub struct OneByOne<'a, S: ?Sized>(pub &'a S);

#[async_trait::async_trait]
impl<S: BlobService + ?Sized> BlobBatch for OneByOne<'_, S> {
    async fn put_opened(&mut self, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let service = self.0;
        Ok(
            futures::stream::iter(files)
                .map(|(name, opened)| async move {
                    service.put_opened(opened.file, Path::new(&name)).await
                })
                .buffered(PARALLEL_FILES)
                .collect()
                .await,
        )
    }

    async fn put_taken(&mut self, parent: &Dir, files: Vec<(OsString, RegularFile)>) -> BatchPut {
        let service = self.0;
        Ok(futures::stream::iter(files)
            .map(|(name, opened)| async move {
                service
                    .put_taken(parent, &name, opened.file, Path::new(&name))
                    .await
            })
            .buffered(PARALLEL_FILES)
            .collect()
            .await)
    }

    async fn commit(&mut self) -> Result<(), BlobError> {
        Ok(())
    }
}
