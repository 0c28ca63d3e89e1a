//! A running cloud-hypervisor VM: the handle the executor holds ([`ChVm`])
//! and the task that owns the process ([`supervise`]).
//!
//! One task owns the `Child` so that exactly one place reaps it. It waits for
//! whichever comes first:
//! - the VMM exits by itself (the guest powered off, or the VMM failed);
//! - the handle asks for a kill: `vmm.shutdown`, a grace period, SIGKILL;
//! - the handle is dropped: SIGKILL at once;
//! - the event monitor reports a guest reboot: SIGKILL (see [`super::events`]).
//!
//! and then publishes how the process ended.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use cloud_hypervisor_client::apis::DefaultApi;
use cloud_hypervisor_client::SocketBasedApiClient;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::events::EventParser;
use crate::vmm::{GuestChannel, RunningVm, VmExit, VmmError};

/// How the process ended, once it has; `Err` if waiting for it failed.
pub(super) type ExitState = Option<Result<VmExit, String>>;

/// A running cloud-hypervisor VM. Dropping it SIGKILLs the VMM.
pub struct ChVm {
    pub(super) pid: Option<u32>,
    pub(super) channel: Option<ChildStdout>,
    /// Dropped (closed) = kill at once; a message = kill politely.
    pub(super) kill: mpsc::Sender<()>,
    pub(super) exit: watch::Receiver<ExitState>,
}

impl ChVm {
    /// How the VMM ended, if it has.
    pub(super) fn exited(&self) -> Option<Result<VmExit, String>> {
        self.exit.borrow().clone()
    }
}

#[async_trait::async_trait]
impl RunningVm for ChVm {
    async fn take_channel(&mut self) -> Result<GuestChannel, VmmError> {
        match self.channel.take() {
            Some(stdout) => Ok(GuestChannel {
                reader: Box::new(stdout),
                ack: None,
            }),
            None => Err(VmmError::Channel(std::io::Error::other(
                "the guest channel was already taken",
            ))),
        }
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        let state = self
            .exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| VmmError::Wait(std::io::Error::other("the VMM supervisor task ended")))?
            .clone();
        match state {
            Some(Ok(exit)) => Ok(exit),
            Some(Err(e)) => Err(VmmError::Wait(std::io::Error::other(e))),
            None => Err(VmmError::Wait(std::io::Error::other("no exit status"))),
        }
    }

    async fn kill(&mut self) {
        // Fails only when the supervisor already finished: nothing to kill.
        let _ = self.kill.try_send(());
        if let Err(e) = self.wait().await {
            warn!(pid = ?self.pid, error = %e, "waiting for the killed VMM failed");
        }
    }

    fn pid(&self) -> Option<u32> {
        self.pid
    }
}

/// What the supervisor needs besides the process.
pub(super) struct Supervision {
    pub(super) client: Arc<SocketBasedApiClient>,
    pub(super) grace: Duration,
    pub(super) events: Option<pipe::Receiver>,
    pub(super) log: PathBuf,
}

/// Owns `child` until it has exited and been reaped; see the module docs.
pub(super) async fn supervise(
    mut child: Child,
    how: Supervision,
    mut kill: mpsc::Receiver<()>,
    exit: watch::Sender<ExitState>,
) {
    let pid = child.id();
    let mut events = how.events;
    let mut parser = EventParser::default();
    let mut buf = vec![0u8; 4096];
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            request = kill.recv() => {
                break match request {
                    Some(()) => shutdown(&mut child, &how.client, how.grace).await,
                    None => sigkill(&mut child).await,
                };
            }
            read = read_events(&mut events, &mut buf) => {
                match read {
                    Some(n) if parser.push(&buf[..n]).iter().any(|e| e.is_reboot()) => {
                        warn!(pid = ?pid, "the guest rebooted (kernel panic?); killing the VMM so the job does not run twice");
                        note_in_log(&how.log, "kiln: the guest rebooted (kernel panic?); VM killed");
                        break sigkill(&mut child).await;
                    }
                    Some(_) => {}
                    // The monitor is gone; keep supervising without it.
                    None => events = None,
                }
            }
        }
    };
    let state = match status {
        Ok(status) => {
            info!(pid = ?pid, status = %describe_status(status), "cloud-hypervisor exited");
            Ok(exit_of(status))
        }
        Err(e) => Err(format!("waiting for cloud-hypervisor: {e}")),
    };
    // Nobody listening is fine: the handle was dropped.
    let _ = exit.send(Some(state));
}

/// Reads from the event monitor; pends for ever when there is none, so the
/// `select!` arm simply never fires.
async fn read_events(events: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    match events {
        Some(rx) => match rx.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

/// `vmm.shutdown`, then SIGKILL if the process is still there after `grace`.
async fn shutdown(
    child: &mut Child,
    client: &SocketBasedApiClient,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    let polite = tokio::time::timeout(grace, async {
        let _ = client.shutdown_vmm().await;
        child.wait().await
    })
    .await;
    match polite {
        Ok(status) => status,
        Err(_) => {
            warn!(pid = ?child.id(), ?grace, "cloud-hypervisor ignored vmm.shutdown, sending SIGKILL");
            sigkill(child).await
        }
    }
}

async fn sigkill(child: &mut Child) -> std::io::Result<ExitStatus> {
    if let Err(e) = child.start_kill() {
        // Already exited: wait() below reaps it.
        warn!(pid = ?child.id(), error = %e, "SIGKILL failed");
    }
    child.wait().await
}

/// Appends a line to the VMM's log, where error messages quote it from.
fn note_in_log(log: &std::path::Path, line: &str) {
    let appended = std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        warn!(log = %log.display(), error = %e, "could not note in the VMM log");
    }
}

fn exit_of(status: ExitStatus) -> VmExit {
    VmExit::Exited {
        code: status.code(),
        signal: status.signal(),
    }
}

fn describe_status(status: ExitStatus) -> String {
    describe_exit(&exit_of(status))
}

/// `exit code 3`, `killed by signal 9`.
pub(super) fn describe_exit(exit: &VmExit) -> String {
    match exit {
        VmExit::Exited {
            code: Some(code), ..
        } => format!("exit code {code}"),
        VmExit::Exited {
            signal: Some(signal),
            ..
        } => format!("killed by signal {signal}"),
        VmExit::Exited { .. } => "unknown status".to_owned(),
    }
}
