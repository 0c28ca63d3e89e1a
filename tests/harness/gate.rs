//! Whether a test can run on this host, and saying so when it cannot.
//!
//! One rule for every test file: a test that needs something this host
//! lacks prints `SKIPPED: <test>: <why>` and passes — unless
//! `KILN_REQUIRE_VM_TESTS` is set (`make test` sets it), where a missing
//! prerequisite is a failure naming why.
//!
//! libtest captures `print!`/`eprint!` of passing tests, so a skip written
//! that way would vanish from `cargo test`'s output; the line is written to
//! the process's stderr directly instead.

use std::io::Write;

use kiln::guest_image::Artifacts;

/// Set by `make test`: every prerequisite must be there.
pub const REQUIRE_VM_TESTS: &str = "KILN_REQUIRE_VM_TESTS";

/// The name libtest gave the calling test (its thread's name), or `?` when
/// called off the test's own thread (from a spawned task).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .map(|n| n.rsplit("::").next().unwrap_or(n).to_owned())
        .unwrap_or_else(|| "?".into())
}

/// Prints `SKIPPED: <test>: <why>` where `cargo test` shows it, also for a
/// passing test.
pub fn skip(why: impl std::fmt::Display) {
    let line = format!("SKIPPED: {}: {why}\n", test_name());
    // One write of the whole line, so parallel tests do not interleave it.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Whether the calling test may go on, given what is `missing` for it:
/// `true` when nothing is; otherwise it panics under
/// [`REQUIRE_VM_TESTS`] naming why, or prints the skip and returns `false`.
pub fn can_run(missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    if std::env::var_os(REQUIRE_VM_TESTS).is_some() {
        panic!(
            "{REQUIRE_VM_TESTS} is set but {} cannot run: {why}",
            test_name()
        );
    }
    skip(why);
    false
}

/// Whether the calling test may boot VMs here (see [`can_run`]).
pub fn vm_tests_can_run() -> bool {
    can_run(vm_unavailable())
}

/// Why VM tests cannot run on this host, if they cannot: the guest kernel,
/// modules, agent and busybox, QEMU, virtiofsd, and root (virtiofsd maps
/// the guest's ids to a dedicated host range and kiln owns its build
/// directories as root).
pub fn vm_unavailable() -> Option<String> {
    if let Err(e) = Artifacts::from_env()
        .expect("KILN_KERNEL names a kernel")
        .locate()
    {
        return Some(e.to_string());
    }
    if kiln::vmm::virtiofsd::find_binary().is_none() {
        return Some("virtiofsd is not installed (make virtiofsd)".into());
    }
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some("qemu-system-x86_64 does not run (make apt)".into());
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("VM tests need root (virtiofsd's id mapping, the build directories)".into());
    }
    None
}

/// Why the Python test clients cannot run, if they cannot (`make python`
/// installs what they import).
pub fn python_unavailable(modules: &str) -> Option<String> {
    match std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "python3 cannot import {modules} (make python): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("python3 does not run (make python): {e}")),
    }
}
