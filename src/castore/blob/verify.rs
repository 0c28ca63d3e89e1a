//! [`VerifyingReader`]: passes bytes through and fails at the end of the
//! stream when they do not hash to the expected digest. Used on bytes from
//! remote stores, which kiln does not trust.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::castore::digest::B3Digest;

/// An [`AsyncRead`] that checks the BLAKE3 digest of everything read through
/// it; at end of stream it returns an `InvalidData` error on mismatch.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    expected: B3Digest,
}

impl<R> VerifyingReader<R> {
    /// Wraps `inner`, expecting its bytes to hash to `expected`.
    pub fn new(inner: R, expected: B3Digest) -> Self {
        VerifyingReader {
            inner,
            hasher: blake3::Hasher::new(),
            expected,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        // A full buffer reads nothing without meaning end of stream.
        let at_end_if_empty = buf.remaining() > 0;
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if !fresh.is_empty() || !at_end_if_empty {
                    this.hasher.update(fresh);
                    return Poll::Ready(Ok(()));
                }
                let got = B3Digest::from(this.hasher.finalize());
                if got == this.expected {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("blob {} arrived with digest {got}", this.expected),
                    )))
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn passes_matching_bytes_and_refuses_others() {
        let data = b"hello castore".to_vec();
        let mut ok = VerifyingReader::new(&data[..], B3Digest::of(&data));
        let mut out = Vec::new();
        ok.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);

        let mut bad = VerifyingReader::new(&data[..], B3Digest::of(b"other"));
        let err = bad.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
