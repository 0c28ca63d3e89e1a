//! kiln's metrics as a real Prometheus server sees them: a kiln server
//! (real VMs, QEMU/TCG here) serves its metrics on a loopback port, Debian's
//! `prometheus` scrapes it every second, two real builds run (one succeeds
//! on `snix.build.v1`, one fails on the seed's `tvix.build.v1`), and
//! Prometheus's HTTP API must show exactly those builds: the counter by
//! layout, outcome and kind, a count of one per build in each phase
//! histogram it went through, and the gauges.
//!
//! Prometheus is given only loopback addresses: its one scrape target,
//! its own listener; no alerting, remote write or service discovery.

#![allow(clippy::unwrap_used)]

mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::proto::tvix_build;
use serde_json::Value;

use harness::{Options, BUSYBOX};

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
/// How long Prometheus may take to start and to scrape what happened.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(90);

/// Why this host cannot run Prometheus, if it cannot.
fn prometheus_unavailable() -> Option<String> {
    match Command::new("prometheus").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "prometheus --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!(
            "the prometheus binary is not installed (make apt installs Debian's prometheus): {e}"
        )),
    }
}

/// A Prometheus server on loopback, killed and its data removed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`/metrics`) every second.
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: kiln\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = free_loopback_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, addr, dir }
    }

    /// What Prometheus logged, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until Prometheus answers and has scraped kiln once.
    fn until_scraping(&mut self) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Some(up) = self.try_query("up{job=\"kiln\"}") {
                if scalar(&up) == Some(1.0) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape kiln within {PROMETHEUS_WAIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs an instant query; `None` while Prometheus does not answer.
    fn try_query(&self, promql: &str) -> Option<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let body = http_get(self.addr, &path)?;
        let answer: Value = serde_json::from_str(&body).ok()?;
        if answer["status"] != "success" {
            panic!("query {promql:?} failed: {answer}");
        }
        answer["data"]["result"].as_array().cloned()
    }

    fn query(&self, promql: &str) -> Vec<Value> {
        self.try_query(promql)
            .unwrap_or_else(|| panic!("prometheus did not answer {promql:?}:\n{}", self.log()))
    }

    /// The single value `promql` evaluates to (it must be one series).
    fn value(&self, promql: &str) -> f64 {
        let result = self.query(promql);
        scalar(&result).unwrap_or_else(|| panic!("{promql:?} is not one series: {result:?}"))
    }

    /// Polls (bounded) until `promql` evaluates to `expected`.
    fn until_value(&self, promql: &str, expected: f64) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let result = self.query(promql);
            if scalar(&result) == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql:?} never became {expected} within {PROMETHEUS_WAIT:?} (now {result:?})"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a one-series instant vector.
fn scalar(result: &[Value]) -> Option<f64> {
    match result {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// A loopback port free right now.
fn free_loopback_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A GET over HTTP/1.0 (so the answer is not chunked and the connection
/// closes): the body of a 200, `None` if nobody answers yet.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?;
    match status {
        "200" => Some(body.to_owned()),
        // Still starting (its storage not ready yet).
        "503" => None,
        _ => panic!("GET {path}: {head}\n{body}"),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn failing_tvix_request(busybox: kiln::proto::tvix_castore::Node) -> tvix_build::BuildRequest {
    tvix_build::BuildRequest {
        command_args: vec![
            format!("/nix/store/{BUSYBOX}/bin/sh"),
            "-c".into(),
            "echo failing on purpose; exit 1".into(),
        ],
        outputs: vec!["1-a".into()],
        environment_vars: vec![tvix_build::build_request::EnvVar {
            key: "a".into(),
            value: b"/nix/store/1-a".to_vec().into(),
        }],
        inputs: vec![busybox],
        constraints: Some(tvix_build::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            min_memory: 0,
            available_ro_paths: vec![],
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_builds_that_ran() {
    if !harness::can_run(prometheus_unavailable()) {
        return;
    }
    let Some(server) = harness::start(Options {
        metrics: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let target = server.metrics_addr.unwrap();
    let prometheus = tokio::task::block_in_place(|| {
        let mut p = Prometheus::start(target);
        p.until_scraping();
        p
    });
    // Before any build: the server's gauges are there, no build counted.
    let p = &prometheus;
    tokio::task::block_in_place(|| {
        assert_eq!(p.value("kiln_vms_max"), 2.0);
        assert_eq!(
            p.value("kiln_guest_memory_budget_bytes"),
            (8192u64 << 20) as f64
        );
        assert!(p.query("kiln_builds_total").is_empty());
    });

    let ok = server.snix_request("echo built > $out", &[OUT]);
    server.snix().await.do_build(ok).await.unwrap();
    let failed = server
        .tvix()
        .await
        .do_build(failing_tvix_request(server.busybox_node()))
        .await
        .expect_err("the builder exits 1");
    assert!(failed.message().contains("status 1"), "{failed:?}");
    let warm = server.pool_stats().map_or(0, |s| s.assigned) as f64;

    tokio::task::block_in_place(|| {
        // The scrape after the builds has landed once both are counted; a
        // build's histograms are observed before it is counted.
        p.until_value("sum(kiln_builds_total)", 2.0);
        assert_eq!(
            p.value(r#"kiln_builds_total{layout="snix",outcome="succeeded",kind="none"}"#),
            1.0
        );
        assert_eq!(
            p.value(r#"kiln_builds_total{layout="tvix",outcome="failed",kind="builder_failed"}"#),
            1.0
        );
        assert_eq!(p.query("kiln_builds_total").len(), 2, "no other series");

        // Every phase both builds went through, once per build; ingest only
        // for the one that succeeded.
        for (histogram, builds) in [
            ("kiln_build_duration_seconds", 2.0),
            ("kiln_build_queue_wait_seconds", 2.0),
            ("kiln_build_materialise_seconds", 2.0),
            ("kiln_vm_boot_seconds", 2.0),
            ("kiln_agent_setup_seconds", 2.0),
            ("kiln_builder_run_seconds", 2.0),
            ("kiln_build_ingest_seconds", 1.0),
        ] {
            assert_eq!(
                p.value(&format!("sum({histogram}_count)")),
                builds,
                "{histogram}"
            );
            assert_eq!(
                p.value(&format!(r#"sum({histogram}_bucket{{le="+Inf"}})"#)),
                builds,
                "{histogram}"
            );
            // 18 bounds and +Inf per series, cumulative.
            let buckets = p.query(&format!("{histogram}_bucket"));
            assert_eq!(buckets.len() % 19, 0, "{histogram}: {buckets:?}");
            assert!(p.value(&format!("sum({histogram}_sum)")) >= 0.0);
        }
        assert_eq!(
            p.value(r#"kiln_build_duration_seconds_count{layout="tvix",outcome="failed"}"#),
            1.0
        );
        // Split by VM: the pool says how many builds got a warm VM.
        assert_eq!(
            p.query(r#"kiln_vm_boot_seconds_count{vm="warm"}"#)
                .first()
                .map_or(0.0, |s| s["value"][1].as_str().unwrap().parse().unwrap()),
            warm
        );
        assert_eq!(
            p.query(r#"kiln_vm_boot_seconds_count{vm="cold"}"#)
                .first()
                .map_or(0.0, |s| s["value"][1].as_str().unwrap().parse().unwrap()),
            2.0 - warm
        );
        // Real durations, not zeros: every build booted a VM (a warm one
        // long before it) and ran its builder, and its whole duration holds
        // its builder run, so it is at least that.
        let boot = p.value(r#"sum(kiln_vm_boot_seconds_sum)"#);
        let builder = p.value(r#"sum(kiln_builder_run_seconds_sum)"#);
        assert!(
            boot > 0.0 && builder > 0.0,
            "boot {boot} s, builder {builder} s"
        );
        let total = p.value(r#"sum(kiln_build_duration_seconds_sum)"#);
        assert!(
            total >= builder && total > 0.05,
            "builds took {total} s in all, their builders {builder} s"
        );

        // The gauges: nothing queued; the castore holds busybox and the output.
        assert_eq!(p.value("kiln_builds_queued"), 0.0);
        assert!(p.value("kiln_vms_running") <= 2.0);
        assert!(p.value("kiln_guest_memory_in_use_bytes") <= (8192u64 << 20) as f64);
        assert!(p.value("kiln_warm_vms_waiting") <= 1.0);
        assert!(p.value("kiln_warm_vms_booting") <= 1.0);
        assert!(p.value("kiln_castore_blobs") >= 2.0);
        assert!(p.value("kiln_castore_blob_bytes") > 0.0);
        assert!(p.value("kiln_castore_directories") >= 2.0);
    });
    // The guard kills Prometheus and removes its data (also on a panic above).
    drop(prometheus);
    server.stop().await;
}
