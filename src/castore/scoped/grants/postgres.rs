//! The grants in PostgreSQL, shared by several kiln hosts: the table
//! `grants` holds a row per (tenant, kind, digest). A check of many digests
//! is one query; a grant of many is one statement, and granting again what
//! is granted changes nothing.

use super::{GrantsError, Kind};
use crate::castore::B3Digest;
use crate::db::Database;
use crate::tenant::Tenant;

/// The grants table in the shared database.
#[derive(Clone, Debug)]
pub struct PostgresGrants {
    db: Database,
}

impl PostgresGrants {
    /// The grants of `db` (migrated by [`Database::connect`]).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The index of the first of `digests` that `tenant` may not see as a
    /// `kind`, if any (one query for all).
    pub async fn first_unseen(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<Option<usize>, GrantsError> {
        if digests.is_empty() {
            return Ok(None);
        }
        let db = &self.db;
        let failed = |e| GrantsError::Postgres(db.query_error("reading grants")(e));
        let client = db.client().await.map_err(GrantsError::Postgres)?;
        let statement = client
            .prepare_cached(
                "SELECT digest FROM grants WHERE tenant = $1 AND kind = $2 AND digest = ANY($3)",
            )
            .await
            .map_err(failed)?;
        let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_bytes().as_slice()).collect();
        let rows = client
            .query(&statement, &[&tenant.as_str(), &(kind as i16), &keys])
            .await
            .map_err(failed)?;
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            let digest: &[u8] = row.try_get(0).map_err(failed)?;
            seen.insert(digest);
        }
        Ok(digests
            .iter()
            .position(|d| !seen.contains(d.as_bytes().as_slice())))
    }

    /// Lets `tenant` see every `kind` in `digests`, in one statement.
    pub async fn grant(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: &[B3Digest],
    ) -> Result<(), GrantsError> {
        if digests.is_empty() {
            return Ok(());
        }
        let db = &self.db;
        let failed = |e| GrantsError::Postgres(db.query_error("writing grants")(e));
        let client = db.client().await.map_err(GrantsError::Postgres)?;
        let statement = client
            .prepare_cached(
                "INSERT INTO grants (tenant, kind, digest)
                 SELECT $1::text, $2::smallint, d FROM unnest($3::bytea[]) AS d
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(failed)?;
        let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_bytes().as_slice()).collect();
        client
            .execute(&statement, &[&tenant.as_str(), &(kind as i16), &keys])
            .await
            .map_err(failed)?;
        Ok(())
    }
}
