//! The grants in one `redb` file (`grants.redb` in the data dir), for one
//! host: a key per (tenant, kind, digest). Reads are microseconds; every
//! write is one durable transaction. The work runs on whichever thread
//! calls; [`super::Grants`] moves it off the async workers.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};

use super::{GrantsError, Kind};
use crate::castore::B3Digest;
use crate::tenant::Tenant;

/// (tenant, kind, digest) → nothing.
const GRANTS: TableDefinition<(&str, u8, &[u8; 32]), ()> = TableDefinition::new("grants");

/// redb's page cache for the grants: small keys, read once per file of a
/// build's inputs.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// The grants table in a redb database. Cheap to clone.
#[derive(Clone)]
pub struct RedbGrants {
    db: Arc<Database>,
}

fn read(e: impl Into<redb::Error>) -> GrantsError {
    GrantsError::Read(Box::new(e.into()))
}

fn write(e: impl Into<redb::Error>) -> GrantsError {
    GrantsError::Write(Box::new(e.into()))
}

impl RedbGrants {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, GrantsError> {
        let open_err = |source: redb::Error| GrantsError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_err(e.into()))?;
        Self::init(db).map_err(|e| match e {
            GrantsError::Write(source) => GrantsError::Open {
                path: path.to_owned(),
                source,
            },
            e => e,
        })
    }

    /// A table in memory (tests).
    pub fn in_memory() -> Result<Self, GrantsError> {
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(write)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, GrantsError> {
        let txn = db.begin_write().map_err(write)?;
        txn.open_table(GRANTS).map_err(write)?;
        txn.commit().map_err(write)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// The index of the first of `digests` that `tenant` may not see as a
    /// `kind`, if any (one read transaction for all).
    pub fn first_unseen(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<Option<usize>, GrantsError> {
        if digests.is_empty() {
            return Ok(None);
        }
        let txn = self.db.begin_read().map_err(read)?;
        let table = txn.open_table(GRANTS).map_err(read)?;
        for (index, digest) in digests.iter().enumerate() {
            let key = (tenant.as_str(), kind as u8, digest.as_bytes());
            if table.get(key).map_err(read)?.is_none() {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// Lets `tenant` see every `kind` in `digests`, in one durable write.
    pub fn grant(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<(), GrantsError> {
        if digests.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(write)?;
        {
            let mut table = txn.open_table(GRANTS).map_err(write)?;
            for digest in digests {
                table
                    .insert((tenant.as_str(), kind as u8, digest.as_bytes()), ())
                    .map_err(write)?;
            }
        }
        txn.commit().map_err(write)
    }
}
