//! Faults, each with real VMs: the VMM or virtiofsd killed mid-build, the
//! guest kernel panicking, a builder leaving a process behind, a build
//! printing without end, kiln itself killed with a build in flight. In every
//! case the client gets a clear error, the server keeps serving, and no
//! process or directory is left behind.

#![allow(clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use kiln::client::FollowError;
use kiln::guest_image::Artifacts;
use kiln::proto::kiln_v1::Failed;
use kiln::proto::snix_build;
use tonic::Code;

use harness::{Options, TestServer};

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

/// Submits `req`, waits until the builder printed `running`, runs `fault`,
/// and returns how the build ended.
async fn fault_mid_build(
    server: &TestServer,
    req: snix_build::BuildRequest,
    fault: impl FnOnce(),
) -> Failed {
    let follow = harness::submit_until_log(server.channel().await, req, b"running").await;
    fault();
    match harness::events::to_end(follow, &mut ()).await {
        Err(FollowError::Failed { failed, .. }) => *failed,
        Ok(_) => panic!("the build should not complete"),
        Err(e) => panic!("the build should end in Failed: {e}"),
    }
}

fn kill_all(pids: &[i32]) {
    assert!(!pids.is_empty(), "no process to kill");
    for pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
}

async fn still_serves(server: &TestServer) {
    let req = server.snix_request("echo ok > $out", &[OUT]);
    assert_eq!(server.build_first_file(req).await, b"ok\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn vmm_killed_mid_build() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let runs = server.data_dir.join("runs");
    let req = server.snix_request("echo running; sleep 600", &[OUT]);
    let failed = fault_mid_build(&server, req, || {
        kill_all(&harness::build_processes(&runs, "qemu-system-x86_64"))
    })
    .await;
    assert_eq!(failed.kind, "vm_crashed", "{failed:?}");
    assert_eq!(failed.code, Code::Unavailable as i32);
    assert!(failed.message.contains("VMM exited"), "{}", failed.message);
    server.assert_nothing_left().await;
    still_serves(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn virtiofsd_killed_mid_build() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let runs = server.data_dir.join("runs");
    let req = server.snix_request("echo running; sleep 600", &[OUT]);
    let failed = fault_mid_build(&server, req, || {
        kill_all(&harness::build_processes(&runs, "virtiofsd"))
    })
    .await;
    assert_eq!(failed.kind, "vm_crashed", "{failed:?}");
    assert!(failed.message.contains("virtiofsd"), "{}", failed.message);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_kernel_panic_is_a_vm_crash_with_the_console_tail() {
    // An /init the kernel cannot execute: the kernel panics ("No working
    // init found"), and with panic=-1 and -no-reboot the VM ends at once.
    let tmp = tempfile::tempdir().unwrap();
    let bad_agent = tmp.path().join("not-an-agent");
    std::fs::write(&bad_agent, b"\x7fELF but not really").unwrap();
    let artifacts = Artifacts {
        agent: bad_agent,
        ..Artifacts::from_env().expect("KILN_KERNEL names a kernel")
    };
    let Some(server) = harness::start(Options {
        artifacts: Some(artifacts),
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let started = Instant::now();
    let req = server.snix_request("true", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("Kernel panic"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "a panic must not wait for the timeout"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn builder_leaving_a_process_behind_still_completes() {
    let opts = Options {
        timeout: Duration::from_secs(150),
        ..Options::default()
    };
    let Some(server) = harness::start(opts).await else {
        return;
    };
    let req = server.snix_request("sleep 100000 & sleep 100000 & echo done > $out", &[OUT]);
    assert_eq!(server.build_first_file(req).await, b"done\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_output_hits_the_log_limit_with_bounded_memory() {
    let opts = Options {
        max_log_bytes: 4 * 1024 * 1024,
        ..Options::default()
    };
    let Some(server) = harness::start(opts).await else {
        return;
    };
    let before = harness::rss_kib();
    let req = server.snix_request("yes 'all work and no play'", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let detail = kiln::grpc::status::failed_detail(&status).unwrap();
    assert_eq!(detail.kind, "log_limit");
    assert!(String::from_utf8_lossy(&detail.log_tail).contains("all work and no play"));
    let grown = harness::rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "kiln grew by {grown} KiB for a 4 MiB log limit"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn build_filling_its_scratch_space_is_stopped() {
    let scratch = kiln::executor::scratch::ScratchLimits {
        max_bytes: 64 << 20,
        min_free_bytes: 1 << 30,
    };
    let Some(server) = harness::start(Options {
        scratch,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let req = server.snix_request(
        "echo filling; dd if=/dev/zero of=/build/big bs=1M count=100000; sleep 600",
        &[OUT],
    );
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let detail = kiln::grpc::status::failed_detail(&status).unwrap();
    assert_eq!(detail.kind, "scratch_full", "{status:?}");
    assert!(
        status.message().contains("scratch space exhausted"),
        "{}",
        status.message()
    );
    server.stop().await;
}
