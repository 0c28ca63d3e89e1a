//! The result cache: a request that already succeeded for the same tenant
//! is answered from its recorded result, without a VM, while every output
//! it recorded is still in the tenant's view of the store.
//!
//! The key is BLAKE3 over a canonical encoding of the tenant and of every
//! field of the validated request that affects the build: inputs, command,
//! `argv0`, directories, outputs, environment, constraints, additional
//! files and reference-scan needles, each length-prefixed in a fixed order.
//! Not in it: how the answer is shaped (the request's layout, which the hit
//! answers in), the client's limits (a build that succeeded within them
//! did not need more), and the server's guest kernel and VMM (builds are
//! meant to be reproducible; an operator who changes the guest and doubts
//! it runs `kiln serve --no-result-cache` or removes `results.redb`, or
//! the `results` table's rows when the records are in the shared database).
//!
//! Only successes are recorded. A client asks to build anyway with the
//! request header `x-kiln-result-cache: bypass` (`kiln build --rebuild`);
//! a bypassed build that succeeds records its result over the old one.

mod store;

use std::path::Path;

use futures::TryStreamExt;
use kiln_guest::contract::Report;
use serde::{Deserialize, Serialize};

use self::store::Records;

use crate::castore::{B3Digest, Node, Store, SymlinkTarget};
use crate::db::{Database, DbError};
use crate::executor::paths::RelPath;
use crate::executor::request::BuildRequest;
use crate::executor::BuiltOutput;
use crate::tenant::Tenant;

/// The request header a client sets to `bypass` to build even when a
/// recorded result would answer.
pub const BYPASS_HEADER: &str = "x-kiln-result-cache";

/// Its value that bypasses the cache.
pub const BYPASS: &str = "bypass";

/// Its value on a `DoBuild` answer the cache gave (the response header).
pub const HIT: &str = "hit";

/// The cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The embedded database failed.
    #[error("the result cache {what}")]
    Embedded {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<redb::Error>,
    },
    /// The shared PostgreSQL database failed.
    #[error("the result cache's table")]
    Postgres(#[source] DbError),
}

impl CacheError {
    /// The error and its causes, on one line.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// The recorded results of one server (`<data dir>/results.redb`) or of
/// several sharing a database. Cheap to clone.
#[derive(Clone)]
pub struct ResultCache {
    records: Records,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.records {
            Records::Redb(_) => f.write_str("ResultCache(redb)"),
            Records::Postgres(db) => write!(f, "ResultCache({db:?})"),
        }
    }
}

/// What a hit answers with.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The build that produced it.
    pub build_id: String,
    /// When it finished, seconds since the Unix epoch.
    pub built_at_unix: u64,
    /// Its outputs, in request order.
    pub outputs: Vec<BuiltOutput>,
    /// Its agent's report (timings of the original build).
    pub report: Report,
}

/// A request's key in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl ResultCache {
    /// Opens (or creates) the cache at `path`.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        Records::open(path).map(|records| Self { records })
    }

    /// A cache in memory (tests).
    pub fn in_memory() -> Result<Self, CacheError> {
        Records::in_memory().map(|records| Self { records })
    }

    /// The cache in the shared database `db` (migrated by
    /// [`Database::connect`]).
    pub fn postgres(db: Database) -> Self {
        Self {
            records: Records::Postgres(db),
        }
    }

    /// The recorded result for `key`, if there is one and every output is
    /// still whole in `store` (the tenant's view).
    pub async fn lookup(
        &self,
        key: CacheKey,
        store: &Store,
    ) -> Result<Option<Recorded>, CacheError> {
        let bytes = self.records.read(key).await?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        // A record this version cannot read is a miss; the build that
        // follows records over it.
        let Some(recorded) = decode(&bytes) else {
            return Ok(None);
        };
        for output in &recorded.outputs {
            if !whole(store, &output.node).await {
                return Ok(None);
            }
        }
        Ok(Some(recorded))
    }

    /// Records `result` for `key`, over any earlier one.
    pub async fn record(&self, key: CacheKey, result: &Recorded) -> Result<(), CacheError> {
        self.records.write(key, encode(result)).await
    }
}

/// Whether `node`'s whole tree is in `store`: every directory and every
/// file's blob.
async fn whole(store: &Store, node: &Node) -> bool {
    match node {
        Node::Symlink { .. } => true,
        Node::File { digest, .. } => store.blobs.has(digest).await.unwrap_or(false),
        Node::Directory { digest, .. } => {
            let directories: Result<Vec<_>, _> =
                store.directories.get_recursive(digest).try_collect().await;
            let Ok(directories) = directories else {
                return false;
            };
            if directories.is_empty() {
                return false;
            }
            for directory in &directories {
                for (_, child) in directory.nodes() {
                    if let Node::File { digest, .. } = child {
                        if !store.blobs.has(digest).await.unwrap_or(false) {
                            return false;
                        }
                    }
                }
            }
            true
        }
    }
}

/// The key of `req` for `tenant`.
pub fn key(tenant: &Tenant, req: &BuildRequest) -> CacheKey {
    let mut h = Canonical(blake3::Hasher::new_derive_key(
        "kiln result cache 2026-12 request key",
    ));
    h.bytes(tenant.as_str().as_bytes());
    h.count(req.inputs.len());
    for (name, node) in &req.inputs {
        h.bytes(name.as_bytes());
        h.node(node);
    }
    h.strings(&req.command_args);
    match &req.argv0 {
        Some(argv0) => {
            h.count(1);
            h.bytes(argv0.as_bytes());
        }
        None => h.count(0),
    }
    h.path(&req.working_dir);
    h.paths(&req.scratch_paths);
    h.path(&req.inputs_dir);
    h.paths(&req.outputs);
    h.count(req.environment_vars.len());
    for var in &req.environment_vars {
        h.bytes(var.key.as_bytes());
        h.bytes(&var.value);
    }
    let c = &req.constraints;
    h.bytes(c.system.as_bytes());
    h.count(c.min_memory as usize);
    h.count(c.available_ro_paths.len());
    for path in &c.available_ro_paths {
        h.bytes(path.as_str().as_bytes());
    }
    h.count(usize::from(c.network_access));
    h.count(usize::from(c.provide_bin_sh));
    h.count(req.additional_files.len());
    for file in &req.additional_files {
        h.path(&file.path);
        h.bytes(&file.contents);
    }
    h.strings(&req.refscan_needles);
    CacheKey(*h.0.finalize().as_bytes())
}

/// Writes values so that no two different sequences write the same bytes:
/// every variable-length value is preceded by its length.
struct Canonical(blake3::Hasher);

impl Canonical {
    fn count(&mut self, n: usize) {
        self.0.update(&(n as u64).to_le_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.update(bytes);
    }

    fn strings(&mut self, strings: &[String]) {
        self.count(strings.len());
        for s in strings {
            self.bytes(s.as_bytes());
        }
    }

    fn path(&mut self, path: &RelPath) {
        self.bytes(path.as_str().as_bytes());
    }

    fn paths(&mut self, paths: &[RelPath]) {
        self.count(paths.len());
        for p in paths {
            self.path(p);
        }
    }

    fn node(&mut self, node: &Node) {
        match node {
            Node::Directory { digest, size } => {
                self.count(1);
                self.0.update(digest.as_bytes());
                self.count(*size as usize);
            }
            Node::File {
                digest,
                size,
                executable,
            } => {
                self.count(2);
                self.0.update(digest.as_bytes());
                self.count(*size as usize);
                self.count(usize::from(*executable));
            }
            Node::Symlink { target } => {
                self.count(3);
                self.bytes(target.as_bytes());
            }
        }
    }
}

/// A record as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    build_id: String,
    built_at_unix: u64,
    outputs: Vec<StoredOutput>,
    report: Report,
}

#[derive(Serialize, Deserialize)]
struct StoredOutput {
    path: String,
    node: StoredNode,
    needles: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StoredNode {
    Directory {
        digest: String,
        size: u64,
    },
    File {
        digest: String,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Vec<u8>,
    },
}

fn encode(result: &Recorded) -> Vec<u8> {
    let outputs = result
        .outputs
        .iter()
        .map(|o| StoredOutput {
            path: o.path.as_str().to_owned(),
            node: match &o.node {
                Node::Directory { digest, size } => StoredNode::Directory {
                    digest: digest.to_hex(),
                    size: *size,
                },
                Node::File {
                    digest,
                    size,
                    executable,
                } => StoredNode::File {
                    digest: digest.to_hex(),
                    size: *size,
                    executable: *executable,
                },
                Node::Symlink { target } => StoredNode::Symlink {
                    target: target.as_bytes().to_vec(),
                },
            },
            needles: o.needles.clone(),
        })
        .collect();
    let stored = Stored {
        build_id: result.build_id.clone(),
        built_at_unix: result.built_at_unix,
        outputs,
        report: result.report.clone(),
    };
    // Serialising plain data into a Vec cannot fail.
    serde_json::to_vec(&stored).unwrap_or_default()
}

/// A stored record, every value checked again (the file is kiln's own, but
/// a record is still only data).
fn decode(bytes: &[u8]) -> Option<Recorded> {
    let stored: Stored = serde_json::from_slice(bytes).ok()?;
    let mut outputs = Vec::with_capacity(stored.outputs.len());
    for o in stored.outputs {
        let node = match o.node {
            StoredNode::Directory { digest, size } => Node::Directory {
                digest: digest.parse::<B3Digest>().ok()?,
                size,
            },
            StoredNode::File {
                digest,
                size,
                executable,
            } => Node::File {
                digest: digest.parse::<B3Digest>().ok()?,
                size,
                executable,
            },
            StoredNode::Symlink { target } => Node::Symlink {
                target: SymlinkTarget::try_from(target.as_slice()).ok()?,
            },
        };
        outputs.push(BuiltOutput {
            path: RelPath::parse(&o.path).ok()?,
            node,
            needles: o.needles,
        });
    }
    Some(Recorded {
        build_id: stored.build_id,
        built_at_unix: stored.built_at_unix,
        outputs,
        report: stored.report,
    })
}

#[cfg(test)]
mod tests;
