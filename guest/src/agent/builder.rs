//! Runs the builder inside the sandbox and forwards its output.
//!
//! Given the builder's syscall filter, compiled beforehand
//! ([`syscall_filter`](super::syscall_filter); a warm VM compiles it while
//! it waits for its job), the agent starts the builder's process
//! ([`spawn`](super::spawn): it shares the agent's memory until its exec,
//! so nothing is copied); the child chroots
//! into the sandbox, enters the working dir, starts a new session, drops to
//! the build user with no supplementary groups (so no capabilities remain),
//! points stdin at `/dev/null`, turns off address-space randomisation and
//! core dumps (as Nix does), installs the filter and execs
//! `command_args[0]` with the job's argv ([`job::argv`]: argv[0] may differ
//! from the path, as Nix passes the builder's basename) and exactly the job's
//! environment. A close-on-exec pipe tells the agent
//! whether the exec happened, so a failed exec is the agent's failure and not
//! an exit status. stdout and stderr are two pipes, each forwarded as frames
//! in the order its bytes were written. When the builder exits, whatever it
//! left running as the build user is killed.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_guest::contract::{FrameKind, Job, Outcome, BUILD_GID, BUILD_UID, MAX_FRAME};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::personality::{self, Persona};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{
    chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, execve, pipe2, setsid, Pid,
};

use super::channel;
use super::error::{exec, supervise, AgentError, Step};
use super::job;
use super::sandbox::ROOT;
use super::spawn;
use super::syscall_filter::SyscallFilter;

/// How long to wait for the pipes to close after the build user's processes
/// were killed.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How long to wait for killed processes to finish exiting.
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// What [`run`] observed.
pub struct Finished {
    /// How the builder ended.
    pub outcome: Outcome,
    /// From a successful exec to the builder's exit.
    pub build_ms: u64,
}

/// Stages of the child before exec, reported through the status pipe.
const STAGES: &[&str] = &[
    "chroot",
    "chdir to the working dir",
    "opening /dev/null",
    "redirecting stdio",
    "setsid",
    "disabling address-space randomisation and core dumps",
    "dropping privileges",
    "installing the syscall filter",
    "exec",
];

/// The stage whose failure is the filter's, reported as step `seccomp`.
const FILTER_STAGE: u8 = 7;

/// Runs the builder to completion.
pub fn run(job: &Job, filter: &SyscallFilter) -> Result<Finished, AgentError> {
    let path = CString::new(job.command_args[0].as_bytes())
        .map_err(|_| AgentError::Job("the builder path contains NUL".into()))?;
    let argv = job::argv(job)?;
    let env = job::environment(job)?;
    let workdir = format!("/{}", job.working_dir);
    let (out_r, out_w) =
        pipe2(OFlag::O_CLOEXEC).step(exec, || "creating the stdout pipe".into())?;
    let (err_r, err_w) =
        pipe2(OFlag::O_CLOEXEC).step(exec, || "creating the stderr pipe".into())?;
    let (status_r, status_w) =
        pipe2(OFlag::O_CLOEXEC).step(exec, || "creating the exec status pipe".into())?;

    let prepared = Exec {
        path: &path,
        argv: &argv,
        env: &env,
        workdir: &workdir,
        filter,
    };
    let child = spawn::spawn(|| -> isize { child_exec(&prepared, &out_w, &err_w, &status_w) })
        .step(exec, || "starting the builder process".into())?;
    drop((out_w, err_w, status_w));
    if let Some((stage, msg)) = exec_failure(status_r) {
        let _ = waitpid(child, None);
        let what = format!("starting {}", job.command_args[0]);
        let source = std::io::Error::other(msg);
        return Err(if stage == FILTER_STAGE {
            AgentError::Seccomp { what, source }
        } else {
            AgentError::Exec { what, source }
        });
    }
    let started = Instant::now();
    let _ = channel::send(FrameKind::BuilderStarted, b"");
    let status = supervise_child(child, File::from(out_r), File::from(err_r))?;
    let build_ms = started.elapsed().as_millis() as u64;
    let outcome = match status {
        WaitStatus::Exited(_, code) => Outcome::Exited { code },
        WaitStatus::Signaled(_, sig, _) => Outcome::Signaled { signal: sig as i32 },
        other => {
            return Err(AgentError::Supervise {
                what: "waiting for the builder".into(),
                source: std::io::Error::other(format!("unexpected status {other:?}")),
            })
        }
    };
    Ok(Finished { outcome, build_ms })
}

/// What the builder's process execs, prepared before it starts.
struct Exec<'a> {
    /// The builder's path (`command_args[0]`).
    path: &'a CString,
    /// Its argv, argv[0] included.
    argv: &'a [CString],
    /// Its whole environment.
    env: &'a [CString],
    /// Absolute working dir inside the sandbox.
    workdir: &'a str,
    /// Installed just before exec.
    filter: &'a SyscallFilter,
}

/// In the builder's process ([`spawn`], which shares the agent's memory
/// until the exec): enter the sandbox, become the build user, install the
/// syscall filter, exec. On failure, reports `[stage, errno]` on the status
/// pipe and exits.
fn child_exec(exec: &Exec<'_>, out: &OwnedFd, err: &OwnedFd, status: &OwnedFd) -> ! {
    let mut stage = 0u8;
    let result = (|| -> Result<std::convert::Infallible, Errno> {
        chroot(ROOT)?;
        stage = 1;
        chdir(exec.workdir)?;
        stage = 2;
        let null = nix::fcntl::open("/dev/null", OFlag::O_RDONLY, nix::sys::stat::Mode::empty())?;
        stage = 3;
        dup2_stdin(&null)?;
        dup2_stdout(out)?;
        dup2_stderr(err)?;
        stage = 4;
        setsid()?;
        stage = 5;
        // As Nix: no address-space randomisation, for deterministic
        // builds, and no core dumps (soft limit 0, hard unlimited).
        let persona = personality::get()?;
        personality::set(persona | Persona::ADDR_NO_RANDOMIZE)?;
        setrlimit(Resource::RLIMIT_CORE, 0, libc::RLIM_INFINITY)?;
        stage = 6;
        spawn::become_user(BUILD_UID, BUILD_GID)?;
        // Rust ignores SIGPIPE in its runtime and ignored signals survive
        // exec: give the builder the default, as any shell would expect.
        // SAFETY: installing SIG_DFL runs no handler code.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }?;
        stage = FILTER_STAGE;
        exec.filter.install()?;
        stage = 8;
        execve(exec.path, exec.argv, exec.env)
    })();
    let errno = match result {
        Err(e) => e as i32,
        Ok(never) => match never {},
    };
    // On the stack: the child allocates nothing in the memory it shares.
    let mut msg = [stage, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&errno.to_le_bytes());
    let _ = nix::unistd::write(status, &msg);
    // SAFETY: _exit ends the child without running the agent's atexit
    // handlers or flushing its stdio buffers, which it shares.
    unsafe { libc::_exit(127) }
}

/// Reads the status pipe: EOF means the exec happened; otherwise the stage
/// that failed and a message naming it and the error.
fn exec_failure(status: OwnedFd) -> Option<(u8, String)> {
    let mut buf = Vec::new();
    let _ = File::from(status).read_to_end(&mut buf);
    if buf.len() < 5 {
        return None;
    }
    let stage = STAGES.get(buf[0] as usize).copied().unwrap_or("?");
    let errno = Errno::from_raw(i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]));
    Some((buf[0], format!("{stage}: {}", errno.desc())))
}

/// Forwards both pipes until the builder exits, then kills the build user's
/// leftovers and drains what is still buffered.
fn supervise_child(child: Pid, mut out: File, mut err: File) -> Result<WaitStatus, AgentError> {
    let pidfd = pidfd_open(child).step(supervise, || "pidfd_open on the builder".into())?;
    let mut open = [true, true];
    let mut status = None;
    let mut deadline: Option<Instant> = None;
    let mut buf = vec![0u8; MAX_FRAME];
    while open[0] || open[1] || status.is_none() {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    channel::log(
                        "the builder's output pipes stayed open after its processes were killed",
                    );
                    break;
                }
                PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                    .unwrap_or(PollTimeout::ZERO)
            }
        };
        let mut fds = [
            PollFd::new(
                out.as_fd(),
                if open[0] {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
            PollFd::new(
                err.as_fd(),
                if open[1] {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
            PollFd::new(
                pidfd.as_fd(),
                if status.is_none() {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(supervise("polling the builder's pipes".into(), e.into())),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        for (i, (pipe, kind)) in [(&mut out, FrameKind::Stdout), (&mut err, FrameKind::Stderr)]
            .into_iter()
            .enumerate()
        {
            if open[i] && ready[i] {
                match pipe.read(&mut buf) {
                    Ok(0) => open[i] = false,
                    Ok(n) => channel::send(kind, &buf[..n])
                        .step(supervise, || "writing to the host channel".into())?,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(supervise("reading the builder's output".into(), e)),
                }
            }
        }
        if status.is_none() && ready[2] {
            status =
                Some(waitpid(child, None).step(supervise, || "waiting for the builder".into())?);
            kill_build_user()?;
            deadline = Some(Instant::now() + DRAIN_LIMIT);
        }
    }
    reap_all();
    status.ok_or_else(|| {
        supervise(
            "waiting for the builder".into(),
            std::io::Error::other("no exit status"),
        )
    })
}

/// Kills every process of the build user, from a helper that becomes the
/// build user itself: `kill(-1)` then reaches exactly that user's processes.
fn kill_build_user() -> Result<(), AgentError> {
    let child = spawn::spawn(|| -> isize {
        let ok = spawn::become_user(BUILD_UID, BUILD_GID).is_ok();
        if ok {
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        }
        // SAFETY: see child_exec.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) }
    })
    .step(supervise, || "starting the cleanup helper".into())?;
    let status =
        waitpid(child, None).step(supervise, || "waiting for the cleanup helper".into())?;
    if status != WaitStatus::Exited(child, 0) {
        return Err(supervise(
            "killing the build user's processes".into(),
            std::io::Error::other(format!("helper ended with {status:?}")),
        ));
    }
    Ok(())
}

/// Waits until every process but the agent is gone (or [`REAP_LIMIT`]
/// passes). As PID 1 the agent inherits every orphan, so "no children left"
/// means the build user's killed processes have finished exiting, including
/// writing back their shared mappings on the scratch share.
pub fn reap_all() {
    let deadline = Instant::now() + REAP_LIMIT;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Ok(WaitStatus::StillAlive) => {
                channel::log(
                    "processes of the build were still exiting when the agent gave up waiting",
                );
                return;
            }
            Ok(_) => {}
            // ECHILD: nothing left.
            Err(_) => return,
        }
    }
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
