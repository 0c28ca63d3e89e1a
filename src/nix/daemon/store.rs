//! What the daemon front works on: the castore (trees and blobs), the
//! path-info store (Nix's metadata per store path) and the kiln server that
//! builds. One [`Daemon`] serves every connection.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::build::BuildOptions;
use super::types::WirePathInfo;
use crate::castore::{Node, Store};
use crate::client::KilnChannel;
use crate::nix::nar::ingest::{ingest_nar, IngestedNar, NarIngestError, NarLimits};
use crate::nix::nar::{write_nar, NarError};
use crate::nix::path_info::{PathInfo, PathInfoError, PathInfoService, Signature};
use crate::nix::{Derivation, StorePath};

/// How the daemon treats its clients.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Whether clients are trusted (Nix's `trusted-users`): they may build
    /// derivations sent inline and add input-addressed paths unsigned.
    pub trusted: bool,
    /// Whether untrusted clients may add input-addressed paths without a
    /// signature anyway (the operator's choice; see README's Security model).
    pub allow_unsigned: bool,
    /// Features builds may require (`requiredSystemFeatures`) beyond the
    /// ones kiln always has (`kvm` where the host offers it to builds).
    pub system_features: BTreeSet<String>,
    /// The platform builds run on.
    pub system: String,
    /// Default `NIX_BUILD_CORES` when the client says 0.
    pub build_cores: u32,
    /// The operator's build limits, for clients that set none (ssh-ng
    /// clients never send `SetOptions`); 0: none (the server's own limits
    /// still apply).
    pub build_defaults: BuildOptions,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            trusted: false,
            allow_unsigned: false,
            system_features: BTreeSet::new(),
            system: "x86_64-linux".to_owned(),
            build_cores: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            build_defaults: BuildOptions::default(),
        }
    }
}

/// Shared by every connection.
pub struct Daemon {
    /// Trees and blobs.
    pub castore: Store,
    /// Metadata per store path.
    pub path_info: Arc<dyn PathInfoService>,
    /// The kiln server that runs the builds.
    pub builds: KilnChannel,
    /// How clients are treated.
    pub config: DaemonConfig,
}

/// The store failed (not the client's fault).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path-info store.
    #[error("the path-info store")]
    PathInfo(#[source] PathInfoError),
    /// Writing a NAR out of the castore.
    #[error("writing the NAR of {path}")]
    Nar {
        /// The path.
        path: StorePath,
        /// Why.
        #[source]
        source: NarError,
    },
    /// Reading a blob.
    #[error("reading {0} from the castore")]
    Blob(
        StorePath,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

impl Daemon {
    /// A daemon whose castore, path-info store and builds are those of the
    /// kiln server at `addr`.
    pub async fn connect(
        addr: &str,
        security: &crate::client::ClientSecurity,
        config: DaemonConfig,
    ) -> Result<Daemon, crate::client::ConnectError> {
        use crate::castore::blob::grpc::GrpcBlobService;
        use crate::castore::directory_service::grpc::GrpcDirectoryService;
        use crate::nix::path_info::grpc::GrpcPathInfoService;
        let channel = crate::client::connect(addr, security).await?;
        Ok(Daemon {
            castore: Store {
                blobs: Arc::new(GrpcBlobService::new(channel.clone())),
                directories: Arc::new(GrpcDirectoryService::new(channel.clone())),
            },
            path_info: Arc::new(GrpcPathInfoService::new(channel.clone())),
            builds: channel,
            config,
        })
    }

    /// Every valid path.
    pub async fn all_paths(&self) -> Result<BTreeSet<StorePath>, StoreError> {
        use futures::TryStreamExt;
        self.path_info
            .list()
            .map_ok(|info| info.store_path)
            .try_collect()
            .await
            .map_err(StoreError::PathInfo)
    }

    /// The path's metadata, if it is valid.
    pub async fn info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        self.path_info
            .get(path.hash())
            .await
            .map_err(StoreError::PathInfo)
    }

    /// Whether the path is valid.
    pub async fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(self.info(path).await?.is_some())
    }

    /// The valid path whose hash part is `hash_part`.
    pub async fn by_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        let Ok(bytes) = crate::nix::nixbase32::decode(hash_part) else {
            return Ok(None);
        };
        let Ok(digest) = <[u8; 20]>::try_from(bytes.as_slice()) else {
            return Ok(None);
        };
        Ok(self
            .path_info
            .get(&digest)
            .await
            .map_err(StoreError::PathInfo)?
            .map(|info| info.store_path))
    }

    /// Records `info`.
    pub async fn register(&self, info: PathInfo) -> Result<(), StoreError> {
        self.path_info
            .put(info)
            .await
            .map(|_| ())
            .map_err(StoreError::PathInfo)
    }

    /// Ingests a NAR from `reader`, which ends exactly after it.
    pub async fn ingest<R: AsyncRead + Unpin + Send>(
        &self,
        reader: &mut R,
    ) -> Result<IngestedNar, NarIngestError> {
        ingest_nar(&self.castore, reader, &NarLimits::default()).await
    }

    /// Streams the NAR of `info` to `out`.
    pub async fn write_nar<W: AsyncWrite + Unpin + Send>(
        &self,
        info: &PathInfo,
        out: &mut W,
    ) -> Result<(), StoreError> {
        write_nar(&self.castore, &info.node, out)
            .await
            .map_err(|source| StoreError::Nar {
                path: info.store_path.clone(),
                source,
            })
    }

    /// Reads and parses a `.drv` file in the store; `None` if it is not
    /// valid here.
    pub async fn read_derivation(
        &self,
        path: &StorePath,
    ) -> Result<Option<Result<Derivation, String>>, StoreError> {
        let Some(info) = self.info(path).await? else {
            return Ok(None);
        };
        let Node::File { digest, size, .. } = &info.node else {
            return Ok(Some(Err(format!("{path} is not a file"))));
        };
        if *size > super::wire::MAX_LONG as u64 {
            return Ok(Some(Err(format!(
                "{path} is {size} bytes, too large for a derivation"
            ))));
        }
        let mut bytes = Vec::new();
        let reader = self
            .castore
            .blobs
            .open_read(digest)
            .await
            .map_err(|e| StoreError::Blob(path.clone(), Box::new(e)))?;
        let Some(mut reader) = reader else {
            return Ok(Some(Err(format!(
                "the contents of {path} are missing from the castore"
            ))));
        };
        use tokio::io::AsyncReadExt;
        (&mut reader.reader)
            .take(super::wire::MAX_LONG as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| StoreError::Blob(path.clone(), Box::new(e)))?;
        Ok(Some(
            Derivation::parse(&bytes).map_err(|e| format!("parsing derivation {path}: {e}")),
        ))
    }
}

/// A stored path info as the protocol carries it.
pub fn to_wire(info: &PathInfo) -> WirePathInfo {
    WirePathInfo {
        path: info.store_path.clone(),
        deriver: info.deriver.clone(),
        nar_sha256: info.nar_sha256,
        references: info.references.clone(),
        registration_time: 0,
        nar_size: info.nar_size,
        ultimate: false,
        signatures: info
            .signatures
            .iter()
            .map(|s| {
                use base64::Engine;
                format!(
                    "{}:{}",
                    s.name,
                    base64::engine::general_purpose::STANDARD.encode(&s.data)
                )
            })
            .collect(),
        ca: info.ca.clone().unwrap_or_default(),
    }
}

/// Nix's signature strings (`<key name>:<base64>`) as path-info signatures;
/// malformed ones are named.
pub fn parse_signatures(sigs: &[String]) -> Result<Vec<Signature>, String> {
    use base64::Engine;
    sigs.iter()
        .map(|s| {
            let (name, data) = s
                .split_once(':')
                .ok_or_else(|| format!("signature {s:?} is not <key name>:<base64>"))?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|_| format!("signature {s:?} is not <key name>:<base64>"))?;
            Ok(Signature {
                name: name.to_owned(),
                data,
            })
        })
        .collect()
}

/// The output paths of `drv` by name.
pub fn output_paths(drv: &Derivation) -> BTreeMap<String, Option<StorePath>> {
    drv.outputs
        .iter()
        .map(|(name, o)| (name.clone(), o.path.clone()))
        .collect()
}
