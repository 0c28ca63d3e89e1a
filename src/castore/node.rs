//! [`Node`], [`PathComponent`] and [`SymlinkTarget`]: a child of a directory,
//! its name, and a symlink's target, each validated on construction.
//!
//! A node carries no name: the name belongs to the directory holding it (or,
//! for a root node, to whoever refers to it, e.g. a store path basename).

use std::fmt;

use bytes::Bytes;

use super::digest::B3Digest;
use super::errors::{show, ValidationError, Violation};

/// Longest allowed name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest allowed symlink target, in bytes.
pub const MAX_TARGET_LEN: usize = 4095;

/// One component of a path: non-empty, not `.` or `..`, no `/`, no NUL,
/// at most 255 bytes. Ordered bytewise, as castore lists are sorted.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathComponent(Bytes);

impl PathComponent {
    /// The raw name bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw name as [`Bytes`] (cheap clone).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// The name as an OS string, to join onto host paths.
    pub fn to_os_str(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(&self.0)
    }
}

impl AsRef<[u8]> for PathComponent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<Bytes> for PathComponent {
    type Error = ValidationError;

    fn try_from(name: Bytes) -> Result<Self, Self::Error> {
        let violation = if name.is_empty() {
            Violation::NameEmpty
        } else if name.as_ref() == b"." || name.as_ref() == b".." {
            Violation::NameDot(show(&name))
        } else if name.contains(&b'/') {
            Violation::NameSlash(show(&name))
        } else if name.contains(&0) {
            Violation::NameNul(show(&name))
        } else if name.len() > MAX_NAME_LEN {
            Violation::NameTooLong(name.len())
        } else {
            return Ok(PathComponent(name));
        };
        Err(ValidationError::new(violation))
    }
}

impl TryFrom<&[u8]> for PathComponent {
    type Error = ValidationError;

    fn try_from(name: &[u8]) -> Result<Self, Self::Error> {
        PathComponent::try_from(Bytes::copy_from_slice(name))
    }
}

impl TryFrom<&str> for PathComponent {
    type Error = ValidationError;

    fn try_from(name: &str) -> Result<Self, Self::Error> {
        PathComponent::try_from(name.as_bytes())
    }
}

impl fmt::Display for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A symlink target, kept as raw bytes: non-empty, no NUL, at most 4095 bytes.
/// It may be absolute or relative and may point anywhere (even nowhere).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SymlinkTarget(Bytes);

impl SymlinkTarget {
    /// The raw target bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw target as [`Bytes`] (cheap clone).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl TryFrom<Bytes> for SymlinkTarget {
    type Error = ValidationError;

    fn try_from(target: Bytes) -> Result<Self, Self::Error> {
        let violation = if target.is_empty() {
            Violation::TargetEmpty
        } else if target.contains(&0) {
            Violation::TargetNul(show(&target))
        } else if target.len() > MAX_TARGET_LEN {
            Violation::TargetTooLong(target.len())
        } else {
            return Ok(SymlinkTarget(target));
        };
        Err(ValidationError::new(violation))
    }
}

impl TryFrom<&[u8]> for SymlinkTarget {
    type Error = ValidationError;

    fn try_from(target: &[u8]) -> Result<Self, Self::Error> {
        SymlinkTarget::try_from(Bytes::copy_from_slice(target))
    }
}

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A castore node without its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// A directory, referred to by the digest of its [`super::Directory`].
    Directory {
        /// BLAKE3 of the directory's canonical encoding.
        digest: B3Digest,
        /// Entry count of the subtree, see the module docs of
        /// [`super::directory`] for the convention kiln produces and accepts.
        size: u64,
    },
    /// A regular file.
    File {
        /// BLAKE3 of the file's contents.
        digest: B3Digest,
        /// Length of the contents in bytes.
        size: u64,
        /// Whether the file is executable.
        executable: bool,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: SymlinkTarget,
    },
}

impl Node {
    /// A short word for the kind of node, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Directory { .. } => "directory",
            Node::File { .. } => "file",
            Node::Symlink { .. } => "symlink",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name_violation(name: &[u8]) -> Violation {
        PathComponent::try_from(name).unwrap_err().violation
    }

    #[test]
    fn good_names_pass() {
        for name in [
            &b"a"[..],
            b"...",
            b".hidden",
            b"foo bar",
            &[0xff, 0xfe],
            &[b'x'; 255],
        ] {
            assert!(PathComponent::try_from(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn each_bad_name_is_named() {
        assert_eq!(name_violation(b""), Violation::NameEmpty);
        assert_eq!(name_violation(b"."), Violation::NameDot(".".into()));
        assert_eq!(name_violation(b".."), Violation::NameDot("..".into()));
        assert_eq!(name_violation(b"a/b"), Violation::NameSlash("a/b".into()));
        assert_eq!(name_violation(b"a\0b"), Violation::NameNul("a\0b".into()));
        assert_eq!(name_violation(&[b'x'; 256]), Violation::NameTooLong(256));
    }

    #[test]
    fn each_bad_target_is_named() {
        let violation = |t: &[u8]| SymlinkTarget::try_from(t).unwrap_err().violation;
        assert_eq!(violation(b""), Violation::TargetEmpty);
        assert_eq!(violation(b"/a\0"), Violation::TargetNul("/a\0".into()));
        assert_eq!(violation(&[b'x'; 4096]), Violation::TargetTooLong(4096));
        assert!(SymlinkTarget::try_from(&[b'x'; 4095][..]).is_ok());
        assert!(SymlinkTarget::try_from(&b"../../a/./b//"[..]).is_ok());
    }

    #[test]
    fn names_sort_bytewise() {
        let upper = PathComponent::try_from("B").unwrap();
        let lower = PathComponent::try_from("a").unwrap();
        let high = PathComponent::try_from(&[0xc3, 0xa9][..]).unwrap();
        assert!(upper < lower && lower < high);
    }
}
