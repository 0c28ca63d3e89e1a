//! Ingest -> materialise round trips (bytes, executable bits, symlinks,
//! empty directories, odd names), both ingest modes, hardlinked
//! materialisation from the embedded store, refusals and missing content.

#![allow(clippy::unwrap_used)]

/// `SKIPPED: …` straight to stderr, past libtest's capture, so `make test`
/// shows it.
macro_rules! skip {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {}", format_args!($($arg)*));
    }};
}

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln::castore::ingest::IngestError;
use kiln::castore::materialise::MaterialiseError;
use kiln::castore::{
    from_addr, grpc_services, ingest, materialise, B3Digest, IngestMode, Node, Store,
};

/// Everything about a tree that must survive a round trip, sorted by path.
fn describe(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out.sort();
    out
}

fn walk(path: &Path, relative: &Path, out: &mut Vec<(PathBuf, String)>) {
    let metadata = fs::symlink_metadata(path).unwrap();
    let kind = metadata.file_type();
    let what = if kind.is_symlink() {
        format!("symlink -> {:?}", fs::read_link(path).unwrap())
    } else if kind.is_file() {
        let executable = metadata.permissions().mode() & 0o100 != 0;
        let digest = B3Digest::of(&fs::read(path).unwrap());
        format!("file {digest} {} executable={executable}", metadata.len())
    } else {
        for entry in fs::read_dir(path).unwrap() {
            let entry = entry.unwrap();
            walk(&entry.path(), &relative.join(entry.file_name()), out);
        }
        "directory".to_owned()
    };
    out.push((relative.to_owned(), what));
}

fn write(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with what ingest must keep: sizes from empty to several MiB
/// (memory-mapped hashing), exec bits, nested and empty directories, three
/// kinds of symlink, a non-UTF-8 name, and two files with equal contents.
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("share/doc/empty")).unwrap();
    write(&root.join("bin/tool"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&root.join("bin/user-exec-only"), b"x", 0o700);
    write(&root.join("empty"), b"", 0o644);
    write(&root.join("share/doc/README"), b"read me\n", 0o444);
    write(&root.join("share/doc/COPY"), b"read me\n", 0o644);
    let big: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    write(&root.join("share/big.bin"), &big, 0o644);
    write(
        &root.join(OsStr::from_bytes(b"caf\xe9")),
        b"latin-1 name",
        0o644,
    );
    std::os::unix::fs::symlink("bin/tool", root.join("relative-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("../nowhere", root.join("share/dangling")).unwrap();
}

async fn embedded(dir: &Path) -> Store {
    from_addr("", dir).await.unwrap()
}

#[tokio::test]
async fn copy_round_trip_keeps_everything_and_leaves_the_source() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    sample_tree(&source);
    let before = describe(&source);
    let store = embedded(&work.path().join("store")).await;

    let node = ingest(&store, &source, IngestMode::Copy).await.unwrap();
    assert!(matches!(node, Node::Directory { .. }), "{node:?}");
    assert_eq!(
        describe(&source),
        before,
        "copy mode leaves the source untouched"
    );
    let again = ingest(&store, &source, IngestMode::Copy).await.unwrap();
    assert_eq!(again, node, "ingest is deterministic");

    let target = work.path().join("out");
    materialise(&store, &node, &target).await.unwrap();
    assert_eq!(describe(&target), before);

    // Embedded store: files are hardlinks of read-only blob files; the
    // executable ones of the 0555 variant.
    let tool = fs::metadata(target.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o777, 0o555);
    assert!(tool.nlink() >= 2, "executable materialised as a hardlink");
    let readme = fs::metadata(target.join("share/doc/README")).unwrap();
    let copy = fs::metadata(target.join("share/doc/COPY")).unwrap();
    assert_eq!(readme.mode() & 0o777, 0o444);
    assert_eq!(
        readme.ino(),
        copy.ino(),
        "equal contents share one blob file"
    );
    let blob = store
        .blobs
        .local_path(&B3Digest::of(b"read me\n"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fs::metadata(blob).unwrap().ino(), readme.ino());
}

#[tokio::test]
async fn move_mode_takes_the_files_and_gives_the_same_node() {
    let work = tempfile::tempdir().unwrap();
    let reference = work.path().join("reference");
    let outputs = work.path().join("outputs");
    sample_tree(&reference);
    sample_tree(&outputs);
    let before = describe(&outputs);
    let store = embedded(&work.path().join("store")).await;

    let copied = ingest(&store, &reference, IngestMode::Copy).await.unwrap();
    let fresh_store = embedded(&work.path().join("store2")).await;
    let moved = ingest(&fresh_store, &outputs, IngestMode::Move)
        .await
        .unwrap();
    assert_eq!(moved, copied);
    assert!(
        !outputs.join("share/big.bin").exists(),
        "file bytes were moved into the store"
    );
    assert!(outputs.join("relative-link").is_symlink(), "symlinks stay");

    let target = work.path().join("out");
    materialise(&fresh_store, &moved, &target).await.unwrap();
    assert_eq!(describe(&target), before);
    let big = fresh_store
        .blobs
        .local_path(&B3Digest::of(
            &fs::read(reference.join("share/big.bin")).unwrap(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fs::metadata(big).unwrap().mode() & 0o777, 0o444);
    let leftovers = fs::read_dir(work.path().join("store2/blobs-tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "no temporary files left behind");
}

#[tokio::test]
async fn single_file_and_symlink_roots() {
    let work = tempfile::tempdir().unwrap();
    let store = embedded(&work.path().join("store")).await;
    write(&work.path().join("script"), b"#!/bin/sh\n", 0o755);
    let node = ingest(&store, &work.path().join("script"), IngestMode::Copy)
        .await
        .unwrap();
    assert_eq!(
        node,
        Node::File {
            digest: B3Digest::of(b"#!/bin/sh\n"),
            size: 10,
            executable: true
        }
    );
    materialise(&store, &node, &work.path().join("script-out"))
        .await
        .unwrap();
    assert_eq!(
        fs::read(work.path().join("script-out")).unwrap(),
        b"#!/bin/sh\n"
    );

    std::os::unix::fs::symlink("script", work.path().join("link")).unwrap();
    let node = ingest(&store, &work.path().join("link"), IngestMode::Copy)
        .await
        .unwrap();
    assert!(matches!(&node, Node::Symlink { target } if target.as_bytes() == b"script"));
    materialise(&store, &node, &work.path().join("link-out"))
        .await
        .unwrap();
    assert_eq!(
        fs::read_link(work.path().join("link-out")).unwrap(),
        Path::new("script")
    );
}

#[tokio::test]
async fn fifos_and_sockets_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let store = embedded(&work.path().join("store")).await;
    let tree = work.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    let fifo = tree.join("sub/pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = ingest(&store, &tree, IngestMode::Copy).await.unwrap_err();
    assert!(
        matches!(&err, IngestError::Unsupported { path, kind: "fifo" } if *path == fifo),
        "{err:?}"
    );
    assert!(err.to_string().contains("sub/pipe is a fifo"), "{err}");

    fs::remove_file(&fifo).unwrap();
    let socket = tree.join("sub/sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = ingest(&store, &tree, IngestMode::Copy).await.unwrap_err();
    assert!(
        matches!(err, IngestError::Unsupported { kind: "socket", .. }),
        "{err:?}"
    );

    let err = ingest(&store, &tree.join("absent"), IngestMode::Copy)
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::Inspect { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_content_is_named() {
    let work = tempfile::tempdir().unwrap();
    let store = embedded(&work.path().join("store")).await;
    let unknown = B3Digest::of(b"not here");

    let file = Node::File {
        digest: unknown,
        size: 8,
        executable: false,
    };
    let err = materialise(&store, &file, &work.path().join("f"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MaterialiseError::MissingBlob(d) if d == unknown),
        "{err:?}"
    );
    assert_eq!(err.missing(), Some(("blob", unknown.to_hex())));
    let executable = Node::File {
        digest: unknown,
        size: 8,
        executable: true,
    };
    let err = materialise(&store, &executable, &work.path().join("x"))
        .await
        .unwrap_err();
    assert_eq!(err.missing_digest(), Some(unknown));

    let directory = Node::Directory {
        digest: unknown,
        size: 0,
    };
    let err = materialise(&store, &directory, &work.path().join("d"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MaterialiseError::MissingDirectory(d) if d == unknown),
        "{err:?}"
    );
    assert!(err.to_string().contains(&unknown.to_hex()));

    // A target that exists is not overwritten.
    fs::write(work.path().join("taken"), b"mine").unwrap();
    let empty = kiln::castore::Directory::new();
    store.directories.put(empty.clone()).await.unwrap();
    let err = materialise(&store, &empty.as_node(), &work.path().join("taken"))
        .await
        .unwrap_err();
    assert!(matches!(err, MaterialiseError::Create { .. }), "{err:?}");
    assert_eq!(fs::read(work.path().join("taken")).unwrap(), b"mine");
}

#[tokio::test]
async fn round_trip_through_a_remote_store_copies() {
    let work = tempfile::tempdir().unwrap();
    let server_store = embedded(&work.path().join("server")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("grpc+http://{}", listener.local_addr().unwrap());
    let router =
        grpc_services(server_store.clone()).into_router(&mut tonic::transport::Server::builder());
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let remote = from_addr(&address, Path::new("/nonexistent"))
        .await
        .unwrap();

    let source = work.path().join("source");
    sample_tree(&source);
    let node = ingest(&remote, &source, IngestMode::Copy).await.unwrap();
    let local = ingest(
        &embedded(&work.path().join("local")).await,
        &source,
        IngestMode::Copy,
    )
    .await
    .unwrap();
    assert_eq!(node, local, "same node whichever store");

    let target = work.path().join("out");
    materialise(&remote, &node, &target).await.unwrap();
    assert_eq!(describe(&target), describe(&source));
    let tool = fs::metadata(target.join("bin/tool")).unwrap();
    assert_eq!(tool.nlink(), 1, "remote content is copied, not linked");
    assert_eq!(tool.mode() & 0o777, 0o555);
}

/// Anonymous (heap) memory of this process, in KiB.
fn rss_anon_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn large_files_are_streamed_not_held_in_memory() {
    const SIZE: u64 = 512 * 1024 * 1024;
    let work = tempfile::tempdir().unwrap();
    let store = embedded(&work.path().join("store")).await;
    let source = work.path().join("big");
    fs::create_dir(&source).unwrap();
    let file = fs::File::create(source.join("sparse.img")).unwrap();
    file.set_len(SIZE).unwrap();
    drop(file);

    let baseline = rss_anon_kib();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon_kib());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };
    let node = ingest(&store, &source, IngestMode::Copy).await.unwrap();
    materialise(&store, &node, &work.path().join("out"))
        .await
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();

    assert_eq!(
        fs::metadata(work.path().join("out/sparse.img"))
            .unwrap()
            .len(),
        SIZE
    );
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!(
        "heap grew by {grown_mib} MiB while ingesting a {} MiB file",
        SIZE >> 20
    );
    assert!(
        grown_mib < 64,
        "heap grew by {grown_mib} MiB: the file was buffered"
    );
}

#[tokio::test]
async fn move_mode_across_filesystems_falls_back_to_copying() {
    let work = tempfile::tempdir().unwrap();
    let Ok(other_fs) = tempfile::tempdir_in("/dev/shm") else {
        skip!("move across filesystems, because /dev/shm is not usable here");
        return;
    };
    if fs::metadata(other_fs.path()).unwrap().dev() == fs::metadata(work.path()).unwrap().dev() {
        skip!(
            "move across filesystems, because /dev/shm is on the same filesystem as the temp dir"
        );
        return;
    }
    let store = embedded(&work.path().join("store")).await;
    let outputs = other_fs.path().join("out");
    sample_tree(&outputs);
    let before = describe(&outputs);
    let node = ingest(&store, &outputs, IngestMode::Move).await.unwrap();
    assert!(
        !outputs.join("bin/tool").exists(),
        "moved files are gone from the source"
    );
    let target = work.path().join("back");
    materialise(&store, &node, &target).await.unwrap();
    assert_eq!(describe(&target), before);
}
