//! The network section: what network costs a build. The same trivial build, once
//! without network and once with `network_access` (a NAT helper, the
//! egress table, `eth0` configured by the agent), in alternating order; the
//! helper's start is the executor's `network` span, the guest's share is in
//! the agent's set-up. No address is contacted: the builder is `true`.

use std::fmt::Write as _;

use crate::server::BenchServer;
use crate::spans::StepTimes;
use crate::stats::{ratios, Samples, Table};
use crate::Section;

/// Runs the section; `why_not` says why it cannot (no network on this host).
pub async fn run(
    server: &BenchServer,
    times: &StepTimes,
    runs: usize,
    why_not: Option<&str>,
) -> anyhow::Result<Section> {
    let title = "Network: a build with network vs without".to_owned();
    if let Some(why) = why_not {
        return Ok(Section::skipped(&title, why));
    }
    let offline = server.trivial_request(&[]);
    let mut online = offline.clone();
    if let Some(c) = online.constraints.as_mut() {
        c.network_access = true;
    }
    // Warm-up: the base image and the helper binary in the page cache.
    server.do_build(online.clone()).await?;

    let mut without = Samples::new();
    let mut with = Samples::new();
    let mut helper = Samples::new();
    let mut setup_without = Samples::new();
    let mut setup_with = Samples::new();
    for run in 0..runs {
        for slot in 0..2 {
            let networked = (run + slot) % 2 == 1;
            let req = if networked { &online } else { &offline };
            let done = server.do_build(req.clone()).await?;
            let steps = times.take(&done.id).await.unwrap_or_default();
            let setup = steps.get("agent_setup").copied().unwrap_or(0.0);
            if networked {
                with.push_ms(done.wall);
                helper.push(steps.get("network").copied().unwrap_or(0.0));
                setup_with.push(setup);
            } else {
                without.push_ms(done.wall);
                setup_without.push(setup);
            }
        }
        eprintln!("  network run {}/{runs} done", run + 1);
    }
    let ratio = ratios(&with, &without);
    let mut table = Table::new(&["what (ms unless noted)", "min / median / max"]);
    table.row(vec![
        "`true` without network, end to end".into(),
        without.ms(),
    ]);
    table.row(vec!["`true` with network, end to end".into(), with.ms()]);
    table.row(vec!["ratio with / without".into(), ratio.ratio()]);
    table.row(vec![
        "NAT helper up (executor span `network`)".into(),
        helper.ms(),
    ]);
    table.row(vec![
        "agent set-up without network".into(),
        setup_without.ms(),
    ]);
    table.row(vec![
        "agent set-up with network (virtio_net loaded, eth0 up)".into(),
        setup_with.ms(),
    ]);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "{runs} runs of each, alternating; the builder is `true`, so nothing is contacted. \
         With network the VM also gets a virtio-net device, its NAT helper (passt) and the \
         egress table's policing.\n"
    );
    body.push_str(&table.render());
    Ok(Section {
        title,
        body,
        summary: vec![("network cost, with / without".into(), ratio.ratio(), None)],
    })
}
