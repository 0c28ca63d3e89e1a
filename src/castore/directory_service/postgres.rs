//! Directories in PostgreSQL, shared by several kiln hosts: the table
//! `directories` maps a digest to the directory's canonical encoding, the
//! same bytes the embedded backend ([`super::redb`]) stores.
//!
//! A put is one transaction: the children it names from outside the batch
//! are checked in one query, then the whole batch is inserted in one
//! statement, so a batch is stored all or nothing and a stored directory
//! always has its whole tree (nothing ever deletes a directory, so a child
//! seen once stays). A recursive get reads one breadth-first level per
//! query.

use std::collections::{HashMap, HashSet};

use futures::stream::BoxStream;

use super::{decode_stored, DirectoryError, DirectoryService};
use crate::castore::digest::B3Digest;
use crate::castore::directory::Directory;
use crate::db::{Database, DbError};

/// Digests asked for in one query of a recursive get: a wide level is read
/// in several, so no one answer holds an unbounded number of directories.
const LEVEL_CHUNK: usize = 1024;

/// Directories in the shared database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PostgresDirectoryService {
    db: Database,
}

impl PostgresDirectoryService {
    /// The directories of `db` (migrated by [`Database::connect`]).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The stored encodings of those of `digests` that are stored.
    async fn read_many(&self, digests: &[B3Digest]) -> Result<HashMap<B3Digest, Vec<u8>>, DbError> {
        let db = &self.db;
        let client = db.client().await?;
        let statement = client
            .prepare_cached("SELECT digest, encoded FROM directories WHERE digest = ANY($1)")
            .await
            .map_err(db.query_error("preparing a directory read"))?;
        let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_bytes().as_slice()).collect();
        let rows = client
            .query(&statement, &[&keys])
            .await
            .map_err(db.query_error("reading directories"))?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let digest: &[u8] = row.try_get(0).map_err(db.query_error("reading a digest"))?;
            let encoded: Vec<u8> = row
                .try_get(1)
                .map_err(db.query_error("reading a directory"))?;
            // The table's CHECK keeps digests at 32 bytes.
            if let Ok(digest) = B3Digest::try_from(digest) {
                found.insert(digest, encoded);
            }
        }
        Ok(found)
    }

    /// Stores `batch` (digest, encoding) in one transaction after checking
    /// that every child in `outside` ((parent, child), children the batch
    /// names before holding them) is stored.
    async fn write_batch(
        &self,
        batch: &[(B3Digest, Vec<u8>)],
        outside: &[(B3Digest, B3Digest)],
    ) -> Result<(), DirectoryError> {
        let db = &self.db;
        let failed = |context: &'static str| {
            move |e: tokio_postgres::Error| DirectoryError::Postgres(db.query_error(context)(e))
        };
        let mut client = db.client().await.map_err(DirectoryError::Postgres)?;
        let tx = client
            .transaction()
            .await
            .map_err(failed("starting a directory put"))?;
        if !outside.is_empty() {
            let children: Vec<&[u8]> = outside
                .iter()
                .map(|(_, child)| child.as_bytes().as_slice())
                .collect();
            let rows = tx
                .query(
                    "SELECT digest FROM directories WHERE digest = ANY($1)",
                    &[&children],
                )
                .await
                .map_err(failed("checking child directories"))?;
            let mut known = HashSet::with_capacity(rows.len());
            for row in &rows {
                let digest: Vec<u8> = row.try_get(0).map_err(failed("reading a digest"))?;
                known.insert(digest);
            }
            if let Some(&(parent, child)) = outside
                .iter()
                .find(|(_, child)| !known.contains(child.as_bytes().as_slice()))
            {
                return Err(DirectoryError::UnknownChild { parent, child });
            }
        }
        let digests: Vec<&[u8]> = batch.iter().map(|(d, _)| d.as_bytes().as_slice()).collect();
        let encodings: Vec<&[u8]> = batch.iter().map(|(_, e)| e.as_slice()).collect();
        tx.execute(
            "INSERT INTO directories (digest, encoded)
             SELECT * FROM unnest($1::bytea[], $2::bytea[])
             ON CONFLICT (digest) DO NOTHING",
            &[&digests, &encodings],
        )
        .await
        .map_err(failed("inserting directories"))?;
        tx.commit()
            .await
            .map_err(failed("committing a directory put"))
    }
}

#[async_trait::async_trait]
impl DirectoryService for PostgresDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let mut found = self
            .read_many(std::slice::from_ref(digest))
            .await
            .map_err(DirectoryError::Postgres)?;
        found
            .remove(digest)
            .map(|encoded| decode_stored(digest, &encoded))
            .transpose()
    }

    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, DirectoryError>> {
        // Level by level, each in the order its parents named it: the same
        // order as the embedded backend's queue.
        let (this, root) = (self.clone(), *root);
        Box::pin(async_stream::try_stream! {
            let mut level = vec![root];
            let mut seen = HashSet::from([root]);
            while !level.is_empty() {
                let mut next = Vec::new();
                for chunk in level.chunks(LEVEL_CHUNK) {
                    let mut found = this.read_many(chunk).await.map_err(DirectoryError::Postgres)?;
                    for digest in chunk {
                        let encoded = found
                            .remove(digest)
                            .ok_or(DirectoryError::NotFound(*digest))?;
                        let directory = decode_stored(digest, &encoded)?;
                        next.extend(directory.child_directories().filter(|c| seen.insert(*c)));
                        yield directory;
                    }
                }
                level = next;
            }
        })
    }

    async fn put_many(&self, directories: Vec<Directory>) -> Result<B3Digest, DirectoryError> {
        // Children named before the batch holds them must be stored
        // already: collected here, checked in one query.
        let mut batch = Vec::with_capacity(directories.len());
        let mut earlier = HashSet::with_capacity(directories.len());
        let mut outside = Vec::new();
        let mut root = None;
        for directory in &directories {
            let encoded = directory.encode();
            let digest = B3Digest::of(&encoded);
            outside.extend(
                directory
                    .child_directories()
                    .filter(|child| !earlier.contains(child))
                    .map(|child| (digest, child)),
            );
            if earlier.insert(digest) {
                batch.push((digest, encoded));
            }
            root = Some(digest);
        }
        let root = root.ok_or(DirectoryError::EmptyBatch)?;
        self.write_batch(&batch, &outside).await?;
        Ok(root)
    }

    async fn count(&self) -> Result<Option<u64>, DirectoryError> {
        let db = &self.db;
        let client = db.client().await.map_err(DirectoryError::Postgres)?;
        let row = client
            .query_one("SELECT count(*) FROM directories", &[])
            .await
            .map_err(|e| DirectoryError::Postgres(db.query_error("counting directories")(e)))?;
        let count: i64 = row
            .try_get(0)
            .map_err(|e| DirectoryError::Postgres(db.query_error("counting directories")(e)))?;
        Ok(u64::try_from(count).ok())
    }
}
