//! The relation rules as a table: one good Nix-shaped request, each case
//! breaks one rule and names the field the answer must name.

use super::super::{MAX_ADDITIONAL_FILES, MAX_ARGS_ENV_TOTAL, MAX_ARG_STRLEN, MAX_REFSCAN_NEEDLES};
use crate::proto::{snix_build, snix_castore};

type Req = snix_build::BuildRequest;
/// What a case breaks, how, and the field the error must name.
type Case = (&'static str, Box<dyn Fn(&mut Req)>, &'static str);

const INPUT: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";

fn file_entry(name: &str) -> snix_castore::Entry {
    snix_castore::Entry {
        entry: Some(snix_castore::entry::Entry::File(snix_castore::FileEntry {
            name: name.as_bytes().to_vec().into(),
            digest: vec![1; 32].into(),
            size: 1,
            executable: false,
        })),
    }
}

fn file(path: &str) -> snix_build::build_request::AdditionalFile {
    snix_build::build_request::AdditionalFile {
        path: path.into(),
        contents: b"x".to_vec().into(),
    }
}

fn good() -> Req {
    Req {
        inputs: vec![file_entry(INPUT)],
        command_args: vec!["/bin/sh".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec!["nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out".into()],
        additional_files: vec![file("build/.attr-0")],
        refscan_needles: vec!["1bcdfghijklmnpqrsvwxyz0123456789".into()],
        ..Default::default()
    }
}

#[test]
fn the_good_request_passes() {
    let mut req = good();
    // Siblings whose names extend another path's are not nested.
    req.outputs = vec![
        "nix/store/a".into(),
        "nix/store/a-b".into(),
        "nix/store/a.c".into(),
    ];
    req.additional_files = vec![file("build/f"), file("build/f-g"), file("build/f.h")];
    req.working_dir = "build/my dir".into();
    crate::grpc::request::from_snix(&req).expect("valid");
}

#[test]
fn every_relation_broken_once() {
    let huge_needles: Vec<String> = (0..MAX_REFSCAN_NEEDLES + 1)
        .map(|i| format!("{i:032}"))
        .collect();
    let cases: Vec<Case> = vec![
        (
            "nested outputs",
            Box::new(|r| r.outputs = vec!["nix/store/o".into(), "nix/store/o/sub".into()]),
            "outputs[1]",
        ),
        (
            "nested outputs, inner first",
            Box::new(|r| r.outputs = vec!["nix/store/o/sub".into(), "nix/store/o".into()]),
            "outputs[0]",
        ),
        (
            "output at an input",
            Box::new(|r| r.outputs = vec![format!("nix/store/{INPUT}")]),
            "outputs[0]",
        ),
        (
            "output below an input",
            Box::new(|r| r.outputs = vec![format!("nix/store/{INPUT}/bin")]),
            "outputs[0]",
        ),
        (
            "output containing inputs_dir",
            Box::new(|r| {
                r.scratch_paths = vec!["build".into()];
                r.outputs = vec!["build/o".into()];
                r.inputs_dir = "build/o/in".into();
            }),
            "outputs[0]",
        ),
        (
            "additional file at an input",
            Box::new(|r| r.additional_files = vec![file(&format!("nix/store/{INPUT}"))]),
            "additional_files[0].path",
        ),
        (
            "additional file under inputs_dir",
            Box::new(|r| r.additional_files = vec![file("nix/store/new")]),
            "additional_files[0].path",
        ),
        (
            "additional file nested in another",
            Box::new(|r| r.additional_files = vec![file("build/a"), file("build/a/b")]),
            "additional_files[0].path",
        ),
        (
            "additional file at a scratch path",
            Box::new(|r| r.additional_files = vec![file("build")]),
            "additional_files[0].path",
        ),
        (
            "additional file above the working dir",
            Box::new(|r| {
                r.working_dir = "build/w".into();
                r.additional_files = vec![file("build/w")];
            }),
            "additional_files[0].path",
        ),
        (
            "additional file at an output",
            Box::new(|r| {
                r.scratch_paths = vec!["build".into()];
                r.inputs_dir = "in".into();
                r.outputs = vec!["build/o".into()];
                r.additional_files = vec![file("build/o")];
            }),
            "additional_files[0].path",
        ),
        (
            "additional file above an output",
            Box::new(|r| {
                r.outputs = vec!["build/o/out".into()];
                r.additional_files = vec![file("build/o")];
            }),
            "additional_files[0].path",
        ),
        (
            "additional file inside an output",
            Box::new(|r| {
                r.outputs = vec!["build/o".into()];
                r.additional_files = vec![file("build/.attr"), file("build/o/seed")];
            }),
            "additional_files[1].path",
        ),
        (
            "too many additional files",
            Box::new(|r| {
                r.additional_files = (0..=MAX_ADDITIONAL_FILES)
                    .map(|i| file(&format!("build/{i:05}")))
                    .collect();
            }),
            "additional_files",
        ),
        (
            "newline in working_dir",
            Box::new(|r| r.working_dir = "build/x\nroot::0:0::/:/bin/sh".into()),
            "working_dir",
        ),
        (
            "colon in working_dir",
            Box::new(|r| r.working_dir = "build/a:b".into()),
            "working_dir",
        ),
        (
            "too many needles",
            Box::new(move |r| r.refscan_needles = huge_needles.clone()),
            "refscan_needles",
        ),
        (
            "needles too long in all",
            Box::new(|r| r.refscan_needles = vec!["x".repeat(4 << 20)]),
            "refscan_needles",
        ),
    ];
    for (what, mutate, field) in &cases {
        let mut req = good();
        mutate(&mut req);
        let err = crate::grpc::request::from_snix(&req).expect_err(what);
        assert_eq!(err.field, *field, "{what}: {err}");
    }
}

#[test]
fn heap_size_counts_the_big_parts() {
    let small = crate::grpc::request::from_snix(&good()).expect("valid");
    let mut req = good();
    req.additional_files[0].contents = vec![0; 1 << 20].into();
    let big = crate::grpc::request::from_snix(&req).expect("valid");
    assert!(small.heap_size() < 4096, "{}", small.heap_size());
    assert!(big.heap_size() >= 1 << 20);
    assert!(big.heap_size() < (1 << 20) + 4096);
}

#[test]
fn argv0_is_checked_like_an_argument() {
    let valid = crate::grpc::request::from_snix(&good()).expect("valid");
    let with = |argv0: &str| valid.clone().with_argv0(argv0.to_owned());
    assert_eq!(with("sh").expect("valid").argv0.as_deref(), Some("sh"));
    // Not only basenames: any string the kernel can pass.
    assert!(with("/bin/sh").is_ok() && with("-sh").is_ok());
    for (what, argv0, rule) in [
        ("empty", String::new(), "empty"),
        ("NUL", "s\0h".to_owned(), "NUL"),
        ("too long", "x".repeat(MAX_ARG_STRLEN), "limit"),
    ] {
        let err = with(&argv0).expect_err(what);
        assert_eq!(err.field, "argv0", "{what}: {err}");
        assert!(err.rule.contains(rule), "{what}: {err}");
    }
    // It counts towards argv + environment, next to command_args[0].
    let mut big = valid.clone();
    let room = MAX_ARGS_ENV_TOTAL - (big.command_args[0].len() + 1);
    big.command_args
        .extend((0..room / (MAX_ARG_STRLEN - 1)).map(|_| "x".repeat(MAX_ARG_STRLEN - 2)));
    let left = MAX_ARGS_ENV_TOTAL - big.command_args.iter().map(|a| a.len() + 1).sum::<usize>();
    let fits = big.clone().with_argv0("y".repeat(left - 1));
    assert!(fits.is_ok(), "{fits:?}");
    let err = big.with_argv0("y".repeat(left)).expect_err("one byte over");
    assert_eq!(err.field, "environment_vars", "{err}");
}
