//! kiln itself killed (SIGKILL) with a build in flight: on restart it sweeps
//! the leftovers (VMM, virtiofsd, build directory), the castore is intact
//! with no partial blobs, and builds run again.

#![allow(clippy::unwrap_used)]

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::castore::Node;
use kiln::proto::snix_build;

use harness::BUSYBOX;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_kiln(data_dir: &Path, cache_dir: &Path, port: u16, warm_vms: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--warm-vms",
            &warm_vms.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .arg("--cache-dir")
        .arg(cache_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn wait_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while kiln::cli::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "kiln did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

fn request(busybox: &Node, script: &str) -> snix_build::BuildRequest {
    harness::nix_request(busybox.to_snix_entry(BUSYBOX.as_bytes()), script, &[OUT])
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_killed_mid_build_sweeps_on_restart() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let cache_dir = tmp.path().join("cache");
    std::fs::create_dir_all(&cache_dir).unwrap();
    // The toolset goes in before kiln starts (the embedded store is single-owner).
    let busybox = {
        let store = kiln::castore::from_addr("", &data_dir).await.unwrap();
        harness::server::ingest_busybox(&store, tmp.path()).await
    };
    // kiln looks for the kernel and agent under its cache dir.
    for d in ["kernel-kiln", "kernel-debian", "agent"] {
        std::os::unix::fs::symlink(Path::new("/var/cache/kiln").join(d), cache_dir.join(d))
            .unwrap();
    }

    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    // With the default warm pool: the killed kiln leaves a waiting pool VM
    // behind as well as the running build.
    let mut kiln = spawn_kiln(&data_dir, &cache_dir, port, 1);
    wait_ready(&addr).await;
    let stream = harness::submit_until_log(
        kiln::cli::connect(&addr).await.unwrap(),
        request(&busybox, "echo running; sleep 600"),
        b"running",
    )
    .await;
    let runs = data_dir.join("runs");
    assert!(
        !harness::leftovers(&runs).is_empty(),
        "a build is in flight"
    );
    // The pool's waiting VM is there too (booted beside the build, or
    // refilled after the build took it).
    let pool_vm = Instant::now() + Duration::from_secs(30);
    while !harness::leftovers(&runs)
        .iter()
        .any(|l| l.contains("/runs/warm-"))
    {
        assert!(
            Instant::now() < pool_vm,
            "no pool VM: {:?}",
            harness::leftovers(&runs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kiln.kill().unwrap();
    kiln.wait().unwrap();
    drop(stream);

    // Restart: the sweep removes what the killed kiln left.
    let port = free_port();
    let addr = format!("http://127.0.0.1:{port}");
    // Without a pool, so that anything left is the killed kiln's.
    let mut kiln = spawn_kiln(&data_dir, &cache_dir, port, 0);
    wait_ready(&addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !harness::leftovers(&runs).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind after restart: {:?}",
            harness::leftovers(&runs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tmp_blobs: Vec<_> = std::fs::read_dir(data_dir.join("blobs-tmp"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(tmp_blobs.is_empty(), "partial blobs left: {tmp_blobs:?}");

    // The castore is intact and builds run again.
    let mut builds = snix_build::build_service_client::BuildServiceClient::new(
        kiln::cli::connect(&addr).await.unwrap(),
    );
    let resp = builds
        .do_build(request(&busybox, "echo again > $out"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outputs.len(), 1);
    kiln.kill().unwrap();
    kiln.wait().unwrap();
    // What the second kiln left (nothing should run now) goes with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !harness::build_processes(&runs, "qemu-system-x86_64").is_empty() {
        assert!(Instant::now() < deadline, "VMM outlived kiln");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
