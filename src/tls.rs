//! TLS material read from PEM files: a server's identity and the CA its
//! clients' certificates must chain to; a client's CA and its own identity.
//!
//! Files are read once, when the server or client starts. Only the shape is
//! checked here (a PEM certificate, a PEM private key); rustls checks the
//! contents when tonic builds its configuration.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Reading TLS material failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading the {what} {path}")]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("the {what} {path} holds no PEM {expected} block")]
    NotPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM label looked for.
        expected: &'static str,
    },
}

/// Which PEM block a file must contain.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// Reads a PEM file and checks it holds at least one block of `kind`.
fn read_pem(path: &Path, what: &'static str, kind: Pem) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let (expected, found) = match kind {
        Pem::Certificate => ("CERTIFICATE", text.contains("-----BEGIN CERTIFICATE-----")),
        // PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) and SEC1
        // (`EC PRIVATE KEY`) all end their label this way.
        Pem::PrivateKey => (
            "PRIVATE KEY",
            text.lines()
                .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")),
        ),
    };
    if !found {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

/// The server's TLS configuration: its certificate chain and key, and, for
/// client certificates, the CA they must chain to.
///
/// A client certificate is optional at the TLS layer, so that the health
/// service stays reachable; [`crate::auth`] refuses every other call that
/// brings neither a verified certificate nor an accepted token. A
/// certificate that is presented but does not chain to `client_ca` fails
/// the handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let cert_pem = read_pem(cert, "server certificate (--tls-cert)", Pem::Certificate)?;
    let key_pem = read_pem(key, "server private key (--tls-key)", Pem::PrivateKey)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    if let Some(ca) = client_ca {
        let ca_pem = read_pem(ca, "client CA (--tls-client-ca)", Pem::Certificate)?;
        config = config
            .client_ca_root(Certificate::from_pem(ca_pem))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// A client's TLS configuration: the CA the server's certificate must chain
/// to and, for mutual TLS, the client's own certificate and key.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let ca_pem = read_pem(ca, "server CA (--tls-ca)", Pem::Certificate)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        let cert_pem = read_pem(cert, "client certificate (--tls-cert)", Pem::Certificate)?;
        let key_pem = read_pem(key, "client private key (--tls-key)", Pem::PrivateKey)?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_without_the_expected_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        std::fs::write(&key, "not a key").expect("write");
        let err = server_config(&cert, &key, None).expect_err("key refused");
        assert!(
            err.to_string().contains("--tls-key") && err.to_string().contains("PRIVATE KEY"),
            "{err}"
        );
        let err = client_config(&key, None).expect_err("CA refused");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = server_config(&missing, &key, None).expect_err("missing refused");
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
    }

    #[test]
    fn accepts_the_usual_private_key_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        for label in ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"] {
            let key = dir.path().join("key.pem");
            std::fs::write(
                &key,
                format!("-----BEGIN {label}-----\nAA==\n-----END {label}-----\n"),
            )
            .expect("write");
            assert!(server_config(&cert, &key, Some(&cert)).is_ok(), "{label}");
        }
    }
}
