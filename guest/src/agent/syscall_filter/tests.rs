//! The filter on this host's kernel: `tests/fixtures/syscall-probe.c` runs
//! once without it (the control: this filesystem and kernel allow what the
//! filter must refuse) and once with it installed the way the builder gets
//! it, in the child just before exec. The VM tests check the same inside a
//! build VM, through the real agent.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const CHECKS: &[&str] = &[
    "chmod-setuid",
    "chmod-setgid",
    "chmod-plain",
    "fchmod-setuid",
    "fchmodat-setgid",
    "fchmodat2-setuid",
    "i386-chmod-setuid",
    "x32-chmod-setuid",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "status",
];

/// Compiles the probe statically into `dir`.
fn probe(dir: &Path) -> PathBuf {
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/syscall-probe.c"
    );
    let binary = dir.join("syscall-probe");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(source)
        .output()
        .expect("gcc, which building kiln needs anyway");
    assert!(
        out.status.success(),
        "compiling {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// Runs the probe on a fresh directory; with `filter`, installed before exec.
fn run(probe: &Path, work: &Path, filter: Option<&SyscallFilter>) -> String {
    let mut command = Command::new(probe);
    command.arg(work).args(CHECKS);
    if let Some(filter) = filter {
        let filter = SyscallFilter {
            program: filter.program.clone(),
        };
        // SAFETY: `install` makes two prctl calls and allocates nothing,
        // which is what may run between fork and exec.
        unsafe {
            command.pre_exec(move || filter.install().map_err(std::io::Error::from));
        }
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{check}:")))
        .unwrap_or_else(|| panic!("no {check} in:\n{report}"))
}

#[test]
fn compiles_for_all_three_abis() {
    let filter = SyscallFilter::compile().unwrap();
    let instructions = filter.program.len();
    assert!(instructions > 0 && instructions <= MAX_INSTRUCTIONS);
    // libseccomp's readable form of the same rules.
    let ctx = rules().unwrap();
    let memfd = nix::sys::memfd::memfd_create(c"pfc", nix::sys::memfd::MFdFlags::empty()).unwrap();
    ctx.export_pfc(&memfd).unwrap();
    let mut text = String::new();
    let mut file = std::fs::File::from(memfd);
    file.rewind().unwrap();
    file.read_to_string(&mut text).unwrap();
    for arch in ["x86_64", "x86", "x32"] {
        assert!(text.contains(&format!("arch {arch} ")), "{arch}:\n{text}");
    }
    // Four mode changes x two bits, three xattr setters, per ABI.
    assert_eq!(text.matches("action ERRNO(1)").count(), 3 * 8, "{text}");
    assert_eq!(
        text.matches(&format!("action ERRNO({})", libc::ENOTSUP))
            .count(),
        3 * 3,
        "{text}"
    );
}

#[test]
fn refuses_privilege_bits_and_xattrs_on_every_abi() {
    let dir = tempfile::tempdir().unwrap();
    let probe = probe(dir.path());
    let filter = SyscallFilter::compile().unwrap();

    let open = run(&probe, &dir.path().join("unfiltered"), None);
    let closed = run(&probe, &dir.path().join("filtered"), Some(&filter));

    // The control: without the filter the kernel grants these, so the
    // refusals below are the filter's. (x32 is usually compiled out or off:
    // ENOSYS without the filter, EPERM with it, still the filter's answer.)
    for check in [
        "chmod-setuid",
        "chmod-setgid",
        "fchmod-setuid",
        "fchmodat-setgid",
    ] {
        assert!(line(&open, check).contains(": ok, mode "), "{open}");
    }
    assert!(open.contains("no_new_privs: 0\n"), "{open}");
    for check in [
        "chmod-setuid",
        "chmod-setgid",
        "fchmod-setuid",
        "fchmodat-setgid",
        "fchmodat2-setuid",
        "i386-chmod-setuid",
        "x32-chmod-setuid",
    ] {
        assert_eq!(
            line(&closed, check),
            format!("{check}: EPERM, mode 0644"),
            "{closed}"
        );
    }
    assert_eq!(line(&closed, "chmod-plain"), "chmod-plain: ok, mode 0755");
    for check in ["setxattr", "lsetxattr", "fsetxattr"] {
        assert_eq!(
            line(&closed, check),
            format!("{check}: ENOTSUP, mode 0644"),
            "{closed}"
        );
        if !line(&open, check).contains(": ok,") {
            println!("SKIPPED: {check} control: this filesystem has no user xattrs, so ENOTSUP here does not prove the filter\n{open}");
        }
    }
    assert!(closed.contains("no_new_privs: 1"), "{closed}");
    assert!(closed.contains("Seccomp:\t2"), "{closed}");
}

#[test]
fn rejects_a_malformed_program() {
    for len in [0, 7, 8 * (MAX_INSTRUCTIONS + 1)] {
        let e = decode(&vec![0; len]).err().unwrap();
        assert_eq!(e.step(), "seccomp");
        assert!(e.chain().contains("instructions"), "{}", e.chain());
    }
    assert_eq!(decode(&[0; 16]).unwrap().len(), 2);
}
