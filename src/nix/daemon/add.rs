//! Adding paths: `AddToStoreNar` and `AddMultipleToStore` (a path with its
//! metadata and NAR, as `nix copy` and remote builds send them),
//! `AddToStore` and `AddTextToStore` (contents whose path kiln computes, as
//! evaluation sends `.drv` files and sources).
//!
//! Every NAR is ingested into the castore as it arrives, hashed while it
//! streams, and the path is recorded only if hash and size are what the
//! client claimed, every reference is valid, and the client may add it:
//! a trusted client anything, an untrusted one only content-addressed paths
//! whose address kiln recomputes, unless the operator allows unsigned
//! input-addressed paths (`--nix-allow-unsigned`).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::session::{OpError, Session};
use super::store::{parse_signatures, to_wire};
use super::types::{read_path_info, read_store_paths, write_path_info, ReadError, WirePathInfo};
use super::wire::{FramedReader, WireError, WireReader, MAX_LONG, MAX_SHORT};
use super::SessionError;
use crate::castore::Node;
use crate::nix::hash::{Hash, HashAlgorithm, Hasher};
use crate::nix::nar::nar_hash;
use crate::nix::nixbase32;
use crate::nix::path_info::PathInfo;
use crate::nix::store_path::make::{
    make_fixed_output_path, make_text_path, ContentAddress, Method,
};
use crate::nix::StorePath;

fn nix_hash(digest: &[u8; 32]) -> String {
    format!("sha256:{}", nixbase32::encode(digest))
}

fn drain_error(e: std::io::Error) -> OpError {
    OpError::Fatal(SessionError::Wire(WireError::io("a framed stream", e)))
}

/// `AddToStoreNar`: a path info, two flags, then the NAR as a framed stream.
pub(super) async fn add_to_store_nar<R, W>(s: &mut Session<'_, R, W>) -> Result<(), OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let info = read_path_info(&mut s.r).await;
    let _repair = s.r.bool("the repair flag").await?;
    let _dont_check_sigs = s.r.bool("the don't-check-signatures flag").await?;
    let info = match info {
        Ok(info) => Ok(info),
        Err(ReadError::Wire(e)) => return Err(e.into()),
        Err(ReadError::Value(e)) => Err(OpError::Refused(e.to_string())),
    };
    let mut framed = FramedReader::new(s.r.get_mut());
    let result = match info {
        Ok(info) => add_one(s.daemon, s.daemon.config.trusted, &info, &mut framed).await,
        Err(e) => Err(e),
    };
    framed.drain().await.map_err(drain_error)?;
    result?;
    s.out.last().await?;
    Ok(())
}

/// `AddMultipleToStore`: two flags, then one framed stream holding a count
/// and, per path, its info and its NAR.
pub(super) async fn add_multiple_to_store<R, W>(s: &mut Session<'_, R, W>) -> Result<(), OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let _repair = s.r.bool("the repair flag").await?;
    let _dont_check_sigs = s.r.bool("the don't-check-signatures flag").await?;
    let trusted = s.daemon.config.trusted;
    let daemon = s.daemon;
    let mut framed = FramedReader::new(s.r.get_mut());
    let result = async {
        let mut inner = WireReader::new(&mut framed);
        let count = inner.count("the number of paths").await?;
        for _ in 0..count {
            let info = read_path_info(&mut inner).await?;
            add_one(daemon, trusted, &info, inner.get_mut()).await?;
        }
        Ok::<(), OpError>(())
    }
    .await;
    // A stream that broke inside the framing is out of step for good.
    if let Err(OpError::Fatal(_)) = &result {
        if !framed.is_done() {
            return result;
        }
    }
    framed.drain().await.map_err(drain_error)?;
    match result {
        Err(OpError::Fatal(SessionError::Wire(e))) => Err(OpError::Refused(format!(
            "the paths sent with AddMultipleToStore are malformed: {e}"
        ))),
        other => other,
    }?;
    s.out.last().await?;
    Ok(())
}

/// Checks, ingests and records one path whose NAR `nar` carries.
async fn add_one<N: AsyncRead + Unpin + Send>(
    daemon: &super::store::Daemon,
    trusted: bool,
    info: &WirePathInfo,
    nar: &mut N,
) -> Result<(), OpError> {
    let path = &info.path;
    let ca = match info.ca.as_str() {
        "" => None,
        s => Some(ContentAddress::parse(s).map_err(|e| {
            OpError::Refused(format!(
                "path '{path}' has an invalid content address {s:?}: {e}"
            ))
        })?),
    };
    if ca.is_none() && !trusted && !daemon.config.allow_unsigned {
        return Err(OpError::Refused(format!(
            "cannot add path '{path}' because it lacks a signature by a trusted key \
             (kiln does not trust this client with input-addressed paths)"
        )));
    }
    let signatures = parse_signatures(&info.signatures).map_err(OpError::Refused)?;
    check_references(daemon, path, &info.references).await?;
    if daemon.is_valid(path).await? {
        // Already here: the NAR is read and dropped by the caller.
        return Ok(());
    }
    let ingested = daemon.ingest(nar).await.map_err(|e| {
        OpError::Refused(format!(
            "importing path '{path}': {}",
            super::error_chain(&e)
        ))
    })?;
    if ingested.nar_sha256 != info.nar_sha256 {
        return Err(OpError::Refused(format!(
            "hash mismatch importing path '{path}';\n  specified: {}\n  got:       {}",
            nix_hash(&info.nar_sha256),
            nix_hash(&ingested.nar_sha256)
        )));
    }
    if ingested.nar_size != info.nar_size {
        return Err(OpError::Refused(format!(
            "size mismatch importing path '{path}';\n  specified: {}\n  got:       {}",
            info.nar_size, ingested.nar_size
        )));
    }
    if let Some(ca) = &ca {
        verify_content_address(
            daemon,
            path,
            ca,
            &info.references,
            &ingested.node,
            &ingested.nar_sha256,
        )
        .await?;
    }
    daemon
        .register(PathInfo {
            store_path: path.clone(),
            node: ingested.node,
            references: info.references.clone(),
            nar_sha256: ingested.nar_sha256,
            nar_size: ingested.nar_size,
            deriver: info.deriver.clone(),
            signatures,
            ca: ca.map(|c| c.to_string()),
        })
        .await?;
    tracing::info!(path = %path, nar_size = info.nar_size, "nix path added");
    Ok(())
}

/// Every reference but the path itself must be valid already.
async fn check_references(
    daemon: &super::store::Daemon,
    path: &StorePath,
    references: &BTreeSet<StorePath>,
) -> Result<(), OpError> {
    for reference in references {
        if reference != path && !daemon.is_valid(reference).await? {
            return Err(OpError::Refused(format!(
                "cannot add path '{path}': it refers to '{reference}', which is not valid in kiln's store (add it first)"
            )));
        }
    }
    Ok(())
}

/// The path a content address gives, checked against what the client said.
async fn verify_content_address(
    daemon: &super::store::Daemon,
    path: &StorePath,
    ca: &ContentAddress,
    references: &BTreeSet<StorePath>,
    node: &Node,
    nar_sha256: &[u8; 32],
) -> Result<(), OpError> {
    let refs_without_self: BTreeSet<StorePath> =
        references.iter().filter(|r| *r != path).cloned().collect();
    let has_self = references.contains(path);
    let computed = match ca {
        ContentAddress::Text { hash } => {
            let got = file_hash(daemon, path, node, HashAlgorithm::Sha256).await?;
            if &got != hash {
                return Err(mismatch(path, hash, &got));
            }
            if has_self {
                return Err(OpError::Refused(format!(
                    "text path '{path}' cannot refer to itself"
                )));
            }
            let Hash::Sha256(digest) = hash else {
                return Err(OpError::Refused(format!(
                    "text path '{path}' must be addressed by SHA-256"
                )));
            };
            make_text_path(path.name(), digest, &refs_without_self)
        }
        ContentAddress::Fixed { method, hash } => {
            let got = match method {
                Method::Recursive if hash.algorithm() == HashAlgorithm::Sha256 => {
                    Hash::Sha256(*nar_sha256)
                }
                Method::Recursive => {
                    crate::nix::nar::nar_hash_with(&daemon.castore, node, hash.algorithm())
                        .await
                        .map_err(|e| OpError::Refused(format!("hashing '{path}': {e}")))?
                        .hash
                }
                Method::Flat => file_hash(daemon, path, node, hash.algorithm()).await?,
            };
            if &got != hash {
                return Err(mismatch(path, hash, &got));
            }
            make_fixed_output_path(path.name(), *method, hash, &refs_without_self, has_self)
        }
    }
    .map_err(|e| OpError::Refused(format!("computing the path of '{path}': {e}")))?;
    if &computed != path {
        return Err(OpError::Refused(format!(
            "path '{path}' claims to be content-addressed by {ca}, which gives '{computed}'"
        )));
    }
    Ok(())
}

fn mismatch(path: &StorePath, specified: &Hash, got: &Hash) -> OpError {
    OpError::Refused(format!(
        "content address mismatch importing path '{path}';\n  specified: {}\n  got:       {}",
        specified.to_sri(),
        got.to_sri()
    ))
}

/// The hash of the single file `node` is.
async fn file_hash(
    daemon: &super::store::Daemon,
    path: &StorePath,
    node: &Node,
    algorithm: HashAlgorithm,
) -> Result<Hash, OpError> {
    let Node::File { digest, .. } = node else {
        return Err(OpError::Refused(format!(
            "path '{path}' is flat-addressed but is not a single file"
        )));
    };
    let reader = daemon
        .castore
        .blobs
        .open_read(digest)
        .await
        .map_err(|e| OpError::Refused(format!("reading '{path}': {e}")))?
        .ok_or_else(|| OpError::Refused(format!("the contents of '{path}' are missing")))?;
    let mut hashing = HashingReader::new(reader.reader, algorithm);
    tokio::io::copy(&mut hashing, &mut tokio::io::sink())
        .await
        .map_err(|e| OpError::Refused(format!("reading '{path}': {e}")))?;
    Ok(hashing.finish())
}

/// `AddToStore` (1.25+): a name, a content-address method, references, the
/// repair flag, then the contents as a framed stream: the text itself
/// (`text:sha256`), a NAR (`fixed:r:<algo>`) or a file's bytes
/// (`fixed:<algo>`).
pub(super) async fn add_to_store<R, W>(s: &mut Session<'_, R, W>) -> Result<(), OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let name = s.r.string("the name", MAX_SHORT).await?;
    let method = s.r.string("the content-address method", MAX_SHORT).await?;
    let references = read_store_paths(&mut s.r, "the references").await;
    let _repair = s.r.bool("the repair flag").await?;
    let daemon = s.daemon;
    let mut framed = FramedReader::new(s.r.get_mut());
    let result = async {
        let references = references.map_err(OpError::from)?;
        let method = parse_method(&method)?;
        add_contents(daemon, &name, method, &references, &mut framed).await
    }
    .await;
    framed.drain().await.map_err(drain_error)?;
    let info = result?;
    let frame = write_path_info(
        super::wire::Frame::new().string(&info.store_path.to_absolute_path()),
        &to_wire(&info),
    );
    s.reply(frame).await
}

/// `AddTextToStore` (before 1.25, still accepted): name, text, references;
/// answers the path.
pub(super) async fn add_text_to_store<R, W>(s: &mut Session<'_, R, W>) -> Result<(), OpError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let name = s.r.string("the name", MAX_SHORT).await?;
    let text = s.r.bytes("the text", MAX_LONG).await?;
    let references = read_store_paths(&mut s.r, "the references").await?;
    let mut reader: &[u8] = &text;
    let info = add_contents(s.daemon, &name, AddMethod::Text, &references, &mut reader).await?;
    s.reply(super::wire::Frame::new().string(&info.store_path.to_absolute_path()))
        .await
}

#[derive(Debug, Clone, Copy)]
enum AddMethod {
    Text,
    Fixed(Method, HashAlgorithm),
}

fn parse_method(s: &str) -> Result<AddMethod, OpError> {
    let bad = || {
        OpError::Refused(format!("content-address method {s:?} is not one kiln knows (text:sha256, fixed:r:ALGO, fixed:ALGO)"))
    };
    if s == "text:sha256" {
        return Ok(AddMethod::Text);
    }
    let rest = s.strip_prefix("fixed:").ok_or_else(bad)?;
    let (method, algo) = match rest.strip_prefix("r:") {
        Some(algo) => (Method::Recursive, algo),
        None => (Method::Flat, rest),
    };
    let algo: HashAlgorithm = algo.parse().map_err(|_| bad())?;
    Ok(AddMethod::Fixed(method, algo))
}

/// Stores `contents` as a path named `name` addressed by `method`.
async fn add_contents<C: AsyncRead + Unpin + Send>(
    daemon: &super::store::Daemon,
    name: &str,
    method: AddMethod,
    references: &BTreeSet<StorePath>,
    contents: &mut C,
) -> Result<PathInfo, OpError> {
    let (node, ca) = match method {
        AddMethod::Fixed(Method::Recursive, algo) => {
            let ingested = daemon.ingest(contents).await.map_err(|e| {
                OpError::Refused(format!("adding '{name}': {}", super::error_chain(&e)))
            })?;
            let hash = if algo == HashAlgorithm::Sha256 {
                Hash::Sha256(ingested.nar_sha256)
            } else {
                crate::nix::nar::nar_hash_with(&daemon.castore, &ingested.node, algo)
                    .await
                    .map_err(|e| OpError::Refused(format!("hashing '{name}': {e}")))?
                    .hash
            };
            (
                ingested.node,
                ContentAddress::Fixed {
                    method: Method::Recursive,
                    hash,
                },
            )
        }
        AddMethod::Fixed(Method::Flat, algo) => {
            let (node, hash) = put_file(daemon, name, contents, algo).await?;
            (
                node,
                ContentAddress::Fixed {
                    method: Method::Flat,
                    hash,
                },
            )
        }
        AddMethod::Text => {
            let mut limited = contents.take(MAX_LONG as u64);
            let (node, hash) = put_file(daemon, name, &mut limited, HashAlgorithm::Sha256).await?;
            (node, ContentAddress::Text { hash })
        }
    };
    let path = match &ca {
        ContentAddress::Text {
            hash: Hash::Sha256(d),
        } => make_text_path(name, d, references),
        ContentAddress::Text { .. } => {
            return Err(OpError::Refused(format!(
                "'{name}': a text is addressed by sha256 only"
            )))
        }
        ContentAddress::Fixed { method, hash } => {
            make_fixed_output_path(name, *method, hash, references, false)
        }
    }
    .map_err(|e| OpError::Refused(format!("the name {name:?}: {e}")))?;
    check_references(daemon, &path, references).await?;
    if let Some(existing) = daemon.info(&path).await? {
        return Ok(existing);
    }
    let nar = nar_hash(&daemon.castore, &node)
        .await
        .map_err(|e| OpError::Refused(format!("hashing '{path}': {e}")))?;
    let Hash::Sha256(nar_sha256) = nar.hash else {
        return Err(OpError::Refused(format!("hashing '{path}': not SHA-256")));
    };
    let info = PathInfo {
        store_path: path.clone(),
        node,
        references: references.clone(),
        nar_sha256,
        nar_size: nar.size,
        deriver: None,
        signatures: Vec::new(),
        ca: Some(ca.to_string()),
    };
    daemon.register(info.clone()).await?;
    tracing::info!(path = %path, "nix path added by content");
    Ok(info)
}

/// Stores a single file's bytes and hashes them with `algorithm`.
async fn put_file<C: AsyncRead + Unpin + Send>(
    daemon: &super::store::Daemon,
    name: &str,
    contents: &mut C,
    algorithm: HashAlgorithm,
) -> Result<(Node, Hash), OpError> {
    let mut hashing = HashingReader::new(contents, algorithm);
    let stored = daemon
        .castore
        .blobs
        .put(&mut hashing)
        .await
        .map_err(|e| OpError::Refused(format!("storing '{name}': {e}")))?;
    let node = Node::File {
        digest: stored.digest,
        size: stored.size,
        executable: false,
    };
    Ok((node, hashing.finish()))
}

/// Hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R> HashingReader<R> {
    fn new(inner: R, algorithm: HashAlgorithm) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(algorithm),
        }
    }

    fn finish(self) -> Hash {
        self.hasher.finish()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.hasher.update(&buf.filled()[before..]);
        }
        result
    }
}
