//! Build records shared through PostgreSQL (`kiln serve --database`): two
//! real `kiln serve` hosts on one real PostgreSQL, real VMs. A build
//! running on host A is watched through host B, live and to its end; host
//! A killed mid-build ends its build, as seen through B, with UNAVAILABLE
//! `host_lost`; `/healthz` and the response header name each host.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;

use std::time::{Duration, Instant};

use harness::postgres::{self, Postgres};
use harness::serve::{free_port, healthz, running, Serve, LIMIT};
use harness::LogBytes;
use kiln::client::Follow;
use kiln::records::hosts::{HEARTBEAT, HOST_LOST, LEASE};
use tonic::Code;

/// PostgreSQL and VMs both, or the reason this host cannot run them.
fn can_run() -> bool {
    harness::vm_tests_can_run() && harness::can_run(postgres::unavailable())
}

/// A host on `pg`. Its directories are in PostgreSQL and its blobs its
/// own (no shared blob store here: tests/multihost.rs has one), so the
/// toolset is stored through it, which puts both where it reads them.
async fn host(pg: &Postgres, name: &str, metrics_port: u16) -> Serve {
    let serve = Serve::start(&[
        "--database",
        &pg.url(),
        "--host-id",
        name,
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let through =
        kiln::castore::from_addr(&serve.addr.replace("http://", "grpc+http://"), tmp.path())
            .await
            .unwrap();
    let node = harness::server::ingest_busybox(&through, tmp.path()).await;
    assert_eq!(node, serve.busybox);
    serve
}

/// PostgreSQL and two hosts on it, `host-a` and `host-b`, with their
/// metrics ports.
async fn two_hosts() -> (Postgres, Serve, Serve, u16, u16) {
    let pg = Postgres::start().expect("PostgreSQL");
    let (ma, mb) = (free_port(), free_port());
    let a = host(&pg, "host-a", ma).await;
    let b = host(&pg, "host-b", mb).await;
    (pg, a, b, ma, mb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_on_one_host_is_watched_live_through_the_other() {
    if !can_run() {
        return;
    }
    let (_pg, a, b, ma, _) = two_hosts().await;
    assert_eq!(healthz(ma), (200, "serving\n".to_owned()));

    let build = running(
        a.channel(None).await,
        a.request("echo first; sleep 3; echo second; echo out > $out"),
        b"first",
    )
    .await;
    let id = build.build_id().to_owned();
    // Listed through B, with the host running it.
    let listed = b.cli(&["builds"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.ends_with("host-a")),
        "kiln builds through B:\n{listed}"
    );
    // Watched through B while it runs on A: the whole log, then the end.
    let watched = Follow::watch(b.channel(None).await, &id)
        .await
        .unwrap_or_else(|e| panic!("Watch through host B: {e}\n{}", b.log()));
    let mut log = LogBytes::default();
    let done = tokio::time::timeout(LIMIT, watched.to_end(&mut log))
        .await
        .expect("the watch ended")
        .unwrap_or_else(|e| panic!("watching through B: {e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
    assert!(done.completed.snix.is_some(), "{done:?}");
    let text = String::from_utf8_lossy(&log.0);
    assert!(
        text.contains("first") && text.contains("second"),
        "the log through B: {text:?}"
    );
    // The build's own stream on A ends the same way.
    let own = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("A's stream ended")
        .expect("A's build succeeded");
    assert_eq!(own.build_id, id);

    // Every answer names the host that gave it.
    let answer = kiln::proto::snix_build::build_service_client::BuildServiceClient::new(
        b.channel(None).await,
    )
    .do_build(b.request("echo b > $out"))
    .await
    .unwrap_or_else(|e| panic!("a build on B: {e}\n{}", b.log()));
    assert_eq!(
        answer
            .metadata()
            .get(kiln::server::health::HOST_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("host-b")
    );

    // An unknown id is unknown on every host.
    let unknown = Follow::watch(b.channel(None).await, "no-such-build")
        .await
        .err()
        .map(|e| e.code());
    assert_eq!(unknown, Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_s_build_ends_as_host_lost_through_the_other() {
    if !can_run() {
        return;
    }
    let (_pg, a, b, _, _) = two_hosts().await;
    let build = running(
        a.channel(None).await,
        a.request("echo started; sleep 600"),
        b"started",
    )
    .await;
    let id = build.build_id().to_owned();
    let watched = Follow::watch(b.channel(None).await, &id)
        .await
        .expect("Watch through host B");
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    let end = tokio::time::timeout(LIMIT, watched.to_end(&mut ()))
        .await
        .expect("the watch ended");
    let e = end.expect_err("the build of a killed host cannot succeed");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    let failed = e.failed().expect("a Failed event").clone();
    assert_eq!(failed.kind, HOST_LOST, "{failed:?}");
    assert!(failed.message.contains("host-a"), "{failed:?}");
    // Ended by B's reaper once A's lease ran out, not long after.
    let took = killed.elapsed();
    assert!(
        took < LEASE + HEARTBEAT * 3 + Duration::from_secs(5),
        "ended {took:?} after the kill"
    );
    // B goes on serving builds.
    let done = tokio::time::timeout(
        LIMIT,
        kiln::client::submit_and_follow(
            b.channel(None).await,
            kiln::proto::kiln_v1::SubmitRequest {
                request: Some(kiln::proto::kiln_v1::submit_request::Request::Snix(
                    b.request("echo fine > $out"),
                )),
                ..Default::default()
            },
            &mut (),
        ),
    )
    .await
    .expect("B's build ended")
    .unwrap_or_else(|e| panic!("host B after A died: {e}\n{}", b.log()));
    assert!(done.completed.snix.is_some());
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_cancelled_through_the_other_host() {
    if !can_run() {
        return;
    }
    let (_pg, a, b, _, _) = two_hosts().await;
    let build = running(
        a.channel(None).await,
        a.request("echo started; sleep 600"),
        b"started",
    )
    .await;
    let id = build.build_id().to_owned();
    let out = b.cli(&["cancel", &id]);
    assert!(
        out.status.success(),
        "kiln cancel through B: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .expect_err("a cancelled build does not succeed");
    assert_eq!(e.code(), Code::Cancelled, "{e}");
    assert_eq!(
        e.failed().map(|f| f.kind.as_str()),
        Some("cancelled_by_operator")
    );
    a.nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_longer_than_the_lease_ends_no_live_build() {
    if !can_run() {
        return;
    }
    let (pg, a, b, _, _) = two_hosts().await;
    let build = running(
        a.channel(None).await,
        a.request("echo started; sleep 30; echo done > $out"),
        b"started",
    )
    .await;
    let id = build.build_id().to_owned();
    // Away for longer than a lease: every host's heartbeat ages past it.
    pg.stop().unwrap();
    tokio::time::sleep(LEASE + HEARTBEAT * 2).await;
    pg.start_again().unwrap();
    let own = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .unwrap_or_else(|e| panic!("the build did not survive the outage: {e}\n{}", a.log()));
    assert!(own.completed.snix.is_some());
    // Its record ends the same way, seen through B: not host_lost.
    let watched = Follow::watch(b.channel(None).await, &id)
        .await
        .expect("Watch through B");
    let seen = tokio::time::timeout(LIMIT, watched.to_end(&mut ()))
        .await
        .expect("the watch ended")
        .unwrap_or_else(|e| panic!("through B: {e}\n{}", b.log()));
    assert_eq!(seen.build_id, id);
}
