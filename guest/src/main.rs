//! kiln-agent: PID 1 of every build VM.
//!
//! It reads its job from the initramfs, prepares the machine (pseudo
//! filesystems, modules, virtiofs shares), builds a Nix-like sandbox, runs the
//! builder as the build user while streaming its output to the host over
//! `/dev/hvc0`, then sends a [`Report`](kiln_guest::contract::Report), syncs
//! and powers off. See `kiln_guest::contract` for the wire format.
//!
//! It never hangs on its own failures and never dies silently: any error, and
//! any panic, becomes an `AgentFailed` report followed by power-off.

mod agent;

use std::time::Instant;

use kiln_guest::contract::{Outcome, Report};

fn main() {
    let start = Instant::now();
    let mut timings = agent::Timings {
        boot_ms: uptime_ms(),
        ..Default::default()
    };
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("kiln-agent: {info}");
        let outcome = Outcome::AgentFailed {
            step: "panic".into(),
            message: info.to_string(),
        };
        agent::channel::emergency_report(&Report {
            outcome,
            boot_ms: 0,
            setup_ms: 0,
            build_ms: 0,
            waited_ms: None,
        });
        agent::power_off();
    }));
    let result = agent::run(start, &mut timings);
    if let Err(e) = &result {
        eprintln!("kiln-agent: {} failed: {}", e.step(), e.chain());
    }
    let report = agent::report(result, timings);
    if let Err(e) = agent::channel::send_report(&report) {
        eprintln!("kiln-agent: sending the report failed: {e}");
    }
    agent::power_off();
}

/// Time since the kernel started (CLOCK_BOOTTIME), in ms.
fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}
