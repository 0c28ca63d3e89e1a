//! [`NarHash`] and [`NarHasher`]: digest and length of a NAR, computed on
//! the fly by writing the NAR into the hasher instead of into memory. The
//! store's NAR hashes are SHA-256; a recursive fixed output may declare any
//! of Nix's algorithms, so the hasher takes one.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::nix::hash::{Hash, HashAlgorithm, Hasher};

/// The digest and byte length of a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarHash {
    /// Digest of the NAR bytes; SHA-256 unless asked otherwise.
    pub hash: Hash,
    /// Length of the NAR in bytes.
    pub size: u64,
}

impl NarHash {
    /// The digest in nixbase32, as `nix-hash --type sha256 --base32` prints it.
    pub fn to_nixbase32(&self) -> String {
        self.hash.to_nixbase32()
    }

    /// The digest in lowercase hex, as `nix-store --dump | sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        self.hash.to_base16()
    }
}

/// `<algorithm>:<nixbase32>`, the form `nix-store --query --hash` prints
/// (`sha256:…`).
impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hash.algorithm(), self.to_nixbase32())
    }
}

/// A sink that hashes and counts what is written to it. Implements both
/// [`std::io::Write`] and [`tokio::io::AsyncWrite`]; it never blocks.
#[derive(Debug, Clone)]
pub struct NarHasher {
    hasher: Hasher,
    size: u64,
}

impl Default for NarHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl NarHasher {
    /// A SHA-256 hasher that has seen nothing, for the store's NAR hash.
    pub fn new() -> Self {
        Self::with_algorithm(HashAlgorithm::Sha256)
    }

    /// A hasher for `algorithm` that has seen nothing.
    pub fn with_algorithm(algorithm: HashAlgorithm) -> Self {
        Self {
            hasher: Hasher::new(algorithm),
            size: 0,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
    }

    /// The hash and length of everything fed so far.
    pub fn finish(self) -> NarHash {
        NarHash {
            hash: self.hasher.finish(),
            size: self.size,
        }
    }
}

impl io::Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl tokio::io::AsyncWrite for NarHasher {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().update(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn prints_like_nix() {
        let hash = NarHasher::new().finish();
        assert_eq!(hash.size, 0);
        assert_eq!(
            hash.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            hash.to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
