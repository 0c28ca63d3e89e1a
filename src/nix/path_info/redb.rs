//! The embedded path-info store: a `redb` file mapping a store path's
//! 20-byte digest to its encoded `snix.store.v1.PathInfo`. Each put is one
//! durable write transaction; work runs off the async workers.

use std::path::Path;
use std::sync::Arc;

use futures::stream::BoxStream;
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};

use super::{PathInfo, PathInfoError, PathInfoService};

/// redb's page cache: path infos are small.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

const PATH_INFOS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("path_infos");

fn db_err(e: impl Into<redb::Error>) -> PathInfoError {
    PathInfoError::Database(Box::new(e.into()))
}

/// Path infos in a `redb` file.
#[derive(Clone)]
pub struct RedbPathInfoService {
    db: Arc<Database>,
}

impl RedbPathInfoService {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, PathInfoError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(PATH_INFOS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(RedbPathInfoService { db: Arc::new(db) })
    }

    fn get_blocking(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>, PathInfoError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PATH_INFOS).map_err(db_err)?;
        let Some(value) = table.get(digest.as_slice()).map_err(db_err)? else {
            return Ok(None);
        };
        super::decode_stored(digest, value.value()).map(Some)
    }

    fn put_blocking(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        let encoded = info.to_wire().encode_to_vec();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PATH_INFOS).map_err(db_err)?;
            table
                .insert(info.store_path.hash().as_slice(), encoded.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn list_blocking(&self, out: tokio::sync::mpsc::Sender<Result<PathInfo, PathInfoError>>) {
        let run = || -> Result<(), PathInfoError> {
            let txn = self.db.begin_read().map_err(db_err)?;
            let table = txn.open_table(PATH_INFOS).map_err(db_err)?;
            for item in table.iter().map_err(db_err)? {
                let (key, value) = item.map_err(db_err)?;
                let digest: [u8; 20] = key.value().try_into().unwrap_or([0; 20]);
                if out
                    .blocking_send(super::decode_stored(&digest, value.value()))
                    .is_err()
                {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = out.blocking_send(Err(e));
        }
    }
}

#[async_trait::async_trait]
impl PathInfoService for RedbPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>, PathInfoError> {
        let this = self.clone();
        let digest = *digest;
        tokio::task::spawn_blocking(move || this.get_blocking(&digest))
            .await
            .map_err(PathInfoError::Join)?
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo, PathInfoError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.put_blocking(&info).map(|()| info))
            .await
            .map_err(PathInfoError::Join)?
    }

    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.list_blocking(tx));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
