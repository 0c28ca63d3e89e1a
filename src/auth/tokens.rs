//! Token files: which bearer tokens are accepted, and the tenant each one
//! names.
//!
//! A line is `TENANT TOKEN` or a bare `TOKEN` (the tenant `default`, so
//! that files written before tenants existed stay valid); surrounding
//! whitespace is ignored, blank lines and lines starting with `#` are
//! skipped. A token is printable ASCII without spaces (it travels in an
//! HTTP header). Tokens are kept only as SHA-256 digests, and every
//! accepted token is compared on every call, in constant time.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::AuthError;
use crate::tenant::Tenant;

/// Accepted bearer tokens and their tenants.
pub struct Tokens {
    /// Each token's digest and tenant, in file order.
    entries: Vec<([u8; 32], Tenant)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.entries.len())
    }
}

impl Tokens {
    /// Reads a token file (see the module docs). Errors name the file and
    /// line, never the token.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AuthError::ReadTokens(path.to_owned(), e))?;
        warn_if_readable_by_others(path);
        let bad = |line, problem| AuthError::BadToken {
            path: path.to_owned(),
            line,
            problem,
        };
        let mut entries: Vec<([u8; 32], Tenant)> = Vec::new();
        let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (tenant, token) = match line.split_ascii_whitespace().collect::<Vec<_>>()[..] {
                [token] => (Tenant::default_tenant(), token),
                [tenant, token] => (
                    Tenant::parse(tenant).map_err(|_| {
                        bad(
                            index + 1,
                            "the tenant name may hold only ASCII letters, digits, '.', '_' and '-' (at most 64, not starting with '.' or '-')",
                        )
                    })?,
                    token,
                ),
                _ => {
                    return Err(bad(
                        index + 1,
                        "a line is `TENANT TOKEN` or a bare `TOKEN` (a token has no spaces)",
                    ))
                }
            };
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    index + 1,
                    "a token must be printable ASCII without spaces",
                ));
            }
            let digest = digest(token.as_bytes());
            if let Some(&first) = seen.get(&digest) {
                if entries[first].1 != tenant {
                    return Err(bad(
                        index + 1,
                        "this token is already given to another tenant on an earlier line",
                    ));
                }
                continue;
            }
            seen.insert(digest, entries.len());
            entries.push((digest, tenant));
        }
        if entries.is_empty() {
            return Err(AuthError::NoTokens(path.to_owned()));
        }
        Ok(Self { entries })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is accepted (never true for a loaded file).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `presented` if it is an accepted token. Every accepted
    /// token is compared, in constant time, and the match is picked without
    /// a branch, so timing reveals neither which token matched nor how much
    /// of one did.
    pub fn tenant_of(&self, presented: &[u8]) -> Option<Tenant> {
        let presented = digest(presented);
        let mut matched = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, (accepted, _)) in self.entries.iter().enumerate() {
            let here = accepted.ct_eq(&presented);
            index = u64::conditional_select(&index, &(i as u64), here);
            matched |= here;
        }
        bool::from(matched).then(|| self.entries[index as usize].1.clone())
    }

    /// Whether `presented` is an accepted token.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.tenant_of(presented).is_some()
    }

    /// How many of these tokens `other` does not accept (under the same
    /// tenant).
    pub(super) fn not_in(&self, other: &Tokens) -> usize {
        self.entries
            .iter()
            .filter(|entry| !other.entries.contains(entry))
            .count()
    }

    /// The tenants these tokens name, each once.
    pub fn tenants(&self) -> Vec<Tenant> {
        let mut tenants: Vec<Tenant> = self.entries.iter().map(|(_, t)| t.clone()).collect();
        tenants.sort();
        tenants.dedup();
        tenants
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the token file is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn token_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn bare_token_lines_are_the_default_tenant() {
        let (_dir, path) = token_file("# operators\n  alpha-token  \n\nbeta\n");
        let tokens = Tokens::from_file(&path).expect("loads");
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.tenant_of(b"alpha-token"),
            Some(Tenant::default_tenant())
        );
        assert!(tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"alpha"));
        assert!(!tokens.accepts(b"beta "));
        assert!(!tokens.accepts(b"# operators"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn tenant_lines_name_their_tenant() {
        let (_dir, path) = token_file("team-a  tok-a\nteam-b\ttok-b\nbare\nteam-a tok-a2\n");
        let tokens = Tokens::from_file(&path).expect("loads");
        let name = |t: &[u8]| tokens.tenant_of(t).map(|t| t.to_string());
        assert_eq!(name(b"tok-a").as_deref(), Some("team-a"));
        assert_eq!(name(b"tok-a2").as_deref(), Some("team-a"));
        assert_eq!(name(b"tok-b").as_deref(), Some("team-b"));
        assert_eq!(name(b"bare").as_deref(), Some("default"));
        assert_eq!(name(b"team-a"), None);
        let tenants: Vec<String> = tokens.tenants().iter().map(|t| t.to_string()).collect();
        assert_eq!(tenants, ["default", "team-a", "team-b"]);
    }

    #[test]
    fn token_file_errors_name_the_problem() {
        let (_dir, path) = token_file("\n# nothing\n");
        assert!(matches!(
            Tokens::from_file(&path),
            Err(AuthError::NoTokens(_))
        ));
        for (text, line, says) in [
            ("good\nhas s3cr3t spaces\n", 2, "TENANT TOKEN"),
            ("good\nbad/tenant s3cr3t\n", 2, "tenant name"),
            ("a s3cr3t\nb s3cr3t\n", 2, "another tenant"),
            ("a s3c\u{7f}r3t\n", 1, "printable"),
        ] {
            let (_dir, path) = token_file(text);
            let err = Tokens::from_file(&path).expect_err(text).to_string();
            assert!(err.contains(&format!("line {line}")), "{err}");
            assert!(err.contains(says), "{text:?}: {err}");
            assert!(!err.contains("s3c"), "token leaked: {err}");
        }
        // The same token twice for one tenant is harmless.
        let (_dir, path) = token_file("a tok\na tok\n");
        assert_eq!(Tokens::from_file(&path).expect("loads").len(), 1);
        let err = Tokens::from_file(Path::new("/nonexistent/tokens")).expect_err("missing");
        assert!(matches!(err, AuthError::ReadTokens(..)));
    }
}
