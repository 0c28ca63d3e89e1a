//! The memory section: what one VM costs the host outside its guest RAM,
//! and what TCG's code-cache cap changes.
//!
//! A VM's QEMU process is read from `/proc` every 100 ms: its
//! proportional share (PSS) of anonymous and of file-backed pages is what
//! it costs outside guest RAM; its resident shared memory is the guest RAM
//! it touched (a memfd), reported apart. Measured for a VM waiting in the
//! pool (a server with a pool of one, sampled for a second once the VM
//! waits, then given a build so the next run gets a fresh one) and for a
//! VM running a CPU-heavy build (random bytes from the guest's
//! `/dev/urandom`, gzipped and hashed by busybox). Under QEMU/TCG the same
//! heavy build also runs on a server whose QEMU keeps its default code
//! cache, alternating with kiln's capped one; ratios are taken within a
//! run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use kiln::vmm::qemu::TCG_TB_SIZE_MIB;

use crate::machine::{self, Rss};
use crate::sampler::Sampler;
use crate::server::{BenchServer, Options};
use crate::spans::StepTimes;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// The target for memory outside guest RAM, MiB.
const TARGET_MIB: f64 = 40.0;
/// How long a waiting pool VM is sampled.
const WAITING_SAMPLE: Duration = Duration::from_secs(1);
/// The section's heading.
const TITLE: &str = "Memory: host memory per VM outside guest RAM, and TCG's code cache";

/// The CPU-heavy builder: `mib` MiB of random bytes made in the guest,
/// gzipped and hashed (a pipe: no file is written to the shares).
pub fn heavy_script(mib: u64) -> String {
    format!(
        "set -o pipefail; dd if=/dev/urandom bs=64k count={} 2>/dev/null | gzip -c | sha256sum",
        mib * 16
    )
}

/// A VM's memory over runs, MiB.
#[derive(Default)]
struct Memory {
    anon: Samples,
    file: Samples,
    own: Samples,
    shmem: Samples,
}

impl Memory {
    fn push(&mut self, peak: Rss) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        self.anon.push(mib(peak.anon));
        self.file.push(mib(peak.file));
        self.own.push(mib(peak.own()));
        self.shmem.push(mib(peak.shmem));
    }

    fn row(&self, label: String) -> Vec<String> {
        vec![
            label,
            self.anon.one(),
            self.file.one(),
            self.own.one(),
            self.shmem.one(),
        ]
    }

    fn met(&self) -> Option<bool> {
        Some(self.own.median().is_some_and(|m| m <= TARGET_MIB))
    }
}

/// The heavy build on one server.
struct Heavy<'a> {
    label: String,
    server: &'a BenchServer,
    wall: Samples,
    builder: Samples,
    memory: Memory,
}

impl<'a> Heavy<'a> {
    fn new(label: String, server: &'a BenchServer) -> Self {
        Self {
            label,
            server,
            wall: Samples::new(),
            builder: Samples::new(),
            memory: Memory::default(),
        }
    }

    /// One build, its VM's memory sampled throughout.
    async fn measure(&mut self, script: &str, times: &StepTimes) -> anyhow::Result<()> {
        let build = self.server.submit(self.server.shell_request(script));
        let (done, peak) = peak_during(self.server.vmm_pattern(), build).await?;
        let done = done?;
        self.wall.push_ms(done.wall);
        let steps = times.take(&done.id).await.unwrap_or_default();
        self.builder
            .push(steps.get("builder").copied().unwrap_or(0.0));
        self.memory.push(peak);
        Ok(())
    }
}

/// Runs `during`, meanwhile keeping the peak memory of each VMM whose
/// command line has `pattern`; yields its output and the largest peak.
async fn peak_during<F: Future>(pattern: String, during: F) -> anyhow::Result<(F::Output, Rss)> {
    let sampler = Sampler::start(HashMap::<u32, Rss>::new(), move |peaks| {
        for (pid, now) in machine::vmms(&pattern) {
            peaks.entry(pid).or_default().raise(now);
        }
    });
    let out = during.await;
    let peaks = sampler.finish().await?;
    let peak = peaks
        .values()
        .copied()
        .max_by_key(Rss::own)
        .ok_or_else(|| anyhow!("no VMM process was seen while sampling"))?;
    Ok((out, peak))
}

/// A VM waiting in `pool`'s pool, `runs` times (a fresh VM each time).
async fn waiting(pool: &BenchServer, runs: usize) -> anyhow::Result<Memory> {
    let mut memory = Memory::default();
    for run in 0..runs {
        pool.wait_for_pool(1).await?;
        let idle = tokio::time::sleep(WAITING_SAMPLE);
        let ((), peak) = peak_during(pool.warm_vmm_pattern(), idle).await?;
        memory.push(peak);
        pool.submit(pool.trivial_request(&[])).await?;
        eprintln!("  memory: waiting VM {}/{runs} done", run + 1);
    }
    Ok(memory)
}

/// The heavy build on each of `heavy`, alternating.
async fn heavy_builds(
    heavy: &mut [Heavy<'_>],
    script: &str,
    times: &StepTimes,
    runs: usize,
) -> anyhow::Result<()> {
    // Warm-up: base image, page cache.
    for h in heavy.iter() {
        h.server.submit(h.server.shell_request(script)).await?;
    }
    let n = heavy.len();
    for run in 0..runs {
        for slot in 0..n {
            heavy[(run + slot) % n].measure(script, times).await?;
        }
        eprintln!("  memory: heavy build run {}/{runs} done", run + 1);
    }
    Ok(())
}

/// Runs the section; the heavy build makes `heavy_mib` MiB in the guest.
pub async fn run(
    server: &BenchServer,
    times: &StepTimes,
    runs: usize,
    heavy_mib: u64,
) -> anyhow::Result<Section> {
    let others_before = machine::foreign_vms();
    let waiting = match server.pool_unavailable() {
        Some(why) => Err(why),
        None => {
            let pool = server.sibling("memory-pool", &Options::warm(1, 1)).await?;
            let measured = waiting(&pool, runs).await;
            pool.stop().await?;
            Ok(measured?)
        }
    };

    let (default_cache, kiln_label) = if server.is_tcg() {
        let options = Options {
            tb_size_mib: Some(0),
            ..Options::cold(1)
        };
        let other = server.sibling("tb-default", &options).await?;
        let label = format!("code cache {TCG_TB_SIZE_MIB} MiB (kiln's `tb-size`)");
        (Some(other), label)
    } else {
        let label = format!("{} / {}", server.runner.name(), server.runner.accel());
        (None, label)
    };
    let mut heavy = vec![Heavy::new(kiln_label, server)];
    if let Some(s) = &default_cache {
        heavy.push(Heavy::new("QEMU's default code cache (1 GiB)".into(), s));
    }
    let script = heavy_script(heavy_mib);
    let measured = heavy_builds(&mut heavy, &script, times, runs).await;
    let others = (others_before, machine::foreign_vms());
    let section = measured.map(|()| report(&waiting, &heavy, &script, runs, others));
    drop(heavy);
    if let Some(s) = default_cache {
        s.stop().await?;
    }
    section
}

fn report(
    waiting: &Result<Memory, String>,
    heavy: &[Heavy<'_>],
    script: &str,
    runs: usize,
    others: (usize, usize),
) -> Section {
    let mut memory = Table::new(&[
        "VM (MiB)",
        "QEMU PSS anon",
        "QEMU PSS file",
        "**outside guest RAM** (anon + file)",
        "guest RAM touched (RssShmem)",
    ]);
    let waiting_label = "waiting in the pool (agent waiting for its job)";
    match waiting {
        Ok(m) => memory.row(m.row(waiting_label.into())),
        Err(why) => memory.row(vec![waiting_label.into(), format!("not measured: {why}")]),
    }
    for h in heavy {
        memory.row(
            h.memory
                .row(format!("running the heavy build, {}", h.label)),
        );
    }
    let mut cache = Table::new(&[
        "heavy build",
        "end to end (ms)",
        "builder in the guest (ms)",
        "QEMU outside guest RAM (MiB)",
    ]);
    for h in heavy {
        cache.row(vec![
            h.label.clone(),
            h.wall.ms(),
            h.builder.ms(),
            h.memory.own.one(),
        ]);
    }
    let mut summary = vec![
        (
            format!(
                "QEMU memory outside guest RAM, VM waiting in the pool (MiB, ≤ {TARGET_MIB:.0})"
            ),
            waiting
                .as_ref()
                .map_or_else(|_| "n/a".into(), |m| m.own.one()),
            waiting.as_ref().ok().and_then(Memory::met),
        ),
        (
            format!("QEMU memory outside guest RAM, VM building (MiB, ≤ {TARGET_MIB:.0})"),
            heavy[0].memory.own.one(),
            heavy[0].memory.met(),
        ),
    ];
    if let [capped, default] = heavy {
        let time = ratios(&capped.wall, &default.wall);
        let own = ratios(&capped.memory.own, &default.memory.own);
        cache.row(vec![
            "ratio capped / default".into(),
            time.ratio(),
            ratios(&capped.builder, &default.builder).ratio(),
            own.ratio(),
        ]);
        summary.push((
            "heavy build time, TCG code cache capped / QEMU default".into(),
            time.ratio(),
            None,
        ));
        summary.push((
            "QEMU memory outside guest RAM while building, capped / QEMU default".into(),
            own.ratio(),
            None,
        ));
    }
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs of each; min / median / max of each VM's peak. The heavy build is `sh -c \
         '{script}'` on a server without a pool. One bench VM runs at a time; PSS splits pages \
         shared with other processes (QEMU's binary and libraries) among them, here with {} \
         other QEMU process(es) at the start of the section and {} at its end.\n",
        others.0, others.1
    );
    body.push_str(&memory.render());
    if heavy.len() > 1 {
        body.push_str(
            "\nTCG's translated-code cache: the same heavy build with kiln's cap and with QEMU's \
             default, alternating:\n\n",
        );
        body.push_str(&cache.render());
    } else {
        body.push_str("\nThe code-cache comparison needs QEMU/TCG; not measured here.\n");
    }
    Section {
        title: TITLE.into(),
        body,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heavy_build_makes_the_asked_mebibytes_and_fails_with_any_step() {
        let script = heavy_script(4);
        assert!(script.starts_with("set -o pipefail; "), "{script}");
        // 64 KiB blocks: 16 per MiB.
        assert!(script.contains("bs=64k count=64 "), "{script}");
    }

    #[test]
    fn memory_is_reported_in_mebibytes_and_outside_guest_ram_is_anon_plus_file() {
        let mut m = Memory::default();
        m.push(Rss {
            anon: 30 * 1024,
            file: 5 * 1024,
            shmem: 100 * 1024,
        });
        assert_eq!(m.own.median(), Some(35.0));
        assert_eq!(m.shmem.median(), Some(100.0));
        assert_eq!(m.met(), Some(true));
        m.push(Rss {
            anon: 60 * 1024,
            file: 5 * 1024,
            shmem: 0,
        });
        m.push(Rss {
            anon: 60 * 1024,
            file: 5 * 1024,
            shmem: 0,
        });
        assert_eq!(m.met(), Some(false));
    }
}
