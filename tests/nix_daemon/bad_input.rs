//! Bad input on the Nix daemon socket, sent by a raw client: a protocol
//! version too old, an unknown operation, a truncated request, a NAR whose
//! hash is not the claimed one, a path whose references are not valid, an
//! untrusted client adding an input-addressed path. Each gets an error
//! frame naming the problem, nothing is stored, and the daemon serves the
//! next client (and, where the stream is still in step, the same one).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kiln::nix::daemon::protocol::{stderr, Op, WORKER_MAGIC_1, WORKER_MAGIC_2};
use kiln::nix::daemon::wire::Frame;

struct Client {
    stream: UnixStream,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client { stream }
    }

    /// Connects and shakes hands at protocol 1.34, as Nix 2.8 does.
    fn handshake(socket: &Path) -> Client {
        let mut c = Client::connect(socket);
        c.send(Frame::new().u64(WORKER_MAGIC_1));
        assert_eq!(c.u64(), WORKER_MAGIC_2);
        let version = c.u64();
        assert!(version >= 0x122, "daemon version {version:#x}");
        c.send(Frame::new().u64(0x122).u64(0).u64(0));
        let nix_version = c.string();
        assert!(nix_version.contains("kiln"), "{nix_version}");
        c.expect_last();
        c
    }

    fn send(&mut self, frame: Frame) {
        self.stream.write_all(frame.as_bytes()).unwrap();
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn string(&mut self) -> String {
        let len = self.u64() as usize;
        assert!(len < 1 << 20);
        let mut b = vec![0u8; len.div_ceil(8) * 8];
        self.stream.read_exact(&mut b).unwrap();
        b.truncate(len);
        String::from_utf8(b).unwrap()
    }

    /// Reads stderr frames up to LAST (Ok) or ERROR (Err with the message).
    fn work(&mut self) -> Result<(), String> {
        loop {
            match self.u64() {
                stderr::LAST => return Ok(()),
                stderr::NEXT => {
                    self.string();
                }
                stderr::ERROR => {
                    assert_eq!(self.string(), "Error");
                    self.u64();
                    self.string();
                    let message = self.string();
                    assert_eq!(self.u64(), 0, "no position");
                    let traces = self.u64();
                    for _ in 0..traces {
                        self.u64();
                        self.string();
                    }
                    return Err(message);
                }
                other => panic!("unexpected stderr frame {other:#x}"),
            }
        }
    }

    fn expect_last(&mut self) {
        self.work().unwrap();
    }

    fn expect_error(&mut self) -> String {
        self.work().expect_err("the daemon accepted bad input")
    }

    fn is_valid(&mut self, path: &str) -> bool {
        self.send(Frame::new().u64(Op::IsValidPath as u64).string(path));
        self.expect_last();
        self.u64() != 0
    }

    /// Sends AddToStoreNar with `nar` claimed to hash to `nar_sha256`.
    fn add_to_store_nar(
        &mut self,
        path: &str,
        references: &[&str],
        nar: &[u8],
        nar_sha256: &[u8; 32],
    ) {
        let mut frame = Frame::new()
            .u64(Op::AddToStoreNar as u64)
            .string(path)
            .string("")
            .string(&hex::encode(nar_sha256))
            .strings(references.iter().copied())
            .u64(0)
            .u64(nar.len() as u64)
            .bool(false)
            .strings(Vec::<String>::new())
            .string("")
            .bool(false)
            .bool(false);
        for chunk in nar.chunks(100) {
            frame = frame.u64(chunk.len() as u64);
            let mut bytes = frame.into_bytes();
            bytes.extend_from_slice(chunk);
            frame = Frame::new();
            self.stream.write_all(&bytes).unwrap();
        }
        self.send(frame.u64(0));
    }
}

fn nar_of_file(contents: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, contents).unwrap();
    let mut nar = Vec::new();
    kiln::nix::nar::write_path_nar(&file, &mut nar).unwrap();
    nar
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

const PATH: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-kiln-bad-input";
const MISSING: &str = "/nix/store/0000000000000000000000000000000a-not-here";

/// Every case against a trusted daemon on `trusted` and an untrusted one on
/// `untrusted`.
pub fn run_all(trusted: &Path, untrusted: &Path) {
    // A protocol older than Nix 2.8's.
    let mut c = Client::connect(trusted);
    c.send(Frame::new().u64(WORKER_MAGIC_1));
    assert_eq!(c.u64(), WORKER_MAGIC_2);
    c.u64();
    c.send(Frame::new().u64(0x115));
    let message = c.expect_error();
    assert!(
        message.contains("1.21") && message.contains("1.34"),
        "{message}"
    );

    // An operation kiln does not know: named, then the connection closes.
    let mut c = Client::handshake(trusted);
    c.send(Frame::new().u64(999));
    let message = c.expect_error();
    assert!(message.contains("999"), "{message}");

    // A request cut short.
    let mut c = Client::handshake(trusted);
    let mut bytes = Frame::new()
        .u64(Op::IsValidPath as u64)
        .u64(60)
        .into_bytes();
    bytes.extend_from_slice(b"/nix/store/short");
    c.stream.write_all(&bytes).unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let message = c.expect_error();
    assert!(message.contains("ended"), "{message}");

    // A NAR whose hash is not the claimed one: refused, nothing stored,
    // and the same connection goes on.
    let nar = nar_of_file(b"bad input\n");
    let mut c = Client::handshake(trusted);
    c.add_to_store_nar(PATH, &[], &nar, &sha256(b"something else"));
    let message = c.expect_error();
    assert!(message.contains("hash mismatch"), "{message}");
    assert!(
        !c.is_valid(PATH),
        "a path with a wrong NAR hash was recorded"
    );

    // References that are not valid.
    c.add_to_store_nar(PATH, &[MISSING], &nar, &sha256(&nar));
    let message = c.expect_error();
    assert!(
        message.contains(MISSING) && message.contains("not valid"),
        "{message}"
    );
    assert!(!c.is_valid(PATH));

    // A well-formed NAR whose hash matches is taken (the same bytes).
    c.add_to_store_nar(PATH, &[], &nar, &sha256(&nar));
    c.expect_last();
    assert!(c.is_valid(PATH));

    // An untrusted client may not add an input-addressed path.
    let mut u = Client::handshake(untrusted);
    let other = "/nix/store/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-kiln-untrusted";
    u.add_to_store_nar(other, &[], &nar, &sha256(&nar));
    let message = u.expect_error();
    assert!(message.contains("signature"), "{message}");
    assert!(!u.is_valid(other));

    // Operations kiln does not serve are refused by name, and the
    // connection stays in step.
    c.send(Frame::new().u64(Op::ImportPaths as u64));
    let message = c.expect_error();
    assert!(message.contains("ImportPaths"), "{message}");
    c.send(Frame::new().u64(Op::ExportPath as u64).string(PATH).u64(0));
    let message = c.expect_error();
    assert!(message.contains("ExportPath"), "{message}");
    c.send(Frame::new().u64(Op::QueryReferrers as u64).string(PATH));
    let message = c.expect_error();
    assert!(message.contains("QueryReferrers"), "{message}");
    assert!(c.is_valid(PATH), "the connection is out of step");

    // The daemon serves new clients after all of that.
    let mut c = Client::handshake(trusted);
    assert!(c.is_valid(PATH));
    assert!(!c.is_valid(MISSING));
}
