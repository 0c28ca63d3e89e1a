//! Load: 50 concurrent DoBuild calls against 2 VMs and a queue of 6. Every
//! call completes or is refused with RESOURCE_EXHAUSTED at once; none is lost
//! or fails otherwise; kiln's memory stays bounded; nothing leaks. Prints
//! throughput and queueing.

#![allow(clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use tonic::Code;

use harness::Options;

const CALLS: usize = 50;

#[tokio::test(flavor = "multi_thread")]
async fn fifty_calls_against_two_vms() {
    let opts = Options {
        max_vms: 2,
        max_queue: 6,
        ..Options::default()
    };
    let Some(server) = harness::start(opts).await else {
        return;
    };
    let before = harness::rss_kib();
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let req = server.snix_request(
            &format!("echo {i} > $out"),
            &["nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out"],
        );
        let mut client = server.snix().await;
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.do_build(req).await;
            (i, r, t.elapsed())
        }));
    }
    let (mut done, mut refused) = (Vec::new(), Vec::new());
    for call in calls {
        let (i, result, took) = call.await.unwrap();
        match result {
            Ok(resp) => {
                let out = resp.into_inner().outputs[0].output.clone().unwrap();
                assert_eq!(
                    server.read_file_entry(&out).await,
                    format!("{i}\n").into_bytes(),
                    "call {i}"
                );
                done.push(took);
            }
            Err(status) if status.code() == Code::ResourceExhausted => refused.push(took),
            Err(status) => panic!("call {i} failed otherwise: {status:?}"),
        }
    }
    let wall = started.elapsed();
    assert_eq!(done.len() + refused.len(), CALLS, "no call is lost");
    // At least the VM slots and the queue are served.
    assert!(done.len() >= 2 + 6, "{} completed", done.len());
    assert!(
        refused.iter().all(|t| *t < Duration::from_secs(5)),
        "refusals are immediate: {refused:?}"
    );
    done.sort();
    let grown = harness::rss_kib().saturating_sub(before);
    println!(
        "load: {CALLS} calls in {:.1} s: {} completed ({:.2} builds/s), {} refused; latency of completed builds min {:.1} s, median {:.1} s, max {:.1} s; kiln RSS +{} KiB",
        wall.as_secs_f64(),
        done.len(),
        done.len() as f64 / wall.as_secs_f64(),
        refused.len(),
        done[0].as_secs_f64(),
        done[done.len() / 2].as_secs_f64(),
        done[done.len() - 1].as_secs_f64(),
        grown
    );
    assert!(grown < 128 * 1024, "kiln grew by {grown} KiB under load");
    server.stop().await;
}
