//! Bad build requests over gRPC, both layouts: what only a server can
//! refuse (an input the castore lacks, a system, memory or read-only path
//! this host does not offer) answered FAILED_PRECONDITION naming the
//! problem and its kind, a broken rule answered INVALID_ARGUMENT naming the
//! field through the wire, and the server serving on. No VM is booted: all
//! of it is refused before one is taken. (Every request rule is checked
//! without a server, inline in `src/grpc/request/tests.rs`.)

#![allow(clippy::unwrap_used)]

mod harness;

use kiln::grpc::status::failed_detail;
use kiln::proto::{snix_build, snix_castore, tvix_build};
use tonic::Code;

use harness::{Options, BUSYBOX};

type Snix = snix_build::BuildRequest;
type Tvix = tvix_build::BuildRequest;

/// One refusal: what, how to break a good request, the code, what the
/// message must name, and the `kiln.v1.Failed` precondition (empty if the
/// refusal is not one).
type Case<R> = (
    &'static str,
    Box<dyn Fn(&mut R)>,
    Code,
    &'static str,
    &'static str,
);

fn file_entry(name: &str, digest: Vec<u8>) -> snix_castore::Entry {
    snix_castore::Entry {
        entry: Some(snix_castore::entry::Entry::File(snix_castore::FileEntry {
            name: name.as_bytes().to_vec().into(),
            digest: digest.into(),
            size: 1,
            executable: false,
        })),
    }
}

/// Checks each case's status: code, message, and the detail's kind.
fn check(what: &str, status: &tonic::Status, code: Code, needle: &str, precondition: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().contains(needle),
        "{what}: message {:?} should name {needle:?}",
        status.message()
    );
    let detail = failed_detail(status).unwrap_or_else(|| panic!("{what}: no kiln.v1.Failed"));
    assert_eq!(detail.precondition, precondition, "{what}: {detail:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn snix_requests_the_server_must_refuse() {
    let server = harness::server::start_without_vms(Options::default()).await;
    let good = server.snix_request("true", &["nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out"]);
    let cases: Vec<Case<Snix>> = vec![
        (
            "unknown digest",
            Box::new(|r: &mut Snix| r.inputs = vec![file_entry("a", vec![7; 32])]),
            Code::FailedPrecondition,
            "0707070707",
            "",
        ),
        (
            "unknown system",
            Box::new(|r: &mut Snix| {
                r.constraints.as_mut().unwrap().system = "riscv64-linux".into()
            }),
            Code::FailedPrecondition,
            "riscv64-linux",
            "system",
        ),
        (
            "absurd min_memory",
            Box::new(|r: &mut Snix| r.constraints.as_mut().unwrap().min_memory = u64::MAX),
            Code::FailedPrecondition,
            "min_memory",
            "memory",
        ),
        (
            "ro path not allowed",
            Box::new(|r: &mut Snix| {
                r.constraints.as_mut().unwrap().available_ro_paths = vec!["/etc".into()]
            }),
            Code::FailedPrecondition,
            "/etc",
            "ro_path",
        ),
        (
            "a broken rule, over the wire",
            Box::new(|r: &mut Snix| r.working_dir = "/build".into()),
            Code::InvalidArgument,
            "working_dir",
            "",
        ),
    ];
    let mut client = server.snix().await;
    for (what, mutate, code, needle, precondition) in &cases {
        let mut req = good.clone();
        mutate(&mut req);
        let status = client.do_build(req).await.expect_err(what);
        check(what, &status, *code, needle, precondition);
    }
    assert!(server.healthy().await, "the server still serves");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_layout_requests_the_server_must_refuse() {
    let server = harness::server::start_without_vms(Options::default()).await;
    let good = tvix_build::BuildRequest {
        command_args: vec![format!("/nix/store/{BUSYBOX}/bin/sh")],
        outputs: vec!["x-out".into()],
        environment_vars: vec![],
        inputs: vec![server.busybox_node()],
        constraints: None,
    };
    let cases: Vec<Case<Tvix>> = vec![
        (
            "unknown system",
            Box::new(|r: &mut Tvix| {
                r.constraints = Some(tvix_build::build_request::BuildConstraints {
                    system: "aarch64-darwin".into(),
                    ..Default::default()
                })
            }),
            Code::FailedPrecondition,
            "aarch64-darwin",
            "system",
        ),
        (
            "a broken rule, over the wire",
            Box::new(|r: &mut Tvix| r.outputs = vec!["a/b".into()]),
            Code::InvalidArgument,
            "outputs[0]",
            "",
        ),
    ];
    let mut client = server.tvix().await;
    for (what, mutate, code, needle, precondition) in &cases {
        let mut req = good.clone();
        mutate(&mut req);
        let status = client.do_build(req).await.expect_err(what);
        check(what, &status, *code, needle, precondition);
    }
    assert!(server.healthy().await, "the server still serves");
    server.stop().await;
}
