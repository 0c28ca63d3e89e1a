//! The worker protocol's primitive encoding, both directions.
//!
//! ```text
//! u64      = 8 bytes, little-endian
//! bool     = u64, 0 false, anything else true
//! bytes    = u64 length, the bytes, zero bytes up to a multiple of 8
//! list(T)  = u64 count, count × T
//! framed   = { u64 length (> 0), length bytes } u64 0
//! ```
//!
//! Everything the client sends is bounded before it is allocated: a string
//! by the limit its caller passes (a store path is short, an environment
//! value may be long), a list by [`MAX_LIST`] entries, a frame by
//! [`MAX_FRAME`] bytes.
//!
//! [`WireReader`] reads from any [`AsyncRead`]; [`FramedReader`] turns a
//! framed stream back into a byte stream (a NAR inside `AddToStoreNar`, the
//! path infos and NARs of `AddMultipleToStore`). [`Frame`] builds what the
//! daemon sends into a buffer that is written and flushed at once.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Longest store path string accepted (`/nix/store/` + 32 + `-` + 211).
pub const MAX_PATH: usize = 256;
/// Longest ordinary string (a setting, a hash, an output name, a message).
pub const MAX_SHORT: usize = 64 * 1024;
/// Longest string that may carry user data (an environment value, a
/// builder argument, the text of a `.drv` file added as text).
pub const MAX_LONG: usize = 64 * 1024 * 1024;
/// Most entries of one list or map (paths, settings, environment).
pub const MAX_LIST: u64 = 1 << 20;
/// Largest frame of a framed stream (Nix sends at most 32 KiB).
pub const MAX_FRAME: u64 = 16 << 20;

/// Reading the client's bytes failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended inside a value.
    #[error("the client's stream ended inside {0}")]
    Truncated(&'static str),
    /// Reading failed.
    #[error("reading {what}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A length is larger than kiln accepts there.
    #[error("{what} is {len} long, more than the {max} kiln accepts")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length the client sent.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Padding after a string is not zero.
    #[error("non-zero padding after {0}")]
    Padding(&'static str),
    /// A string that must be text is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

impl WireError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated(what)
        } else {
            WireError::Io { what, source }
        }
    }
}

/// Reads the worker protocol's values from `R`.
pub struct WireReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin + Send> WireReader<R> {
    /// Reads from `inner` (give it a buffered reader: values are small).
    pub fn new(inner: R) -> Self {
        WireReader { inner }
    }

    /// The underlying reader, for byte streams inside the protocol (a NAR
    /// after `AddToStore` of old clients, a framed stream).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next u64, or `None` at a clean end of stream (between requests).
    pub async fn try_u64(&mut self) -> Result<Option<u64>, WireError> {
        let mut buf = [0u8; 8];
        let mut filled = 0;
        while filled < 8 {
            let n = self
                .inner
                .read(&mut buf[filled..])
                .await
                .map_err(|e| WireError::io("an operation", e))?;
            if n == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(WireError::Truncated("an operation"))
                };
            }
            filled += n;
        }
        Ok(Some(u64::from_le_bytes(buf)))
    }

    /// A u64.
    pub async fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut buf = [0u8; 8];
        self.inner
            .read_exact(&mut buf)
            .await
            .map_err(|e| WireError::io(what, e))?;
        Ok(u64::from_le_bytes(buf))
    }

    /// A bool.
    pub async fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        Ok(self.u64(what).await? != 0)
    }

    /// A byte string of at most `max` bytes.
    pub async fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
        let len = self.u64(what).await?;
        if len > max as u64 {
            return Err(WireError::TooLong {
                what,
                len,
                max: max as u64,
            });
        }
        // Bounded by `max` above.
        let len = len as usize;
        let mut data = vec![0u8; len];
        self.inner
            .read_exact(&mut data)
            .await
            .map_err(|e| WireError::io(what, e))?;
        let pad = (8 - len % 8) % 8;
        let mut padding = [0u8; 8];
        self.inner
            .read_exact(&mut padding[..pad])
            .await
            .map_err(|e| WireError::io(what, e))?;
        if padding.iter().any(|b| *b != 0) {
            return Err(WireError::Padding(what));
        }
        Ok(data)
    }

    /// A UTF-8 string of at most `max` bytes.
    pub async fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        String::from_utf8(self.bytes(what, max).await?).map_err(|_| WireError::NotUtf8(what))
    }

    /// A list count, at most [`MAX_LIST`].
    pub async fn count(&mut self, what: &'static str) -> Result<u64, WireError> {
        let n = self.u64(what).await?;
        if n > MAX_LIST {
            return Err(WireError::TooLong {
                what,
                len: n,
                max: MAX_LIST,
            });
        }
        Ok(n)
    }

    /// A list of UTF-8 strings, each at most `max` bytes.
    pub async fn strings(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<String>, WireError> {
        let n = self.count(what).await?;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.string(what, max).await?);
        }
        Ok(out)
    }

    /// A map of UTF-8 strings to UTF-8 strings.
    pub async fn string_pairs(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<(String, String)>, WireError> {
        let n = self.count(what).await?;
        let mut out = Vec::new();
        for _ in 0..n {
            let key = self.string(what, MAX_SHORT).await?;
            let value = self.string(what, max).await?;
            out.push((key, value));
        }
        Ok(out)
    }
}

/// Builds bytes for the client; `Frame::new().u64(…).string(…).into_bytes()`.
#[derive(Default, Debug, Clone)]
pub struct Frame {
    buf: Vec<u8>,
}

impl Frame {
    /// An empty buffer.
    pub fn new() -> Self {
        Frame::default()
    }

    /// Appends a u64.
    pub fn u64(mut self, n: u64) -> Self {
        self.buf.extend_from_slice(&n.to_le_bytes());
        self
    }

    /// Appends a bool.
    pub fn bool(self, b: bool) -> Self {
        self.u64(u64::from(b))
    }

    /// Appends a byte string with its padding.
    pub fn bytes(mut self, data: &[u8]) -> Self {
        self.buf
            .extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(data);
        let pad = (8 - data.len() % 8) % 8;
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
        self
    }

    /// Appends a string.
    pub fn string(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    /// Appends a list of strings.
    pub fn strings<I, S>(self, items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<str>,
    {
        let items = items.into_iter();
        let mut frame = self.u64(items.len() as u64);
        for item in items {
            frame = frame.string(item.as_ref());
        }
        frame
    }

    /// The bytes built.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes built so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The byte stream carried in a framed stream; reads end (0) at the empty
/// frame that terminates it. [`FramedReader::drain`] skips what is left, so
/// that the next request starts where it should even after a failure.
pub struct FramedReader<'a, R> {
    inner: &'a mut R,
    /// Bytes left in the current frame.
    left: u64,
    /// The length word being read, and how much of it has arrived.
    header: [u8; 8],
    header_filled: usize,
    done: bool,
}

impl<'a, R: AsyncRead + Unpin + Send> FramedReader<'a, R> {
    /// Reads the framed stream that starts now on `inner`.
    pub fn new(inner: &'a mut R) -> Self {
        FramedReader {
            inner,
            left: 0,
            header: [0; 8],
            header_filled: 0,
            done: false,
        }
    }

    /// Whether the terminating empty frame has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Reads and discards the rest of the stream, up to its terminator.
    pub async fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 8192];
        while !self.done {
            if self.read(&mut sink).await? == 0 && !self.done {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin + Send> AsyncRead for FramedReader<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.left > 0 {
                let want = usize::try_from(this.left)
                    .unwrap_or(usize::MAX)
                    .min(buf.remaining());
                let mut limited = buf.take(want);
                ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut limited))?;
                let n = limited.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client's stream ended inside a frame",
                    )));
                }
                // SAFETY: `limited` is a view of `buf`'s unfilled part and
                // its first `n` bytes were just initialised by the read.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.left -= n as u64;
                return Poll::Ready(Ok(()));
            }
            // Between frames: read the next length word.
            let mut header = ReadBuf::new(&mut this.header[this.header_filled..]);
            ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut header))?;
            let n = header.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client's stream ended before the end of a framed stream",
                )));
            }
            this.header_filled += n;
            if this.header_filled < 8 {
                continue;
            }
            this.header_filled = 0;
            let len = u64::from_le_bytes(this.header);
            if len == 0 {
                this.done = true;
            } else if len > MAX_FRAME {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a frame of {len} bytes, more than the {MAX_FRAME} kiln accepts"),
                )));
            } else {
                this.left = len;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> WireReader<&[u8]> {
        WireReader::new(bytes)
    }

    #[tokio::test]
    async fn strings_are_padded_to_eight_bytes() {
        let bytes = Frame::new().string("hello").u64(7).into_bytes();
        assert_eq!(bytes.len(), 8 + 8 + 8);
        assert_eq!(&bytes[..8], &5u64.to_le_bytes());
        assert_eq!(&bytes[8..16], b"hello\0\0\0");
        let mut r = reader(&bytes);
        assert_eq!(r.string("s", 16).await.unwrap(), "hello");
        assert_eq!(r.u64("n").await.unwrap(), 7);
        assert_eq!(r.try_u64().await.unwrap(), None);
    }

    #[tokio::test]
    async fn empty_and_aligned_strings_have_no_padding() {
        let bytes = Frame::new().string("").string("12345678").into_bytes();
        assert_eq!(bytes.len(), 8 + 8 + 8);
        let mut r = reader(&bytes);
        assert_eq!(r.string("a", 16).await.unwrap(), "");
        assert_eq!(r.string("b", 16).await.unwrap(), "12345678");
    }

    #[tokio::test]
    async fn a_long_string_is_refused_before_allocation() {
        let bytes = u64::MAX.to_le_bytes();
        let err = reader(&bytes).string("a path", MAX_PATH).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLong { what: "a path", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn non_zero_padding_is_refused() {
        let mut bytes = Frame::new().string("abc").into_bytes();
        bytes[12] = 1;
        let err = reader(&bytes).string("s", 16).await.unwrap_err();
        assert!(matches!(err, WireError::Padding("s")), "{err}");
    }

    #[tokio::test]
    async fn truncation_is_named() {
        let bytes = Frame::new().string("abcdefghij").into_bytes();
        let err = reader(&bytes[..12]).string("s", 16).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated("s")), "{err}");
        let err = reader(&bytes[..3]).try_u64().await.unwrap_err();
        assert!(matches!(err, WireError::Truncated(_)), "{err}");
    }

    #[tokio::test]
    async fn a_huge_list_is_refused() {
        let bytes = (MAX_LIST + 1).to_le_bytes();
        let err = reader(&bytes).strings("paths", MAX_PATH).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLong { what: "paths", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn framed_streams_end_at_the_empty_frame() {
        let mut bytes = Vec::new();
        for chunk in [&b"hello "[..], b"framed ", b"world"] {
            bytes.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
            bytes.extend_from_slice(chunk);
        }
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&42u64.to_le_bytes());
        let mut inner: &[u8] = &bytes;
        let mut framed = FramedReader::new(&mut inner);
        let mut out = Vec::new();
        framed.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello framed world");
        assert!(framed.is_done());
        let mut rest = WireReader::new(inner);
        assert_eq!(rest.u64("next").await.unwrap(), 42);
    }

    #[tokio::test]
    async fn draining_skips_to_the_terminator() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&9u64.to_le_bytes());
        let mut inner: &[u8] = &bytes;
        let mut framed = FramedReader::new(&mut inner);
        let mut one = [0u8; 1];
        framed.read_exact(&mut one).await.unwrap();
        framed.drain().await.unwrap();
        assert_eq!(WireReader::new(inner).u64("next").await.unwrap(), 9);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let bytes = (MAX_FRAME + 1).to_le_bytes();
        let mut inner: &[u8] = &bytes;
        let mut framed = FramedReader::new(&mut inner);
        let err = framed.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_eof() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&10u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        let mut inner: &[u8] = &bytes;
        let mut framed = FramedReader::new(&mut inner);
        let err = framed.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
