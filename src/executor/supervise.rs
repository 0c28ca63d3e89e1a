//! Supervising a running VM: reads the agent's frames off the guest channel
//! into the build log, and ends the VM on timeout, cancellation, log
//! overflow or a dead virtiofsd — and as soon as the agent has reported,
//! instead of waiting for the guest to power off. Returns the agent's
//! report, or why there is none.

use std::time::Duration;

use kiln_guest::contract::{Decoder, FrameKind, Report, ACK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::error::BuildError;
use crate::executor::events::{BuildLog, Phase, Stream};
use crate::vmm::session::Parts;
use crate::vmm::{GuestChannel, VmExit};

/// How long the VM may outlive a dead virtiofsd before it counts as a crash.
const DAEMON_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the channel's last bytes after the VMM exited.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What can end a VM early, besides the guest itself.
pub struct Limits {
    /// Wall-clock limit for the whole VM run.
    pub timeout: Duration,
    /// Builder output allowed before the build is stopped.
    pub max_log_bytes: u64,
    /// How long the builder may write nothing to stdout or stderr; counted
    /// from when it starts, reset by each chunk of output. `None`: no limit.
    pub max_silent: Option<Duration>,
}

/// Restarts the silence timer, when there is a silence limit.
fn rearm(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    max_silent: Option<Duration>,
    armed: &mut bool,
) {
    if let Some(limit) = max_silent {
        timer.reset(tokio::time::Instant::now() + limit);
        *armed = true;
    }
}

enum Msg {
    Frame(FrameKind, Vec<u8>),
    Broken(String),
}

/// Runs the session's VM to its end and returns the agent's report.
pub async fn supervise(
    parts: Parts<'_>,
    channel: GuestChannel,
    log: &BuildLog,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<Report, BuildError> {
    let Parts {
        vm,
        mut daemons,
        console,
    } = parts;
    let daemon_died = daemons.first_exit();
    let (tx, mut rx) = mpsc::channel(64);
    let reader = tokio::spawn(read_frames(channel, tx));
    let deadline = tokio::time::sleep(limits.timeout);
    // Armed when the builder starts (set-up is the agent's, not the
    // builder's, silence), re-armed by every chunk of its output.
    let silence = tokio::time::sleep(Duration::MAX);
    let mut silence_armed = false;
    tokio::pin!(deadline, daemon_died, silence);
    let mut report: Option<Report> = None;
    let mut exited: Option<VmExit> = None;
    let mut channel_open = true;
    // A virtiofsd also exits when the VM it serves goes away: its death only
    // fails the build if the VM does not end on its own shortly after.
    let mut daemon_dead: Option<String> = None;

    let failure = loop {
        let daemon_grace = daemon_dead.is_some();
        let daemon_grace_over = async move {
            if daemon_grace {
                tokio::time::sleep(DAEMON_GRACE).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            msg = rx.recv(), if channel_open => match msg {
                Some(Msg::Frame(kind, payload)) => match kind {
                    FrameKind::Stdout | FrameKind::Stderr => {
                        let stream = if kind == FrameKind::Stdout { Stream::Stdout } else { Stream::Stderr };
                        log.log(stream, &payload);
                        if log.log_bytes() > limits.max_log_bytes {
                            break Some(BuildError::LogLimit { limit: limits.max_log_bytes, log_tail: log.tail() });
                        }
                        rearm(silence.as_mut(), limits.max_silent, &mut silence_armed);
                    }
                    FrameKind::BuilderStarted => {
                        log.phase(Phase::Build);
                        rearm(silence.as_mut(), limits.max_silent, &mut silence_armed);
                    }
                    // Only a warm VM says Ready, before its job; the pool
                    // has read it by now.
                    FrameKind::Ready => {}
                    FrameKind::AgentLog => {
                        tracing::debug!(build = log.id(), line = %String::from_utf8_lossy(&payload), "agent");
                    }
                    // The agent's last frame: everything it streamed came
                    // before it, and everything the build wrote is on the
                    // host already (see the agent's `power_off`), so the VM
                    // has nothing left to give and is killed below rather
                    // than waited for while it powers off.
                    FrameKind::Report => match serde_json::from_slice::<Report>(&payload) {
                        Ok(r) => {
                            report = Some(r);
                            break None;
                        }
                        Err(e) => break Some(BuildError::VmCrashed {
                            reason: format!("the agent's report does not decode: {e}"),
                            log_tail: log.tail(),
                        }),
                    },
                },
                Some(Msg::Broken(reason)) => break Some(BuildError::VmCrashed { reason, log_tail: log.tail() }),
                None => channel_open = false,
            },
            status = vm.wait(), if exited.is_none() => match status {
                Ok(exit) => {
                    exited = Some(exit);
                    break None;
                }
                Err(e) => break Some(BuildError::infra("wait for the VMM", e)),
            },
            _ = &mut deadline => break Some(BuildError::Timeout { secs: limits.timeout.as_secs(), log_tail: log.tail() }),
            _ = &mut silence, if silence_armed => break Some(BuildError::Silent {
                secs: limits.max_silent.map_or(0, |d| d.as_secs()),
                log_tail: log.tail(),
            }),
            _ = cancel.cancelled() => break Some(BuildError::Cancelled),
            why = &mut daemon_died, if daemon_dead.is_none() => daemon_dead = Some(why),
            _ = daemon_grace_over => break Some(BuildError::VmCrashed {
                reason: daemon_dead.take().unwrap_or_default(),
                log_tail: log.tail(),
            }),
        }
    };

    if let Some(err) = failure {
        vm.kill().await;
        reader.abort();
        return Err(err);
    }
    if let Some(report) = report {
        vm.kill().await;
        reader.abort();
        return Ok(report);
    }

    // The VMM exited: take whatever the channel still holds.
    let drain = async {
        while let Some(msg) = rx.recv().await {
            if let Msg::Frame(kind, payload) = msg {
                match kind {
                    FrameKind::Stdout => log.log(Stream::Stdout, &payload),
                    FrameKind::Stderr => log.log(Stream::Stderr, &payload),
                    FrameKind::Report => report = serde_json::from_slice(&payload).ok(),
                    _ => {}
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_GRACE, drain).await;
    reader.abort();
    match report {
        Some(r) => Ok(r),
        None => Err(BuildError::VmCrashed {
            reason: format!(
                "the VMM exited ({}) before the agent reported; last guest console lines:\n{}",
                exited.map_or_else(|| "unknown status".to_owned(), |e| e.to_string()),
                console.tail()
            ),
            log_tail: log.tail(),
        }),
    }
}

async fn read_frames(channel: GuestChannel, tx: mpsc::Sender<Msg>) {
    let GuestChannel {
        reader: mut channel,
        mut ack,
    } = channel;
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match channel.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                let _ = tx
                    .send(Msg::Broken(format!("reading the guest channel: {e}")))
                    .await;
                return;
            }
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    if f.kind == FrameKind::Report {
                        // The agent waits for this before it powers off, so
                        // nothing it wrote is lost in the VMM's buffers.
                        if let Some(w) = ack.as_mut() {
                            let _ = w.write_all(&[ACK]).await;
                            let _ = w.flush().await;
                        }
                    }
                    if tx.send(Msg::Frame(f.kind, f.payload)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx
                        .send(Msg::Broken(format!("guest channel is corrupt: {e}")))
                        .await;
                    return;
                }
            }
        }
    }
}
