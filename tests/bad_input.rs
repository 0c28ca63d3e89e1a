//! Bad build requests over gRPC, both layouts, table-driven: every rule
//! broken once, each answered with the documented code and a message naming
//! the problem; the server keeps serving. None of these boots a VM.

#![allow(clippy::unwrap_used)]

mod harness;

use kiln::proto::{snix_build, snix_castore, tvix_build, tvix_castore};
use tonic::Code;

use harness::{Options, BUSYBOX};

type Snix = snix_build::BuildRequest;
type Tvix = tvix_build::BuildRequest;

/// One broken rule: what, how to break a good request, the code, and what
/// the message must name.
type Case<R> = (&'static str, Box<dyn Fn(&mut R)>, Code, &'static str);

fn env(key: &str, value: &[u8]) -> snix_build::build_request::EnvVar {
    snix_build::build_request::EnvVar {
        key: key.into(),
        value: value.to_vec().into(),
    }
}

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

#[tokio::test(flavor = "multi_thread")]
async fn every_snix_rule_broken_once() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let good = server.snix_request("true", &["nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out"]);
    let cases: Vec<Case<Snix>> = vec![
        (
            "empty command",
            Box::new(|r: &mut Snix| r.command_args.clear()),
            Code::InvalidArgument,
            "command_args",
        ),
        (
            "empty argv[0]",
            Box::new(|r: &mut Snix| r.command_args[0].clear()),
            Code::InvalidArgument,
            "command_args",
        ),
        (
            "NUL in an argument",
            Box::new(|r: &mut Snix| r.command_args.push("a\0b".into())),
            Code::InvalidArgument,
            "command_args[3]",
        ),
        (
            "absolute working_dir",
            Box::new(|r: &mut Snix| r.working_dir = "/build".into()),
            Code::InvalidArgument,
            "working_dir",
        ),
        (
            "working_dir with ..",
            Box::new(|r: &mut Snix| r.working_dir = "build/../etc".into()),
            Code::InvalidArgument,
            "working_dir",
        ),
        (
            "empty inputs_dir",
            Box::new(|r: &mut Snix| r.inputs_dir.clear()),
            Code::InvalidArgument,
            "inputs_dir",
        ),
        (
            "unsorted scratch paths",
            Box::new(|r: &mut Snix| r.scratch_paths.reverse()),
            Code::InvalidArgument,
            "scratch_paths[1]: not sorted",
        ),
        (
            "duplicate scratch path",
            Box::new(|r: &mut Snix| r.scratch_paths = vec!["build".into(), "build".into()]),
            Code::InvalidArgument,
            "duplicate",
        ),
        (
            "output outside every scratch path",
            Box::new(|r: &mut Snix| r.outputs = vec!["etc/out".into()]),
            Code::InvalidArgument,
            "outputs[0]",
        ),
        (
            "absolute output",
            Box::new(|r: &mut Snix| r.outputs = vec!["/nix/store/x".into()]),
            Code::InvalidArgument,
            "outputs[0]",
        ),
        (
            "duplicate output",
            Box::new(|r: &mut Snix| r.outputs = vec!["nix/store/x".into(), "nix/store/x".into()]),
            Code::InvalidArgument,
            "twice",
        ),
        (
            "unsorted environment",
            Box::new(|r: &mut Snix| r.environment_vars.reverse()),
            Code::InvalidArgument,
            "environment_vars",
        ),
        (
            "duplicate env key",
            Box::new(|r: &mut Snix| {
                let e = r.environment_vars[0].clone();
                r.environment_vars.insert(0, e);
            }),
            Code::InvalidArgument,
            "duplicate",
        ),
        (
            "env key with =",
            Box::new(|r: &mut Snix| r.environment_vars.insert(0, env("A=B", b"x"))),
            Code::InvalidArgument,
            "environment_vars[0].key",
        ),
        (
            "empty env key",
            Box::new(|r: &mut Snix| r.environment_vars.insert(0, env("", b"x"))),
            Code::InvalidArgument,
            "environment_vars[0].key",
        ),
        (
            "NUL in env value",
            Box::new(|r: &mut Snix| r.environment_vars.insert(0, env("A", b"x\0y"))),
            Code::InvalidArgument,
            "NUL",
        ),
        (
            "10 MiB env value",
            Box::new(|r: &mut Snix| {
                r.environment_vars
                    .insert(0, env("A", &vec![b'x'; 10 << 20]))
            }),
            Code::InvalidArgument,
            "environment_vars[0].value",
        ),
        (
            "unsorted inputs",
            Box::new(|r: &mut Snix| {
                r.inputs = vec![file_entry("b", vec![1; 32]), file_entry("a", vec![1; 32])]
            }),
            Code::InvalidArgument,
            "inputs[1]: not sorted",
        ),
        (
            "duplicate inputs",
            Box::new(|r: &mut Snix| {
                r.inputs = vec![file_entry("a", vec![1; 32]), file_entry("a", vec![1; 32])]
            }),
            Code::InvalidArgument,
            "inputs[1]: duplicate",
        ),
        (
            "bad input name",
            Box::new(|r: &mut Snix| r.inputs = vec![file_entry("a/b", vec![1; 32])]),
            Code::InvalidArgument,
            "inputs[0]",
        ),
        (
            "input named ..",
            Box::new(|r: &mut Snix| r.inputs = vec![file_entry("..", vec![1; 32])]),
            Code::InvalidArgument,
            "inputs[0]",
        ),
        (
            "31-byte digest",
            Box::new(|r: &mut Snix| r.inputs = vec![file_entry("a", vec![1; 31])]),
            Code::InvalidArgument,
            "inputs[0]",
        ),
        (
            "unknown digest",
            Box::new(|r: &mut Snix| r.inputs = vec![file_entry("a", vec![7; 32])]),
            Code::FailedPrecondition,
            "0707070707",
        ),
        (
            "100 000 inputs",
            Box::new(|r: &mut Snix| {
                r.inputs = (0..100_000)
                    .map(|i| file_entry(&format!("{i:08}"), vec![1; 32]))
                    .collect()
            }),
            Code::InvalidArgument,
            "inputs",
        ),
        (
            "unknown system",
            Box::new(|r: &mut Snix| {
                r.constraints.as_mut().unwrap().system = "riscv64-linux".into()
            }),
            Code::FailedPrecondition,
            "riscv64-linux",
        ),
        (
            "constraints without system",
            Box::new(|r: &mut Snix| r.constraints.as_mut().unwrap().system.clear()),
            Code::InvalidArgument,
            "constraints.system",
        ),
        (
            "absurd min_memory",
            Box::new(|r: &mut Snix| r.constraints.as_mut().unwrap().min_memory = u64::MAX),
            Code::FailedPrecondition,
            "min_memory",
        ),
        (
            "relative ro path",
            Box::new(|r: &mut Snix| {
                r.constraints.as_mut().unwrap().available_ro_paths = vec!["dev/kvm".into()]
            }),
            Code::InvalidArgument,
            "available_ro_paths[0]",
        ),
        (
            "ro path not allowed",
            Box::new(|r: &mut Snix| {
                r.constraints.as_mut().unwrap().available_ro_paths = vec!["/etc".into()]
            }),
            Code::FailedPrecondition,
            "/etc",
        ),
        (
            "additional file outside scratch",
            Box::new(|r: &mut Snix| {
                r.additional_files = vec![snix_build::build_request::AdditionalFile {
                    path: "etc/passwd".into(),
                    contents: vec![].into(),
                }]
            }),
            Code::InvalidArgument,
            "additional_files[0].path",
        ),
        (
            "empty refscan needle",
            Box::new(|r: &mut Snix| r.refscan_needles = vec![String::new()]),
            Code::InvalidArgument,
            "refscan_needles[0]",
        ),
    ];
    let mut client = server.snix().await.max_encoding_message_size(usize::MAX);
    for (what, mutate, code, needle) in &cases {
        let mut req = good.clone();
        mutate(&mut req);
        let status = client.do_build(req).await.expect_err(what);
        assert_eq!(status.code(), *code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} should name {needle:?}",
            status.message()
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_layout_rules() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let good = tvix_build::BuildRequest {
        command_args: vec![format!("/nix/store/{BUSYBOX}/bin/sh")],
        outputs: vec!["x-out".into()],
        environment_vars: vec![],
        inputs: vec![server.busybox_node()],
        constraints: None,
    };
    let cases: Vec<Case<Tvix>> = vec![
        (
            "output with a slash",
            Box::new(|r: &mut Tvix| r.outputs = vec!["a/b".into()]),
            Code::InvalidArgument,
            "outputs[0]",
        ),
        (
            "empty command",
            Box::new(|r: &mut Tvix| r.command_args.clear()),
            Code::InvalidArgument,
            "command_args",
        ),
        (
            "empty input node",
            Box::new(|r: &mut Tvix| r.inputs = vec![tvix_castore::Node { node: None }]),
            Code::InvalidArgument,
            "inputs[0]",
        ),
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
        ),
    ];
    let mut client = server.tvix().await;
    for (what, mutate, code, needle) in &cases {
        let mut req = good.clone();
        mutate(&mut req);
        let status = client.do_build(req).await.expect_err(what);
        assert_eq!(status.code(), *code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} should name {needle:?}",
            status.message()
        );
    }
    server.stop().await;
}
