#!/usr/bin/env python3
"""An independent kiln client: grpcio with protobuf bytes assembled by hand.

It shares no generated code with kiln: every message is encoded and decoded
here from the field numbers of shared/PROTOCOL.md, so a passing run proves
kiln's wire layout, not just agreement of kiln with itself. Trees read back
recursively (one this client puts, one a build writes) are also checked the
way snix's validating DirectoryService checks them: root first, each
directory referenced by an earlier one, each DirectoryNode.size equal to the
snix size (2 per entry plus child sizes) this client computes.

Usage: kiln_client.py ADDR castore            castore checks, both package names
       kiln_client.py ADDR build BUSYBOX      a tvix (seed layout) and a snix build
       kiln_client.py ADDR badwire            malformed and oversized messages

Exits non-zero with a message on the first failed check.
"""

import sys

import blake3
import grpc


# --- protobuf wire format, by hand -------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


def field_varint(num, value):
    if not value:
        return b""  # proto3: defaults are omitted
    return varint(num << 3) + varint(int(value))


def parse(data):
    """Decodes one message level into {field number: [raw values]}."""
    fields, i = {}, 0
    while i < len(data):
        key, i = read_varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.setdefault(num, []).append(value)
    return fields


def read_varint(data, i):
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def one(fields, num, default=b""):
    return fields.get(num, [default])[0]


# --- castore messages ---------------------------------------------------------------

def file_node(name, digest, size, executable=False):
    return field_bytes(1, name) + field_bytes(2, digest) + field_varint(3, size) + field_varint(4, executable)


def dir_node(name, digest, size):
    return field_bytes(1, name) + field_bytes(2, digest) + field_varint(3, size)


def symlink_node(name, target):
    return field_bytes(1, name) + field_bytes(2, target)


def directory(dirs=(), files=(), symlinks=()):
    return (b"".join(field_bytes(1, d) for d in dirs)
            + b"".join(field_bytes(2, f) for f in files)
            + b"".join(field_bytes(3, s) for s in symlinks))


def node(kind, body):
    return field_bytes({"directory": 1, "file": 2, "symlink": 3}[kind], body)


def snix_size(dir_bytes):
    """DirectoryNode.size by snix's rule, from a Directory message alone:
    2 per entry (directory, file or symlink) plus each child directory's size."""
    fields = parse(dir_bytes)
    entries = sum(len(fields.get(num, [])) for num in (1, 2, 3))
    return 2 * entries + sum(one(parse(d), 3, 0) for d in fields.get(1, []))


def sized_dir_node(name, child):
    """A DirectoryNode for `child` (its bytes) as a client following snix's rule writes it."""
    return dir_node(name, blake3.blake3(child).digest(), snix_size(child))


def validate_like_snix(root_digest, received, what):
    """What snix's validating DirectoryService checks on a recursive Get: the
    root comes first, every later directory is referenced by one already
    received, and every DirectoryNode.size equals the snix size of the
    directory it names (computed here, from the received bytes)."""
    check(len(received) > 0 and blake3.blake3(received[0]).digest() == root_digest,
          f"{what}: recursive Get starts with the root")
    referenced = {}
    for index, dir_bytes in enumerate(received):
        digest = blake3.blake3(dir_bytes).digest()
        if index:
            check(digest in referenced, f"{what}: directory #{index} referenced by an earlier one")
            check(referenced[digest] == snix_size(dir_bytes),
                  f"{what}: directory #{index} has snix size {snix_size(dir_bytes)}, "
                  f"its DirectoryNode says {referenced[digest]}")
        for child in parse(dir_bytes).get(1, []):
            child = parse(child)
            referenced[one(child, 2)] = one(child, 3, 0)


IDENTITY = dict(request_serializer=None, response_deserializer=None)


class Kiln:
    def __init__(self, addr):
        self.channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])

    def unary(self, method, body, timeout=600):
        return self.channel.unary_unary(method, **IDENTITY)(body, timeout=timeout)

    def put_blob(self, pkg, data):
        chunks = [field_bytes(1, data[i:i + 65536]) for i in range(0, len(data), 65536)] or [b""]
        resp = self.channel.stream_unary(f"/{pkg}.BlobService/Put", **IDENTITY)(iter(chunks), timeout=60)
        return one(parse(resp), 1)

    def read_blob(self, pkg, digest):
        stream = self.channel.unary_stream(f"/{pkg}.BlobService/Read", **IDENTITY)(field_bytes(1, digest), timeout=60)
        return b"".join(one(parse(c), 1) for c in stream)

    def stat_blob(self, pkg, digest):
        return self.unary(f"/{pkg}.BlobService/Stat", field_bytes(1, digest), timeout=60)

    def put_dirs(self, pkg, dirs):
        resp = self.channel.stream_unary(f"/{pkg}.DirectoryService/Put", **IDENTITY)(iter(dirs), timeout=60)
        return one(parse(resp), 1)

    def get_dirs(self, pkg, digest, recursive):
        req = field_bytes(1, digest) + field_varint(2, recursive)
        return list(self.channel.unary_stream(f"/{pkg}.DirectoryService/Get", **IDENTITY)(req, timeout=60))


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def expect_code(fn, code, what):
    try:
        fn()
    except grpc.RpcError as e:
        check(e.code() == code, f"{what}: {e.code()} ({e.details()})")
        return
    sys.exit(f"FAILED: {what}: no error")


def castore_checks(kiln):
    for pkg in ("tvix.castore.v1", "snix.castore.v1"):
        data = b"hello from an independent client\n" * 5000
        digest = kiln.put_blob(pkg, data)
        check(digest == blake3.blake3(data).digest(), f"{pkg} Put returns BLAKE3 of the blob")
        check(kiln.read_blob(pkg, digest) == data, f"{pkg} Read returns the bytes")
        kiln.stat_blob(pkg, digest)
        leaf = directory(files=[file_node(b"greeting", digest, len(data), True)])
        leaf_digest = kiln.put_dirs(pkg, [leaf])
        check(leaf_digest == blake3.blake3(leaf).digest(), f"{pkg} directory digest is BLAKE3 of its encoding")
        # Size 1 is the proto comment's convention, not snix's (2): kiln accepts it as sent.
        root = directory(dirs=[dir_node(b"sub", leaf_digest, 1)], symlinks=[symlink_node(b"link", b"sub/greeting")])
        root_digest = kiln.put_dirs(pkg, [leaf, root])
        check(root_digest == blake3.blake3(root).digest(), f"{pkg} Put leaves-first answers the root digest")
        got = kiln.get_dirs(pkg, root_digest, True)
        check(got == [root, leaf], f"{pkg} recursive Get is root first, byte-identical")
        snix_tree_checks(kiln, pkg, digest, len(data))
        empty = kiln.put_dirs(pkg, [b""])
        check(empty.hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
              f"{pkg} empty directory digest")
        expect_code(lambda: kiln.stat_blob(pkg, b"\x01" * 31), grpc.StatusCode.INVALID_ARGUMENT,
                    f"{pkg} Stat with a 31-byte digest")
        expect_code(lambda: kiln.read_blob(pkg, b"\x02" * 32), grpc.StatusCode.NOT_FOUND,
                    f"{pkg} Read of an unknown blob")
        orphan = directory(dirs=[dir_node(b"x", b"\x03" * 32, 1)])
        expect_code(lambda: kiln.put_dirs(pkg, [orphan]), grpc.StatusCode.INVALID_ARGUMENT,
                    f"{pkg} Put of a directory with an unknown child")
        unsorted = directory(files=[file_node(b"b", digest, len(data)), file_node(b"a", digest, len(data))])
        expect_code(lambda: kiln.put_dirs(pkg, [unsorted]), grpc.StatusCode.INVALID_ARGUMENT,
                    f"{pkg} Put of an unsorted directory")
    # The server keeps serving after the errors.
    check(kiln.read_blob("tvix.castore.v1", digest) == data, "server still serves after bad input")


def snix_tree_checks(kiln, pkg, blob, blob_len):
    """A nested tree (root -> sub -> subsub, with files) sized by snix's rule
    round-trips through kiln the way snix's validating client reads it."""
    subsub = directory(files=[file_node(b"deepest", blob, blob_len)])
    sub = directory(dirs=[sized_dir_node(b"subsub", subsub)],
                    files=[file_node(b"a", blob, blob_len), file_node(b"b", blob, blob_len, True)])
    root = directory(dirs=[sized_dir_node(b"sub", sub)], files=[file_node(b"top", blob, blob_len)],
                     symlinks=[symlink_node(b"up", b"sub/a")])
    check((snix_size(subsub), snix_size(sub), snix_size(root)) == (2, 8, 14),
          f"{pkg} snix sizes of the nested tree: 2, 8, 14")
    root_digest = kiln.put_dirs(pkg, [subsub, sub, root])
    check(root_digest == blake3.blake3(root).digest(), f"{pkg} nested tree: kiln's root digest is the client's")
    got = kiln.get_dirs(pkg, root_digest, True)
    check([blake3.blake3(d).digest() for d in got] == [blake3.blake3(d).digest() for d in (root, sub, subsub)],
          f"{pkg} nested tree: recursive Get answers root, sub, subsub with the client's digests")
    validate_like_snix(root_digest, got, f"{pkg} nested tree")


def upload_busybox(kiln, busybox_path):
    data = open(busybox_path, "rb").read()
    digest = kiln.put_blob("tvix.castore.v1", data)
    bin_dir = directory(
        files=[file_node(b"busybox", digest, len(data), True)],
        symlinks=[symlink_node(name, b"busybox") for name in (b"cat", b"echo", b"ln", b"mkdir", b"sh")],
    )
    root = directory(dirs=[sized_dir_node(b"bin", bin_dir)])
    return kiln.put_dirs("tvix.castore.v1", [bin_dir, root]), snix_size(root)


SCRIPT = (b"set -e; mkdir -p $out/sub/deeper; echo built-by-kiln > $out/sub/file; "
          b"echo deep > $out/sub/deeper/leaf; ln -s sub/file $out/link; echo log line on stderr >&2")


def expected_output_tree():
    """The tree SCRIPT leaves in $out, encoded here with snix's sizes: root, sub, sub/deeper."""
    built, deep = b"built-by-kiln\n", b"deep\n"
    deeper = directory(files=[file_node(b"leaf", blake3.blake3(deep).digest(), len(deep))])
    sub = directory(dirs=[sized_dir_node(b"deeper", deeper)],
                    files=[file_node(b"file", blake3.blake3(built).digest(), len(built))])
    root = directory(dirs=[sized_dir_node(b"sub", sub)], symlinks=[symlink_node(b"link", b"sub/file")])
    return [root, sub, deeper]


def build_checks(kiln, busybox_path):
    bb_digest, bb_size = upload_busybox(kiln, busybox_path)
    bb_name = b"0bcdfghijklmnpqrsvwxyz0123456789-busybox"
    out_name = "1bcdfghijklmnpqrsvwxyz0123456789-out"
    sh = "/nix/store/" + bb_name.decode() + "/bin/sh"

    # tvix.build.v1, the seed's layout: command_args=1 outputs=2 env=3 inputs=4 constraints=5.
    env = [(b"out", b"/nix/store/" + out_name.encode()), (b"PATH", b"/nix/store/" + bb_name + b"/bin")]
    req = (field_bytes(1, sh) + field_bytes(1, "-c") + field_bytes(1, SCRIPT)
           + field_bytes(2, out_name)
           + b"".join(field_bytes(3, field_bytes(1, k) + field_bytes(2, v)) for k, v in sorted(env))
           + field_bytes(4, node("directory", dir_node(bb_name, bb_digest, bb_size)))
           + field_bytes(5, field_bytes(1, "x86_64-linux") + field_varint(2, 64 << 20)))
    resp = parse(kiln.unary("/tvix.build.v1.BuildService/DoBuild", req))
    check(one(resp, 1) == req, "tvix Build echoes the request")
    outputs = [parse(o) for o in resp.get(2, [])]
    check(len(outputs) == 1 and 1 in outputs[0], "tvix Build has one directory output")
    out = parse(one(outputs[0], 1))
    check(one(out, 1) == out_name.encode(), "tvix output is named by its basename")
    dirs = kiln.get_dirs("tvix.castore.v1", one(out, 2), True)
    validate_like_snix(one(out, 2), dirs, "kiln-built output tree")
    check(one(out, 3, 0) == snix_size(dirs[0]), f"output node size {one(out, 3, 0)} is snix's")
    expected = expected_output_tree()
    check(dirs == expected and one(out, 2) == blake3.blake3(expected[0]).digest(),
          "kiln-built output tree has the digests this client computes with snix's sizes")
    root = parse(dirs[0])
    link = parse(one(root, 3))
    check(one(link, 1) == b"link" and one(link, 2) == b"sub/file", "symlink output kept")
    sub = parse(dirs[1])
    f = parse(one(sub, 2))
    check(kiln.read_blob("tvix.castore.v1", one(f, 2)) == b"built-by-kiln\n", "file output content")

    # snix.build.v1: inputs=1 command_args=2 working_dir=3 scratch_paths=4 inputs_dir=5 outputs=6
    # environment_vars=7 constraints=8 additional_files=9 refscan_needles=10.
    out_path = "nix/store/" + out_name
    snix_req = (field_bytes(1, node("directory", dir_node(bb_name, bb_digest, bb_size)))
                + field_bytes(2, sh) + field_bytes(2, "-c")
                + field_bytes(2, b"cat /build/extra > $out; echo " + bb_name + b" >> $out")
                + field_bytes(3, "build") + field_bytes(4, "build") + field_bytes(4, "nix/store")
                + field_bytes(5, "nix/store") + field_bytes(6, out_path)
                + b"".join(field_bytes(7, field_bytes(1, k) + field_bytes(2, v)) for k, v in sorted(env))
                + field_bytes(8, field_bytes(1, "x86_64-linux"))
                + field_bytes(9, field_bytes(1, "build/extra") + field_bytes(2, b"from additional_files\n"))
                + field_bytes(10, bb_name[:32]) + field_bytes(10, "absentabsentabsentabsentabsent00"))
    resp = parse(kiln.unary("/snix.build.v1.BuildService/DoBuild", snix_req))
    outs = [parse(o) for o in resp.get(1, [])]
    check(len(outs) == 1, "snix BuildResponse has one output")
    entry = parse(one(outs[0], 1))
    fnode = parse(one(entry, 2))
    check(one(fnode, 1) == b"", "snix output entry is anonymous")
    content = kiln.read_blob("snix.castore.v1", one(fnode, 2))
    check(content == b"from additional_files\n" + bb_name + b"\n", "snix file output content")
    needles = outs[0].get(2, [])
    # Packed repeated uint64 arrives as one length-delimited value.
    if needles and isinstance(needles[0], (bytes, bytearray)):
        packed, i, vals = needles[0], 0, []
        while i < len(packed):
            v, i = read_varint(packed, i)
            vals.append(v)
        needles = vals
    check(needles == [0], f"snix needles report the input hash only: {needles}")


def badwire_checks(kiln):
    """Malformed and oversized messages: a clear error, and the server keeps serving."""
    for method in ("/tvix.build.v1.BuildService/DoBuild", "/snix.build.v1.BuildService/DoBuild",
                   "/tvix.castore.v1.BlobService/Stat", "/snix.castore.v1.DirectoryService/Get"):
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"):
            try:
                if method.endswith("/Get"):
                    list(kiln.channel.unary_stream(method, **IDENTITY)(garbage, timeout=30))
                else:
                    kiln.unary(method, garbage, timeout=30)
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.details(),
                      f"{method} with malformed bytes {garbage[:4]!r}: {e.code()} ({e.details()})")
                continue
            sys.exit(f"FAILED: {method} accepted malformed bytes {garbage!r}")
    big = field_bytes(1, "/bin/sh") + field_bytes(3, field_bytes(1, "A") + field_bytes(2, b"x" * (80 << 20)))
    try:
        kiln.unary("/tvix.build.v1.BuildService/DoBuild", big, timeout=60)
        sys.exit("FAILED: an 80 MiB request was accepted")
    except grpc.RpcError as e:
        check(e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                           grpc.StatusCode.INVALID_ARGUMENT),
              f"80 MiB request refused: {e.code()} ({e.details()[:80]})")
    check(kiln.put_blob("snix.castore.v1", b"still serving") == blake3.blake3(b"still serving").digest(),
          "server still serves after malformed and oversized input")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    kiln = Kiln(sys.argv[1])
    if sys.argv[2] == "castore":
        castore_checks(kiln)
    elif sys.argv[2] == "badwire":
        badwire_checks(kiln)
    elif sys.argv[2] == "build":
        build_checks(kiln, sys.argv[3])
    else:
        sys.exit(__doc__)
    print("all checks passed")


if __name__ == "__main__":
    main()
