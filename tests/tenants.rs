//! Tenants against the real `kiln serve` binary booting real VMs, each
//! tenant with its own token (the tenant named by a client certificate is
//! in `access_control/tenants.rs`):
//!
//! - a tenant gets NOT_FOUND for another's build id (`Watch`), for its
//!   outputs (`Stat`, `Read`) and MISSING_INPUT for them as a build input;
//! - one tenant's backlog delays another's build by one VM turnover at most
//!   (asserted on the order builds start);
//! - a tenant over its VM or memory limit is refused (RESOURCE_EXHAUSTED,
//!   `tenant_limit`, the limit named) while another builds;
//! - a repeated request is answered from the result cache with no VM
//!   booted (counted by a wrapper around the VMM binary), the bypass
//!   header builds again, another tenant's identical request builds; a
//!   tokens file line with a token alone still works (tenant `default`).

#![allow(clippy::unwrap_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::client::{EventSink, Follow, KilnChannel};
use kiln::proto::kiln_v1::{submit_request, CacheHit, Started, SubmitRequest};
use kiln::proto::{snix_build, snix_castore};
use tonic::Code;

use harness::serve::{running, secret_file, Serve, LIMIT};

fn submit(req: snix_build::BuildRequest) -> SubmitRequest {
    SubmitRequest {
        request: Some(submit_request::Request::Snix(req)),
        argv0: String::new(),
        limits: None,
    }
}

/// Runs `req` for the holder of `channel` to its end.
async fn build(
    channel: KilnChannel,
    req: impl tonic::IntoRequest<SubmitRequest>,
    sink: &mut impl EventSink,
) -> Result<kiln::client::Completion, kiln::client::FollowError> {
    let follow = Follow::submit(channel, req).await?;
    tokio::time::timeout(LIMIT, harness::events::to_end(follow, sink))
        .await
        .expect("the build ended")
}

/// The one output's file digest of a completed snix build.
fn output_digest(done: &kiln::client::Completion) -> Vec<u8> {
    output_file(done).0
}

/// The one output's file digest and size.
fn output_file(done: &kiln::client::Completion) -> (Vec<u8>, u64) {
    let response = done.completed.snix.as_ref().expect("a snix answer");
    let entry = response.outputs[0]
        .output
        .as_ref()
        .expect("an output entry");
    match entry.entry.as_ref().expect("a node") {
        snix_castore::entry::Entry::File(file) => (file.digest.to_vec(), file.size),
        other => panic!("a file output, not {other:?}"),
    }
}

/// Tokens for `alpha` and `beta` and an operator's, written under `dir`.
struct Tokens {
    file: PathBuf,
    operators: PathBuf,
    alpha: PathBuf,
    beta: PathBuf,
    ops: PathBuf,
}

fn tokens(dir: &Path, alpha_line: &str) -> Tokens {
    Tokens {
        file: secret_file(
            dir,
            "tokens",
            &format!("{alpha_line}\nbeta beta-token-0123456789\n"),
        ),
        operators: secret_file(dir, "operators", "ops ops-token-0123456789\n"),
        alpha: secret_file(dir, "alpha", alpha_line.split(' ').next_back().unwrap()),
        beta: secret_file(dir, "beta", "beta-token-0123456789"),
        ops: secret_file(dir, "ops", "ops-token-0123456789"),
    }
}

impl Tokens {
    fn args(&self) -> Vec<String> {
        vec![
            "--auth-tokens".into(),
            self.file.to_str().unwrap().into(),
            "--operator-tokens".into(),
            self.operators.to_str().unwrap().into(),
        ]
    }
}

async fn start(tokens: &Tokens, more: &[&str], env: &[(&str, &str)]) -> Serve {
    let mut args = tokens.args();
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serve = Serve::start_with_env(&args, env).await;
    serve.upload_toolset(&tokens.alpha).await;
    serve.upload_toolset(&tokens.beta).await;
    serve
}

async fn watch_code(channel: KilnChannel, id: &str) -> Result<(), tonic::Status> {
    let mut client = kiln::proto::kiln_v1::build_events_client::BuildEventsClient::new(channel);
    let mut stream = client
        .watch(kiln::proto::kiln_v1::WatchRequest {
            build_id: id.to_owned(),
        })
        .await?
        .into_inner();
    match futures::StreamExt::next(&mut stream).await {
        Some(Err(status)) => Err(status),
        _ => Ok(()),
    }
}

async fn stat_and_read(channel: KilnChannel, digest: &[u8]) -> (Code, Code) {
    let mut client = snix_castore::blob_service_client::BlobServiceClient::new(channel);
    let stat = client
        .stat(snix_castore::StatBlobRequest {
            digest: digest.to_vec().into(),
            ..Default::default()
        })
        .await
        .map_or_else(|s| s.code(), |_| Code::Ok);
    let read = match client
        .read(snix_castore::ReadBlobRequest {
            digest: digest.to_vec().into(),
        })
        .await
    {
        Err(s) => s.code(),
        Ok(stream) => match futures::StreamExt::next(&mut stream.into_inner()).await {
            Some(Err(s)) => s.code(),
            _ => Code::Ok,
        },
    };
    (stat, read)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_sees_nothing_of_another_tenants_builds_and_outputs() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = tokens(keys.path(), "alpha alpha-token-0123456789");
    let serve = start(&tokens, &[], &[]).await;
    let alpha = || serve.channel(Some(&tokens.alpha));
    let beta = || serve.channel(Some(&tokens.beta));

    let done = build(
        alpha().await,
        submit(serve.request("echo alpha secret > $out")),
        &mut (),
    )
    .await
    .unwrap_or_else(|e| panic!("alpha's build: {e}\n{}", serve.log()));
    let id = done.build_id.clone();
    let (digest, size) = output_file(&done);

    // Watch: alpha's own id works, beta's answer is an unknown id's.
    watch_code(alpha().await, &id)
        .await
        .expect("alpha watches its build");
    watch_code(serve.channel(Some(&tokens.ops)).await, &id)
        .await
        .expect("the operator watches every build");
    let hidden = watch_code(beta().await, &id).await.expect_err("hidden");
    let unknown_id = "0123456789abcdef0123456789abcdef";
    let unknown = watch_code(beta().await, unknown_id)
        .await
        .expect_err("unknown");
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    assert_eq!(
        hidden.message().replace(&id, "ID"),
        unknown.message().replace(unknown_id, "ID"),
        "the same answer as for an unknown id"
    );

    // The output: alpha's to read, not beta's.
    assert_eq!(
        stat_and_read(alpha().await, &digest).await,
        (Code::Ok, Code::Ok)
    );
    assert_eq!(
        stat_and_read(beta().await, &digest).await,
        (Code::NotFound, Code::NotFound)
    );

    // Nor can beta build with it as an input.
    let mut req = serve.request("cat /nix/store/*-stolen > $out");
    let node = kiln::castore::Node::File {
        digest: kiln::castore::B3Digest::try_from(&digest[..]).unwrap(),
        size,
        executable: false,
    };
    req.inputs
        .push(node.to_snix_entry(b"1bcdfghijklmnpqrsvwxyz0123456789-stolen"));
    let refused = build(beta().await, submit(req), &mut ())
        .await
        .expect_err("beta may not use alpha's output");
    let failed = refused.failed().expect("a Failed event");
    assert_eq!(failed.kind, "missing_input", "{failed:?}");
    assert_eq!(Code::from_i32(failed.code), Code::FailedPrecondition);
    serve.nothing_left().await;
}

/// Notes the order in which builds start (their `Started` event).
struct StartOrder {
    label: String,
    order: Arc<Mutex<Vec<String>>>,
}

impl EventSink for StartOrder {
    fn started(&mut self, _build_id: &str, _started: &Started) {
        self.order.lock().unwrap().push(self.label.clone());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenants_backlog_delays_anothers_build_by_one_vm_turnover_at_most() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = tokens(keys.path(), "alpha alpha-token-0123456789");
    let serve = start(&tokens, &["--max-vms", "1"], &[]).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let follow = |channel: KilnChannel, label: &str, req: snix_build::BuildRequest| {
        let mut sink = StartOrder {
            label: label.to_owned(),
            order: order.clone(),
        };
        tokio::spawn(async move { build(channel, submit(req), &mut sink).await })
    };
    // alpha's first build holds the only VM; three more of alpha's queue.
    let first = running(
        serve.channel(Some(&tokens.alpha)).await,
        serve.request("echo running; sleep 4; echo a0 > $out"),
        b"running",
    )
    .await;
    order.lock().unwrap().push("a0".into());
    let mut tasks = Vec::new();
    for i in 1..4 {
        let req = serve.request(&format!("sleep 1; echo a{i} > $out"));
        let channel = serve.channel(Some(&tokens.alpha)).await;
        tasks.push(follow(channel, &format!("a{i}"), req));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then beta's one build.
    let channel = serve.channel(Some(&tokens.beta)).await;
    tasks.push(follow(channel, "b", serve.request("echo b > $out")));
    harness::events::to_end(first, &mut ()).await.unwrap();
    for task in tasks {
        task.await
            .unwrap()
            .unwrap_or_else(|e| panic!("a build failed: {e}\n{}", serve.log()));
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 5, "{order:?}");
    assert_eq!(
        order[1], "b",
        "beta's build takes the first VM that frees up: {order:?}"
    );
    assert_eq!(order[2..], ["a1", "a2", "a3"], "alpha's keep their order");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_over_its_limits_is_refused_and_another_builds() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let tokens = tokens(keys.path(), "alpha alpha-token-0123456789");
    let serve = start(
        &tokens,
        &[
            "--max-vms",
            "2",
            "--tenant-limit",
            "alpha:max-vms=1,max-queue=0",
            "--tenant-limit",
            "beta:memory-mib=1024",
        ],
        &[],
    )
    .await;
    let alpha = || serve.channel(Some(&tokens.alpha));
    let beta = || serve.channel(Some(&tokens.beta));
    let held = running(
        alpha().await,
        serve.request("echo running; sleep 600"),
        b"running",
    )
    .await;

    let over = build(
        alpha().await,
        submit(serve.request("echo x > $out")),
        &mut (),
    )
    .await
    .expect_err("alpha runs its one VM and may not queue");
    let failed = over.failed().expect("a Failed event");
    assert_eq!(failed.kind, "tenant_limit", "{failed:?}");
    assert_eq!(Code::from_i32(failed.code), Code::ResourceExhausted);
    assert!(
        failed.message.contains("max-vms=1") && failed.message.contains("max-queue=0"),
        "{failed:?}"
    );

    // beta builds meanwhile, within its memory limit, and is refused over it.
    build(
        beta().await,
        submit(serve.request("echo b > $out")),
        &mut (),
    )
    .await
    .unwrap_or_else(|e| panic!("beta is not held by alpha's limit: {e}\n{}", serve.log()));
    let mut big = serve.request("echo big > $out");
    big.constraints
        .get_or_insert_with(Default::default)
        .min_memory = 2 << 30;
    let over = build(beta().await, submit(big), &mut ())
        .await
        .expect_err("over beta's memory limit");
    let failed = over.failed().expect("a Failed event");
    assert_eq!(failed.kind, "tenant_limit", "{failed:?}");
    assert_eq!(Code::from_i32(failed.code), Code::ResourceExhausted);
    assert!(failed.message.contains("memory-mib=1024"), "{failed:?}");
    drop(held);
    serve.nothing_left().await;
}

/// Notes whether the build was answered from the result cache.
#[derive(Default)]
struct Hit(bool);

impl EventSink for Hit {
    fn cache_hit(&mut self, _build_id: &str, _hit: &CacheHit) {
        self.0 = true;
    }
}

/// A `qemu-system-x86_64` in `dir` that counts each VM it boots in
/// `dir/boots`, then runs the real one.
fn counting_vmm(dir: &Path) -> (String, PathBuf) {
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .expect("qemu-system-x86_64 on PATH");
    let boots = dir.join("boots");
    std::fs::write(&boots, "").unwrap();
    let script = dir.join("qemu-system-x86_64");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \" $* \" in *microvm*) echo boot >> '{}' ;; esac\nexec '{}' \"$@\"\n",
            boots.display(),
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, boots)
}

fn boots(file: &Path) -> usize {
    std::fs::read_to_string(file).unwrap().lines().count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_is_a_cache_hit_without_a_vm_for_its_tenant_only() {
    if !harness::vm_tests_can_run() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    // alpha's line has a token alone: the old form, tenant `default`.
    let tokens = tokens(keys.path(), "legacy-token-0123456789");
    let vmm = tempfile::tempdir().unwrap();
    let (path, boot_file) = counting_vmm(vmm.path());
    let serve = start(&tokens, &["--vmm", "qemu"], &[("PATH", &path)]).await;
    let alpha = || serve.channel(Some(&tokens.alpha));
    let req = serve.request("echo cached > $out");

    let mut first = Hit::default();
    let built = build(alpha().await, submit(req.clone()), &mut first)
        .await
        .unwrap_or_else(|e| panic!("the old-form token builds: {e}\n{}", serve.log()));
    assert!(!first.0, "the first build is no hit");
    assert_eq!(boots(&boot_file), 1, "one VM booted");

    let mut again = Hit::default();
    let answered = build(alpha().await, submit(req.clone()), &mut again)
        .await
        .unwrap();
    assert!(again.0, "the events say it was a hit");
    assert_eq!(boots(&boot_file), 1, "no VM for a hit");
    assert_eq!(output_digest(&answered), output_digest(&built));

    // A plain DoBuild hit says so in its response header.
    let plain = snix_build::build_service_client::BuildServiceClient::new(alpha().await)
        .do_build(req.clone())
        .await
        .unwrap_or_else(|e| panic!("DoBuild: {e}\n{}", serve.log()));
    assert_eq!(
        plain
            .metadata()
            .get("x-kiln-result-cache")
            .and_then(|v| v.to_str().ok()),
        Some("hit")
    );
    assert_eq!(boots(&boot_file), 1, "no VM for a DoBuild hit either");

    let mut bypassed = Hit::default();
    build(
        alpha().await,
        kiln::client::bypassing_result_cache(submit(req.clone())),
        &mut bypassed,
    )
    .await
    .unwrap();
    assert!(!bypassed.0);
    assert_eq!(boots(&boot_file), 2, "the bypass header builds");

    let mut other = Hit::default();
    build(
        serve.channel(Some(&tokens.beta)).await,
        submit(req),
        &mut other,
    )
    .await
    .unwrap();
    assert!(!other.0, "another tenant's identical request is not a hit");
    assert_eq!(boots(&boot_file), 3);
    serve.nothing_left().await;
}
