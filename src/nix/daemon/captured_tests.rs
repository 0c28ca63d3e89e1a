//! kiln's worker-protocol codec against real Nix 2.8 bytes.
//!
//! `tests/fixtures/nix-daemon/` holds sessions recorded between real Nix
//! 2.8 clients and the real Nix 2.8 `nix-daemon` (its README says how and
//! what each holds). Each test walks one session: the client's side through
//! kiln's own readers, which must consume it to the last byte; the daemon's
//! side through the small reader here; and wherever kiln writes the same
//! thing (handshake, stderr frames, replies, path infos, build results,
//! NARs), kiln's encoding of Nix's values must be Nix's bytes. Where kiln
//! deliberately writes something else, the difference is named where it is
//! checked. Store paths differ per capture, so they are read out of the
//! bytes and checked by recomputing them, never written here.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::logger::{Activity, Output};
use super::protocol::{
    stderr, BuildStatus, Op, ProtocolVersion, DAEMON_NIX_VERSION, MIN_VERSION, WORKER_MAGIC_1,
    WORKER_MAGIC_2,
};
use super::types::{
    read_basic_derivation, read_derived_paths, read_path_info, read_store_path, read_store_paths,
    write_build_result, write_path_info, write_store_paths, BuildResult, DerivedPath, OutputsSpec,
    WirePathInfo,
};
use super::wire::{Frame, FramedReader, WireReader, MAX_SHORT};
use super::BuildOptions;
use crate::castore::{Node, Store};
use crate::nix::hash::Hash;
use crate::nix::nar::ingest::{ingest_nar, IngestedNar, NarLimits};
use crate::nix::nar::write_nar;
use crate::nix::store_path::make::{
    make_fixed_output_path, make_text_path, ContentAddress, Method,
};
use crate::nix::{Derivation, StorePath};

/// One recorded connection: what the client sent, what the daemon sent.
struct Session {
    name: &'static str,
    client: &'static [u8],
    daemon: &'static [u8],
}

macro_rules! session {
    ($name:literal) => {
        Session {
            name: $name,
            client: include_bytes!(concat!(
                "../../../tests/fixtures/nix-daemon/",
                $name,
                ".client.bin"
            )),
            daemon: include_bytes!(concat!(
                "../../../tests/fixtures/nix-daemon/",
                $name,
                ".daemon.bin"
            )),
        }
    };
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).as_slice().try_into().unwrap()
}

use crate::castore::from_addr::temp_store as castore;

/// A NAR as kiln read it.
struct Nar {
    bytes: Vec<u8>,
    ingested: IngestedNar,
}

/// Reads the NAR at the front of `input` with kiln's streaming parser,
/// which must stop exactly at its end, and writes it back with kiln's
/// serialiser, which must give Nix's bytes.
async fn read_nar(store: &Store, input: &mut &[u8]) -> Nar {
    let start = *input;
    let ingested = ingest_nar(store, input, &NarLimits::default())
        .await
        .expect("kiln reads Nix's NAR");
    let bytes = start[..start.len() - input.len()].to_vec();
    assert_eq!(ingested.nar_size, bytes.len() as u64);
    assert_eq!(ingested.nar_sha256, sha256(&bytes));
    let mut rewritten = Vec::new();
    write_nar(store, &ingested.node, &mut rewritten)
        .await
        .unwrap();
    assert_eq!(rewritten, bytes, "kiln writes Nix's NAR back byte for byte");
    Nar { bytes, ingested }
}

/// The contents of a NAR that is a single file.
async fn file_contents(store: &Store, nar: &Nar) -> Vec<u8> {
    let Node::File { digest, .. } = &nar.ingested.node else {
        panic!("{:?} is not a single file", nar.ingested.node);
    };
    let mut blob = store.blobs.open_read(digest).await.unwrap().unwrap();
    let mut out = Vec::new();
    blob.reader.read_to_end(&mut out).await.unwrap();
    out
}

// ---------------------------------------------------------------------------
// The client's side, through kiln's readers.

/// A path with its metadata and NAR, as a client sends it to be added.
struct Added {
    info: WirePathInfo,
    nar: Nar,
}

/// One request, its arguments as kiln's readers decoded them.
enum Request {
    SetOptions(BuildOptions),
    /// The operations whose one argument is a store path.
    Path(Op, StorePath),
    QueryValidPaths(BTreeSet<StorePath>),
    /// QueryMissing, BuildPaths, BuildPathsWithResults.
    Targets(Op, Vec<DerivedPath>),
    AddToStore {
        name: String,
        method: String,
        references: BTreeSet<StorePath>,
        contents: Vec<u8>,
    },
    AddToStoreNar(Added),
    AddMultipleToStore(Vec<Added>),
    BuildDerivation {
        drv_path: StorePath,
        drv: Derivation,
    },
}

impl Request {
    fn op(&self) -> Op {
        match self {
            Request::SetOptions(_) => Op::SetOptions,
            Request::Path(op, _) | Request::Targets(op, _) => *op,
            Request::QueryValidPaths(_) => Op::QueryValidPaths,
            Request::AddToStore { .. } => Op::AddToStore,
            Request::AddToStoreNar(_) => Op::AddToStoreNar,
            Request::AddMultipleToStore(_) => Op::AddMultipleToStore,
            Request::BuildDerivation { .. } => Op::BuildDerivation,
        }
    }

    fn path(&self) -> &StorePath {
        match self {
            Request::Path(_, path) => path,
            _ => panic!("{} has no path argument", self.op().name()),
        }
    }
}

/// What `r` read since it was at `start`.
fn consumed<'a>(start: &'a [u8], r: &mut WireReader<&'a [u8]>) -> &'a [u8] {
    &start[..start.len() - r.get_mut().len()]
}

/// The client's handshake, then every request, to the last byte.
async fn client_requests(bytes: &'static [u8], store: &Store) -> Vec<Request> {
    let mut r = WireReader::new(bytes);
    assert_eq!(r.u64("the magic").await.unwrap(), WORKER_MAGIC_1);
    let version = ProtocolVersion::from_wire(r.u64("the version").await.unwrap());
    assert_eq!(version, MIN_VERSION, "Nix 2.8 speaks 1.34");
    assert!(!r.bool("the CPU affinity flag").await.unwrap());
    assert!(!r.bool("the reserve-space flag").await.unwrap());
    let mut requests = Vec::new();
    while let Some(word) = r.try_u64().await.unwrap() {
        let op = Op::from_wire(word).unwrap_or_else(|| panic!("kiln knows no op {word}"));
        requests.push(read_request(&mut r, op, store).await);
    }
    requests
}

/// A path info as `AddToStoreNar` and `AddMultipleToStore` carry it, which
/// kiln must write back as the client wrote it.
async fn read_added_info(r: &mut WireReader<&[u8]>) -> WirePathInfo {
    let start = *r.get_mut();
    let info = read_path_info(r).await.unwrap();
    let written = write_path_info(Frame::new().string(&info.path.to_absolute_path()), &info);
    assert_eq!(written.as_bytes(), consumed(start, r));
    info
}

async fn framed_contents(r: &mut WireReader<&'static [u8]>) -> Vec<u8> {
    let mut framed = FramedReader::new(r.get_mut());
    let mut contents = Vec::new();
    framed.read_to_end(&mut contents).await.unwrap();
    assert!(framed.is_done());
    contents
}

async fn read_request(r: &mut WireReader<&'static [u8]>, op: Op, store: &Store) -> Request {
    match op {
        Op::SetOptions => Request::SetOptions(BuildOptions::read(r).await.unwrap()),
        Op::IsValidPath
        | Op::QueryPathInfo
        | Op::EnsurePath
        | Op::AddTempRoot
        | Op::NarFromPath
        | Op::QueryDerivationOutputMap => {
            Request::Path(op, read_store_path(r, "the path").await.unwrap())
        }
        Op::QueryValidPaths => {
            let start = *r.get_mut();
            let paths = read_store_paths(r, "the paths").await.unwrap();
            // kiln orders a set of paths as Nix does.
            let written = write_store_paths(Frame::new(), &paths);
            assert_eq!(written.as_bytes(), consumed(start, r));
            assert!(!r.bool("the substitute flag").await.unwrap());
            Request::QueryValidPaths(paths)
        }
        Op::QueryMissing | Op::BuildPaths | Op::BuildPathsWithResults => {
            let targets = read_derived_paths(r).await.unwrap();
            if op != Op::QueryMissing {
                assert_eq!(r.u64("the build mode").await.unwrap(), 0);
            }
            let mut parsed = Vec::new();
            for (text, target) in targets {
                assert_eq!(target.to_string(), text);
                parsed.push(target);
            }
            Request::Targets(op, parsed)
        }
        Op::AddToStore => {
            let name = r.string("the name", MAX_SHORT).await.unwrap();
            let method = r.string("the method", MAX_SHORT).await.unwrap();
            let references = read_store_paths(r, "the references").await.unwrap();
            assert!(!r.bool("the repair flag").await.unwrap());
            let contents = framed_contents(r).await;
            Request::AddToStore {
                name,
                method,
                references,
                contents,
            }
        }
        Op::AddToStoreNar => {
            let info = read_added_info(r).await;
            assert!(!r.bool("the repair flag").await.unwrap());
            // `nix-store --import` does not check signatures, `nix store
            // add-file` does: either is fine.
            r.bool("the don't-check-signatures flag").await.unwrap();
            let contents = framed_contents(r).await;
            let mut input = &contents[..];
            let nar = read_nar(store, &mut input).await;
            assert!(input.is_empty(), "the framed stream is the NAR");
            Request::AddToStoreNar(Added { info, nar })
        }
        Op::AddMultipleToStore => {
            assert!(!r.bool("the repair flag").await.unwrap());
            r.bool("the don't-check-signatures flag").await.unwrap();
            let contents = framed_contents(r).await;
            let mut inner = WireReader::new(&contents[..]);
            let count = inner.count("the number of paths").await.unwrap();
            let mut added = Vec::new();
            for _ in 0..count {
                let info = read_added_info(&mut inner).await;
                let nar = read_nar(store, inner.get_mut()).await;
                added.push(Added { info, nar });
            }
            assert!(inner.get_mut().is_empty(), "the framed stream ends there");
            Request::AddMultipleToStore(added)
        }
        Op::BuildDerivation => {
            let drv_path = read_store_path(r, "the derivation path").await.unwrap();
            let drv = read_basic_derivation(r).await.unwrap();
            assert_eq!(r.u64("the build mode").await.unwrap(), 0);
            Request::BuildDerivation { drv_path, drv }
        }
        other => panic!("the captured sessions use no {}", other.name()),
    }
}

// ---------------------------------------------------------------------------
// The daemon's side, through a small reader.

/// Reads what Nix's daemon sent; all of it is here, so synchronously.
struct NixBytes {
    bytes: &'static [u8],
    pos: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Int(u64),
    Str(String),
}

/// A stderr frame other than the one ending a request.
#[derive(Debug)]
enum Logged {
    Next(String),
    Start {
        id: u64,
        kind: u64,
        text: String,
        fields: Vec<Field>,
    },
    Stop(u64),
    Result {
        id: u64,
        kind: u64,
        fields: Vec<Field>,
    },
}

/// How the daemon ended a request: `STDERR_LAST` or `STDERR_ERROR`.
enum Outcome {
    Last(&'static [u8]),
    Error { message: String, raw: &'static [u8] },
}

impl NixBytes {
    fn take(&mut self, n: usize) -> &'static [u8] {
        let data = self
            .bytes
            .get(self.pos..self.pos + n)
            .unwrap_or_else(|| panic!("the daemon's side ends before byte {}", self.pos + n));
        self.pos += n;
        data
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }

    fn bytes(&mut self) -> &'static [u8] {
        let n = usize::try_from(self.u64()).unwrap();
        let data = self.take(n);
        let padding = self.take(n.next_multiple_of(8) - n);
        assert!(padding.iter().all(|b| *b == 0));
        data
    }

    fn string(&mut self) -> String {
        String::from_utf8(self.bytes().to_vec()).unwrap()
    }

    fn paths(&mut self) -> BTreeSet<StorePath> {
        let n = self.u64();
        (0..n)
            .map(|_| StorePath::from_absolute_path(&self.string()).unwrap())
            .collect()
    }

    fn since(&self, mark: usize) -> &'static [u8] {
        &self.bytes[mark..self.pos]
    }

    fn fields(&mut self) -> Vec<Field> {
        let n = self.u64();
        (0..n)
            .map(|_| match self.u64() {
                0 => Field::Int(self.u64()),
                1 => Field::Str(self.string()),
                other => panic!("field type {other}"),
            })
            .collect()
    }

    /// The stderr frames of one request, each with its bytes, and how it
    /// ended.
    fn work(&mut self) -> (Vec<(Logged, &'static [u8])>, Outcome) {
        let mut logged = Vec::new();
        loop {
            let mark = self.pos;
            let frame = match self.u64() {
                stderr::LAST => return (logged, Outcome::Last(self.since(mark))),
                stderr::ERROR => {
                    // 1.26+: type, level, name (unused), message, position
                    // (none), traces.
                    assert_eq!(self.string(), "Error");
                    assert_eq!(self.u64(), 0, "level: error");
                    assert_eq!(self.string(), "Error");
                    let message = self.string();
                    assert_eq!(self.u64(), 0, "no position");
                    assert_eq!(self.u64(), 0, "no traces");
                    let raw = self.since(mark);
                    return (logged, Outcome::Error { message, raw });
                }
                stderr::NEXT => Logged::Next(self.string()),
                stderr::START_ACTIVITY => {
                    let id = self.u64();
                    let _level = self.u64();
                    let kind = self.u64();
                    let text = self.string();
                    let fields = self.fields();
                    assert_eq!(self.u64(), 0, "no parent activity");
                    Logged::Start {
                        id,
                        kind,
                        text,
                        fields,
                    }
                }
                stderr::STOP_ACTIVITY => Logged::Stop(self.u64()),
                stderr::RESULT => Logged::Result {
                    id: self.u64(),
                    kind: self.u64(),
                    fields: self.fields(),
                },
                other => panic!("stderr frame {other:#x} at byte {mark}"),
            };
            logged.push((frame, self.since(mark)));
        }
    }

    /// A path info, through kiln's reader: `path` is the path asked about
    /// (`QueryPathInfo` answers without it), `None` if it comes first.
    async fn path_info(&mut self, path: Option<&StorePath>) -> WirePathInfo {
        let mark = self.pos;
        if path.is_none() {
            self.bytes();
        }
        self.bytes(); // deriver
        self.bytes(); // NAR hash
        for _ in 0..self.u64() {
            self.bytes(); // a reference
        }
        self.take(3 * 8); // registration time, NAR size, ultimate
        for _ in 0..self.u64() {
            self.bytes(); // a signature
        }
        self.bytes(); // content address
        let mut bytes = match path {
            Some(p) => Frame::new().string(&p.to_absolute_path()).into_bytes(),
            None => Vec::new(),
        };
        bytes.extend_from_slice(self.since(mark));
        let mut r = WireReader::new(&bytes[..]);
        let info = read_path_info(&mut r).await.unwrap();
        assert!(r.get_mut().is_empty());
        info
    }

    /// A build result as 1.34 spells it.
    fn build_result(&mut self) -> NixBuildResult {
        let mark = self.pos;
        let status = self.u64();
        let error = self.string();
        let times_built = self.u64();
        assert_eq!(self.u64(), 0, "not found non-deterministic");
        let start = self.u64();
        let stop = self.u64();
        let n = self.u64();
        let built = (0..n).map(|_| (self.string(), self.string())).collect();
        NixBuildResult {
            status,
            error,
            times_built,
            start,
            stop,
            built,
            raw: self.since(mark),
        }
    }
}

struct NixBuildResult {
    status: u64,
    error: String,
    times_built: u64,
    start: u64,
    stop: u64,
    /// `DrvOutput` id → realisation JSON.
    built: Vec<(String, String)>,
    raw: &'static [u8],
}

fn build_status(word: u64) -> BuildStatus {
    match word {
        0 => BuildStatus::Built,
        2 => BuildStatus::AlreadyValid,
        3 => BuildStatus::PermanentFailure,
        other => panic!("no captured build ends with status {other}"),
    }
}

/// The `DrvOutput` hash kiln writes (see `types.rs`).
const KILN_DRV_HASH: &[u8] =
    b"sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// kiln's encoding of the build result Nix sent must be Nix's bytes.
fn check_build_result(nix: &NixBuildResult) -> BuildResult {
    let mut built_outputs = BTreeMap::new();
    let mut drv_hashes = BTreeSet::new();
    for (id, realisation) in &nix.built {
        let (hash, name) = id.split_once('!').unwrap();
        drv_hashes.insert(hash.to_owned());
        let json: serde_json::Value = serde_json::from_str(realisation).unwrap();
        assert_eq!(json["id"], id.as_str());
        let out = StorePath::from_basename(json["outPath"].as_str().unwrap()).unwrap();
        built_outputs.insert(name.to_owned(), out);
    }
    let result = BuildResult {
        status: build_status(nix.status),
        error: nix.error.clone(),
        start_time: nix.start,
        stop_time: nix.stop,
        built_outputs,
    };
    let mut kiln = write_build_result(Frame::new(), &result, MIN_VERSION).into_bytes();
    // Nix names each built output by the derivation's hash modulo; kiln,
    // which does not compute it, by a placeholder of the same length
    // (clients only use the output's name and path). Swap Nix's in.
    assert!(drv_hashes.len() <= 1, "all outputs of one derivation");
    if let Some(hash) = drv_hashes.first() {
        assert_eq!(hash.len(), KILN_DRV_HASH.len());
        while let Some(at) = kiln.windows(hash.len()).position(|w| w == KILN_DRV_HASH) {
            kiln[at..at + hash.len()].copy_from_slice(hash.as_bytes());
        }
    }
    // timesBuilt: Nix counts a failed build that ran too; kiln says 1 only
    // for `Built` (a field no client acts on).
    let times_built_at = 8 + Frame::new().string(&nix.error).as_bytes().len();
    let kiln_times_built =
        u64::from_le_bytes(kiln[times_built_at..times_built_at + 8].try_into().unwrap());
    if nix.times_built != kiln_times_built {
        assert!(!result.status.is_success());
        assert_eq!((nix.times_built, kiln_times_built), (1, 0));
        kiln[times_built_at..times_built_at + 8].copy_from_slice(&1u64.to_le_bytes());
    }
    assert_eq!(kiln, nix.raw, "kiln writes Nix's build result");
    result
}

// ---------------------------------------------------------------------------
// kiln's logger, next to Nix's frames.

/// kiln's [`Output`] into a buffer, with the build activities it mirrors.
struct KilnLog {
    out: Output<Vec<u8>>,
    /// Nix's build activity id → kiln's.
    builds: HashMap<u64, Activity>,
    /// Nix's other activities, which kiln does not send.
    others: HashSet<u64>,
}

/// kiln numbers its activities itself: equal but for the id word.
fn assert_same_but_id(kiln: &[u8], nix: &[u8]) {
    assert_eq!(kiln.len(), nix.len(), "{kiln:?}\n{nix:?}");
    assert_eq!(kiln[..8], nix[..8]);
    assert_eq!(kiln[16..], nix[16..]);
}

impl KilnLog {
    fn new() -> Self {
        KilnLog {
            out: Output::new(Vec::new()),
            builds: HashMap::new(),
            others: HashSet::new(),
        }
    }

    fn written(&mut self) -> Vec<u8> {
        std::mem::take(self.out.get_mut())
    }

    /// Checks one of Nix's frames: byte for byte where kiln writes it too.
    async fn check(&mut self, logged: &Logged, raw: &[u8]) {
        match logged {
            Logged::Next(text) => {
                self.out.message(text.trim_end_matches('\n')).await.unwrap();
                assert_eq!(self.written(), raw, "STDERR_NEXT");
            }
            Logged::Start {
                id,
                kind: 105,
                fields,
                ..
            } => {
                let Some(Field::Str(drv)) = fields.first() else {
                    panic!("a build activity names its derivation: {fields:?}");
                };
                let activity = self.out.start_build(drv).await.unwrap();
                assert_same_but_id(&self.written(), raw);
                self.builds.insert(*id, activity);
            }
            Logged::Start { id, kind, text, .. } => {
                // actUnknown (a message), actRealise, actCopyPaths and
                // actBuilds: Nix's progress bar; kiln sends none.
                assert!(
                    matches!(kind, 0 | 102 | 103 | 104),
                    "activity {kind} {text:?}"
                );
                self.others.insert(*id);
            }
            Logged::Result {
                id,
                kind: 101,
                fields,
            } => {
                let [Field::Str(line)] = &fields[..] else {
                    panic!("a log line is one string: {fields:?}");
                };
                let activity = self.builds[id];
                self.out.log_line(activity, line).await.unwrap();
                assert_same_but_id(&self.written(), raw);
            }
            Logged::Result { id, kind, .. } => {
                // resProgress and resSetExpected of the progress bar.
                assert!(matches!(kind, 105 | 106), "result {kind}");
                assert!(self.others.contains(id));
            }
            Logged::Stop(id) => {
                if let Some(activity) = self.builds.remove(id) {
                    self.out.stop_activity(activity).await.unwrap();
                    assert_same_but_id(&self.written(), raw);
                } else {
                    assert!(self.others.remove(id), "activity {id:#x} was started");
                }
            }
        }
    }

    async fn check_outcome(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Last(raw) => {
                self.out.last().await.unwrap();
                assert_eq!(self.written(), *raw, "STDERR_LAST");
            }
            Outcome::Error { message, raw } => {
                self.out.error(message).await.unwrap();
                assert_eq!(self.written(), *raw, "STDERR_ERROR");
            }
        }
        assert!(
            self.builds.is_empty() && self.others.is_empty(),
            "every activity ends before the request does"
        );
    }
}

// ---------------------------------------------------------------------------
// A whole session.

/// The daemon's answer to one request.
enum Reply {
    /// `STDERR_LAST` alone.
    Done,
    Failed(String),
    Bool(bool),
    PathInfo(Option<WirePathInfo>),
    Paths(BTreeSet<StorePath>),
    Missing(BTreeSet<StorePath>),
    OutputMap(BTreeMap<String, StorePath>),
    Added(WirePathInfo),
    Results(Vec<(String, BuildResult)>),
    Result(BuildResult),
    Nar(Nar),
}

struct Step {
    request: Request,
    logged: Vec<Logged>,
    reply: Reply,
}

impl Step {
    fn log_lines(&self) -> Vec<&str> {
        self.logged
            .iter()
            .filter_map(|l| match l {
                Logged::Result {
                    kind: 101, fields, ..
                } => match &fields[..] {
                    [Field::Str(line)] => Some(line.as_str()),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }
}

fn assert_kiln_writes(frame: Frame, nix: &[u8]) {
    assert_eq!(frame.as_bytes(), nix, "kiln writes Nix's reply");
}

/// Nix 2.8's handshake reply next to kiln's.
fn check_handshake(nix: &mut NixBytes) {
    // kiln writes the same two words but offers its newest protocol (the
    // client takes the lower of the two); Nix 2.8 offers 1.34.
    let hello = Frame::new().u64(WORKER_MAGIC_2).u64(MIN_VERSION.to_wire());
    assert_kiln_writes(hello, nix.take(16));
    // 1.33+: the daemon's Nix version; kiln's says it is kiln.
    let version = nix.string();
    assert_eq!(version, "2.8.0");
    assert!(DAEMON_NIX_VERSION.starts_with("2.8.0 (kiln "));
    // 1.34 has no trust word (1.35+): STDERR_LAST follows.
    assert_eq!(nix.u64(), stderr::LAST);
}

async fn read_reply(nix: &mut NixBytes, request: &Request, store: &Store) -> Reply {
    let mark = nix.pos;
    match request.op() {
        Op::SetOptions | Op::AddToStoreNar | Op::AddMultipleToStore => Reply::Done,
        Op::IsValidPath => {
            let valid = nix.u64();
            assert!(valid <= 1);
            assert_kiln_writes(Frame::new().bool(valid == 1), nix.since(mark));
            Reply::Bool(valid == 1)
        }
        Op::EnsurePath | Op::AddTempRoot | Op::BuildPaths => {
            assert_kiln_writes(Frame::new().u64(1), nix.take(8));
            Reply::Done
        }
        Op::QueryPathInfo => {
            if nix.u64() == 0 {
                assert_kiln_writes(Frame::new().bool(false), nix.since(mark));
                return Reply::PathInfo(None);
            }
            let info = nix.path_info(Some(request.path())).await;
            let kiln = write_path_info(Frame::new().bool(true), &info);
            assert_kiln_writes(kiln, nix.since(mark));
            Reply::PathInfo(Some(info))
        }
        Op::AddToStore => {
            let info = nix.path_info(None).await;
            let kiln = write_path_info(Frame::new().string(&info.path.to_absolute_path()), &info);
            assert_kiln_writes(kiln, nix.since(mark));
            Reply::Added(info)
        }
        Op::QueryValidPaths => {
            let valid = nix.paths();
            assert_kiln_writes(write_store_paths(Frame::new(), &valid), nix.since(mark));
            Reply::Paths(valid)
        }
        Op::QueryMissing => {
            let will_build = nix.paths();
            let will_substitute = nix.paths();
            let unknown = nix.paths();
            let (download_size, nar_size) = (nix.u64(), nix.u64());
            // What kiln writes (session.rs), with Nix's values: nothing to
            // substitute here either (no substituters).
            assert!(will_substitute.is_empty() && unknown.is_empty());
            let kiln = write_store_paths(Frame::new(), &will_build);
            let kiln = write_store_paths(kiln, &will_substitute);
            let kiln = write_store_paths(kiln, &unknown);
            let kiln = kiln.u64(download_size).u64(nar_size);
            assert_kiln_writes(kiln, nix.since(mark));
            Reply::Missing(will_build)
        }
        Op::QueryDerivationOutputMap => {
            let n = nix.u64();
            let mut map = BTreeMap::new();
            let mut kiln = Frame::new().u64(n);
            for _ in 0..n {
                let (name, path) = (nix.string(), nix.string());
                kiln = kiln.string(&name).string(&path);
                map.insert(name, StorePath::from_absolute_path(&path).unwrap());
            }
            assert_kiln_writes(kiln, nix.since(mark));
            Reply::OutputMap(map)
        }
        Op::BuildPathsWithResults => {
            let n = nix.u64();
            assert_kiln_writes(Frame::new().u64(n), nix.since(mark));
            let mut results = Vec::new();
            for _ in 0..n {
                let target_mark = nix.pos;
                let target = nix.string();
                assert_kiln_writes(Frame::new().string(&target), nix.since(target_mark));
                results.push((target, check_build_result(&nix.build_result())));
            }
            Reply::Results(results)
        }
        Op::BuildDerivation => Reply::Result(check_build_result(&nix.build_result())),
        Op::NarFromPath => {
            // The NAR follows STDERR_LAST raw; only parsing it finds its end.
            let mut rest = &nix.bytes[nix.pos..];
            let before = rest.len();
            let nar = read_nar(store, &mut rest).await;
            nix.pos += before - rest.len();
            Reply::Nar(nar)
        }
        other => panic!("no reply reader for {}", other.name()),
    }
}

/// Walks a session: every request through kiln's readers, every frame and
/// reply of the daemon next to kiln's encoding, both sides to the end.
async fn walk(session: Session, store: &Store) -> Vec<Step> {
    let requests = client_requests(session.client, store).await;
    let mut nix = NixBytes {
        bytes: session.daemon,
        pos: 0,
    };
    check_handshake(&mut nix);
    let mut kiln = KilnLog::new();
    let mut steps = Vec::new();
    for request in requests {
        let (logged, outcome) = nix.work();
        for (frame, raw) in &logged {
            kiln.check(frame, raw).await;
        }
        kiln.check_outcome(&outcome).await;
        let reply = match outcome {
            Outcome::Last(_) => read_reply(&mut nix, &request, store).await,
            Outcome::Error { message, .. } => Reply::Failed(message),
        };
        let logged = logged.into_iter().map(|(l, _)| l).collect();
        steps.push(Step {
            request,
            logged,
            reply,
        });
    }
    assert_eq!(
        nix.pos,
        nix.bytes.len(),
        "{}: the daemon's side is read to its end",
        session.name
    );
    steps
}

fn ops(steps: &[Step]) -> Vec<Op> {
    steps.iter().map(|s| s.request.op()).collect()
}

// ---------------------------------------------------------------------------
// The sessions.

/// What a client sends when it sets nothing: only `cores` (the client
/// machine's CPU count) varies.
fn assert_default_options(step: &Step) {
    let Request::SetOptions(options) = &step.request else {
        panic!("SetOptions first");
    };
    assert_eq!(
        options,
        &BuildOptions {
            build_cores: options.build_cores,
            ..BuildOptions::default()
        }
    );
}

fn fixed_path(name: &str, method: Method, hash: &Hash) -> StorePath {
    make_fixed_output_path(name, method, hash, &BTreeSet::new(), false).unwrap()
}

#[tokio::test]
async fn query_path_info_of_an_added_path() {
    let castore = castore();
    let steps = walk(session!("query-path-info"), &castore.store).await;
    assert_eq!(ops(&steps), [Op::SetOptions, Op::QueryPathInfo]);
    assert_default_options(&steps[0]);
    let Reply::PathInfo(Some(info)) = &steps[1].reply else {
        panic!("the toolset is valid");
    };
    // `nix-store --add` made it: its path is its NAR's content address.
    let ca = ContentAddress::parse(&info.ca).unwrap();
    let hash = Hash::Sha256(info.nar_sha256);
    assert_eq!(
        ca,
        ContentAddress::Fixed {
            method: Method::Recursive,
            hash
        }
    );
    assert_eq!(ca.to_string(), info.ca);
    assert_eq!(
        info.path,
        fixed_path(info.path.name(), Method::Recursive, &hash)
    );
    assert!(info.references.is_empty() && info.deriver.is_none());
}

#[tokio::test]
async fn is_valid_path() {
    let castore = castore();
    let steps = walk(session!("is-valid-path"), &castore.store).await;
    assert_eq!(ops(&steps), [Op::SetOptions, Op::IsValidPath]);
    assert!(matches!(steps[1].reply, Reply::Bool(true)));
}

#[tokio::test]
async fn nix_path_info_asks_what_is_missing_then_the_info() {
    let castore = castore();
    let steps = walk(session!("path-info"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [Op::SetOptions, Op::QueryMissing, Op::QueryPathInfo]
    );
    // The new CLI passes `store` as an overridden setting; kiln ignores it.
    assert_default_options(&steps[0]);
    let Request::Targets(_, targets) = &steps[1].request else {
        unreachable!()
    };
    assert!(matches!(&targets[..], [DerivedPath::Opaque(p)] if p == steps[2].request.path()));
    assert!(matches!(&steps[1].reply, Reply::Missing(m) if m.is_empty()));
    // "querying info about missing paths": an activity kiln does not send.
    assert!(matches!(&steps[1].logged[0], Logged::Start { kind: 0, .. }));
}

#[tokio::test]
async fn add_to_store_a_nar() {
    let castore = castore();
    let steps = walk(session!("add-to-store"), &castore.store).await;
    assert_eq!(ops(&steps), [Op::SetOptions, Op::AddToStore]);
    let Request::AddToStore {
        name,
        method,
        references,
        contents,
    } = &steps[1].request
    else {
        unreachable!()
    };
    assert_eq!(method, "fixed:r:sha256");
    assert!(references.is_empty());
    let mut input = &contents[..];
    let nar = read_nar(&castore.store, &mut input).await;
    assert!(input.is_empty());
    let Reply::Added(info) = &steps[1].reply else {
        panic!("AddToStore answers the path info");
    };
    let hash = Hash::Sha256(nar.ingested.nar_sha256);
    assert_eq!(info.path, fixed_path(name, Method::Recursive, &hash));
    assert_eq!(
        (info.nar_sha256, info.nar_size),
        (nar.ingested.nar_sha256, nar.ingested.nar_size)
    );
    let ca = ContentAddress::Fixed {
        method: Method::Recursive,
        hash,
    };
    assert_eq!(info.ca, ca.to_string());
}

#[tokio::test]
async fn add_file_sends_a_flat_path_with_add_to_store_nar() {
    let castore = castore();
    let steps = walk(session!("add-file"), &castore.store).await;
    assert_eq!(ops(&steps), [Op::SetOptions, Op::AddToStoreNar]);
    let Request::AddToStoreNar(added) = &steps[1].request else {
        unreachable!()
    };
    let ca = ContentAddress::parse(&added.info.ca).unwrap();
    let ContentAddress::Fixed {
        method: Method::Flat,
        hash,
    } = ca
    else {
        panic!("{ca:?}");
    };
    assert_eq!(ca.to_string(), added.info.ca);
    let contents = file_contents(&castore.store, &added.nar).await;
    assert!(contents.starts_with(b"captured by nix store add-file "));
    assert_eq!(hash, Hash::Sha256(sha256(&contents)));
    assert_eq!(
        added.info.path,
        fixed_path(added.info.path.name(), Method::Flat, &hash)
    );
}

#[tokio::test]
async fn import_sends_add_to_store_nar() {
    let castore = castore();
    let steps = walk(session!("add-to-store-nar"), &castore.store).await;
    assert_eq!(ops(&steps), [Op::SetOptions, Op::AddToStoreNar]);
    let Request::AddToStoreNar(added) = &steps[1].request else {
        unreachable!()
    };
    // An export carries no content address, but the path was added by
    // `nix-store --add`: its NAR hash gives it.
    let info = &added.info;
    assert!(info.ca.is_empty() && info.deriver.is_none() && info.references.is_empty());
    let hash = Hash::Sha256(info.nar_sha256);
    assert_eq!(
        info.path,
        fixed_path(info.path.name(), Method::Recursive, &hash)
    );
    let contents = file_contents(&castore.store, &added.nar).await;
    assert!(contents.starts_with(b"captured by nix-store --import "));
}

#[tokio::test]
async fn copy_sends_a_closure_with_add_multiple_to_store() {
    let castore = castore();
    let steps = walk(session!("add-multiple-to-store"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [Op::SetOptions, Op::QueryValidPaths, Op::AddMultipleToStore]
    );
    let Request::QueryValidPaths(asked) = &steps[1].request else {
        unreachable!()
    };
    assert!(matches!(&steps[1].reply, Reply::Paths(v) if v.is_empty()));
    let Request::AddMultipleToStore(added) = &steps[2].request else {
        unreachable!()
    };
    let [dep, top] = &added[..] else {
        panic!("two paths");
    };
    // Dependencies first.
    assert_eq!(top.info.references, BTreeSet::from([dep.info.path.clone()]));
    assert!(dep.info.references.is_empty());
    let sent: BTreeSet<StorePath> = added.iter().map(|a| a.info.path.clone()).collect();
    assert_eq!(&sent, asked);
    for a in added {
        let ca = ContentAddress::parse(&a.info.ca).unwrap();
        let ContentAddress::Text {
            hash: Hash::Sha256(digest),
        } = ca
        else {
            panic!("{ca:?}");
        };
        let contents = file_contents(&castore.store, &a.nar).await;
        assert_eq!(digest, sha256(&contents));
        let path = make_text_path(a.info.path.name(), &digest, &a.info.references).unwrap();
        assert_eq!(path, a.info.path);
    }
}

#[tokio::test]
async fn instantiate_adds_the_drv_as_text() {
    let castore = castore();
    let steps = walk(session!("instantiate"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [Op::SetOptions, Op::EnsurePath, Op::AddToStore]
    );
    let Request::AddToStore {
        name,
        method,
        references,
        contents,
    } = &steps[2].request
    else {
        unreachable!()
    };
    assert_eq!(method, "text:sha256");
    assert_eq!(
        references,
        &BTreeSet::from([steps[1].request.path().clone()])
    );
    // kiln's ATerm parser and writer reproduce Nix's .drv byte for byte.
    let drv = Derivation::parse(contents).unwrap();
    assert_eq!(&drv.to_aterm(), contents);
    assert_eq!(&drv.input_sources, references);
    let Reply::Added(info) = &steps[2].reply else {
        unreachable!()
    };
    let digest = sha256(contents);
    assert_eq!(
        info.path,
        make_text_path(name, &digest, references).unwrap()
    );
    let ca = ContentAddress::Text {
        hash: Hash::Sha256(digest),
    };
    assert_eq!(info.ca, ca.to_string());
}

#[tokio::test]
async fn dry_run_queries_what_is_missing() {
    let castore = castore();
    let steps = walk(session!("query-missing"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [Op::SetOptions, Op::QueryMissing, Op::QueryPathInfo]
    );
    let Request::Targets(_, targets) = &steps[1].request else {
        unreachable!()
    };
    let [DerivedPath::Built {
        drv,
        outputs: OutputsSpec::All,
    }] = &targets[..]
    else {
        panic!("nix-store --realise asks for DRV!*");
    };
    assert!(matches!(&steps[1].reply, Reply::Missing(m) if m == &BTreeSet::from([drv.clone()])));
}

#[tokio::test]
async fn realise_builds_with_a_build_activity_and_its_log() {
    let castore = castore();
    let steps = walk(session!("build-paths"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [
            Op::SetOptions,
            Op::QueryMissing,
            Op::QueryPathInfo,
            Op::BuildPaths,
            Op::QueryDerivationOutputMap,
            Op::EnsurePath,
        ]
    );
    // `--max-silent-time 60 --option cores 1` travel in SetOptions' fixed
    // fields, `timeout` and `max-build-log-size` as overrides.
    let Request::SetOptions(options) = &steps[0].request else {
        unreachable!()
    };
    assert_eq!(
        options,
        &BuildOptions {
            max_silent_secs: 60,
            timeout_secs: 600,
            max_log_bytes: 1_048_576,
            build_cores: 1,
            log_lines: 0,
        }
    );
    assert_eq!(
        steps[3].log_lines(),
        ["captured log line one", "captured log line two"]
    );
    let Reply::OutputMap(outputs) = &steps[4].reply else {
        unreachable!()
    };
    assert_eq!(outputs.keys().collect::<Vec<_>>(), ["out"]);
}

#[tokio::test]
async fn a_failed_build_ends_with_an_error_frame() {
    let castore = castore();
    let steps = walk(session!("build-failure"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [
            Op::SetOptions,
            Op::QueryMissing,
            Op::QueryPathInfo,
            Op::BuildPaths
        ]
    );
    let build = &steps[3];
    assert_eq!(build.log_lines(), ["about to fail"]);
    // --keep-failed: the daemon says where it kept the build (STDERR_NEXT).
    assert!(
        build.logged.iter().any(|l| matches!(l,
        Logged::Next(m) if m.starts_with("note: keeping build directory '") && m.ends_with("'\n")))
    );
    let Reply::Failed(message) = &build.reply else {
        panic!("the build fails");
    };
    assert!(message.contains("failed with exit code 3"), "{message}");
}

#[tokio::test]
async fn nix_build_uses_build_paths_with_results() {
    let castore = castore();
    let steps = walk(session!("build-paths-with-results"), &castore.store).await;
    assert_eq!(
        ops(&steps),
        [Op::SetOptions, Op::IsValidPath, Op::BuildPathsWithResults]
    );
    let Request::Targets(_, targets) = &steps[2].request else {
        unreachable!()
    };
    let Reply::Results(results) = &steps[2].reply else {
        unreachable!()
    };
    let [(target, result)] = &results[..] else {
        panic!("one result");
    };
    assert_eq!(target, &targets[0].to_string());
    assert!(target.ends_with("!out"));
    assert_eq!(result.status, BuildStatus::Built);
    assert_eq!(result.built_outputs.keys().collect::<Vec<_>>(), ["out"]);
    assert_eq!(steps[2].log_lines(), ["built for BuildPathsWithResults"]);
}

/// The build hook's session: the inputs are valid on the builder (an empty
/// AddMultipleToStore), then the derivation inline.
fn inline_derivation(steps: &[Step]) -> (&StorePath, &Derivation) {
    assert_eq!(
        ops(&steps[..3]),
        [
            Op::QueryValidPaths,
            Op::AddMultipleToStore,
            Op::BuildDerivation
        ]
    );
    assert!(matches!(&steps[1].request, Request::AddMultipleToStore(a) if a.is_empty()));
    let Request::BuildDerivation { drv_path, drv } = &steps[2].request else {
        unreachable!()
    };
    let Request::QueryValidPaths(inputs) = &steps[0].request else {
        unreachable!()
    };
    assert_eq!(inputs, &drv.input_sources);
    // It has no input derivations, so its .drv is what kiln writes from the
    // inline form: kiln finds the path the client named.
    let aterm = drv.to_aterm();
    let path = make_text_path(drv_path.name(), &sha256(&aterm), &drv.input_sources).unwrap();
    assert_eq!(&path, drv_path);
    (drv_path, drv)
}

#[tokio::test]
async fn the_build_hook_sends_build_derivation_then_fetches_the_output() {
    let castore = castore();
    let steps = walk(session!("build-derivation"), &castore.store).await;
    let (drv_path, drv) = inline_derivation(&steps);
    assert_eq!(ops(&steps[3..]), [Op::QueryPathInfo, Op::NarFromPath]);
    let out = drv.outputs["out"].path.clone().unwrap();
    assert_eq!(steps[2].log_lines(), ["built on the ssh-ng builder"]);
    let Reply::Result(result) = &steps[2].reply else {
        unreachable!()
    };
    assert_eq!(result.status, BuildStatus::Built);
    assert_eq!(
        result.built_outputs,
        BTreeMap::from([("out".to_owned(), out.clone())])
    );
    let Reply::PathInfo(Some(info)) = &steps[3].reply else {
        panic!("the output is valid");
    };
    assert_eq!(steps[3].request.path(), &out);
    assert_eq!(info.deriver.as_ref(), Some(drv_path));
    assert!(info.ultimate && info.ca.is_empty());
    let Reply::Nar(nar) = &steps[4].reply else {
        unreachable!()
    };
    assert_eq!(steps[4].request.path(), &out);
    assert_eq!(
        (nar.ingested.nar_sha256, nar.ingested.nar_size),
        (info.nar_sha256, info.nar_size)
    );
    assert_eq!(file_contents(&castore.store, nar).await, b"remote output\n");
}

#[tokio::test]
async fn a_failed_build_derivation_answers_a_failed_result() {
    let castore = castore();
    let steps = walk(session!("build-derivation-failure"), &castore.store).await;
    inline_derivation(&steps);
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2].log_lines(), ["failing on the ssh-ng builder"]);
    let Reply::Result(result) = &steps[2].reply else {
        unreachable!()
    };
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert!(
        result.error.contains("failed with exit code 4"),
        "{}",
        result.error
    );
    assert!(result.built_outputs.is_empty());
}

#[tokio::test]
async fn an_ssh_ng_store_fetches_a_nar_with_nar_from_path() {
    let castore = castore();
    let steps = walk(session!("nar-from-path"), &castore.store).await;
    // No SetOptions: Nix 2.8's ssh-ng store does not send it.
    assert_eq!(
        ops(&steps),
        [Op::QueryMissing, Op::QueryPathInfo, Op::NarFromPath]
    );
    let Reply::PathInfo(Some(info)) = &steps[1].reply else {
        unreachable!()
    };
    let Reply::Nar(nar) = &steps[2].reply else {
        unreachable!()
    };
    assert_eq!(nar.ingested.nar_sha256, info.nar_sha256);
    let contents = file_contents(&castore.store, nar).await;
    assert!(contents.starts_with(b"captured by nix-store --add "));
    assert!(!nar.bytes.is_empty());
}
