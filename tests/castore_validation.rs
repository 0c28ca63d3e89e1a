//! Every castore validation rule (PROTOCOL.md §3), each invalid case named,
//! through both wire packages; plus the `DirectoryNode.size` convention.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kiln::castore::{B3Digest, Directory, Node, PathComponent, WireNode};
use kiln::proto::{snix_castore, tvix_castore};
use prost::Message;

fn digest(seed: &[u8]) -> Bytes {
    B3Digest::of(seed).to_bytes()
}

fn dir(name: &[u8]) -> tvix_castore::DirectoryNode {
    tvix_castore::DirectoryNode {
        name: Bytes::copy_from_slice(name),
        digest: digest(name),
        size: 1,
    }
}

fn file(name: &[u8]) -> tvix_castore::FileNode {
    tvix_castore::FileNode {
        name: Bytes::copy_from_slice(name),
        digest: digest(name),
        size: 5,
        executable: false,
    }
}

fn symlink(name: &[u8], target: &[u8]) -> tvix_castore::SymlinkNode {
    tvix_castore::SymlinkNode {
        name: Bytes::copy_from_slice(name),
        target: Bytes::copy_from_slice(target),
    }
}

/// Validates through the tvix package and, re-encoded, through the snix
/// package; both must give the same answer. Returns the error text.
fn check(wire: tvix_castore::Directory) -> Result<Directory, String> {
    let via_snix = snix_castore::Directory::decode(wire.encode_to_vec().as_slice())
        .expect("tvix bytes decode as snix");
    let tvix = Directory::try_from(wire).map_err(|e| e.to_string());
    let snix = Directory::try_from(via_snix).map_err(|e| e.to_string());
    assert_eq!(tvix, snix, "tvix and snix disagree");
    tvix
}

fn refused(wire: tvix_castore::Directory) -> String {
    check(wire).expect_err("must be refused")
}

#[test]
fn valid_directory_is_accepted_and_round_trips() {
    let wire = tvix_castore::Directory {
        directories: vec![dir(b"B"), dir(b"a")],
        files: vec![file(b"c"), file(&[0xc3, 0xa9])],
        symlinks: vec![symlink(b"d", b"../some/where")],
    };
    let directory = check(wire.clone()).expect("valid");
    assert_eq!(directory.len(), 5);
    assert_eq!(tvix_castore::Directory::from(&directory), wire);
    let snix = snix_castore::Directory::from(&directory);
    assert_eq!(snix.encode_to_vec(), wire.encode_to_vec());
}

#[test]
fn name_rules() {
    let with_file = |name: &[u8]| tvix_castore::Directory {
        files: vec![file(name)],
        ..Default::default()
    };
    assert_eq!(refused(with_file(b"")), "files[0].name: empty name");
    assert_eq!(
        refused(with_file(b".")),
        "files[0].name: name \".\" is not allowed"
    );
    assert_eq!(
        refused(with_file(b"..")),
        "files[0].name: name \"..\" is not allowed"
    );
    assert_eq!(
        refused(with_file(b"a/b")),
        "files[0].name: name \"a/b\" contains '/'"
    );
    assert_eq!(
        refused(with_file(b"a\0b")),
        "files[0].name: name \"a\\0b\" contains a NUL byte"
    );
    assert_eq!(
        refused(with_file(&[b'x'; 256])),
        "files[0].name: name is 256 bytes long, at most 255 allowed"
    );
    assert!(
        check(with_file(&[b'x'; 255])).is_ok(),
        "255 bytes is allowed"
    );
    assert!(
        check(with_file(b"...")).is_ok(),
        "'...' is an ordinary name"
    );
}

#[test]
fn each_list_must_be_strictly_sorted() {
    let unsorted_dirs = tvix_castore::Directory {
        directories: vec![dir(b"a"), dir(b"c"), dir(b"b")],
        ..Default::default()
    };
    assert_eq!(
        refused(unsorted_dirs),
        "directories[2].name: not sorted: \"b\" after \"c\""
    );
    let unsorted_files = tvix_castore::Directory {
        files: vec![file(b"b"), file(b"a")],
        ..Default::default()
    };
    assert_eq!(
        refused(unsorted_files),
        "files[1].name: not sorted: \"a\" after \"b\""
    );
    let unsorted_symlinks = tvix_castore::Directory {
        symlinks: vec![symlink(b"z", b"t"), symlink(b"y", b"t")],
        ..Default::default()
    };
    assert_eq!(
        refused(unsorted_symlinks),
        "symlinks[1].name: not sorted: \"y\" after \"z\""
    );
    // Bytewise, not by locale: uppercase sorts before lowercase.
    let bytewise = tvix_castore::Directory {
        files: vec![file(b"a"), file(b"B")],
        ..Default::default()
    };
    assert_eq!(
        refused(bytewise),
        "files[1].name: not sorted: \"B\" after \"a\""
    );
}

#[test]
fn names_must_be_unique_within_and_across_lists() {
    let twice_in_files = tvix_castore::Directory {
        files: vec![file(b"a"), file(b"a")],
        ..Default::default()
    };
    assert_eq!(
        refused(twice_in_files),
        "files[1].name: duplicate name \"a\""
    );
    let dir_and_file = tvix_castore::Directory {
        directories: vec![dir(b"a")],
        files: vec![file(b"a")],
        ..Default::default()
    };
    assert_eq!(refused(dir_and_file), "files[0].name: duplicate name \"a\"");
    let file_and_symlink = tvix_castore::Directory {
        files: vec![file(b"b"), file(b"s")],
        symlinks: vec![symlink(b"s", b"t")],
        ..Default::default()
    };
    assert_eq!(
        refused(file_and_symlink),
        "symlinks[0].name: duplicate name \"s\""
    );
}

#[test]
fn digests_must_be_32_bytes() {
    let mut short = dir(b"a");
    short.digest = Bytes::from(vec![0u8; 31]);
    let wire = tvix_castore::Directory {
        directories: vec![short],
        ..Default::default()
    };
    assert_eq!(refused(wire), "directories[0].digest: 31 bytes, want 32");

    let mut long = file(b"a");
    long.digest = Bytes::from(vec![0u8; 33]);
    let wire = tvix_castore::Directory {
        files: vec![file(b"0"), long],
        ..Default::default()
    };
    assert_eq!(refused(wire), "files[1].digest: 33 bytes, want 32");

    let mut missing = file(b"a");
    missing.digest = Bytes::new();
    let wire = tvix_castore::Directory {
        files: vec![missing],
        ..Default::default()
    };
    assert_eq!(refused(wire), "files[0].digest: 0 bytes, want 32");
}

#[test]
fn symlink_target_rules() {
    let with_target = |target: &[u8]| tvix_castore::Directory {
        symlinks: vec![symlink(b"l", target)],
        ..Default::default()
    };
    assert_eq!(
        refused(with_target(b"")),
        "symlinks[0].target: empty symlink target"
    );
    assert_eq!(
        refused(with_target(b"a\0")),
        "symlinks[0].target: symlink target \"a\\0\" contains a NUL byte"
    );
    assert_eq!(
        refused(with_target(&[b'x'; 4096])),
        "symlinks[0].target: symlink target is 4096 bytes long, at most 4095 allowed"
    );
    assert!(check(with_target(&[b'x'; 4095])).is_ok());
    assert!(check(with_target(b"/absolute/../dangling")).is_ok());
}

#[test]
fn node_messages_of_both_packages() {
    let named = tvix_castore::Node {
        node: Some(tvix_castore::node::Node::File(file(b"hello"))),
    };
    let (name, node) = named.clone().try_into_named().expect("valid");
    assert_eq!(name.as_bytes(), b"hello");
    assert!(matches!(
        node,
        Node::File {
            size: 5,
            executable: false,
            ..
        }
    ));
    assert_eq!(tvix_castore::Node::from_named(&name, &node), named);
    let as_snix = snix_castore::Entry::from_named(&name, &node);
    assert_eq!(as_snix.encode_to_vec(), named.encode_to_vec());
    assert_eq!(
        snix_castore::Entry::decode(named.encode_to_vec().as_slice()).unwrap(),
        as_snix
    );

    let unset = tvix_castore::Node { node: None };
    assert_eq!(
        unset.try_into_named().unwrap_err().to_string(),
        "node: no node kind set (want one of directory, file, symlink)"
    );
    let unset = snix_castore::Entry { entry: None };
    assert!(unset
        .try_into_anonymous()
        .unwrap_err()
        .to_string()
        .starts_with("entry: "));

    let bad_name = tvix_castore::Node {
        node: Some(tvix_castore::node::Node::Directory(dir(b"a/b"))),
    };
    assert_eq!(
        bad_name.try_into_named().unwrap_err().to_string(),
        "directory.name: name \"a/b\" contains '/'"
    );

    // Outputs are anonymous: the name must be empty.
    let anonymous = snix_castore::Entry::from_anonymous(&node);
    assert_eq!(anonymous.clone().try_into_anonymous().unwrap(), node);
    let named_output = snix_castore::Entry::from_named(&name, &node);
    assert_eq!(
        named_output.try_into_anonymous().unwrap_err().to_string(),
        "file.name: name \"hello\" must be empty here"
    );

    let bad_target = tvix_castore::Node {
        node: Some(tvix_castore::node::Node::Symlink(symlink(b"l", b""))),
    };
    assert_eq!(
        bad_target.try_into_named().unwrap_err().to_string(),
        "symlink.target: empty symlink target"
    );
    let mut short = dir(b"d");
    short.digest = Bytes::from_static(b"short");
    let short = tvix_castore::Node {
        node: Some(tvix_castore::node::Node::Directory(short)),
    };
    assert_eq!(
        short.try_into_named().unwrap_err().to_string(),
        "directory.digest: 5 bytes, want 32"
    );
}

#[test]
fn size_kiln_produces_is_snix_twice_entries_plus_child_sizes() {
    assert_eq!(Directory::new().size(), 0);

    let mut leaf = Directory::new();
    leaf.add(name("x"), file_node()).unwrap();
    leaf.add(name("y"), file_node()).unwrap();
    // 2 per entry, no child directories.
    assert_eq!(leaf.size(), 4);

    let mut root = Directory::new();
    root.add(name("sub"), leaf.as_node()).unwrap();
    root.add(name("f"), file_node()).unwrap();
    root.add(
        name("l"),
        Node::Symlink {
            target: b"f"[..].try_into().unwrap(),
        },
    )
    .unwrap();
    root.add(name("e"), Directory::new().as_node()).unwrap();
    // 2 per entry (4 of them) + the children's 4 and 0.
    assert_eq!(root.size(), 2 * 4 + 4);
    assert!(matches!(
        root.get(&name("sub")),
        Some(Node::Directory { size: 4, .. })
    ));

    let mut top = Directory::new();
    top.add(name("root"), root.as_node()).unwrap();
    assert_eq!(top.size(), 2 + 12);
}

#[test]
fn size_saturates_instead_of_overflowing() {
    // Only a client can send such a child size; kiln still answers a size.
    for huge in [u64::MAX, u64::MAX - 1, u64::MAX - 2] {
        let mut directory = Directory::new();
        let node = Node::Directory {
            digest: B3Digest::of(b"child"),
            size: huge,
        };
        directory.add(name("child"), node).unwrap();
        directory.add(name("f"), file_node()).unwrap();
        assert_eq!(directory.size(), u64::MAX, "child size {huge}");
    }
}

#[test]
fn any_structurally_valid_size_is_accepted() {
    for size in [0, 2, 3, 999, u64::MAX] {
        let mut child = dir(b"child");
        child.size = size;
        let wire = tvix_castore::Directory {
            directories: vec![child],
            ..Default::default()
        };
        let directory = check(wire.clone()).expect("size is never refused");
        // And it is kept as sent, so the digest is the client's.
        assert_eq!(directory.encode(), wire.encode_to_vec());
    }
}

#[test]
fn adding_a_taken_name_is_refused() {
    let mut directory = Directory::new();
    directory.add(name("a"), file_node()).unwrap();
    let err = directory
        .add(
            name("a"),
            Node::Symlink {
                target: b"t"[..].try_into().unwrap(),
            },
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "value: duplicate name \"a\"");
}

fn name(text: &str) -> PathComponent {
    PathComponent::try_from(text).unwrap()
}

fn file_node() -> Node {
    Node::File {
        digest: B3Digest::of(b"x"),
        size: 1,
        executable: false,
    }
}
