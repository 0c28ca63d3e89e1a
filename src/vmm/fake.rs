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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_guest::contract::{self, FrameKind, Outcome, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::vmm::{GuestChannel, RunningVm, Transport, VmExit, VmRunner, VmSpec, VmmError};

/// What the fake guest sees: the host directories behind its shares.
pub struct FakeGuest {
    /// The scratch share (the guest's writable `/`).
    pub scratch: PathBuf,
    /// The inputs share.
    pub inputs: PathBuf,
    /// Which VM this is: the runner's count of VMs started, from 1.
    pub vm: usize,
    /// Booted warm (the job came over the channel), and its job.
    pub warm_job: Option<contract::Job>,
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
    /// Writes `stdout`, reports `outcome`, then never powers off: runs
    /// until it is killed.
    ReportAndStay {
        /// Builder output.
        stdout: Vec<u8>,
        /// The agent's outcome.
        outcome: Outcome,
    },
    /// Writes `stdout`, then runs until it is killed.
    Hang {
        /// Builder output.
        stdout: Vec<u8>,
    },
}

type GuestFn = dyn Fn(&FakeGuest) -> Ending + Send + Sync;

/// A [`VmRunner`] whose guests are a test's function.
///
/// A warm VM (its initramfs carries `kiln_guest::contract::WARM_PATH`)
/// says Ready and waits for its job over the channel, as the agent does;
/// only then does the guest function run.
pub struct FakeRunner {
    guest: Arc<GuestFn>,
    started: AtomicUsize,
    /// Cancelled to kill the warm VMs that are waiting for their job.
    waiting: Mutex<Vec<CancellationToken>>,
}

impl FakeRunner {
    /// A runner whose every VM runs `guest`.
    pub fn new(guest: impl Fn(&FakeGuest) -> Ending + Send + Sync + 'static) -> Self {
        Self {
            guest: Arc::new(guest),
            started: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// VMs started so far (cold and warm).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Kills every warm VM waiting for its job (as if its VMM crashed);
    /// how many.
    pub fn kill_waiting(&self) -> usize {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<_> = waiting.drain(..).filter(|t| !t.is_cancelled()).collect();
        for t in &live {
            t.cancel();
        }
        live.len()
    }
}

/// Whether `initramfs` is a warm VM's (it names the warm file).
fn is_warm(initramfs: &std::path::Path) -> bool {
    let name = contract::WARM_PATH.trim_start_matches('/').as_bytes();
    std::fs::read(initramfs)
        .map(|bytes| bytes.windows(name.len()).any(|w| w == name))
        .unwrap_or(false)
}

/// The job message a warm VM reads from its channel.
async fn read_job(
    channel: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<contract::Job> {
    let mut len = [0u8; 4];
    channel.read_exact(&mut len).await?;
    let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
    channel.read_exact(&mut json).await?;
    serde_json::from_slice(&json).map_err(std::io::Error::other)
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
        let mut guest = FakeGuest {
            scratch: share(spec, contract::SCRATCH_TAG),
            inputs: share(spec, contract::INPUTS_TAG),
            vm: self.started.fetch_add(1, Ordering::SeqCst) + 1,
            warm_job: None,
        };
        let run = self.guest.clone();
        let warm = is_warm(&spec.initramfs);
        let die = CancellationToken::new();
        if warm {
            self.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(die.clone());
        }
        let (host, mut vm_side) = tokio::io::duplex(64 * 1024);
        let (exit_tx, exit_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = contract::MAGIC.to_vec();
            if warm {
                contract::encode_frame(FrameKind::Ready, b"", &mut out);
                let _ = vm_side.write_all(&out).await;
                out.clear();
                let job = tokio::select! {
                    job = read_job(&mut vm_side) => job,
                    _ = die.cancelled() => Err(std::io::Error::other("killed")),
                };
                die.cancel();
                match job {
                    Ok(job) => guest.warm_job = Some(job),
                    Err(_) => {
                        let _ = exit_tx.send(VmExit::Exited {
                            code: None,
                            signal: Some(libc::SIGKILL),
                        });
                        return;
                    }
                }
            }
            let ending = match tokio::task::spawn_blocking(move || run(&guest)).await {
                Ok(ending) => ending,
                Err(_) => Ending::Crash {
                    stdout: b"the fake guest panicked\n".to_vec(),
                },
            };
            contract::encode_frame(FrameKind::BuilderStarted, b"", &mut out);
            let (stdout, report, stay) = match ending {
                Ending::Report { stdout, outcome } => (stdout, Some(outcome), false),
                Ending::ReportAndStay { stdout, outcome } => (stdout, Some(outcome), true),
                Ending::Crash { stdout } => (stdout, None, false),
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
                    waited_ms: None,
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
            if stay {
                return std::future::pending().await;
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
