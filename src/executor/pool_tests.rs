//! The warm pool's rules, CPU-only: the fake runner ([`crate::vmm::fake`])
//! stands in for the VMM (its warm VMs say Ready and wait for their job
//! over the real channel framing, as the agent does); everything else is
//! real — the pool, admission, virtiofsd, materialise, supervise, ingest.
//! That real VMs boot warm and build is `tests/executor_vm.rs`'s job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_guest::contract::Outcome;

use crate::executor::events::Event;
use crate::executor::pool::PoolStats;
use crate::executor::tests::{fake_artifacts, request, vm_tests_skip};
use crate::executor::{BuildError, ClientLimits, Executor, ExecutorConfig};
use crate::grpc;
use crate::proto::snix_build;
use crate::vmm::fake::{Ending, FakeGuest, FakeRunner};

/// What a fake guest saw: its VM number and whether its job came warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    vm: usize,
    warm: bool,
}

struct PoolRig {
    executor: Arc<Executor>,
    runner: Arc<FakeRunner>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _tmp: tempfile::TempDir,
}

/// An executor with a warm pool of `warm` VMs (and `max_vms` slots) whose
/// guests record what they saw, then end as `ending` says.
async fn pool_rig(
    warm: usize,
    max_vms: usize,
    ending: impl Fn(&FakeGuest) -> Ending + Send + Sync + 'static,
) -> Option<PoolRig> {
    if vm_tests_skip("executor warm-pool test") {
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
        warm_vms: warm,
        max_vms,
        ..ExecutorConfig::default()
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let runner = Arc::new(FakeRunner::new(move |g| {
        record.lock().expect("seen").push(Seen {
            vm: g.vm,
            warm: g.warm_job.is_some(),
        });
        ending(g)
    }));
    let executor = Arc::new(Executor::new(config, store, runner.clone()));
    executor.start_pool();
    Some(PoolRig {
        executor,
        runner,
        seen,
        _tmp: tmp,
    })
}

impl PoolRig {
    fn stats(&self) -> PoolStats {
        self.executor.pool().expect("a pool").stats()
    }

    /// Waits (bounded) until the pool's counters satisfy `ok`.
    async fn until(&self, what: &str, ok: impl Fn(&PoolStats) -> bool) -> PoolStats {
        for _ in 0..200 {
            let s = self.stats();
            if ok(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the pool never got to: {what} (now {:?})", self.stats());
    }

    async fn build(&self, req: snix_build::BuildRequest) -> (bool, crate::executor::BuildResult) {
        let req = grpc::request::from_snix(&req).expect("valid request");
        let started = self.executor.start(
            req,
            ClientLimits::default(),
            &crate::tenant::Identity::unauthenticated(),
        );
        let result = started.task.await.expect("task");
        (warm_started(&started.log), result)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    fn runs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.executor.runs_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Whether the log's `Started` says warm.
fn warm_started(log: &crate::executor::events::BuildLog) -> bool {
    let (past, _) = log.subscribe();
    past.iter()
        .find_map(|e| match e {
            Event::Started(s) => Some(s.warm),
            _ => None,
        })
        .expect("a Started event")
}

fn ok(g: &FakeGuest) -> Ending {
    std::fs::write(g.scratch.join(crate::executor::tests::OUT), b"out\n").expect("write output");
    Ending::Report {
        stdout: b"built\n".to_vec(),
        outcome: Outcome::Exited { code: 0 },
    }
}

/// A request the pool cannot serve: more memory than its VMs have.
fn big_request() -> snix_build::BuildRequest {
    let mut req = request(vec![]);
    req.constraints = Some(snix_build::build_request::BuildConstraints {
        system: "x86_64-linux".into(),
        min_memory: 1 << 30,
        ..Default::default()
    });
    req
}

#[tokio::test]
async fn a_build_that_fits_gets_a_waiting_vm_its_job_over_the_channel() {
    let Some(rig) = pool_rig(1, 2, ok).await else {
        return;
    };
    rig.until("one VM waiting", |s| s.waiting == 1).await;
    let (warm, result) = rig.build(request(vec![])).await;
    result.expect("the build succeeds");
    assert!(warm, "Started says warm");
    assert_eq!(rig.seen(), [Seen { vm: 1, warm: true }]);
    let stats = rig.stats();
    assert_eq!(stats.assigned, 1, "{stats:?}");
}

#[tokio::test]
async fn a_build_that_does_not_fit_boots_cold_and_evicts_an_idle_vm_for_room() {
    // One slot, held by the waiting pool VM: the big build can only run
    // if the pool gives it up.
    let Some(rig) = pool_rig(1, 1, ok).await else {
        return;
    };
    rig.until("one VM waiting", |s| s.waiting == 1).await;
    let (warm, result) = rig.build(big_request()).await;
    result.expect("the build succeeds");
    assert!(!warm, "a build the pool cannot serve boots cold");
    assert_eq!(rig.seen(), [Seen { vm: 2, warm: false }]);
    let stats = rig
        .until("refilled after the build", |s| s.waiting == 1)
        .await;
    assert_eq!(stats.evicted, 1, "{stats:?}");
    assert_eq!(stats.assigned, 0, "{stats:?}");
}

#[tokio::test]
async fn the_pool_refills_after_a_build_and_never_runs_two_builds_in_one_vm() {
    let Some(rig) = pool_rig(1, 2, ok).await else {
        return;
    };
    for round in 1..=3 {
        rig.until("one VM waiting", |s| s.waiting == 1).await;
        let (warm, result) = rig.build(request(vec![])).await;
        result.expect("the build succeeds");
        assert!(warm, "round {round}: warm");
    }
    let seen = rig.seen();
    let mut vms: Vec<usize> = seen.iter().map(|s| s.vm).collect();
    vms.dedup();
    assert_eq!(vms.len(), 3, "three builds, three VMs: {seen:?}");
    assert!(seen.iter().all(|s| s.warm), "{seen:?}");
    let stats = rig.until("refilled", |s| s.waiting == 1).await;
    assert_eq!(stats.assigned, 3, "{stats:?}");
    assert!(stats.booted >= 4, "{stats:?}");
    // Only the waiting VM's directory is left.
    let runs = rig.runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].starts_with("warm-"), "{runs:?}");
}

#[tokio::test]
async fn a_vm_that_dies_while_waiting_is_replaced_and_never_given_a_build() {
    let Some(rig) = pool_rig(1, 2, ok).await else {
        return;
    };
    rig.until("one VM waiting", |s| s.waiting == 1).await;
    assert_eq!(rig.runner.kill_waiting(), 1);
    let stats = rig
        .until("the dead VM replaced", |s| {
            s.died_waiting == 1 && s.waiting == 1
        })
        .await;
    assert_eq!(stats.booted, 2, "{stats:?}");
    let (warm, result) = rig.build(request(vec![])).await;
    result.expect("the build succeeds on the replacement");
    assert!(warm);
    assert_eq!(rig.seen(), [Seen { vm: 2, warm: true }], "not the dead VM");
}

#[tokio::test]
async fn pool_vms_count_against_the_vm_slots_and_the_memory_budget() {
    let gate = Arc::new(std::sync::Barrier::new(2));
    let guest_gate = gate.clone();
    // Two slots, a pool of two; each build waits at the gate until the
    // test has looked.
    let Some(rig) = pool_rig(2, 2, move |g| {
        guest_gate.wait();
        ok(g)
    })
    .await
    else {
        return;
    };
    rig.until("two VMs waiting", |s| s.waiting == 2).await;
    let req = grpc::request::from_snix(&request(vec![])).expect("valid");
    let started = rig.executor.start(
        req,
        ClientLimits::default(),
        &crate::tenant::Identity::unauthenticated(),
    );
    rig.until("one VM assigned", |s| s.assigned == 1).await;
    // The build holds one slot, the other pool VM the other: no refill
    // while the build runs, however long we look.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = rig.stats();
    assert_eq!((stats.waiting, stats.booting), (1, 0), "{stats:?}");
    assert_eq!(rig.runner.started(), 2, "no third VM while two run");
    tokio::task::spawn_blocking(move || gate.wait())
        .await
        .expect("gate");
    started
        .task
        .await
        .expect("task")
        .expect("the build succeeds");
    rig.until("refilled to two", |s| s.waiting == 2).await;

    // The memory budget, too: room for one pool VM only.
    let Some(small) = pool_rig(2, 4, ok).await else {
        return;
    };
    let budget_for_one = {
        let pool = small.executor.pool().expect("pool").config();
        pool.memory_mib + pool.memory_mib / 2
    };
    drop(small);
    let tmp = tempfile::tempdir().expect("tmp");
    let data_dir = tmp.path().join("data");
    let store = crate::castore::from_addr("", &data_dir)
        .await
        .expect("store");
    let config = ExecutorConfig {
        data_dir,
        cache_dir: tmp.path().join("cache"),
        artifacts: fake_artifacts(tmp.path()),
        warm_vms: 2,
        max_vms: 4,
        memory_budget_mib: budget_for_one,
        ..ExecutorConfig::default()
    };
    let runner = Arc::new(FakeRunner::new(ok));
    let executor = Arc::new(Executor::new(config, store, runner.clone()));
    executor.start_pool();
    let pool = executor.pool().expect("pool");
    for _ in 0..40 {
        if pool.stats().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.stats().waiting, 1, "{:?}", pool.stats());
    assert_eq!(runner.started(), 1, "the budget holds one VM");
}

#[tokio::test]
async fn a_build_cancelled_in_its_warm_vm_releases_it_and_the_pool_refills() {
    let Some(rig) = pool_rig(1, 2, |_| Ending::Hang {
        stdout: b"working\n".to_vec(),
    })
    .await
    else {
        return;
    };
    rig.until("one VM waiting", |s| s.waiting == 1).await;
    let req = grpc::request::from_snix(&request(vec![])).expect("valid");
    let started = rig.executor.start(
        req,
        ClientLimits::default(),
        &crate::tenant::Identity::unauthenticated(),
    );
    let (_, rx) = started.log.subscribe();
    let mut rx = rx.expect("live");
    while !matches!(rx.recv().await, Ok(Event::Log { .. })) {}
    assert!(warm_started(&started.log));
    started.cancel.cancel();
    let err = started.task.await.expect("task").expect_err("cancelled");
    assert!(matches!(*err, BuildError::Cancelled), "{err}");
    rig.until("refilled", |s| s.waiting == 1 && s.assigned == 1)
        .await;
    let runs = rig.runs();
    assert_eq!(runs.len(), 1, "only the new pool VM's directory: {runs:?}");
    let seen = rig.seen();
    assert_eq!(seen, [Seen { vm: 1, warm: true }]);
}

#[tokio::test]
async fn dropping_the_executor_stops_its_waiting_vms() {
    let Some(rig) = pool_rig(2, 2, ok).await else {
        return;
    };
    rig.until("two VMs waiting", |s| s.waiting == 2).await;
    let runs_dir = rig.executor.runs_dir();
    let PoolRig { executor, _tmp, .. } = rig;
    drop(executor);
    for _ in 0..200 {
        let left = std::fs::read_dir(&runs_dir).map(|d| d.count()).unwrap_or(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "pool VM directories left after the executor went: {:?}",
        std::fs::read_dir(&runs_dir).map(|d| d.count())
    );
}
