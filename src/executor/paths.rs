//! Clean paths as the build protocol uses them: relative paths from the
//! sandbox root (`build`, `nix/store/…-foo`) and absolute host paths
//! (`/dev/kvm`).

use std::fmt;

/// Why a path is not clean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty.
    #[error("is empty")]
    Empty,
    /// A relative path was required.
    #[error("{0:?} is absolute, a relative path is required")]
    Absolute(String),
    /// An absolute path was required.
    #[error("{0:?} is relative, an absolute path is required")]
    Relative(String),
    /// A component is empty, `.` or `..`.
    #[error("{0:?} is not clean (empty, `.` or `..` component)")]
    NotClean(String),
    /// The path holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// The path is longer than Linux accepts.
    #[error("is {0} bytes long, over the 4095-byte limit")]
    TooLong(usize),
}

/// A clean relative path: no leading `/`, no empty, `.` or `..` component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    /// Validates `s` as a clean relative path.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        check_common(s)?;
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        check_components(s, s)?;
        Ok(Self(s.to_owned()))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` equals `base` or lies below it, component-wise.
    pub fn is_within(&self, base: &RelPath) -> bool {
        self.0 == base.0
            || (self.0.starts_with(&base.0) && self.0.as_bytes().get(base.0.len()) == Some(&b'/'))
    }

    /// Joins a single clean component.
    pub fn join(&self, component: &str) -> Result<Self, PathError> {
        Self::parse(&format!("{}/{}", self.0, component))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A clean absolute path: a leading `/` followed by a clean relative path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AbsPath(String);

impl AbsPath {
    /// Validates `s` as a clean absolute path.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        check_common(s)?;
        let Some(rest) = s.strip_prefix('/') else {
            return Err(PathError::Relative(s.to_owned()));
        };
        check_components(rest, s)?;
        Ok(Self(s.to_owned()))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_common(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > 4095 {
        return Err(PathError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(PathError::Nul(s.to_owned()));
    }
    Ok(())
}

fn check_components(rel: &str, whole: &str) -> Result<(), PathError> {
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(PathError::NotClean(whole.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(RelPath::parse("build").is_ok());
        assert!(RelPath::parse("nix/store/abc-foo").is_ok());
        assert_eq!(RelPath::parse(""), Err(PathError::Empty));
        assert!(matches!(
            RelPath::parse("/build"),
            Err(PathError::Absolute(_))
        ));
        for bad in ["a//b", "a/./b", "a/../b", "..", ".", "a/", "a/.."] {
            assert!(
                matches!(RelPath::parse(bad), Err(PathError::NotClean(_))),
                "{bad}"
            );
        }
        assert!(matches!(RelPath::parse("a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            RelPath::parse(&"a".repeat(5000)),
            Err(PathError::TooLong(5000))
        ));
    }

    #[test]
    fn absolute_paths() {
        assert!(AbsPath::parse("/dev/kvm").is_ok());
        assert!(matches!(
            AbsPath::parse("dev/kvm"),
            Err(PathError::Relative(_))
        ));
        assert!(matches!(AbsPath::parse("/"), Err(PathError::NotClean(_))));
        assert!(matches!(
            AbsPath::parse("/dev/../etc"),
            Err(PathError::NotClean(_))
        ));
    }

    #[test]
    fn within() {
        let store = RelPath::parse("nix/store").expect("clean");
        assert!(RelPath::parse("nix/store/x")
            .expect("clean")
            .is_within(&store));
        assert!(store.is_within(&store));
        assert!(!RelPath::parse("nix/storex")
            .expect("clean")
            .is_within(&store));
        assert!(!RelPath::parse("nix").expect("clean").is_within(&store));
    }
}
