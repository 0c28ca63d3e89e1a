//! kiln-bench: what kiln costs, measured side by side with its limits
//! (`make bench`).
//!
//! One module per section: the overhead of a cold trivial build against a
//! bare VM boot ([`overhead`]), request to the builder's first instruction
//! with a warm pool VM and cold ([`warm`]), kiln's guest kernel against
//! Debian's ([`kernels`]), first instruction against input shape
//! ([`inputs`]), output ingestion against `b3sum` ([`ingestion`]), host
//! memory per VM and TCG's code cache ([`memory`]), concurrent builds
//! with and without a pool ([`concurrency`]) and network ([`network`]).
//! Every figure is min / median / max over several runs (p99 from 20),
//! ratios are taken within a run. The report (markdown) is printed and
//! written to `--out` with the machine it ran on and the load it saw.
//!
//! A benchmark driver: every error ends the run, so errors are `anyhow`
//! with context rather than a typed enum.

mod bare;
mod builds;
mod concurrency;
mod data;
mod ingestion;
mod inputs;
mod kernels;
mod machine;
mod memory;
mod network;
mod overhead;
mod sampler;
mod server;
mod spans;
mod stats;
mod warm;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tracing::Level;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// One section of the report.
pub struct Section {
    /// Its heading.
    pub title: String,
    /// Markdown: a sentence on method, then tables.
    pub body: String,
    /// Lines for the summary: (figure, min / median / max, target met).
    pub summary: Vec<(String, String, Option<bool>)>,
}

impl Section {
    /// A section that could not be measured on this host, saying why (also
    /// on stderr, as `make test`'s skips do).
    pub fn skipped(title: &str, why: &str) -> Self {
        eprintln!("SKIPPED: {title}: {why}");
        Self {
            title: title.into(),
            body: format!("Not measured: {why}.\n"),
            summary: vec![],
        }
    }
}

#[derive(Parser)]
#[command(name = "kiln-bench", about = "Benchmarks kiln on this machine")]
struct Args {
    /// Where to write the markdown report.
    #[arg(long, default_value = "docs/bench.md")]
    out: PathBuf,
    /// Runs per figure (the slow shapes get fewer, see the report).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Small data and 2 runs: checks the bench itself in a few minutes.
    #[arg(long)]
    quick: bool,
    /// Only these sections (overhead, warm, kernels, inputs, ingestion,
    /// memory, concurrency, network).
    #[arg(long = "only")]
    only: Vec<String>,
    /// Scratch directory for stores and data (default: a temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

impl Args {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let times = spans::StepTimes::default();
    let steps = times.layer().with_filter(filter_fn(|m| {
        m.target().starts_with("kiln") && *m.level() <= Level::INFO
    }));
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    tracing_subscriber::registry()
        .with(steps)
        .with(console)
        .init();

    let runs = if args.quick { 2 } else { args.runs.max(1) };
    let (big, many_inputs, many_outputs, heavy_mib) = if args.quick {
        (64 << 20, 1_000, 5_000, 4)
    } else {
        (1 << 30, 10_000, 100_000, 16)
    };
    let tmp = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let work = tmp.path();
    let started = Instant::now();
    let load_before = machine::loadavg();
    let foreign_before = machine::foreign_vms();

    let options = server::Options {
        network: true,
        ..server::Options::cold(8)
    };
    let server = server::start(work, &options)
        .await
        .context("starting kiln")?;
    let facts = machine::Machine::detect(
        server.runner.name(),
        server.runner.accel(),
        kernel_line(&server.artifacts, args.wants("kernels")),
    );
    let mut sections = Vec::new();
    let bare = if args.wants("overhead") || args.wants("warm") {
        Some(bare::Bare::prepare(&server, &work.join("bare"))?)
    } else {
        None
    };
    if let (true, Some(bare)) = (args.wants("overhead"), &bare) {
        eprintln!("kiln-bench: overhead");
        sections.push(overhead::run(&server, &times, bare, runs).await?);
    }
    if let (true, Some(bare)) = (args.wants("warm"), &bare) {
        eprintln!("kiln-bench: warm pool");
        sections.push(warm::run(&server, bare, runs).await?);
    }
    if args.wants("kernels") {
        eprintln!("kiln-bench: guest kernels");
        sections.push(kernels::run(&server, &times, &work.join("kernels"), runs).await?);
    }
    if args.wants("inputs") {
        eprintln!("kiln-bench: input scaling");
        let sizes = inputs::Sizes {
            many: many_inputs,
            big,
        };
        sections.push(inputs::run(&server, &times, &work.join("inputs"), &sizes, runs).await?);
    }
    if args.wants("ingestion") {
        eprintln!("kiln-bench: ingestion");
        let sizes = ingestion::Sizes {
            big,
            many: many_outputs,
        };
        let many_runs = runs.min(3);
        sections.push(ingestion::run(&work.join("ingestion"), &sizes, runs, many_runs).await?);
    }
    if args.wants("memory") {
        eprintln!("kiln-bench: memory");
        sections.push(memory::run(&server, &times, runs, heavy_mib).await?);
    }
    if args.wants("concurrency") {
        eprintln!("kiln-bench: concurrency");
        sections.push(concurrency::run(&server, runs, runs.min(3)).await?);
    }
    if args.wants("network") {
        eprintln!("kiln-bench: network");
        let why_not = server.network_unavailable.clone();
        sections.push(network::run(&server, &times, runs, why_not.as_deref()).await?);
    }
    let failures = server.failed_builds();
    server.stop().await?;

    let load = Load {
        before: load_before,
        after: machine::loadavg(),
        foreign_before,
        foreign_after: machine::foreign_vms(),
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let mut report = render(&facts, &load, &sections, args.quick);
    if !failures.is_empty() {
        let _ = writeln!(
            report,
            "\n## Builds that failed and were retried\n\n{} build(s) failed during the run and \
             were run again (their time is not in the figures, except in a concurrency \
             batch's wall time):\n",
            failures.len()
        );
        for f in &failures {
            let short: String = f.chars().take(600).collect();
            let _ = writeln!(report, "- {}", short.replace('\n', " "));
        }
    }
    println!("{report}");
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("kiln-bench: wrote {}", args.out.display());
    Ok(())
}

/// The machine table's guest kernel line: what the builds boot, and the
/// other kernel when the kernel section boots both.
fn kernel_line(artifacts: &kiln::guest_image::Artifacts, compared: bool) -> String {
    let describe = |a: &kiln::guest_image::Artifacts| {
        format!(
            "{}: {}",
            a.kernel_kind(),
            a.kernel_version().unwrap_or_else(|| "no VERSION".into())
        )
    };
    let mut line = describe(artifacts);
    if compared {
        let other = [
            kiln::guest_image::KernelChoice::Kiln,
            kiln::guest_image::KernelChoice::DebianCloud,
        ]
        .into_iter()
        .filter_map(|k| server::artifacts(Some(&k)).ok())
        .find(|a| a.kernel_dir != artifacts.kernel_dir);
        if let Some(other) = other {
            line.push_str(&format!(
                "; the guest kernel section also boots {}",
                describe(&other)
            ));
        }
    }
    line
}

/// What else the machine was doing.
struct Load {
    before: f64,
    after: f64,
    foreign_before: usize,
    foreign_after: usize,
    minutes: f64,
}

fn render(facts: &machine::Machine, load: &Load, sections: &[Section], quick: bool) -> String {
    let mut out = String::from("# kiln benchmarks\n\n");
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Written by `make bench` (`kiln-bench{}`) on {date}, in {:.1} minutes. Every figure is \
         min / median / max over the runs stated; ratios are taken within one run. Under TCG \
         absolute times are slow and noisy: read the ratios.\n",
        if quick { " --quick" } else { "" },
        load.minutes
    );
    out.push_str("## Machine\n\n");
    let mut t = stats::Table::new(&["", ""]);
    for (k, v) in &facts.lines {
        t.row(vec![k.to_string(), v.clone()]);
    }
    t.row(vec![
        "load".into(),
        format!(
            "1-min load average {:.2} at the start, {:.2} at the end; VMs of other processes \
             running: {} at the start, {} at the end{}",
            load.before,
            load.after,
            load.foreign_before,
            load.foreign_after,
            if load.before > 0.5 || load.foreign_before + load.foreign_after > 0 {
                " (**not idle**: other engineers' tests shared the 2 cores)"
            } else {
                ""
            }
        ),
    ]);
    out.push_str(&t.render());
    out.push_str("\n## Summary\n\n");
    let mut t = stats::Table::new(&["figure", "min / median / max", "target"]);
    for s in sections {
        for (what, value, met) in &s.summary {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "—",
            };
            t.row(vec![what.clone(), value.clone(), verdict.into()]);
        }
    }
    out.push_str(&t.render());
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(out, "\n## {}. {}\n\n{}", i + 1, s.title, s.body);
    }
    out
}
