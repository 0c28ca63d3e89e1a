//! Isolation, checked inside real VMs: a build cannot write its inputs,
//! cannot see another build's files, has no network, sees nothing of the
//! host beyond its shares, and runs as uid 1000 without capabilities.
//! (`/dev/kvm` and VMX/SVM only when asked: tests/executor_vm.rs.)

#![allow(clippy::unwrap_used)]

mod harness;

use harness::{Options, BUSYBOX};

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
const OTHER: &str = "nix/store/9bcdfghijklmnpqrsvwxyz0123456789-other";

async fn run_script(server: &harness::TestServer, script: &str) -> String {
    let req = server.snix_request(script, &[OUT]);
    String::from_utf8(server.build_first_file(req).await).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_host_and_privileges() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let input = format!("/nix/store/{BUSYBOX}");
    let script = format!(
        "exec > $out 2>&1; \
         for attempt in 'touch {input}/new' 'rm {input}/bin/sh' 'chmod 777 {input}/bin/busybox' 'mv {input} /nix/store/stolen' \
                        'echo x > {input}/bin/busybox'; do \
           if sh -c \"$attempt\" 2>/dev/null; then echo \"ALLOWED: $attempt\"; else echo \"refused: $attempt\"; fi; done; \
         echo ---; ls /; echo ---; cat /proc/self/status | grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapAmb)'; \
         echo ---; cat /proc/mounts | while read dev mnt rest; do echo $mnt; done; \
         echo ---; while read l; do case \"$l\" in *:*) echo \"${{l%%:*}}\";; esac; done < /proc/net/dev"
    );
    let text = run_script(&server, &script).await;
    assert!(
        !text.contains("ALLOWED"),
        "a build changed its input:\n{text}"
    );
    assert_eq!(text.matches("refused:").count(), 5, "{text}");
    let sections: Vec<&str> = text.split("---\n").collect();
    // The root holds the sandbox and nothing of the host or of the agent.
    let root: Vec<&str> = sections[1].lines().collect();
    for entry in &root {
        assert!(
            ["bin", "build", "dev", "etc", "nix", "proc", "tmp"].contains(entry),
            "unexpected /{entry}: {root:?}"
        );
    }
    let status = sections[2];
    assert!(status.contains("Uid:\t1000\t1000\t1000\t1000"), "{status}");
    assert!(status.contains("Gid:\t100\t100\t100\t100"), "{status}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let line = status.lines().find(|l| l.starts_with(cap)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    // Mounts: the sandbox's own, none of the host's paths.
    for m in sections[3].lines() {
        assert!(
            [
                "/",
                "/nix/store",
                "/build",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/proc",
                "/tmp"
            ]
            .contains(&m)
                || m.starts_with("/nix/store/"),
            "unexpected mount {m}:\n{}",
            sections[3]
        );
    }
    assert_eq!(
        sections[4].lines().collect::<Vec<_>>(),
        vec!["lo"],
        "no network interface but lo"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_builds_cannot_see_each_other() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    // Build A leaves files in its scratch paths and waits.
    let a = server.snix_request(
        &format!("echo secret > /build/secret-a; mkdir /{OTHER}; echo running; sleep 600"),
        &[OTHER],
    );
    let stream = harness::submit_until_log(server.channel().await, a, b"running").await;
    // Build B looks for them.
    let text = run_script(
        &server,
        "exec > $out; ls -a /build; echo ---; ls /nix/store",
    )
    .await;
    assert!(!text.contains("secret-a"), "{text}");
    assert!(
        !text.contains("9bcdfghijklmnpqrsvwxyz0123456789-other"),
        "{text}"
    );
    drop(stream);
    server.stop().await;
}

/// Nix's syscall filter, inside a real VM through the real agent: setuid
/// and setgid modes are refused with EPERM on all three x86 ABIs and leave
/// the mode alone, xattrs are refused with ENOTSUP, an ordinary chmod works,
/// and the filter and `no_new_privs` hold for what the builder spawns; and
/// as in Nix's sandbox, no address-space randomisation and no core dumps.
#[tokio::test(flavor = "multi_thread")]
async fn syscall_filter_as_nix_has_it() {
    use kiln::castore::ingest;
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    harness::syscall_probe(tmp.path());
    let probe = ingest::ingest_path(&server.store, tmp.path())
        .await
        .unwrap();
    let mut req = server.snix_request(
        &format!(
            "exec > $out 2>&1; /nix/store/{}/bin/syscall-probe /build/probe \
               chmod-setuid chmod-setgid chmod-plain fchmod-setuid fchmodat-setgid \
               fchmodat2-setuid i386-chmod-setuid x32-chmod-setuid setxattr lsetxattr fsetxattr status; \
             touch /build/f; chmod 4755 /build/f; echo \"busybox chmod 4755: $?\"; ls -l /build/f; \
             sh -c 'grep -E \"^(NoNewPrivs|Seccomp):\" /proc/self/status'; \
             echo \"personality $(cat /proc/self/personality), core $(ulimit -c)\"",
            harness::PROBE
        ),
        &[OUT],
    );
    req.inputs
        .push(probe.to_snix_entry(harness::PROBE.as_bytes()));
    let text = String::from_utf8(server.build_first_file(req).await).unwrap();
    for check in [
        "chmod-setuid",
        "chmod-setgid",
        "fchmod-setuid",
        "fchmodat-setgid",
        "fchmodat2-setuid",
        "i386-chmod-setuid",
        "x32-chmod-setuid",
    ] {
        assert!(
            text.contains(&format!("{check}: EPERM, mode 0644\n")),
            "{check}:\n{text}"
        );
    }
    assert!(text.contains("chmod-plain: ok, mode 0755\n"), "{text}");
    for check in ["setxattr", "lsetxattr", "fsetxattr"] {
        assert!(
            text.contains(&format!("{check}: ENOTSUP, mode 0644\n")),
            "{check}:\n{text}"
        );
    }
    assert!(text.contains("no_new_privs: 1\n"), "{text}");
    // busybox's chmod fails, the file keeps 0644, in a grandchild too.
    assert!(text.contains("busybox chmod 4755: 1\n"), "{text}");
    assert!(text.contains("-rw-r--r--"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1\nSeccomp:\t2\n"), "{text}");
    // As Nix: ADDR_NO_RANDOMIZE (0x0040000) and no core dumps.
    assert!(text.contains("personality 00040000, core 0\n"), "{text}");
    server.stop().await;
}
