//! `contrib/kiln.service` passes `systemd-analyze verify`, runs the command
//! the README installs, and reads the example config.
//!
//! `verify` checks that ExecStart's binary exists and is executable, and
//! `/usr/local/bin/kiln` is not installed on a test machine: so the unit is
//! verified as a copy whose ExecStart names the binary this suite built,
//! which is the only line changed. `verify` only warns about unknown or
//! malformed settings (exit 0), so any line it prints about the unit fails
//! the test too.

#![allow(clippy::unwrap_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the unit runs kiln from (README, Install).
const INSTALLED_KILN: &str = "/usr/local/bin/kiln";
/// The command line of the unit, after the binary.
const SERVE_ARGS: &str = "serve --config /etc/kiln/kiln.toml";

fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kiln.service");
    std::fs::read_to_string(path).unwrap()
}

fn systemd_analyze() -> Option<PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let missing = analyze
        .is_none()
        .then(|| "systemd-analyze is not installed (Debian's systemd package; make apt)".into());
    if !harness::can_run(missing) {
        return;
    }
    let analyze = analyze.unwrap();
    let text = unit();
    let exec_start = format!("ExecStart={INSTALLED_KILN} {SERVE_ARGS}\n");
    assert_eq!(
        text.matches(&exec_start).count(),
        1,
        "the unit runs `{INSTALLED_KILN} {SERVE_ARGS}` once"
    );
    let built = env!("CARGO_BIN_EXE_kiln");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kiln.service");
    std::fs::write(
        &copy,
        text.replace(&exec_start, &format!("ExecStart={built} {SERVE_ARGS}\n")),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify: {stdout}{stderr}"
    );
    let about_unit: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|line| line.contains("kiln.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warns: {about_unit:#?}"
    );
}

#[test]
fn the_unit_stops_kiln_gracefully_and_keeps_it_writable_where_it_writes() {
    let text = unit();
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for wanted in [
        "KillMode=mixed",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "StateDirectory=kiln",
        "CacheDirectory=kiln",
        "DeviceAllow=/dev/kvm rw",
    ] {
        assert!(settings.contains(&wanted), "{wanted} missing from the unit");
    }
    for refused in [
        "PrivateNetwork=yes",
        "PrivateDevices=yes",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(
            !settings.contains(&refused),
            "{refused} would stop kiln's VMs"
        );
    }
}

#[test]
fn the_unit_command_line_reads_the_example_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kiln.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--config"])
        .arg(&example)
        .arg("--check-config")
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings = String::from_utf8(out.stdout).unwrap();
    // What the unit's StateDirectory= and CacheDirectory= make writable.
    assert!(
        settings.contains("\ndata-dir = \"/var/lib/kiln\"\n"),
        "{settings}"
    );
    assert!(
        settings.contains("\ncache-dir = \"/var/cache/kiln\"\n"),
        "{settings}"
    );
}
