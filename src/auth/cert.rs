//! Which tenant a client certificate names (`--tenant-from-cert`).
//!
//! rustls has already verified the certificate against the client CA by the
//! time a call arrives; this only reads a name out of the leaf certificate
//! and checks it is a tenant name ([`crate::tenant::Tenant`]). A
//! certificate that names no tenant by the rule is refused
//! (`UNAUTHENTICATED`), never mapped to a default. Without a rule
//! (`none`, the default) every certificate of the client CA is the tenant
//! `default`, as it was before kiln had tenants.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tenant::Tenant;

/// Where a client certificate's tenant comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CertTenantRule {
    /// No name is read: every certificate is the tenant `default` (`none`,
    /// the default).
    #[default]
    Single,
    /// The subject's common name (`cn`).
    CommonName,
    /// The first DNS subject alternative name ending in `suffix`, without
    /// it (`san-dns:.tenants.example.org`; `san-dns` alone: the whole name).
    SanDns {
        /// Cut from the end of the name.
        suffix: String,
    },
    /// The first URI subject alternative name starting with `prefix`,
    /// without it (`san-uri:spiffe://example.org/tenant/`).
    SanUri {
        /// Cut from the start of the URI.
        prefix: String,
    },
}

impl std::str::FromStr for CertTenantRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "none" => Ok(Self::Single),
            None if s == "cn" => Ok(Self::CommonName),
            None if s == "san-dns" => Ok(Self::SanDns {
                suffix: String::new(),
            }),
            Some(("san-dns", suffix)) => Ok(Self::SanDns {
                suffix: suffix.to_owned(),
            }),
            Some(("san-uri", prefix)) if !prefix.is_empty() => Ok(Self::SanUri {
                prefix: prefix.to_owned(),
            }),
            _ => Err(format!(
                "{s:?} is not a certificate rule: none, cn, san-dns[:SUFFIX] or san-uri:PREFIX"
            )),
        }
    }
}

impl std::fmt::Display for CertTenantRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single => f.write_str("none"),
            Self::CommonName => f.write_str("cn"),
            Self::SanDns { suffix } if suffix.is_empty() => f.write_str("san-dns"),
            Self::SanDns { suffix } => write!(f, "san-dns:{suffix}"),
            Self::SanUri { prefix } => write!(f, "san-uri:{prefix}"),
        }
    }
}

impl CertTenantRule {
    /// The tenant the DER leaf certificate `der` names by this rule, or why
    /// it names none.
    pub fn tenant_of(&self, der: &[u8]) -> Result<Tenant, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| "the client certificate does not parse".to_owned())?;
        let name = match self {
            Self::Single => return Ok(Tenant::default_tenant()),
            Self::CommonName => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            Self::SanDns { suffix } => self.alt_names(&cert).find_map(|name| match name {
                GeneralName::DNSName(dns) => dns.strip_suffix(suffix.as_str()).map(str::to_owned),
                _ => None,
            }),
            Self::SanUri { prefix } => self.alt_names(&cert).find_map(|name| match name {
                GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()).map(str::to_owned),
                _ => None,
            }),
        };
        let name = name.ok_or_else(|| {
            format!("the client certificate names no tenant by --tenant-from-cert {self}")
        })?;
        Tenant::parse(&name)
            .map_err(|e| format!("the client certificate's name by --tenant-from-cert {self}: {e}"))
    }

    fn alt_names<'a>(
        &self,
        cert: &'a X509Certificate<'a>,
    ) -> impl Iterator<Item = &'a GeneralName<'a>> + 'a {
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.contains("://") {
                    rcgen::SanType::URI(s.to_string().try_into().expect("uri"))
                } else {
                    rcgen::SanType::DnsName(s.to_string().try_into().expect("dns"))
                }
            })
            .collect();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn rules_parse_and_print() {
        for text in [
            "none",
            "cn",
            "san-dns",
            "san-dns:.t.example",
            "san-uri:spiffe://x/",
        ] {
            let rule: CertTenantRule = text.parse().expect(text);
            assert_eq!(rule.to_string(), text);
        }
        assert!("san-uri".parse::<CertTenantRule>().is_err());
        assert!("ou".parse::<CertTenantRule>().is_err());
    }

    #[test]
    fn each_rule_reads_its_name() {
        let der = cert(
            "team-a",
            &["b.tenants.example.org", "spiffe://example.org/tenant/c"],
        );
        let of = |rule: &str| {
            rule.parse::<CertTenantRule>()
                .expect("rule")
                .tenant_of(&der)
                .map(|t| t.to_string())
        };
        assert_eq!(of("cn").as_deref(), Ok("team-a"));
        assert_eq!(of("san-dns:.tenants.example.org").as_deref(), Ok("b"));
        assert_eq!(of("san-dns").as_deref(), Ok("b.tenants.example.org"));
        assert_eq!(
            of("san-uri:spiffe://example.org/tenant/").as_deref(),
            Ok("c")
        );
        let none = of("san-uri:spiffe://other/").expect_err("no such name");
        assert!(none.contains("names no tenant"), "{none}");
        let bad = cert("not a tenant", &[]);
        let err = CertTenantRule::CommonName
            .tenant_of(&bad)
            .expect_err("bad name");
        assert!(err.contains("not a tenant name"), "{err}");
        assert!(CertTenantRule::CommonName.tenant_of(b"junk").is_err());
        assert_eq!(
            CertTenantRule::Single
                .tenant_of(&bad)
                .map(|t| t.to_string()),
            Ok("default".to_owned())
        );
    }
}
