//! Conformance against Nix itself: every derivation of
//! `tests/fixtures/nix/conformance.nix` is built with `nix-store --realise`
//! (Nix 2.8 in its own sandbox) and with `kiln build --drv` (a kiln server
//! booting a microVM per build), and the NAR hashes of all outputs must be
//! equal. Covers file, symlink and directory outputs, several outputs,
//! executable bits, nested directories, the environment and cwd the builder
//! sees, `$TMPDIR`, outputs referring to inputs, a derivation depending on
//! others (one of them missing locally, so kiln builds it first), passAsFile,
//! structured attributes, fixed-output derivations (flat sha256, flat sha1,
//! recursive sha512, an SRI `outputHash`), Nix's syscall filter
//! (setuid/setgid modes and xattrs refused) and the builder's argv[0]. A
//! fixed-output derivation whose output differs from its declared hash must
//! fail in both, kiln naming the two hashes as Nix does.
//!
//! Needs Nix, QEMU, virtiofsd and kiln's guest artifacts (`make deps agent`);
//! skips loudly without them.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;
#[path = "fixtures/nix/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::nix::{closure, StorePath};

/// A `kiln serve` process on a unix socket, killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kiln.sock");
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // Offline on purpose: this suite runs in the host's own network
            // namespace, and its fixed-output derivation checks the retry
            // without network (tests/network.rs builds one with network).
            .arg("--no-network")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.socket.exists() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("kiln serve exited ({status}):\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not start:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }

    /// `kiln build --drv`: output path -> NAR hash as printed, and what
    /// it printed on stderr; or the failure with its log.
    fn build_drv(
        &self,
        drv: &StorePath,
        out: Option<&Path>,
    ) -> Result<(BTreeMap<StorePath, String>, String), String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(["build", "--addr"])
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--drv")
            .arg(drv.to_string());
        if let Some(out) = out {
            command.arg("--out").arg(out);
        }
        let output = command.stdin(Stdio::null()).output().unwrap();
        if !output.status.success() {
            return Err(format!(
                "kiln build --drv {drv} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let stdout = String::from_utf8(output.stdout).unwrap();
        let printed = stdout
            .lines()
            .map(|line| {
                let (path, hash) = line.split_once(' ').unwrap();
                (path.parse().unwrap(), hash.to_owned())
            })
            .collect();
        Ok((
            printed,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What Nix says: output path -> `nix-store --query --hash`.
fn nix_build(drv: &StorePath) -> BTreeMap<StorePath, String> {
    support::realise(drv)
        .into_iter()
        .map(|path| {
            let hash = support::query_hash(&path);
            (path, hash)
        })
        .collect()
}

const ATTRIBUTES: &[&str] = &[
    "file",
    "symlink",
    "tree",
    "multi",
    "environment",
    "tmpdir",
    "passAsFile",
    "fixed",
    "fixedSha1",
    "fixedSha512",
    "fixedSri",
    "structured",
    "dependent",
    "syscallFilter",
    "argv0",
];

#[test]
fn kiln_builds_derivations_to_the_same_nar_hashes_as_nix() {
    if !support::nix_available() {
        return;
    }
    if !harness::vm_tests_can_run() {
        return;
    }
    // So `dependent` finds one input missing and kiln builds it first.
    let file_drv = support::instantiate("file");
    let file_out = closure::read_derivation(&file_drv).unwrap().outputs["out"]
        .path
        .clone()
        .unwrap();
    support::try_delete(std::slice::from_ref(&file_out));
    let file_missing = !closure::invalid_paths(std::slice::from_ref(&file_out))
        .unwrap()
        .is_empty();
    if !file_missing {
        eprintln!("note: {file_out} could not be deleted, `dependent` finds all inputs present");
    }

    let server = Server::start();
    let mut failures = Vec::new();
    // kiln first, so the deleted input is still missing when it plans.
    for attr in ATTRIBUTES.iter().rev() {
        let drv = support::instantiate(attr);
        let kiln = server.build_drv(&drv, None);
        let nix = nix_build(&drv);
        match kiln {
            Ok((kiln, _)) if kiln != nix => {
                failures.push(format!("{attr}: kiln {kiln:#?}\n nix {nix:#?}"))
            }
            Ok((_, log))
                if *attr == "dependent"
                    && file_missing
                    && !log.contains(&format!("building {file_drv}")) =>
            {
                failures.push(format!("dependent: missing input not built first:\n{log}"))
            }
            // kiln gives builds no network: the fixed-output build is
            // refused with the `network` precondition and built offline.
            Ok((_, log)) if *attr == "fixed" && !log.contains("offers no network") => {
                failures.push(format!("fixed: not retried offline:\n{log}"))
            }
            Ok(_) => eprintln!("ok: {attr}"),
            Err(e) => failures.push(format!("{attr}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} derivations differ:\n{}\nserver log:\n{}",
        failures.len(),
        ATTRIBUTES.len(),
        failures.join("\n\n"),
        server.log()
    );
}

/// `fixedWrong` declares sha256 of the empty file and writes something
/// else: Nix refuses it, and so must kiln, naming both hashes in SRI form
/// and the same ones Nix names.
#[test]
fn a_wrong_fixed_output_hash_fails_in_nix_and_in_kiln() {
    if !support::nix_available() {
        return;
    }
    if !harness::vm_tests_can_run() {
        return;
    }
    let drv = support::instantiate("fixedWrong");
    let nix = support::nix_command("nix-store")
        .args(["--realise", &drv.to_string()])
        .output()
        .unwrap();
    let nix_error = String::from_utf8_lossy(&nix.stderr);
    assert!(!nix.status.success(), "Nix accepted {drv}:\n{nix_error}");
    // Nix 2.8: "hash mismatch in fixed-output derivation '…':\n
    //   specified: sha256-…\n      got:    sha256-…".
    let nix_says = |label: &str| {
        nix_error
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(|hash| hash.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label:?} in Nix's error:\n{nix_error}"))
    };
    let specified = nix_says("specified:");
    let got = nix_says("got:");
    // Computed without Nix's build: `sha256sum` of the empty file and of
    // `printf 'not what was declared\n'`, each through `nix hash to-sri`.
    assert_eq!(
        specified,
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
    assert_eq!(got, "sha256-uymF685VkFtMw3D91VTZE4mckAsQz7uVNxOLVqWfd18=");

    let server = Server::start();
    let kiln_error = match server.build_drv(&drv, None) {
        Ok((printed, _)) => panic!("kiln accepted {drv}: {printed:?}"),
        Err(e) => e,
    };
    for expected in [
        format!("hash mismatch in fixed-output derivation '{drv}'"),
        format!("\n  specified: {specified}\n"),
        format!("\n  got:       {got}"),
    ] {
        assert!(
            kiln_error.contains(&expected),
            "kiln's error lacks {expected:?}:\n{kiln_error}"
        );
    }
}

#[test]
fn out_materialises_what_nix_built() {
    if !support::nix_available() {
        return;
    }
    if !harness::vm_tests_can_run() {
        return;
    }
    let server = Server::start();
    let drv = support::instantiate("tree");
    let dir = tempfile::tempdir().unwrap();
    let (printed, _) = server.build_drv(&drv, Some(dir.path())).unwrap();
    for (path, hash) in printed {
        let local = dir.path().join(path.basename());
        let ours = kiln::nix::nar::nar_hash_path(&local).unwrap();
        assert_eq!(ours.to_string(), hash, "{path} materialised differently");
        let reference = support::realise(&drv);
        assert!(reference.contains(&path));
        assert_eq!(support::query_hash(&path), hash);
    }
}
