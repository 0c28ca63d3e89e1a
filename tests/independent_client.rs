//! The independent client (tests/independent/kiln_client.py: grpcio and
//! protobuf bytes assembled by hand, no code shared with kiln) against a
//! kiln server: castore under both package names, a seed-layout
//! `tvix.build.v1` and a `snix.build.v1` build in real VMs, and malformed
//! and oversized messages. Nested trees, one a client put and one kiln
//! built, are read back recursively and validated the way snix's
//! validating `DirectoryService` does (order, and every `DirectoryNode.size`
//! by snix's rule, computed by the client).

#![allow(clippy::unwrap_used)]

mod harness;

use std::process::Command;

use harness::Options;

async fn run_client(addr: &str, args: &[&str]) {
    let addr = addr.trim_start_matches("http://").to_owned();
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/independent/kiln_client.py"
            ))
            .arg(&addr)
            .args(&owned)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "independent client {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_independent_grpc_client_speaks_both_layouts() {
    if !harness::can_run(harness::python_unavailable("grpc, blake3")) {
        return;
    }
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    run_client(&server.addr, &["castore"]).await;
    run_client(&server.addr, &["badwire"]).await;
    run_client(&server.addr, &["build", "/bin/busybox"]).await;
    server.stop().await;
}
