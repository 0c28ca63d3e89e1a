//! Conversions between the domain types and both wire packages,
//! `tvix.castore.v1` (`Node`, `DirectoryNode`, …) and `snix.castore.v1`
//! (`Entry`, `DirectoryEntry`, …). The two are identical on the wire; one
//! macro writes the field copies for both, all checking happens in
//! [`super::directory`] and [`super::node`].
//!
//! Names and symlink targets are copied out of the wire message
//! ([`unshare`]): tonic decodes `bytes` fields as slices of the whole
//! received message, so one validated name kept for the life of a build (or
//! a queued request) would otherwise keep the entire message (up to the
//! 64 MiB limit) alive.

use super::directory::{Directory, RawEntry, RawNode};
use super::errors::{show, ValidationError, Violation};
use super::node::{Node, PathComponent};
use crate::proto::{snix_castore, tvix_castore};

/// A wire node message (`tvix.castore.v1.Node` or `snix.castore.v1.Entry`):
/// a name plus one of directory, file or symlink.
pub trait WireNode: Sized {
    /// Validates a named node (e.g. a build input): the name must be a valid
    /// [`PathComponent`].
    fn try_into_named(self) -> Result<(PathComponent, Node), ValidationError>;
    /// Validates an anonymous node (e.g. a build output): the name must be empty.
    fn try_into_anonymous(self) -> Result<Node, ValidationError>;
    /// The wire message for `node` called `name`.
    fn from_named(name: &PathComponent, node: &Node) -> Self;
    /// The wire message for `node` with an empty name.
    fn from_anonymous(node: &Node) -> Self;
}

macro_rules! wire_conversions {
    ($pkg:ident, $oneof:ident, $field:ident, $Wrapper:ident, $Dir:ident, $File:ident, $Sym:ident) => {
        impl TryFrom<$pkg::Directory> for Directory {
            type Error = ValidationError;

            fn try_from(wire: $pkg::Directory) -> Result<Self, Self::Error> {
                let directories = wire.directories.into_iter().map(|d| RawEntry {
                    name: unshare(d.name),
                    kind: RawNode::Directory {
                        digest: d.digest,
                        size: d.size,
                    },
                });
                let files = wire.files.into_iter().map(|f| RawEntry {
                    name: unshare(f.name),
                    kind: RawNode::File {
                        digest: f.digest,
                        size: f.size,
                        executable: f.executable,
                    },
                });
                let symlinks = wire.symlinks.into_iter().map(|s| RawEntry {
                    name: unshare(s.name),
                    kind: RawNode::Symlink {
                        target: unshare(s.target),
                    },
                });
                Directory::from_wire_lists([
                    ("directories", directories.collect()),
                    ("files", files.collect()),
                    ("symlinks", symlinks.collect()),
                ])
            }
        }

        impl From<&Directory> for $pkg::Directory {
            fn from(directory: &Directory) -> Self {
                let mut wire = $pkg::Directory::default();
                for (name, node) in directory.nodes() {
                    let name = name.to_bytes();
                    match node.clone() {
                        Node::Directory { digest, size } => wire.directories.push($pkg::$Dir {
                            name,
                            digest: digest.to_bytes(),
                            size,
                        }),
                        Node::File {
                            digest,
                            size,
                            executable,
                        } => wire.files.push($pkg::$File {
                            name,
                            digest: digest.to_bytes(),
                            size,
                            executable,
                        }),
                        Node::Symlink { target } => wire.symlinks.push($pkg::$Sym {
                            name,
                            target: target.to_bytes(),
                        }),
                    }
                }
                wire
            }
        }

        impl WireNode for $pkg::$Wrapper {
            fn try_into_named(self) -> Result<(PathComponent, Node), ValidationError> {
                let (name, raw) = split(self)?;
                let name =
                    PathComponent::try_from(name).map_err(|e| e.within("name").within(raw.0))?;
                Ok((name, validate(raw)?))
            }

            fn try_into_anonymous(self) -> Result<Node, ValidationError> {
                let (name, raw) = split(self)?;
                if !name.is_empty() {
                    let violation = Violation::NameNotEmpty(show(&name));
                    return Err(ValidationError::new(violation).within("name").within(raw.0));
                }
                validate(raw)
            }

            fn from_named(name: &PathComponent, node: &Node) -> Self {
                wrap(name.to_bytes(), node)
            }

            fn from_anonymous(node: &Node) -> Self {
                wrap(bytes::Bytes::new(), node)
            }
        }

        /// The name and the raw node of a wire node, with the oneof variant's
        /// field name for error paths.
        fn split(
            wire: $pkg::$Wrapper,
        ) -> Result<(bytes::Bytes, (&'static str, RawNode)), ValidationError> {
            use $pkg::$oneof::$Wrapper as Kind;
            match wire.$field {
                None => Err(ValidationError::new(Violation::NodeUnset).within(stringify!($field))),
                Some(Kind::Directory(d)) => Ok((
                    unshare(d.name),
                    (
                        "directory",
                        RawNode::Directory {
                            digest: d.digest,
                            size: d.size,
                        },
                    ),
                )),
                Some(Kind::File(f)) => Ok((
                    unshare(f.name),
                    (
                        "file",
                        RawNode::File {
                            digest: f.digest,
                            size: f.size,
                            executable: f.executable,
                        },
                    ),
                )),
                Some(Kind::Symlink(s)) => Ok((
                    unshare(s.name),
                    (
                        "symlink",
                        RawNode::Symlink {
                            target: unshare(s.target),
                        },
                    ),
                )),
            }
        }

        fn validate((kind, raw): (&'static str, RawNode)) -> Result<Node, ValidationError> {
            raw.validate().map_err(|e| e.within(kind))
        }

        pub(super) fn wrap(name: bytes::Bytes, node: &Node) -> $pkg::$Wrapper {
            use $pkg::$oneof::$Wrapper as Kind;
            let kind = match node.clone() {
                Node::Directory { digest, size } => Kind::Directory($pkg::$Dir {
                    name,
                    digest: digest.to_bytes(),
                    size,
                }),
                Node::File {
                    digest,
                    size,
                    executable,
                } => Kind::File($pkg::$File {
                    name,
                    digest: digest.to_bytes(),
                    size,
                    executable,
                }),
                Node::Symlink { target } => Kind::Symlink($pkg::$Sym {
                    name,
                    target: target.to_bytes(),
                }),
            };
            $pkg::$Wrapper { $field: Some(kind) }
        }
    };
}

/// `bytes` in storage of its own, no longer pinning the message it was
/// decoded from (see the module docs). Names and targets are short, so the
/// copy is cheap.
fn unshare(bytes: bytes::Bytes) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&bytes)
}

mod tvix {
    use super::*;
    wire_conversions!(
        tvix_castore,
        node,
        node,
        Node,
        DirectoryNode,
        FileNode,
        SymlinkNode
    );
}

mod snix {
    use super::*;
    wire_conversions!(
        snix_castore,
        entry,
        entry,
        Entry,
        DirectoryEntry,
        FileEntry,
        SymlinkEntry
    );
}

/// Shorthands for the build layer, which names nodes with raw bytes.
impl Node {
    /// Validates a named `tvix.castore.v1.Node`.
    pub fn try_from_tvix_node(
        wire: tvix_castore::Node,
    ) -> Result<(PathComponent, Node), ValidationError> {
        wire.try_into_named()
    }

    /// Validates a named `snix.castore.v1.Entry`.
    pub fn try_from_snix_entry(
        wire: snix_castore::Entry,
    ) -> Result<(PathComponent, Node), ValidationError> {
        wire.try_into_named()
    }

    /// This node as a `tvix.castore.v1.Node` called `name` (empty for an
    /// anonymous node; not checked, the caller vouches for it).
    pub fn to_tvix_node(&self, name: &[u8]) -> tvix_castore::Node {
        tvix::wrap(bytes::Bytes::copy_from_slice(name), self)
    }

    /// This node as a `snix.castore.v1.Entry` called `name` (empty for an
    /// anonymous node; not checked, the caller vouches for it).
    pub fn to_snix_entry(&self, name: &[u8]) -> snix_castore::Entry {
        snix::wrap(bytes::Bytes::copy_from_slice(name), self)
    }
}

/// Fuzzing entry point: arbitrary bytes decoded as castore messages of both
/// packages and validated. Must never panic (fuzz/ and tests/fuzz_smoke.rs
/// drive it).
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    use prost::Message;
    if let Ok(d) = tvix_castore::Directory::decode(data) {
        if let Ok(dir) = Directory::try_from(d) {
            // Valid directories re-encode to what they digest.
            let _ = dir.digest();
        }
    }
    if let Ok(d) = snix_castore::Directory::decode(data) {
        let _ = Directory::try_from(d);
    }
    if let Ok(n) = tvix_castore::Node::decode(data) {
        let _ = n.clone().try_into_named();
        let _ = n.try_into_anonymous();
    }
    if let Ok(e) = snix_castore::Entry::decode(data) {
        let _ = e.clone().try_into_named();
        let _ = e.try_into_anonymous();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn inside(message: &bytes::Bytes, field: &[u8]) -> bool {
        message.as_ptr_range().contains(&field.as_ptr())
    }

    #[test]
    fn validated_names_and_targets_do_not_point_into_the_message() {
        let entry = snix_castore::Entry {
            entry: Some(snix_castore::entry::Entry::Symlink(
                snix_castore::SymlinkEntry {
                    name: bytes::Bytes::from_static(b"name"),
                    target: bytes::Bytes::from_static(b"target"),
                },
            )),
        };
        let message = bytes::Bytes::from(entry.encode_to_vec());
        // Decoding from `Bytes`, as tonic does, slices `bytes` fields out of
        // the message.
        let decoded = snix_castore::Entry::decode(message.clone()).expect("decodes");
        let (name, node) = decoded.try_into_named().expect("valid");
        let Node::Symlink { target } = node else {
            panic!("a symlink")
        };
        assert!(!inside(&message, name.as_bytes()));
        assert!(!inside(&message, target.as_bytes()));

        let directory = tvix_castore::Directory {
            symlinks: vec![tvix_castore::SymlinkNode {
                name: bytes::Bytes::from_static(b"link"),
                target: bytes::Bytes::from_static(b"target"),
            }],
            ..Default::default()
        };
        let message = bytes::Bytes::from(directory.encode_to_vec());
        let decoded = tvix_castore::Directory::decode(message.clone()).expect("decodes");
        let directory = Directory::try_from(decoded).expect("valid");
        for (name, node) in directory.nodes() {
            assert!(!inside(&message, name.as_bytes()));
            if let Node::Symlink { target } = node {
                assert!(!inside(&message, target.as_bytes()));
            }
        }
    }
}
