//! Both wire layouts validated into the domain request, without a server:
//! every rule broken once, each refused naming the field; the seed layout
//! gets the Nix defaults. (Rules that need the castore or the host — an
//! unknown digest, a system or memory the host lacks — are in
//! `tests/bad_input.rs`; overlapping paths and caps over gRPC in
//! `tests/security_limits.rs`.)

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use super::*;
use crate::executor::request::{MAX_ARGS_ENV_TOTAL, MAX_ARG_STRLEN};
use crate::proto::{snix_castore, tvix_castore};

/// The input's store basename.
const INPUT: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";
const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

/// One broken rule: what, how to break a good request, the field the error
/// must name, and a word of its rule.
type Case<R> = (&'static str, fn(&mut R), &'static str, &'static str);

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
            executable: true,
        })),
    }
}

/// A Nix-shaped request that passes validation.
fn good_snix() -> snix_build::BuildRequest {
    let bin = format!("/nix/store/{INPUT}/bin");
    snix_build::BuildRequest {
        inputs: vec![file_entry(INPUT, vec![1; 32])],
        command_args: vec![format!("{bin}/sh"), "-c".into(), "true".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec![OUT.into()],
        environment_vars: vec![
            env("HOME", b"/homeless-shelter"),
            env("PATH", bin.as_bytes()),
            env("TMPDIR", b"/build"),
            env("out", format!("/{OUT}").as_bytes()),
        ],
        constraints: Some(snix_build::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![],
    }
}

fn good_tvix() -> tvix_build::BuildRequest {
    tvix_build::BuildRequest {
        command_args: vec![format!("/nix/store/{INPUT}/bin/sh")],
        outputs: vec!["x-out".into()],
        environment_vars: vec![],
        inputs: vec![tvix_castore::Node {
            node: Some(tvix_castore::node::Node::File(tvix_castore::FileNode {
                name: INPUT.as_bytes().to_vec().into(),
                digest: vec![1; 32].into(),
                size: 1,
                executable: true,
            })),
        }],
        constraints: None,
    }
}

/// Breaks `good` once per case; each must be refused naming its field.
fn check_cases<R: Clone>(
    good: &R,
    cases: &[Case<R>],
    validate: impl Fn(&R) -> Result<BuildRequest, InvalidRequest>,
) {
    validate(good).expect("the unbroken request is valid");
    let mut wrong = Vec::new();
    for (what, break_it, field, word) in cases {
        let mut req = good.clone();
        break_it(&mut req);
        match validate(&req) {
            Ok(_) => wrong.push(format!("{what}: accepted")),
            Err(e) if e.field != *field || !e.rule.contains(word) => wrong.push(format!(
                "{what}: {e} (want field {field}, rule with {word:?})"
            )),
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_snix_rule_broken_once() {
    let cases: &[Case<snix_build::BuildRequest>] = &[
        (
            "empty command",
            |r| r.command_args.clear(),
            "command_args",
            "empty",
        ),
        (
            "empty argv[0]",
            |r| r.command_args[0].clear(),
            "command_args",
            "argv[0] is empty",
        ),
        (
            "NUL in an argument",
            |r| r.command_args.push("a\0b".into()),
            "command_args[3]",
            "NUL",
        ),
        (
            "absolute working_dir",
            |r| r.working_dir = "/build".into(),
            "working_dir",
            "",
        ),
        (
            "working_dir with ..",
            |r| r.working_dir = "build/../etc".into(),
            "working_dir",
            "",
        ),
        (
            "empty inputs_dir",
            |r| r.inputs_dir.clear(),
            "inputs_dir",
            "",
        ),
        (
            "unsorted scratch paths",
            |r| r.scratch_paths.reverse(),
            "scratch_paths[1]",
            "not sorted",
        ),
        (
            "duplicate scratch path",
            |r| r.scratch_paths = vec!["build".into(), "build".into()],
            "scratch_paths[1]",
            "duplicate",
        ),
        (
            "output outside every scratch path",
            |r| r.outputs = vec!["etc/out".into()],
            "outputs[0]",
            "scratch",
        ),
        (
            "absolute output",
            |r| r.outputs = vec!["/nix/store/x".into()],
            "outputs[0]",
            "",
        ),
        (
            "duplicate output",
            |r| r.outputs = vec!["nix/store/x".into(), "nix/store/x".into()],
            "outputs[1]",
            "twice",
        ),
        (
            "unsorted environment",
            |r| r.environment_vars.reverse(),
            "environment_vars[1]",
            "sorted",
        ),
        (
            "duplicate env key",
            |r| r.environment_vars.insert(0, r.environment_vars[0].clone()),
            "environment_vars[1]",
            "duplicate",
        ),
        (
            "env key with =",
            |r| r.environment_vars.insert(0, env("A=B", b"x")),
            "environment_vars[0].key",
            "=",
        ),
        (
            "empty env key",
            |r| r.environment_vars.insert(0, env("", b"x")),
            "environment_vars[0].key",
            "empty",
        ),
        (
            "NUL in env value",
            |r| r.environment_vars.insert(0, env("A", b"x\0y")),
            "environment_vars[0].value",
            "NUL",
        ),
        (
            "10 MiB env value",
            |r| {
                r.environment_vars
                    .insert(0, env("A", &vec![b'x'; 10 << 20]))
            },
            "environment_vars[0].value",
            "limit",
        ),
        (
            "unsorted inputs",
            |r| r.inputs = vec![file_entry("b", vec![1; 32]), file_entry("a", vec![1; 32])],
            "inputs[1]",
            "not sorted",
        ),
        (
            "duplicate inputs",
            |r| r.inputs = vec![file_entry("a", vec![1; 32]), file_entry("a", vec![1; 32])],
            "inputs[1]",
            "duplicate",
        ),
        (
            "bad input name",
            |r| r.inputs = vec![file_entry("a/b", vec![1; 32])],
            "inputs[0]",
            "",
        ),
        (
            "input named ..",
            |r| r.inputs = vec![file_entry("..", vec![1; 32])],
            "inputs[0]",
            "",
        ),
        (
            "31-byte digest",
            |r| r.inputs = vec![file_entry("a", vec![1; 31])],
            "inputs[0]",
            "",
        ),
        (
            "100 000 inputs",
            |r| {
                r.inputs = (0..100_000)
                    .map(|i| file_entry(&format!("{i:08}"), vec![1; 32]))
                    .collect()
            },
            "inputs",
            "limit",
        ),
        (
            "constraints without system",
            |r| r.constraints.as_mut().unwrap().system.clear(),
            "constraints.system",
            "must be set",
        ),
        (
            "relative ro path",
            |r| r.constraints.as_mut().unwrap().available_ro_paths = vec!["dev/kvm".into()],
            "constraints.available_ro_paths[0]",
            "",
        ),
        (
            "additional file outside scratch",
            |r| {
                r.additional_files = vec![snix_build::build_request::AdditionalFile {
                    path: "etc/passwd".into(),
                    contents: vec![].into(),
                }]
            },
            "additional_files[0].path",
            "",
        ),
        (
            "empty refscan needle",
            |r| r.refscan_needles = vec![String::new()],
            "refscan_needles[0]",
            "empty",
        ),
    ];
    check_cases(&good_snix(), cases, from_snix);
}

#[test]
fn every_seed_layout_rule_broken_once() {
    let cases: &[Case<tvix_build::BuildRequest>] = &[
        (
            "output with a slash",
            |r| r.outputs = vec!["a/b".into()],
            "outputs[0]",
            "basename",
        ),
        (
            "empty command",
            |r| r.command_args.clear(),
            "command_args",
            "empty",
        ),
        (
            "empty input node",
            |r| r.inputs = vec![tvix_castore::Node { node: None }],
            "inputs[0]",
            "",
        ),
        (
            "NUL in env value",
            |r| {
                r.environment_vars = vec![tvix_build::build_request::EnvVar {
                    key: "A".into(),
                    value: b"x\0y".to_vec().into(),
                }]
            },
            "environment_vars[0].value",
            "NUL",
        ),
        (
            "relative ro path",
            |r| {
                r.constraints = Some(tvix_build::build_request::BuildConstraints {
                    system: "x86_64-linux".into(),
                    available_ro_paths: vec!["dev/kvm".into()],
                    ..Default::default()
                })
            },
            "constraints.available_ro_paths[0]",
            "",
        ),
    ];
    check_cases(&good_tvix(), cases, from_tvix);
}

#[test]
fn a_snix_request_keeps_its_fields() {
    let valid = from_snix(&good_snix()).expect("valid");
    assert_eq!(valid.layout, Layout::Snix);
    assert_eq!(valid.working_dir.to_string(), "build");
    assert_eq!(valid.inputs_dir.to_string(), "nix/store");
    let outputs: Vec<String> = valid.outputs.iter().map(ToString::to_string).collect();
    assert_eq!(outputs, [OUT]);
    let keys: Vec<&str> = valid
        .environment_vars
        .iter()
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(keys, ["HOME", "PATH", "TMPDIR", "out"]);
    assert_eq!(valid.constraints.system, "x86_64-linux");
    assert_eq!(valid.inputs.len(), 1);
    assert_eq!(valid.inputs[0].0.as_bytes(), INPUT.as_bytes());
}

#[test]
fn the_seed_layout_gets_the_nix_defaults() {
    let valid = from_tvix(&good_tvix()).expect("valid");
    assert_eq!(valid.layout, Layout::Tvix);
    assert_eq!(valid.working_dir.to_string(), "build");
    assert_eq!(valid.inputs_dir.to_string(), "nix/store");
    let scratch: Vec<String> = valid
        .scratch_paths
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(scratch, ["build", "nix/store"]);
    let outputs: Vec<String> = valid.outputs.iter().map(ToString::to_string).collect();
    assert_eq!(outputs, ["nix/store/x-out"]);
    assert!(!valid.constraints.network_access);
    assert!(!valid.constraints.provide_bin_sh);
    assert!(valid.additional_files.is_empty() && valid.refscan_needles.is_empty());
}

fn submit(argv0: &str) -> SubmitRequest {
    SubmitRequest {
        request: Some(submit_request::Request::Snix(good_snix())),
        argv0: argv0.into(),
        limits: None,
    }
}

#[test]
fn a_submit_request_sets_argv0_and_plain_requests_do_not() {
    let plain = from_snix(&good_snix()).expect("valid");
    assert_eq!(plain.argv0, None, "snix clients get argv == command_args");
    assert_eq!(from_tvix(&good_tvix()).expect("valid").argv0, None);
    assert_eq!(from_submit(&submit("")).expect("valid"), plain);

    let valid = from_submit(&submit("sh")).expect("valid");
    assert_eq!(valid.argv0.as_deref(), Some("sh"));
    assert_eq!(
        valid.command_args, plain.command_args,
        "the executed path stays"
    );
    assert!(valid.heap_size() > plain.heap_size());
    // Any string without NUL: Nix's is a basename, but nothing relies on it.
    let slashed = from_submit(&submit("/not/a/basename")).expect("valid");
    assert_eq!(slashed.argv0.as_deref(), Some("/not/a/basename"));

    let tvix = SubmitRequest {
        request: Some(submit_request::Request::Tvix(good_tvix())),
        argv0: "sh".into(),
        limits: None,
    };
    let valid = from_submit(&tvix).expect("valid");
    assert_eq!(
        (valid.layout, valid.argv0.as_deref()),
        (Layout::Tvix, Some("sh"))
    );
}

#[test]
fn a_bad_submit_request_is_refused_naming_the_field() {
    let cases: &[Case<SubmitRequest>] = &[
        ("NUL in argv0", |r| r.argv0 = "s\0h".into(), "argv0", "NUL"),
        (
            "argv0 over MAX_ARG_STRLEN",
            |r| r.argv0 = "x".repeat(MAX_ARG_STRLEN),
            "argv0",
            "limit",
        ),
        (
            "argv0 past the argv + environment bound",
            |r| {
                let Some(submit_request::Request::Snix(s)) = r.request.as_mut() else {
                    unreachable!()
                };
                fill_to_args_env_limit(s);
                r.argv0 = "sh".into();
            },
            "environment_vars",
            "arguments and environment",
        ),
        (
            "no request",
            |r| r.request = None,
            "request",
            "neither a tvix nor a snix",
        ),
        (
            "the wrapped request broken",
            |r| {
                let Some(submit_request::Request::Snix(s)) = r.request.as_mut() else {
                    unreachable!()
                };
                s.command_args.push("a\0b".into());
            },
            "command_args[3]",
            "NUL",
        ),
    ];
    check_cases(&submit("sh"), cases, from_submit);
    // The bound is exact: the filled request passes without argv0.
    let mut full = good_snix();
    fill_to_args_env_limit(&mut full);
    from_snix(&full).expect("at the bound");
}

/// Adds arguments until argv + environment take exactly
/// [`MAX_ARGS_ENV_TOTAL`] bytes (each string with its NUL).
fn fill_to_args_env_limit(r: &mut snix_build::BuildRequest) {
    let used = |r: &snix_build::BuildRequest| {
        r.command_args.iter().map(|a| a.len() + 1).sum::<usize>()
            + r.environment_vars
                .iter()
                .map(|e| e.key.len() + e.value.len() + 2)
                .sum::<usize>()
    };
    while used(r) < MAX_ARGS_ENV_TOTAL {
        let len = (MAX_ARGS_ENV_TOTAL - used(r)).min(MAX_ARG_STRLEN - 1) - 1;
        r.command_args.push("x".repeat(len));
    }
    assert_eq!(used(r), MAX_ARGS_ENV_TOTAL);
}

#[test]
fn submit_limits_lower_the_deadline_and_zero_means_the_servers() {
    use crate::proto::kiln_v1::BuildLimits;
    use std::time::Duration;
    let mut req = submit("");
    assert_eq!(client_limits(&req, None), ClientLimits::default());
    let deadline = Some(Duration::from_secs(60));
    assert_eq!(client_limits(&req, deadline).timeout, deadline);
    req.limits = Some(BuildLimits {
        timeout_secs: 30,
        max_silent_secs: 5,
        max_log_bytes: 0,
    });
    let asked = client_limits(&req, deadline);
    assert_eq!(
        asked.timeout,
        Some(Duration::from_secs(30)),
        "the shorter wins"
    );
    assert_eq!(asked.max_silent, Some(Duration::from_secs(5)));
    assert_eq!(asked.max_log_bytes, None, "0 is the server's");
    assert_eq!(
        client_limits(&req, Some(Duration::from_secs(10))).timeout,
        Some(Duration::from_secs(10))
    );
}

#[test]
fn client_limits_never_exceed_the_servers() {
    use std::time::Duration;
    let config = crate::executor::ExecutorConfig::default();
    let asked = ClientLimits {
        timeout: Some(config.timeout * 2),
        max_silent: None,
        max_log_bytes: Some(config.max_log_bytes + 1),
        bypass_result_cache: false,
    };
    let applied = asked.within(&config);
    assert_eq!(applied.timeout, Some(config.timeout));
    assert_eq!(applied.max_log_bytes, Some(config.max_log_bytes));
    assert_eq!(applied.max_silent, None);
    let lower = ClientLimits {
        timeout: Some(Duration::from_secs(1)),
        max_silent: Some(Duration::from_secs(2)),
        max_log_bytes: Some(3),
        bypass_result_cache: true,
    }
    .within(&config);
    assert!(lower.bypass_result_cache, "the client's choice is kept");
    assert_eq!(lower.timeout, Some(Duration::from_secs(1)));
    assert_eq!(lower.max_silent, Some(Duration::from_secs(2)));
    assert_eq!(lower.max_log_bytes, Some(3));
}
