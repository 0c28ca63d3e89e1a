//! Measuring a tree before it is created: a directory DAG of a few KB can
//! stand for millions of entries (a directory may be referenced many times),
//! so what it expands to is computed from the fetched directories alone and
//! checked against the caller's [`Limits`] before anything is written.

use std::collections::HashMap;

use super::MaterialiseError;
use crate::castore::digest::B3Digest;
use crate::castore::directory::Directory;
use crate::castore::node::Node;

/// What a tree expands to on disk: every occurrence of a directory counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expansion {
    /// Entries created (files, symlinks, directories, the root included).
    pub entries: u64,
    /// File bytes.
    pub bytes: u64,
    /// Levels of directories, the root's included.
    pub depth: u64,
}

impl Expansion {
    /// Both trees side by side (saturating).
    pub fn plus(self, other: Expansion) -> Expansion {
        Expansion {
            entries: self.entries.saturating_add(other.entries),
            bytes: self.bytes.saturating_add(other.bytes),
            depth: self.depth.max(other.depth),
        }
    }

    /// The first limit this breaks, as an error.
    pub fn check(&self, limits: &Limits) -> Result<(), MaterialiseError> {
        for (what, value, limit) in [
            ("entries", self.entries, limits.max_entries),
            ("bytes", self.bytes, limits.max_bytes),
            ("levels", self.depth, limits.max_depth),
        ] {
            if value > limit {
                return Err(MaterialiseError::TooLarge { what, value, limit });
            }
        }
        Ok(())
    }
}

/// Bounds on what one materialisation may create. Its `Default`, what
/// `kiln serve` allows a build's inputs, is written with the executor's other
/// defaults in [`crate::executor::config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries in all.
    pub max_entries: u64,
    /// File bytes in all (hardlinked or copied).
    pub max_bytes: u64,
    /// Directory levels (see [`crate::executor::config::defaults::MAX_INPUT_DEPTH`]).
    pub max_depth: u64,
    /// Free bytes the disk must keep while files are copied.
    pub min_free_bytes: u64,
}

impl Limits {
    /// No bounds (for the CLI's export to a directory of the user's).
    pub fn unlimited() -> Self {
        Self {
            max_entries: u64::MAX,
            max_bytes: u64::MAX,
            max_depth: u64::MAX,
            min_free_bytes: 0,
        }
    }
}

/// What `node` expands to, from its fetched `tree`. Each distinct directory
/// is measured once (children before parents, without recursion), so a DAG
/// that expands to 2^18 copies costs 18 steps.
pub fn expansion(
    node: &Node,
    tree: &HashMap<B3Digest, Directory>,
) -> Result<Expansion, MaterialiseError> {
    let root = match node {
        Node::Directory { digest, .. } => *digest,
        Node::File { size, .. } => {
            return Ok(Expansion {
                entries: 1,
                bytes: *size,
                depth: 0,
            })
        }
        Node::Symlink { .. } => {
            return Ok(Expansion {
                entries: 1,
                ..Expansion::default()
            })
        }
    };
    let mut measured: HashMap<B3Digest, Expansion> = HashMap::new();
    let mut stack = vec![root];
    while let Some(&digest) = stack.last() {
        if measured.contains_key(&digest) {
            stack.pop();
            continue;
        }
        let directory = tree
            .get(&digest)
            .ok_or(MaterialiseError::MissingDirectory(digest))?;
        let unmeasured: Vec<B3Digest> = directory
            .child_directories()
            .filter(|c| !measured.contains_key(c))
            .collect();
        if !unmeasured.is_empty() {
            stack.extend(unmeasured);
            continue;
        }
        let mut total = Expansion {
            entries: 1,
            bytes: 0,
            depth: 1,
        };
        for (_, child) in directory.nodes() {
            let e = match child {
                Node::Directory { digest, .. } => {
                    let e = measured[digest];
                    Expansion {
                        depth: e.depth.saturating_add(1),
                        ..e
                    }
                }
                Node::File { size, .. } => Expansion {
                    entries: 1,
                    bytes: *size,
                    depth: 0,
                },
                Node::Symlink { .. } => Expansion {
                    entries: 1,
                    ..Expansion::default()
                },
            };
            total = Expansion {
                entries: total.entries.saturating_add(e.entries),
                bytes: total.bytes.saturating_add(e.bytes),
                depth: total.depth.max(e.depth),
            };
        }
        measured.insert(digest, total);
        stack.pop();
    }
    Ok(measured[&root])
}
