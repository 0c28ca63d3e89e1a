//! Credentials made at test time: a CA per role with leaf certificates
//! (rcgen), token files, and the server and client security built from them.

use std::path::PathBuf;

use kiln::auth::{Security, SecurityOptions};
use kiln::client::{ClientSecurity, ClientSecurityOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The token the servers accept.
pub const TOKEN: &str = "kiln-test-token-0123456789";

/// Files a test writes: token files, PEM certificates and keys.
pub struct Files(pub tempfile::TempDir);

impl Files {
    pub fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// A CA and what it signed.
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        self.leaf_named("kiln test", names, usage)
    }

    fn leaf_named(
        &self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn server_leaf(&self) -> (String, String) {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn client_leaf(&self) -> (String, String) {
        self.leaf(&["builder.example"], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate whose subject CN is `common_name`.
    pub fn client_leaf_named(&self, common_name: &str) -> (String, String) {
        self.leaf_named(
            common_name,
            &["builder.example"],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// Server security: TLS from `pki` (if any), client CA, token file.
pub fn server_security(
    files: &Files,
    pki: Option<&Pki>,
    client_ca: Option<&Pki>,
    tokens: Option<&str>,
) -> Security {
    let mut options = SecurityOptions::default();
    if let Some(pki) = pki {
        let (cert, key) = pki.server_leaf();
        options.tls_cert = Some(files.write("server.pem", &cert));
        options.tls_key = Some(files.write("server.key", &key));
    }
    if let Some(ca) = client_ca {
        options.tls_client_ca = Some(files.write("client-ca.pem", &ca.ca_pem));
    }
    if let Some(tokens) = tokens {
        options.auth_tokens = Some(files.write("tokens", tokens));
    }
    Security::load(&options).unwrap()
}

/// Client security: trust `ca` (if any), present `identity`, send `token`.
pub fn client_security(
    files: &Files,
    ca: Option<&Pki>,
    identity: Option<(String, String)>,
    token: Option<&str>,
) -> ClientSecurity {
    let unique = uuid::Uuid::new_v4();
    let mut options = ClientSecurityOptions::default();
    if let Some(ca) = ca {
        options.tls_ca = Some(files.write(&format!("ca-{unique}.pem"), &ca.ca_pem));
    }
    if let Some((cert, key)) = identity {
        options.tls_cert = Some(files.write(&format!("client-{unique}.pem"), &cert));
        options.tls_key = Some(files.write(&format!("client-{unique}.key"), &key));
    }
    if let Some(token) = token {
        options.token_file = Some(files.write(&format!("token-{unique}"), token));
    }
    ClientSecurity::load(&options).unwrap()
}
