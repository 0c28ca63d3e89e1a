//! The executor end to end: gRPC requests (both layouts) built in real VMs
//! (QEMU/TCG here) with the real kernel, agent and virtiofsd, outputs read
//! back from the castore, and nothing left behind.

#![allow(clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use kiln::castore::{Node, WireNode};
use kiln::client::Follow;
use kiln::grpc::status::failed_detail;
use kiln::proto::kiln_v1::{submit_request, SubmitRequest};
use kiln::proto::{snix_build, tvix_build};
use tonic::Code;

use harness::{Options, BUSYBOX};

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
const OUT2: &str = "nix/store/2bcdfghijklmnpqrsvwxyz0123456789-lib";
const OUT3: &str = "nix/store/3bcdfghijklmnpqrsvwxyz0123456789-link";

#[tokio::test(flavor = "multi_thread")]
async fn directory_file_and_symlink_outputs_in_request_order() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = server.snix_request(
        "set -e; mkdir -p $out/sub; echo hello > $out/sub/f; chmod +x $out/sub/f; ln -s sub/f $out/l; \
         echo lib > $out1; ln -s /nix/store/elsewhere $out2",
        &[OUT, OUT3, OUT2],
    );
    // Outputs not sorted (output-name order, as newer snix clients send): accepted.
    let answer = server.snix().await.do_build(req).await.unwrap();
    let id = answer
        .metadata()
        .get("x-kiln-build-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let resp = answer.into_inner();
    assert_eq!(resp.outputs.len(), 3);
    // A Watch of a finished DoBuild ends, with the same answer.
    let watch = Follow::watch(server.channel().await, &id).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), watch.to_end(&mut ()))
        .await
        .expect("the watch of a finished DoBuild must end")
        .unwrap_or_else(|e| panic!("the watch did not end with completed: {e}"))
        .completed;
    assert_eq!(done.snix.as_ref(), Some(&resp));
    let nodes: Vec<Node> = resp
        .outputs
        .iter()
        .map(|o| {
            // Anonymous: validation refuses a name.
            o.output.clone().unwrap().try_into_anonymous().unwrap()
        })
        .collect();
    // OUT: a directory {l -> sub/f, sub/{f (exec)}}
    let Node::Directory { digest, .. } = &nodes[0] else {
        panic!("{:?}", nodes[0])
    };
    let dir = server.store.directories.get(digest).await.unwrap().unwrap();
    let names: Vec<String> = dir
        .nodes()
        .map(|(n, _)| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .collect();
    assert_eq!(names, vec!["l", "sub"]);
    // $out1 (OUT3) is a file, $out2 (OUT2) a symlink — answered in request order.
    assert!(
        matches!(&nodes[2], Node::Symlink { target } if target.as_bytes() == b"/nix/store/elsewhere"),
        "{:?}",
        nodes[2]
    );
    let Node::File {
        digest, executable, ..
    } = &nodes[1]
    else {
        panic!("{:?}", nodes[1])
    };
    assert!(!executable);
    assert_eq!(server.read_blob(digest).await, b"lib\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_layout_request_builds_and_answers_sorted_basenames() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = tvix_build::BuildRequest {
        command_args: vec![
            format!("/nix/store/{BUSYBOX}/bin/sh"),
            "-c".into(),
            "echo b > $b; echo a > $a".into(),
        ],
        outputs: vec!["2-b".into(), "1-a".into()],
        environment_vars: vec![
            tvix_build::build_request::EnvVar {
                key: "a".into(),
                value: b"/nix/store/1-a".to_vec().into(),
            },
            tvix_build::build_request::EnvVar {
                key: "b".into(),
                value: b"/nix/store/2-b".to_vec().into(),
            },
        ],
        inputs: vec![server.busybox_node()],
        constraints: Some(tvix_build::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            min_memory: 0,
            available_ro_paths: vec![],
        }),
    };
    let build = server
        .tvix()
        .await
        .do_build(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        build.build_request.as_ref(),
        Some(&req),
        "the request is echoed"
    );
    let names: Vec<Vec<u8>> = build
        .outputs
        .iter()
        .map(|n| {
            Node::try_from_tvix_node(n.clone())
                .unwrap()
                .0
                .as_bytes()
                .to_vec()
        })
        .collect();
    assert_eq!(names, vec![b"1-a".to_vec(), b"2-b".to_vec()]);
    server.stop().await;
}

/// `kiln.v1.SubmitRequest.argv0`: the guest execs `command_args[0]` with
/// that argv[0], as Nix execs a builder with its basename. busybox picks its
/// applet by argv[0], so `busybox -c …` only runs as a shell when argv[0] is
/// `sh`. A plain `DoBuild` (snix clients) keeps argv == command_args.
#[tokio::test(flavor = "multi_thread")]
async fn submit_with_argv0_runs_the_builder_under_that_name() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    // The last command would replace the shell (busybox execs it), so the
    // shell's argv is read from a command that is not last.
    let script = "echo $0 > $out; cat /proc/$$/cmdline >> $out; echo >> $out";
    let mut req = server.snix_request(script, &[OUT]);
    req.command_args[0] = format!("/nix/store/{BUSYBOX}/bin/busybox");
    let submit = SubmitRequest {
        request: Some(submit_request::Request::Snix(req)),
        argv0: "sh".into(),
        limits: None,
    };
    let follow = Follow::submit(server.channel().await, submit)
        .await
        .unwrap();
    let done = harness::events::to_end(follow, &mut ())
        .await
        .unwrap_or_else(|e| panic!("the build with argv0 failed: {e}"));
    let resp = done.completed.snix.unwrap();
    let seen = server
        .read_file_entry(resp.outputs[0].output.as_ref().unwrap())
        .await;
    assert_eq!(
        String::from_utf8_lossy(&seen),
        format!("sh\nsh\0-c\0{script}\0\n"),
        "$0, then the shell's whole argv"
    );

    let plain = server.snix_request("echo $0 > $out", &[OUT]);
    let sh = plain.command_args[0].clone();
    let seen = server.build_first_file(plain).await;
    assert_eq!(String::from_utf8_lossy(&seen), format!("{sh}\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_facts_seen_by_the_builder() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let script = "set -e; exec > $out; \
        env | sort; echo ---; id -u; id -g; pwd; hostname; while read l; do case \"$l\" in *:*) echo \"${l%%:*}\";; esac; done < /proc/net/dev; echo ---; \
        grep MemTotal /proc/meminfo; \
        if echo x > /nix/store/0bcdfghijklmnpqrsvwxyz0123456789-busybox/bin/new 2>/dev/null; then echo input-writable; else echo input-readonly; fi; \
        if test -e /dev/kvm; then echo kvm-present; else echo kvm-absent; fi; \
        if grep -qE 'vmx|svm' /proc/cpuinfo; then echo virt-ext; else echo no-virt-ext; fi; \
        echo scratch > /build/in-scratch";
    let mut req = server.snix_request(script, &[OUT]);
    req.environment_vars
        .push(snix_build::build_request::EnvVar {
            key: "RAW".into(),
            value: vec![b'a', 0xff, 0xfe, b'z'].into(),
        });
    req.environment_vars.sort_by(|a, b| a.key.cmp(&b.key));
    req.constraints.as_mut().unwrap().min_memory = 1024 * 1024 * 1024;
    let resp = server
        .snix()
        .await
        .do_build(req.clone())
        .await
        .unwrap()
        .into_inner();
    let text = server
        .read_file_entry(resp.outputs[0].output.as_ref().unwrap())
        .await;
    let text_str = String::from_utf8_lossy(&text);
    // Environment: exactly what was sent (busybox env adds nothing, sorted here).
    let env_block = &text[..text.windows(4).position(|w| w == b"---\n").unwrap()];
    let mut expected: Vec<Vec<u8>> = req
        .environment_vars
        .iter()
        .map(|e| [e.key.as_bytes(), b"=", &e.value[..]].concat())
        .collect();
    expected.push(b"PWD=/build".to_vec()); // busybox sh exports PWD itself
    expected.push(b"SHLVL=1".to_vec());
    expected.sort();
    let mut got: Vec<Vec<u8>> = env_block
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.to_vec())
        .collect();
    got.sort();
    assert_eq!(
        got.iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>()
    );
    assert!(
        got.contains(&b"RAW=a\xff\xfez".to_vec()),
        "non-UTF-8 value arrives as bytes"
    );
    let lines: Vec<&str> = text_str.split("---\n").nth(1).unwrap().lines().collect();
    assert_eq!(
        lines,
        vec!["1000", "100", "/build", "localhost", "lo"],
        "{text_str}"
    );
    let mem_kb: u64 = text_str
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        mem_kb * 1024 >= 1024 * 1024 * 1024,
        "guest MemTotal {mem_kb} kB < min_memory 1 GiB"
    );
    assert!(text_str.contains("input-readonly"), "{text_str}");
    assert!(text_str.contains("kvm-absent"), "{text_str}");
    assert!(
        text_str.contains("no-virt-ext"),
        "without /dev/kvm the guest has no VMX/SVM: {text_str}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_kvm_only_when_asked() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let mut req = server.snix_request(
        "set -e; test -c /dev/kvm; exec 3</dev/kvm; grep -qE 'vmx|svm' /proc/cpuinfo; echo kvm-usable > $out",
        &[OUT],
    );
    req.constraints.as_mut().unwrap().available_ro_paths = vec!["/dev/kvm".into()];
    assert_eq!(server.build_first_file(req).await, b"kvm-usable\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_builder_reports_exit_status_and_log_tail() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = server.snix_request("echo first line; echo 'about to fail' >&2; exit 3", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("status 3"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("about to fail"),
        "{}",
        status.message()
    );
    let detail = failed_detail(&status).unwrap();
    assert_eq!(detail.kind, "builder_failed");
    assert_eq!(detail.exit_code, Some(3));
    assert!(String::from_utf8_lossy(&detail.log_tail).contains("first line"));

    let req = server.snix_request("kill -9 $$", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(
        failed_detail(&status).unwrap().signal,
        Some(9),
        "{status:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_output_is_named() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = server.snix_request("echo nothing", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(failed_detail(&status).unwrap().kind, "missing_output");
    assert!(status.message().contains(OUT), "{}", status.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_from_client_deadline() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = server.snix_request("sleep 600", &[OUT]);
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let status = server.snix().await.do_build(request).await.unwrap_err();
    // The client's own deadline may fire first; either way the build is gone.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_timeout_gives_deadline_exceeded() {
    let opts = Options {
        timeout: Duration::from_secs(15),
        ..Options::default()
    };
    let Some(server) = harness::start(opts).await else {
        return;
    };
    let req = server.snix_request("echo started; sleep 600", &[OUT]);
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(failed_detail(&status).unwrap().kind, "timeout");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cancel_removes_the_vm_within_a_second() {
    // No pool, so that every VM process of the server is the build's.
    let Some(server) = harness::start(Options {
        warm_vms: 0,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let req = server.snix_request("echo running; sleep 600", &[OUT]);
    let stream = harness::submit_until_log(server.channel().await, req, b"running").await;
    let runs = server.data_dir.join("runs");
    assert!(
        !harness::processes_mentioning(runs.as_os_str().as_encoded_bytes()).is_empty(),
        "VM should be running"
    );
    drop(stream);
    let dropped = Instant::now();
    while !harness::processes_mentioning(runs.as_os_str().as_encoded_bytes()).is_empty() {
        assert!(
            dropped.elapsed() < Duration::from_secs(1),
            "VM still running {:?} after the client went away",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn more_builds_than_vm_slots_all_complete() {
    let opts = Options {
        max_vms: 1,
        ..Options::default()
    };
    let Some(server) = harness::start(opts).await else {
        return;
    };
    let mut calls = Vec::new();
    for i in 0..3 {
        let req = server.snix_request(&format!("echo {i} > $out"), &[OUT]);
        let mut client = server.snix().await;
        calls.push(tokio::spawn(async move { client.do_build(req).await }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let resp = call.await.unwrap().unwrap().into_inner();
        let content = server
            .read_file_entry(resp.outputs[0].output.as_ref().unwrap())
            .await;
        assert_eq!(content, format!("{i}\n").into_bytes());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn network_access_is_refused_clearly() {
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let mut req = server.snix_request("true", &[OUT]);
    req.constraints.as_mut().unwrap().network_access = true;
    let status = server.snix().await.do_build(req).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("network"), "{}", status.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_build_cli_follows_the_log_and_watch_replays_it() {
    use prost::Message;
    let Some(server) = harness::start(Options::default()).await else {
        return;
    };
    let req = server.snix_request("echo from-the-builder; echo cli > $out", &[OUT]);
    // The request file in the protobuf JSON mapping, wrapped as a SubmitRequest.
    let pool = prost_reflect::DescriptorPool::decode(kiln::proto::FILE_DESCRIPTOR_SET).unwrap();
    let desc = pool.get_message_by_name("kiln.v1.SubmitRequest").unwrap();
    let submit = SubmitRequest {
        request: Some(submit_request::Request::Snix(req)),
        argv0: String::new(),
        limits: None,
    };
    let dynamic =
        prost_reflect::DynamicMessage::decode(desc, submit.encode_to_vec().as_slice()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("request.json");
    std::fs::write(&file, serde_json::to_vec(&dynamic).unwrap()).unwrap();

    let addr = server.addr.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["build", "--addr", &addr])
            .arg(&file)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("from-the-builder"),
        "the build log is shown: {stdout}"
    );
    assert!(
        stdout.contains("output[0] (anonymous) file"),
        "the output is printed: {stdout}"
    );
    assert!(stderr.contains("] boot"), "progress lines: {stderr}");

    // Watch replays the finished build from the server's log.
    let id = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("kiln: build ")
                .and_then(|r| r.split_whitespace().next())
        })
        .unwrap()
        .to_owned();
    let mut log = harness::LogBytes::default();
    let watch = Follow::watch(server.channel().await, &id).await.unwrap();
    let ended = harness::events::to_end(watch, &mut log).await;
    let log = String::from_utf8_lossy(&log.0);
    assert!(
        ended.is_ok() && log.contains("from-the-builder"),
        "watch of {id}: {ended:?}, log {log:?}"
    );
    let unknown = Follow::watch(server.channel().await, "nope")
        .await
        .err()
        .expect("an unknown build id is refused");
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_vms_build_with_inputs_put_in_their_share_after_boot_and_run_one_build_each() {
    let Some(server) = harness::start(Options {
        warm_vms: 1,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    server.until_pool("a VM waiting", |s| s.waiting == 1).await;
    let runs = server.data_dir.join("runs");
    let waiting_dir = || -> Vec<String> {
        std::fs::read_dir(&runs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let first_vm = waiting_dir();
    assert_eq!(first_vm.len(), 1, "{first_vm:?}");
    // The input reaches the VM's share after the VM booted; the builder
    // reads it through busybox (itself an input).
    let req = server.snix_request(
        &format!("cat /nix/store/{BUSYBOX}/bin/sh | wc -c > $out; echo warm >> $out"),
        &[OUT],
    );
    let out = server.build_first_file(req).await;
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with("warm\n"), "{text:?}");
    assert_ne!(
        text.lines().next(),
        Some("0"),
        "busybox was readable: {text:?}"
    );
    let stats = server
        .until_pool("refilled after the build", |s| {
            s.assigned == 1 && s.waiting == 1
        })
        .await;
    assert!(stats.booted >= 2, "{stats:?}");
    let second_vm = waiting_dir();
    assert_ne!(
        first_vm, second_vm,
        "a fresh VM waits, not the one that built"
    );

    // A second build gets the second VM, and sees nothing of the first.
    let req = server.snix_request(
        "ls -A /nix/store /build > /build/l; mv /build/l $out",
        &[OUT],
    );
    let listing = String::from_utf8(server.build_first_file(req).await).unwrap();
    assert_eq!(
        listing,
        format!("/build:\nl\n\n/nix/store:\n{BUSYBOX}\n"),
        "only this build's input and its own file (l, the listing itself)"
    );
    server
        .until_pool("the second build was warm", |s| s.assigned == 2)
        .await;

    // A build that asks for more memory than the pool's VMs have boots cold.
    let mut big = server.snix_request("echo cold > $out", &[OUT]);
    big.constraints.as_mut().unwrap().min_memory = 1 << 30;
    let cold = server.build_first_file(big).await;
    assert_eq!(cold, b"cold\n");
    let stats = server.pool_stats().unwrap();
    assert_eq!(
        stats.assigned, 2,
        "the big build was not given a pool VM: {stats:?}"
    );
    server.stop().await;
}
