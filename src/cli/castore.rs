//! `kiln castore import PATH` and `kiln castore export NODE DIR`: move trees
//! in and out of a castore, normally a running `kiln serve` (`--addr`).
//!
//! A node is printed and parsed as one line of text:
//! `directory:<hex>:<size>`, `file:<hex>:<size>`, `file:<hex>:<size>:executable`
//! or `symlink:<target>`. `export` also takes `directory:<hex>` or a bare
//! `<hex>` for a directory (its size does not matter for exporting), and `x`
//! for `executable`.

use std::path::Path;

use crate::castore::from_addr::{from_addr_with, FromAddrError};
use crate::castore::ingest::IngestError;
use crate::castore::materialise::MaterialiseError;
use crate::castore::{
    ingest, materialise, B3Digest, IngestMode, Node, SymlinkTarget, ValidationError,
};
use crate::client::ClientSecurity;

/// A castore subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CastoreCliError {
    /// The address names a store the CLI cannot use on its own.
    #[error("--addr {0:?}: the castore commands need a server address (grpc+http://HOST:PORT, grpc+unix:PATH) or embedded:/DIR")]
    NoStore(String),
    /// Opening the store failed.
    #[error("opening castore")]
    Open(#[source] FromAddrError),
    /// The node text does not parse.
    #[error("node {text:?}: {problem} (want directory:HEX[:SIZE], file:HEX:SIZE[:executable], symlink:TARGET or HEX)")]
    ParseNode {
        /// The text given.
        text: String,
        /// What is wrong.
        problem: String,
    },
    /// A digest or target in the node text breaks a castore rule.
    #[error("node {text:?}")]
    InvalidNode {
        /// The text given.
        text: String,
        /// The rule broken.
        #[source]
        source: ValidationError,
    },
    /// Importing failed.
    #[error("importing")]
    Import(#[source] IngestError),
    /// Exporting failed.
    #[error("exporting")]
    Export(#[source] MaterialiseError),
}

/// Imports the tree at `path` (copying, the tree is untouched) into the store
/// at `addr` (reached with `security`) and prints its node.
pub async fn import(
    addr: &str,
    security: &ClientSecurity,
    path: &Path,
) -> Result<(), CastoreCliError> {
    let store = open(addr, security).await?;
    let node = ingest(&store, path, IngestMode::Copy)
        .await
        .map_err(CastoreCliError::Import)?;
    println!("{}", format_node(&node));
    Ok(())
}

/// Writes `node` (in the text form of [`format_node`]) from the store at
/// `addr` (reached with `security`) to `dir`, which must not exist yet, and
/// prints `dir`.
pub async fn export(
    addr: &str,
    security: &ClientSecurity,
    node: &str,
    dir: &Path,
) -> Result<(), CastoreCliError> {
    let node = parse_node(node)?;
    let store = open(addr, security).await?;
    materialise(&store, &node, dir)
        .await
        .map_err(CastoreCliError::Export)?;
    println!("{}", dir.display());
    Ok(())
}

async fn open(
    addr: &str,
    security: &ClientSecurity,
) -> Result<crate::castore::Store, CastoreCliError> {
    let addr = if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("grpc+{addr}")
    } else {
        addr.to_owned()
    };
    if addr.is_empty() || addr == "embedded" {
        return Err(CastoreCliError::NoStore(addr));
    }
    // Only `embedded:/DIR` reaches the data dir argument, which it ignores.
    from_addr_with(&addr, Path::new("/nonexistent"), security)
        .await
        .map_err(CastoreCliError::Open)
}

/// The one-line text form of a node.
pub fn format_node(node: &Node) -> String {
    match node {
        Node::Directory { digest, size } => format!("directory:{digest}:{size}"),
        Node::File {
            digest,
            size,
            executable: false,
        } => format!("file:{digest}:{size}"),
        Node::File {
            digest,
            size,
            executable: true,
        } => format!("file:{digest}:{size}:executable"),
        Node::Symlink { target } => {
            format!("symlink:{}", String::from_utf8_lossy(target.as_bytes()))
        }
    }
}

/// Parses the text form of [`format_node`] and the shorthands of the module docs.
pub fn parse_node(text: &str) -> Result<Node, CastoreCliError> {
    let problem = |problem: &str| CastoreCliError::ParseNode {
        text: text.to_owned(),
        problem: problem.to_owned(),
    };
    let invalid = |source| CastoreCliError::InvalidNode {
        text: text.to_owned(),
        source,
    };
    if let Some(target) = text.strip_prefix("symlink:") {
        let target = SymlinkTarget::try_from(target.as_bytes()).map_err(invalid)?;
        return Ok(Node::Symlink { target });
    }
    let parts: Vec<&str> = text.split(':').collect();
    let digest = |hex: &str| {
        hex.parse::<B3Digest>()
            .map_err(|e| invalid(e.within("digest")))
    };
    let size = |size: &str| {
        size.parse::<u64>()
            .map_err(|_| problem("size is not a number"))
    };
    match parts.as_slice() {
        [hex] => Ok(Node::Directory {
            digest: digest(hex)?,
            size: 0,
        }),
        ["directory", hex] => Ok(Node::Directory {
            digest: digest(hex)?,
            size: 0,
        }),
        ["directory", hex, bytes] => Ok(Node::Directory {
            digest: digest(hex)?,
            size: size(bytes)?,
        }),
        ["file", hex, bytes] => Ok(Node::File {
            digest: digest(hex)?,
            size: size(bytes)?,
            executable: false,
        }),
        ["file", hex, bytes, "executable" | "x"] => Ok(Node::File {
            digest: digest(hex)?,
            size: size(bytes)?,
            executable: true,
        }),
        _ => Err(problem("unknown form")),
    }
}
