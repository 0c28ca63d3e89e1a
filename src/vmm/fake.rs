//! A stand-in VMM for CPU-only tests of the executor (test builds only).
//!
//! [`FakeRunner`] boots nothing: when the executor "starts a VM", the
//! test's guest function runs on the host against the build's real shares
//! (writing outputs into the scratch share as a builder would), and its
//! builder output and report go back over the real channel framing
//! (`kiln_guest::contract`, magic, frames, the ACK), so materialise,
//! supervise, collect and respond run exactly as with a VM. The real
//! virtiofsd still serves the shares; only the VMM is missing. Never the
//! proof that builds work: that is the VM tests' job.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_guest::contract::{self, FrameKind, Outcome, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::vmm::{GuestChannel, RunningVm, Transport, VmExit, VmRunner, VmSpec, VmmError};

/// What the fake guest sees: the host directories behind its shares.
pub struct FakeGuest {
    /// The scratch share (the guest's writable `/`).
    pub scratch: PathBuf,
    /// The inputs share.
    pub inputs: PathBuf,
}

/// What the fake guest does after its guest function ran.
pub enum Ending {
    /// Writes `stdout` as builder output, reports `outcome`, powers off.
    Report {
        /// Builder output.
        stdout: Vec<u8>,
        /// The agent's outcome.
        outcome: Outcome,
    },
    /// Writes `stdout`, then the VM dies without a report.
    Crash {
        /// Builder output before the crash.
        stdout: Vec<u8>,
    },
    /// Writes `stdout`, then runs until it is killed.
    Hang {
        /// Builder output.
        stdout: Vec<u8>,
    },
}

type GuestFn = dyn Fn(&FakeGuest) -> Ending + Send + Sync;

/// A [`VmRunner`] whose guests are a test's function.
pub struct FakeRunner {
    guest: Arc<GuestFn>,
}

impl FakeRunner {
    /// A runner whose every VM runs `guest`.
    pub fn new(guest: impl Fn(&FakeGuest) -> Ending + Send + Sync + 'static) -> Self {
        Self {
            guest: Arc::new(guest),
        }
    }
}

fn share(spec: &VmSpec, tag: &str) -> PathBuf {
    spec.shares
        .iter()
        .find(|s| s.tag == tag)
        .map(|s| s.source.clone())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl VmRunner for FakeRunner {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn accel(&self) -> &'static str {
        "none"
    }

    fn transport(&self) -> Transport {
        Transport::Mmio
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        let guest = FakeGuest {
            scratch: share(spec, contract::SCRATCH_TAG),
            inputs: share(spec, contract::INPUTS_TAG),
        };
        let run = self.guest.clone();
        let ending = tokio::task::spawn_blocking(move || run(&guest))
            .await
            .map_err(|e| VmmError::Unsupported(format!("the fake guest panicked: {e}")))?;
        let (host, mut vm_side) = tokio::io::duplex(64 * 1024);
        let (exit_tx, exit_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = contract::MAGIC.to_vec();
            contract::encode_frame(FrameKind::BuilderStarted, b"", &mut out);
            let (stdout, report) = match ending {
                Ending::Report { stdout, outcome } => (stdout, Some(outcome)),
                Ending::Crash { stdout } => (stdout, None),
                Ending::Hang { stdout } => {
                    contract::encode_chunks(FrameKind::Stdout, &stdout, &mut out);
                    let _ = vm_side.write_all(&out).await;
                    return std::future::pending().await;
                }
            };
            contract::encode_chunks(FrameKind::Stdout, &stdout, &mut out);
            let crashed = report.is_none();
            if let Some(outcome) = report {
                let report = Report {
                    outcome,
                    boot_ms: 1,
                    setup_ms: 1,
                    build_ms: 1,
                };
                let json = serde_json::to_vec(&report).unwrap_or_default();
                contract::encode_frame(FrameKind::Report, &json, &mut out);
            }
            let _ = vm_side.write_all(&out).await;
            if !crashed {
                // The agent powers off once its report is acknowledged.
                let mut ack = [0u8; 1];
                let _ = vm_side.read_exact(&mut ack).await;
            }
            let exit = if crashed {
                VmExit::Exited {
                    code: None,
                    signal: Some(libc::SIGKILL),
                }
            } else {
                VmExit::Exited {
                    code: Some(0),
                    signal: None,
                }
            };
            let _ = exit_tx.send(exit);
        });
        let (reader, writer) = tokio::io::split(host);
        Ok(Box::new(FakeVm {
            channel: Some(GuestChannel {
                reader: Box::new(reader),
                ack: Some(Box::new(writer)),
            }),
            exit: Some(exit_rx),
            task,
        }))
    }
}

struct FakeVm {
    channel: Option<GuestChannel>,
    exit: Option<oneshot::Receiver<VmExit>>,
    task: tokio::task::JoinHandle<()>,
}

#[async_trait::async_trait]
impl RunningVm for FakeVm {
    async fn take_channel(&mut self) -> Result<GuestChannel, VmmError> {
        self.channel
            .take()
            .ok_or_else(|| VmmError::Unsupported("the channel was taken".into()))
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        // Polled by reference: a wait dropped by a `select!` keeps the
        // receiver for the next one.
        let exit = match self.exit.as_mut() {
            Some(rx) => rx
                .await
                .map_err(|_| VmmError::Wait(std::io::Error::other("the fake VM was killed"))),
            None => return std::future::pending().await,
        };
        self.exit = None;
        exit
    }

    async fn kill(&mut self) {
        self.task.abort();
    }

    fn pid(&self) -> Option<u32> {
        None
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.task.abort();
    }
}
