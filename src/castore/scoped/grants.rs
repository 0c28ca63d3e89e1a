//! The grants table: which tenant may see which blob or directory.
//!
//! A grant is a (tenant, kind, digest) a tenant has proved it may see: it
//! put the bytes or the directory, or a build of its produced them. Content
//! stays stored once, whoever put it; only visibility is per tenant. Grants
//! are never taken back (nothing in kiln deletes content). Every write is
//! durable when it answers and is made after the content itself is stored,
//! so a crash can lose a grant (the tenant then uploads again) but never
//! grants what is not stored.
//!
//! Two backends: [`redb`] (`grants.redb` in the data dir, one host) and
//! [`postgres`] (shared by several hosts, `kiln serve --database`).

pub mod postgres;
pub mod redb;

use std::path::{Path, PathBuf};

use self::postgres::PostgresGrants;
use self::redb::RedbGrants;
use crate::castore::B3Digest;
use crate::db::{Database, DbError};
use crate::tenant::Tenant;

/// What a grant is for (a blob and a directory may share a digest only if
/// the blob's bytes are the directory's encoding, but they stay apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A blob.
    Blob = 1,
    /// A directory.
    Directory = 2,
}

/// Reading or writing the grants table failed.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    /// Opening or creating the table's file failed.
    #[error("opening the grants database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<::redb::Error>,
    },
    /// A read failed.
    #[error("reading the grants database")]
    Read(#[source] Box<::redb::Error>),
    /// A write failed.
    #[error("writing the grants database")]
    Write(#[source] Box<::redb::Error>),
    /// The shared PostgreSQL database failed.
    #[error("the grants table")]
    Postgres(#[source] DbError),
}

impl GrantsError {
    /// The database failure behind this error, if it is one of the shared
    /// database.
    pub fn database(&self) -> Option<&DbError> {
        match self {
            Self::Postgres(e) => Some(e),
            _ => None,
        }
    }
}

/// Who may see what. Cheap to clone.
#[derive(Clone)]
pub enum Grants {
    /// In a redb file, for one host.
    Redb(RedbGrants),
    /// In the shared database.
    Postgres(PostgresGrants),
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Redb(_) => f.write_str("Grants(redb)"),
            Self::Postgres(p) => write!(f, "Grants({p:?})"),
        }
    }
}

impl Grants {
    /// Opens (creating if needed) the grants database at `path`.
    pub fn open(path: &Path) -> Result<Self, GrantsError> {
        RedbGrants::open(path).map(Self::Redb)
    }

    /// A grants table in memory (tests).
    pub fn in_memory() -> Result<Self, GrantsError> {
        RedbGrants::in_memory().map(Self::Redb)
    }

    /// The grants table of the shared database `db` (migrated by
    /// [`Database::connect`]).
    pub fn postgres(db: Database) -> Self {
        Self::Postgres(PostgresGrants::new(db))
    }

    /// Whether `tenant` may see the `kind` named `digest`.
    pub async fn granted(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digest: &B3Digest,
    ) -> Result<bool, GrantsError> {
        let unseen = self.first_unseen(tenant, kind, vec![*digest]).await?;
        Ok(unseen.is_none())
    }

    /// The index of the first of `digests` that `tenant` may not see as a
    /// `kind`, if any (one read for all).
    pub async fn first_unseen(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: Vec<B3Digest>,
    ) -> Result<Option<usize>, GrantsError> {
        match self {
            Self::Redb(redb) => {
                let (redb, tenant) = (redb.clone(), tenant.clone());
                tokio::task::spawn_blocking(move || redb.first_unseen(&tenant, kind, &digests))
                    .await
                    .unwrap_or_else(|e| Err(GrantsError::Read(task_died(e))))
            }
            Self::Postgres(pg) => pg.first_unseen(tenant, kind, &digests).await,
        }
    }

    /// Lets `tenant` see every `kind` in `digests`, in one durable write.
    pub async fn grant(
        &self,
        tenant: &Tenant,
        kind: Kind,
        digests: Vec<B3Digest>,
    ) -> Result<(), GrantsError> {
        match self {
            Self::Redb(redb) => {
                let (redb, tenant) = (redb.clone(), tenant.clone());
                tokio::task::spawn_blocking(move || redb.grant(&tenant, kind, &digests))
                    .await
                    .unwrap_or_else(|e| Err(GrantsError::Write(task_died(e))))
            }
            Self::Postgres(pg) => pg.grant(tenant, kind, &digests).await,
        }
    }
}

/// A blocking task that died, as the database error it stands for.
fn task_died(e: tokio::task::JoinError) -> Box<::redb::Error> {
    Box::new(::redb::Error::Io(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_are_per_tenant_and_kind_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grants.redb");
        let a = Tenant::parse("a").expect("a");
        let b = Tenant::parse("b").expect("b");
        let d1 = B3Digest::from([1u8; 32]);
        let d2 = B3Digest::from([2u8; 32]);
        {
            let grants = Grants::open(&path).expect("open");
            grants
                .grant(&a, Kind::Blob, vec![d1, d2])
                .await
                .expect("grant");
            grants
                .grant(&b, Kind::Directory, vec![d1])
                .await
                .expect("grant");
            grants.grant(&b, Kind::Blob, vec![]).await.expect("nothing");
        }
        let grants = Grants::open(&path).expect("reopen");
        for (t, k, d, want) in [
            (&a, Kind::Blob, d1, true),
            (&a, Kind::Blob, d2, true),
            (&a, Kind::Directory, d1, false),
            (&b, Kind::Directory, d1, true),
            (&b, Kind::Blob, d1, false),
        ] {
            assert_eq!(grants.granted(t, k, &d).await.expect("read"), want);
        }
        assert!(grants.granted(&a, Kind::Blob, &d1).await.expect("read"));
        assert!(!grants
            .granted(&a, Kind::Directory, &d1)
            .await
            .expect("read"));
        assert_eq!(
            grants
                .first_unseen(&a, Kind::Blob, vec![d2, d1])
                .await
                .expect("read"),
            None
        );
        assert_eq!(
            grants
                .first_unseen(&b, Kind::Directory, vec![d1, d2])
                .await
                .expect("read"),
            Some(1)
        );
    }
}
