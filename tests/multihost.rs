//! Several hosts, for real: a three-node Garage cluster (replication 3) for
//! the blobs, PostgreSQL for directories, path infos, grants, results and
//! build records, two `kiln serve` hosts booting real VMs, and HAProxy in
//! front of them — everything on loopback, started here. README "Running
//! several hosts" describes the same setup.
//!
//! Host A reaches Garage through node 0, host B through node 1; node 2 is
//! the one stopped, so "a node down" never means "a host's own endpoint
//! down" (in production the S3 endpoint is itself balanced).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::garage::{self, Garage};
use harness::haproxy::{self, Backend, Haproxy};
use harness::postgres::{self, Postgres};
use harness::serve::{free_port, healthz, running, Serve, LIMIT};
use harness::LogBytes;
use kiln::castore::{B3Digest, Node, WireNode};
use kiln::client::Follow;
use kiln::proto::snix_build::build_service_client::BuildServiceClient;
use kiln::records::hosts::HOST_LOST;
use kiln::server::health::HOST_HEADER;
use tokio::io::AsyncReadExt;
use tonic::Code;

fn can_run() -> bool {
    harness::vm_tests_can_run()
        && harness::can_run(postgres::unavailable())
        && harness::can_run(garage::unavailable())
        && harness::can_run(haproxy::unavailable())
}

/// Everything of one multi-host setup.
struct Cluster {
    garage: Garage,
    pg: Postgres,
    hosts: Vec<Option<Serve>>,
    health_ports: Vec<u16>,
    lb: Haproxy,
}

impl Cluster {
    /// Garage, PostgreSQL, two hosts (with `extra` flags) and HAProxy; the
    /// toolset stored once, through the balancer.
    async fn start(extra: &[&str]) -> Cluster {
        let garage = Garage::start(3, 3).expect("Garage");
        let pg = Postgres::start().expect("PostgreSQL");
        let mut hosts = Vec::new();
        let mut health_ports = Vec::new();
        let mut backends = Vec::new();
        for (i, name) in ["host-a", "host-b"].into_iter().enumerate() {
            let health = free_port();
            let agent = free_port();
            let blobs = format!(
                "s3://{}/kiln?endpoint={}&region={}",
                garage::BUCKET,
                garage.endpoint(i),
                garage::REGION
            );
            let credentials = garage.credentials_file();
            let mut args = vec![
                "--database",
                pg.url().leak(),
                "--blob-store",
                blobs.leak(),
                "--blob-store-credentials",
                credentials.to_str().unwrap().to_owned().leak(),
                "--blob-cache-mib",
                "256",
                "--host-id",
                name,
                "--metrics-listen",
                format!("127.0.0.1:{health}").leak(),
                "--lb-agent-listen",
                format!("127.0.0.1:{agent}").leak(),
            ];
            args.extend_from_slice(extra);
            let serve = Serve::start(&args).await;
            let port: u16 = serve.addr.rsplit(':').next().unwrap().parse().unwrap();
            backends.push(Backend {
                name: name.to_owned(),
                port,
                health_port: health,
                agent_port: agent,
            });
            hosts.push(Some(serve));
            health_ports.push(health);
        }
        let lb = Haproxy::start(&backends).expect("HAProxy");
        let cluster = Cluster {
            garage,
            pg,
            hosts,
            health_ports,
            lb,
        };
        cluster.wait_until_both_up().await;
        // The toolset goes into the shared store through the balancer.
        let tmp = tempfile::tempdir().unwrap();
        let through_lb = kiln::castore::from_addr(
            &cluster.lb.addr().replace("http://", "grpc+http://"),
            tmp.path(),
        )
        .await
        .unwrap();
        let node = harness::server::ingest_busybox(&through_lb, tmp.path()).await;
        assert_eq!(node, cluster.host(0).busybox, "the toolset's node");
        cluster
    }

    fn host(&self, i: usize) -> &Serve {
        self.hosts[i].as_ref().expect("a running host")
    }

    fn any_host(&self) -> &Serve {
        self.hosts.iter().flatten().next().expect("a running host")
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if let Some(h) = h {
                text.push_str(&format!("--- host {i} ---\n{}\n", h.log()));
            }
        }
        text.push_str(&format!("--- haproxy ---\n{}\n", self.lb.log()));
        text
    }

    /// Waits (bounded) until HAProxy's checks have seen both hosts up.
    async fn wait_until_both_up(&self) {
        // Checks run every 300 ms with rise 1: two rounds are plenty once
        // both /healthz answer 200.
        for port in &self.health_ports {
            let deadline = Instant::now() + Duration::from_secs(30);
            while healthz(*port).0 != 200 {
                assert!(Instant::now() < deadline, "a host never became healthy");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
    }

    async fn lb_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.lb.addr())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// One build through the balancer: the host that ran it, and the
    /// output file's digest.
    async fn build_through_lb(&self, script: &str) -> Result<(String, B3Digest), tonic::Status> {
        // A new connection per build, as separate clients would have: HAProxy
        // balances streams, and each connection's first stream picks anew.
        let answer = BuildServiceClient::new(self.lb_channel().await)
            .do_build(self.any_host().request(script))
            .await?;
        let host = answer
            .metadata()
            .get(HOST_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let out = answer.into_inner().outputs.into_iter().next().unwrap();
        let digest = match out.output.unwrap().try_into_anonymous().unwrap() {
            Node::File { digest, .. } => digest,
            other => panic!("the output is not a file: {other:?}"),
        };
        Ok((host, digest))
    }
}

/// The bytes of blob `digest` read through the server at `addr`.
async fn read_blob(addr: &str, digest: &B3Digest) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let store = kiln::castore::from_addr(&addr.replace("http://", "grpc+http://"), tmp.path())
        .await
        .unwrap();
    let mut reader = store
        .blobs
        .open_read(digest)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{addr} does not have blob {digest}"))
        .reader;
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).await.unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_spread_over_both_hosts_and_everything_is_readable_everywhere() {
    if !can_run() {
        return;
    }
    let cluster = Cluster::start(&[]).await;

    // A dozen builds through the balancer, three at a time.
    let mut built = BTreeMap::new();
    for round in 0..4 {
        let builds = (0..3).map(|k| {
            let i = round * 3 + k;
            let cluster = &cluster;
            async move {
                let r = cluster
                    .build_through_lb(&format!("echo build {i} > $out"))
                    .await;
                (i, r)
            }
        });
        for (i, r) in futures::future::join_all(builds).await {
            let r = r.unwrap_or_else(|e| panic!("build {i}: {e}\n{}", cluster.logs()));
            built.insert(i, r);
        }
    }
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for (host, _) in built.values() {
        *per_host.entry(host.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_host.keys().copied().collect::<Vec<_>>(),
        ["host-a", "host-b"],
        "builds per host: {per_host:?}"
    );
    // Each output is readable through either host.
    for (i, (_, digest)) in &built {
        let want = format!("build {i}\n").into_bytes();
        for h in 0..2 {
            assert_eq!(
                read_blob(&cluster.host(h).addr, digest).await,
                want,
                "build {i}'s output through host {h}"
            );
        }
    }

    // A build running on A, watched through B, to its end.
    let a = cluster.host(0);
    let build = running(
        a.channel(None).await,
        a.request("echo first; sleep 2; echo second; echo x > $out"),
        b"first",
    )
    .await;
    let watched = Follow::watch(cluster.host(1).channel(None).await, build.build_id())
        .await
        .unwrap_or_else(|e| panic!("Watch through B: {e}\n{}", cluster.logs()));
    let mut log = LogBytes::default();
    let done = tokio::time::timeout(LIMIT, watched.to_end(&mut log))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("watching through B: {e}\n{}", cluster.logs()));
    assert!(done.completed.snix.is_some());
    assert!(String::from_utf8_lossy(&log.0).contains("second"));
    drop(build);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_gets_no_new_builds_from_the_balancer() {
    if !can_run() {
        return;
    }
    let cluster = Cluster::start(&["--max-vms", "1"]).await;
    let a = cluster.host(0);
    let busy = running(
        a.channel(None).await,
        a.request("echo busy; sleep 30; echo x > $out"),
        b"busy",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthz(cluster.health_ports[0]) != (200, "full\n".to_owned()) {
        assert!(Instant::now() < deadline, "host A never said it was full");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        // B (one slot too) has room again once its last build ended, and
        // HAProxy's next agent checks (every 300 ms) see both weights.
        let deadline = Instant::now() + Duration::from_secs(10);
        while healthz(cluster.health_ports[1]).1 != "serving\n" {
            assert!(Instant::now() < deadline, "host B stayed full");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (host, _) = cluster
            .build_through_lb(&format!("echo elsewhere {i} > $out"))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        assert_eq!(host, "host-b", "build {i} went to the full host");
    }
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_host_killed_database_restarted_store_unreachable() {
    if !can_run() {
        return;
    }
    let mut cluster = Cluster::start(&[]).await;
    let (_, before) = cluster
        .build_through_lb("echo before > $out")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // One Garage node of three down: builds and reads go on.
    cluster.garage.stop_node(2);
    let mut after_node = Vec::new();
    for i in 0..2 {
        let (_, d) = cluster
            .build_through_lb(&format!("echo node down {i} > $out"))
            .await
            .unwrap_or_else(|e| panic!("with a node down: {e}\n{}", cluster.logs()));
        after_node.push((i, d));
    }
    for (i, d) in &after_node {
        for h in 0..2 {
            assert_eq!(
                read_blob(&cluster.host(h).addr, d).await,
                format!("node down {i}\n").into_bytes()
            );
        }
    }

    // Host A killed mid-build: its build ends clearly, B goes on, nothing
    // is lost from the store.
    let a = cluster.host(0);
    let build = running(
        a.channel(None).await,
        a.request("echo started; sleep 600"),
        b"started",
    )
    .await;
    let id = build.build_id().to_owned();
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let lost = Follow::watch(cluster.lb_channel().await, &id)
        .await
        .unwrap_or_else(|e| panic!("Watch through the balancer: {e}\n{}", cluster.logs()));
    let end = tokio::time::timeout(LIMIT, lost.to_end(&mut ()))
        .await
        .unwrap()
        .expect_err("a killed host's build cannot succeed");
    assert_eq!(end.code(), Code::Unavailable, "{end}");
    assert_eq!(end.failed().map(|f| f.kind.as_str()), Some(HOST_LOST));
    drop(build);
    cluster.hosts[0].take();
    let (host, _) = cluster
        .build_through_lb("echo after the kill > $out")
        .await
        .unwrap_or_else(|e| panic!("after host A died: {e}\n{}", cluster.logs()));
    assert_eq!(host, "host-b");
    assert_eq!(
        read_blob(&cluster.host(1).addr, &before).await,
        b"before\n".to_vec()
    );

    // PostgreSQL restarted: kiln reconnects.
    cluster.pg.stop().unwrap();
    cluster.pg.start_again().unwrap();
    cluster
        .build_through_lb("echo after the restart > $out")
        .await
        .unwrap_or_else(|e| panic!("after PostgreSQL restarted: {e}\n{}", cluster.logs()));

    // The object store unreachable: a clear UNAVAILABLE naming it.
    for i in 0..3 {
        cluster.garage.stop_node(i);
    }
    let e = cluster
        .build_through_lb("echo no store > $out")
        .await
        .expect_err("no object store, no build");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(garage::BUCKET) && e.message().contains("127.0.0.1"),
        "the error does not name the store: {}",
        e.message()
    );
}
