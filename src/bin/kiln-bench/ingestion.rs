//! The ingestion section: ingesting outputs — one large file and many small files —
//! through `castore::ingest` (the code build outputs go through), against
//! `b3sum` hashing the same files on the same machine.
//!
//! Per run and shape: `b3sum` over the files, the `blake3` crate hashing
//! them in this process (the same hashing without process start), kiln's
//! copying ingest and kiln's moving ingest (what outputs use: file bytes
//! renamed into the store), each into a fresh embedded store on the same
//! filesystem. The source files stay in the page cache throughout, so every
//! contender reads from memory; the store's writes (and fsyncs) are kiln's
//! own cost. Throughput ratios are taken within a run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln::castore::ingest;

use crate::data;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// Sizes of the shapes (smaller with `--quick`).
pub struct Sizes {
    /// Bytes of the one large file.
    pub big: u64,
    /// Number of small files.
    pub many: usize,
}

/// The `b3sum` binary, from PATH or cargo's bin directory.
pub fn b3sum_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("b3sum"))
        .find(|p| p.is_file())
}

/// Files per b3sum invocation: 100 000 paths overflow the kernel's limit
/// on an argument list.
const B3SUM_BATCH: usize = 20_000;

fn b3sum(binary: &Path, root: &Path, files: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for batch in files.chunks(B3SUM_BATCH) {
        let status = Command::new(binary)
            .current_dir(root)
            .args(batch)
            .stdout(Stdio::null())
            .status()
            .context("running b3sum")?;
        if !status.success() {
            bail!("b3sum failed: {status}");
        }
    }
    Ok(started.elapsed())
}

/// Hashes every file with the `blake3` crate: memory-mapped and on the
/// rayon pool, as b3sum does.
fn crate_hash(root: &Path, files: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for f in files {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(root.join(f))?;
        std::hint::black_box(h.finalize());
    }
    Ok(started.elapsed())
}

async fn kiln_ingest(work: &Path, tree: &Path, moving: bool) -> anyhow::Result<Duration> {
    let store_dir = work.join("store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let store = kiln::castore::from_addr("", &store_dir).await?;
    let started = Instant::now();
    if moving {
        ingest::ingest_path_moving(&store, tree).await?;
    } else {
        ingest::ingest_path(&store, tree).await?;
    }
    let took = started.elapsed();
    drop(store);
    let _ = kiln::executor::workspace::remove_tree(&store_dir);
    Ok(took)
}

fn mib_s(bytes: u64) -> impl Fn(f64) -> f64 {
    move |ms| bytes as f64 / (1 << 20) as f64 / (ms / 1000.0)
}

struct Contender {
    label: &'static str,
    ms: Samples,
}

/// Runs the section with its data under `work`. `runs_for_many` may be
/// lower than `runs`: the many-files shape is the slow one.
pub async fn run(
    work: &Path,
    sizes: &Sizes,
    runs: usize,
    runs_for_many: usize,
) -> anyhow::Result<Section> {
    let b3 = b3sum_binary();
    std::fs::create_dir_all(work)?;
    let big_root = work.join("big");
    std::fs::create_dir_all(&big_root)?;
    data::big_file(&big_root.join("out.bin"), sizes.big, 11)?;
    let many_root = work.join("many");
    data::small_files(&many_root, sizes.many, 1000, 12)?;
    let gib = sizes.big as f64 / (1u64 << 30) as f64;
    // (label, tree, runs, whether to time the copying ingest too: it is
    // not what outputs use, and on many files it doubles a long section).
    let shapes = [
        (
            format!("1 file of {gib:.2} GiB"),
            big_root.join("out.bin"),
            runs,
            true,
        ),
        (
            format!("{} small files", sizes.many),
            many_root.clone(),
            runs_for_many,
            false,
        ),
    ];

    let mut table = Table::new(&["output", "contender", "ms", "MiB/s", "throughput vs b3sum"]);
    let mut summary = Vec::new();
    let mut per_file_note = None;
    for (label, tree, shape_runs, copying) in &shapes {
        let (root, files) = if tree.is_file() {
            (big_root.clone(), vec!["out.bin".to_string()])
        } else {
            (tree.clone(), data::file_list(tree)?)
        };
        let bytes = data::tree_bytes(tree)?;
        let mut contenders = [
            Contender {
                label: "b3sum",
                ms: Samples::new(),
            },
            Contender {
                label: "blake3 crate (mmap, rayon)",
                ms: Samples::new(),
            },
            Contender {
                label: "kiln ingest, copying",
                ms: Samples::new(),
            },
            Contender {
                label: "kiln ingest, moving (outputs)",
                ms: Samples::new(),
            },
        ];
        // Warm the page cache.
        crate_hash(&root, &files)?;
        for run in 0..*shape_runs {
            if let Some(b) = &b3 {
                contenders[0].ms.push_ms(b3sum(b, &root, &files)?);
            }
            contenders[1].ms.push_ms(crate_hash(&root, &files)?);
            if *copying {
                contenders[2]
                    .ms
                    .push_ms(kiln_ingest(work, tree, false).await?);
            }
            let clone = work.join("clone");
            let _ = kiln::executor::workspace::remove_tree(&clone);
            data::hardlink_clone(tree, &clone)?;
            contenders[3]
                .ms
                .push_ms(kiln_ingest(work, &clone, true).await?);
            let _ = kiln::executor::workspace::remove_tree(&clone);
            eprintln!("  ingestion ({label}) run {}/{shape_runs} done", run + 1);
        }
        let reference = if b3.is_some() { 0 } else { 1 };
        let to_mib_s = mib_s(bytes);
        for c in &contenders {
            if c.ms.len() == 0 {
                let why = if c.label == "b3sum" {
                    "not installed"
                } else {
                    "not timed"
                };
                table.row(vec![label.clone(), c.label.into(), why.into()]);
                continue;
            }
            // Throughput ratio = reference time / contender time, per run.
            let vs = ratios(&contenders[reference].ms, &c.ms);
            table.row(vec![
                label.clone(),
                c.label.into(),
                c.ms.ms(),
                c.ms.map(&to_mib_s).show(|v| format!("{v:.0}")),
                vs.ratio(),
            ]);
        }
        let moving = ratios(&contenders[reference].ms, &contenders[3].ms);
        if files.len() > 1 {
            let per_file = contenders[3].ms.map(&|ms| ms * 1000.0 / files.len() as f64);
            per_file_note = Some(format!(
                "Moving ingest of the {} small files costs {} µs per file (min / median / max).",
                files.len(),
                per_file.show(|v| format!("{v:.0}"))
            ));
        }
        summary.push((
            format!(
                "ingest {label} (moving) vs {} (≥ 0.8×)",
                contenders[reference].label
            ),
            moving.ratio(),
            Some(moving.median().is_some_and(|m| m >= 0.8)),
        ));
    }
    let _ = kiln::executor::workspace::remove_tree(work);

    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs for the large file, {runs_for_many} for the small files (copying ingest timed \
         on the large file only); min / median / max. \
         Throughput vs b3sum is b3sum's time divided by the contender's, per run (higher is \
         better; 1.0 = as fast as b3sum); b3sum gets the small files 20 000 per invocation. MiB/s are of file bytes.\n"
    );
    if b3.is_none() {
        body.push_str(
            "**b3sum is not installed**: the blake3 crate is the reference instead \
             (`cargo install b3sum --locked`).\n\n",
        );
    }
    body.push_str(&table.render());
    if let Some(note) = per_file_note {
        let _ = writeln!(body, "\n{note}");
    }
    Ok(Section {
        title: "Ingestion: outputs into the castore vs b3sum".into(),
        body,
        summary,
    })
}
