//! The concurrency section: 1, 2, 4 and 8 trivial builds at once, without
//! and with a warm pool: throughput, and the host memory each VM costs
//! outside its guest RAM.
//!
//! For each level a second server runs with a pool as large as the level
//! (`warm_vms` = n, 8 VM slots like the run's server). Batches alternate
//! between the run's server (no pool) and that one; before every batch the
//! bench waits until the pool's n VMs wait and nothing boots. A pool batch
//! is the burst a full pool absorbs; its refill boots replacements as soon
//! as slots are free, on the same cores as the batch.
//!
//! While a batch runs, a sampler reads `/proc` every 100 ms: each VMM
//! (QEMU) and virtiofsd process of the batch's server, and this process
//! itself (the kiln servers plus the bench's small client). A VMM's guest
//! RAM is a shared memfd, counted as `RssShmem`; what the VMM costs besides
//! is its proportional share of anonymous and file-backed pages
//! (`Pss_Anon + Pss_File`), reported per VM as the median of each
//! process's peak. virtiofsd's figure is per build (one daemon per share,
//! two shares), kiln's is its peak growth over the batch divided by the VMs
//! in it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::machine::{self, Rss};
use crate::sampler::Sampler;
use crate::server::{BenchServer, Options};
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// The batch sizes.
const LEVELS: [usize; 4] = [1, 2, 4, 8];
/// VM slots of every server here.
const MAX_VMS: usize = 8;

/// Peaks seen by the sampler over one batch, KiB.
#[derive(Default)]
struct Peaks {
    vmm: HashMap<u32, Rss>,
    virtiofsd: HashMap<u32, Rss>,
    kiln: u64,
    foreign_vms: usize,
}

/// Reads the processes of the server whose runs directory is `pattern`.
fn sample(peaks: &mut Peaks, pattern: &str) {
    let me = std::process::id();
    let procs = machine::processes();
    let mine = machine::descendants(me, &procs);
    for p in procs.iter().filter(|p| mine.contains(&p.pid)) {
        let vmm = machine::is_vmm(&p.comm);
        if !vmm && !p.comm.starts_with("virtiofsd") {
            continue;
        }
        if !machine::cmdline(p.pid).is_some_and(|c| c.contains(pattern)) {
            continue;
        }
        let Some(rss) = machine::rss(p.pid) else {
            continue;
        };
        let map = if vmm {
            &mut peaks.vmm
        } else {
            &mut peaks.virtiofsd
        };
        map.entry(p.pid).or_default().raise(rss);
    }
    let foreign = procs
        .iter()
        .filter(|p| machine::is_vmm(&p.comm) && !mine.contains(&p.pid))
        .count();
    peaks.foreign_vms = peaks.foreign_vms.max(foreign);
    if let Some(own) = machine::vm_rss(me) {
        peaks.kiln = peaks.kiln.max(own);
    }
}

/// One batch: its wall time, memory peaks, this process's RSS before it
/// and how many of its builds got a pool VM.
struct Batch {
    wall: Duration,
    peaks: Peaks,
    kiln_before: u64,
    warm: usize,
}

/// `n` concurrent trivial builds on `server`, all sent at once.
async fn batch(server: &BenchServer, n: usize) -> anyhow::Result<Batch> {
    let kiln_before = machine::vm_rss(std::process::id()).unwrap_or(0);
    let pattern = server.vmm_pattern();
    let sampler = Sampler::start(Peaks::default(), move |p| sample(p, &pattern));
    let started = Instant::now();
    let builds = (0..n).map(|_| server.submit(server.trivial_request(&[])));
    let results = futures::future::join_all(builds).await;
    let wall = started.elapsed();
    let peaks = sampler.finish().await?;
    let mut warm = 0;
    for r in results {
        warm += usize::from(r?.warm == Some(true));
    }
    Ok(Batch {
        wall,
        peaks,
        kiln_before,
        warm,
    })
}

fn median_mib(values: impl Iterator<Item = u64>) -> Option<f64> {
    let mut s = Samples::new();
    for v in values {
        s.push(v as f64 / 1024.0);
    }
    s.median()
}

/// One level's batches on one server.
#[derive(Default)]
struct Figures {
    wall: Samples,
    throughput: Samples,
    vmm_own: Samples,
    vmm_shmem: Samples,
    daemons: Samples,
    kiln_growth: Samples,
    builds: usize,
    warm: usize,
    foreign_vms: usize,
}

impl Figures {
    fn add(&mut self, b: &Batch, n: usize) {
        self.wall.push_ms(b.wall);
        self.throughput.push(n as f64 / b.wall.as_secs_f64() * 60.0);
        if let Some(m) = median_mib(b.peaks.vmm.values().map(Rss::own)) {
            self.vmm_own.push(m);
        }
        if let Some(m) = median_mib(b.peaks.vmm.values().map(|r| r.shmem)) {
            self.vmm_shmem.push(m);
        }
        let daemons_kib: u64 = b.peaks.virtiofsd.values().map(Rss::own).sum();
        self.daemons.push(daemons_kib as f64 / 1024.0 / n as f64);
        let growth = b.peaks.kiln.saturating_sub(b.kiln_before);
        self.kiln_growth.push(growth as f64 / 1024.0 / n as f64);
        self.builds += n;
        self.warm += b.warm;
        self.foreign_vms = self.foreign_vms.max(b.peaks.foreign_vms);
    }
}

/// `batches` batches of `n` on `server` and, with a pool server, as many
/// on it, alternating.
async fn level(
    server: &BenchServer,
    pool: Option<&BenchServer>,
    n: usize,
    batches: usize,
) -> anyhow::Result<(Figures, Figures)> {
    let (mut cold, mut warm) = (Figures::default(), Figures::default());
    for b in 0..batches {
        for slot in 0..2 {
            if let Some(pool) = pool {
                pool.wait_for_pool(n).await?;
            }
            match (pool, (b + slot) % 2 == 1) {
                (Some(pool), true) => warm.add(&batch(pool, n).await?, n),
                (None, true) => {}
                (_, false) => cold.add(&batch(server, n).await?, n),
            }
        }
        eprintln!("  concurrency {n}: batch {}/{batches} done", b + 1);
    }
    Ok((cold, warm))
}

/// One level: a pool server of `n` is started for it (unless the VMM has
/// no pool) and stopped after.
async fn run_level(
    server: &BenchServer,
    n: usize,
    batches: usize,
) -> anyhow::Result<(Figures, Figures)> {
    if server.pool_unavailable().is_some() {
        return level(server, None, n, batches).await;
    }
    let pool = server
        .sibling(&format!("pool-{n}"), &Options::warm(MAX_VMS, n))
        .await?;
    let measured = level(server, Some(&pool), n, batches).await;
    pool.stop().await?;
    measured
}

fn cold_row(n: usize, f: &Figures) -> Vec<String> {
    vec![
        n.to_string(),
        f.wall.ms(),
        f.throughput.one(),
        f.vmm_own.one(),
        f.vmm_shmem.one(),
        f.daemons.one(),
        f.kiln_growth.one(),
    ]
}

fn pool_row(n: usize, f: &Figures, vs: &Samples) -> Vec<String> {
    vec![
        n.to_string(),
        format!("{n} VM(s)"),
        f.wall.ms(),
        f.throughput.one(),
        vs.ratio(),
        format!("{} of {}", f.warm, f.builds),
    ]
}

/// Runs the section: `runs` batches of each size (`runs_big` for 4 and 8)
/// on each server.
pub async fn run(server: &BenchServer, runs: usize, runs_big: usize) -> anyhow::Result<Section> {
    let mut cold_table = Table::new(&[
        "concurrent builds",
        "batch wall (ms)",
        "throughput (builds/min)",
        "VMM PSS outside guest RAM (MiB/VM)",
        "guest RAM touched (MiB/VM)",
        "virtiofsd PSS (MiB/build)",
        "kiln RSS growth (MiB/VM)",
    ]);
    let mut pool_table = Table::new(&[
        "concurrent builds",
        "pool",
        "batch wall (ms)",
        "throughput (builds/min)",
        "throughput with / without pool",
        "builds on a warm VM",
    ]);
    let mut foreign = 0;
    let mut throughput = Vec::new();
    for n in LEVELS {
        let batches = if n >= 4 { runs_big } else { runs };
        let (cold, warm) = run_level(server, n, batches).await?;
        foreign = foreign.max(cold.foreign_vms).max(warm.foreign_vms);
        let vs = ratios(&warm.throughput, &cold.throughput);
        cold_table.row(cold_row(n, &cold));
        pool_table.row(pool_row(n, &warm, &vs));
        throughput.push((n, cold.throughput, vs));
    }
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} batches of 1 and 2 builds, {runs_big} of 4 and 8, on each server; min / median / \
         max. Each build is the trivial `true` build through `Submit`, all of a batch sent at \
         once; every server allows {MAX_VMS} VMs. Without a pool (the run's server):\n"
    );
    body.push_str(&cold_table.render());
    let _ = writeln!(
        body,
        "\nMemory is sampled from /proc every 100 ms: VMM is QEMU's proportional share (PSS) of \
         anonymous and file-backed pages, the median of each process's peak (shared libraries \
         split among the VMs); guest RAM touched is QEMU's resident shared memory (the memfd \
         guest RAM), for scale; virtiofsd is the same PSS summed over a build's daemons (two \
         shares); kiln is the peak growth of this process's RSS over the batch (servers and \
         the bench's client), per VM. The pool server's n idle VMs run meanwhile and share \
         QEMU's libraries too (the memory section has a lone VM's figures).\n"
    );
    match server.pool_unavailable() {
        Some(why) => {
            let _ = writeln!(body, "With a pool: not measured, {why}.");
        }
        None => {
            body.push_str(
                "With a pool of n (`warm_vms` = n) on a second server, each batch starting \
                 with n VMs waiting; batches alternate with the ones above, and the ratio pairs \
                 each with its neighbour:\n\n",
            );
            body.push_str(&pool_table.render());
        }
    }
    body.push_str(
        "\nOn 2 cores under TCG the CPU is the limit: throughput stops growing once both cores \
         are busy booting guests, and a pool moves boots earlier rather than removing them.\n",
    );
    if foreign > 0 {
        let _ = writeln!(
            body,
            "\nOther VMs (not the bench's) were running during these batches: up to {foreign} \
             at once."
        );
    }
    Ok(Section {
        title: "Concurrency: 1, 2, 4, 8 builds at once, without and with a pool".into(),
        body,
        summary: summary(&throughput),
    })
}

/// The summary lines: scaling without a pool, and the pool's effect at 1
/// and at 8.
fn summary(by_level: &[(usize, Samples, Samples)]) -> Vec<(String, String, Option<bool>)> {
    let at = |n: usize| by_level.iter().find(|(l, _, _)| *l == n);
    let mut lines = Vec::new();
    if let (Some((_, one, _)), Some((_, eight, _))) = (at(1), at(8)) {
        lines.push((
            "throughput 8 at once / 1 at a time, no pool (2 cores)".into(),
            ratios(eight, one).ratio(),
            None,
        ));
    }
    for n in [1, 8] {
        // No ratios: no pool on this VMM.
        if let Some((_, _, vs)) = at(n).filter(|(_, _, vs)| vs.len() > 0) {
            lines.push((
                format!("throughput with a pool of {n} / without, {n} at once"),
                vs.ratio(),
                None,
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> Samples {
        let mut s = Samples::new();
        for v in values {
            s.push(*v);
        }
        s
    }

    #[test]
    fn the_summary_leaves_out_the_pool_lines_without_a_pool() {
        let levels = vec![
            (1, samples(&[10.0]), Samples::new()),
            (8, samples(&[20.0]), Samples::new()),
        ];
        let lines = summary(&levels);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].1, "2.00 / 2.00 / 2.00");
        let levels = vec![
            (1, samples(&[10.0]), samples(&[3.0])),
            (8, samples(&[20.0]), samples(&[1.5])),
        ];
        let names: Vec<String> = summary(&levels).into_iter().map(|l| l.0).collect();
        assert_eq!(
            names[1..],
            [
                "throughput with a pool of 1 / without, 1 at once".to_string(),
                "throughput with a pool of 8 / without, 8 at once".to_string(),
            ]
        );
    }
}
