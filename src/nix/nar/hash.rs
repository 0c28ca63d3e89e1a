//! [`NarHash`] and [`NarHasher`]: SHA-256 and length of a NAR, computed on
//! the fly by writing the NAR into the hasher instead of into memory.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

use crate::nix::nixbase32;

/// The SHA-256 digest and byte length of a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarHash {
    /// SHA-256 of the NAR bytes.
    pub sha256: [u8; 32],
    /// Length of the NAR in bytes.
    pub size: u64,
}

impl NarHash {
    /// The digest in nixbase32, as `nix-hash --type sha256 --base32` prints it.
    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(&self.sha256)
    }

    /// The digest in lowercase hex, as `nix-store --dump | sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// `sha256:<nixbase32>`, the form `nix-store --query --hash` prints.
impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nixbase32())
    }
}

/// A sink that hashes and counts what is written to it. Implements both
/// [`std::io::Write`] and [`tokio::io::AsyncWrite`]; it never blocks.
#[derive(Debug, Clone, Default)]
pub struct NarHasher {
    sha256: Sha256,
    size: u64,
}

impl NarHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        self.size += data.len() as u64;
    }

    /// The hash and length of everything fed so far.
    pub fn finish(self) -> NarHash {
        NarHash {
            sha256: self.sha256.finalize().into(),
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
