//! Tenants: who a build, a log or a piece of the castore belongs to.
//!
//! Every accepted credential names a [`Tenant`] (see [`crate::auth`]): a
//! token file line `TENANT TOKEN`, a client certificate by the operator's
//! rule, or `default` for a bare token line. The auth layer puts the
//! caller's [`Identity`] into each request's extensions; the services read
//! it with [`Identity::of`]. Without authentication every caller is the one
//! tenant `default` and sees everything, as before tenants existed.
//!
//! What a tenant may see is its [`Identity::scope`]: `None` for a caller
//! who sees everything (an operator, or any caller of a server without
//! authentication), `Some(tenant)` for everyone else.

use std::fmt;
use std::sync::Arc;

use tonic::codegen::http;

/// The tenant of a bare token line, of every caller of a server without
/// authentication, and of the builds and data of such a server.
pub const DEFAULT_TENANT: &str = "default";

/// Longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;

/// A tenant's name: 1 to [`MAX_TENANT_LEN`] ASCII letters, digits, `.`,
/// `_` or `-`, not starting with `.` or `-` (it appears in log lines,
/// metric labels and file names). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

/// A tenant name that breaks the rule of [`Tenant`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a tenant name ({problem})")]
pub struct BadTenant {
    /// The refused name, cut to [`MAX_TENANT_LEN`] characters.
    pub name: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl Tenant {
    /// Checks `name` against the rule of [`Tenant`].
    pub fn parse(name: &str) -> Result<Self, BadTenant> {
        let bad = |problem| BadTenant {
            name: name.chars().take(MAX_TENANT_LEN).collect(),
            problem,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_TENANT_LEN {
            return Err(bad("it is longer than 64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad(
                "only ASCII letters, digits, '.', '_' and '-' are allowed",
            ));
        }
        if name.starts_with(['.', '-']) {
            return Err(bad("it may not start with '.' or '-'"));
        }
        Ok(Self(name.into()))
    }

    /// The tenant `default` ([`DEFAULT_TENANT`]).
    pub fn default_tenant() -> Self {
        Self(DEFAULT_TENANT.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tenant({})", &self.0)
    }
}

impl std::str::FromStr for Tenant {
    type Err = BadTenant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Who is calling: their tenant, and whether they see every tenant's
/// builds and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The tenant the caller's builds run as (limits, the result cache, the
    /// owner of what they store).
    pub tenant: Tenant,
    /// Whether the caller sees everything: an operator credential, or any
    /// caller of a server without authentication.
    pub sees_everything: bool,
}

impl Identity {
    /// A caller of a server without authentication: the tenant `default`,
    /// seeing everything.
    pub fn unauthenticated() -> Self {
        Self {
            tenant: Tenant::default_tenant(),
            sees_everything: true,
        }
    }

    /// A client of `tenant`, who sees only that tenant's builds and data.
    pub fn client(tenant: Tenant) -> Self {
        Self {
            tenant,
            sees_everything: false,
        }
    }

    /// An operator whose own builds run as `tenant`, who sees everything.
    pub fn operator(tenant: Tenant) -> Self {
        Self {
            tenant,
            sees_everything: true,
        }
    }

    /// The identity the auth layer recorded for a request, or
    /// [`Identity::unauthenticated`] when there is none (no authentication
    /// configured: the layer then records nothing).
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions
            .get::<Identity>()
            .cloned()
            .unwrap_or_else(Identity::unauthenticated)
    }

    /// The tenant whose builds and data this caller is limited to; `None`
    /// when it sees everything.
    pub fn scope(&self) -> Option<&Tenant> {
        (!self.sees_everything).then_some(&self.tenant)
    }

    /// Whether this caller may see something belonging to `owner`.
    pub fn may_see(&self, owner: &Tenant) -> bool {
        self.sees_everything || &self.tenant == owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_follow_the_rule() {
        for good in ["a", "team-a", "ci_runner.2", "A9", &"x".repeat(64)] {
            assert_eq!(Tenant::parse(good).expect(good).as_str(), good);
        }
        for (bad, why) in [
            ("", "empty"),
            ("-a", "start"),
            (".a", "start"),
            ("a b", "allowed"),
            ("a/b", "allowed"),
            ("ä", "allowed"),
        ] {
            let e = Tenant::parse(bad).expect_err(bad);
            assert!(e.problem.contains(why), "{bad:?}: {e}");
        }
        let long = "x".repeat(65);
        assert!(Tenant::parse(&long)
            .expect_err("long")
            .to_string()
            .contains("64"));
    }

    #[test]
    fn identities_scope_what_they_see() {
        let a = Tenant::parse("a").expect("a");
        let b = Tenant::parse("b").expect("b");
        let client = Identity::client(a.clone());
        assert_eq!(client.scope(), Some(&a));
        assert!(client.may_see(&a) && !client.may_see(&b));
        let operator = Identity::operator(a.clone());
        assert_eq!(operator.scope(), None);
        assert!(operator.may_see(&b));
        let none = Identity::of(&http::Extensions::new());
        assert_eq!(none, Identity::unauthenticated());
        assert_eq!(none.tenant.as_str(), DEFAULT_TENANT);
        let mut ext = http::Extensions::new();
        ext.insert(client.clone());
        assert_eq!(Identity::of(&ext), client);
    }
}
