//! Nix store paths: `/nix/store/<hash>-<name>`, where `<hash>` is 20 bytes in
//! nixbase32 (32 characters) and `<name>` follows Nix 2.8's name rules.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use super::nixbase32;

pub mod make;

/// The store directory kiln builds for (Nix's default, and what the build
/// protocol's `inputs_dir = nix/store` assumes).
pub const STORE_DIR: &str = "/nix/store";

/// Length of the hash part in characters.
pub const HASH_PART_LEN: usize = 32;

/// Longest name Nix accepts (it keeps a basename within 255 bytes).
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The absolute path does not start with `/nix/store/`.
    #[error("{0:?} is not inside {STORE_DIR}")]
    NotInStore(String),
    /// The basename is too short to hold a hash, a dash and a name.
    #[error("basename {0:?} is too short for `<32-char hash>-<name>`")]
    TooShort(String),
    /// The basename holds non-ASCII characters (no valid store path does).
    #[error("basename {0:?} is not ASCII")]
    NotAscii(String),
    /// The hash part is not nixbase32.
    #[error("hash part of {basename:?} is not nixbase32")]
    Hash {
        /// The offending basename.
        basename: String,
        /// What is wrong with the hash.
        #[source]
        source: nixbase32::DecodeError,
    },
    /// No `-` after the hash part.
    #[error("basename {0:?} has no `-` after its hash part")]
    MissingDash(String),
    /// The name breaks Nix's naming rules.
    #[error("name {name:?} is invalid: {reason}")]
    Name {
        /// The offending name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

/// A parsed store path.
///
/// Ordered as Nix orders store paths: by their string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    hash: [u8; 20],
    name: String,
}

impl StorePath {
    /// Parses an absolute path `/nix/store/<hash>-<name>` (nothing below it).
    pub fn from_absolute_path(path: &str) -> Result<Self, StorePathError> {
        let basename = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        Self::from_basename(basename)
    }

    /// Parses an absolute path that lies in or below a store path
    /// (`/nix/store/<hash>-<name>/bin/sh`), returning the store path and the
    /// rest (`/bin/sh`, or empty).
    pub fn from_absolute_path_prefix(path: &str) -> Result<(Self, &str), StorePathError> {
        let in_store = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        let end = in_store.find('/').unwrap_or(in_store.len());
        let (basename, rest) = in_store.split_at(end);
        Ok((Self::from_basename(basename)?, rest))
    }

    /// Parses a basename `<hash>-<name>`.
    pub fn from_basename(basename: &str) -> Result<Self, StorePathError> {
        if !basename.is_ascii() {
            return Err(StorePathError::NotAscii(basename.to_owned()));
        }
        if basename.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(basename.to_owned()));
        }
        let (hash_part, rest) = basename.split_at(HASH_PART_LEN);
        let hash =
            nixbase32::decode_fixed::<20>(hash_part).map_err(|source| StorePathError::Hash {
                basename: basename.to_owned(),
                source,
            })?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(basename.to_owned()))?;
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Builds a store path from its parts, checking the name.
    pub fn from_parts(hash: [u8; 20], name: &str) -> Result<Self, StorePathError> {
        check_name(name)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// The 20-byte digest.
    pub fn hash(&self) -> &[u8; 20] {
        &self.hash
    }

    /// The hash part as it appears in the path (32 nixbase32 characters).
    pub fn hash_part(&self) -> String {
        nixbase32::encode(&self.hash)
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`: the entry name in `/nix/store`.
    pub fn basename(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute_path(&self) -> String {
        format!("{STORE_DIR}/{}", self.basename())
    }

    /// Whether this is a derivation file (`….drv`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

/// Checks a store path name against Nix 2.8's rules: 1 to 211 characters
/// from `[A-Za-z0-9+-._?=]`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), StorePathError> {
    let fail = |reason| {
        Err(StorePathError::Name {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("it is longer than 211 characters");
    }
    if name.starts_with('.') {
        return fail("it starts with a period");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    if !name.chars().all(allowed) {
        return fail("only A-Z a-z 0-9 and +-._?= are allowed");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_absolute_path())
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_absolute_path(s)
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hash_part()
            .cmp(&other.hash_part())
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    const BUSYBOX: &str = "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-tools";

    #[test]
    fn parses_and_prints() {
        let p: StorePath = BUSYBOX.parse().unwrap();
        assert_eq!(p.name(), "tools");
        assert_eq!(p.hash_part(), "qm8hwphp6fqgwq44gbk5704r93gzs798");
        assert_eq!(p.to_string(), BUSYBOX);
        assert!(!p.is_derivation());
    }

    #[test]
    fn splits_subpaths() {
        let full = format!("{BUSYBOX}/bin/busybox");
        let (p, rest) = StorePath::from_absolute_path_prefix(&full).unwrap();
        assert_eq!(p.name(), "tools");
        assert_eq!(rest, "/bin/busybox");
        let (_, rest) = StorePath::from_absolute_path_prefix(BUSYBOX).unwrap();
        assert_eq!(rest, "");
    }

    #[test]
    fn rejects_bad_paths() {
        let bad = [
            "/nix/store",
            "/usr/bin/qm8hwphp6fqgwq44gbk5704r93gzs798-tools",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798_tools",
            "/nix/store/em8hwphp6fqgwq44gbk5704r93gzs798-tools",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-.hidden",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs798-a b",
            "/nix/store/qm8hwphp6fqgwq44gbk5704r93gzs79é-tools",
        ];
        for path in bad {
            assert!(path.parse::<StorePath>().is_err(), "{path} was accepted");
        }
        let long = format!("{}-{}", "0".repeat(32), "a".repeat(212));
        assert!(StorePath::from_basename(&long).is_err());
        let max = format!("{}-{}", "0".repeat(32), "a".repeat(211));
        assert!(StorePath::from_basename(&max).is_ok());
    }

    #[test]
    fn orders_like_strings() {
        let mut paths: Vec<StorePath> = [
            "/nix/store/zm8hwphp6fqgwq44gbk5704r93gzs798-a",
            "/nix/store/0m8hwphp6fqgwq44gbk5704r93gzs798-b",
            "/nix/store/0m8hwphp6fqgwq44gbk5704r93gzs798-a",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        paths.sort();
        let strings: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut sorted = strings.clone();
        sorted.sort();
        assert_eq!(strings, sorted);
    }
}
