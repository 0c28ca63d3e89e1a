//! The memory section: what one VM costs the host outside its guest RAM,
//! and what TCG's code-cache cap changes.
//!
//! A VM's QEMU process is read from `/proc` every 100 ms: its anonymous
//! memory (PSS) and its file-backed pages, each counted in full and split
//! into the VM's own files (its initramfs) and the files every VM maps
//! (QEMU's binary and libraries, the guest kernel). Memory outside guest
//! RAM is reported for a VM alone on the host (anonymous plus every file
//! page) and per VM (anonymous plus its own files: what one more VM adds);
//! the target is checked against the latter. Its resident shared memory is
//! the guest RAM it touched (a memfd), reported apart. Measured for a VM
//! waiting in the pool (a server with a pool of one, sampled for a second
//! once the VM waits, then given a build so the next run gets a fresh one)
//! and for a VM running a CPU-heavy build (random bytes from the guest's
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

use crate::machine::{self, FilePages, Rss};
use crate::sampler::Sampler;
use crate::server::{BenchServer, Options};
use crate::spans::StepTimes;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// The target for memory outside guest RAM per VM, MiB.
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

/// One VM's memory, KiB: a sample, or each figure's peak over samples.
#[derive(Debug, Clone, Copy, Default)]
struct VmMemory {
    rss: Rss,
    files: FilePages,
}

impl VmMemory {
    fn raise(&mut self, now: VmMemory) {
        self.rss.raise(now.rss);
        self.files.raise(now.files);
    }

    /// Outside guest RAM for a VM alone on the host: its anonymous memory
    /// and every file page it maps.
    fn alone(&self) -> u64 {
        self.rss.anon + self.files.all
    }

    /// Outside guest RAM per VM: its anonymous memory and the pages of its
    /// own files; the binary, libraries and kernel every VM maps are in
    /// memory once per host.
    fn per_vm(&self) -> u64 {
        self.rss.anon + self.files.own
    }
}

/// A VM's memory over runs, MiB.
#[derive(Default)]
struct Memory {
    anon: Samples,
    pss_file: Samples,
    file: Samples,
    own_file: Samples,
    alone: Samples,
    per_vm: Samples,
    shmem: Samples,
}

impl Memory {
    fn push(&mut self, peak: VmMemory) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        self.anon.push(mib(peak.rss.anon));
        self.pss_file.push(mib(peak.rss.file));
        self.file.push(mib(peak.files.all));
        self.own_file.push(mib(peak.files.own));
        self.alone.push(mib(peak.alone()));
        self.per_vm.push(mib(peak.per_vm()));
        self.shmem.push(mib(peak.rss.shmem));
    }

    fn row(&self, label: String) -> Vec<String> {
        vec![
            label,
            self.anon.one(),
            self.file.one(),
            self.own_file.one(),
            self.alone.one(),
            self.per_vm.one(),
            self.pss_file.one(),
            self.shmem.one(),
        ]
    }

    fn met(&self) -> Option<bool> {
        Some(self.per_vm.median().is_some_and(|m| m <= TARGET_MIB))
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
/// command line has `pattern` (its files under `pattern` are its own);
/// yields its output and the largest peak.
async fn peak_during<F: Future>(
    pattern: String,
    during: F,
) -> anyhow::Result<(F::Output, VmMemory)> {
    let sampler = Sampler::start(HashMap::<u32, VmMemory>::new(), move |peaks| {
        for (pid, rss) in machine::vmms(&pattern) {
            let Some(files) = machine::file_pages(pid, &pattern) else {
                continue;
            };
            peaks.entry(pid).or_default().raise(VmMemory { rss, files });
        }
    });
    let out = during.await;
    let peaks = sampler.finish().await?;
    let peak = peaks
        .values()
        .copied()
        .max_by_key(VmMemory::alone)
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
        "QEMU anon (PSS)",
        "QEMU file pages",
        "of which its own files",
        "outside guest RAM, **alone** (anon + file pages)",
        "outside guest RAM, **per VM** (anon + own files)",
        "QEMU PSS file",
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
        "QEMU outside guest RAM, alone (MiB)",
        "per VM (MiB)",
    ]);
    for h in heavy {
        cache.row(vec![
            h.label.clone(),
            h.wall.ms(),
            h.builder.ms(),
            h.memory.alone.one(),
            h.memory.per_vm.one(),
        ]);
    }
    let waiting_figure =
        |f: fn(&Memory) -> String| waiting.as_ref().map_or_else(|_| "n/a".into(), f);
    let mut summary = vec![
        (
            format!(
                "QEMU memory outside guest RAM per VM, waiting in the pool (MiB, ≤ {TARGET_MIB:.0})"
            ),
            waiting_figure(|m| m.per_vm.one()),
            waiting.as_ref().ok().and_then(Memory::met),
        ),
        (
            format!("QEMU memory outside guest RAM per VM, building (MiB, ≤ {TARGET_MIB:.0})"),
            heavy[0].memory.per_vm.one(),
            heavy[0].memory.met(),
        ),
        (
            "QEMU memory outside guest RAM, VM alone on the host, waiting (MiB)".into(),
            waiting_figure(|m| m.alone.one()),
            None,
        ),
        (
            "QEMU memory outside guest RAM, VM alone on the host, building (MiB)".into(),
            heavy[0].memory.alone.one(),
            None,
        ),
    ];
    if let [capped, default] = heavy {
        let time = ratios(&capped.wall, &default.wall);
        let alone = ratios(&capped.memory.alone, &default.memory.alone);
        cache.row(vec![
            "ratio capped / default".into(),
            time.ratio(),
            ratios(&capped.builder, &default.builder).ratio(),
            alone.ratio(),
            ratios(&capped.memory.per_vm, &default.memory.per_vm).ratio(),
        ]);
        summary.push((
            "heavy build time, TCG code cache capped / QEMU default".into(),
            time.ratio(),
            None,
        ));
        summary.push((
            "QEMU memory outside guest RAM while building (alone), capped / QEMU default".into(),
            alone.ratio(),
            None,
        ));
    }
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs of each; min / median / max of each VM's peak. The heavy build is `sh -c \
         '{script}'` on a server without a pool. One bench VM runs at a time.\n\n\
         Outside guest RAM, a QEMU process holds anonymous memory (heap, thread stacks, TCG's \
         code cache; none of it shared) and file-backed pages: QEMU's binary and libraries, \
         the guest kernel (QEMU keeps the ELF it loaded mapped) and the VM's initramfs. \
         **Alone** counts every file page in full: what a VM costs when it is the only one on \
         the host. **Per VM** counts only the VM's own files (its initramfs, in its build \
         directory): every VM of a host maps the same binary, libraries and kernel, whose pages \
         are in memory once however many VMs run, so this is what each further VM adds. The \
         target (≤ {TARGET_MIB:.0} MiB per VM) is checked against the per-VM figure, the cost \
         that grows with the number of VMs; the difference between the two is paid once per \
         host. QEMU PSS file, the measure used before, splits the shared pages among whatever \
         else maps them (here {} other QEMU process(es) at the start of the section and {} at \
         its end), so it is shown for comparison only.\n",
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

    fn vm(anon_mib: u64, file_mib: u64, own_mib: u64) -> VmMemory {
        VmMemory {
            rss: Rss {
                anon: anon_mib * 1024,
                file: file_mib * 512,
                shmem: 100 * 1024,
            },
            files: FilePages {
                all: file_mib * 1024,
                own: own_mib * 1024,
            },
        }
    }

    #[test]
    fn alone_counts_every_file_page_and_per_vm_only_the_vms_own_files() {
        let mut m = Memory::default();
        m.push(vm(30, 40, 2));
        assert_eq!(m.alone.median(), Some(70.0));
        assert_eq!(m.per_vm.median(), Some(32.0));
        assert_eq!(m.pss_file.median(), Some(20.0));
        assert_eq!(m.shmem.median(), Some(100.0));
        assert_eq!(m.met(), Some(true), "the target is per VM");
        m.push(vm(60, 5, 2));
        m.push(vm(60, 5, 2));
        assert_eq!(m.met(), Some(false));
    }

    #[test]
    fn a_peak_keeps_each_figure_highest() {
        let mut peak = VmMemory::default();
        peak.raise(vm(30, 10, 2));
        peak.raise(vm(20, 40, 1));
        assert_eq!(peak.alone(), (30 + 40) * 1024);
        assert_eq!(peak.per_vm(), (30 + 2) * 1024);
    }
}
