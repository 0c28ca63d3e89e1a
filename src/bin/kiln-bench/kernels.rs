//! The guest kernel section: kiln's own kernel against Debian's cloud
//! kernel on the same VMM. For each kernel, a server without a pool; per
//! run and kernel, a bare boot to the init's mark (overhead's bare boot),
//! for Debian's also one that loads the modules the agent needs on it, and
//! a cold trivial build, whose agent reports its boot time (kernel start
//! to agent start). Items rotate from run to run; ratios are taken within
//! a run.

use std::fmt::Write as _;
use std::path::Path;

use kiln::guest_image::KernelChoice;

use crate::bare::Bare;
use crate::server::{self, BenchServer, Options};
use crate::spans::StepTimes;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// The target of kiln's kernel / Debian's, bare boot to the mark.
const TARGET: f64 = 0.5;

/// The section's heading.
const TITLE: &str = "Guest kernel: kiln's own vs Debian's cloud kernel";

/// What one timed item is.
#[derive(Clone, Copy)]
enum Item {
    Bare,
    BareModules,
    Build,
}

/// One kernel's server and figures.
struct Kernel {
    server: BenchServer,
    bare: Bare,
    memory_mib: u64,
    mark: Samples,
    uptime: Samples,
    mark_modules: Samples,
    modules_ms: Samples,
    build: Samples,
    agent_boot: Samples,
}

impl Kernel {
    async fn start(
        main: &BenchServer,
        name: &str,
        choice: KernelChoice,
        work: &Path,
    ) -> anyhow::Result<Self> {
        let options = Options {
            kernel: Some(choice),
            ..Options::cold(1)
        };
        let server = main.sibling(name, &options).await?;
        let bare = Bare::prepare(&server, &work.join(name))?;
        let memory_mib = server.warm_up().await?;
        bare.boot(&server, false, memory_mib, 0).await?;
        Ok(Self {
            server,
            bare,
            memory_mib,
            mark: Samples::new(),
            uptime: Samples::new(),
            mark_modules: Samples::new(),
            modules_ms: Samples::new(),
            build: Samples::new(),
            agent_boot: Samples::new(),
        })
    }

    /// The items of one run on this kernel.
    fn items(&self) -> Vec<Item> {
        let mut items = vec![Item::Bare, Item::Build];
        if self.bare.module_count() > 0 {
            items.push(Item::BareModules);
        }
        items
    }

    async fn measure(&mut self, item: Item, times: &StepTimes, run: usize) -> anyhow::Result<()> {
        match item {
            Item::Bare => {
                let b = self
                    .bare
                    .boot(&self.server, false, self.memory_mib, run)
                    .await?;
                self.mark.push_ms(b.to_mark);
                self.uptime.push(b.guest_boot_ms);
            }
            Item::BareModules => {
                let b = self
                    .bare
                    .boot(&self.server, true, self.memory_mib, run)
                    .await?;
                self.mark_modules.push_ms(b.to_mark);
                self.modules_ms.push(b.modules_ms);
            }
            Item::Build => {
                let done = self.server.submit(self.server.trivial_request(&[])).await?;
                self.build.push_ms(done.wall);
                if let Some(boot) = times
                    .take(&done.id)
                    .await
                    .and_then(|s| s.get("guest_boot").copied())
                {
                    self.agent_boot.push(boot);
                }
            }
        }
        Ok(())
    }

    /// The bare boot with what the agent loads: the modules, or nothing
    /// for a kernel that has them built in.
    fn mark_as_built(&self) -> &Samples {
        if self.bare.module_count() > 0 {
            &self.mark_modules
        } else {
            &self.mark
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
    }
}

/// Runs the section; it is skipped when one of the kernels is not
/// installed.
pub async fn run(
    main: &BenchServer,
    times: &StepTimes,
    work: &Path,
    runs: usize,
) -> anyhow::Result<Section> {
    for choice in [KernelChoice::Kiln, KernelChoice::DebianCloud] {
        if let Err(e) = server::artifacts(Some(&choice)) {
            return Ok(Section::skipped(TITLE, &format!("{e:#}")));
        }
    }
    let mut kiln = Kernel::start(main, "kernel-kiln", KernelChoice::Kiln, work).await?;
    let mut debian =
        match Kernel::start(main, "kernel-debian", KernelChoice::DebianCloud, work).await {
            Ok(k) => k,
            Err(e) => {
                kiln.stop().await?;
                return Err(e);
            }
        };
    let measured = measure(&mut kiln, &mut debian, times, runs).await;
    let section = measured.map(|()| report(&kiln, &debian, runs));
    kiln.stop().await?;
    debian.stop().await?;
    section
}

async fn measure(
    kiln: &mut Kernel,
    debian: &mut Kernel,
    times: &StepTimes,
    runs: usize,
) -> anyhow::Result<()> {
    let items: Vec<(bool, Item)> = kiln
        .items()
        .into_iter()
        .map(|i| (true, i))
        .chain(debian.items().into_iter().map(|i| (false, i)))
        .collect();
    for run in 0..runs {
        for slot in 0..items.len() {
            let (is_kiln, item) = items[(run + slot) % items.len()];
            let kernel = if is_kiln { &mut *kiln } else { &mut *debian };
            kernel.measure(item, times, run + 1).await?;
        }
        eprintln!("  guest kernel run {}/{runs} done", run + 1);
    }
    Ok(())
}

fn report(kiln: &Kernel, debian: &Kernel, runs: usize) -> Section {
    let mark = ratios(&kiln.mark, &debian.mark);
    let mut table = Table::new(&[
        "what (ms)",
        "kiln's kernel",
        "Debian cloud kernel",
        "kiln / Debian",
    ]);
    let row = |t: &mut Table, what: &str, a: &Samples, b: &Samples| {
        t.row(vec![what.into(), a.ms(), b.ms(), ratios(a, b).ratio()]);
    };
    row(
        &mut table,
        &format!("**bare boot: VMM spawned to init's mark** (target ≤ {TARGET:.2})"),
        &kiln.mark,
        &debian.mark,
    );
    row(
        &mut table,
        "bare: guest uptime at the mark",
        &kiln.uptime,
        &debian.uptime,
    );
    row(
        &mut table,
        &format!(
            "bare boot with the modules the agent loads ({} / {}), to the mark",
            kiln.bare.module_count(),
            debian.bare.module_count()
        ),
        kiln.mark_as_built(),
        debian.mark_as_built(),
    );
    row(
        &mut table,
        "cold trivial build (`Submit` of `true`), end to end",
        &kiln.build,
        &debian.build,
    );
    row(
        &mut table,
        "the agent's reported boot_ms in that build",
        &kiln.agent_boot,
        &debian.agent_boot,
    );
    let mut body = String::new();
    let _ =
        writeln!(
        body,
        "{runs} runs; each run boots every item once, in rotating order, on {} / {} with {} MiB \
         guest RAM. kiln's kernel: {}. Debian's: {}. The bare boots are overhead's (busybox \
         init, no virtiofs, no job); the modules row adds the `insmod`s the agent does on a \
         kernel without them built in (Debian's, {} ms median).\n",
        kiln.server.runner.name(),
        kiln.server.runner.accel(),
        kiln.memory_mib,
        kiln.server.artifacts.kernel_version().unwrap_or_else(|| "unknown".into()),
        debian.server.artifacts.kernel_version().unwrap_or_else(|| "unknown".into()),
        debian.modules_ms.median().map_or_else(|| "n/a".into(), |m| format!("{m:.0}")),
    );
    body.push_str(&table.render());
    Section {
        title: TITLE.into(),
        body,
        summary: vec![(
            format!("kiln's kernel / Debian cloud kernel, bare boot to the mark (≤ {TARGET:.2})"),
            mark.ratio(),
            Some(mark.median().is_some_and(|m| m <= TARGET)),
        )],
    }
}
