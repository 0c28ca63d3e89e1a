//! NAR ("Nix ARchive"): the canonical serialisation Nix hashes store paths by.
//!
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") kind str(")")
//! kind      = str("regular") [str("executable") str("")] str("contents") str(<bytes>)
//!           | str("symlink") str("target") str(<target>)
//!           | str("directory") { str("entry") str("(") str("name") str(<name>)
//!                                str("node") node str(")") }
//! str(s)    = u64 little-endian length of s, s, zero bytes up to a multiple of 8
//! ```
//!
//! Directory entries come sorted bytewise by name, which is how castore
//! directories are ordered too. Files carry no timestamps, owners or
//! permission bits other than "executable".
//!
//! Two producers: [`castore`] streams a castore tree (directories fetched one
//! at a time, file contents copied from the blob store in chunks, so the tree
//! never sits in memory) and [`host`] walks a host path (for tests, and to
//! compare with `nix-store --dump`). Both can write into a [`NarHasher`],
//! which gives the `sha256:<nixbase32>` form `nix-store --query --hash`
//! prints, or hashes with another algorithm for a recursive fixed output.

pub mod castore;
pub mod hash;
pub mod host;
pub mod ingest;

use std::path::PathBuf;

use crate::castore::B3Digest;

pub use castore::{nar_hash, nar_hash_with, write_nar, BlobRead, TreeSource};
pub use hash::{NarHash, NarHasher};
pub use host::{nar_hash_path, write_path_nar};

/// A boxed error from a [`TreeSource`] backend.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Why a NAR could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The tree source failed to return a directory.
    #[error("fetching directory {digest}")]
    FetchDirectory {
        /// The directory's digest.
        digest: B3Digest,
        /// The backend's failure.
        #[source]
        source: SourceError,
    },
    /// The tree refers to a directory the source does not have.
    #[error("directory {0} is not in the store")]
    MissingDirectory(B3Digest),
    /// The tree source failed to open a blob.
    #[error("opening blob {digest}")]
    OpenBlob {
        /// The blob's digest.
        digest: B3Digest,
        /// The backend's failure.
        #[source]
        source: SourceError,
    },
    /// The tree refers to a blob the source does not have.
    #[error("blob {0} is not in the store")]
    MissingBlob(B3Digest),
    /// Reading a blob's contents failed.
    #[error("reading blob {digest}")]
    ReadBlob {
        /// The blob's digest.
        digest: B3Digest,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A blob's length differs from the size its file node claims; the NAR
    /// would be corrupt, so serialisation stops.
    #[error("blob {digest} holds {actual} bytes, its file node says {expected}")]
    BlobSize {
        /// The blob's digest.
        digest: B3Digest,
        /// Size in the file node.
        expected: u64,
        /// Bytes the blob actually holds (at least this many).
        actual: u64,
    },
    /// Writing the NAR to its destination failed.
    #[error("writing the NAR")]
    Write(#[source] std::io::Error),
    /// Reading a host path failed.
    #[error("reading {path}")]
    ReadHost {
        /// The host path.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A host path is neither a regular file, a directory nor a symlink.
    #[error("{0} is not a regular file, directory or symlink")]
    UnsupportedFileType(PathBuf),
}

/// The magic string every NAR starts with.
const MAGIC: &[u8] = b"nix-archive-1";

/// Appends `str(s)`: length, bytes, padding.
fn token(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
    buf.extend_from_slice(padding(s.len() as u64));
}

/// Zero bytes that pad `len` bytes up to a multiple of 8.
fn padding(len: u64) -> &'static [u8] {
    const ZEROES: [u8; 8] = [0; 8];
    let rest = (8 - len % 8) % 8;
    &ZEROES[..rest as usize]
}

/// Appends the header of a regular file, up to and including the length of
/// its contents; the caller writes the contents and [`padding`], then `)`.
fn file_header(buf: &mut Vec<u8>, executable: bool, size: u64) {
    token(buf, b"(");
    token(buf, b"type");
    token(buf, b"regular");
    if executable {
        token(buf, b"executable");
        token(buf, b"");
    }
    token(buf, b"contents");
    buf.extend_from_slice(&size.to_le_bytes());
}

/// Appends a whole symlink node.
fn symlink(buf: &mut Vec<u8>, target: &[u8]) {
    for t in [&b"("[..], b"type", b"symlink", b"target", target, b")"] {
        token(buf, t);
    }
}

/// Appends the opening of a directory node.
fn directory_open(buf: &mut Vec<u8>) {
    for t in [&b"("[..], b"type", b"directory"] {
        token(buf, t);
    }
}

/// Appends the opening of a directory entry, up to where its node starts.
fn entry_open(buf: &mut Vec<u8>, name: &[u8]) {
    for t in [&b"entry"[..], b"(", b"name", name, b"node"] {
        token(buf, t);
    }
}

/// Appends `)`, closing a node or an entry.
fn close(buf: &mut Vec<u8>) {
    token(buf, b")");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn tokens_are_padded_to_eight_bytes() {
        let mut buf = Vec::new();
        token(&mut buf, b"");
        assert_eq!(buf, [0u8; 8]);
        buf.clear();
        token(&mut buf, b"(");
        assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0, b'(', 0, 0, 0, 0, 0, 0, 0]);
        buf.clear();
        token(&mut buf, b"12345678");
        assert_eq!(buf.len(), 16);
    }
}
