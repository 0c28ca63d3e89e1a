//! Running kiln as a service, against the real `kiln serve` binary booting
//! real VMs: SIGTERM lets running builds finish (or cancels them once the
//! grace is over) and exits 0 leaving nothing behind; SIGHUP re-reads the
//! token files without touching a running build; the operator commands
//! (`kiln builds`, `kiln cancel`, `kiln logs`) see and stop builds, and
//! are refused without an operator token; `--log-format json` logs JSON.

#![allow(clippy::unwrap_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::castore::Node;
use kiln::client::{ClientSecurity, ClientSecurityOptions, KilnChannel};
use kiln::proto::snix_build;
use tonic::Code;

use harness::BUSYBOX;

const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";
/// How long anything here may take before the test calls it hung.
const LIMIT: Duration = Duration::from_secs(120);

/// A `kiln serve` child on a loopback port with its own data and cache
/// directories; killed on drop if a test failed before it exited.
struct Serve {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
    busybox: Node,
}

impl Serve {
    /// Starts `kiln serve` with `args` once the toolset is in its store.
    async fn start(args: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        // The embedded store has one owner: the toolset goes in first.
        let busybox = {
            let store = kiln::castore::from_addr("", &data_dir).await.unwrap();
            harness::server::ingest_busybox(&store, dir.path()).await
        };
        for d in ["kernel-kiln", "kernel-debian", "agent"] {
            std::os::unix::fs::symlink(Path::new("/var/cache/kiln").join(d), cache_dir.join(d))
                .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(["--warm-vms", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            dir,
            addr: format!("http://127.0.0.1:{port}"),
            busybox,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "kiln serve did not listen:\n{}",
                serve.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn runs(&self) -> PathBuf {
        self.path("data").join("runs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits (bounded) for the process to exit.
    async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A channel sending the token in `token_file`, if any.
    async fn channel(&self, token_file: Option<&Path>) -> KilnChannel {
        let security = ClientSecurity::load(&ClientSecurityOptions {
            token_file: token_file.map(Path::to_owned),
            ..Default::default()
        })
        .unwrap();
        kiln::client::connect(&self.addr, &security).await.unwrap()
    }

    fn request(&self, script: &str) -> snix_build::BuildRequest {
        harness::nix_request(
            self.busybox.to_snix_entry(BUSYBOX.as_bytes()),
            script,
            &[OUT],
        )
    }

    /// Runs `kiln ARGS --addr <this server>` to its end (bounded).
    fn cli(&self, args: &[&str]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .args(["--addr", &self.addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kiln {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// Waits (bounded) until nothing of any build is left: no build
    /// directory, no process (VMM, virtiofsd) working in one.
    async fn nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = harness::leftovers(&self.runs());
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: {left:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to a new 0600 file `name` in the server's directory.
fn secret_file(serve_dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = serve_dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
    path
}

/// Starts `req` over `Submit` and returns its stream once its log says
/// `marker` (so the builder runs).
async fn running(
    channel: KilnChannel,
    req: snix_build::BuildRequest,
    marker: &[u8],
) -> kiln::client::Follow {
    tokio::time::timeout(LIMIT, harness::submit_until_log(channel, req, marker))
        .await
        .expect("the build did not start")
}

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
async fn operator_commands_list_cancel_and_show_logs_and_need_an_operator_token() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = secret_file(keys.path(), "tokens", "client-token\n");
    let operators = secret_file(keys.path(), "operators", "operator-token\n");
    let client = secret_file(keys.path(), "client", "client-token\n");
    let operator = secret_file(keys.path(), "operator", "operator-token\n");
    let serve = Serve::start(&[
        "--auth-tokens",
        tokens.to_str().unwrap(),
        "--operator-tokens",
        operators.to_str().unwrap(),
    ])
    .await;
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
    assert_eq!(rows[0]["tenant"], "default");
    assert!(
        rows[0]["guest_memory_bytes"].as_u64().unwrap() > 0,
        "{rows:?}"
    );
    let table = serve.cli(&["builds", "--token-file", op]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    // Refused without the operator token: a client's, and none at all.
    for who in [vec!["--token-file", client.to_str().unwrap()], vec![]] {
        for command in [vec!["builds"], vec!["cancel", &id], vec!["logs", &id]] {
            let args: Vec<&str> = command.iter().copied().chain(who.iter().copied()).collect();
            let out = serve.cli(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "kiln {args:?} was let through");
            assert!(
                stderr.contains("PermissionDenied") || stderr.contains("Unauthenticated"),
                "kiln {args:?}: {stderr}"
            );
        }
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
