//! Running kiln as a service, against the real `kiln serve` binary booting
//! real VMs: SIGTERM lets running builds finish (or cancels them once the
//! grace is over) and exits 0 leaving nothing behind; SIGHUP re-reads the
//! token files without touching a running build; the operator commands
//! (`kiln builds`, `kiln cancel`, `kiln logs`) see and stop every
//! tenant's builds with an operator token, a client's token only its own
//! tenant's, and nothing without a token; `--log-format json` logs JSON.

#![allow(clippy::unwrap_used)]

mod harness;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::Code;

use kiln::proto::snix_build;

use harness::serve::{running, secret_file, Serve, LIMIT};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_running_build_finish_refuses_new_ones_and_exits_0() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut serve = Serve::start(&["--log-format", "json", "--shutdown-grace", "60"]).await;
    let build = running(
        serve.channel(None).await,
        serve.request("echo running; sleep 4; echo finished > $out"),
        b"running",
    )
    .await;
    let id = build.build_id().to_owned();
    // A connection opened before the signal, for a build sent after it.
    let late = serve.channel(None).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = snix_build::build_service_client::BuildServiceClient::new(late)
        .do_build(serve.request("echo too late > $out"))
        .await
        .expect_err("a build sent after SIGTERM is refused");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Cancelled),
        "{refused:?}"
    );
    let done = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .unwrap_or_else(|e| panic!("the running build was not let finish: {e}\n{}", serve.log()));
    assert!(done.completed.snix.is_some(), "{done:?}");
    let status = serve.exited().await;
    assert!(status.success(), "exit {status}:\n{}", serve.log());
    serve.nothing_left().await;

    // --log-format json: every line is a JSON object, and the build's lines
    // carry its id.
    let log = serve.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["id"] == id.as_str() && l["fields"]["message"] == "build succeeded"),
        "no JSON line of build {id} saying it succeeded:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_a_build_that_outlasts_the_grace_and_leaves_nothing() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let mut serve = Serve::start(&["--shutdown-grace", "2"]).await;
    let build = running(
        serve.channel(None).await,
        serve.request("echo running; sleep 600"),
        b"running",
    )
    .await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let err = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .expect_err("the build outlasted the grace");
    let failed = err.failed().expect("a Failed event");
    assert_eq!(failed.kind, "shutdown", "{failed:?}");
    assert_eq!(Code::from_i32(failed.code), Code::Unavailable);
    assert!(
        failed.message.contains("--shutdown-grace"),
        "{}",
        failed.message
    );
    let status = serve.exited().await;
    assert!(status.success(), "exit {status}:\n{}", serve.log());
    serve.nothing_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_token_file_and_leaves_the_running_build_alone() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = secret_file(keys.path(), "tokens", "retiring-token-1\n");
    let old = secret_file(keys.path(), "old", "retiring-token-1\n");
    let new = secret_file(keys.path(), "new", "arriving-token-2\n");
    let tokens_arg = tokens.to_str().unwrap().to_owned();
    let serve = Serve::start(&["--auth-tokens", &tokens_arg]).await;
    serve.upload_toolset(&old).await;
    let build = running(
        serve.channel(Some(&old)).await,
        serve.request("echo running; sleep 5; echo survived > $out"),
        b"running",
    )
    .await;
    secret_file(keys.path(), "tokens", "arriving-token-2\n");
    serve.signal(nix::sys::signal::Signal::SIGHUP);

    // Bounded: the reload is picked up within a few seconds.
    let stat = |channel| async move {
        kiln::proto::snix_castore::blob_service_client::BlobServiceClient::new(channel)
            .stat(kiln::proto::snix_castore::StatBlobRequest {
                digest: vec![0; 32].into(),
                ..Default::default()
            })
            .await
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match stat(serve.channel(Some(&new)).await).await {
            Err(s) if s.code() == Code::Unauthenticated => {}
            _ => break,
        }
        assert!(
            Instant::now() < deadline,
            "the new token was never accepted:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = stat(serve.channel(Some(&old)).await)
        .await
        .expect_err("the removed token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // The build started with the removed token finishes untouched.
    let done = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .unwrap_or_else(|e| panic!("the running build was disturbed: {e}\n{}", serve.log()));
    assert!(done.completed.snix.is_some());
    let log = serve.log();
    assert!(
        log.contains("1 added, 1 removed"),
        "the reload is not logged:\n{log}"
    );
    assert!(
        !log.contains("retiring-token-1") && !log.contains("arriving-token-2"),
        "a token was logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_see_every_tenant_and_a_client_only_its_own() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = secret_file(
        keys.path(),
        "tokens",
        "team-a client-token\nteam-b other-token\n",
    );
    let operators = secret_file(keys.path(), "operators", "ops operator-token\n");
    let client = secret_file(keys.path(), "client", "client-token\n");
    let other = secret_file(keys.path(), "other", "other-token\n");
    let operator = secret_file(keys.path(), "operator", "operator-token\n");
    let serve = Serve::start(&[
        "--auth-tokens",
        tokens.to_str().unwrap(),
        "--operator-tokens",
        operators.to_str().unwrap(),
    ])
    .await;
    serve.upload_toolset(&client).await;
    let build = running(
        serve.channel(Some(&client)).await,
        serve.request("echo running; echo to-stderr >&2; sleep 600"),
        b"running",
    )
    .await;
    let id = build.build_id().to_owned();
    let op = operator.to_str().unwrap();

    // kiln builds: the build, in its build phase, with its VM.
    let out = serve.cli(&["builds", "--json", "--token-file", op]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["build_id"], id.as_str());
    assert_eq!(rows[0]["phase"], "build");
    assert_eq!(rows[0]["tenant"], "team-a");
    assert!(
        rows[0]["guest_memory_bytes"].as_u64().unwrap() > 0,
        "{rows:?}"
    );
    let table = serve.cli(&["builds", "--token-file", op]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    // The build's own tenant sees it too.
    let own = serve.cli(&["builds", "--json", "--token-file", client.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&own.stdout).contains(&id),
        "{own:?}"
    );

    // Another tenant sees nothing of it: not listed, and its id is
    // NOT_FOUND exactly like an unknown one.
    let theirs = serve.cli(&["builds", "--json", "--token-file", other.to_str().unwrap()]);
    assert!(theirs.status.success(), "{theirs:?}");
    assert!(theirs.stdout.is_empty(), "{theirs:?}");
    for command in [vec!["cancel", &id], vec!["logs", &id]] {
        let args: Vec<&str> = command
            .iter()
            .copied()
            .chain(["--token-file", other.to_str().unwrap()])
            .collect();
        let out = serve.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "kiln {args:?} was let through");
        assert!(stderr.contains("NotFound"), "kiln {args:?}: {stderr}");
    }
    // Nothing at all without a token.
    for command in [vec!["builds"], vec!["cancel", &id], vec!["logs", &id]] {
        let out = serve.cli(&command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "kiln {command:?} was let through");
        assert!(
            stderr.contains("Unauthenticated"),
            "kiln {command:?}: {stderr}"
        );
    }

    // kiln logs: what the build wrote so far, stdout and stderr apart.
    let logs = serve.cli(&["logs", &id, "--token-file", op]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "running\n");
    assert!(String::from_utf8_lossy(&logs.stderr).contains("to-stderr"));

    // kiln logs --follow runs until kiln cancel ends the build.
    let follower = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "logs",
            "--follow",
            &id,
            "--token-file",
            op,
            "--addr",
            &serve.addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower = KillOnDrop(Some(follower));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        follower.child().try_wait().unwrap().is_none(),
        "--follow ended early"
    );
    let cancel = serve.cli(&["cancel", &id, "--token-file", op]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let err = tokio::time::timeout(LIMIT, harness::events::to_end(build, &mut ()))
        .await
        .expect("the build ended")
        .expect_err("cancelled");
    let failed = err.failed().expect("a Failed event");
    assert_eq!(failed.kind, "cancelled_by_operator", "{failed:?}");
    assert_eq!(Code::from_i32(failed.code), Code::Cancelled);
    let deadline = Instant::now() + LIMIT;
    while follower.child().try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "--follow did not end with the build"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let followed = follower.0.take().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert!(stderr.contains("cancelled_by_operator"), "{stderr}");
    serve.nothing_left().await;

    // Nothing runs now; an unknown or ended build cannot be cancelled.
    let out = serve.cli(&["builds", "--json", "--token-file", op]);
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let again = serve.cli(&["cancel", &id, "--token-file", op]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("NotFound"));
}

/// A child killed on drop unless taken out.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_config_files_allow_list() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("greeting"), "from the host\n").unwrap();
    let ro = shared.path().to_str().unwrap().to_owned();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("kiln.toml");
    std::fs::write(&config, "allow-ro-path = []\n").unwrap();
    let serve = Serve::start(&["--config", config.to_str().unwrap()]).await;
    let mut req = serve.request(&format!("cat {ro}/greeting > $out"));
    req.constraints.as_mut().unwrap().available_ro_paths = vec![ro.clone()];
    let mut builds =
        snix_build::build_service_client::BuildServiceClient::new(serve.channel(None).await);
    let refused = builds
        .do_build(req.clone())
        .await
        .expect_err("not allow-listed yet");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("allow-list"), "{refused:?}");

    std::fs::write(&config, format!("allow-ro-path = [{ro:?}]\n")).unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match builds.do_build(req.clone()).await {
            Err(s) if s.code() == Code::FailedPrecondition => {}
            other => break other,
        }
        assert!(
            Instant::now() < deadline,
            "the allow-list was never reloaded:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let answer = answer
        .unwrap_or_else(|s| panic!("{s:?}\n{}", serve.log()))
        .into_inner();
    assert_eq!(answer.outputs.len(), 1);
    assert!(
        serve.log().contains("allow-ro-path changed"),
        "{}",
        serve.log()
    );
}
