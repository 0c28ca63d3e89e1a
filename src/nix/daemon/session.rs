//! One client connection: the handshake, then requests until the client
//! hangs up.
//!
//! Each request is read whole before it is acted on. What can go wrong
//! afterwards is the request's fault or the store's, and is answered with
//! `STDERR_ERROR` naming the problem; the connection goes on. Only a stream
//! that is out of step (truncated, a length beyond kiln's bounds, an
//! operation number kiln cannot delimit) ends the connection, after an
//! error frame where one can still be sent.

use std::collections::BTreeSet;

use tokio::io::{AsyncRead, AsyncWrite};

use super::build::{self, BuildOptions};
use super::logger::Output;
use super::protocol::{
    trust_word, Op, ProtocolVersion, DAEMON_NIX_VERSION, MAX_VERSION, MIN_VERSION, WORKER_MAGIC_1,
    WORKER_MAGIC_2,
};
use super::store::{to_wire, Daemon, StoreError};
use super::types::{
    read_derived_paths, read_store_path, read_store_paths, write_build_result, write_path_info,
    write_store_paths, ReadError,
};
use super::wire::{Frame, WireError, WireReader, MAX_PATH, MAX_SHORT};
use super::{add, SessionError};
use crate::nix::StorePath;

/// A request could not be served.
#[derive(Debug)]
pub(super) enum OpError {
    /// The stream is out of step: end the connection.
    Fatal(SessionError),
    /// The request failed; tell the client and go on.
    Refused(String),
}

impl From<WireError> for OpError {
    fn from(e: WireError) -> Self {
        OpError::Fatal(SessionError::Wire(e))
    }
}

impl From<ReadError> for OpError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Wire(w) => OpError::Fatal(SessionError::Wire(w)),
            ReadError::Value(v) => OpError::Refused(v.to_string()),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Refused(super::error_chain(&e))
    }
}

impl From<std::io::Error> for OpError {
    fn from(e: std::io::Error) -> Self {
        OpError::Fatal(SessionError::Write(e))
    }
}

/// Serves one client on `reader`/`writer` until it hangs up.
pub async fn serve_connection<R, W>(
    daemon: &Daemon,
    reader: R,
    writer: W,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut session = Session {
        daemon,
        r: WireReader::new(tokio::io::BufReader::new(reader)),
        out: Output::new(tokio::io::BufWriter::new(writer)),
        version: MIN_VERSION,
        options: daemon.config.build_defaults.clone(),
    };
    session.handshake().await?;
    session.run().await
}

pub(super) struct Session<'d, R, W> {
    pub(super) daemon: &'d Daemon,
    pub(super) r: WireReader<tokio::io::BufReader<R>>,
    pub(super) out: Output<tokio::io::BufWriter<W>>,
    pub(super) version: ProtocolVersion,
    pub(super) options: BuildOptions,
}

impl<R, W> Session<'_, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async fn handshake(&mut self) -> Result<(), SessionError> {
        let magic = self.r.u64("the client's magic word").await?;
        if magic != WORKER_MAGIC_1 {
            return Err(SessionError::Magic(magic));
        }
        self.out
            .send(Frame::new().u64(WORKER_MAGIC_2).u64(MAX_VERSION.to_wire()))
            .await
            .map_err(SessionError::Write)?;
        self.out.flush().await.map_err(SessionError::Write)?;
        let client = ProtocolVersion::from_wire(self.r.u64("the client's version").await?);
        let version = client.min(MAX_VERSION);
        if client.major != 1 || version < MIN_VERSION {
            // Old clients cannot read the error frame of today's protocol
            // before the handshake ends; they get it anyway, and the log
            // says what happened.
            let message = format!(
                "the Nix client speaks worker protocol {client}; kiln speaks {MIN_VERSION} (Nix 2.8) to {MAX_VERSION}"
            );
            let _ = self.out.error(&message).await;
            return Err(SessionError::TooOld(client));
        }
        self.version = version;
        // Obsolete CPU affinity (1.14+) and reserveSpace (1.11+).
        if self.r.bool("the CPU affinity flag").await? {
            self.r.u64("the CPU affinity").await?;
        }
        self.r.bool("the reserve-space flag").await?;
        let mut frame = Frame::new().string(DAEMON_NIX_VERSION);
        if version.at_least(35) {
            frame = frame.u64(trust_word(Some(self.daemon.config.trusted)));
        }
        self.out.send(frame).await.map_err(SessionError::Write)?;
        self.out.last().await.map_err(SessionError::Write)?;
        self.out.flush().await.map_err(SessionError::Write)?;
        tracing::info!(protocol = %version, trusted = self.daemon.config.trusted, "nix client connected");
        Ok(())
    }

    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(word) = self.r.try_u64().await? else {
                return Ok(());
            };
            let Some(op) = Op::from_wire(word) else {
                let message = format!(
                    "kiln does not know worker operation {word}; it cannot tell where its arguments end, so it closes the connection"
                );
                tracing::warn!(op = word, "unknown nix worker operation");
                let _ = self.out.error(&message).await;
                return Err(SessionError::UnknownOp(word));
            };
            tracing::debug!(op = op.name(), "nix worker operation");
            match self.perform(op).await {
                Ok(()) => {}
                Err(OpError::Refused(message)) => {
                    tracing::info!(op = op.name(), error = %message, "nix worker operation refused");
                    self.out
                        .error(&message)
                        .await
                        .map_err(SessionError::Write)?;
                }
                Err(OpError::Fatal(e)) => {
                    tracing::warn!(op = op.name(), error = %super::error_chain(&e), "nix client connection ends");
                    let _ = self
                        .out
                        .error(&format!("{}: {}", op.name(), super::error_chain(&e)))
                        .await;
                    return Err(e);
                }
            }
            self.out.flush().await.map_err(SessionError::Write)?;
        }
    }

    /// `STDERR_LAST` then `frame`.
    pub(super) async fn reply(&mut self, frame: Frame) -> Result<(), OpError> {
        self.out.last().await?;
        self.out.send(frame).await?;
        Ok(())
    }

    fn untrusted(&self, what: &str) -> Result<(), OpError> {
        if self.daemon.config.trusted {
            Ok(())
        } else {
            Err(OpError::Refused(format!(
                "you are not privileged to {what} (this kiln daemon does not trust its clients)"
            )))
        }
    }

    async fn perform(&mut self, op: Op) -> Result<(), OpError> {
        match op {
            Op::IsValidPath => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let valid = self.daemon.is_valid(&path).await?;
                self.reply(Frame::new().bool(valid)).await
            }
            Op::QueryValidPaths => {
                let paths = read_store_paths(&mut self.r, "the paths").await?;
                // 1.27+: whether to substitute; kiln has no substituters.
                self.r.bool("the substitute flag").await?;
                let mut valid = BTreeSet::new();
                for path in paths {
                    if self.daemon.is_valid(&path).await? {
                        valid.insert(path);
                    }
                }
                self.reply(write_store_paths(Frame::new(), &valid)).await
            }
            Op::QueryPathInfo => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let frame = match self.daemon.info(&path).await? {
                    Some(info) => write_path_info(Frame::new().bool(true), &to_wire(&info)),
                    None => Frame::new().bool(false),
                };
                self.reply(frame).await
            }
            Op::QueryPathFromHashPart => {
                let hash_part = self.r.string("the hash part", MAX_PATH).await?;
                let path = self.daemon.by_hash_part(&hash_part).await?;
                let s = path.map(|p| p.to_absolute_path()).unwrap_or_default();
                self.reply(Frame::new().string(&s)).await
            }
            Op::QueryMissing => {
                let targets = read_derived_paths(&mut self.r).await?;
                let missing = build::query_missing(self.daemon, &targets).await?;
                let frame = write_store_paths(Frame::new(), &missing.will_build);
                let frame = write_store_paths(frame, &BTreeSet::new());
                let frame = write_store_paths(frame, &missing.unknown);
                self.reply(frame.u64(0).u64(0)).await
            }
            Op::QueryDerivationOutputMap => {
                let path = read_store_path(&mut self.r, "the derivation").await?;
                let drv = self.derivation(&path).await?;
                let mut frame = Frame::new().u64(drv.outputs.len() as u64);
                for (name, output) in &drv.outputs {
                    let p = output.path.as_ref().map(StorePath::to_absolute_path);
                    frame = frame.string(name).string(&p.unwrap_or_default());
                }
                self.reply(frame).await
            }
            Op::QueryDerivationOutputs => {
                let path = read_store_path(&mut self.r, "the derivation").await?;
                let drv = self.derivation(&path).await?;
                let outputs: BTreeSet<StorePath> = drv
                    .outputs
                    .values()
                    .filter_map(|o| o.path.clone())
                    .collect();
                self.reply(write_store_paths(Frame::new(), &outputs)).await
            }
            Op::QueryDerivationOutputNames => {
                let path = read_store_path(&mut self.r, "the derivation").await?;
                let drv = self.derivation(&path).await?;
                self.reply(Frame::new().strings(drv.outputs.keys())).await
            }
            Op::QueryDeriver => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let deriver = self.daemon.info(&path).await?.and_then(|i| i.deriver);
                let s = deriver.map(|p| p.to_absolute_path()).unwrap_or_default();
                self.reply(Frame::new().string(&s)).await
            }
            Op::QueryValidDerivers => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let mut derivers = BTreeSet::new();
                if let Some(d) = self.daemon.info(&path).await?.and_then(|i| i.deriver) {
                    if self.daemon.is_valid(&d).await? {
                        derivers.insert(d);
                    }
                }
                self.reply(write_store_paths(Frame::new(), &derivers)).await
            }
            Op::QueryReferences => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let info = self.valid(&path).await?;
                self.reply(write_store_paths(Frame::new(), &info.references))
                    .await
            }
            Op::QueryPathHash => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let info = self.valid(&path).await?;
                self.reply(Frame::new().string(&hex::encode(info.nar_sha256)))
                    .await
            }
            Op::HasSubstitutes => {
                read_store_path(&mut self.r, "the path").await?;
                self.reply(Frame::new().bool(false)).await
            }
            Op::QuerySubstitutablePaths => {
                read_store_paths(&mut self.r, "the paths").await?;
                self.reply(Frame::new().u64(0)).await
            }
            Op::QuerySubstitutablePathInfo => {
                read_store_path(&mut self.r, "the path").await?;
                self.reply(Frame::new().bool(false)).await
            }
            Op::QuerySubstitutablePathInfos => {
                // 1.22+: path → optional content address.
                self.r.string_pairs("the paths", MAX_SHORT).await?;
                self.reply(Frame::new().u64(0)).await
            }
            Op::SetOptions => {
                self.options = BuildOptions::read(&mut self.r)
                    .await?
                    .or_defaults(&self.daemon.config.build_defaults);
                self.out.last().await?;
                Ok(())
            }
            Op::AddTempRoot | Op::EnsurePath => {
                let path = read_store_path(&mut self.r, "the path").await?;
                if op == Op::EnsurePath {
                    self.valid(&path).await?;
                }
                // kiln's store is not garbage-collected by Nix's rules:
                // a temporary root has nothing to protect.
                self.reply(Frame::new().u64(1)).await
            }
            Op::AddIndirectRoot => {
                self.r.string("the root", MAX_SHORT).await?;
                self.reply(Frame::new().u64(1)).await
            }
            Op::AddPermRoot => {
                read_store_path(&mut self.r, "the path").await?;
                let root = self.r.string("the root", MAX_SHORT).await?;
                self.reply(Frame::new().string(&root)).await
            }
            Op::SyncWithGC | Op::OptimiseStore => self.reply(Frame::new().u64(1)).await,
            Op::FindRoots => self.reply(Frame::new().u64(0)).await,
            Op::AddToStoreNar => add::add_to_store_nar(self).await,
            Op::AddMultipleToStore => add::add_multiple_to_store(self).await,
            Op::AddToStore => add::add_to_store(self).await,
            Op::AddTextToStore => add::add_text_to_store(self).await,
            Op::AddSignatures => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let sigs = self.r.strings("the signatures", MAX_SHORT).await?;
                self.untrusted("add signatures")?;
                let mut info = self.valid(&path).await?;
                let parsed = super::store::parse_signatures(&sigs).map_err(OpError::Refused)?;
                for sig in parsed {
                    if !info.signatures.contains(&sig) {
                        info.signatures.push(sig);
                    }
                }
                self.daemon.register(info).await?;
                self.reply(Frame::new().u64(1)).await
            }
            Op::NarFromPath => {
                let path = read_store_path(&mut self.r, "the path").await?;
                let info = self.valid(&path).await?;
                self.out.last().await?;
                // The NAR follows raw; a failure midway cannot be reported
                // in band any more, so it ends the connection.
                self.daemon
                    .write_nar(&info, self.out.get_mut())
                    .await
                    .map_err(|e| OpError::Fatal(SessionError::Store(e)))
            }
            Op::BuildPaths | Op::BuildPathsWithResults => {
                let targets = read_derived_paths(&mut self.r).await?;
                let mode = self.r.u64("the build mode").await?;
                check_mode(mode)?;
                let results = build::build_paths(self, &targets).await?;
                if op == Op::BuildPaths {
                    let failed: Vec<String> = results
                        .iter()
                        .filter(|(_, r)| !r.status.is_success())
                        .map(|(t, r)| format!("{t}: {}", r.error))
                        .collect();
                    if !failed.is_empty() {
                        return Err(OpError::Refused(failed.join("\n")));
                    }
                    self.reply(Frame::new().u64(1)).await
                } else {
                    let mut frame = Frame::new().u64(results.len() as u64);
                    for (target, result) in &results {
                        frame = frame.string(target);
                        frame = write_build_result(frame, result, self.version);
                    }
                    self.reply(frame).await
                }
            }
            Op::BuildDerivation => {
                let drv_path = read_store_path(&mut self.r, "the derivation path").await?;
                let drv = super::types::read_basic_derivation(&mut self.r).await?;
                let mode = self.r.u64("the build mode").await?;
                check_mode(mode)?;
                if !drv.is_fixed_output() {
                    self.untrusted(
                        "build input-addressed derivations sent inline; build by .drv path instead",
                    )?;
                }
                let result = build::build_inline(self, &drv_path, &drv).await?;
                let frame = write_build_result(Frame::new(), &result, self.version);
                self.reply(frame).await
            }
            Op::QueryAllValidPaths => {
                let paths = self.daemon.all_paths().await?;
                self.reply(write_store_paths(Frame::new(), &paths)).await
            }
            Op::QueryReferrers => {
                read_store_path(&mut self.r, "the path").await?;
                Err(refused(op, "kiln does not index referrers"))
            }
            Op::VerifyStore => {
                self.r.bool("the check-contents flag").await?;
                self.r.bool("the repair flag").await?;
                Err(refused(
                    op,
                    "kiln's store is checked by kiln, not through Nix",
                ))
            }
            Op::CollectGarbage => {
                self.r.u64("the action").await?;
                read_store_paths(&mut self.r, "the paths").await?;
                self.r.bool("the ignore-liveness flag").await?;
                self.r.u64("the bytes to free").await?;
                for _ in 0..3 {
                    self.r.u64("an obsolete field").await?;
                }
                Err(refused(
                    op,
                    "kiln's store is not garbage-collected through Nix",
                ))
            }
            Op::QueryRealisation => {
                self.r.string("the output id", MAX_SHORT).await?;
                // No content-addressed derivation outputs are recorded.
                self.reply(Frame::new().u64(0)).await
            }
            Op::RegisterDrvOutput => {
                self.r.string("the realisation", MAX_SHORT).await?;
                Err(refused(
                    op,
                    "kiln does not record content-addressed derivation outputs",
                ))
            }
            Op::AddBuildLog => {
                read_store_path(&mut self.r, "the path").await?;
                let mut framed = super::wire::FramedReader::new(self.r.get_mut());
                framed
                    .drain()
                    .await
                    .map_err(|e| WireError::io("the build log", e))?;
                Err(refused(
                    op,
                    "kiln keeps the logs of the builds it ran itself",
                ))
            }
            Op::ExportPath => {
                read_store_path(&mut self.r, "the path").await?;
                self.r.u64("the obsolete sign flag").await?;
                Err(refused(op, "use NarFromPath (nix copy, nix-store --dump)"))
            }
            Op::ImportPaths => {
                // The payload would come only when asked for (STDERR_READ):
                // refusing before asking leaves nothing unread.
                Err(refused(op, "use AddMultipleToStore (nix copy)"))
            }
            Op::QueryFailedPaths => self.reply(Frame::new().u64(0)).await,
            Op::ClearFailedPaths => {
                read_store_paths(&mut self.r, "the paths").await?;
                self.reply(Frame::new().u64(1)).await
            }
        }
    }

    /// The path's info, or a refusal naming it.
    pub(super) async fn valid(
        &self,
        path: &StorePath,
    ) -> Result<crate::nix::path_info::PathInfo, OpError> {
        self.daemon
            .info(path)
            .await?
            .ok_or_else(|| OpError::Refused(format!("path '{path}' is not valid")))
    }

    async fn derivation(&self, path: &StorePath) -> Result<crate::nix::Derivation, OpError> {
        match self.daemon.read_derivation(path).await? {
            None => Err(OpError::Refused(format!("path '{path}' is not valid"))),
            Some(Err(e)) => Err(OpError::Refused(e)),
            Some(Ok(drv)) => Ok(drv),
        }
    }
}

fn refused(op: Op, why: &str) -> OpError {
    OpError::Refused(format!("{} is not supported by kiln: {why}", op.name()))
}

/// Build modes: normal 0, repair 1, check 2.
fn check_mode(mode: u64) -> Result<(), OpError> {
    match mode {
        0 => Ok(()),
        1 => Err(OpError::Refused(
            "repairing is not supported by kiln: a path kiln holds is content-addressed in its castore".into(),
        )),
        2 => Err(OpError::Refused(
            "--check is not supported by kiln yet: every build already runs in a fresh VM".into(),
        )),
        other => Err(OpError::Refused(format!("unknown build mode {other}"))),
    }
}
