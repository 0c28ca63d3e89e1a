//! Validation errors of the castore domain types.
//!
//! Every wire value entering kiln passes through one of the validating
//! constructors in [`crate::castore`]; when it breaks a rule, the error names
//! the field (as a path such as `directories[2].name`) and the rule broken.

use std::fmt;

/// A castore value broke one of the rules of PROTOCOL.md §3.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {violation}")]
pub struct ValidationError {
    /// Where the bad value sits, e.g. `directories[2].name` (empty for a bare value).
    pub field: FieldPath,
    /// The rule it breaks.
    pub violation: Violation,
}

impl ValidationError {
    /// An error about the value itself, with no field path yet.
    pub fn new(violation: Violation) -> Self {
        ValidationError {
            field: FieldPath::default(),
            violation,
        }
    }

    /// Puts `outer` in front of the field path: `name` inside `directories[2]`
    /// becomes `directories[2].name`.
    pub fn within(mut self, outer: impl Into<String>) -> Self {
        self.field.0.insert(0, outer.into());
        self
    }
}

/// A dotted path to a field, outermost first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("value");
        }
        f.write_str(&self.0.join("."))
    }
}

/// The rules of the castore format, one variant per way to break them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A digest that is not exactly 32 bytes long.
    #[error("{0} bytes, want 32")]
    DigestLength(usize),
    /// A digest in text form that is not 64 hex digits.
    #[error("{0:?} is not 64 hex digits")]
    DigestHex(String),
    /// An empty name.
    #[error("empty name")]
    NameEmpty,
    /// A name that is `.` or `..`.
    #[error("name {0:?} is not allowed")]
    NameDot(String),
    /// A name containing `/`.
    #[error("name {0:?} contains '/'")]
    NameSlash(String),
    /// A name containing a NUL byte.
    #[error("name {0:?} contains a NUL byte")]
    NameNul(String),
    /// A name longer than 255 bytes.
    #[error("name is {0} bytes long, at most 255 allowed")]
    NameTooLong(usize),
    /// A name that must be empty (an anonymous node) but is not.
    #[error("name {0:?} must be empty here")]
    NameNotEmpty(String),
    /// An empty symlink target.
    #[error("empty symlink target")]
    TargetEmpty,
    /// A symlink target containing a NUL byte.
    #[error("symlink target {0:?} contains a NUL byte")]
    TargetNul(String),
    /// A symlink target longer than 4095 bytes.
    #[error("symlink target is {0} bytes long, at most 4095 allowed")]
    TargetTooLong(usize),
    /// A list entry whose name does not sort strictly after the one before it.
    #[error("not sorted: {this:?} after {previous:?}")]
    NotSorted {
        /// The name before it in the same list.
        previous: String,
        /// This entry's name.
        this: String,
    },
    /// A name used twice in the same directory, possibly in different lists.
    #[error("duplicate name {0:?}")]
    DuplicateName(String),
    /// A node message with none of directory, file or symlink set.
    #[error("no node kind set (want one of directory, file, symlink)")]
    NodeUnset,
}

/// Shows raw name bytes in an error message (lossy for non-UTF-8 bytes).
pub(crate) fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
