//! A NAR read from a stream into the castore, as it arrives: file contents
//! go to the blob store in chunks, directories to the directory store once
//! complete (children first, in batches), and every byte is hashed, so the
//! caller compares with the hash and size the sender claimed.
//!
//! It reads exactly the NAR's bytes and never one more: NARs follow each
//! other in one stream in the Nix protocol (`AddMultipleToStore`). The
//! bytes come from clients kiln does not trust, so everything is checked:
//! the tokens, zero padding, entry names (non-empty, not `.`/`..`, no `/`
//! or NUL, at most 255 bytes, strictly increasing), symlink targets (not
//! empty, at most 4095 bytes, no NUL), depth and entry count. The tree is
//! walked with an explicit stack, never recursion.

use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::castore::{Directory, Node, PathComponent, Store, SymlinkTarget};

/// Bounds on one NAR.
#[derive(Debug, Clone)]
pub struct NarLimits {
    /// Deepest directory nesting.
    pub max_depth: usize,
    /// Most entries (files, symlinks, directories) in all.
    pub max_entries: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_depth: 2048,
            max_entries: 1_000_000,
        }
    }
}

/// What was ingested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestedNar {
    /// The root of the tree, anonymous.
    pub node: Node,
    /// SHA-256 of the NAR's bytes.
    pub nar_sha256: [u8; 32],
    /// The NAR's length.
    pub nar_size: u64,
}

/// Why a NAR was not ingested. `at` is the path inside the NAR.
#[derive(Debug, thiserror::Error)]
pub enum NarIngestError {
    /// The stream ended inside the NAR.
    #[error("the NAR ends early (at {at:?})")]
    Truncated {
        /// Where.
        at: String,
    },
    /// Reading failed.
    #[error("reading the NAR")]
    Read(#[source] std::io::Error),
    /// A token is not the one the format has there.
    #[error("malformed NAR at {at:?}: expected {expected}, got {got:?}")]
    Token {
        /// Where.
        at: String,
        /// What the format wants.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// Padding bytes are not zero.
    #[error("malformed NAR at {at:?}: non-zero padding")]
    Padding {
        /// Where.
        at: String,
    },
    /// An entry name breaks the rules.
    #[error("malformed NAR at {at:?}: entry name {name:?} {why}")]
    Name {
        /// The directory.
        at: String,
        /// The name.
        name: String,
        /// Which rule.
        why: &'static str,
    },
    /// A symlink target breaks the rules.
    #[error("malformed NAR at {at:?}: symlink target {why}")]
    Target {
        /// Where.
        at: String,
        /// Which rule.
        why: &'static str,
    },
    /// Nested too deep.
    #[error("the NAR nests deeper than {0} directories")]
    TooDeep(usize),
    /// Too many entries.
    #[error("the NAR has more than {0} entries")]
    TooManyEntries(u64),
    /// The castore failed.
    #[error("storing the NAR's contents at {at:?}")]
    Store {
        /// Where.
        at: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Hashes and counts what passes through.
struct Counted<'a, R> {
    inner: &'a mut R,
    hasher: Sha256,
    size: u64,
}

impl<R: AsyncRead + Unpin + Send> AsyncRead for Counted<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.size += new.len() as u64;
        }
        result
    }
}

/// Longest token string: the format's words and names.
const MAX_TOKEN: u64 = 255;
const MAX_TARGET: u64 = 4095;

struct Parser<'a, R> {
    r: Counted<'a, R>,
    at: String,
}

impl<R: AsyncRead + Unpin + Send> Parser<'_, R> {
    fn io(&self, e: std::io::Error) -> NarIngestError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NarIngestError::Truncated {
                at: self.at.clone(),
            }
        } else {
            NarIngestError::Read(e)
        }
    }

    async fn u64(&mut self) -> Result<u64, NarIngestError> {
        let mut b = [0u8; 8];
        match self.r.read_exact(&mut b).await {
            Ok(_) => Ok(u64::from_le_bytes(b)),
            Err(e) => Err(self.io(e)),
        }
    }

    async fn padding(&mut self, len: u64) -> Result<(), NarIngestError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        if let Err(e) = self.r.read_exact(&mut b[..pad]).await {
            return Err(self.io(e));
        }
        if b.iter().any(|x| *x != 0) {
            return Err(NarIngestError::Padding {
                at: self.at.clone(),
            });
        }
        Ok(())
    }

    /// A string of at most `max` bytes; `None` if it is longer (the
    /// caller names the problem).
    async fn string(
        &mut self,
        max: u64,
        expected: &'static str,
    ) -> Result<Vec<u8>, NarIngestError> {
        let len = self.u64().await?;
        if len > max {
            return Err(NarIngestError::Token {
                at: self.at.clone(),
                expected,
                got: format!("a string of {len} bytes"),
            });
        }
        // Bounded by `max`.
        let mut data = vec![0u8; len as usize];
        if let Err(e) = self.r.read_exact(&mut data).await {
            return Err(self.io(e));
        }
        self.padding(len).await?;
        Ok(data)
    }

    async fn expect(&mut self, token: &'static str) -> Result<(), NarIngestError> {
        let got = self.string(MAX_TOKEN, token).await?;
        if got != token.as_bytes() {
            return Err(NarIngestError::Token {
                at: self.at.clone(),
                expected: token,
                got: String::from_utf8_lossy(&got).into_owned(),
            });
        }
        Ok(())
    }

    fn unexpected(&self, expected: &'static str, got: &[u8]) -> NarIngestError {
        NarIngestError::Token {
            at: self.at.clone(),
            expected,
            got: String::from_utf8_lossy(got).into_owned(),
        }
    }

    fn store_err(&self, e: impl std::error::Error + Send + Sync + 'static) -> NarIngestError {
        NarIngestError::Store {
            at: self.at.clone(),
            source: Box::new(e),
        }
    }
}

/// A directory being read: its entries so far, the last name, and how
/// long `at` was before it was entered.
struct Open {
    directory: Directory,
    last: Option<Vec<u8>>,
    at_len: usize,
    /// The name under which it goes into its parent.
    name: Option<PathComponent>,
}

/// How many finished directories are sent to the store at once.
const DIRECTORY_BATCH: usize = 512;

/// Ingests one NAR from `reader`, which is left just after it.
pub async fn ingest_nar<R: AsyncRead + Unpin + Send>(
    store: &Store,
    reader: &mut R,
    limits: &NarLimits,
) -> Result<IngestedNar, NarIngestError> {
    let mut p = Parser {
        r: Counted {
            inner: reader,
            hasher: Sha256::new(),
            size: 0,
        },
        at: String::new(),
    };
    p.expect("nix-archive-1").await?;
    let mut stack: Vec<Open> = Vec::new();
    let mut batch: Vec<Directory> = Vec::new();
    let mut entries: u64 = 0;
    // The name the node about to be read goes under (None for the root).
    let mut name_for_next: Option<PathComponent> = None;
    loop {
        entries += 1;
        if entries > limits.max_entries {
            return Err(NarIngestError::TooManyEntries(limits.max_entries));
        }
        let node = read_node(store, &mut p).await?;
        let mut complete = match node {
            Some(node) => Some((name_for_next.take(), node)),
            None => {
                if stack.len() >= limits.max_depth {
                    return Err(NarIngestError::TooDeep(limits.max_depth));
                }
                stack.push(Open {
                    directory: Directory::new(),
                    last: None,
                    at_len: p.at.len(),
                    name: name_for_next.take(),
                });
                None
            }
        };
        // Settle finished nodes into their directories and close the
        // directories that end, until the next entry's node begins.
        loop {
            if let Some((name, node)) = complete.take() {
                let Some(open) = stack.last_mut() else {
                    flush(store, &mut batch, &p).await?;
                    return Ok(IngestedNar {
                        node,
                        nar_sha256: p.r.hasher.finalize().into(),
                        nar_size: p.r.size,
                    });
                };
                let Some(name) = name else {
                    return Err(p.unexpected("a named entry", b""));
                };
                let shown = String::from_utf8_lossy(name.as_bytes()).into_owned();
                open.directory
                    .add(name, node)
                    .map_err(|_| NarIngestError::Name {
                        at: p.at.clone(),
                        name: shown,
                        why: "cannot be stored",
                    })?;
                p.at.truncate(open.at_len);
                p.expect(")").await?;
            }
            let word = p.string(MAX_TOKEN, "entry or )").await?;
            match word.as_slice() {
                b")" => {
                    let Some(done) = stack.pop() else {
                        return Err(p.unexpected("a node", b")"));
                    };
                    let node = done.directory.as_node();
                    batch.push(done.directory);
                    if batch.len() >= DIRECTORY_BATCH {
                        flush(store, &mut batch, &p).await?;
                    }
                    p.at.truncate(done.at_len);
                    complete = Some((done.name, node));
                }
                b"entry" => {
                    p.expect("(").await?;
                    p.expect("name").await?;
                    let name = p.string(MAX_TOKEN, "an entry name").await?;
                    let at = p.at.clone();
                    let Some(open) = stack.last_mut() else {
                        return Err(p.unexpected("a node", b"entry"));
                    };
                    check_name(&at, &name, open.last.as_deref())?;
                    open.last = Some(name.clone());
                    let component = PathComponent::try_from(name.as_slice()).map_err(|_| {
                        NarIngestError::Name {
                            at: at.clone(),
                            name: String::from_utf8_lossy(&name).into_owned(),
                            why: "cannot be stored",
                        }
                    })?;
                    p.at.push('/');
                    p.at.push_str(&String::from_utf8_lossy(&name));
                    p.expect("node").await?;
                    name_for_next = Some(component);
                    break;
                }
                other => return Err(p.unexpected("entry or )", other)),
            }
        }
    }
}

/// Reads one node up to its end, or, for a directory, up to its entries
/// (`None`).
async fn read_node<R: AsyncRead + Unpin + Send>(
    store: &Store,
    p: &mut Parser<'_, R>,
) -> Result<Option<Node>, NarIngestError> {
    p.expect("(").await?;
    p.expect("type").await?;
    let kind = p.string(MAX_TOKEN, "regular, symlink or directory").await?;
    match kind.as_slice() {
        b"regular" => {
            let mut word = p.string(MAX_TOKEN, "executable or contents").await?;
            let executable = word == b"executable";
            if executable {
                p.expect("").await?;
                word = p.string(MAX_TOKEN, "contents").await?;
            }
            if word != b"contents" {
                return Err(p.unexpected("contents", &word));
            }
            let size = p.u64().await?;
            let stored = {
                let mut contents = (&mut p.r).take(size);
                store.blobs.put(&mut contents).await
            };
            let stored = stored.map_err(|e| p.store_err(e))?;
            if stored.size != size {
                return Err(NarIngestError::Truncated { at: p.at.clone() });
            }
            p.padding(size).await?;
            p.expect(")").await?;
            Ok(Some(Node::File {
                digest: stored.digest,
                size,
                executable,
            }))
        }
        b"symlink" => {
            p.expect("target").await?;
            let target = p.string(MAX_TARGET, "a symlink target").await?;
            if target.is_empty() {
                return Err(NarIngestError::Target {
                    at: p.at.clone(),
                    why: "is empty",
                });
            }
            if target.contains(&0) {
                return Err(NarIngestError::Target {
                    at: p.at.clone(),
                    why: "holds NUL",
                });
            }
            let target =
                SymlinkTarget::try_from(target.as_slice()).map_err(|_| NarIngestError::Target {
                    at: p.at.clone(),
                    why: "cannot be stored",
                })?;
            p.expect(")").await?;
            Ok(Some(Node::Symlink { target }))
        }
        b"directory" => Ok(None),
        other => Err(p.unexpected("regular, symlink or directory", other)),
    }
}

fn check_name(at: &str, name: &[u8], last: Option<&[u8]>) -> Result<(), NarIngestError> {
    let bad = |why| NarIngestError::Name {
        at: at.to_owned(),
        name: String::from_utf8_lossy(name).into_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name == b"." || name == b".." {
        return Err(bad("is . or .."));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(bad("holds / or NUL"));
    }
    if let Some(last) = last {
        if name <= last {
            return Err(bad(
                "is not after the previous entry (NAR entries are sorted, each once)",
            ));
        }
    }
    Ok(())
}

async fn flush<R: AsyncRead + Unpin + Send>(
    store: &Store,
    batch: &mut Vec<Directory>,
    p: &Parser<'_, R>,
) -> Result<(), NarIngestError> {
    if batch.is_empty() {
        return Ok(());
    }
    let directories = std::mem::take(batch);
    store
        .directories
        .put_many(directories)
        .await
        .map(|_| ())
        .map_err(|e| p.store_err(e))
}

#[cfg(test)]
mod tests;
