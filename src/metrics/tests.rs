//! The exposition text of real metrics fed real executor events (names,
//! labels, `_total`, units, bucket counts), the scrape-time gauges of a
//! real embedded castore, and the listener over a loopback socket.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kiln_guest::contract::{Outcome, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::build::BuildTimer;
use super::gauges::{self, Sources};
use super::labels::{BuildScope, Tenant};
use super::Metrics;
use crate::executor::error::BuildError;
use crate::executor::events::{BuildObserver, Event, Phase, VmStarted};
use crate::executor::request::Layout;
use crate::executor::BuildOutcome;

fn report(setup_ms: u64, build_ms: u64) -> Report {
    Report {
        outcome: Outcome::Exited { code: 0 },
        boot_ms: 100,
        setup_ms,
        build_ms,
        waited_ms: None,
    }
}

fn started(warm: bool) -> Event {
    Event::Started(VmStarted {
        vmm: "qemu",
        accel: "tcg",
        guest_memory_bytes: 512 << 20,
        vcpus: 1,
        warm,
    })
}

/// Feeds one build's events to a timer, each `at` seconds after `t0`;
/// the agent's `report`, if any, just before ingest or the end.
fn run(
    metrics: &Arc<Metrics>,
    layout: &'static str,
    t0: Instant,
    events: &[(f64, Event)],
    mut report: Option<Report>,
) {
    let scope = BuildScope {
        tenant: Tenant::default(),
        layout,
    };
    let mut timer = BuildTimer::new(metrics.clone(), scope, t0);
    for (at, event) in events {
        let at = t0 + Duration::from_secs_f64(*at);
        if matches!(event, Event::Phase(Phase::Ingest)) || event.is_final() {
            if let Some(r) = report.take() {
                timer.report(&r, at);
            }
        }
        timer.event(event, at);
    }
}

fn succeeded(warm: bool) -> Vec<(f64, Event)> {
    let outcome = BuildOutcome {
        outputs: vec![],
        report: report(500, 2000),
        layout: Layout::Snix,
        wire_echo: None,
        cache_hit: None,
    };
    vec![
        (0.5, Event::Phase(Phase::Queued)),
        (1.5, started(warm)),
        (1.5, Event::Phase(Phase::Materialise)),
        (2.0, Event::Phase(Phase::Boot)),
        (5.0, Event::Phase(Phase::Build)),
        (8.0, Event::Phase(Phase::Ingest)),
        (8.25, Event::Completed(Arc::new(outcome))),
    ]
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

fn value(text: &str, series: &str) -> f64 {
    let l = line(text, &format!("{series} "));
    l.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {l:?}"))
}

#[test]
fn builds_become_counters_and_phase_histograms() {
    let metrics = Arc::new(Metrics::new());
    let t0 = Instant::now();
    // A cold and a warm build, each with the agent's report.
    run(
        &metrics,
        "snix",
        t0,
        &succeeded(false),
        Some(report(500, 2000)),
    );
    run(
        &metrics,
        "snix",
        t0,
        &succeeded(true),
        Some(report(250, 1000)),
    );
    // A failed build on the tvix layout whose builder exited 1.
    let failed = BuildError::BuilderExited {
        code: 1,
        log_tail: b"/nix/store/not-a-label".to_vec(),
    };
    run(
        &metrics,
        "tvix",
        t0,
        &[
            (0.0, Event::Phase(Phase::Queued)),
            (0.0, started(false)),
            (0.0, Event::Phase(Phase::Materialise)),
            (0.1, Event::Phase(Phase::Boot)),
            (1.0, Event::Phase(Phase::Build)),
            (4.0, Event::Failed(Arc::new(failed))),
        ],
        None,
    );
    // Refused before a VM: counted, no phase observed.
    run(
        &metrics,
        "snix",
        t0,
        &[(
            0.0,
            Event::Failed(Arc::new(BuildError::QueueFull("full".into()))),
        )],
        None,
    );

    let text = metrics.encode().expect("encode");
    // Counters end in _total, once per label set, with closed label values.
    assert!(text.contains("# TYPE kiln_builds_total counter"), "{text}");
    assert_eq!(
        value(
            &text,
            r#"kiln_builds_total{layout="snix",outcome="succeeded",kind="none"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            r#"kiln_builds_total{layout="tvix",outcome="failed",kind="builder_failed"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"kiln_builds_total{layout="snix",outcome="refused",kind="queue_full"}"#
        ),
        1.0
    );
    assert!(!text.contains("not-a-label"), "no log text in labels");
    assert!(
        !text.contains("tenant"),
        "no tenant label while there are none"
    );
    // Histograms in seconds, with _bucket, _sum and _count.
    for name in [
        "kiln_build_duration_seconds",
        "kiln_build_queue_wait_seconds",
        "kiln_build_materialise_seconds",
        "kiln_vm_boot_seconds",
        "kiln_agent_setup_seconds",
        "kiln_builder_run_seconds",
        "kiln_build_ingest_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name}:\n{text}"
        );
    }
    assert_eq!(value(&text, "kiln_build_queue_wait_seconds_count"), 3.0);
    assert_eq!(value(&text, "kiln_build_queue_wait_seconds_sum"), 2.0);
    assert_eq!(
        value(&text, r#"kiln_build_queue_wait_seconds_bucket{le="0.005"}"#),
        1.0
    );
    assert_eq!(
        value(&text, r#"kiln_build_queue_wait_seconds_bucket{le="+Inf"}"#),
        3.0
    );
    assert_eq!(value(&text, "kiln_build_materialise_seconds_count"), 3.0);
    // Boot less the agent's set-up, split cold and warm; the failed build
    // had no report, so neither its boot nor its set-up is known.
    assert_eq!(
        value(&text, r#"kiln_vm_boot_seconds_count{vm="cold"}"#),
        1.0
    );
    assert_eq!(value(&text, r#"kiln_vm_boot_seconds_sum{vm="cold"}"#), 2.5);
    assert_eq!(value(&text, r#"kiln_vm_boot_seconds_sum{vm="warm"}"#), 2.75);
    assert_eq!(value(&text, "kiln_agent_setup_seconds_count"), 2.0);
    // The builder ran: the agent's 2 s and 1 s, and the failed one's 3 s
    // until its end (no report reached the timer).
    assert_eq!(value(&text, "kiln_builder_run_seconds_count"), 3.0);
    assert_eq!(value(&text, "kiln_builder_run_seconds_sum"), 6.0);
    assert_eq!(value(&text, "kiln_build_ingest_seconds_count"), 2.0);
    assert_eq!(
        value(
            &text,
            r#"kiln_build_duration_seconds_count{layout="snix",outcome="succeeded"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn gauges_come_from_their_sources_and_unknown_ones_are_left_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = crate::castore::from_addr("", tmp.path())
        .await
        .expect("store");
    store
        .blobs
        .put(&mut &b"twelve bytes"[..])
        .await
        .expect("put");
    let metrics = Metrics::new();
    let sources = Sources {
        executor: Weak::new(),
        store,
        health: None,
    };
    let mut text = String::new();
    for _ in 0..200 {
        gauges::refresh(&metrics, &sources).await;
        text = metrics.encode().expect("encode");
        if text.contains("kiln_castore_blobs ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(value(&text, "kiln_castore_blobs"), 1.0);
    assert_eq!(value(&text, "kiln_castore_blob_bytes"), 12.0);
    assert_eq!(value(&text, "kiln_castore_directories"), 0.0);
    assert!(
        text.contains("# TYPE kiln_castore_blob_bytes gauge"),
        "{text}"
    );
    // No executor: its gauges are left out, not reported as zero.
    assert!(!text.contains("kiln_vms_running"), "{text}");
    assert!(!text.contains("kiln_guest_memory_budget_bytes "), "{text}");
}

/// Sends `request` raw and returns the whole answer.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn the_listener_serves_get_metrics_and_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = crate::castore::from_addr("", tmp.path())
        .await
        .expect("store");
    let listener = super::http::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let sources = Sources {
        executor: Weak::new(),
        store,
        health: None,
    };
    let server = tokio::spawn(super::http::serve(
        listener,
        Arc::new(Metrics::new()),
        sources,
        shutdown.clone(),
    ));
    let ok = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
    assert!(ok.contains("# TYPE kiln_castore_directories gauge"), "{ok}");
    let missing = exchange(
        addr,
        b"GET /other HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let garbage = exchange(addr, b"\x00\x01 not http at all\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    // Still serving after bad input; ends when told to.
    let again = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the listener ends at shutdown")
        .expect("join");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the socket is closed"
    );
}

#[test]
fn a_cache_hit_is_counted_as_a_hit_and_a_succeeded_build_without_phases() {
    let metrics = Arc::new(Metrics::new());
    let hit = crate::executor::events::CacheHit {
        build_id: "earlier".into(),
        built_at_unix: 0,
    };
    let outcome = BuildOutcome {
        outputs: vec![],
        report: report(500, 2000),
        layout: Layout::Snix,
        wire_echo: None,
        cache_hit: Some(hit.clone()),
    };
    run(
        &metrics,
        "snix",
        Instant::now(),
        &[
            (0.0, Event::CacheHit(hit)),
            (0.01, Event::Completed(Arc::new(outcome))),
        ],
        None,
    );
    let text = metrics.encode().expect("encode");
    assert!(
        text.contains("# TYPE kiln_result_cache_hits_total counter"),
        "{text}"
    );
    assert_eq!(value(&text, "kiln_result_cache_hits_total"), 1.0);
    assert_eq!(
        value(
            &text,
            r#"kiln_builds_total{layout="snix",outcome="succeeded",kind="none"}"#
        ),
        1.0
    );
    assert!(
        !text.contains("kiln_vm_boot_seconds_count"),
        "no VM, no boot observed:\n{text}"
    );
}
