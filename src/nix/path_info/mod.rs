//! The path-info store: what kiln knows of each Nix store path next to its
//! tree in the castore — NAR hash and size, references, deriver,
//! signatures, content address. The Nix front ([`crate::nix::daemon`])
//! reads and writes it; snix tools reach it as
//! `snix.store.v1.PathInfoService`.
//!
//! - [`PathInfo`]: the domain type, validated from and to the wire
//!   message `snix.store.v1.PathInfo` here ([`PathInfo::try_from_wire`],
//!   [`PathInfo::to_wire`]).
//! - [`PathInfoService`]: the storage trait; backends [`redb`] (embedded,
//!   `pathinfo.redb` in the data dir), [`postgres`] (shared by several
//!   hosts, `kiln serve --database`) and [`grpc`] (another kiln), chosen
//!   by address in [`from_addr`]; [`grpc_server`] serves any of them.
//!
//! Keyed by the store path's 20-byte digest, as snix keys it.

pub mod grpc;
pub mod grpc_server;
pub mod postgres;
pub mod redb;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use futures::stream::BoxStream;

use crate::castore::wire::WireNode;
use crate::castore::Node;
use crate::nix::hash::{Hash, HashAlgorithm};
use crate::nix::store_path::make::{ContentAddress, Method};
use crate::nix::StorePath;
use crate::proto::snix_store;

/// One signature of a path: the key's name and the signature bytes (Nix
/// prints them as `<name>:<base64>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The key's name (`cache.nixos.org-1`).
    pub name: String,
    /// The signature.
    pub data: Vec<u8>,
}

/// What the store knows of one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub store_path: StorePath,
    /// Its tree in the castore.
    pub node: Node,
    /// The paths it refers to (itself included, if it does).
    pub references: BTreeSet<StorePath>,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Length of its NAR.
    pub nar_size: u64,
    /// The `.drv` that built it.
    pub deriver: Option<StorePath>,
    /// Signatures.
    pub signatures: Vec<Signature>,
    /// Its content address in Nix's form (`fixed:r:sha256:<nixbase32>`,
    /// `text:sha256:…`), for content-addressed paths.
    pub ca: Option<String>,
}

/// A path-info message that does not hold together, or a store that failed.
#[derive(Debug, thiserror::Error)]
pub enum PathInfoError {
    /// A field is missing or malformed; names the field.
    #[error("path info: {field}: {problem}")]
    Invalid {
        /// The field (`node`, `references[2]`, `narinfo.nar_sha256`, …).
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// The embedded database failed.
    #[error("the path-info database")]
    Database(#[source] Box<::redb::Error>),
    /// The shared PostgreSQL database failed.
    #[error("the path-info table")]
    Postgres(#[source] crate::db::DbError),
    /// A stored record no longer decodes.
    #[error("stored path info of {0} is corrupt")]
    Corrupt(String, #[source] Box<PathInfoError>),
    /// The remote store failed.
    #[error("the remote path-info store")]
    Remote(#[source] Box<tonic::Status>),
    /// Blocking work could not be run.
    #[error("the path-info store's worker")]
    Join(#[source] tokio::task::JoinError),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> PathInfoError {
    PathInfoError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A stored record (an encoded `snix.store.v1.PathInfo`, as every backend
/// stores it) of the path with `digest`, checked as a wire message is and
/// for being of that path.
pub(crate) fn decode_stored(digest: &[u8; 20], bytes: &[u8]) -> Result<PathInfo, PathInfoError> {
    use prost::Message;
    let key = crate::nix::nixbase32::encode(digest);
    let wire = snix_store::PathInfo::decode(bytes).map_err(|e| {
        PathInfoError::Corrupt(key.clone(), Box::new(invalid("encoding", e.to_string())))
    })?;
    let info = PathInfo::try_from_wire(wire)
        .map_err(|e| PathInfoError::Corrupt(key.clone(), Box::new(e)))?;
    // Storage is trusted for nothing: the record must be of the path its
    // key names.
    if info.store_path.hash() != digest {
        return Err(PathInfoError::Corrupt(
            key,
            Box::new(invalid(
                "store_path",
                format!("the record is of {}", info.store_path.hash_part()),
            )),
        ));
    }
    Ok(info)
}

/// Storage of path infos.
#[async_trait::async_trait]
pub trait PathInfoService: Send + Sync {
    /// The info of the path with this digest, if there is one.
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>, PathInfoError>;
    /// Records `info` (replacing an earlier one of the same path); what
    /// was stored.
    async fn put(&self, info: PathInfo) -> Result<PathInfo, PathInfoError>;
    /// Every path info.
    fn list(&self) -> BoxStream<'static, Result<PathInfo, PathInfoError>>;
}

impl PathInfo {
    /// Validates a wire message.
    pub fn try_from_wire(wire: snix_store::PathInfo) -> Result<PathInfo, PathInfoError> {
        let entry = wire.node.ok_or_else(|| invalid("node", "missing"))?;
        let (name, node) = entry
            .try_into_named()
            .map_err(|e| invalid("node", e.to_string()))?;
        let basename = String::from_utf8(name.to_bytes().to_vec())
            .map_err(|_| invalid("node.name", "not UTF-8"))?;
        let store_path = StorePath::from_basename(&basename).map_err(|e| {
            invalid(
                "node.name",
                format!("{basename:?} is not a store path basename: {e}"),
            )
        })?;
        let narinfo = wire.narinfo.ok_or_else(|| invalid("narinfo", "missing"))?;
        let nar_sha256: [u8; 32] = narinfo.nar_sha256.as_ref().try_into().map_err(|_| {
            invalid(
                "narinfo.nar_sha256",
                format!("{} bytes, want 32", narinfo.nar_sha256.len()),
            )
        })?;
        if narinfo.reference_names.len() != wire.references.len() {
            return Err(invalid(
                "narinfo.reference_names",
                format!(
                    "{} names for {} references",
                    narinfo.reference_names.len(),
                    wire.references.len()
                ),
            ));
        }
        let mut references = BTreeSet::new();
        for (i, (digest, name)) in wire
            .references
            .iter()
            .zip(&narinfo.reference_names)
            .enumerate()
        {
            let path = StorePath::from_basename(name)
                .map_err(|e| invalid(format!("narinfo.reference_names[{i}]"), e.to_string()))?;
            if path.hash().as_slice() != digest.as_ref() {
                return Err(invalid(
                    format!("references[{i}]"),
                    format!("does not match the name {name:?}"),
                ));
            }
            references.insert(path);
        }
        let deriver = match narinfo.deriver {
            None => None,
            Some(d) => {
                let digest: [u8; 20] = d
                    .digest
                    .as_ref()
                    .try_into()
                    .map_err(|_| invalid("narinfo.deriver.digest", "want 20 bytes"))?;
                Some(
                    StorePath::from_parts(digest, &format!("{}.drv", d.name))
                        .map_err(|e| invalid("narinfo.deriver.name", e.to_string()))?,
                )
            }
        };
        let ca = match narinfo.ca {
            None => None,
            Some(ca) => Some(ca_from_wire(&ca)?.to_string()),
        };
        Ok(PathInfo {
            store_path,
            node,
            references,
            nar_sha256,
            nar_size: narinfo.nar_size,
            deriver,
            signatures: narinfo
                .signatures
                .into_iter()
                .map(|s| Signature {
                    name: s.name,
                    data: s.data.to_vec(),
                })
                .collect(),
            ca,
        })
    }

    /// The wire message.
    pub fn to_wire(&self) -> snix_store::PathInfo {
        let name = self.store_path.basename();
        let references: Vec<&StorePath> = self.references.iter().collect();
        snix_store::PathInfo {
            node: Some(self.node.to_snix_entry(name.as_bytes())),
            references: references
                .iter()
                .map(|p| bytes::Bytes::copy_from_slice(p.hash()))
                .collect(),
            narinfo: Some(snix_store::NarInfo {
                nar_size: self.nar_size,
                nar_sha256: bytes::Bytes::copy_from_slice(&self.nar_sha256),
                signatures: self
                    .signatures
                    .iter()
                    .map(|s| snix_store::nar_info::Signature {
                        name: s.name.clone(),
                        data: s.data.clone().into(),
                    })
                    .collect(),
                reference_names: references.iter().map(|p| p.basename()).collect(),
                deriver: self.deriver.as_ref().map(|d| snix_store::StorePath {
                    name: d.name().strip_suffix(".drv").unwrap_or(d.name()).to_owned(),
                    digest: bytes::Bytes::copy_from_slice(d.hash()),
                }),
                ca: self.ca.as_deref().and_then(ca_to_wire),
            }),
        }
    }
}

use snix_store::nar_info::ca::Hash as CaHash;

fn ca_to_wire(ca: &str) -> Option<snix_store::nar_info::Ca> {
    let parsed = ContentAddress::parse(ca).ok()?;
    let (kind, hash) = match parsed {
        ContentAddress::Text { hash } => (CaHash::TextSha256, hash),
        ContentAddress::Fixed { method, hash } => {
            let kind = match (method, hash.algorithm()) {
                (Method::Recursive, HashAlgorithm::Sha256) => CaHash::NarSha256,
                (Method::Recursive, HashAlgorithm::Sha1) => CaHash::NarSha1,
                (Method::Recursive, HashAlgorithm::Sha512) => CaHash::NarSha512,
                (Method::Recursive, HashAlgorithm::Md5) => CaHash::NarMd5,
                (Method::Flat, HashAlgorithm::Sha256) => CaHash::FlatSha256,
                (Method::Flat, HashAlgorithm::Sha1) => CaHash::FlatSha1,
                (Method::Flat, HashAlgorithm::Sha512) => CaHash::FlatSha512,
                (Method::Flat, HashAlgorithm::Md5) => CaHash::FlatMd5,
            };
            (kind, hash)
        }
    };
    Some(snix_store::nar_info::Ca {
        r#type: kind as i32,
        digest: bytes::Bytes::copy_from_slice(hash.digest()),
    })
}

fn ca_from_wire(ca: &snix_store::nar_info::Ca) -> Result<ContentAddress, PathInfoError> {
    let kind = CaHash::try_from(ca.r#type)
        .map_err(|_| invalid("narinfo.ca.type", format!("unknown value {}", ca.r#type)))?;
    let (method, algorithm) = match kind {
        CaHash::NarSha256 => (Some(Method::Recursive), HashAlgorithm::Sha256),
        CaHash::NarSha1 => (Some(Method::Recursive), HashAlgorithm::Sha1),
        CaHash::NarSha512 => (Some(Method::Recursive), HashAlgorithm::Sha512),
        CaHash::NarMd5 => (Some(Method::Recursive), HashAlgorithm::Md5),
        CaHash::TextSha256 => (None, HashAlgorithm::Sha256),
        CaHash::FlatMd5 => (Some(Method::Flat), HashAlgorithm::Md5),
        CaHash::FlatSha1 => (Some(Method::Flat), HashAlgorithm::Sha1),
        CaHash::FlatSha256 => (Some(Method::Flat), HashAlgorithm::Sha256),
        CaHash::FlatSha512 => (Some(Method::Flat), HashAlgorithm::Sha512),
    };
    let hash = Hash::from_digest(algorithm, &ca.digest).ok_or_else(|| {
        invalid(
            "narinfo.ca.digest",
            format!("{} bytes for {algorithm}", ca.digest.len()),
        )
    })?;
    Ok(match method {
        None => ContentAddress::Text { hash },
        Some(method) => ContentAddress::Fixed { method, hash },
    })
}

/// Opens the path-info store `address` names: empty or `embedded` for
/// `pathinfo.redb` in `data_dir`, `embedded:/DIR` for one in `DIR`, or a
/// kiln server (`grpc+http(s)://HOST:PORT`, `grpc+unix:/PATH`).
pub async fn from_addr(
    address: &str,
    data_dir: &Path,
    security: &crate::client::ClientSecurity,
) -> Result<Arc<dyn PathInfoService>, FromAddrError> {
    let embedded = |dir: &Path| -> Result<Arc<dyn PathInfoService>, FromAddrError> {
        let path = dir.join("pathinfo.redb");
        Ok(Arc::new(
            redb::RedbPathInfoService::open(&path).map_err(FromAddrError::Open)?,
        ))
    };
    if address.is_empty() || address == "embedded" {
        return embedded(data_dir);
    }
    if let Some(dir) = address.strip_prefix("embedded:") {
        let dir = dir.strip_prefix("//").unwrap_or(dir);
        if !dir.starts_with('/') {
            return Err(FromAddrError::Malformed(address.to_owned()));
        }
        return embedded(Path::new(dir));
    }
    if !(address.starts_with("grpc+http://")
        || address.starts_with("grpc+https://")
        || address.starts_with("grpc+unix:"))
    {
        return Err(FromAddrError::Malformed(address.to_owned()));
    }
    let channel = crate::client::connect(address, security)
        .await
        .map_err(|e| FromAddrError::Connect(address.to_owned(), e))?;
    Ok(Arc::new(grpc::GrpcPathInfoService::new(channel)))
}

/// The path-info store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FromAddrError {
    /// Not an address kiln knows.
    #[error("path-info store address {0:?}: want embedded, embedded:/DIR, grpc+http(s)://HOST:PORT or grpc+unix:/PATH")]
    Malformed(String),
    /// Opening the embedded database failed.
    #[error("opening the embedded path-info store")]
    Open(#[source] PathInfoError),
    /// Connecting failed.
    #[error("connecting to the path-info store {0}")]
    Connect(String, #[source] crate::client::ConnectError),
}

#[cfg(test)]
mod tests;
