//! A running cloud-hypervisor VM: the handle the executor holds ([`ChVm`])
//! and the task that owns the process ([`supervise`]).
//!
//! One task owns the `Child` so that exactly one place reaps it. It waits for
//! whichever comes first:
//! - the VMM exits by itself (the guest powered off, or the VMM failed);
//! - the handle asks for a polite stop: `vmm.shutdown`, a grace period,
//!   SIGKILL;
//! - the handle asks to stop at once (its API did not answer, so
//!   `vmm.shutdown` would queue behind the unanswered call), or is dropped:
//!   SIGKILL;
//! - the event monitor reports a guest reboot: SIGKILL (see [`super::events`]),
//!   and the exit is [`VmExit::GuestRebooted`] with the guest kernel's panic
//!   line from the serial console, if any;
//!
//! and then publishes how the process ended.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
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

/// How the handle asks the supervisor to stop the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// `vmm.shutdown`, then SIGKILL after the grace period.
    Polite,
    /// SIGKILL at once.
    Now,
}

/// A running cloud-hypervisor VM. Dropping it SIGKILLs the VMM.
pub struct ChVm {
    pub(super) pid: Option<u32>,
    pub(super) channel: Option<ChildStdout>,
    /// A message = stop that way; dropped (closed) = SIGKILL at once.
    pub(super) stop: mpsc::Sender<Stop>,
    pub(super) exit: watch::Receiver<ExitState>,
}

impl ChVm {
    /// How the VMM ended, if it has.
    pub(super) fn exited(&self) -> Option<Result<VmExit, String>> {
        self.exit.borrow().clone()
    }

    /// Stops the VMM `how` and waits until it has been reaped.
    pub(super) async fn stop(&mut self, how: Stop) {
        // Fails only when the supervisor already finished: nothing to stop.
        let _ = self.stop.try_send(how);
        if let Err(e) = self.wait().await {
            warn!(pid = ?self.pid, error = %e, "waiting for the stopped VMM failed");
        }
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
        self.stop(Stop::Polite).await;
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
    /// The VMM's own log, where kiln notes why it killed the VMM.
    pub(super) log: PathBuf,
    /// The guest's serial console, where a panicking kernel says why.
    pub(super) serial_log: PathBuf,
}

/// Owns `child` until it has exited and been reaped; see the module docs.
pub(super) async fn supervise(
    mut child: Child,
    how: Supervision,
    mut stop: mpsc::Receiver<Stop>,
    exit: watch::Sender<ExitState>,
) {
    let pid = child.id();
    let mut events = how.events;
    let mut parser = EventParser::default();
    let mut buf = vec![0u8; 4096];
    let mut rebooted = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            request = stop.recv() => {
                break match request {
                    Some(Stop::Polite) => shutdown(&mut child, &how.client, how.grace).await,
                    Some(Stop::Now) | None => sigkill(&mut child).await,
                };
            }
            read = read_events(&mut events, &mut buf) => {
                match read {
                    Some(n) if parser.push(&buf[..n]).iter().any(|e| e.is_reboot()) => {
                        warn!(pid = ?pid, "the guest rebooted (kernel panic?); killing the VMM so the job does not run twice");
                        rebooted = true;
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
        // Read once the VMM is gone, so the console holds all it will.
        Ok(_) if rebooted => {
            let panic = panic_line(&how.serial_log);
            let reboot = VmExit::GuestRebooted { panic };
            note_in_log(&how.log, &format!("kiln: {reboot}"));
            info!(pid = ?pid, exit = %reboot, "cloud-hypervisor killed");
            Ok(reboot)
        }
        Ok(status) => {
            let status = exit_of(status);
            info!(pid = ?pid, status = %status, "cloud-hypervisor exited");
            Ok(status)
        }
        Err(e) => Err(format!("waiting for cloud-hypervisor: {e}")),
    };
    // Nobody listening is fine: the handle was dropped.
    let _ = exit.send(Some(state));
}

/// How much of the end of the serial console [`panic_line`] reads.
const SERIAL_TAIL_BYTES: u64 = 64 * 1024;
/// How much of a panic line an error message quotes.
const MAX_PANIC_LINE: usize = 300;

/// The last `Kernel panic - not syncing: ...` line near the end of the
/// serial console at `path`, from `Kernel` on; `None` if there is none.
fn panic_line(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(SERIAL_TAIL_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    last_panic_line(&String::from_utf8_lossy(&bytes))
}

fn last_panic_line(console: &str) -> Option<String> {
    const MARK: &str = "Kernel panic - not syncing";
    // Not the `---[ end Kernel panic ... ]---` trailer, which repeats it.
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains(MARK) && !l.contains("end Kernel panic"))?;
    let from = line.find(MARK).unwrap_or(0);
    let line = line[from..].trim_end();
    Some(match line.char_indices().nth(MAX_PANIC_LINE) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_owned(),
    })
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
fn note_in_log(log: &Path, line: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_panic_line_is_quoted_from_kernel_on() {
        let console = "[    0.1] Linux version 6.1\r\n\
                       [    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n\
                       [    2.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n\
                       [    2.5] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n\
                       [    2.6] reboot: Restarting system\r\n";
        assert_eq!(
            last_panic_line(console).as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert_eq!(last_panic_line("[ 0.1] all is well\n"), None);
        let long = format!("Kernel panic - not syncing: {}", "x".repeat(1000));
        let quoted = last_panic_line(&long).unwrap_or_default();
        assert_eq!(quoted.chars().count(), MAX_PANIC_LINE + 3);
    }
}
