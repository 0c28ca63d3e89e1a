//! The input scaling section: time to the builder's first instruction against the shape of
//! the inputs: busybox alone, plus one small file, 10 000 small files, or
//! one 1 GiB file.
//!
//! The builds go through `kiln.v1.BuildEvents.Submit`; "first instruction"
//! is the `build` phase event, which the executor emits when the agent
//! reports that it started the builder. Each run builds every shape once,
//! in rotating order; ratios to the one-file input are taken within a run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use kiln::castore::{ingest, Node};

use crate::data;
use crate::server::BenchServer;
use crate::spans::StepTimes;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// One input shape.
struct Shape {
    label: String,
    input: Option<(String, Node)>,
    ingest_ms: f64,
}

/// Sizes of the shapes (smaller with `--quick`).
pub struct Sizes {
    /// Files in the many-files input.
    pub many: usize,
    /// Bytes of the one-large-file input.
    pub big: u64,
}

async fn shape(
    server: &BenchServer,
    label: String,
    name: &str,
    path: &Path,
) -> anyhow::Result<Shape> {
    let started = Instant::now();
    let node = ingest::ingest_path(&server.store, path)
        .await
        .with_context(|| format!("ingesting {}", path.display()))?;
    let ingest_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = kiln::executor::workspace::remove_tree(path);
    Ok(Shape {
        label,
        input: Some((name.to_owned(), node)),
        ingest_ms,
    })
}

/// Runs the section with its data under `work`.
pub async fn run(
    server: &BenchServer,
    times: &StepTimes,
    work: &Path,
    sizes: &Sizes,
    runs: usize,
) -> anyhow::Result<Section> {
    std::fs::create_dir_all(work)?;
    let one = work.join("one");
    std::fs::write(&one, b"one small input file\n")?;
    let many = work.join("many");
    data::small_files(&many, sizes.many, 100, 7)?;
    let big = work.join("big");
    data::big_file(&big, sizes.big, 8)?;
    let gib = sizes.big as f64 / (1u64 << 30) as f64;
    let shapes = [
        Shape {
            label: "busybox only".into(),
            input: None,
            ingest_ms: 0.0,
        },
        shape(
            server,
            "+ 1 file".into(),
            "4bcdfghijklmnpqrsvwxyz0123456789-one",
            &one,
        )
        .await?,
        shape(
            server,
            format!("+ {} small files", sizes.many),
            "5bcdfghijklmnpqrsvwxyz0123456789-many",
            &many,
        )
        .await?,
        shape(
            server,
            format!("+ 1 file of {gib:.2} GiB"),
            "6bcdfghijklmnpqrsvwxyz0123456789-big",
            &big,
        )
        .await?,
    ];

    let n = shapes.len();
    let mut first = vec![Samples::new(); n];
    let mut materialise = vec![Samples::new(); n];
    let mut cleanup = vec![Samples::new(); n];
    let mut wall = vec![Samples::new(); n];
    for run in 0..runs {
        for slot in 0..n {
            let i = (run + slot) % n;
            let extra: Vec<_> = shapes[i].input.iter().cloned().collect();
            let req = server.trivial_request(&extra);
            let done = server.submit(req).await?;
            let to_build = done
                .phase("build")
                .context("the build reported no `build` phase")?;
            first[i].push_ms(to_build);
            wall[i].push_ms(done.wall);
            if let Some(steps) = times.take(&done.id).await {
                materialise[i].push(steps.get("materialise").copied().unwrap_or(0.0));
                cleanup[i].push(steps.get("cleanup").copied().unwrap_or(0.0));
            }
        }
        eprintln!("  input scaling run {}/{runs} done", run + 1);
    }

    let mut table = Table::new(&[
        "inputs",
        "to first instruction",
        "ratio to + 1 file",
        "materialise",
        "remove build dir",
        "whole build",
        "ingest beforehand (once)",
    ]);
    for (i, s) in shapes.iter().enumerate() {
        table.row(vec![
            s.label.clone(),
            first[i].ms(),
            ratios(&first[i], &first[1]).ratio(),
            materialise[i].ms(),
            cleanup[i].ms(),
            wall[i].ms(),
            if s.input.is_some() {
                format!("{:.0}", s.ingest_ms)
            } else {
                "—".into()
            },
        ]);
    }
    let big_ratio = ratios(&first[n - 1], &first[1]);
    let many_ratio = ratios(&first[2], &first[1]);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs; ms, min / median / max. \"To first instruction\" is the time from sending \
         `Submit` to the `build` phase event (the agent has exec'd the builder). Inputs are \
         in the castore beforehand; materialising hardlinks file bytes from the blob store.\n"
    );
    body.push_str(&table.render());
    let flat = |r: &Samples| r.median().is_some_and(|m| m <= 1.10);
    Ok(Section {
        title: "Input scaling: time to the builder's first instruction".into(),
        body,
        summary: vec![
            (
                "first instruction, 1 GiB input / 1 file (flat ≈ 1.0)".to_string(),
                big_ratio.ratio(),
                Some(flat(&big_ratio)),
            ),
            (
                format!(
                    "first instruction, {} files / 1 file (flat ≈ 1.0)",
                    sizes.many
                ),
                many_ratio.ratio(),
                Some(flat(&many_ratio)),
            ),
        ],
    })
}
