//! The embedded directory store: a `redb` database file mapping a digest to
//! the directory's canonical encoding. Every put is one write transaction,
//! so a batch is stored all or nothing.
//!
//! redb caches pages in memory, by default up to 1 GiB, keeping every page
//! it writes while there is room; kiln bounds it to [`CACHE_BYTES`] so the
//! directories streamed in do not stay resident.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use futures::stream::BoxStream;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio_stream::wrappers::ReceiverStream;

use super::{DirectoryError, DirectoryService};
use crate::castore::digest::B3Digest;
use crate::castore::directory::Directory;

/// redb's page cache (nine tenths for reads, one tenth buffering writes):
/// directories are small and read once per build, so a modest cache holds
/// the hot ones.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

const DIRECTORIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("directories");

/// Directories in a `redb` file.
#[derive(Clone)]
pub struct RedbDirectoryService {
    db: Arc<Database>,
}

impl RedbDirectoryService {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DirectoryError> {
        let open_err = |source: redb::Error| DirectoryError::OpenDatabase {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_err(e.into()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        txn.open_table(DIRECTORIES)
            .map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(RedbDirectoryService { db: Arc::new(db) })
    }

    fn get_blocking(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let read_err = |e: redb::Error| DirectoryError::ReadDatabase(Box::new(e));
        let txn = self.db.begin_read().map_err(|e| read_err(e.into()))?;
        let table = txn
            .open_table(DIRECTORIES)
            .map_err(|e| read_err(e.into()))?;
        read_directory(&table, digest)
    }

    /// Breadth-first from `root`, sending each directory; stops when the
    /// receiver goes away.
    fn walk_blocking(
        &self,
        root: B3Digest,
        out: tokio::sync::mpsc::Sender<Result<Directory, DirectoryError>>,
    ) {
        let read_err = |e: redb::Error| DirectoryError::ReadDatabase(Box::new(e));
        let table = self
            .db
            .begin_read()
            .map_err(|e| read_err(e.into()))
            .and_then(|txn| txn.open_table(DIRECTORIES).map_err(|e| read_err(e.into())));
        let table = match table {
            Ok(table) => table,
            Err(e) => {
                let _ = out.blocking_send(Err(e));
                return;
            }
        };
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        while let Some(digest) = queue.pop_front() {
            let item = match read_directory(&table, &digest) {
                Ok(Some(directory)) => {
                    for child in directory.child_directories() {
                        if seen.insert(child) {
                            queue.push_back(child);
                        }
                    }
                    Ok(directory)
                }
                Ok(None) => Err(DirectoryError::NotFound(digest)),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if out.blocking_send(item).is_err() || failed {
                return;
            }
        }
    }

    /// The table's entry count, which redb keeps in the tree's header.
    fn count_blocking(&self) -> Result<u64, DirectoryError> {
        let read_err = |e: redb::Error| DirectoryError::ReadDatabase(Box::new(e));
        let txn = self.db.begin_read().map_err(|e| read_err(e.into()))?;
        let table = txn
            .open_table(DIRECTORIES)
            .map_err(|e| read_err(e.into()))?;
        table.len().map_err(|e| read_err(e.into()))
    }

    fn put_many_blocking(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        let write_err = |e: redb::Error| DirectoryError::WriteDatabase(Box::new(e));
        let txn = self.db.begin_write().map_err(|e| write_err(e.into()))?;
        let mut root = None;
        {
            let mut table = txn
                .open_table(DIRECTORIES)
                .map_err(|e| write_err(e.into()))?;
            let mut batch = HashSet::new();
            for directory in &directories {
                let encoded = directory.encode();
                let digest = B3Digest::of(&encoded);
                for child in directory.child_directories() {
                    let known = batch.contains(&child)
                        || table
                            .get(child.as_bytes().as_slice())
                            .map_err(|e| write_err(e.into()))?
                            .is_some();
                    if !known {
                        return Err(DirectoryError::UnknownChild {
                            parent: digest,
                            child,
                        });
                    }
                }
                table
                    .insert(digest.as_bytes().as_slice(), encoded.as_slice())
                    .map_err(|e| write_err(e.into()))?;
                batch.insert(digest);
                root = Some(digest);
            }
        }
        let root = root.ok_or(DirectoryError::EmptyBatch)?;
        txn.commit().map_err(|e| write_err(e.into()))?;
        Ok(root)
    }
}

fn read_directory(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    digest: &B3Digest,
) -> Result<Option<Directory>, DirectoryError> {
    let Some(guard) = table
        .get(digest.as_bytes().as_slice())
        .map_err(|e| DirectoryError::ReadDatabase(Box::new(e.into())))?
    else {
        return Ok(None);
    };
    super::decode_stored(digest, guard.value()).map(Some)
}

#[async_trait::async_trait]
impl DirectoryService for RedbDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let store = self.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || store.get_blocking(&digest))
            .await
            .map_err(DirectoryError::Task)?
    }

    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let store = self.clone();
        let root = *root;
        tokio::task::spawn_blocking(move || store.walk_blocking(root, sender));
        Box::pin(ReceiverStream::new(receiver))
    }

    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        if directories.is_empty() {
            return Err(DirectoryError::EmptyBatch);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.put_many_blocking(directories))
            .await
            .map_err(DirectoryError::Task)?
    }

    async fn count(&self) -> Result<Option<u64>, DirectoryError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.count_blocking().map(Some))
            .await
            .map_err(DirectoryError::Task)?
    }
}
