//! Boots the real kernel with the real agent under QEMU/TCG (virtiofsd,
//! `QemuRunner`, `guest_image`) and checks what the build inside sees and
//! what comes out. Skips loudly without QEMU, virtiofsd or the artifacts
//! (`make kernel agent virtiofsd`).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod harness;

use std::os::unix::fs::PermissionsExt;

use harness::guest;
use kiln_guest::contract::{FrameKind, Outcome};

/// The sandbox as a Nix build sees it, in one VM.
#[tokio::test]
async fn the_build_sees_a_nix_like_sandbox() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let script = r#"
echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2
cat /proc/$$/environ > /build/environ
id -u > /build/uid; id -g > /build/gid; id -G > /build/groups; pwd > /build/cwd; hostname > /build/hostname
if echo x 2> /build/input-write > /nix/store/open/new; then echo WRITABLE >> /build/input-write; fi
if mv /nix/store/open /nix/store/moved 2> /build/input-move; then echo MOVED >> /build/input-move; fi
ls /dev > /build/dev
grep -c -w -e svm -e vmx /proc/cpuinfo > /build/virt-flags
cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' > /build/netdev
if test -e /bin/sh; then echo yes > /build/binsh; else echo no > /build/binsh; fi
cp /etc/passwd /etc/group /etc/hosts /build/
cp /build/extra/file /build/extra-copy
echo 1 > /tmp/t && echo 1 > /dev/shm/t && echo tmp-ok > /build/tmp-ok
mkdir /nix/store/out-dir && echo hi > /nix/store/out-dir/f
echo file > /nix/store/out-file && ln -s out-file /nix/store/out-link
echo out-3; echo err-3 >&2
"#;
    let mut job = guest::sh_job(script);
    job.env = vec![
        (b"HOME".to_vec(), b"/homeless-shelter".to_vec()),
        (b"NIX_BUILD_TOP".to_vec(), b"/build".to_vec()),
        (b"PATH".to_vec(), b"/nix/store/busybox/bin".to_vec()),
        (b"WEIRD".to_vec(), vec![0xff, 0xfe, b'=', b' ', b'\n', 0x80]),
    ];
    job.additional_files = vec![("build/extra/file".into(), b"passed as file\n".to_vec())];
    let run = guest::run(&job, false, |inputs| {
        // World-writable on the host: only the read-only mount can stop a write.
        let open = inputs.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    })
    .await;
    assert_eq!(
        run.report().outcome,
        Outcome::Exited { code: 0 },
        "stderr: {}",
        run.stderr()
    );
    let build = run.scratch.join("build");
    let read = |name: &str| {
        std::fs::read_to_string(build.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };

    let mut expected_env = Vec::new();
    for (k, v) in &job.env {
        expected_env.extend_from_slice(&[k.as_slice(), b"=", v.as_slice(), b"\0"].concat());
    }
    assert_eq!(
        std::fs::read(build.join("environ")).unwrap(),
        expected_env,
        "environment differs"
    );
    assert_eq!(
        (read("uid"), read("gid"), read("groups")),
        ("1000\n".into(), "100\n".into(), "100\n".into())
    );
    assert_eq!(read("cwd"), "/build\n");
    assert_eq!(read("hostname"), "localhost\n");
    assert!(
        read("input-write").contains("Read-only file system"),
        "{}",
        read("input-write")
    );
    assert!(
        !read("input-move").contains("MOVED"),
        "an input could be moved"
    );
    let dev: Vec<String> = read("dev").lines().map(String::from).collect();
    for node in [
        "full", "null", "ptmx", "pts", "random", "shm", "tty", "urandom", "zero",
    ] {
        assert!(
            dev.contains(&node.to_string()),
            "/dev/{node} missing: {dev:?}"
        );
    }
    assert!(
        !dev.contains(&"kvm".to_string()),
        "/dev/kvm present though not asked for"
    );
    assert_eq!(
        read("virt-flags"),
        "0\n",
        "the guest CPU shows virtualisation extensions"
    );
    assert_eq!(read("netdev"), "lo\n", "network interfaces other than lo");
    assert_eq!(read("binsh"), "no\n");
    assert!(
        read("passwd").contains("nixbld:x:1000:100:"),
        "{}",
        read("passwd")
    );
    assert!(read("group").contains("nixbld:!:100:"), "{}", read("group"));
    assert!(read("hosts").contains("127.0.0.1 localhost"));
    assert_eq!(read("extra-copy"), "passed as file\n");
    assert_eq!(read("tmp-ok"), "tmp-ok\n");

    let store = run.scratch.join("nix/store");
    assert_eq!(
        std::fs::read_to_string(store.join("out-dir/f")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(store.join("out-file")).unwrap(),
        "file\n"
    );
    assert_eq!(
        std::fs::read_link(store.join("out-link")).unwrap().to_str(),
        Some("out-file")
    );

    assert_eq!(run.stdout(), "out-1\nout-2\nout-3\n");
    assert_eq!(run.stderr(), "err-1\nerr-2\nerr-3\n");
    let started = run
        .frames
        .iter()
        .position(|(k, _)| *k == FrameKind::BuilderStarted)
        .expect("BuilderStarted frame");
    let first_output = run
        .frames
        .iter()
        .position(|(k, _)| *k == FrameKind::Stdout)
        .unwrap();
    assert!(started < first_output);
    assert_eq!(run.frames.last().map(|f| f.0), Some(FrameKind::Report));
}

/// An operator-allowed host path is visible read-only at its own path.
#[tokio::test]
async fn read_only_host_paths_are_mounted_read_only() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("hello"), "from the host\n").unwrap();
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut job = guest::sh_job(
        "cat /opt/shared/hello; if echo x 2>&1 > /opt/shared/new; then echo WRITABLE; fi",
    );
    job.ro_paths = vec![("kiln-ro-0".into(), "/opt/shared".into())];
    let run = guest::run_with_ro_shares(&job, false, |_| {}, &[("kiln-ro-0", host.path())]).await;
    assert_eq!(
        run.report().outcome,
        Outcome::Exited { code: 0 },
        "{}",
        run.stderr()
    );
    let out = run.stdout();
    assert!(out.starts_with("from the host\n"), "{out}");
    assert!(
        out.contains("Read-only file system") && !out.contains("WRITABLE"),
        "{out}"
    );
    assert!(!host.path().join("new").exists());
}

/// A layout other than Nix's (snix allows it): inputs outside any scratch
/// path, a working dir that is not a scratch path.
#[tokio::test]
async fn a_non_nix_layout_works() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job(
        "pwd; touch here && echo wd-writable; \
         if echo x 2>/dev/null > /inputs/busybox/new; then echo INPUT-WRITABLE; fi; \
         echo data > /out/result",
    );
    job.command_args[0] = "/inputs/busybox/bin/sh".into();
    job.env = vec![(b"PATH".to_vec(), b"/inputs/busybox/bin".to_vec())];
    job.inputs_dir = "inputs".into();
    job.scratch_paths = vec!["out".into()];
    job.working_dir = "work".into();
    let run = guest::run(&job, false, |_| {}).await;
    assert_eq!(
        run.report().outcome,
        Outcome::Exited { code: 0 },
        "{}",
        run.stderr()
    );
    assert_eq!(run.stdout(), "/work\nwd-writable\n");
    assert_eq!(
        std::fs::read_to_string(run.scratch.join("out/result")).unwrap(),
        "data\n"
    );
}

#[tokio::test]
async fn exit_codes_are_reported_and_leftover_processes_killed() {
    if !harness::vm_tests_can_run() {
        return;
    }
    // The background job keeps stdout open; unless the agent kills it, it
    // outlives the builder long enough to write its file.
    let job = guest::sh_job("(sleep 1; echo alive > /build/leftover) & echo bye; exit 3");
    let run = guest::run(&job, false, |_| {}).await;
    assert_eq!(run.report().outcome, Outcome::Exited { code: 3 });
    assert_eq!(run.stdout(), "bye\n");
    assert!(
        !run.scratch.join("build/leftover").exists(),
        "a process of the build user survived the builder"
    );
    eprintln!(
        "boot-to-report (exit 3 + leftover): {:?}, report {:?}",
        run.elapsed,
        run.report()
    );
}

#[tokio::test]
async fn signals_are_reported() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let run = guest::run(&guest::sh_job("kill -9 $$"), false, |_| {}).await;
    assert_eq!(run.report().outcome, Outcome::Signaled { signal: 9 });
}

#[tokio::test]
async fn dev_kvm_opens_for_the_build_user_when_asked() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job("");
    job.kvm = true;
    job.provide_bin_sh = true;
    // /bin/sh is the agent's busybox; the applets come from the input.
    job.command_args = vec![
        "/bin/sh".into(),
        "-c".into(),
        "id -u; exec 3<>/dev/kvm && echo kvm-opened".into(),
    ];
    let run = guest::run(&job, true, |_| {}).await;
    assert_eq!(
        run.report().outcome,
        Outcome::Exited { code: 0 },
        "stderr: {}",
        run.stderr()
    );
    assert_eq!(run.stdout(), "1000\nkvm-opened\n");
}

/// Agent failures come back as such, quickly, with the step that failed.
async fn expect_agent_failure(job: kiln_guest::contract::Job, step: &str, needle: &str) {
    assert_agent_failure(&guest::run(&job, false, |_| {}).await, step, needle);
}

fn assert_agent_failure(run: &guest::VmRun, step: &str, needle: &str) {
    match &run.report().outcome {
        Outcome::AgentFailed { step: s, message } => {
            assert_eq!(s, step, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected an agent failure at {step}, got {other:?}"),
    }
    assert!(run.elapsed.as_secs() < 30, "took {:?}", run.elapsed);
}

#[tokio::test]
async fn a_missing_module_is_an_agent_failure() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job("true");
    job.modules = guest::qemu_guest_modules();
    job.modules.push("no_such_module".into());
    // The session writes the transport's own list; this job file replaces it.
    let run = guest::run_job_file(&guest::job_file(&job)).await;
    let artifacts = kiln::guest_image::Artifacts::from_env().unwrap();
    let modular = std::fs::read_dir(artifacts.modules_dir())
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if modular {
        assert_agent_failure(&run, "module", "no_such_module");
    } else {
        // kiln's own kernel has every driver built in and no module
        // support: the agent skips the module list, as documented.
        assert_eq!(
            run.report().outcome,
            Outcome::Exited { code: 0 },
            "stderr: {}",
            run.stderr()
        );
    }
}

#[tokio::test]
async fn a_broken_job_is_an_agent_failure() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job("true");
    job.working_dir = "../escape".into();
    expect_agent_failure(job, "job", "working_dir").await;
}

#[tokio::test]
async fn an_undecodable_job_is_an_agent_failure() {
    if !harness::vm_tests_can_run() {
        return;
    }
    // Without a job there is no module list: the agent must still find its
    // channel to say so.
    let run = guest::run_job_file(b"{not json").await;
    match &run.report().outcome {
        Outcome::AgentFailed { step, message } => {
            assert_eq!(step, "job");
            assert!(message.contains("decoding"), "{message}");
        }
        other => panic!("expected an agent failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_builder_that_cannot_be_executed_is_an_agent_failure() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job("true");
    job.command_args = vec!["/nix/store/missing/bin/sh".into()];
    expect_agent_failure(job, "exec", "No such file").await;
}

/// Measures boot-to-report of a trivial job (printed; the assertion is loose
/// because TCG timing is noisy).
#[tokio::test]
async fn a_trivial_job_boots_and_reports_quickly() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let run = guest::run(&guest::sh_job("true"), false, |_| {}).await;
    let r = run.report();
    assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    eprintln!(
        "trivial job: session boot (virtiofsd, initramfs, QEMU) to report {:?}, to power-off {:?} (kernel boot {} ms, agent setup {} ms, build {} ms)",
        run.to_report, run.elapsed, r.boot_ms, r.setup_ms, r.build_ms
    );
    eprintln!(
        "agent: {}",
        String::from_utf8_lossy(&run.stream(FrameKind::AgentLog))
    );
    if std::env::var_os("KILN_TEST_KERNEL_ARGS").is_some() {
        eprintln!("serial:\n{}", run.serial);
    }
    assert!(run.elapsed.as_secs() < 30);
}

/// The names in the scratch share's top directory: anything beyond the
/// scratch paths' first components was written from outside the sandbox.
fn scratch_top(run: &guest::VmRun) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&run.scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A symlink input pointing at the guest's view of the scratch share's top
/// (outside the sandbox root, but on the host where the test can see it),
/// and one pointing at `/proc/sys`.
fn plant_escape_links(inputs: &std::path::Path) {
    std::os::unix::fs::symlink("/kiln/shares/scratch", inputs.join("esc")).unwrap();
    std::os::unix::fs::symlink("/proc/sys", inputs.join("sys")).unwrap();
}

/// An additional file through a symlink input is refused before anything
/// is written: the agent refuses additional files among the inputs at all,
/// so neither the decoy outside the root nor `/proc/sys` is touched.
#[tokio::test]
async fn an_additional_file_through_a_symlink_input_writes_nothing() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut job = guest::sh_job("cat /proc/sys/kernel/domainname");
    job.additional_files = vec![
        ("nix/store/esc/planted".into(), b"escaped\n".to_vec()),
        (
            "nix/store/sys/kernel/domainname".into(),
            b"escaped\n".to_vec(),
        ),
    ];
    let run = guest::run(&job, false, plant_escape_links).await;
    assert_eq!(
        scratch_top(&run),
        ["build", "nix"],
        "written outside the root"
    );
    match &run.report().outcome {
        Outcome::AgentFailed { step, message } => {
            assert_eq!(step, "job", "{message}");
            assert!(
                message.contains("nix/store/esc/planted") && message.contains("inputs_dir"),
                "{message}"
            );
        }
        other => panic!(
            "expected the job to be refused, got {other:?}; stdout {:?}",
            run.stdout()
        ),
    }
}

/// A read-only path reached through a symlink input fails the set-up
/// naming the link, and no mount point appears outside the root.
#[tokio::test]
async fn a_mount_point_through_a_symlink_input_fails_the_setup() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    let mut job = guest::sh_job("true");
    job.ro_paths = vec![("kiln-ro-0".into(), "/nix/store/esc/mnt".into())];
    let run = guest::run_with_ro_shares(
        &job,
        false,
        plant_escape_links,
        &[("kiln-ro-0", host.path())],
    )
    .await;
    match &run.report().outcome {
        Outcome::AgentFailed { step, message } => {
            assert_eq!(step, "sandbox", "{message}");
            assert!(
                message.contains("/nix/store/esc/mnt")
                    && message.contains("/nix/store/esc: it is a symbolic link"),
                "{message}"
            );
        }
        other => panic!("expected a sandbox failure, got {other:?}"),
    }
    assert_eq!(
        scratch_top(&run),
        ["build", "nix"],
        "written outside the root"
    );
}

/// Modes as in a Nix sandbox: `/etc` 0555 with 0644 files (Nix 2.8 leaves
/// `/etc` 0755; later Nix makes it 0555), the builder's umask 022, mount
/// points and additional files with explicit modes rather than the umask's.
#[tokio::test]
async fn the_sandbox_has_nix_modes_and_umask() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let script = "stat -c '%n %a %u' /etc /etc/passwd /etc/group /etc/hosts /build/extra \
                  /build/extra/file; umask; echo x > /build/made; mkdir /build/made-dir";
    let mut job = guest::sh_job(script);
    job.additional_files = vec![("build/extra/file".into(), b"f\n".to_vec())];
    let run = guest::run(&job, false, |_| {}).await;
    assert_eq!(
        run.report().outcome,
        Outcome::Exited { code: 0 },
        "{}",
        run.stderr()
    );
    assert_eq!(
        run.stdout(),
        "/etc 555 0\n/etc/passwd 644 0\n/etc/group 644 0\n/etc/hosts 644 0\n\
         /build/extra 755 1000\n/build/extra/file 644 1000\n0022\n"
    );
    let mode = |rel: &str| {
        std::fs::symlink_metadata(run.scratch.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("build/made"), 0o644);
    assert_eq!(mode("build/made-dir"), 0o755);
    // The input's mount point, left on the scratch share.
    assert_eq!(mode("nix/store/busybox"), 0o755);
}
