//! kiln as a Nix remote builder and remote store, driven by real Nix 2.8
//! (Debian's `nix-bin`):
//!
//! - remote builder: `nix-store --realise` with `--max-jobs 0` and
//!   `--builders` pointing at kiln over `ssh-ng://` (a real `sshd` on
//!   loopback whose key runs `kiln nix-daemon --stdio`), so nothing builds
//!   locally; then Nix rebuilds every output in its own sandbox with
//!   `--check`, which fails if a single byte differs;
//! - remote store: `nix copy --to unix://…` of the derivations, `nix-store
//!   --store unix://… --realise` (kiln builds missing dependencies first),
//!   `--query --references`/`--hash` and `--dump` compared with what Nix's
//!   own sandbox builds from the same derivations;
//! - bad input on the socket (tests/nix_daemon/bad_input.rs): each refused
//!   with an error frame, the daemon serving on.
//!
//! Every run instantiates `tests/fixtures/nix/daemon.nix` with a fresh
//! nonce, so every path is new and every build really runs.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

#[path = "nix_daemon/bad_input.rs"]
mod bad_input;
mod harness;
#[path = "nix_daemon/kiln.rs"]
mod kiln_process;
#[path = "fixtures/nix/support.rs"]
mod support;

use std::process::{Command, Output};
use std::time::Duration;

use kiln::nix::StorePath;
use kiln_process::Kiln;
use support::{fixture_dir, nix_command, toolset};

/// How long one Nix command may take (several VM builds under TCG).
const NIX_TIMEOUT: Duration = Duration::from_secs(900);

fn can_run() -> bool {
    harness::can_run(harness::vm_unavailable()) && support::nix_available()
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Instantiates `attr` of daemon.nix; the `.drv` paths (a list attribute
/// gives several).
fn instantiate(attr: &str, nonce: &str) -> Vec<StorePath> {
    let tools = toolset();
    let out = support::run(
        nix_command("nix-instantiate")
            .arg(fixture_dir().join("daemon.nix"))
            .args(["--argstr", "tools", &tools.to_string()])
            .args(["--argstr", "nonce", nonce, "-A", attr]),
    );
    out.lines().map(|l| l.trim().parse().unwrap()).collect()
}

/// Runs `command`, killing it after [`NIX_TIMEOUT`].
fn run_bounded(command: &mut Command) -> Output {
    kiln_process::run_bounded(command, NIX_TIMEOUT)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(command: &mut Command) -> (String, String) {
    let out = run_bounded(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    let log = stderr(&out);
    (String::from_utf8(out.stdout).unwrap(), log)
}

fn outputs_of(drv: &StorePath) -> Vec<StorePath> {
    let out =
        support::run(nix_command("nix-store").args(["--query", "--outputs", &drv.to_string()]));
    out.lines().map(|l| l.trim().parse().unwrap()).collect()
}

#[test]
fn remote_builder_over_ssh_ng_builds_what_nix_builds() {
    if !can_run() {
        return;
    }
    let kiln = Kiln::start();
    // Nix's ssh-ng client sends no settings: the silence limit is the
    // operator's, given to the forced command.
    let forced = format!(
        "{} nix-daemon --stdio --addr grpc+unix:{} --nix-trusted --nix-max-silent-secs 5",
        env!("CARGO_BIN_EXE_kiln"),
        kiln.grpc_socket().display()
    );
    let sshd = match harness::sshd::Sshd::start(&forced) {
        Ok(s) => s,
        Err(why) => {
            harness::skip(format!("sshd cannot run here: {why}"));
            return;
        }
    };
    let nonce = nonce();
    let drvs = instantiate("all", &nonce);
    let mut realise = nix_command("nix-store");
    realise
        .args(["--realise", "--max-jobs", "0"])
        .args(["--option", "builders", &sshd.builders_line(&[])])
        .args(drvs.iter().map(|d| d.to_string()))
        .envs(sshd.nix_env());
    let (stdout, log) = succeeded(&mut realise);
    assert!(
        log.contains("kiln-daemon-log-marker: building hello"),
        "the builder's log did not reach Nix:\n{log}\n--- kiln:\n{}",
        kiln.log()
    );
    let built: Vec<StorePath> = stdout.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(built.len() >= drvs.len(), "{stdout}");
    // Nix's own sandbox rebuilds each and compares byte for byte.
    for drv in &drvs {
        let mut check = nix_command("nix-store");
        check
            .args(["--realise", "--check", "--option", "builders", ""])
            .arg(drv.to_string());
        let out = run_bounded(&mut check);
        assert!(
            out.status.success(),
            "Nix's sandbox builds {drv} differently from kiln:\n{}",
            stderr(&out)
        );
    }
    // The chain's dependencies were built remotely too, one after the other.
    for out in outputs_of(&instantiate("chainA", &nonce)[0]) {
        assert!(std::path::Path::new(&out.to_string()).exists(), "{out}");
    }

    // A failing builder: Nix reports it with the log's tail.
    let failing = instantiate("failing", &nonce);
    let mut realise = nix_command("nix-store");
    realise
        .args(["--realise", "--max-jobs", "0"])
        .args(["--option", "builders", &sshd.builders_line(&[])])
        .arg(failing[0].to_string())
        .envs(sshd.nix_env());
    let out = run_bounded(&mut realise);
    assert!(!out.status.success());
    let log = stderr(&out);
    assert!(log.contains("failed with exit code 1"), "{log}");
    assert!(log.contains("kiln-daemon-failure-marker"), "{log}");

    // A builder silent for longer than the operator's max-silent-time is
    // stopped (sleep 120 would otherwise succeed).
    let silent = instantiate("silent", &nonce);
    let mut realise = nix_command("nix-store");
    realise
        .args(["--realise", "--max-jobs", "0"])
        .args(["--option", "builders", &sshd.builders_line(&[])])
        .arg(silent[0].to_string())
        .envs(sshd.nix_env());
    let out = run_bounded(&mut realise);
    assert!(!out.status.success(), "the silent build succeeded");
    let log = stderr(&out);
    assert!(log.contains("no output for 5 seconds"), "{log}");
    assert!(
        log.contains("going quiet"),
        "the log tail is missing:\n{log}"
    );
}

#[test]
fn remote_store_over_unix_socket_holds_what_nix_builds() {
    if !can_run() {
        return;
    }
    let kiln = Kiln::start();
    let store = format!("unix://{}", kiln.nix_socket().display());
    let nonce = nonce();
    let drvs = instantiate("all", &nonce);
    let fixed = instantiate("fixed", &nonce);
    let everything: Vec<String> = drvs.iter().chain(&fixed).map(|d| d.to_string()).collect();
    // The derivations and their sources, not their outputs.
    succeeded(
        nix_command("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--derivation",
            ])
            .args(["--to", &store])
            .args(&everything),
    );
    // kiln builds them, dependencies first, the log reaching the client.
    let (stdout, log) = succeeded(
        nix_command("nix-store")
            .args(["--store", &store, "--realise"])
            .args(&everything),
    );
    assert!(
        log.contains("kiln-daemon-log-marker"),
        "{log}\n--- kiln:\n{}",
        kiln.log()
    );
    let remote_outputs: Vec<StorePath> =
        stdout.lines().map(|l| l.trim().parse().unwrap()).collect();
    // Nix's own sandbox builds the same derivations.
    let (local, _) = succeeded(
        nix_command("nix-store")
            .args(["--realise", "--option", "builders", ""])
            .args(&everything),
    );
    let local_outputs: Vec<StorePath> = local.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(remote_outputs, local_outputs);
    for path in &local_outputs {
        let p = path.to_string();
        let query = |store: Option<&str>, what: &str| {
            let mut c = nix_command("nix-store");
            if let Some(s) = store {
                c.args(["--store", s]);
            }
            succeeded(c.args(["--query", what, &p])).0
        };
        assert_eq!(
            query(Some(&store), "--hash"),
            query(None, "--hash"),
            "NAR hash of {p}"
        );
        assert_eq!(
            query(Some(&store), "--references"),
            query(None, "--references"),
            "references of {p}"
        );
        let dump = |store: Option<&str>| {
            let mut c = nix_command("nix-store");
            if let Some(s) = store {
                c.args(["--store", s]);
            }
            let out = run_bounded(c.args(["--dump", &p]));
            assert!(out.status.success(), "{}", stderr(&out));
            out.stdout
        };
        assert!(dump(Some(&store)) == dump(None), "the NAR of {p} differs");
    }

    // The client's max-silent-time (SetOptions) stops a silent builder,
    // and a failing one is reported with its log's tail.
    let silent = instantiate("silent", &nonce);
    let failing = instantiate("failing", &nonce);
    let both: Vec<String> = silent
        .iter()
        .chain(&failing)
        .map(|d| d.to_string())
        .collect();
    succeeded(
        nix_command("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(["copy", "--derivation", "--to", &store])
            .args(&both),
    );
    let out = run_bounded(
        nix_command("nix-store")
            .args(["--store", &store, "--realise"])
            .args(["--option", "max-silent-time", "5"])
            .arg(&both[0]),
    );
    assert!(!out.status.success(), "the silent build succeeded");
    assert!(
        stderr(&out).contains("no output for 5 seconds"),
        "{}",
        stderr(&out)
    );
    let out = run_bounded(
        nix_command("nix-store")
            .args(["--store", &store, "--realise"])
            .arg(&both[1]),
    );
    assert!(!out.status.success(), "the failing build succeeded");
    let log = stderr(&out);
    assert!(log.contains("failed with exit code 1"), "{log}");
    assert!(log.contains("kiln-daemon-failure-marker"), "{log}");
    // Deleting nothing locally: the next test run has new paths anyway.
}

#[test]
fn bad_input_gets_an_error_and_the_daemon_serves_on() {
    if !(harness::can_run(harness::vm_unavailable()) && support::nix_available()) {
        return;
    }
    let trusted = Kiln::start_with(&["--nix-trusted"]);
    let untrusted = Kiln::start();
    bad_input::run_all(&trusted.nix_socket(), &untrusted.nix_socket());
    for kiln in [&trusted, &untrusted] {
        assert!(
            kiln.log().contains("nix worker operation refused"),
            "the refusals are not in the server's log:\n{}",
            kiln.log()
        );
    }
}
