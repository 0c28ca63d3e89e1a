//! The agent's steps, in order (see [`run`]).

pub mod beneath;
pub mod boot;
pub mod builder;
pub mod channel;
pub mod error;
pub mod job;
pub mod net;
pub mod sandbox;
pub mod spawn;
pub mod syscall_filter;

use std::time::Instant;

use kiln_guest::contract::{Outcome, Report};
use nix::sys::stat::{umask, Mode};

use error::{sandbox as sandbox_err, AgentError, Step};
use syscall_filter::SyscallFilter;

/// Times gathered along the way, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Guest uptime when the agent started.
    pub boot_ms: u64,
    /// Agent start to the builder's exec.
    pub setup_ms: u64,
    /// The builder's run time.
    pub build_ms: u64,
    /// A warm VM's wait for its job.
    pub waited_ms: Option<u64>,
}

/// Boots the sandbox and runs the job. Everything that can fail returns an
/// [`AgentError`]; the caller turns it into the report.
pub fn run(start: Instant, timings: &mut Timings) -> Result<Outcome, AgentError> {
    // Nix's umask, inherited by the builder (its files are 0644). The
    // agent's own files get explicit modes whatever the umask.
    umask(Mode::from_bits_truncate(0o022));
    boot::early_mounts()?;
    // The channel needs its modules, which the job (or a warm VM's start)
    // names; so it is decoded first and validated only once a failure can
    // be reported.
    let start_with = match job::load() {
        Ok(s) => s,
        Err(e) => {
            open_channel_anyway();
            return Err(e);
        }
    };
    let modules = match &start_with {
        job::Start::Cold(job) => &job.modules,
        job::Start::Warm(warm) => &warm.modules,
    };
    if let Err(e) = boot::load_modules(modules) {
        open_channel_anyway();
        return Err(e);
    }
    let modules_ms = start.elapsed().as_millis();
    channel::open().step(error::channel, || {
        format!(
            "opening the host channel ({} or {})",
            kiln_guest::contract::SERIAL_PORT_PATH,
            channel::CHANNEL_DEVICE
        )
    })?;
    // A warm VM does everything that does not depend on its job before it
    // says Ready, so the request only waits for what does. Its shares are
    // empty until the host materialises the job's inputs, but mounting
    // looks nothing up: virtiofs reads the root's attributes and entries on
    // first access, which comes after the job.
    let early = match &start_with {
        job::Start::Warm(_) => Some(prepare_machine()?),
        job::Start::Cold(_) => None,
    };
    let (job, start) = match start_with {
        job::Start::Cold(job) => (*job, start),
        job::Start::Warm(_) => {
            let ready = Instant::now();
            let bytes = channel::receive_job()
                .map_err(|e| AgentError::Job(format!("receiving the job from the host: {e}")))?;
            // From here on the timeline is the request's, not the boot's.
            timings.waited_ms = Some(ready.elapsed().as_millis() as u64);
            (job::decode(&bytes)?, Instant::now())
        }
    };
    job::validate(&job).map_err(AgentError::Job)?;
    let kvm = if job.kvm {
        Some(boot::enable_kvm()?)
    } else {
        None
    };
    let kvm_ms = start.elapsed().as_millis();
    let filter = match early {
        Some(filter) => filter,
        None => prepare_machine()?,
    };
    let machine_ms = start.elapsed().as_millis();
    if let Some(network) = &job.network {
        net::configure(network).map_err(|source| AgentError::Network {
            what: format!(
                "configuring {} as {}/{}",
                net::INTERFACE,
                network.address,
                network.prefix
            ),
            source,
        })?;
    }
    let network_ms = start.elapsed().as_millis();
    sandbox::build(&job, kvm)?;
    timings.setup_ms = start.elapsed().as_millis() as u64;
    channel::log(&format!(
        "set-up timeline (ms since the agent started, or since the job came for a warm VM): modules {modules_ms}, kvm {kvm_ms}, machine (shares, lo, filter) {machine_ms}, network {network_ms}, sandbox {}",
        timings.setup_ms
    ));
    let finished = builder::run(&job, &filter)?;
    timings.build_ms = finished.build_ms;
    Ok(finished.outcome)
}

/// What a build needs of the machine whatever its job: the shares mounted,
/// the hostname, `lo` up, and the builder's syscall filter compiled.
fn prepare_machine() -> Result<SyscallFilter, AgentError> {
    boot::mount_shares()?;
    nix::unistd::sethostname("localhost").step(sandbox_err, || "setting the hostname".into())?;
    net::loopback_up().step(sandbox_err, || "bringing up lo".into())?;
    SyscallFilter::compile()
}

/// After a failure before the channel was open: loads the console modules
/// for either transport and opens the channel, so the failure can still be
/// reported. A failure here only goes to the serial log.
fn open_channel_anyway() {
    boot::load_console_fallback();
    if let Err(e) = channel::open() {
        eprintln!("kiln-agent: opening the host channel failed too: {e}");
    }
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
        waited_ms: timings.waited_ms,
    }
}

/// Powers the VM off. Never returns; if power-off itself fails, exiting
/// PID 1 panics the kernel, which (with `panic=-1` and the VMM's no-reboot)
/// also ends the VM.
///
/// There is deliberately no `sync()`: everything the build wrote is already
/// on the host. virtiofs writes through to virtiofsd (no writeback cache),
/// dirty pages of shared mappings are written back when the mapping closes,
/// and the builder's processes have all exited ([`builder::run`] waits for
/// them) before the report. A `sync()` would only make virtiofsd `syncfs`
/// the host filesystem — seconds on a busy host, for nothing kiln needs.
pub fn power_off() -> ! {
    kmsg("powering off");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}

/// Writes an info-level line to the kernel log, so it appears with a
/// timestamp in the serial log when the kernel's loglevel shows info.
pub fn kmsg(line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("<6>kiln-agent: {line}\n").as_bytes());
    }
}
