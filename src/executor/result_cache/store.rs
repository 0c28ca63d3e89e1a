//! Where the result cache keeps its records: a `redb` file
//! (`results.redb`, one host) or the shared database's `results` table
//! (several hosts). Both map the 32-byte key to the same JSON record; this
//! file only moves bytes, [`super`] decides what they mean.

use std::path::Path;
use std::sync::Arc;

use redb::TableDefinition;

use super::{CacheError, CacheKey};
use crate::db::Database;

/// Key (the request's BLAKE3) → the recorded result (JSON).
const RESULTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("results");

/// A record store.
#[derive(Clone)]
pub(super) enum Records {
    /// A redb database.
    Redb(Arc<redb::Database>),
    /// The shared database.
    Postgres(Database),
}

fn embedded(what: &'static str) -> impl FnOnce(redb::Error) -> CacheError {
    move |source| CacheError::Embedded {
        what,
        source: Box::new(source),
    }
}

impl Records {
    pub(super) fn open(path: &Path) -> Result<Self, CacheError> {
        let db =
            redb::Database::create(path).map_err(|e| embedded("cannot be opened")(e.into()))?;
        Ok(Self::Redb(Arc::new(db)))
    }

    pub(super) fn in_memory() -> Result<Self, CacheError> {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| embedded("cannot be created")(e.into()))?;
        Ok(Self::Redb(Arc::new(db)))
    }

    /// The record of `key`, as stored.
    pub(super) async fn read(&self, key: CacheKey) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Self::Redb(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || read_redb(&db, key))
                    .await
                    .map_err(|e| embedded("lookup failed")(io_error(e)))?
            }
            Self::Postgres(db) => {
                let failed = |e| CacheError::Postgres(db.query_error("reading a result")(e));
                let client = db.client().await.map_err(CacheError::Postgres)?;
                let statement = client
                    .prepare_cached("SELECT recorded FROM results WHERE key = $1")
                    .await
                    .map_err(failed)?;
                let row = client
                    .query_opt(&statement, &[&key.0.as_slice()])
                    .await
                    .map_err(failed)?;
                row.map(|row| row.try_get(0)).transpose().map_err(failed)
            }
        }
    }

    /// Stores `bytes` as the record of `key`, over any earlier one.
    pub(super) async fn write(&self, key: CacheKey, bytes: Vec<u8>) -> Result<(), CacheError> {
        match self {
            Self::Redb(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || write_redb(&db, key, &bytes))
                    .await
                    .map_err(|e| embedded("record failed")(io_error(e)))?
            }
            Self::Postgres(db) => {
                let failed = |e| CacheError::Postgres(db.query_error("recording a result")(e));
                let client = db.client().await.map_err(CacheError::Postgres)?;
                let statement = client
                    .prepare_cached(
                        "INSERT INTO results (key, recorded) VALUES ($1, $2)
                         ON CONFLICT (key) DO UPDATE SET recorded = EXCLUDED.recorded",
                    )
                    .await
                    .map_err(failed)?;
                client
                    .execute(&statement, &[&key.0.as_slice(), &bytes.as_slice()])
                    .await
                    .map_err(failed)?;
                Ok(())
            }
        }
    }
}

/// A blocking task that died, as the database error it stands for.
fn io_error(e: tokio::task::JoinError) -> redb::Error {
    redb::Error::Io(std::io::Error::other(e))
}

fn read_redb(db: &redb::Database, key: CacheKey) -> Result<Option<Vec<u8>>, CacheError> {
    let read = db
        .begin_read()
        .map_err(|e| embedded("cannot be read")(e.into()))?;
    let table = match read.open_table(RESULTS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(embedded("cannot be read")(e.into())),
    };
    let value = table
        .get(&key.0)
        .map_err(|e| embedded("cannot be read")(e.into()))?;
    Ok(value.map(|v| v.value().to_vec()))
}

fn write_redb(db: &redb::Database, key: CacheKey, bytes: &[u8]) -> Result<(), CacheError> {
    let failed = |e: redb::Error| embedded("cannot be written")(e);
    let write = db.begin_write().map_err(|e| failed(e.into()))?;
    {
        let mut table = write.open_table(RESULTS).map_err(|e| failed(e.into()))?;
        table.insert(&key.0, bytes).map_err(|e| failed(e.into()))?;
    }
    write.commit().map_err(|e| failed(e.into()))
}
