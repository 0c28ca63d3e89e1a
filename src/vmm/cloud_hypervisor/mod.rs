//! The cloud-hypervisor backend: one `cloud-hypervisor` process per build,
//! driven through its REST API on a unix socket.
//!
//! Lifecycle of one VM, as [`CloudHypervisorRunner::start`] and [`ChVm`] run it:
//! 1. spawn `cloud-hypervisor --api-socket path=<run_dir>/ch.sock
//!    --event-monitor path=<run_dir>/ch-events.fifo -v` with no VM
//!    configured, stdout piped (the guest channel, see [`config`]) and stderr
//!    appended to `<run_dir>/cloud-hypervisor.log` (`-v`: info level, so the
//!    log says what the VMM did when a boot fails); a supervisor task takes
//!    the process (see `vm.rs`);
//! 2. wait until the API answers `vmm.ping` (or the process dies);
//! 3. `vm.create` with the body built by [`config::vm_config`], then `vm.boot`.
//!    Each wait of 2–3 ends by the build's own deadline ([`VmSpec::deadline`]),
//!    not by a fixed limit: on a slow host `vm.boot` alone can take longer
//!    than any limit that is short enough to matter on a fast one;
//! 4. the guest runs; when it powers off, cloud-hypervisor exits by itself and
//!    [`RunningVm::wait`] returns. Should the guest reboot instead (a kernel
//!    panic: cloud-hypervisor has no "exit on reboot" option), the supervisor
//!    kills the VMM so the job cannot run twice, and the exit says so
//!    ([`VmExit::GuestRebooted`](crate::vmm::VmExit), with the panic line);
//! 5. on timeout or cancellation [`RunningVm::kill`] asks for `vmm.shutdown`,
//!    gives it a short grace period, then sends SIGKILL and reaps the process.
//!
//! Any failure during 1–3 kills and reaps the process before returning, and
//! dropping a [`ChVm`] SIGKILLs it, so no VMM outlives its build. When the
//! failure is an API call left unanswered (the deadline passed during
//! `vmm.ping`, `vm.create` or `vm.boot`), the VMM is SIGKILLed at once: its
//! API handles one request at a time, so a `vmm.shutdown` would queue behind
//! the unanswered one and never be answered either.
//!
//! Guests on cloud-hypervisor find their devices over virtio-pci, so they
//! load [`Transport::Pci`]'s modules rather than QEMU microvm's virtio-mmio
//! set.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cloud_hypervisor_client::apis::{DefaultApi, Error as ApiError};
use cloud_hypervisor_client::models::VmConfig;
use cloud_hypervisor_client::{socket_based_api_client, SocketBasedApiClient};
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::info;

use super::{RunningVm, Transport, VmRunner, VmSpec, VmmError};
use vm::{supervise, Stop, Supervision};

pub mod config;
pub mod events;
mod vm;

pub use config::{vm_config, ConfigError};
pub use vm::ChVm;

/// Name of the API socket inside the build's run directory.
pub const API_SOCKET: &str = "ch.sock";
/// Name of the VMM's own log (its stderr) inside the build's run directory.
pub const VMM_LOG: &str = "cloud-hypervisor.log";
/// Name of the event monitor FIFO inside the build's run directory.
pub const EVENTS_FIFO: &str = "ch-events.fifo";

/// How much of the VMM's log an error message quotes.
const LOG_TAIL_BYTES: u64 = 2048;
/// How often the API socket is probed while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Starts one `cloud-hypervisor` process per build.
#[derive(Debug, Clone)]
pub struct CloudHypervisorRunner {
    /// The `cloud-hypervisor` executable (a path, or a name looked up in PATH).
    pub binary: PathBuf,
    /// How long [`RunningVm::kill`] waits after `vmm.shutdown` before SIGKILL.
    pub shutdown_grace: Duration,
}

impl CloudHypervisorRunner {
    /// A runner for `binary`, with a 500 ms shutdown grace. Its waits while
    /// starting a VM end by each [`VmSpec::deadline`].
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            shutdown_grace: Duration::from_millis(500),
        }
    }
}

#[async_trait::async_trait]
impl VmRunner for CloudHypervisorRunner {
    fn two_way_channel(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn accel(&self) -> &'static str {
        "kvm"
    }

    fn transport(&self) -> Transport {
        Transport::Pci
    }

    fn vhost_user_net(&self) -> bool {
        true
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        let body = vm_config(spec).map_err(|e| VmmError::Unsupported(e.to_string()))?;
        let (mut vm, api) = self.spawn(spec)?;
        info!(build = %spec.id, pid = ?vm.pid, "cloud-hypervisor started");
        let deadline = Instant::from_std(spec.deadline);
        match self.create_and_boot(&vm, &api, body, deadline).await {
            Ok(()) => {
                info!(build = %spec.id, "cloud-hypervisor booted the VM");
                Ok(Box::new(vm))
            }
            Err(failed) => {
                let how = if failed.api_answers {
                    Stop::Polite
                } else {
                    Stop::Now
                };
                vm.stop(how).await;
                Err(failed.error)
            }
        }
    }
}

/// Why starting a VM failed, and whether the VMM's API still answers (if
/// not, a `vmm.shutdown` would never be answered either).
struct StartFailed {
    error: VmmError,
    api_answers: bool,
}

impl CloudHypervisorRunner {
    /// Step 1: the bare VMM process, listening on its API socket, handed to
    /// its supervisor.
    fn spawn(&self, spec: &VmSpec) -> Result<(ChVm, Api), VmmError> {
        let program = self.binary.display().to_string();
        let spawn_err = |source| VmmError::Spawn {
            program: program.clone(),
            source,
        };
        let socket = spec.run_dir.join(API_SOCKET);
        let fifo = spec.run_dir.join(EVENTS_FIFO);
        // Leftovers of an earlier VMM in a reused directory would make the
        // readiness probe talk to nobody, and mkfifo fail.
        for stale in [&socket, &fifo] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(spawn_err(e)),
                _ => {}
            }
        }
        let events = open_event_fifo(&fifo).map_err(spawn_err)?;
        let log_path = spec.run_dir.join(VMM_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(spawn_err)?;

        let mut command = Command::new(&self.binary);
        command
            .args(vmm_args(&socket, &fifo))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = crate::vmm::child::spawn(command).map_err(spawn_err)?;
        let channel = child.stdout.take();
        let pid = child.id();
        let client = Arc::new(socket_based_api_client(&socket));
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let (exit_tx, exit_rx) = watch::channel(None);
        let how = Supervision {
            client: client.clone(),
            grace: self.shutdown_grace,
            events: Some(events),
            log: log_path.clone(),
            serial_log: spec.serial_log.clone(),
        };
        tokio::spawn(supervise(child, how, stop_rx, exit_tx));
        let vm = ChVm {
            pid,
            channel,
            stop: stop_tx,
            exit: exit_rx,
        };
        let api = Api {
            client,
            socket,
            log: log_path,
            started: Instant::now(),
        };
        Ok((vm, api))
    }

    /// Steps 2 and 3: wait for the API, then `vm.create` and `vm.boot`, all
    /// by `deadline`.
    async fn create_and_boot(
        &self,
        vm: &ChVm,
        api: &Api,
        body: VmConfig,
        deadline: Instant,
    ) -> Result<(), StartFailed> {
        self.wait_for_api(vm, api, deadline).await?;
        let created = tokio::time::timeout_at(deadline, api.client.create_vm(body)).await;
        api.check_call("vm.create", created)?;
        let booted = tokio::time::timeout_at(deadline, api.client.boot_vm()).await;
        api.check_call("vm.boot", booted)?;
        Ok(())
    }

    /// Polls `vmm.ping` until it answers, the process exits, or the deadline.
    async fn wait_for_api(
        &self,
        vm: &ChVm,
        api: &Api,
        deadline: Instant,
    ) -> Result<(), StartFailed> {
        loop {
            if let Some(exit) = vm.exited() {
                let how = match exit {
                    Ok(exit) => exit.to_string(),
                    Err(e) => e,
                };
                return Err(StartFailed {
                    error: VmmError::Api {
                        call: "vmm.ping",
                        detail: format!(
                            "{} exited ({how}) before its API socket answered{}",
                            self.binary.display(),
                            log_tail(&api.log)
                        ),
                    },
                    api_answers: false,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StartFailed {
                    error: VmmError::Api {
                        call: "vmm.ping",
                        detail: format!(
                            "API socket {} did not answer by the build's deadline, {:?} after start \
                             (is {} really cloud-hypervisor?){}",
                            api.socket.display(),
                            api.started.elapsed(),
                            self.binary.display(),
                            log_tail(&api.log)
                        ),
                    },
                    api_answers: false,
                });
            }
            if api.socket.exists() {
                let probe = (deadline - now).min(Duration::from_millis(500));
                if let Ok(Ok(_)) = tokio::time::timeout(probe, api.client.vmm_ping_get()).await {
                    return Ok(());
                }
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }
}

/// The arguments (after the binary) of one VMM: no VM yet, the API socket,
/// the event monitor, and `-v` for an info-level log.
pub fn vmm_args(api_socket: &Path, event_fifo: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--api-socket".into(),
        path_arg(api_socket),
        "--event-monitor".into(),
        path_arg(event_fifo),
        "-v".into(),
    ]
}

/// The API side of one VMM, needed only while starting it.
struct Api {
    client: Arc<SocketBasedApiClient>,
    socket: PathBuf,
    log: PathBuf,
    /// When the process was spawned, for messages.
    started: Instant,
}

impl Api {
    /// Turns the outcome of one API call bounded by the build's deadline
    /// into this module's error, quoting the VMM's log so the reason
    /// cloud-hypervisor gave is visible.
    fn check_call<T>(
        &self,
        call: &'static str,
        outcome: Result<Result<T, ApiError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StartFailed> {
        let (detail, api_answers) = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(ApiError::Api(api))) => {
                (format!("HTTP {}: {}", api.code, api.body.trim()), true)
            }
            Ok(Err(other)) => (other.to_string(), true),
            Err(_) => (
                format!(
                    "no answer by the build's deadline, {:?} after start",
                    self.started.elapsed()
                ),
                false,
            ),
        };
        Err(StartFailed {
            error: VmmError::Api {
                call,
                detail: format!("{detail}{}", log_tail(&self.log)),
            },
            api_answers,
        })
    }
}

/// `path=<path>`, cloud-hypervisor's syntax for socket and file options.
fn path_arg(path: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from("path=");
    arg.push(path);
    arg
}

/// Creates the event monitor FIFO and opens our end. Read-write, so that
/// opening never blocks and reads never see EOF before cloud-hypervisor has
/// opened its end; the supervisor stops reading when the process exits.
fn open_event_fifo(path: &Path) -> std::io::Result<pipe::Receiver> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)?;
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
}

/// The last few lines the VMM wrote to its log, formatted to append to an
/// error message; empty when the log is empty or unreadable.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!("; {} says: {text}", path.display())
    }
}
