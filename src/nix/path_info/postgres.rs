//! Path infos in PostgreSQL, shared by several kiln hosts: the table
//! `path_infos` maps a store path's 20-byte digest to its encoded
//! `snix.store.v1.PathInfo`, the same bytes the embedded backend
//! ([`super::redb`]) stores. A put replaces in one statement; a listing
//! reads pages in digest order, each query starting after the last digest
//! of the one before, so it never holds a cursor (or a connection) while
//! the caller is slow.

use futures::stream::BoxStream;
use prost::Message;

use super::{decode_stored, PathInfo, PathInfoError, PathInfoService};
use crate::db::Database;

/// Records read per query of a listing.
pub const LIST_PAGE: i64 = 256;

/// Path infos in the shared database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PostgresPathInfoService {
    db: Database,
}

impl PostgresPathInfoService {
    /// The path infos of `db` (migrated by [`Database::connect`]).
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// One page of the listing: up to [`LIST_PAGE`] (digest, record) after
    /// `after`, in digest order.
    async fn page(&self, after: &[u8]) -> Result<Vec<([u8; 20], Vec<u8>)>, PathInfoError> {
        let db = &self.db;
        let failed = |e| PathInfoError::Postgres(db.query_error("listing path infos")(e));
        let client = db.client().await.map_err(PathInfoError::Postgres)?;
        let statement = client
            .prepare_cached(
                "SELECT digest, encoded FROM path_infos WHERE digest > $1 ORDER BY digest LIMIT $2",
            )
            .await
            .map_err(failed)?;
        let rows = client
            .query(&statement, &[&after, &LIST_PAGE])
            .await
            .map_err(failed)?;
        let mut page = Vec::with_capacity(rows.len());
        for row in rows {
            let digest: &[u8] = row.try_get(0).map_err(failed)?;
            // The table's CHECK keeps digests at 20 bytes.
            let digest: [u8; 20] = digest.try_into().unwrap_or([0; 20]);
            page.push((digest, row.try_get(1).map_err(failed)?));
        }
        Ok(page)
    }
}

#[async_trait::async_trait]
impl PathInfoService for PostgresPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>, PathInfoError> {
        let db = &self.db;
        let failed = |e| PathInfoError::Postgres(db.query_error("reading a path info")(e));
        let client = db.client().await.map_err(PathInfoError::Postgres)?;
        let statement = client
            .prepare_cached("SELECT encoded FROM path_infos WHERE digest = $1")
            .await
            .map_err(failed)?;
        let Some(row) = client
            .query_opt(&statement, &[&digest.as_slice()])
            .await
            .map_err(failed)?
        else {
            return Ok(None);
        };
        let encoded: &[u8] = row.try_get(0).map_err(failed)?;
        decode_stored(digest, encoded).map(Some)
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo, PathInfoError> {
        let db = &self.db;
        let failed = |e| PathInfoError::Postgres(db.query_error("writing a path info")(e));
        let encoded = info.to_wire().encode_to_vec();
        let client = db.client().await.map_err(PathInfoError::Postgres)?;
        let statement = client
            .prepare_cached(
                "INSERT INTO path_infos (digest, encoded) VALUES ($1, $2)
                 ON CONFLICT (digest) DO UPDATE SET encoded = EXCLUDED.encoded",
            )
            .await
            .map_err(failed)?;
        client
            .execute(
                &statement,
                &[&info.store_path.hash().as_slice(), &encoded.as_slice()],
            )
            .await
            .map_err(failed)?;
        Ok(info)
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let this = self.clone();
        Box::pin(async_stream::stream! {
            let mut after = Vec::new();
            loop {
                let page = match this.page(&after).await {
                    Ok(page) => page,
                    Err(e) => {
                        yield Err(e);
                        break;
                    }
                };
                let full = page.len() as i64 == LIST_PAGE;
                for (digest, encoded) in &page {
                    // A record that no longer decodes is reported and the
                    // listing goes on, as the embedded backend does.
                    yield decode_stored(digest, encoded);
                }
                match page.last() {
                    Some((digest, _)) if full => after = digest.to_vec(),
                    _ => break,
                }
            }
        })
    }
}
