//! The agent's steps, in order (see [`run`]).

pub mod boot;
pub mod builder;
pub mod channel;
pub mod error;
pub mod job;
pub mod net;
pub mod sandbox;

use std::time::Instant;

use kiln_guest::contract::{Outcome, Report};
use nix::sys::stat::{umask, Mode};

use error::{sandbox as sandbox_err, AgentError, Step};

/// Times gathered along the way, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Guest uptime when the agent started.
    pub boot_ms: u64,
    /// Agent start to the builder's exec.
    pub setup_ms: u64,
    /// The builder's run time.
    pub build_ms: u64,
}

/// Boots the sandbox and runs the job. Everything that can fail returns an
/// [`AgentError`]; the caller turns it into the report.
pub fn run(start: Instant, timings: &mut Timings) -> Result<Outcome, AgentError> {
    umask(Mode::empty());
    boot::early_mounts()?;
    // The channel needs its modules, which the job names; so the job is
    // decoded first and validated only once a failure can be reported.
    let job = match job::load() {
        Ok(job) => job,
        Err(e) => {
            boot::load_console_fallback();
            let _ = channel::open();
            return Err(e);
        }
    };
    if let Err(e) = boot::load_modules(&job.modules) {
        boot::load_console_fallback();
        let _ = channel::open();
        return Err(e);
    }
    channel::open().step(
        |what, source| AgentError::Supervise { what, source },
        || format!("opening the host channel {}", channel::CHANNEL_DEVICE),
    )?;
    job::validate(&job).map_err(AgentError::Job)?;
    let kvm = if job.kvm {
        Some(boot::enable_kvm()?)
    } else {
        None
    };
    boot::mount_shares()?;
    nix::unistd::sethostname("localhost").step(sandbox_err, || "setting the hostname".into())?;
    net::loopback_up().step(sandbox_err, || "bringing up lo".into())?;
    sandbox::build(&job, kvm)?;
    timings.setup_ms = start.elapsed().as_millis() as u64;
    let finished = builder::run(&job)?;
    timings.build_ms = finished.build_ms;
    Ok(finished.outcome)
}

/// Builds the report for `result`.
pub fn report(result: Result<Outcome, AgentError>, timings: Timings) -> Report {
    let outcome = result.unwrap_or_else(|e| Outcome::AgentFailed {
        step: e.step().into(),
        message: e.chain(),
    });
    Report {
        outcome,
        boot_ms: timings.boot_ms,
        setup_ms: timings.setup_ms,
        build_ms: timings.build_ms,
    }
}

/// Flushes filesystems and powers the VM off. Never returns; if power-off
/// itself fails, exiting PID 1 panics the kernel, which (with `panic=-1` and
/// the VMM's no-reboot) also ends the VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
