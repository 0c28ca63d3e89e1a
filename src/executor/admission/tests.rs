//! Admission's limits, its queues, and the order in which tenants are
//! served.

use std::collections::BTreeMap;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use super::*;

fn tenant(name: &str) -> Tenant {
    Tenant::parse(name).expect("tenant")
}

fn open(max_vms: usize, memory_mib: u64, max_queue: usize) -> Admission {
    Admission::new(max_vms, memory_mib, max_queue, TenantPolicy::default())
}

fn with_limits(max_vms: usize, overrides: &[&str]) -> Admission {
    let overrides: Vec<TenantOverride> = overrides
        .iter()
        .map(|o| o.parse().expect("override"))
        .collect();
    let policy = TenantPolicy {
        defaults: TenantLimits::default(),
        overrides: BTreeMap::new(),
    }
    .with_overrides(&overrides);
    Admission::new(max_vms, 64 * 1024, 1000, policy)
}

/// Lets spawned waiters reach their queue.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[tokio::test]
async fn queue_beyond_the_bound_is_refused() {
    let adm = open(1, 1024, 1);
    let a = tenant("a");
    let first = adm.admit(&a, 512).await.expect("free slot");
    let waiter = {
        let (adm, a) = (adm.clone(), a.clone());
        tokio::spawn(async move { adm.admit(&a, 512).await.map(|_| ()) })
    };
    settle().await;
    assert_eq!(adm.queued(), 1);
    let refused = adm.admit(&a, 512).await.expect_err("queue is full");
    assert!(matches!(refused, BuildError::QueueFull(_)), "{refused}");
    assert_eq!(adm.queued(), 1, "the refused build does not stay queued");
    assert_eq!(adm.vms(), (1, 1));
    assert_eq!(adm.memory_mib(), (512, 1024));
    drop(first);
    waiter.await.expect("join").expect("admitted after release");
    assert_eq!(adm.queued(), 0);
    assert_eq!(adm.vms(), (0, 1), "the waiter's ticket went with it");
    assert_eq!(adm.memory_mib(), (0, 1024));
}

#[tokio::test]
async fn memory_budget_limits_concurrency() {
    let adm = open(4, 1000, 4);
    let a = tenant("a");
    let first = adm.admit(&a, 600).await.expect("fits");
    let second = tokio::time::timeout(Duration::from_millis(50), adm.admit(&a, 600)).await;
    assert!(second.is_err(), "second VM must wait for memory");
    assert_eq!(
        adm.queued(),
        0,
        "a build that stops waiting leaves the queue"
    );
    drop(first);
    assert!(adm.admit(&a, 600).await.is_ok());
    assert!(matches!(
        adm.admit(&a, 2000).await,
        Err(BuildError::Precondition(Precondition::Budget { .. }))
    ));
}

/// Queues `count` builds of `who` one after the other, each noting its
/// name in `order` when it starts and ending at once.
async fn queue(
    adm: &Admission,
    who: &str,
    count: usize,
    order: &Arc<StdMutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..count {
        let (adm, order, who) = (adm.clone(), order.clone(), tenant(who));
        tasks.push(tokio::spawn(async move {
            let ticket = adm.admit(&who, 100).await.expect("admitted");
            order.lock().expect("order").push(format!("{who}{i}"));
            drop(ticket);
        }));
        settle().await;
    }
    tasks
}

#[tokio::test]
async fn another_tenants_backlog_delays_a_build_by_one_turn_at_most() {
    let adm = open(1, 64 * 1024, 1000);
    let order = Arc::new(StdMutex::new(Vec::new()));
    let running = adm.admit(&tenant("a"), 100).await.expect("free");
    let mut tasks = queue(&adm, "a", 20, &order).await;
    tasks.extend(queue(&adm, "b", 1, &order).await);
    assert_eq!(adm.queued(), 21);
    drop(running);
    for task in tasks {
        task.await.expect("join");
    }
    let order = order.lock().expect("order").clone();
    let b = order.iter().position(|n| n == "b0").expect("b ran");
    assert_eq!(
        b, 0,
        "b's build is served by the first VM that frees: {order:?}"
    );
    // a's builds keep their own order.
    let a: Vec<&String> = order.iter().filter(|n| n.starts_with('a')).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    assert_eq!(a, expected.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn tenants_take_turns_by_weight() {
    let adm = with_limits(1, &["heavy:weight=3"]);
    let order = Arc::new(StdMutex::new(Vec::new()));
    let running = adm.admit(&tenant("x"), 100).await.expect("free");
    let mut tasks = queue(&adm, "heavy", 12, &order).await;
    tasks.extend(queue(&adm, "light", 12, &order).await);
    drop(running);
    for task in tasks {
        task.await.expect("join");
    }
    let order = order.lock().expect("order").clone();
    let first: Vec<&String> = order.iter().take(16).collect();
    let heavy = first.iter().filter(|n| n.starts_with("heavy")).count();
    assert_eq!(heavy, 12, "3 to 1 over the first 16 turns: {order:?}");
    let equal = open(1, 64 * 1024, 1000);
    let order = Arc::new(StdMutex::new(Vec::new()));
    let running = equal.admit(&tenant("x"), 100).await.expect("free");
    let mut tasks = queue(&equal, "p", 4, &order).await;
    tasks.extend(queue(&equal, "q", 4, &order).await);
    drop(running);
    for task in tasks {
        task.await.expect("join");
    }
    let order = order.lock().expect("order").clone();
    for pair in order.chunks(2) {
        assert_ne!(pair[0][..1], pair[1][..1], "round-robin: {order:?}");
    }
}

#[tokio::test]
async fn a_tenants_vm_limit_refuses_only_that_tenant() {
    let adm = with_limits(4, &["a:max-vms=1,max-queue=0"]);
    let (a, b) = (tenant("a"), tenant("b"));
    let _running = adm.admit(&a, 100).await.expect("a's first");
    let refused = adm.admit(&a, 100).await.expect_err("a at its limit");
    assert!(
        matches!(&refused, BuildError::TenantLimit(m) if m.contains("max-vms=1") && m.contains("max-queue=0")),
        "{refused}"
    );
    let _b1 = adm
        .admit(&b, 100)
        .await
        .expect("b is not held by a's limit");
    let _b2 = adm
        .admit(&b, 100)
        .await
        .expect("b is not held by a's limit");
    assert_eq!(adm.vms(), (3, 4));
    let usage: Vec<(String, usize, u64, usize)> = adm
        .tenants()
        .into_iter()
        .map(|u| (u.tenant.to_string(), u.vms, u.memory_mib, u.queued))
        .collect();
    assert_eq!(
        usage,
        [("a".into(), 1, 100, 0), ("b".into(), 2, 200, 0)],
        "each tenant's share"
    );
}

#[tokio::test]
async fn a_tenants_memory_limit_refuses_only_that_tenant() {
    let adm = with_limits(4, &["a:memory-mib=1024,max-queue=0"]);
    let (a, b) = (tenant("a"), tenant("b"));
    let never = adm.admit(&a, 2048).await.expect_err("over a's limit");
    assert!(
        matches!(&never, BuildError::TenantLimit(m) if m.contains("memory-mib=1024") && m.contains("2048 MiB")),
        "{never}"
    );
    let _running = adm.admit(&a, 768).await.expect("fits a's limit");
    let full = adm.admit(&a, 512).await.expect_err("768 + 512 > 1024");
    assert!(
        matches!(&full, BuildError::TenantLimit(m) if m.contains("memory-mib=1024")),
        "{full}"
    );
    let _b = adm.admit(&b, 2048).await.expect("b has no such limit");
}

#[tokio::test]
async fn a_tenants_queue_limit_refuses_only_that_tenant() {
    let adm = with_limits(1, &["a:max-queue=1"]);
    let (a, b) = (tenant("a"), tenant("b"));
    let running = adm.admit(&a, 100).await.expect("free");
    let waiting = {
        let (adm, a) = (adm.clone(), a.clone());
        tokio::spawn(async move { adm.admit(&a, 100).await.map(|_| ()) })
    };
    settle().await;
    let refused = adm.admit(&a, 100).await.expect_err("a's queue is full");
    assert!(
        matches!(&refused, BuildError::TenantLimit(m) if m.contains("max-queue=1") && m.contains("1 of its builds")),
        "{refused}"
    );
    let b_waits = {
        let (adm, b) = (adm.clone(), b.clone());
        tokio::spawn(async move { adm.admit(&b, 100).await.map(|_| ()) })
    };
    settle().await;
    assert_eq!(adm.queued(), 2, "b waits; it is not refused");
    drop(running);
    waiting.await.expect("join").expect("a's waiter");
    b_waits.await.expect("join").expect("b's waiter");
}

#[tokio::test]
async fn a_cancelled_waiter_leaves_its_turn_to_the_next() {
    let adm = open(1, 64 * 1024, 10);
    let (a, b) = (tenant("a"), tenant("b"));
    let running = adm.admit(&a, 100).await.expect("free");
    let cancelled = {
        let (adm, a) = (adm.clone(), a.clone());
        tokio::spawn(async move { adm.admit(&a, 100).await.map(|_| ()) })
    };
    settle().await;
    let next = {
        let (adm, b) = (adm.clone(), b.clone());
        tokio::spawn(async move { adm.admit(&b, 100).await.map(|_| ()) })
    };
    settle().await;
    assert_eq!(adm.queued(), 2);
    cancelled.abort();
    settle().await;
    assert_eq!(adm.queued(), 1);
    drop(running);
    next.await.expect("join").expect("b served");
    assert_eq!(adm.vms(), (0, 1));
}

#[tokio::test]
async fn the_pool_never_takes_a_vm_a_build_waits_for() {
    let adm = with_limits(2, &["a:max-vms=1"]);
    let a = tenant("a");
    let mut warm = adm.try_admit(100).expect("free, nobody waits");
    assert!(adm.charge(&mut warm, &a), "a has room");
    let mut second = adm.try_admit(100).expect("one slot left");
    assert!(!adm.charge(&mut second, &a), "a is at max-vms=1");
    assert!(adm.try_admit_for(&a, 100).is_none());
    drop(second);
    let waiter = {
        let (adm, a) = (adm.clone(), a.clone());
        tokio::spawn(async move { adm.admit(&a, 100).await.map(|_| ()) })
    };
    settle().await;
    assert_eq!(adm.queued(), 1);
    assert!(adm.try_admit(100).is_none(), "a build waits");
    drop(warm);
    waiter.await.expect("join").expect("served");
}
