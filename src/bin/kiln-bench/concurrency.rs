//! Section 4: 1, 2, 4 and 8 trivial builds at once: throughput, and the
//! host memory each VM costs outside its guest RAM.
//!
//! While a batch runs, a sampler reads `/proc` every 100 ms: each VMM
//! (QEMU) and virtiofsd process below this one, and this process itself
//! (the kiln server plus the bench's small client). A VMM's guest RAM is a
//! shared memfd, counted as `RssShmem`; what the VMM costs besides is its
//! proportional share of anonymous and file-backed pages (`Pss_Anon +
//! Pss_File`), reported per VM as the median of each process's peak. virtiofsd's figure is per build (one daemon per share, two shares),
//! kiln's is its peak growth over the batch divided by the VMs in it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::machine::{self, Rss};
use crate::server::BenchServer;
use crate::stats::{Samples, Table};
use crate::Section;

/// Peaks seen by the sampler over one batch, KiB.
#[derive(Default)]
struct Peaks {
    vmm: HashMap<u32, Rss>,
    virtiofsd: HashMap<u32, Rss>,
    kiln: u64,
    foreign_vms: usize,
}

fn descendants(of: u32, procs: &[machine::Proc]) -> HashSet<u32> {
    let mut found: HashSet<u32> = HashSet::from([of]);
    loop {
        let before = found.len();
        for p in procs {
            if found.contains(&p.ppid) {
                found.insert(p.pid);
            }
        }
        if found.len() == before {
            found.remove(&of);
            return found;
        }
    }
}

fn keep_peak(map: &mut HashMap<u32, Rss>, pid: u32, now: Rss) {
    let e = map.entry(pid).or_default();
    e.anon = e.anon.max(now.anon);
    e.file = e.file.max(now.file);
    e.shmem = e.shmem.max(now.shmem);
}

fn sample(peaks: &mut Peaks) {
    let me = std::process::id();
    let procs = machine::processes();
    let mine = descendants(me, &procs);
    for p in procs.iter().filter(|p| mine.contains(&p.pid)) {
        let Some(rss) = machine::rss(p.pid) else {
            continue;
        };
        if p.comm.starts_with("qemu-system") {
            keep_peak(&mut peaks.vmm, p.pid, rss);
        } else if p.comm.starts_with("virtiofsd") {
            keep_peak(&mut peaks.virtiofsd, p.pid, rss);
        }
    }
    let foreign = procs
        .iter()
        .filter(|p| p.comm.starts_with("qemu-system") && !mine.contains(&p.pid))
        .count();
    peaks.foreign_vms = peaks.foreign_vms.max(foreign);
    if let Some(own) = machine::vm_rss(me) {
        peaks.kiln = peaks.kiln.max(own);
    }
}

/// One batch of `n` concurrent builds: wall time and memory peaks.
async fn batch(server: &BenchServer, n: usize) -> anyhow::Result<(Duration, Peaks, u64)> {
    let before = machine::vm_rss(std::process::id()).unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut peaks = Peaks::default();
            while !stop.load(Ordering::Relaxed) {
                sample(&mut peaks);
                std::thread::sleep(Duration::from_millis(100));
            }
            peaks
        })
    };
    let started = Instant::now();
    let mut builds = Vec::new();
    for _ in 0..n {
        builds.push(server.do_build(server.trivial_request(&[])));
    }
    let results = futures::future::join_all(builds).await;
    let wall = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler.await?;
    for r in results {
        r?;
    }
    Ok((wall, peaks, before))
}

fn median_kib(values: impl Iterator<Item = u64>) -> Samples {
    let mut s = Samples::new();
    for v in values {
        s.push(v as f64 / 1024.0);
    }
    s
}

/// Runs the section: `runs` batches of each size (`runs_big` for 4 and 8).
pub async fn run(server: &BenchServer, runs: usize, runs_big: usize) -> anyhow::Result<Section> {
    let mut table = Table::new(&[
        "concurrent builds",
        "batch wall (ms)",
        "throughput (builds/min)",
        "VMM PSS outside guest RAM (MiB/VM)",
        "guest RAM touched (MiB/VM)",
        "virtiofsd PSS (MiB/build)",
        "kiln RSS growth (MiB/VM)",
    ]);
    let mut foreign = 0;
    let mut best = Samples::new();
    let mut single = Samples::new();
    for n in [1usize, 2, 4, 8] {
        let batches = if n >= 4 { runs_big } else { runs };
        let mut wall = Samples::new();
        let mut throughput = Samples::new();
        let mut vmm_own = Samples::new();
        let mut vmm_shmem = Samples::new();
        let mut daemons = Samples::new();
        let mut kiln_growth = Samples::new();
        for b in 0..batches {
            let (took, peaks, before) = batch(server, n).await?;
            foreign = foreign.max(peaks.foreign_vms);
            wall.push_ms(took);
            let per_min = n as f64 / took.as_secs_f64() * 60.0;
            throughput.push(per_min);
            if n == 1 {
                single.push(per_min);
            }
            if n == 8 {
                best.push(per_min);
            }
            if let Some(m) = median_kib(peaks.vmm.values().map(Rss::own)).median() {
                vmm_own.push(m);
            }
            if let Some(m) = median_kib(peaks.vmm.values().map(|r| r.shmem)).median() {
                vmm_shmem.push(m);
            }
            let daemons_kib: u64 = peaks.virtiofsd.values().map(Rss::own).sum();
            daemons.push(daemons_kib as f64 / 1024.0 / n as f64);
            kiln_growth.push(peaks.kiln.saturating_sub(before) as f64 / 1024.0 / n as f64);
            eprintln!("  concurrency {n}: batch {}/{batches} done", b + 1);
        }
        table.row(vec![
            n.to_string(),
            wall.ms(),
            throughput.one(),
            vmm_own.one(),
            vmm_shmem.one(),
            daemons.one(),
            kiln_growth.one(),
        ]);
    }
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} batches of 1 and 2 builds, {runs_big} of 4 and 8; min / median / max. Each build \
         is the trivial `true` build through `DoBuild`, all of a batch sent at once; the server \
         allows 8 VMs. Memory is sampled from /proc every 100 ms: VMM is QEMU's proportional \
         share (PSS) of anonymous and file-backed pages, the median of each process's peak \
         (shared libraries split among the VMs); guest RAM touched is QEMU's resident shared \
         memory (the memfd guest RAM), for scale; virtiofsd is the same PSS summed over a \
         build's daemons (two shares); kiln is the peak growth of this process's RSS over the \
         batch (server and the bench's client), per VM. On 2 cores under TCG the CPU is the limit: throughput stops \
         growing once both cores are busy booting guests.\n"
    );
    body.push_str(&table.render());
    if foreign > 0 {
        let _ = writeln!(
            body,
            "\nOther VMs (not the bench's) were running during these batches: up to {foreign} at once."
        );
    }
    let scaling = crate::stats::ratios(&best, &single);
    Ok(Section {
        title: "4. Concurrency: 1, 2, 4, 8 builds at once".into(),
        body,
        summary: vec![(
            "throughput 8 at once / 1 at a time (2 cores)".into(),
            scaling.ratio(),
            None,
        )],
    })
}
