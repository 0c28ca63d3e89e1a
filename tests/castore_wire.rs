//! Field numbers and digests checked against bytes assembled by hand, not by
//! the generated code: castore (both packages), `tvix.build.v1` (the seed's
//! layout) and `snix.build.v1` (PROTOCOL.md §1-3).
//!
//! The pinned digests were computed independently of kiln, with Python and
//! the `blake3` PyPI package (blake3 1.x) over the hand-assembled bytes, e.g.
//! for the one-file directory:
//!
//! ```text
//! d  = blake3(b"hello\n").digest()
//! fn = b"\x0a\x09hello.txt" + b"\x12\x20" + d + b"\x18\x06"
//! blake3(b"\x12" + bytes([len(fn)]) + fn).hexdigest()
//! ```
//!
//! and for the nested one, whose `DirectoryNode.size` follows snix's rule
//! (`sub` holds one file and no directories: 2 × 1 entry = 2):
//!
//! ```text
//! one = b"\x12" + bytes([len(fn)]) + fn
//! dn = b"\x0a\x03sub" + b"\x12\x20" + blake3(one).digest() + b"\x18\x02"
//! ln = b"\x0a\x04link" + b"\x12\x09hello.txt"
//! blake3(b"\x0a" + bytes([len(dn)]) + dn + b"\x1a" + bytes([len(ln)]) + ln).hexdigest()
//! ```
//!
//! (With the proto comment's size 1 instead, the same bytes hash to
//! `18dde1f8…228e97`, the value pinned here before kiln wrote snix's sizes.)

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use kiln::castore::{B3Digest, Directory, Node, PathComponent, SymlinkTarget, WireNode};
use kiln::proto::{snix_build, snix_castore, tvix_build, tvix_castore};
use prost::Message;

/// A varint, the protobuf way.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Field `number` with wire type 2 (length-delimited).
fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = varint(number << 3 | 2);
    out.extend(varint(payload.len() as u64));
    out.extend_from_slice(payload);
    out
}

/// Field `number` with wire type 0 (varint).
fn varint_field(number: u64, value: u64) -> Vec<u8> {
    let mut out = varint(number << 3);
    out.extend(varint(value));
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

const EMPTY_DIRECTORY: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
const HELLO_FILE: &str = "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99";
/// Directory { files: [FileNode { name: "hello.txt", digest: HELLO_FILE, size: 6 }] }
const ONE_FILE_DIRECTORY: &str = "7ad924fb96eb87fa9fc37817a93d57556fd86b5362d07aba3aeb822954abd622";
/// The same with `executable: true`.
const ONE_EXECUTABLE_DIRECTORY: &str =
    "32e8c39005fb57d6d147d861b2cf24a90f816360e5edcf956457d5efc0b5e164";
/// Directory { directories: [sub -> ONE_FILE_DIRECTORY, size 2 (snix's rule)],
///             symlinks: [link -> "hello.txt"] }
const NESTED_DIRECTORY: &str = "2a84bc8c6693ac11eb2b50b39c2b4cad2001578fed521106fb1b76b40aba1200";

fn name(text: &str) -> PathComponent {
    PathComponent::try_from(text).unwrap()
}

fn hello_directory(executable: bool) -> Directory {
    let mut directory = Directory::new();
    let node = Node::File {
        digest: B3Digest::of(b"hello\n"),
        size: 6,
        executable,
    };
    directory.add(name("hello.txt"), node).unwrap();
    directory
}

#[test]
fn empty_directory_digest() {
    assert_eq!(Directory::new().encode(), Vec::<u8>::new());
    assert_eq!(Directory::new().digest().to_string(), EMPTY_DIRECTORY);
}

#[test]
fn pinned_directory_digests() {
    assert_eq!(B3Digest::of(b"hello\n").to_string(), HELLO_FILE);
    assert_eq!(
        hello_directory(false).digest().to_string(),
        ONE_FILE_DIRECTORY
    );
    assert_eq!(
        hello_directory(true).digest().to_string(),
        ONE_EXECUTABLE_DIRECTORY
    );

    let mut nested = Directory::new();
    let sub = hello_directory(false);
    nested.add(name("sub"), sub.as_node()).unwrap();
    let target = SymlinkTarget::try_from(&b"hello.txt"[..]).unwrap();
    nested.add(name("link"), Node::Symlink { target }).unwrap();
    assert_eq!(sub.size(), 2, "snix's rule: 2 for the one file");
    assert_eq!(nested.digest().to_string(), NESTED_DIRECTORY);
}

#[test]
fn castore_field_numbers() {
    let digest = B3Digest::of(b"hello\n");
    // FileNode: name=1, digest=2, size=3, executable=4.
    let file = cat(&[
        len_field(1, b"hello.txt"),
        len_field(2, digest.as_bytes()),
        varint_field(3, 6),
        varint_field(4, 1),
    ]);
    // DirectoryNode: name=1, digest=2, size=3.
    let sub = cat(&[
        len_field(1, b"sub"),
        len_field(2, digest.as_bytes()),
        varint_field(3, 7),
    ]);
    // SymlinkNode: name=1, target=2.
    let link = cat(&[len_field(1, b"ulink"), len_field(2, b"/target")]);
    // Directory: directories=1, files=2, symlinks=3.
    let bytes = cat(&[len_field(1, &sub), len_field(2, &file), len_field(3, &link)]);

    for decoded in [
        tvix_castore::Directory::decode(bytes.as_slice())
            .unwrap()
            .encode_to_vec(),
        snix_castore::Directory::decode(bytes.as_slice())
            .unwrap()
            .encode_to_vec(),
    ] {
        assert_eq!(decoded, bytes, "re-encoding is canonical and identical");
    }
    let wire = tvix_castore::Directory::decode(bytes.as_slice()).unwrap();
    assert_eq!(wire.files[0].name, "hello.txt");
    assert_eq!(wire.files[0].size, 6);
    assert!(wire.files[0].executable);
    assert_eq!(wire.directories[0].size, 7);
    assert_eq!(wire.symlinks[0].target, "/target");
    let directory = Directory::try_from(wire).unwrap();
    assert_eq!(directory.digest(), B3Digest::of(&bytes));

    // Node oneof: directory=1, file=2, symlink=3 (Entry in snix).
    for (number, payload, kind) in [
        (1, &sub, "directory"),
        (2, &file, "file"),
        (3, &link, "symlink"),
    ] {
        let bytes = len_field(number, payload);
        let (_, tvix) = tvix_castore::Node::decode(bytes.as_slice())
            .unwrap()
            .try_into_named()
            .unwrap();
        let (_, snix) = snix_castore::Entry::decode(bytes.as_slice())
            .unwrap()
            .try_into_named()
            .unwrap();
        assert_eq!(tvix.kind(), kind);
        assert_eq!(tvix, snix);
    }
}

#[test]
fn blob_and_directory_service_field_numbers() {
    let digest = B3Digest::of(b"x");
    // StatBlobRequest: digest=1, send_chunks=2, send_bao=3.
    let stat = cat(&[
        len_field(1, digest.as_bytes()),
        varint_field(2, 1),
        varint_field(3, 1),
    ]);
    let stat = tvix_castore::StatBlobRequest::decode(stat.as_slice()).unwrap();
    assert_eq!(stat.digest, digest.to_bytes());
    assert!(stat.send_chunks && stat.send_bao);
    // StatBlobResponse: chunks=2 (ChunkMeta digest=1, size=2), bao=3.
    let chunk = cat(&[len_field(1, digest.as_bytes()), varint_field(2, 9)]);
    let response = cat(&[len_field(2, &chunk), len_field(3, b"bao")]);
    let response = snix_castore::StatBlobResponse::decode(response.as_slice()).unwrap();
    assert_eq!(response.chunks[0].size, 9);
    assert_eq!(response.bao, "bao");
    // BlobChunk: data=1; PutBlobResponse: digest=1; ReadBlobRequest: digest=1.
    assert_eq!(
        tvix_castore::BlobChunk::decode(len_field(1, b"abc").as_slice())
            .unwrap()
            .data,
        "abc"
    );
    let put = len_field(1, digest.as_bytes());
    assert_eq!(
        snix_castore::PutBlobResponse::decode(put.as_slice())
            .unwrap()
            .digest,
        digest.to_bytes()
    );
    assert_eq!(
        tvix_castore::ReadBlobRequest::decode(put.as_slice())
            .unwrap()
            .digest,
        digest.to_bytes()
    );
    // GetDirectoryRequest: digest=1 (oneof by_what), recursive=2.
    let get = cat(&[len_field(1, digest.as_bytes()), varint_field(2, 1)]);
    let get = tvix_castore::GetDirectoryRequest::decode(get.as_slice()).unwrap();
    assert!(get.recursive);
    assert_eq!(
        get.by_what,
        Some(tvix_castore::get_directory_request::ByWhat::Digest(
            digest.to_bytes()
        ))
    );
    // PutDirectoryResponse: root_digest=1.
    let root = snix_castore::PutDirectoryResponse::decode(put.as_slice()).unwrap();
    assert_eq!(root.root_digest, digest.to_bytes());
}

fn hello_input_node() -> Vec<u8> {
    let file = cat(&[
        len_field(1, b"abc-hello"),
        len_field(2, B3Digest::of(b"hello\n").as_bytes()),
        varint_field(3, 6),
    ]);
    len_field(2, &file)
}

#[test]
fn tvix_build_field_numbers() {
    let env = cat(&[len_field(1, b"out"), len_field(2, &[0xff, b'/', b'x'])]);
    let constraints = cat(&[
        len_field(1, b"x86_64-linux"),
        varint_field(2, 1 << 30),
        len_field(3, b"/dev/kvm"),
    ]);
    let request = cat(&[
        len_field(1, b"/bin/sh"),
        len_field(1, b"-c"),
        len_field(2, b"xyz-out"),
        len_field(3, &env),
        len_field(4, &hello_input_node()),
        len_field(5, &constraints),
    ]);
    let decoded = tvix_build::BuildRequest::decode(request.as_slice()).unwrap();
    assert_eq!(decoded.command_args, ["/bin/sh", "-c"]);
    assert_eq!(decoded.outputs, ["xyz-out"]);
    assert_eq!(decoded.environment_vars[0].key, "out");
    assert_eq!(
        decoded.environment_vars[0].value,
        Bytes::from_static(&[0xff, b'/', b'x'])
    );
    let (input, _) = decoded.inputs[0].clone().try_into_named().unwrap();
    assert_eq!(input.as_bytes(), b"abc-hello");
    let constraints = decoded.constraints.clone().unwrap();
    assert_eq!(constraints.system, "x86_64-linux");
    assert_eq!(constraints.min_memory, 1 << 30);
    assert_eq!(constraints.available_ro_paths, ["/dev/kvm"]);
    assert_eq!(decoded.encode_to_vec(), request);

    // Build: build_request=1, outputs=2.
    let build = cat(&[len_field(1, &request), len_field(2, &hello_input_node())]);
    let build = tvix_build::Build::decode(build.as_slice()).unwrap();
    assert_eq!(build.build_request, Some(decoded));
    assert_eq!(build.outputs.len(), 1);
}

#[test]
fn snix_build_field_numbers() {
    let env = cat(&[len_field(1, b"PATH"), len_field(2, b"/bin")]);
    let constraints = cat(&[
        len_field(1, b"x86_64-linux"),
        varint_field(2, 4096),
        len_field(3, b"/etc/ssl"),
        varint_field(4, 1),
        varint_field(5, 1),
    ]);
    let additional = cat(&[len_field(1, b"build/.attrs.json"), len_field(2, b"{}")]);
    let request = cat(&[
        len_field(1, &hello_input_node()),
        len_field(2, b"/bin/sh"),
        len_field(3, b"build"),
        len_field(4, b"build"),
        len_field(4, b"nix/store"),
        len_field(5, b"nix/store"),
        len_field(6, b"nix/store/xyz-out"),
        len_field(7, &env),
        len_field(8, &constraints),
        len_field(9, &additional),
        len_field(10, b"xyzneedle"),
    ]);
    let decoded = snix_build::BuildRequest::decode(request.as_slice()).unwrap();
    let (input, node) = decoded.inputs[0].clone().try_into_named().unwrap();
    assert_eq!(input.as_bytes(), b"abc-hello");
    assert_eq!(node.kind(), "file");
    assert_eq!(decoded.command_args, ["/bin/sh"]);
    assert_eq!(decoded.working_dir, "build");
    assert_eq!(decoded.scratch_paths, ["build", "nix/store"]);
    assert_eq!(decoded.inputs_dir, "nix/store");
    assert_eq!(decoded.outputs, ["nix/store/xyz-out"]);
    assert_eq!(decoded.environment_vars[0].key, "PATH");
    let constraints = decoded.constraints.clone().unwrap();
    assert_eq!(
        (
            constraints.system.as_str(),
            constraints.min_memory,
            constraints.network_access,
            constraints.provide_bin_sh
        ),
        ("x86_64-linux", 4096, true, true)
    );
    assert_eq!(constraints.available_ro_paths, ["/etc/ssl"]);
    assert_eq!(decoded.additional_files[0].path, "build/.attrs.json");
    assert_eq!(decoded.additional_files[0].contents, "{}");
    assert_eq!(decoded.refscan_needles, ["xyzneedle"]);
    assert_eq!(decoded.encode_to_vec(), request);

    // BuildResponse: outputs=1; Output: output=1 (anonymous Entry), needles=2
    // (packed repeated uint64).
    let anonymous_file = cat(&[len_field(2, B3Digest::of(b"").as_bytes())]);
    let output = cat(&[
        len_field(1, &len_field(2, &anonymous_file)),
        len_field(2, &[0, 3]),
    ]);
    let response = len_field(1, &output);
    let response = snix_build::BuildResponse::decode(response.as_slice()).unwrap();
    let output = &response.outputs[0];
    assert_eq!(output.needles, [0, 3]);
    let node = output.output.clone().unwrap().try_into_anonymous().unwrap();
    assert_eq!(
        node,
        Node::File {
            digest: B3Digest::of(b""),
            size: 0,
            executable: false
        }
    );
}
