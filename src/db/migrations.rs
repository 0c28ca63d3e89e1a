//! kiln's schema in PostgreSQL, as numbered migrations applied in order.
//!
//! Each migration is one SQL file in `src/db/migrations/`, applied in one
//! transaction together with its row in `kiln_schema`. All of it runs under
//! a transaction-scoped advisory lock, so of several hosts starting at once
//! one migrates and the others then find the work done. A migration, once
//! released, is never edited: a change is a new file.

use super::{Database, DbError};

/// Advisory lock key of kiln's migrations (any constant; this one spells
/// "kiln" in ASCII).
const LOCK_KEY: i64 = 0x6b69_6c6e;

/// kiln's migrations: (version, SQL), versions ascending from 1.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_store.sql")),
    (2, include_str!("migrations/0002_builds.sql")),
];

/// Applies every migration the database has not had yet.
pub async fn migrate(db: &Database) -> Result<(), DbError> {
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    let mut client = db.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(db.query_error("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db.query_error("taking the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kiln_schema (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(db.query_error("creating kiln_schema"))?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM kiln_schema", &[])
        .await
        .map_err(db.query_error("reading the schema version"))?;
    let current: i32 = row.get(0);
    if current > known {
        return Err(DbError::NewerSchema {
            name: db.name().to_owned(),
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let failed = |source| DbError::Migration {
            name: db.name().to_owned(),
            version: *version,
            source,
        };
        tx.batch_execute(sql).await.map_err(failed)?;
        tx.execute("INSERT INTO kiln_schema (version) VALUES ($1)", &[version])
            .await
            .map_err(failed)?;
        tracing::info!(database = %db.name(), version, "schema migrated");
    }
    tx.commit()
        .await
        .map_err(db.query_error("committing the migration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_from_one_without_gaps() {
        for (i, (v, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(*v).ok(), Some(i + 1));
            assert!(!sql.trim().is_empty());
        }
    }
}
