//! [`Directory`]: a validated castore directory and its digest.
//!
//! On the wire a directory is three lists (directories, files, symlinks),
//! each strictly sorted bytewise by name, names unique across the three
//! lists. Inside kiln it is one map from name to [`Node`], which keeps both
//! rules by construction; the lists are rebuilt when encoding.
//!
//! The digest is BLAKE3 of the canonical protobuf encoding of the
//! `tvix.castore.v1.Directory` message (fields in number order, defaults
//! omitted), which is what prost produces. `snix.castore.v1` encodes the same.
//!
//! # The `DirectoryNode.size` convention
//!
//! A `DirectoryNode` records a `size` for the directory it points at, and
//! since the node is encoded in its parent, the size is part of every
//! ancestor's digest. Two conventions exist upstream. The proto comment (and
//! the seed-era code) says *(number of entries) + (sum of the sizes of the
//! child directories)*. snix's castore code (tvix before the rename, since
//! 2024-08) counts every entry twice: *2 × entries + sum of child sizes*,
//! i.e. each file or symlink adds 2 and each directory adds 2 plus its own
//! size, and its validating `DirectoryService` rejects a tree fetched
//! recursively whose sizes differ from that ("wrong size").
//!
//! kiln **writes** snix's value (see [`Directory::size`]) for every
//! directory it creates, all of which get their node from
//! [`Directory::as_node`]: ingest (build outputs, `kiln castore import`, the
//! Nix closure import). So trees kiln writes are accepted by snix's
//! validating clients and services, and the same tree gets the same root
//! digest whether kiln or snix ingested it, so the two stores deduplicate.
//! Both wire packages (`tvix.castore.v1`, `snix.castore.v1`) carry the same
//! value.
//!
//! kiln **accepts** any size a client sends, as long as the message is
//! otherwise valid: the proto calls a larger size harmless, kiln never
//! relies on the value, and it keeps the size as sent, so the digest stays
//! the client's. For the same reason directories stored before kiln changed
//! convention stay readable under their digests: they are stored by digest
//! as received and nothing re-encodes them or recomputes their sizes. (A
//! stored tree with the older sizes is still served as stored, so a
//! validating snix client would refuse that one tree; re-ingesting it gives
//! the snix-convention digest.)

use std::collections::BTreeMap;

use prost::Message;

use super::digest::B3Digest;
use super::errors::{show, ValidationError, Violation};
use super::node::{Node, PathComponent, SymlinkTarget};
use crate::proto::tvix_castore;

/// A validated directory: its children by name, sorted bytewise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    nodes: BTreeMap<PathComponent, Node>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Directory::default()
    }

    /// Adds a child; fails if the name is already taken.
    pub fn add(&mut self, name: PathComponent, node: Node) -> Result<(), ValidationError> {
        if self.nodes.contains_key(&name) {
            return Err(ValidationError::new(Violation::DuplicateName(show(
                name.as_bytes(),
            ))));
        }
        self.nodes.insert(name, node);
        Ok(())
    }

    /// The children, sorted by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&PathComponent, &Node)> {
        self.nodes.iter()
    }

    /// The child called `name`, if any.
    pub fn get(&self, name: &PathComponent) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no children.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Digests of the child directories, in name order.
    pub fn child_directories(&self) -> impl Iterator<Item = B3Digest> + '_ {
        self.nodes.values().filter_map(|node| match node {
            Node::Directory { digest, .. } => Some(*digest),
            _ => None,
        })
    }

    /// The size kiln puts in a `DirectoryNode` pointing here, by snix's
    /// rule: 2 for each file or symlink, 2 plus its recorded size for each
    /// child directory (see the module docs). Saturates at `u64::MAX` rather
    /// than overflowing, which only a client-sent child size can cause.
    pub fn size(&self) -> u64 {
        self.nodes.values().fold(0u64, |sum, node| {
            let entry = match node {
                Node::Directory { size, .. } => size.saturating_add(2),
                Node::File { .. } | Node::Symlink { .. } => 2,
            };
            sum.saturating_add(entry)
        })
    }

    /// The canonical protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        tvix_castore::Directory::from(self).encode_to_vec()
    }

    /// BLAKE3 of [`Directory::encode`].
    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode())
    }

    /// A node pointing at this directory.
    pub fn as_node(&self) -> Node {
        Node::Directory {
            digest: self.digest(),
            size: self.size(),
        }
    }

    /// Builds a directory from the three wire lists, checking every rule.
    /// `lists` holds, per list, its field name and its entries in wire order.
    pub(crate) fn from_wire_lists(
        lists: [(&'static str, Vec<RawEntry>); 3],
    ) -> Result<Directory, ValidationError> {
        let mut nodes = BTreeMap::new();
        for (list, entries) in lists {
            let mut previous: Option<PathComponent> = None;
            for (index, entry) in entries.into_iter().enumerate() {
                let at = format!("{list}[{index}]");
                let name = PathComponent::try_from(entry.name)
                    .map_err(|e| e.within("name").within(at.clone()))?;
                if let Some(previous) = &previous {
                    check_order(previous, &name).map_err(|e| e.within("name").within(&at))?;
                }
                let node = entry.kind.validate().map_err(|e| e.within(&at))?;
                if nodes.contains_key(&name) {
                    let duplicate = Violation::DuplicateName(show(name.as_bytes()));
                    return Err(ValidationError::new(duplicate).within("name").within(at));
                }
                nodes.insert(name.clone(), node);
                previous = Some(name);
            }
        }
        Ok(Directory { nodes })
    }
}

fn check_order(previous: &PathComponent, this: &PathComponent) -> Result<(), ValidationError> {
    let violation = if previous == this {
        Violation::DuplicateName(show(this.as_bytes()))
    } else if previous > this {
        Violation::NotSorted {
            previous: show(previous.as_bytes()),
            this: show(this.as_bytes()),
        }
    } else {
        return Ok(());
    };
    Err(ValidationError::new(violation))
}

/// One list entry as it came off the wire, before validation.
pub(crate) struct RawEntry {
    pub(crate) name: bytes::Bytes,
    pub(crate) kind: RawNode,
}

/// A node as it came off the wire, before validation; field paths in its
/// errors are relative to the node message (`digest`, `target`).
pub(crate) enum RawNode {
    Directory {
        digest: bytes::Bytes,
        size: u64,
    },
    File {
        digest: bytes::Bytes,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: bytes::Bytes,
    },
}

impl RawNode {
    pub(crate) fn validate(self) -> Result<Node, ValidationError> {
        let digest =
            |bytes: &bytes::Bytes| B3Digest::try_from(bytes).map_err(|e| e.within("digest"));
        Ok(match self {
            RawNode::Directory { digest: d, size } => Node::Directory {
                digest: digest(&d)?,
                size,
            },
            RawNode::File {
                digest: d,
                size,
                executable,
            } => Node::File {
                digest: digest(&d)?,
                size,
                executable,
            },
            RawNode::Symlink { target } => Node::Symlink {
                target: SymlinkTarget::try_from(target).map_err(|e| e.within("target"))?,
            },
        })
    }
}
