//! Lets gRPC C-core clients (Python grpcio, C++, Ruby, …) use kiln's unix
//! socket.
//!
//! Those clients send the socket path as HTTP/2 `:authority` (percent-
//! encoded, `tmp%2Fkiln.sock`, or raw with `grpc.default_authority`). That
//! is not a valid URI authority, and h2 resets such a stream with
//! PROTOCOL_ERROR before kiln sees it; neither hyper nor h2 has an option
//! to accept it. [`AuthorityFix`] sits between the plaintext unix socket and
//! hyper and rewrites, in the client's HEADERS/CONTINUATION frames only, an
//! invalid `:authority` value into a valid one (see [`super::hpack`]). kiln
//! never reads the authority of a unix connection, so nothing is lost.
//!
//! Everything else passes unchanged. Anything unexpected (not HTTP/2, a
//! malformed block, a block over [`MAX_BLOCK`]) switches the connection to
//! plain pass-through: h2 then judges the bytes as it would without this
//! adapter.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;
use tonic::transport::server::Connected;

use super::hpack::Rewriter;

/// The client connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HPACK table size the server starts with (SETTINGS_HEADER_TABLE_SIZE).
const TABLE_SIZE: usize = 4096;
/// Largest header block (all its frames) that is rewritten.
pub const MAX_BLOCK: usize = 256 * 1024;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Where the client-to-server byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preface,
    FrameHeader,
    /// Inside a frame that is copied as it arrives: bytes still to copy.
    Copying(usize),
    PassThrough,
}

/// A header block being collected, frame by frame.
#[derive(Debug, Default)]
struct Block {
    /// The frames as received, for when the block is passed on unchanged.
    raw: Vec<u8>,
    /// HEADERS flags and stream id.
    flags: u8,
    stream: [u8; 4],
    /// The priority fields, if the HEADERS frame had them.
    priority: Option<[u8; 5]>,
    /// The fragments, concatenated, and each one's length.
    fragment: Vec<u8>,
    lengths: Vec<usize>,
}

/// A unix connection whose client header blocks get a valid `:authority`.
pub struct AuthorityFix<T> {
    inner: T,
    stage: Stage,
    /// Received, not yet processed.
    input: BytesMut,
    /// Processed, to be handed to hyper.
    output: BytesMut,
    block: Option<Block>,
    hpack: Rewriter,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    /// Wraps a fresh connection; unless `enabled` (plaintext), it only
    /// passes bytes through.
    pub fn new(inner: T, enabled: bool) -> Self {
        Self {
            inner,
            stage: if enabled {
                Stage::Preface
            } else {
                Stage::PassThrough
            },
            input: BytesMut::new(),
            output: BytesMut::new(),
            block: None,
            hpack: Rewriter::new(TABLE_SIZE),
            eof: false,
        }
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) {
        loop {
            let progressed = match self.stage {
                Stage::PassThrough => {
                    let rest = self.input.split();
                    self.output.unsplit(rest);
                    false
                }
                Stage::Preface => self.preface(),
                Stage::Copying(left) => {
                    let n = left.min(self.input.len());
                    let chunk = self.input.split_to(n);
                    self.output.unsplit(chunk);
                    self.stage = if n == left {
                        Stage::FrameHeader
                    } else {
                        Stage::Copying(left - n)
                    };
                    // An empty frame (SETTINGS ack) is done at once.
                    n > 0 || n == left
                }
                Stage::FrameHeader => self.frame(),
            };
            if !progressed {
                return;
            }
        }
    }

    fn preface(&mut self) -> bool {
        let n = self.input.len().min(PREFACE.len());
        if self.input[..n] != PREFACE[..n] {
            self.pass_through();
            return true;
        }
        if n < PREFACE.len() {
            return false;
        }
        let preface = self.input.split_to(n);
        self.output.unsplit(preface);
        self.stage = Stage::FrameHeader;
        true
    }

    /// Handles one frame whose header is at the start of `input`.
    fn frame(&mut self) -> bool {
        if self.input.len() < 9 {
            return false;
        }
        let len = usize::from(self.input[0]) << 16
            | usize::from(self.input[1]) << 8
            | usize::from(self.input[2]);
        let kind = self.input[3];
        let in_block = self.block.is_some();
        let header_frame = kind == HEADERS && !in_block || kind == CONTINUATION && in_block;
        if !header_frame {
            if in_block || kind == CONTINUATION {
                // Not HTTP/2 as h2 accepts it: let h2 say so.
                self.pass_through();
                return true;
            }
            let header = self.input.split_to(9);
            self.output.unsplit(header);
            self.stage = Stage::Copying(len);
            return true;
        }
        let collected = self.block.as_ref().map_or(0, |b| b.raw.len());
        if collected + 9 + len > MAX_BLOCK {
            self.pass_through();
            return true;
        }
        if self.input.len() < 9 + len {
            return false;
        }
        let frame = self.input.split_to(9 + len);
        if self.add_to_block(&frame).is_none() {
            self.pass_through();
        }
        true
    }

    /// Adds a HEADERS or CONTINUATION frame to the block; emits the block
    /// once complete. `None` if the frame is malformed.
    fn add_to_block(&mut self, frame: &[u8]) -> Option<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let mut payload = &frame[9..];
        let block = self.block.get_or_insert_with(Block::default);
        block.raw.extend_from_slice(frame);
        if kind == HEADERS {
            block.flags = flags;
            block.stream.copy_from_slice(&frame[5..9]);
            if flags & PADDED != 0 {
                let (&pad, rest) = payload.split_first()?;
                payload = rest.get(..rest.len().checked_sub(usize::from(pad))?)?;
            }
            if flags & PRIORITY != 0 {
                let (fields, rest) = payload.split_at_checked(5)?;
                block.priority = Some(fields.try_into().ok()?);
                payload = rest;
            }
        }
        block.fragment.extend_from_slice(payload);
        block.lengths.push(payload.len());
        if flags & END_HEADERS != 0 {
            let block = self.block.take()?;
            self.emit(block);
        }
        Some(())
    }

    /// Writes a complete block: rewritten if that worked and fits the
    /// frames it came in, as received otherwise.
    fn emit(&mut self, block: Block) {
        let valid = |value: &[u8]| Authority::try_from(value).is_ok();
        match self.hpack.rewrite(&block.fragment, valid) {
            Ok(fragment) if fragment == block.fragment => self.output.put_slice(&block.raw),
            Ok(fragment) => match split(&fragment, &block.lengths) {
                Some(chunks) => self.write_frames(&block, &chunks),
                None => self.output.put_slice(&block.raw),
            },
            Err(e) => {
                tracing::debug!(error = %e, "unix connection: header block left as sent");
                self.output.put_slice(&block.raw);
                self.pass_through();
            }
        }
    }

    fn write_frames(&mut self, block: &Block, chunks: &[&[u8]]) {
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let (kind, mut flags, priority) = if i == 0 {
                (
                    HEADERS,
                    block.flags & !(PADDED | END_HEADERS),
                    block.priority,
                )
            } else {
                (CONTINUATION, 0, None)
            };
            if last {
                flags |= END_HEADERS;
            }
            let len = chunk.len() + priority.map_or(0, |p| p.len());
            self.output.put_uint(len as u64, 3);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_slice(&block.stream);
            if let Some(p) = priority {
                self.output.put_slice(&p);
            }
            self.output.put_slice(chunk);
        }
    }

    fn pass_through(&mut self) {
        if let Some(block) = self.block.take() {
            self.output.put_slice(&block.raw);
        }
        self.stage = Stage::PassThrough;
        let rest = self.input.split();
        self.output.unsplit(rest);
    }
}

/// `fragment` cut into pieces no longer than the original fragments
/// (`lengths`), so no frame grows; `None` if it does not fit.
fn split<'a>(fragment: &'a [u8], lengths: &[usize]) -> Option<Vec<&'a [u8]>> {
    let mut chunks = Vec::new();
    let mut rest = fragment;
    for &len in lengths {
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
        if rest.is_empty() {
            return Some(chunks);
        }
    }
    None
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.stage == Stage::PassThrough && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The client closed: what is left goes on as it came.
                this.eof = true;
                this.pass_through();
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AuthorityFix<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    /// What hyper would read after the client sent `sent`.
    async fn through(sent: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&sent).await.unwrap();
        drop(client);
        let mut fixed = AuthorityFix::new(server, true);
        let mut seen = Vec::new();
        fixed.read_to_end(&mut seen).await.unwrap();
        seen
    }

    /// `:method: POST`, `:authority: <value>` (literal, incremental
    /// indexing, raw), `:path: /`.
    fn block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x41, authority.len() as u8];
        b.extend_from_slice(authority);
        b.push(0x84);
        b
    }

    #[tokio::test]
    async fn an_invalid_authority_is_replaced_across_continuation_frames() {
        let settings = frame(0x4, 0, &[]);
        let raw = block(b"tmp%2Fx%2Fkiln.sock");
        let (first, second) = raw.split_at(5);
        let mut padded = vec![3];
        padded.extend_from_slice(first);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut sent = PREFACE.to_vec();
        sent.extend(settings.clone());
        sent.extend(frame(HEADERS, PADDED | 0x1, &padded));
        sent.extend(frame(CONTINUATION, END_HEADERS, second));
        sent.extend(frame(0x0, 0x1, b"data"));
        let seen = through(sent).await;

        let mut rewriter = Rewriter::new(TABLE_SIZE);
        let fixed = rewriter.rewrite(&raw, |_| false).unwrap();
        let mut expected = PREFACE.to_vec();
        expected.extend(settings);
        expected.extend(frame(HEADERS, 0x1, &fixed[..5]));
        expected.extend(frame(CONTINUATION, END_HEADERS, &fixed[5..]));
        expected.extend(frame(0x0, 0x1, b"data"));
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn valid_authorities_and_other_protocols_pass_unchanged() {
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, END_HEADERS, &block(b"localhost")));
        assert_eq!(through(sent.clone()).await, sent);
        let tls_hello = vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        assert_eq!(through(tls_hello.clone()).await, tls_hello);
    }
}
