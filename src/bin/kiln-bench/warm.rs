//! The warm pool section: request to the builder's first instruction
//! (`Submit` sent to the `build` phase event) with a pool VM waiting, and
//! cold, each against a bare cold boot of the same kernel and VMM (VMM
//! spawned to its init's mark on the serial console).
//!
//! Cold builds go to the run's server without a pool; warm ones to a
//! second server with a pool of one VM and one VM slot, so no replacement
//! boots while the warm build runs. Before every timed item — bare, cold,
//! warm, in an order rotating from run to run — the bench waits until the
//! pool VM waits again and nothing boots: all three see the same machine,
//! one idle pool VM. Ratios are taken within a run.

use std::fmt::Write as _;

use crate::bare::{Bare, BareBoot};
use crate::builds::Finished;
use crate::server::{BenchServer, Options};
use crate::stats::{Samples, Table};
use crate::Section;

/// The target of warm first instruction / bare boot.
const TARGET: f64 = 0.10;

/// The section's heading.
const TITLE: &str = "Warm pool: request to the builder's first instruction, warm and cold";

/// One run's three items.
#[derive(Default)]
struct Round {
    bare: Option<BareBoot>,
    cold: Option<Finished>,
    warm: Option<Finished>,
}

/// The figures over all runs.
#[derive(Default)]
struct Figures {
    runs: usize,
    warm_hits: usize,
    bare_mark: Samples,
    bare_uptime: Samples,
    cold_first: Samples,
    cold_wall: Samples,
    warm_first: Samples,
    warm_wall: Samples,
    cold_ratio: Samples,
    warm_ratio: Samples,
}

impl Figures {
    /// Adds a run; a warm build that got no pool VM is counted, not timed.
    fn add(&mut self, round: Round) -> anyhow::Result<()> {
        let (Some(bare), Some(cold), Some(warm)) = (round.bare, round.cold, round.warm) else {
            anyhow::bail!("a run missed one of its items");
        };
        self.runs += 1;
        let bare_ms = bare.to_mark.as_secs_f64() * 1000.0;
        self.bare_mark.push(bare_ms);
        self.bare_uptime.push(bare.guest_boot_ms);
        let cold_ms = cold.first_instruction()?.as_secs_f64() * 1000.0;
        self.cold_first.push(cold_ms);
        self.cold_wall.push_ms(cold.wall);
        self.cold_ratio.push(cold_ms / bare_ms);
        if warm.warm == Some(true) {
            self.warm_hits += 1;
            let warm_ms = warm.first_instruction()?.as_secs_f64() * 1000.0;
            self.warm_first.push(warm_ms);
            self.warm_wall.push_ms(warm.wall);
            self.warm_ratio.push(warm_ms / bare_ms);
        }
        Ok(())
    }
}

/// Runs the section; `bare` is prepared for `server`.
pub async fn run(server: &BenchServer, bare: &Bare, runs: usize) -> anyhow::Result<Section> {
    if let Some(why) = server.pool_unavailable() {
        return Ok(Section::skipped(TITLE, &why));
    }
    let pool = server.sibling("warm", &Options::warm(1, 1)).await?;
    let measured = measure(server, &pool, bare, runs).await;
    pool.stop().await?;
    let figures = measured?;
    Ok(report(&figures, server))
}

async fn measure(
    server: &BenchServer,
    pool: &BenchServer,
    bare: &Bare,
    runs: usize,
) -> anyhow::Result<Figures> {
    let memory_mib = server.warm_up().await?;
    pool.wait_for_pool(1).await?;
    pool.warm_up().await?;
    let req = server.trivial_request(&[]);
    let mut figures = Figures::default();
    for run in 0..runs {
        let mut round = Round::default();
        for slot in 0..3 {
            pool.wait_for_pool(1).await?;
            match (run + slot) % 3 {
                0 => round.bare = Some(bare.boot(server, false, memory_mib, run + 1).await?),
                1 => round.cold = Some(server.submit(req.clone()).await?),
                _ => round.warm = Some(pool.submit(pool.trivial_request(&[])).await?),
            }
        }
        figures.add(round)?;
        eprintln!("  warm pool run {}/{runs} done", run + 1);
    }
    Ok(figures)
}

fn report(f: &Figures, server: &BenchServer) -> Section {
    let mut table = Table::new(&["what (ms unless noted)", "min / median / max"]);
    let target = format!("**ratio warm / bare boot** (target ≤ {TARGET:.2})");
    let rows = [
        (
            "bare cold boot: VMM spawned to its init's mark (host clock)",
            f.bare_mark.ms(),
        ),
        ("bare: guest uptime at the mark", f.bare_uptime.ms()),
        (
            "cold: `Submit` to `build` phase (no pool)",
            f.cold_first.ms(),
        ),
        (
            "warm: `Submit` to `build` phase (a pool VM waiting)",
            f.warm_first.ms(),
        ),
        (target.as_str(), f.warm_ratio.ratio()),
        ("ratio cold / bare boot", f.cold_ratio.ratio()),
        ("cold: whole build, `Submit` to completed", f.cold_wall.ms()),
        ("warm: whole build, `Submit` to completed", f.warm_wall.ms()),
    ];
    for (what, value) in rows {
        table.row(vec![what.to_owned(), value]);
    }
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{} runs; each run does a bare boot, a cold build and a warm build of `true`, in \
         rotating order, after waiting for the pool VM to be booted and idle. The bare boot \
         is overhead's (same kernel, base initramfs, VMM, guest RAM; {} / {}); warm builds go \
         to a server with `warm_vms` 1 and one VM slot. **{} of {} warm builds got a pool VM** \
         (the `Started` event's `warm`); only those are in the warm figures.\n",
        f.runs,
        server.runner.name(),
        server.runner.accel(),
        f.warm_hits,
        f.runs
    );
    body.push_str(&table.render());
    Section {
        title: TITLE.into(),
        body,
        summary: vec![
            (
                format!(
                    "request → first instruction, warm / bare cold boot (≤ {TARGET:.2}; {}/{} runs warm)",
                    f.warm_hits, f.runs
                ),
                f.warm_ratio.ratio(),
                Some(f.warm_hits > 0 && f.warm_ratio.median().is_some_and(|m| m <= TARGET)),
            ),
            (
                "request → first instruction, cold / bare cold boot".into(),
                f.cold_ratio.ratio(),
                None,
            ),
        ],
    }
}
