//! The host<->guest contract: how a job gets into the VM and how its log and
//! result get out. Shared by the agent and by the kiln host.
//!
//! ## Job in
//! A VM booted for one request (cold): the host appends a small cpio
//! archive to the cached base initramfs. It holds one file, [`JOB_PATH`],
//! the JSON encoding of [`Job`]. Linux unpacks concatenated archives, so the
//! agent simply reads the file at start.
//!
//! A VM booted before its request (warm, the host's pool): the archive
//! holds [`WARM_PATH`] instead, a JSON [`Warm`]. The agent loads its
//! modules, opens the channel, writes [`MAGIC`] and one empty
//! [`FrameKind::Ready`] frame, and waits. The host, once it has a request
//! for this VM and has put its inputs into the (already shared) inputs
//! directory, writes the job on the channel's way back:
//!
//! ```text
//! len:u32 little-endian | Job as JSON [len]      (len <= MAX_JOB_BYTES)
//! ```
//!
//! and the agent goes on exactly as with a job from the initramfs: it mounts
//! the shares only then, so nothing of the share was looked at before the
//! inputs were there. A warm VM runs one job, like any other.
//!
//! ## Log and result out
//! The agent writes to a virtio serial port, needing neither vsock nor a
//! network: on QEMU a `virtserialport` (the guest's [`SERIAL_PORT_PATH`]),
//! which QEMU back-pressures (a `virtconsole` would have its bytes dropped
//! whenever the host reads slower than the guest writes); on
//! cloud-hypervisor its virtio console (`/dev/hvc0`, [`CONSOLE_PATH`]). The
//! agent takes the serial port when the VM has one, else the console. The
//! kernel's own console is on the legacy serial port, so nothing else writes
//! to the channel. The stream is:
//!
//! ```text
//! MAGIC  then  frame*      frame = kind:u8 | len:u32 little-endian | payload[len]
//! ```
//!
//! Frame kinds are [`FrameKind`]. The last frame is always [`FrameKind::Report`]
//! (a JSON [`Report`]), after which the agent syncs and powers the VM off. On
//! a two-way channel (the serial port) the host answers the report with one
//! [`ACK`] byte and the agent waits for it (bounded by [`ACK_TIMEOUT_MS`])
//! before powering off, so no byte is still in the VMM's buffers then. A
//! stream that ends without a report means the VM died (crash, kernel panic,
//! kill), which the host reports as such.
//!
//! ## Shares
//! Two virtiofs shares: [`INPUTS_TAG`] (read-only; one entry per input, named
//! by the input's name) and [`SCRATCH_TAG`] (read-write; one directory per
//! scratch path, at the same relative path, e.g. `build/` and `nix/store/`).
//! Outputs are written into the scratch share, so the host finds them there.
//! Extra read-only host paths (operator allow-listed) come as further shares
//! named in [`Job::ro_paths`].

use serde::{Deserialize, Serialize};

/// Where the job file is inside the initramfs.
pub const JOB_PATH: &str = "/kiln/job.json";
/// Where a warm VM's [`Warm`] is inside the initramfs.
pub const WARM_PATH: &str = "/kiln/warm.json";
/// Upper bound on a job sent over the channel to a warm VM.
pub const MAX_JOB_BYTES: u32 = 256 << 20;
/// Where kernel modules are inside the base initramfs (flat, `<name>.ko`).
pub const MODULES_DIR: &str = "/kiln/modules";
/// Where the static shell (busybox) is inside the base initramfs, if present.
pub const SHELL_PATH: &str = "/kiln/sh";
/// virtiofs tag of the read-only inputs share.
pub const INPUTS_TAG: &str = "kiln-inputs";
/// virtiofs tag of the read-write scratch share.
pub const SCRATCH_TAG: &str = "kiln-scratch";
/// The channel on QEMU: the virtio serial port named `kiln.channel` (nr 1).
pub const SERIAL_PORT_PATH: &str = "/dev/vport0p1";
/// The channel on cloud-hypervisor: the first virtio console.
pub const CONSOLE_PATH: &str = "/dev/hvc0";
/// The host's acknowledgement of the report, on two-way channels.
pub const ACK: u8 = 0x06;
/// How long the agent waits for [`ACK`] before powering off anyway.
pub const ACK_TIMEOUT_MS: u64 = 5000;
/// The first bytes the agent writes on the channel.
pub const MAGIC: &[u8; 8] = b"KILN\x00v1\n";
/// Upper bound on one frame's payload; larger writes are split.
pub const MAX_FRAME: usize = 64 * 1024;
/// The build user, as in a Nix sandbox.
pub const BUILD_UID: u32 = 1000;
/// The build group (`nixbld`), as in a Nix sandbox.
pub const BUILD_GID: u32 = 100;

/// What the agent must run. Paths are clean and relative to the sandbox root
/// `/` (the host validated them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Job {
    /// argv of the builder; `command_args[0]` is an absolute path or resolved
    /// against nothing (no PATH lookup, as in Nix). It is the program
    /// executed, and also its `argv[0]` unless [`Job::argv0`] is set.
    pub command_args: Vec<String>,
    /// The builder's `argv[0]` when it differs from `command_args[0]` (Nix
    /// passes the builder's basename); no NUL. Absent in jobs from hosts
    /// that predate it, which means `command_args[0]`.
    #[serde(default)]
    pub argv0: Option<String>,
    /// The builder's whole environment, as raw bytes (`KEY`, `VALUE`).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory, relative to `/` (e.g. `build`).
    pub working_dir: String,
    /// Writable directories, relative to `/` (e.g. `build`, `nix/store`).
    pub scratch_paths: Vec<String>,
    /// Where inputs appear, relative to `/` (e.g. `nix/store`).
    pub inputs_dir: String,
    /// Files to create before the build (path relative to `/`, contents).
    pub additional_files: Vec<(String, Vec<u8>)>,
    /// Provide a static shell at `/bin/sh`.
    pub provide_bin_sh: bool,
    /// Provide `/dev/kvm`, usable by the build user (mode 0666). The agent
    /// loads `irqbypass`, `kvm` and `kvm_amd` or `kvm_intel` (by the CPU's
    /// `svm`/`vmx` flag) itself; the VM must expose the extensions.
    pub kvm: bool,
    /// Extra read-only shares: (virtiofs tag, absolute guest path). Each is
    /// a directory, mounted read-only at that path inside the sandbox.
    pub ro_paths: Vec<(String, String)>,
    /// Kernel modules to load, in order, by file stem inside [`MODULES_DIR`].
    /// The agent loads each module's own dependencies (its `depends=`
    /// modinfo) first, so the order only needs to be sensible; a module
    /// already loaded or built in is fine, and on a kernel without module
    /// support (no `/proc/modules`) missing files are skipped.
    pub modules: Vec<String>,
    /// Number of CPUs (informational).
    pub cores: u32,
    /// The network of a build that asked for one: the VM then has one
    /// virtio-net device (`virtio_net` is among [`Job::modules`]), which the
    /// agent configures before the builder starts. `None` (and in jobs from
    /// hosts that predate it): no network but `lo`.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
}

/// What a warm VM does before its job arrives: load these modules (by file
/// stem inside [`MODULES_DIR`], as [`Job::modules`]) and open the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Warm {
    /// Kernel modules to load at boot.
    pub modules: Vec<String>,
}

/// The message that carries a warm VM's job: length prefix and JSON.
pub fn encode_job_message(job: &Job) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(job)?;
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// A networked build's view of its network, as Nix gives a fixed-output
/// derivation: one interface, a resolver, `/etc/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestNetwork {
    /// The guest's IPv4 address on `eth0`.
    pub address: String,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: String,
    /// The resolver written to `/etc/resolv.conf`.
    pub dns: String,
    /// `/etc/services` for the build (the host's, which Nix bind-mounts into
    /// a fixed-output derivation's sandbox); empty: no such file.
    pub services: String,
}

/// Kinds of frames on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Bytes the builder wrote to stdout.
    Stdout = 1,
    /// Bytes the builder wrote to stderr.
    Stderr = 2,
    /// The final [`Report`], JSON.
    Report = 3,
    /// A diagnostic line from the agent itself (UTF-8).
    AgentLog = 4,
    /// The builder process has been started (empty payload).
    BuilderStarted = 5,
    /// A warm VM has booted and waits for its job (empty payload).
    Ready = 6,
}

impl FrameKind {
    /// Parses a frame kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Stdout,
            2 => Self::Stderr,
            3 => Self::Report,
            4 => Self::AgentLog,
            5 => Self::BuilderStarted,
            6 => Self::Ready,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// How the build ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The builder exited with this status.
    Exited {
        /// Exit status (0 = success).
        code: i32,
    },
    /// The builder was killed by this signal.
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// The agent itself failed before or while running the builder.
    AgentFailed {
        /// The step that failed (`mount`, `module`, `job`, `exec`, ...).
        step: String,
        /// What went wrong.
        message: String,
    },
}

/// The agent's final report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Guest uptime in ms when the agent started (kernel boot time).
    pub boot_ms: u64,
    /// ms from agent start to the builder's exec (sandbox set-up).
    pub setup_ms: u64,
    /// ms the builder ran.
    pub build_ms: u64,
    /// A warm VM: ms it waited between [`FrameKind::Ready`] and its job
    /// (then `setup_ms` counts from the job's arrival). `None`: a cold VM,
    /// or an agent that predates warm VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

/// Encodes one frame (header and payload) into `out`.
///
/// Panics never; payloads over [`MAX_FRAME`] must be split by the caller
/// (see [`encode_chunks`]).
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes `data` as as many frames of `kind` as needed to respect [`MAX_FRAME`].
pub fn encode_chunks(kind: FrameKind, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_FRAME) {
        encode_frame(kind, chunk, out);
    }
}

/// Errors found while decoding the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream did not start with [`MAGIC`].
    BadMagic,
    /// An unknown frame kind byte.
    UnknownKind(u8),
    /// A frame longer than [`MAX_FRAME`].
    TooLong(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "guest channel does not start with kiln's magic"),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            Self::TooLong(n) => write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Incremental decoder for the channel: feed it bytes as they arrive.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    magic_seen: bool,
}

impl Decoder {
    /// A decoder expecting [`MAGIC`] first.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes from the channel.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if !self.magic_seen {
            let n = self.buf.len().min(MAGIC.len());
            if self.buf[..n] != MAGIC[..n] {
                return Err(DecodeError::BadMagic);
            }
            if n < MAGIC.len() {
                return Ok(None);
            }
            self.buf.drain(..MAGIC.len());
            self.magic_seen = true;
        }
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(self.buf[0]).ok_or(DecodeError::UnknownKind(self.buf[0]))?;
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len as usize > MAX_FRAME {
            return Err(DecodeError::TooLong(len));
        }
        let end = 5 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[5..end].to_vec();
        self.buf.drain(..end);
        Ok(Some(Frame { kind, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frames: &[(FrameKind, &[u8])]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (k, p) in frames {
            encode_frame(*k, p, &mut out);
        }
        out
    }

    #[test]
    fn decodes_frames_fed_one_byte_at_a_time() {
        let bytes = stream(&[
            (FrameKind::Stdout, b"hello"),
            (FrameKind::Stderr, b""),
            (FrameKind::Report, b"{}"),
        ]);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in bytes {
            d.push(&[b]);
            while let Some(f) = d.next_frame().expect("valid stream") {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Frame {
                kind: FrameKind::Stdout,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(got[1].kind, FrameKind::Stderr);
        assert!(got[1].payload.is_empty());
        assert_eq!(got[2].payload, b"{}");
    }

    #[test]
    fn rejects_a_stream_without_magic() {
        let mut d = Decoder::new();
        d.push(b"[    0.000] Linux version");
        assert_eq!(d.next_frame(), Err(DecodeError::BadMagic));
    }

    #[test]
    fn rejects_unknown_kinds_and_oversized_frames() {
        let mut d = Decoder::new();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[9, 0, 0, 0, 0]);
        d.push(&bytes);
        assert_eq!(d.next_frame(), Err(DecodeError::UnknownKind(9)));

        let mut d = Decoder::new();
        let mut bytes = MAGIC.to_vec();
        bytes.push(1);
        bytes.extend_from_slice(&((MAX_FRAME as u32) + 1).to_le_bytes());
        d.push(&bytes);
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::TooLong(MAX_FRAME as u32 + 1))
        );
    }

    #[test]
    fn large_writes_are_split_into_bounded_frames() {
        let data = vec![7u8; MAX_FRAME * 2 + 3];
        let mut out = MAGIC.to_vec();
        encode_chunks(FrameKind::Stdout, &data, &mut out);
        let mut d = Decoder::new();
        d.push(&out);
        let mut total = 0;
        let mut n = 0;
        while let Some(f) = d.next_frame().expect("valid") {
            assert!(f.payload.len() <= MAX_FRAME);
            total += f.payload.len();
            n += 1;
        }
        assert_eq!((n, total), (3, data.len()));
    }

    #[test]
    fn a_job_without_argv0_runs_with_command_args_0() {
        let json = br#"{"command_args":["/bin/sh"],"env":[],"working_dir":"build",
            "scratch_paths":["build"],"inputs_dir":"nix/store","additional_files":[],
            "provide_bin_sh":false,"kvm":false,"ro_paths":[],"modules":[],"cores":1}"#;
        let job: Job = serde_json::from_slice(json).expect("a job of an older host decodes");
        assert_eq!(job.argv0, None);
        assert_eq!(job.command_args, ["/bin/sh"]);
    }

    #[test]
    fn job_and_report_round_trip_through_json_with_non_utf8_bytes() {
        let job = Job {
            command_args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec![(b"K".to_vec(), vec![0xff, 0xfe, b'x'])],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            ..Job::default()
        };
        let back: Job =
            serde_json::from_slice(&serde_json::to_vec(&job).expect("encode")).expect("decode");
        assert_eq!(back, job);
        let with_argv0 = Job {
            argv0: Some("sh".into()),
            ..job.clone()
        };
        let json = serde_json::to_vec(&with_argv0).expect("encode");
        let back: Job = serde_json::from_slice(&json).expect("decode");
        assert_eq!(back.argv0.as_deref(), Some("sh"));
        let report = Report {
            outcome: Outcome::Signaled { signal: 9 },
            boot_ms: 1,
            setup_ms: 2,
            build_ms: 3,
            waited_ms: None,
        };
        let json = serde_json::to_string(&report).expect("encode");
        assert!(json.contains("\"kind\":\"signaled\""), "{json}");
        assert_eq!(
            serde_json::from_str::<Report>(&json).expect("decode"),
            report
        );
    }
}
