//! The overhead section: a cold trivial build through kiln (no warm pool)
//! against a bare boot of the same kernel and initramfs by the same VMM,
//! and where kiln's extra time goes.
//!
//! Each run does one kiln build (`DoBuild` of `true`), one bare boot and,
//! when the kernel has modules to load, one bare boot that also loads
//! them, in an order that rotates from run to run; ratios are taken within
//! a run.

use std::fmt::Write as _;

use crate::bare::Bare;
use crate::server::BenchServer;
use crate::spans::{StepTimes, Steps};
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// The executor's steps, in order, with the label the report gives them.
const STEPS: &[(&str, &str)] = &[
    ("admit", "admission (VM slot and memory)"),
    ("materialise", "materialise inputs"),
    ("virtiofsd", "virtiofsd up (2 daemons)"),
    ("initramfs", "initramfs (base + job, not fsynced)"),
    ("vmm_start", "VMM up (spawn to channel connected)"),
    ("guest_boot", "guest boot (kernel to agent start)"),
    ("agent_setup", "agent set-up (modules, shares, sandbox)"),
    ("builder", "builder (`true`)"),
    (
        "poweroff",
        "rest of the VM's life (both: QEMU loads the kernel; kiln: the builder's start and clean-up, the VM killed after the report; bare: power-off, exit)",
    ),
    ("teardown", "teardown (kill VMM, stop virtiofsd)"),
    ("ingest", "ingest outputs"),
    ("cleanup", "remove build directory"),
    ("other", "other executor work (plan, events, workspace)"),
    ("grpc", "gRPC, validation, response (client wall − build)"),
];

/// The target of kiln / bare, end to end.
const TARGET: f64 = 1.05;

/// The figures of one kiln build derived from its spans and wall time.
fn derive(steps: &Steps, wall_ms: f64) -> Steps {
    let get = |k: &str| steps.get(k).copied().unwrap_or(0.0);
    let mut d = steps.clone();
    let in_vm = get("guest_boot") + get("agent_setup") + get("builder");
    d.insert("poweroff".into(), (get("supervise") - in_vm).max(0.0));
    let accounted: f64 = [
        "admit",
        "materialise",
        "virtiofsd",
        "initramfs",
        "vmm_start",
        "supervise",
        "teardown",
        "ingest",
        "cleanup",
    ]
    .iter()
    .map(|k| get(k))
    .sum();
    d.insert("other".into(), (get("build") - accounted).max(0.0));
    d.insert("grpc".into(), (wall_ms - get("build")).max(0.0));
    d
}

/// Runs the section.
pub async fn run(
    server: &BenchServer,
    times: &StepTimes,
    bare: &Bare,
    runs: usize,
) -> anyhow::Result<Section> {
    let req = server.trivial_request(&[]);
    let memory_mib = server.warm_up().await?;
    bare.boot(server, false, memory_mib, 0).await?;

    let mut kiln = Samples::new();
    let mut plain = Samples::new();
    let mut plain_mark = Samples::new();
    let mut modules = Samples::new();
    let mut steps: Vec<(String, Samples)> = Vec::new();
    let mut bare_up = Samples::new();
    let mut bare_boot = Samples::new();
    let mut bare_mod_ms = Samples::new();
    let mut bare_off = Samples::new();
    // With no modules to load, a bare boot "with modules" is the plain one.
    let slots = if bare.module_count() > 0 { 3 } else { 2 };
    for run in 0..runs {
        for slot in 0..slots {
            match (run + slot) % slots {
                0 => {
                    let done = server.do_build(req.clone()).await?;
                    let wall = done.wall.as_secs_f64() * 1000.0;
                    kiln.push(wall);
                    let s = times.take(&done.id).await.unwrap_or_default();
                    for (k, v) in derive(&s, wall) {
                        match steps.iter_mut().find(|(n, _)| *n == k) {
                            Some((_, samples)) => samples.push(v),
                            None => {
                                let mut samples = Samples::new();
                                samples.push(v);
                                steps.push((k, samples));
                            }
                        }
                    }
                }
                1 => {
                    let b = bare.boot(server, false, memory_mib, run + 1).await?;
                    plain.push_ms(b.wall);
                    plain_mark.push_ms(b.to_mark);
                    bare_up.push_ms(b.vmm_up);
                    bare_boot.push(b.guest_boot_ms);
                    let wall = b.wall.as_secs_f64() * 1000.0;
                    let up = b.vmm_up.as_secs_f64() * 1000.0;
                    bare_off.push((wall - up - b.guest_boot_ms - b.modules_ms).max(0.0));
                }
                _ => {
                    let b = bare.boot(server, true, memory_mib, run + 1).await?;
                    modules.push_ms(b.wall);
                    bare_mod_ms.push(b.modules_ms);
                }
            }
        }
        eprintln!("  overhead run {}/{runs} done", run + 1);
    }

    let ratio = ratios(&kiln, &plain);
    let mut totals = Table::new(&["what (ms unless noted)", "min / median / max"]);
    totals.row(vec![
        "kiln: DoBuild of `true`, cold, end to end".into(),
        kiln.ms(),
    ]);
    totals.row(vec![
        "bare: same kernel + initramfs, init powers off at once".into(),
        plain.ms(),
    ]);
    let count = bare.module_count();
    if count > 0 {
        totals.row(vec![
            format!("bare + the agent's {count} modules loaded"),
            modules.ms(),
        ]);
    }
    totals.row(vec![
        "bare: the same boots, VMM spawned to init's mark (no power-off)".into(),
        plain_mark.ms(),
    ]);
    totals.row(vec![
        format!("**ratio kiln / bare** (target ≤ {TARGET:.2})"),
        ratio.ratio(),
    ]);
    totals.row(vec![
        "ratio kiln / bare to its mark (kiln kills its VM after the report, the bare VM \
         powers off: this one leaves power-off out of both)"
            .into(),
        ratios(&kiln, &plain_mark).ratio(),
    ]);
    if count > 0 {
        totals.row(vec![
            "ratio kiln / bare + modules".into(),
            ratios(&kiln, &modules).ratio(),
        ]);
    }

    let mut breakdown = Table::new(&["step", "kiln", "bare"]);
    let get = |name: &str| steps.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    for (key, label) in STEPS {
        let kiln_cell = get(key).map_or_else(|| "n/a".into(), Samples::ms);
        let bare_cell = match *key {
            "vmm_start" => bare_up.ms(),
            "guest_boot" => bare_boot.ms(),
            "agent_setup" if count > 0 => {
                format!("{} (modules only, bare + modules)", bare_mod_ms.ms())
            }
            "agent_setup" => "— (no modules: built into the kernel)".into(),
            "poweroff" => bare_off.ms(),
            _ => "—".into(),
        };
        breakdown.row(vec![label.to_string(), kiln_cell, bare_cell]);
    }
    breakdown.row(vec!["**total**".into(), kiln.ms(), plain.ms()]);

    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs; each run boots kiln (no warm pool), bare{} once, in rotating order. \
         Same kernel, base initramfs, {memory_mib} MiB guest RAM and 1 vCPU for all; the bare \
         init is a busybox script given by `rdinit=` (no virtiofs, no job, no sandbox).\n",
        if count > 0 { " and bare + modules" } else { "" },
    );
    body.push_str(&totals.render());
    let _ = writeln!(
        body,
        "\nWhere the time goes (min / median / max ms; kiln's steps are the executor's tracing \
         spans, the guest figures come from the agent's report; bare figures from the VMM \
         start and the guest's /proc/uptime):\n"
    );
    body.push_str(&breakdown.render());
    Ok(Section {
        title: "Overhead: cold trivial build vs bare VM boot".into(),
        body,
        summary: vec![(
            format!("cold trivial build end to end / bare VM boot (≤ {TARGET:.2})"),
            ratio.ratio(),
            Some(ratio.median().is_some_and(|m| m <= TARGET)),
        )],
    })
}
