//! CPU-only tests of the whole executor: materialise → boot → supervise →
//! collect → respond, with the fake runner ([`crate::vmm::fake`]) in place
//! of the VMM and everything else real (the embedded castore, virtiofsd,
//! the channel framing, hostfs, ingest, the gRPC faces).

use std::sync::Arc;
use std::time::Duration;

use kiln_guest::contract::Outcome;
use tonic::Code;

use crate::castore::Node;
use crate::executor::events::{BuildLog, Event};
use crate::executor::{BuildError, ClientLimits, Executor, ExecutorConfig, Precondition};
use crate::grpc::{self, status};
use crate::proto::{snix_build, snix_castore};
use crate::vmm::fake::{Ending, FakeGuest, FakeRunner};

pub(super) const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

struct Rig {
    executor: Arc<Executor>,
    _tmp: tempfile::TempDir,
}

/// An executor on a fresh store whose VMs run `guest`; `None` (said with
/// `SKIPPED:`) where virtiofsd cannot run.
async fn rig(guest: impl Fn(&FakeGuest) -> Ending + Send + Sync + 'static) -> Option<Rig> {
    rig_with(Arc::new(FakeRunner::new(guest)), |_| {}).await
}

/// Like [`rig`], booting with `runner`, the executor set up by `setup`
/// before it is shared.
async fn rig_with(runner: Arc<FakeRunner>, setup: impl FnOnce(&mut Executor)) -> Option<Rig> {
    if vm_tests_skip("executor fake-VM test") {
        return None;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let data_dir = tmp.path().join("data");
    let store = crate::castore::from_addr("", &data_dir)
        .await
        .expect("store");
    let config = ExecutorConfig {
        data_dir,
        cache_dir: tmp.path().join("cache"),
        artifacts: fake_artifacts(tmp.path()),
        timeout: Duration::from_secs(60),
        ..ExecutorConfig::default()
    };
    let mut executor = Executor::new(config, store, runner);
    setup(&mut executor);
    Some(Rig {
        executor: Arc::new(executor),
        _tmp: tmp,
    })
}

/// Whether `test` must skip (said with `SKIPPED:`) because virtiofsd
/// cannot run here; fails instead under `KILN_REQUIRE_VM_TESTS`.
pub(super) fn vm_tests_skip(test: &str) -> bool {
    let why = if crate::vmm::virtiofsd::find_binary().is_none() {
        Some("virtiofsd is not installed (make virtiofsd)")
    } else if !rustix::process::geteuid().is_root() {
        Some("virtiofsd serves shares as root")
    } else {
        None
    };
    let Some(why) = why else {
        return false;
    };
    assert!(
        std::env::var_os("KILN_REQUIRE_VM_TESTS").is_none(),
        "KILN_REQUIRE_VM_TESTS is set but {why}"
    );
    test_skip!("{test}: {why}");
    true
}

/// Kernel, modules, agent and shell files the base image is built from
/// (never booted).
pub(super) fn fake_artifacts(dir: &std::path::Path) -> crate::guest_image::Artifacts {
    let a = crate::guest_image::Artifacts {
        busybox: dir.join("busybox"),
        ..crate::guest_image::Artifacts::in_cache_dir(&dir.join("artifacts"))
    };
    std::fs::create_dir_all(a.modules_dir()).expect("modules dir");
    std::fs::create_dir_all(a.agent.parent().expect("agent dir")).expect("agent dir");
    std::fs::write(a.vmlinux(), b"kernel").expect("kernel");
    std::fs::write(&a.agent, b"agent").expect("agent");
    std::fs::write(&a.busybox, b"busybox").expect("busybox");
    a
}

pub(super) fn request(inputs: Vec<snix_castore::Entry>) -> snix_build::BuildRequest {
    snix_build::BuildRequest {
        inputs,
        command_args: vec!["/bin/builder".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec![OUT.into()],
        refscan_needles: vec!["1bcdfghijklmnpqrsvwxyz0123456789".into()],
        ..Default::default()
    }
}

fn exited(code: i32, stdout: &[u8]) -> Ending {
    Ending::Report {
        stdout: stdout.to_vec(),
        outcome: Outcome::Exited { code },
    }
}

async fn build(rig: &Rig, req: snix_build::BuildRequest) -> crate::executor::BuildResult {
    build_logged(rig, req).await.1
}

async fn build_logged(
    rig: &Rig,
    req: snix_build::BuildRequest,
) -> (Arc<BuildLog>, crate::executor::BuildResult) {
    let req = grpc::request::from_snix(&req).expect("valid request");
    let started = rig.executor.start(
        req,
        ClientLimits::default(),
        &crate::tenant::Identity::unauthenticated(),
    );
    (started.log, started.task.await.expect("task"))
}

#[tokio::test]
async fn an_output_written_by_the_guest_is_stored_and_the_log_ends_completed() {
    let Some(rig) = rig(|g| {
        let out = g.scratch.join(OUT);
        std::fs::write(&out, b"hello from 1bcdfghijklmnpqrsvwxyz0123456789\n").expect("write");
        exited(0, b"building\n")
    })
    .await
    else {
        return;
    };
    let (log, result) = build_logged(&rig, request(vec![])).await;
    let outcome = result.expect("build succeeds");
    let [output] = &outcome.outputs[..] else {
        panic!("one output: {:?}", outcome.outputs)
    };
    let bytes = b"hello from 1bcdfghijklmnpqrsvwxyz0123456789\n";
    assert_eq!(output.path.as_str(), OUT);
    assert_eq!(output.needles, vec![0], "the output names the needle");
    match &output.node {
        Node::File { digest, size, .. } => {
            assert_eq!(*size, bytes.len() as u64);
            assert_eq!(*digest, crate::castore::B3Digest::of(bytes));
        }
        other => panic!("a file, not {other:?}"),
    }

    // The log: a phase per step, the builder's output, the output, and
    // Completed last — whoever follows it.
    let (history, live) = log.subscribe();
    assert!(live.is_none(), "a finished build has no live stream");
    let names: Vec<String> = history
        .iter()
        .filter_map(|e| match e {
            Event::Phase(p) => Some(p.name().to_owned()),
            Event::Log { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            Event::Output(_) => Some("output".into()),
            Event::Completed(_) => Some("completed".into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        [
            "queued",
            "materialise",
            "boot",
            "build",
            "building\n",
            "ingest",
            "output",
            "completed"
        ]
    );
}

#[tokio::test]
async fn a_failing_builder_is_aborted_with_its_exit_code_and_log_tail() {
    let Some(rig) = rig(|_| exited(3, b"error: the thing broke\n")).await else {
        return;
    };
    let err = build(&rig, request(vec![])).await.expect_err("fails");
    assert!(
        matches!(*err, BuildError::BuilderExited { code: 3, .. }),
        "{err}"
    );
    let status = status::status(&err);
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().contains("the thing broke"),
        "{}",
        status.message()
    );
    assert_eq!(
        status::failed_detail(&status).expect("detail").exit_code,
        Some(3)
    );
}

#[tokio::test]
async fn an_output_that_is_a_fifo_is_the_builders_fault_named_as_the_guest_saw_it() {
    let Some(rig) = rig(|g| {
        let out = g.scratch.join(OUT);
        std::fs::create_dir(&out).expect("mkdir");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            out.join("pipe"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        exited(0, b"made a fifo\n")
    })
    .await
    else {
        return;
    };
    let err = build(&rig, request(vec![])).await.expect_err("refused");
    let status = status::status(&err);
    assert_eq!(status.code(), Code::Aborted, "{}", status.message());
    let detail = status::failed_detail(&status).expect("detail");
    assert_eq!(detail.kind, "invalid_output");
    let guest_path = format!("/{OUT}/pipe");
    assert!(
        status.message().contains(&guest_path),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains("/runs/"),
        "no host path: {}",
        status.message()
    );
    assert!(
        status.message().contains("made a fifo"),
        "log tail: {}",
        status.message()
    );
}

#[tokio::test]
async fn a_missing_output_and_a_crashed_vm_have_their_own_codes() {
    let Some(rig) = rig(|_| exited(0, b"")).await else {
        return;
    };
    let err = build(&rig, request(vec![])).await.expect_err("no output");
    assert_eq!(err.kind(), "missing_output");
    assert_eq!(status::code(&err), Code::Aborted);

    let Some(crashing) = self::rig(|_| Ending::Crash {
        stdout: b"Kernel panic\n".to_vec(),
    })
    .await
    else {
        return;
    };
    let err = build(&crashing, request(vec![]))
        .await
        .expect_err("crashed");
    assert_eq!(err.kind(), "vm_crashed", "{}", err.report());
    assert_eq!(status::code(&err), Code::Unavailable);
}

#[tokio::test]
async fn a_missing_input_is_named_by_index_and_name() {
    let Some(rig) = rig(|_| exited(0, b"")).await else {
        return;
    };
    let missing = snix_castore::Entry {
        entry: Some(snix_castore::entry::Entry::File(snix_castore::FileEntry {
            name: "0bcdfghijklmnpqrsvwxyz0123456789-src".into(),
            digest: vec![7; 32].into(),
            size: 5,
            executable: false,
        })),
    };
    let err = build(&rig, request(vec![missing]))
        .await
        .expect_err("missing");
    let message = status::status(&err).message().to_owned();
    assert_eq!(status::code(&err), Code::FailedPrecondition);
    assert!(
        message.starts_with("inputs[0] (0bcdfghijklmnpqrsvwxyz0123456789-src): blob "),
        "{message}"
    );
}

#[tokio::test]
async fn a_precondition_is_typed_on_the_wire() {
    let Some(rig) = rig(|_| exited(0, b"")).await else {
        return;
    };
    let mut req = request(vec![]);
    req.constraints = Some(snix_build::build_request::BuildConstraints {
        system: "x86_64-linux".into(),
        network_access: true,
        ..Default::default()
    });
    let err = build(&rig, req).await.expect_err("refused");
    assert!(
        matches!(err.precondition(), Some(Precondition::Network { .. })),
        "{err}"
    );
    let detail = status::failed_detail(&status::status(&err)).expect("detail");
    assert_eq!(
        (detail.kind.as_str(), detail.precondition.as_str()),
        ("precondition", "network")
    );
}

#[tokio::test]
async fn the_report_ends_the_vm_without_waiting_for_its_power_off() {
    // The guest reports and then never powers off: the build is over at
    // the report (its last frame), so the VM is killed and the build
    // succeeds instead of waiting on the guest.
    let Some(rig) = rig(|g| {
        std::fs::write(g.scratch.join(OUT), b"done\n").expect("write");
        Ending::ReportAndStay {
            stdout: b"reported\n".to_vec(),
            outcome: Outcome::Exited { code: 0 },
        }
    })
    .await
    else {
        return;
    };
    let outcome = build(&rig, request(vec![])).await.expect("build succeeds");
    assert_eq!(outcome.report.outcome, Outcome::Exited { code: 0 });
    assert_eq!(outcome.outputs.len(), 1);
    let left: Vec<_> = std::fs::read_dir(rig.executor.runs_dir())
        .expect("runs dir")
        .collect();
    assert!(left.is_empty(), "build directory left behind: {left:?}");
}

#[tokio::test]
async fn a_silent_builder_is_stopped_after_the_clients_silence_limit() {
    let Some(rig) = rig(|_| Ending::Hang {
        stdout: b"going quiet\n".to_vec(),
    })
    .await
    else {
        return;
    };
    let req = grpc::request::from_snix(&request(vec![])).expect("valid");
    let limits = ClientLimits {
        max_silent: Some(Duration::from_secs(1)),
        ..ClientLimits::default()
    };
    let started = rig
        .executor
        .start(req, limits, &crate::tenant::Identity::unauthenticated());
    let err = started.task.await.expect("task").expect_err("stopped");
    assert!(matches!(*err, BuildError::Silent { secs: 1, .. }), "{err}");
    assert_eq!(err.kind(), "silent");
    assert_eq!(status::code(&err), Code::DeadlineExceeded);
    assert!(err.to_string().contains("no output for 1 seconds"), "{err}");
    assert_eq!(err.log_tail(), b"going quiet\n");
    let left: Vec<_> = std::fs::read_dir(rig.executor.runs_dir())
        .expect("runs dir")
        .collect();
    assert!(left.is_empty(), "build directory left behind: {left:?}");
}

#[tokio::test]
async fn a_clients_log_limit_lowers_the_servers() {
    let Some(rig) = rig(|_| Ending::Hang {
        stdout: vec![b'x'; 4096],
    })
    .await
    else {
        return;
    };
    let req = grpc::request::from_snix(&request(vec![])).expect("valid");
    let limits = ClientLimits {
        max_log_bytes: Some(100),
        ..ClientLimits::default()
    };
    let err = rig
        .executor
        .start(req, limits, &crate::tenant::Identity::unauthenticated())
        .task
        .await
        .expect("task")
        .expect_err("stopped");
    assert!(
        matches!(*err, BuildError::LogLimit { limit: 100, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_cancelled_build_releases_its_vm_and_directory() {
    let Some(rig) = rig(|_| Ending::Hang {
        stdout: b"working\n".to_vec(),
    })
    .await
    else {
        return;
    };
    let req = grpc::request::from_snix(&request(vec![])).expect("valid");
    let started = rig.executor.start(
        req,
        ClientLimits::default(),
        &crate::tenant::Identity::unauthenticated(),
    );
    // Wait until the builder runs, then cancel.
    let (_, rx) = started.log.subscribe();
    let mut rx = rx.expect("live");
    while !matches!(rx.recv().await, Ok(Event::Log { .. })) {}
    started.cancel.cancel();
    let err = started.task.await.expect("task").expect_err("cancelled");
    assert!(matches!(*err, BuildError::Cancelled), "{err}");
    let left: Vec<_> = std::fs::read_dir(rig.executor.runs_dir())
        .expect("runs dir")
        .collect();
    assert!(left.is_empty(), "build directory left behind: {left:?}");
}

#[tokio::test]
async fn do_build_answers_and_a_watch_on_its_id_ends_completed() {
    use crate::proto::kiln_v1::build_event::Event as Wire;
    use crate::proto::kiln_v1::build_events_server::BuildEvents as _;
    use crate::proto::snix_build::build_service_server::BuildService as _;
    use futures::StreamExt as _;

    let Some(rig) = rig(|g| {
        std::fs::write(g.scratch.join(OUT), b"x").expect("write");
        exited(0, b"")
    })
    .await
    else {
        return;
    };
    let service = grpc::BuildService::new(rig.executor.clone());
    let response = service
        .do_build(tonic::Request::new(request(vec![])))
        .await
        .expect("answer");
    assert_eq!(response.get_ref().outputs.len(), 1);
    let id = response
        .metadata()
        .get(grpc::BUILD_ID_HEADER)
        .expect("build id")
        .to_str()
        .expect("ascii")
        .to_owned();
    let watch = service
        .watch(tonic::Request::new(crate::proto::kiln_v1::WatchRequest {
            build_id: id,
        }))
        .await
        .expect("known build");
    let events: Vec<_> = watch.into_inner().collect().await;
    let last = events.last().expect("events").as_ref().expect("ok");
    let Some(Wire::Completed(done)) = &last.event else {
        panic!("ends with completed: {last:?}")
    };
    assert_eq!(done.snix.as_ref().expect("snix answer").outputs.len(), 1);
}

#[tokio::test]
async fn a_repeated_request_is_answered_from_the_result_cache_without_a_vm() {
    let runner = Arc::new(FakeRunner::new(|g| {
        std::fs::write(g.scratch.join(OUT), b"built once\n").expect("write");
        exited(0, b"")
    }));
    let Some(rig) = rig_with(runner.clone(), |executor| {
        executor.set_result_cache(
            crate::executor::result_cache::ResultCache::in_memory().expect("cache"),
        )
    })
    .await
    else {
        return;
    };
    let a = crate::tenant::Identity::client(crate::tenant::Tenant::parse("a").expect("a"));
    let b = crate::tenant::Identity::client(crate::tenant::Tenant::parse("b").expect("b"));
    let run = |who: &crate::tenant::Identity, bypass: bool| {
        let req = grpc::request::from_snix(&request(vec![])).expect("valid request");
        let limits = ClientLimits {
            bypass_result_cache: bypass,
            ..ClientLimits::default()
        };
        rig.executor.start(req, limits, who)
    };

    let first = run(&a, false).task.await.expect("task").expect("built");
    assert!(first.cache_hit.is_none());
    assert_eq!(runner.started(), 1);

    let again = run(&a, false);
    let hit = again.task.await.expect("task").expect("answered");
    assert_eq!(runner.started(), 1, "no VM for a hit");
    assert_eq!(hit.outputs, first.outputs);
    let (history, _) = again.log.subscribe();
    assert!(
        history.iter().any(|e| matches!(e, Event::CacheHit(_))),
        "the events say it was a hit"
    );
    assert!(
        !history.iter().any(|e| matches!(e, Event::Started(_))),
        "and no VM started"
    );

    run(&a, true)
        .task
        .await
        .expect("task")
        .expect("built again");
    assert_eq!(runner.started(), 2, "the bypass builds");
    run(&b, false)
        .task
        .await
        .expect("task")
        .expect("built for b");
    assert_eq!(
        runner.started(),
        3,
        "another tenant's identical request is not a hit"
    );
}
