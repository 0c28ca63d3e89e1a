//! Blobs in an S3-compatible object store (Garage, MinIO, AWS S3), through
//! the `object_store` crate: the shared remote behind
//! [`super::cached::CachedBlobService`].
//!
//! An address is `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`; a blob is the
//! object `PREFIX/b3/<hex digest>`. Credentials never come from the address
//! (it is logged and shown in errors): `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` from the environment, or a file holding
//! `KEY_ID:SECRET`.
//!
//! kiln does not trust what the store answers: every read is checked against
//! its digest while it streams ([`VerifyingReader`]). Nothing is held whole
//! in memory: reads stream, and uploads go through a buffered multipart
//! writer, one [`PART_SIZE`] part in memory plus [`PARTS_IN_FLIGHT`] sending.
//! An interrupted multipart upload leaves no object (S3 only shows it at
//! completion), so an object under a digest key is always whole.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::object_store::aws::AmazonS3Builder;
use ::object_store::buffered::BufWriter;
use ::object_store::path::Path as Key;
use ::object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use bytes::BytesMut;
use futures::TryStreamExt;
use tokio::io::AsyncReadExt;

use super::{BlobError, BlobReader, VerifyingReader};
use crate::castore::digest::B3Digest;

/// Bytes per multipart part (S3 wants at least 5 MiB but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload sent at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Bytes read from the local file at a time.
const READ_SIZE: usize = 1 << 20;

/// The key probed at start ([`ObjectStoreBlobs::probe`]); it need not exist.
const PROBE_KEY: &str = "kiln-probe";

/// A malformed object-store address or credentials file.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreAddrError {
    /// The address is not `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`.
    #[error("object store address {address:?}: {problem}")]
    Malformed {
        /// The address.
        address: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The credentials file could not be read or is not `KEY_ID:SECRET`.
    #[error("object store credentials file {path}: {problem}")]
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong (never its contents).
        problem: String,
    },
    /// No credentials were given.
    #[error("object store {store}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give a credentials file)")]
    NoCredentials {
        /// The store.
        store: String,
    },
    /// The S3 client could not be built.
    #[error("object store {store}: building the client: {message}")]
    Client {
        /// The store.
        store: String,
        /// The client's error.
        message: String,
    },
}

/// What an `s3://` address says (no credentials in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Address {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// The endpoint URL (`http://` or `https://`).
    pub endpoint: String,
    /// The region (default `us-east-1`; Garage's default is `garage`).
    pub region: String,
}

impl S3Address {
    /// Parses `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`.
    pub fn parse(address: &str) -> Result<S3Address, ObjectStoreAddrError> {
        let bad = |problem: &str| ObjectStoreAddrError::Malformed {
            address: address.to_owned(),
            problem: problem.to_owned(),
        };
        let rest = address
            .strip_prefix("s3://")
            .ok_or_else(|| bad("want s3://BUCKET[/PREFIX]?endpoint=URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket after s3://"));
        }
        let (mut endpoint, mut region) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", value)) => endpoint = Some(value.to_owned()),
                Some(("region", value)) => region = Some(value.to_owned()),
                _ => {
                    return Err(bad(&format!(
                        "unknown parameter {pair:?} (want endpoint, region)"
                    )))
                }
            }
        }
        let endpoint = endpoint.ok_or_else(|| bad("no endpoint=URL parameter"))?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(bad("the endpoint must be an http:// or https:// URL"));
        }
        Ok(S3Address {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            region: region.unwrap_or_else(|| "us-east-1".to_owned()),
        })
    }

    /// How errors and logs name the store: bucket, prefix and endpoint.
    pub fn name(&self) -> String {
        let slash = if self.prefix.is_empty() { "" } else { "/" };
        format!(
            "s3://{}{slash}{} at {}",
            self.bucket, self.prefix, self.endpoint
        )
    }
}

/// Reads an access key from `path` (`KEY_ID:SECRET`, surrounding
/// whitespace ignored), else from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.
fn credentials(path: Option<&Path>, store: &str) -> Result<(String, String), ObjectStoreAddrError> {
    if let Some(path) = path {
        let bad = |problem: String| ObjectStoreAddrError::Credentials {
            path: path.to_owned(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        return match text.trim().split_once(':') {
            Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
                Ok((id.to_owned(), secret.to_owned()))
            }
            _ => Err(bad("want one line KEY_ID:SECRET".to_owned())),
        };
    }
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(id), Ok(secret)) if !id.is_empty() && !secret.is_empty() => Ok((id, secret)),
        _ => Err(ObjectStoreAddrError::NoCredentials {
            store: store.to_owned(),
        }),
    }
}

/// Installs the process-wide rustls provider (ring) that reqwest, under
/// `object_store`, needs before its first client: it panics without one.
/// Idempotent; `main` should call it first.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Blobs as objects under `PREFIX/b3/`. Cheap to clone.
#[derive(Clone)]
pub struct ObjectStoreBlobs {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: Arc<str>,
}

impl std::fmt::Debug for ObjectStoreBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreBlobs")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreBlobs {
    /// The S3 store `address` names, with the credentials of `credentials`
    /// (a `KEY_ID:SECRET` file) or of the environment. Makes no request.
    pub fn from_address(
        address: &str,
        credentials_file: Option<&Path>,
    ) -> Result<ObjectStoreBlobs, ObjectStoreAddrError> {
        install_crypto_provider();
        let parsed = S3Address::parse(address)?;
        let name = parsed.name();
        let (key_id, secret) = credentials(credentials_file, &name)?;
        // Short, so that an unreachable store is an error within seconds,
        // not minutes (the defaults retry 10 times over 3 minutes): a
        // request is tried 3 times within 10 s, a connection 2 s each.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
        };
        let client = ClientOptions::new()
            .with_allow_http(parsed.endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(2))
            // One request carries at most a part: generous for slow links.
            .with_timeout(Duration::from_secs(300));
        let store = AmazonS3Builder::new()
            .with_bucket_name(&parsed.bucket)
            .with_endpoint(&parsed.endpoint)
            .with_region(&parsed.region)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            // Path-style (bucket in the path): what Garage and MinIO serve
            // without wildcard DNS. No checksum algorithm: Garage refuses
            // some; kiln checks every read against the digest anyway.
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| ObjectStoreAddrError::Client {
                store: name.clone(),
                message: e.to_string(),
            })?;
        Ok(ObjectStoreBlobs::new(Arc::new(store), &parsed.prefix, name))
    }

    /// Blobs in `store` under `prefix`, named `name` in errors (tests use an
    /// in-memory store).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, name: String) -> ObjectStoreBlobs {
        ObjectStoreBlobs {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            name: name.into(),
        }
    }

    /// How errors name the store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying store (tests write to it directly).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object key of `digest`'s blob: `PREFIX/b3/<hex>`.
    pub fn key(&self, digest: &B3Digest) -> Key {
        self.key_of(&format!("b3/{}", digest.to_hex()))
    }

    fn key_of(&self, rest: &str) -> Key {
        match self.prefix.is_empty() {
            true => Key::from(rest),
            false => Key::from(format!("{}/{rest}", self.prefix)),
        }
    }

    fn unavailable(&self, action: String, error: &::object_store::Error) -> BlobError {
        BlobError::Unavailable {
            store: self.name.to_string(),
            action,
            message: error.to_string(),
        }
    }

    /// One request at start, so that a wrong endpoint, bucket or key fails
    /// then and not at the first build: a head of a key that need not exist.
    pub async fn probe(&self) -> Result<(), BlobError> {
        match self.store.head(&self.key_of(PROBE_KEY)).await {
            Ok(_) | Err(::object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable("probing the store".to_owned(), &e)),
        }
    }

    /// Whether the store has the blob (a head request).
    pub async fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        match self.store.head(&self.key(digest)).await {
            Ok(_) => Ok(true),
            Err(::object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unavailable(format!("looking up blob {digest}"), &e)),
        }
    }

    /// Streams the blob, checked against `digest`: the reader fails with
    /// `InvalidData` at its end when the bytes are not the blob's. `None`
    /// when the store has no such object.
    pub async fn open_read(&self, digest: &B3Digest) -> Result<Option<BlobReader>, BlobError> {
        let got = match self.store.get(&self.key(digest)).await {
            Ok(got) => got,
            Err(::object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(format!("reading blob {digest}"), &e)),
        };
        let size = got.meta.size;
        let name = self.name.clone();
        let stream = got
            .into_stream()
            .map_err(move |e| std::io::Error::other(format!("object store {name}: {e}")));
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Some(BlobReader {
            reader: Box::pin(VerifyingReader::new(reader, *digest)),
            size: Some(size),
        }))
    }

    /// Uploads the local file at `path` as `digest`'s blob, streaming. The
    /// caller vouches that the file holds exactly the blob's bytes (a
    /// private copy it has hashed). Only `Ok` once the store has the whole
    /// object; an upload that fails leaves none.
    pub async fn upload(&self, digest: &B3Digest, path: &Path) -> Result<(), BlobError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(BlobError::Write)?;
        let mut writer = BufWriter::with_capacity(self.store.clone(), self.key(digest), PART_SIZE)
            .with_max_concurrency(PARTS_IN_FLIGHT);
        let action = || format!("uploading blob {digest}");
        let sent: Result<(), BlobError> = async {
            loop {
                let mut chunk = BytesMut::with_capacity(READ_SIZE);
                while chunk.len() < READ_SIZE {
                    if file.read_buf(&mut chunk).await.map_err(BlobError::Write)? == 0 {
                        break;
                    }
                }
                if chunk.is_empty() {
                    return Ok(());
                }
                let last = chunk.len() < READ_SIZE;
                writer
                    .put(chunk.freeze())
                    .await
                    .map_err(|e| self.unavailable(action(), &e))?;
                if last {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = sent {
            // Best effort: an unfinished multipart upload is no object,
            // and the store's lifecycle rules clean up its parts.
            let _ = writer.abort().await;
            return Err(e);
        }
        // Completes the upload (a single put below a part's size); the
        // writer cannot be aborted after this, whatever it answers.
        tokio::io::AsyncWriteExt::shutdown(&mut writer)
            .await
            .map_err(|e| BlobError::Unavailable {
                store: self.name.to_string(),
                action: action(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ::object_store::memory::InMemory;
    use ::object_store::PutPayload;

    fn blobs() -> ObjectStoreBlobs {
        ObjectStoreBlobs::new(Arc::new(InMemory::new()), "/pre/fix/", "memory".into())
    }

    #[test]
    fn parses_addresses() {
        let a = S3Address::parse("s3://kiln/blobs/x?endpoint=http://127.0.0.1:3900/&region=garage")
            .unwrap();
        assert_eq!(
            a,
            S3Address {
                bucket: "kiln".into(),
                prefix: "blobs/x".into(),
                endpoint: "http://127.0.0.1:3900".into(),
                region: "garage".into(),
            }
        );
        assert_eq!(a.name(), "s3://kiln/blobs/x at http://127.0.0.1:3900");
        let b = S3Address::parse("s3://kiln?endpoint=https://s3.example").unwrap();
        assert_eq!((b.prefix.as_str(), b.region.as_str()), ("", "us-east-1"));
        assert_eq!(b.name(), "s3://kiln at https://s3.example");
        for bad in [
            "kiln",
            "s3://?endpoint=http://x",
            "s3://kiln",
            "s3://kiln?endpoint=ftp://x",
            "s3://kiln?endpoint=http://x&secret=y",
        ] {
            assert!(S3Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_a_credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "GK123:s3cr3t\n").unwrap();
        assert_eq!(
            credentials(Some(&path), "s").unwrap(),
            ("GK123".to_owned(), "s3cr3t".to_owned())
        );
        std::fs::write(&path, "nocolon").unwrap();
        let err = credentials(Some(&path), "s").unwrap_err().to_string();
        assert!(!err.contains("nocolon"), "{err}");
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let digest = B3Digest::of(b"x");
        assert_eq!(
            blobs().key(&digest).as_ref(),
            format!("pre/fix/b3/{}", digest.to_hex())
        );
    }

    #[tokio::test]
    async fn uploads_and_reads_back_verified() {
        let blobs = blobs();
        let data: Vec<u8> = (0..(3 * READ_SIZE + 17)).map(|i| (i % 251) as u8).collect();
        let digest = B3Digest::of(&data);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        assert!(!blobs.has(&digest).await.unwrap());
        assert!(blobs.open_read(&digest).await.unwrap().is_none());
        blobs.upload(&digest, &path).await.unwrap();
        assert!(blobs.has(&digest).await.unwrap());
        let mut read = blobs.open_read(&digest).await.unwrap().unwrap();
        assert_eq!(read.size, Some(data.len() as u64));
        let mut out = Vec::new();
        read.reader.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        blobs.probe().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_other_bytes_under_a_digest() {
        let blobs = blobs();
        let digest = B3Digest::of(b"the real bytes");
        blobs
            .store()
            .put(&blobs.key(&digest), PutPayload::from_static(b"garbage"))
            .await
            .unwrap();
        let mut read = blobs.open_read(&digest).await.unwrap().unwrap();
        let err = read.reader.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
