//! The streaming NAR reader against NARs built here token by token: every
//! kind of node ingests into a real (embedded) castore and serialises back
//! to the same bytes, hash and size; NARs that follow each other in one
//! stream are read one at a time, each stopping at its last byte; and each
//! rule the reader enforces is broken once and refused with its own error.
//! A tree on the host is also compared with `nix-store --dump` when Nix is
//! installed.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io;
use std::path::Path;

use super::*;
use crate::nix::nar::{write_nar, write_path_nar};

// ---------------------------------------------------------------------------
// NARs built token by token, independently of kiln's writers.

/// A tree to write as a NAR. Entries are written in the order given, so a
/// test can break the sorting rule.
#[derive(Debug, Clone)]
enum Tree {
    File(Vec<u8>),
    Exe(Vec<u8>),
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, Tree)>),
}

fn file(contents: &[u8]) -> Tree {
    Tree::File(contents.to_vec())
}

fn exe(contents: &[u8]) -> Tree {
    Tree::Exe(contents.to_vec())
}

fn link(target: &[u8]) -> Tree {
    Tree::Link(target.to_vec())
}

fn dir<const N: usize>(entries: [(&[u8], Tree); N]) -> Tree {
    Tree::Dir(
        entries
            .into_iter()
            .map(|(name, tree)| (name.to_vec(), tree))
            .collect(),
    )
}

/// A chain of `depth` directories, each holding the next as `d`, the last
/// holding a file.
fn chain(depth: usize) -> Tree {
    let mut tree = dir([(b"f", file(b"bottom"))]);
    for _ in 1..depth {
        tree = dir([(b"d", tree)]);
    }
    tree
}

/// A NAR is a sequence of strings; these are the strings of `tree`.
fn tokens(tree: &Tree) -> Vec<Vec<u8>> {
    let mut out = vec![b"nix-archive-1".to_vec()];
    node_tokens(tree, &mut out);
    out
}

fn node_tokens(tree: &Tree, out: &mut Vec<Vec<u8>>) {
    let mut push = |words: &[&[u8]]| out.extend(words.iter().map(|w| w.to_vec()));
    match tree {
        Tree::File(contents) => push(&[b"(", b"type", b"regular", b"contents", contents, b")"]),
        Tree::Exe(contents) => push(&[
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            contents,
            b")",
        ]),
        Tree::Link(target) => push(&[b"(", b"type", b"symlink", b"target", target, b")"]),
        Tree::Dir(entries) => {
            push(&[b"(", b"type", b"directory"]);
            for (name, child) in entries {
                out.extend([b"entry".to_vec(), b"(".to_vec(), b"name".to_vec()]);
                out.push(name.clone());
                out.push(b"node".to_vec());
                node_tokens(child, out);
                out.push(b")".to_vec());
            }
            out.push(b")".to_vec());
        }
    }
}

/// One string as the format writes it: u64 LE length, bytes, zero padding
/// to a multiple of 8.
fn encode_token(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

fn encode(tokens: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        encode_token(&mut out, t);
    }
    out
}

fn nar(tree: &Tree) -> Vec<u8> {
    encode(&tokens(tree))
}

/// `tree`'s NAR with its first token `from` replaced by `to`.
fn with_token_replaced(tree: &Tree, from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut t = tokens(tree);
    let i = t.iter().position(|x| x == from).unwrap();
    t[i] = to.to_vec();
    encode(&t)
}

/// Where the first string equal to `token` starts in `tree`'s NAR.
fn offset_of(tree: &Tree, token: &[u8]) -> usize {
    let t = tokens(tree);
    let i = t.iter().position(|x| x == token).unwrap();
    encode(&t[..i]).len()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The tree every good-path test ingests: each kind of node, an empty file,
/// an empty directory, nesting, a file longer than one blob chunk whose
/// length is not a multiple of 8, names that sort bytewise (`B` < `a`).
fn every_kind() -> Tree {
    let big: Vec<u8> = (0..200_003u32).map(|i| (i % 251) as u8).collect();
    dir([
        (b"B-upper", file(b"sorted before lowercase")),
        (b"big", file(&big)),
        (b"bin", dir([(b"hello", exe(b"#!/bin/sh\necho hello\n"))])),
        (b"empty-dir", dir([])),
        (b"empty-file", file(b"")),
        (
            b"lib",
            dir([(b"nested", dir([(b"deep", dir([(b"leaf", file(b"x"))]))]))]),
        ),
        (b"link", link(b"bin/hello")),
        (
            b"zzz",
            link(b"/nix/store/0bcdfghijklmnpqrsvwxyz0123456789-x"),
        ),
    ])
}

// ---------------------------------------------------------------------------
// A castore and readers.

use crate::castore::from_addr::temp_store as castore;

/// A reader that hands out at most `step` bytes per read and says
/// "not yet" before every other one, as a socket might.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    pending: bool,
}

impl<'a> Trickle<'a> {
    fn new(data: &'a [u8], step: usize) -> Self {
        Trickle {
            data,
            step,
            pending: false,
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.pending = !this.pending;
        if this.pending {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = this.step.min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

async fn ingest_with(
    store: &Store,
    bytes: &[u8],
    limits: &NarLimits,
) -> Result<IngestedNar, NarIngestError> {
    let mut reader = bytes;
    ingest_nar(store, &mut reader, limits).await
}

async fn ingest(store: &Store, bytes: &[u8]) -> Result<IngestedNar, NarIngestError> {
    ingest_with(store, bytes, &NarLimits::default()).await
}

/// Ingests `bytes`, which must be read to the last byte, reports their
/// hash and length, and serialise back to themselves.
async fn round_trip(store: &Store, bytes: &[u8]) -> IngestedNar {
    let mut reader = bytes;
    let ingested = ingest_nar(store, &mut reader, &NarLimits::default())
        .await
        .unwrap();
    assert!(reader.is_empty(), "{} bytes left unread", reader.len());
    assert_eq!(ingested.nar_size, bytes.len() as u64);
    assert_eq!(ingested.nar_sha256, sha256(bytes));
    let mut written = Vec::new();
    write_nar(store, &ingested.node, &mut written)
        .await
        .unwrap();
    assert!(written == bytes, "the NAR written back differs");
    ingested
}

async fn blob(store: &Store, node: &Node) -> Vec<u8> {
    let Node::File { digest, .. } = node else {
        panic!("{node:?} is not a file");
    };
    let mut reader = store.blobs.open_read(digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    reader.reader.read_to_end(&mut out).await.unwrap();
    out
}

async fn directory(store: &Store, node: &Node) -> Directory {
    let Node::Directory { digest, .. } = node else {
        panic!("{node:?} is not a directory");
    };
    store.directories.get(digest).await.unwrap().unwrap()
}

fn child<'a>(d: &'a Directory, name: &str) -> &'a Node {
    d.get(&PathComponent::try_from(name).unwrap())
        .unwrap_or_else(|| panic!("no entry {name}"))
}

// ---------------------------------------------------------------------------
// Good NARs.

#[tokio::test]
async fn a_lone_file_executable_and_symlink_each_ingest() {
    let c = castore();
    let plain = round_trip(&c.store, &nar(&file(b"hello\n"))).await;
    match &plain.node {
        Node::File {
            size, executable, ..
        } => assert_eq!((*size, *executable), (6, false)),
        other => panic!("{other:?}"),
    }
    assert_eq!(blob(&c.store, &plain.node).await, b"hello\n");

    let executable = round_trip(&c.store, &nar(&exe(b"#!/bin/sh\n"))).await;
    match &executable.node {
        Node::File {
            size, executable, ..
        } => assert_eq!((*size, *executable), (10, true)),
        other => panic!("{other:?}"),
    }
    // Same bytes as a plain file would be, one blob.
    let plain_too = round_trip(&c.store, &nar(&file(b"#!/bin/sh\n"))).await;
    let (Node::File { digest: a, .. }, Node::File { digest: b, .. }) =
        (&executable.node, &plain_too.node)
    else {
        panic!("not files");
    };
    assert_eq!(a, b);

    let symlink = round_trip(&c.store, &nar(&link(b"../target"))).await;
    match &symlink.node {
        Node::Symlink { target } => assert_eq!(target.as_bytes(), b"../target"),
        other => panic!("{other:?}"),
    }

    let empty = round_trip(&c.store, &nar(&dir([]))).await;
    assert!(directory(&c.store, &empty.node).await.is_empty());
}

#[tokio::test]
async fn a_tree_of_every_kind_ingests_and_writes_back_byte_for_byte() {
    let c = castore();
    let bytes = nar(&every_kind());
    let ingested = round_trip(&c.store, &bytes).await;

    // The tree is what the NAR said, not only something that serialises
    // the same.
    let root = directory(&c.store, &ingested.node).await;
    let names: Vec<&[u8]> = root.nodes().map(|(n, _)| n.as_bytes()).collect();
    assert_eq!(
        names,
        [
            &b"B-upper"[..],
            b"big",
            b"bin",
            b"empty-dir",
            b"empty-file",
            b"lib",
            b"link",
            b"zzz"
        ]
    );
    let Tree::Dir(entries) = every_kind() else {
        unreachable!()
    };
    let big = entries.iter().find(|(n, _)| n == b"big").unwrap();
    let Tree::File(big) = &big.1 else {
        unreachable!()
    };
    assert_eq!(&blob(&c.store, child(&root, "big")).await, big);
    let bin = directory(&c.store, child(&root, "bin")).await;
    assert!(matches!(
        child(&bin, "hello"),
        Node::File {
            executable: true,
            ..
        }
    ));
    assert!(matches!(
        child(&root, "empty-file"),
        Node::File {
            size: 0,
            executable: false,
            ..
        }
    ));
    match child(&root, "link") {
        Node::Symlink { target } => assert_eq!(target.as_bytes(), b"bin/hello"),
        other => panic!("{other:?}"),
    }
    let lib = directory(&c.store, child(&root, "lib")).await;
    let nested = directory(&c.store, child(&lib, "nested")).await;
    let deep = directory(&c.store, child(&nested, "deep")).await;
    assert_eq!(blob(&c.store, child(&deep, "leaf")).await, b"x");
}

#[tokio::test]
async fn a_reader_that_trickles_gives_the_same_result() {
    let c = castore();
    let bytes = nar(&every_kind());
    let whole = ingest(&c.store, &bytes).await.unwrap();
    for step in [1, 3, 8, 4096] {
        let mut reader = Trickle::new(&bytes, step);
        let trickled = ingest_nar(&c.store, &mut reader, &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(trickled, whole, "step {step}");
        assert!(reader.data.is_empty());
    }
}

#[tokio::test]
async fn nars_back_to_back_are_read_one_at_a_time() {
    let c = castore();
    let first = nar(&every_kind());
    let second = nar(&exe(b"second"));
    let after = b"whatever the protocol sends next";
    let mut stream = [first.clone(), second.clone()].concat();
    stream.extend_from_slice(after);

    for step in [usize::MAX, 5] {
        let mut reader = Trickle::new(&stream, step);
        let one = ingest_nar(&c.store, &mut reader, &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(reader.data, &stream[first.len()..], "left after the first");
        assert_eq!(one.nar_size, first.len() as u64);
        assert_eq!(one.nar_sha256, sha256(&first));

        let two = ingest_nar(&c.store, &mut reader, &NarLimits::default())
            .await
            .unwrap();
        assert_eq!(reader.data, after, "left after the second");
        assert_eq!(two.nar_size, second.len() as u64);
        assert_eq!(two.nar_sha256, sha256(&second));
        assert_eq!(blob(&c.store, &two.node).await, b"second");
    }
}

#[tokio::test]
async fn limits_are_inclusive() {
    let c = castore();
    // Root and two below: three directories.
    let limits = NarLimits {
        max_depth: 3,
        max_entries: 5,
    };
    // Three directories, one file: four entries.
    let ingested = ingest_with(&c.store, &nar(&chain(3)), &limits).await;
    ingested.unwrap();
    let four_files = dir([
        (b"a", file(b"")),
        (b"b", file(b"")),
        (b"c", file(b"")),
        (b"d", file(b"")),
    ]);
    ingest_with(&c.store, &nar(&four_files), &limits)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_default_depth_is_ingested_and_written_back() {
    let c = castore();
    // Deeper than one batch of directories, so some reach the store
    // before their parents are read.
    let depth = NarLimits::default().max_depth;
    round_trip(&c.store, &nar(&chain(depth))).await;
}

#[tokio::test]
async fn the_longest_name_and_target_are_accepted() {
    let c = castore();
    let name = vec![b'n'; 255];
    let target = vec![b't'; 4095];
    let tree = Tree::Dir(vec![(name, Tree::Link(target))]);
    round_trip(&c.store, &nar(&tree)).await;
}

/// A tree on the host, dumped by kiln's host writer and (when installed)
/// by `nix-store --dump`: the same bytes, which ingest and write back.
#[tokio::test]
async fn a_host_tree_dumped_by_nix_round_trips() {
    use std::os::unix::fs::PermissionsExt;
    let c = castore();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(root.join("share/doc/empty")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/run"), b"#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(root.join("bin/run"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(root.join("share/doc/README"), b"read me\n").unwrap();
    std::fs::write(root.join("share/.hidden"), b"").unwrap();
    let large: Vec<u8> = (0..100_001u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(root.join("large"), &large).unwrap();
    std::os::unix::fs::symlink("bin/run", root.join("run")).unwrap();
    std::os::unix::fs::symlink("/nowhere", root.join("dangling")).unwrap();

    let mut kiln = Vec::new();
    write_path_nar(&root, &mut kiln).unwrap();
    round_trip(&c.store, &kiln).await;

    let Some(nix) = nix_store_dump(&root) else {
        return;
    };
    assert!(nix == kiln, "nix-store --dump differs from kiln's host NAR");
    round_trip(&c.store, &nix).await;
}

/// `nix-store --dump path`, or `None` (having said so) without Nix.
fn nix_store_dump(path: &Path) -> Option<Vec<u8>> {
    let nix_store = Path::new("/usr/bin/nix-store");
    if !nix_store.exists() {
        test_skip!("nix-store --dump comparison: /usr/bin/nix-store is not installed");
        return None;
    }
    let out = std::process::Command::new(nix_store)
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

// ---------------------------------------------------------------------------
// Malformed NARs.

#[tokio::test]
async fn a_wrong_magic_is_refused() {
    let c = castore();
    let bytes = with_token_replaced(&file(b"x"), b"nix-archive-1", b"nix-archive-2");
    match ingest(&c.store, &bytes).await {
        Err(NarIngestError::Token { expected, got, .. }) => {
            assert_eq!(expected, "nix-archive-1");
            assert_eq!(got, "nix-archive-2");
        }
        other => panic!("{other:?}"),
    }
    // Not a NAR at all: a huge length is refused without reading (or
    // allocating) that much.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"nix-archive-1");
    match ingest(&c.store, &bytes).await {
        Err(e @ NarIngestError::Token { .. }) => {
            assert!(e.to_string().contains("18446744073709551615 bytes"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ingest(&c.store, b"").await,
        Err(NarIngestError::Truncated { .. })
    ));
}

#[tokio::test]
async fn every_truncation_is_refused() {
    let c = castore();
    let tree = dir([
        (b"a", file(b"hello")),
        (b"b", dir([(b"c", exe(b"abc")), (b"d", link(b"../a"))])),
    ]);
    let bytes = nar(&tree);
    for len in 0..bytes.len() {
        match ingest(&c.store, &bytes[..len]).await {
            Err(NarIngestError::Truncated { .. }) => {}
            other => panic!("cut at {len} of {}: {other:?}", bytes.len()),
        }
    }
    ingest(&c.store, &bytes).await.unwrap();
}

#[tokio::test]
async fn a_cut_inside_file_contents_names_the_file() {
    let c = castore();
    let contents = vec![b'z'; 10_000];
    let tree = dir([(b"sub", dir([(b"data", file(&contents))]))]);
    let bytes = nar(&tree);
    // Into the contents: past the string's length and a few bytes of it.
    let cut = offset_of(&tree, &contents) + 8 + 5_000;
    match ingest(&c.store, &bytes[..cut]).await {
        Err(e @ NarIngestError::Truncated { .. }) => {
            let NarIngestError::Truncated { at } = &e else {
                unreachable!()
            };
            assert_eq!(at, "/sub/data");
            assert_eq!(e.to_string(), "the NAR ends early (at \"/sub/data\")");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn non_zero_padding_is_refused() {
    let c = castore();
    let tree = dir([(b"a", file(b"abc"))]);
    let mut bytes = nar(&tree);
    // The last padding byte after `abc`.
    let contents_end = offset_of(&tree, b"abc") + 8 + 8;
    bytes[contents_end - 1] = 1;
    match ingest(&c.store, &bytes).await {
        Err(NarIngestError::Padding { at }) => assert_eq!(at, "/a"),
        other => panic!("{other:?}"),
    }
    // The padding of a token (the `(` after the magic).
    let mut bytes = nar(&tree);
    let open = offset_of(&tree, b"(") + 8 + 1;
    bytes[open] = b' ';
    assert!(matches!(
        ingest(&c.store, &bytes).await,
        Err(NarIngestError::Padding { .. })
    ));
}

/// An entry name refused by its rule, in the directory `at`.
async fn assert_bad_name(store: &Store, tree: &Tree, at: &str, rule: &str) {
    match ingest(store, &nar(tree)).await {
        Err(e @ NarIngestError::Name { .. }) => {
            let NarIngestError::Name { at: got, why, .. } = &e else {
                unreachable!()
            };
            assert_eq!(got, at, "{e}");
            assert!(why.contains(rule), "{e}");
        }
        other => panic!("{tree:?}: {other:?}"),
    }
}

#[tokio::test]
async fn entries_out_of_order_or_twice_are_refused() {
    let c = castore();
    let unsorted = dir([(b"b", file(b"")), (b"a", file(b""))]);
    assert_bad_name(&c.store, &unsorted, "", "sorted").await;
    let twice = dir([(b"a", file(b"1")), (b"a", file(b"2"))]);
    assert_bad_name(&c.store, &twice, "", "sorted").await;
    // Bytewise, as Nix sorts: `B` (0x42) comes before `a`.
    let lowercase_first = dir([(b"a", file(b"")), (b"B", file(b""))]);
    assert_bad_name(&c.store, &lowercase_first, "", "sorted").await;
    // Also below the root, where the error says which directory.
    let nested = dir([(b"sub", dir([(b"y", file(b"")), (b"x", file(b""))]))]);
    assert_bad_name(&c.store, &nested, "/sub", "sorted").await;
    // The order is per directory: a child's names do not constrain its
    // parent's next entry.
    let fine = dir([(b"m", dir([(b"z", file(b""))])), (b"n", file(b""))]);
    round_trip(&c.store, &nar(&fine)).await;
}

#[tokio::test]
async fn names_that_could_escape_are_refused() {
    let c = castore();
    let cases: [(&[u8], &str); 7] = [
        (b"..", ". or .."),
        (b".", ". or .."),
        (b"a/b", "/ or NUL"),
        (b"/", "/ or NUL"),
        (b"../../etc", "/ or NUL"),
        (b"a\0b", "/ or NUL"),
        (b"", "empty"),
    ];
    for (name, rule) in cases {
        let tree = Tree::Dir(vec![(name.to_vec(), file(b"x"))]);
        assert_bad_name(&c.store, &tree, "", rule).await;
    }
    // A name over 255 bytes is not even read.
    let long = Tree::Dir(vec![(vec![b'n'; 256], file(b"x"))]);
    match ingest(&c.store, &nar(&long)).await {
        Err(NarIngestError::Token { expected, got, .. }) => {
            assert_eq!(expected, "an entry name");
            assert_eq!(got, "a string of 256 bytes");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_symlink_targets_are_refused() {
    let c = castore();
    let cases: [(&[u8], &str); 2] = [(b"", "is empty"), (b"a\0b", "holds NUL")];
    for (target, why) in cases {
        let tree = dir([(b"l", link(target))]);
        match ingest(&c.store, &nar(&tree)).await {
            Err(NarIngestError::Target { at, why: got }) => {
                assert_eq!((at.as_str(), got), ("/l", why));
            }
            other => panic!("{target:?}: {other:?}"),
        }
    }
    let long = link(&vec![b't'; 4096]);
    assert!(matches!(
        ingest(&c.store, &nar(&long)).await,
        Err(NarIngestError::Token {
            expected: "a symlink target",
            ..
        })
    ));
}

#[tokio::test]
async fn unknown_or_misplaced_tokens_are_refused() {
    let c = castore();
    let tree = dir([(b"a", exe(b"x"))]);
    // What each token may be replaced by to break the grammar, and the
    // word the error must say was expected.
    let cases: [(&[u8], &[u8], &str); 9] = [
        (b"directory", b"fifo", "regular, symlink or directory"),
        (b"type", b"kind", "type"),
        (b"entry", b"entries", "entry or )"),
        (b"name", b"nom", "name"),
        (b"node", b"nodes", "node"),
        (b"executable", b"setuid", "contents"),
        (b"", b"yes", ""),
        (b"contents", b"content", "contents"),
        (b"nix-archive-1", b"", "nix-archive-1"),
    ];
    for (from, to, expected) in cases {
        let bytes = with_token_replaced(&tree, from, to);
        match ingest(&c.store, &bytes).await {
            Err(NarIngestError::Token { expected: got, .. }) => {
                assert_eq!(got, expected, "{from:?} -> {to:?}");
            }
            other => panic!("{from:?} -> {to:?}: {other:?}"),
        }
    }
    // An entry not closed: its `)` replaced by the next entry.
    let two = dir([(b"a", file(b"")), (b"b", file(b""))]);
    let mut t = tokens(&two);
    let close = t.iter().rposition(|x| x == b"entry").unwrap() - 1;
    assert_eq!(t[close], b")");
    t.remove(close);
    match ingest(&c.store, &encode(&t)).await {
        Err(NarIngestError::Token { expected, got, .. }) => {
            assert_eq!((expected, got.as_str()), (")", "entry"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn nesting_past_the_limit_is_refused() {
    let c = castore();
    let limits = NarLimits {
        max_depth: 3,
        ..NarLimits::default()
    };
    match ingest_with(&c.store, &nar(&chain(4)), &limits).await {
        Err(NarIngestError::TooDeep(3)) => {}
        other => panic!("{other:?}"),
    }
    // The default limit holds too, and deep input is no danger to the
    // stack.
    let depth = NarLimits::default().max_depth;
    match ingest(&c.store, &nar(&chain(depth + 1))).await {
        Err(NarIngestError::TooDeep(d)) => assert_eq!(d, depth),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn more_entries_than_the_limit_are_refused() {
    let c = castore();
    let limits = NarLimits {
        max_entries: 3,
        ..NarLimits::default()
    };
    let four = dir([(b"a", file(b"")), (b"b", file(b"")), (b"c", file(b""))]);
    match ingest_with(&c.store, &nar(&four), &limits).await {
        Err(NarIngestError::TooManyEntries(3)) => {}
        other => panic!("{other:?}"),
    }
    let three = dir([(b"a", file(b"")), (b"b", file(b""))]);
    ingest_with(&c.store, &nar(&three), &limits).await.unwrap();
}
