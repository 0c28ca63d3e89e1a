//! Starting the processes one VM needs (VMM, virtiofsd) so that they die
//! with kiln.
//!
//! Every child gets `PR_SET_PDEATHSIG = SIGKILL`: if kiln dies without
//! running its guards (SIGKILL, a crash, the OOM killer), the kernel kills
//! its VMMs and daemons instead of leaving them running with their shares.
//!
//! The kernel sends that signal when the *thread* that forked the child
//! exits, not the process (prctl(2), `PR_SET_PDEATHSIG`). tokio's blocking
//! pool retires idle threads after a few seconds and `block_in_place` turns
//! a worker into such a thread, so a child forked from an arbitrary runtime
//! thread could be killed in the middle of a build. [`spawn`] therefore forks
//! every child from one dedicated thread that lives as long as the process.

use std::io;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::process::{Child, Command};

/// One request to the spawner thread: the command, the runtime the child is
/// registered with (for its reaping), and where the result goes.
struct Job {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's queue, started on first use.
fn spawner() -> io::Result<&'static Mutex<mpsc::Sender<Job>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    let (sender, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("kiln-spawner".into())
        .spawn(move || {
            // Runs until the process exits: the static sender never drops.
            for mut job in jobs {
                let _entered = job.runtime.enter();
                let _ = job.reply.send(job.command.spawn());
            }
        })?;
    // If another caller won the race, its thread serves and this one's
    // thread ends at once (its sender is dropped here).
    Ok(SPAWNER.get_or_init(|| Mutex::new(sender)))
}

/// Starts `command` from the spawner thread with a parent-death signal
/// (SIGKILL). Must be called within a tokio runtime, like
/// [`Command::spawn`].
pub fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl, getppid and _exit, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // kiln died between fork and prctl: the signal will never come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let (reply, result) = mpsc::sync_channel(1);
    let job = Job {
        command,
        runtime,
        reply,
    };
    let queue = spawner()?
        .lock()
        .map_err(|_| io::Error::other("the process spawner's queue is poisoned"))?
        .clone();
    queue
        .send(job)
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the process spawner thread dropped the request"))?
}

/// How a child ended, as a phrase for error messages (`exit code 1`,
/// `signal 9`).
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    /// A child started from a short-lived thread still runs after that
    /// thread has exited (the parent-death signal is tied to the spawner
    /// thread, not the caller's). That it dies with kiln is tested from
    /// outside, in tests/security_server.rs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn children_outlive_the_thread_that_asked_for_them() {
        let handle = tokio::runtime::Handle::current();
        let mut child = std::thread::spawn(move || {
            let _entered = handle.enter();
            let mut cmd = Command::new("sleep");
            cmd.arg("30").kill_on_drop(true);
            spawn(cmd).unwrap()
        })
        .join()
        .unwrap();
        let pid = child.id().unwrap();
        // The asking thread is gone; give the kernel a moment to act on it.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "child {pid} died with the thread that asked for it"
        );
        child.kill().await.unwrap();
    }
}
