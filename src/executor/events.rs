//! Build logs kept on the server: the executor's events, in domain terms.
//!
//! Each build has a [`BuildLog`]: a bounded history of its [`Event`]s (old
//! log chunks are dropped first, lifecycle events are kept) plus a broadcast
//! channel for live watchers. The executor alone emits into it, and every
//! build's log ends with [`Event::Completed`] or [`Event::Failed`]. The
//! [`Registry`] keeps the most recent builds. Wire messages are made from
//! these events at the edge (`crate::grpc::events`).
//!
//! A build's log may also carry a [`BuildObserver`]: it sees every event as
//! it is emitted, in order, with the instant it happened, and the agent's
//! report; the server's metrics (`crate::metrics`) are one. It is called
//! under the log's lock, so it must only note and never wait.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use kiln_guest::contract::Report;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::executor::error::BuildError;
use crate::executor::request::BuildRequest;
use crate::executor::run::{BuildOutcome, BuiltOutput};
use crate::tenant::{Identity, Tenant};

/// How many bytes of the log's end go into failure messages.
pub const LOG_TAIL_BYTES: usize = 4096;
/// How many lines of the log's end go into failure messages.
pub const LOG_TAIL_LINES: usize = 25;

/// Which of the builder's streams a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The phases a build goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a VM slot and guest memory.
    Queued,
    /// Inputs going into the read-only share.
    Materialise,
    /// virtiofsd, initramfs, VMM.
    Boot,
    /// The builder is running (the agent says so).
    Build,
    /// Outputs being scanned and stored.
    Ingest,
}

impl Phase {
    /// The phase's name, as in `kiln.v1.Phase.name`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Materialise => "materialise",
            Self::Boot => "boot",
            Self::Build => "build",
            Self::Ingest => "ingest",
        }
    }
}

/// The VM a build was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStarted {
    /// The backend (`qemu`, `cloud-hypervisor`).
    pub vmm: &'static str,
    /// The acceleration (`kvm`, `tcg`).
    pub accel: &'static str,
    /// Guest RAM, bytes.
    pub guest_memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Booted before the request came, by the warm pool.
    pub warm: bool,
}

/// Where a cached result came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHit {
    /// The build whose recorded result answers.
    pub build_id: String,
    /// When it finished, seconds since the Unix epoch.
    pub built_at_unix: u64,
}

/// Something that happened to a build.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new phase began.
    Phase(Phase),
    /// The build was admitted and its VM sized.
    Started(VmStarted),
    /// Builder output.
    Log {
        /// Which stream.
        stream: Stream,
        /// The bytes, as written.
        data: Bytes,
    },
    /// The build is answered from its tenant's result cache; no VM runs.
    CacheHit(CacheHit),
    /// One output was stored.
    Output(BuiltOutput),
    /// The build succeeded; the last event.
    Completed(Arc<BuildOutcome>),
    /// The build failed; the last event.
    Failed(Arc<BuildError>),
}

impl Event {
    /// Whether this event ends a build's log.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed(_) | Self::Failed(_))
    }
}

/// Follows one build's events as they are emitted (the server's metrics).
pub trait BuildObserver: Send {
    /// `event` was emitted at `at`. Log chunks come through too.
    fn event(&mut self, event: &Event, at: Instant);
    /// The agent's report arrived (its timings), before the builder's
    /// outcome is judged; a build whose VM was stopped or died has none.
    fn report(&mut self, report: &Report, at: Instant);
}

/// Makes the [`BuildObserver`] of each new build from its id, request and
/// tenant.
pub type ObserverFactory =
    Arc<dyn Fn(&str, &BuildRequest, &Tenant) -> Box<dyn BuildObserver> + Send + Sync>;

/// Several observers following one build, each seeing every event in order.
pub struct Observers(pub Vec<Box<dyn BuildObserver>>);

impl BuildObserver for Observers {
    fn event(&mut self, event: &Event, at: Instant) {
        for o in &mut self.0 {
            o.event(event, at);
        }
    }

    fn report(&mut self, report: &Report, at: Instant) {
        for o in &mut self.0 {
            o.report(report, at);
        }
    }
}

struct State {
    /// The phase the build is in (none before it is queued).
    phase: Option<Phase>,
    /// The VM it was given, once admitted.
    vm: Option<VmStarted>,
    observer: Option<Box<dyn BuildObserver>>,
    history: VecDeque<Event>,
    history_log_bytes: usize,
    log_bytes_total: u64,
    tail: VecDeque<u8>,
    finished: bool,
}

/// Why a build was stopped from the host side, when it was: what turns
/// the executor's plain cancellation into the error the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An operator cancelled it (`kiln cancel`).
    Operator,
    /// The server shut down and the build outlasted the shutdown grace.
    Shutdown {
        /// The grace that ran out, seconds.
        grace_secs: u64,
    },
}

/// A running build as an operator sees it ([`Registry::running`]).
#[derive(Debug, Clone)]
pub struct BuildSummary {
    /// The build's id.
    pub id: String,
    /// Who asked for it.
    pub tenant: Tenant,
    /// When the server accepted it.
    pub submitted: SystemTime,
    /// How long ago that was.
    pub age: std::time::Duration,
    /// The phase it is in (none while its request is still being checked).
    pub phase: Option<Phase>,
    /// Its VM, once admitted.
    pub vm: Option<VmStarted>,
}

/// The events of one build, and the handle that stops it.
pub struct BuildLog {
    id: String,
    tenant: Tenant,
    submitted: SystemTime,
    started: Instant,
    cancel: CancellationToken,
    stop_reason: OnceLock<StopReason>,
    history_limit: usize,
    state: Mutex<State>,
    live: broadcast::Sender<Event>,
}

impl BuildLog {
    fn new(
        id: String,
        tenant: Tenant,
        cancel: CancellationToken,
        history_limit: usize,
        observer: Option<Box<dyn BuildObserver>>,
    ) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self {
            id,
            tenant,
            submitted: SystemTime::now(),
            started: Instant::now(),
            cancel,
            stop_reason: OnceLock::new(),
            history_limit,
            state: Mutex::new(State {
                phase: None,
                vm: None,
                observer,
                history: VecDeque::new(),
                history_log_bytes: 0,
                log_bytes_total: 0,
                tail: VecDeque::with_capacity(LOG_TAIL_BYTES),
                finished: false,
            }),
            live,
        }
    }

    /// The build's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tenant that asked for the build.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// Stops the build from the host side for `reason` (its VM is killed,
    /// everything released; it fails with that reason). The first reason
    /// given is the one reported. Whether it was still running.
    pub fn stop(&self, reason: StopReason) -> bool {
        let running = !self.lock().finished;
        let _ = self.stop_reason.set(reason);
        self.cancel.cancel();
        running
    }

    /// Why the build was stopped from the host side, if it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason.get().copied()
    }

    /// Whether the build has ended (its final event is recorded).
    pub fn finished(&self) -> bool {
        self.lock().finished
    }

    /// The build as an operator sees it.
    pub fn summary(&self) -> BuildSummary {
        let st = self.lock();
        BuildSummary {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            submitted: self.submitted,
            age: self.started.elapsed(),
            phase: st.phase,
            vm: st.vm.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only log bookkeeping behind;
        // keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and broadcasts an event. Nothing is recorded after the final
    /// event.
    pub(crate) fn emit(&self, event: Event) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        if let Some(observer) = st.observer.as_mut() {
            observer.event(&event, Instant::now());
        }
        if let Event::Log { data, .. } = &event {
            let n = data.len();
            st.log_bytes_total += n as u64;
            st.history_log_bytes += n;
            for b in data.iter() {
                if st.tail.len() == LOG_TAIL_BYTES {
                    st.tail.pop_front();
                }
                st.tail.push_back(*b);
            }
            // Drop the oldest log chunks (never lifecycle events) past the limit.
            while st.history_log_bytes > self.history_limit {
                let Some(pos) = st
                    .history
                    .iter()
                    .position(|e| matches!(e, Event::Log { .. }))
                else {
                    break;
                };
                if let Some(Event::Log { data: old, .. }) = st.history.remove(pos) {
                    st.history_log_bytes -= old.len();
                }
            }
        }
        match &event {
            Event::Phase(phase) => st.phase = Some(*phase),
            Event::Started(vm) => st.vm = Some(vm.clone()),
            _ => {}
        }
        st.finished = event.is_final();
        st.history.push_back(event.clone());
        // No receivers is fine: nobody is watching live.
        let _ = self.live.send(event);
    }

    /// Records a chunk of builder output.
    pub(crate) fn log(&self, stream: Stream, data: &[u8]) {
        self.emit(Event::Log {
            stream,
            data: Bytes::copy_from_slice(data),
        });
    }

    /// Records a lifecycle phase.
    pub(crate) fn phase(&self, phase: Phase) {
        self.emit(Event::Phase(phase));
    }

    /// Hands the agent's report to the observer (the report itself reaches
    /// watchers in [`Event::Completed`]).
    pub(crate) fn reported(&self, report: &Report) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        if let Some(observer) = st.observer.as_mut() {
            observer.report(report, Instant::now());
        }
    }

    /// Total bytes of builder output so far.
    pub fn log_bytes(&self) -> u64 {
        self.lock().log_bytes_total
    }

    /// The last [`LOG_TAIL_LINES`] lines of the log (at most [`LOG_TAIL_BYTES`]).
    pub fn tail(&self) -> Vec<u8> {
        let st = self.lock();
        let bytes: Vec<u8> = st.tail.iter().copied().collect();
        let trimmed = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let start = trimmed
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(LOG_TAIL_LINES - 1)
            .map_or(0, |(i, _)| i + 1);
        bytes[start..].to_vec()
    }

    /// The history so far and a receiver for what follows, without a gap;
    /// no receiver once the build has ended.
    pub fn subscribe(&self) -> (Vec<Event>, Option<broadcast::Receiver<Event>>) {
        let st = self.lock();
        let history = st.history.iter().cloned().collect();
        let rx = (!st.finished).then(|| self.live.subscribe());
        (history, rx)
    }
}

/// Build logs by id, and their ids oldest first.
type Known = (HashMap<String, Arc<BuildLog>>, VecDeque<String>);

/// The builds this server knows, newest last, bounded.
pub struct Registry {
    max_builds: usize,
    history_limit: usize,
    builds: Mutex<Known>,
}

impl Registry {
    /// Keeps at most `max_builds` builds, each with at most `history_limit`
    /// bytes of log history.
    pub fn new(max_builds: usize, history_limit: usize) -> Self {
        Self {
            max_builds: max_builds.max(1),
            history_limit,
            builds: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Creates the log of a new build of the tenant `default`, stopped
    /// through `cancel`.
    pub fn create(&self, id: String, cancel: CancellationToken) -> Arc<BuildLog> {
        self.create_observed(id, Tenant::default_tenant(), cancel, None)
    }

    /// Creates the log of a new build of `tenant` that `observer` follows.
    pub fn create_observed(
        &self,
        id: String,
        tenant: Tenant,
        cancel: CancellationToken,
        observer: Option<Box<dyn BuildObserver>>,
    ) -> Arc<BuildLog> {
        let log = Arc::new(BuildLog::new(
            id.clone(),
            tenant,
            cancel,
            self.history_limit,
            observer,
        ));
        let mut guard = self.lock();
        let (map, order) = &mut *guard;
        map.insert(id.clone(), log.clone());
        order.push_back(id);
        while order.len() > self.max_builds {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        log
    }

    fn lock(&self) -> MutexGuard<'_, Known> {
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log of a known build.
    pub fn get(&self, id: &str) -> Option<Arc<BuildLog>> {
        self.lock().0.get(id).cloned()
    }

    /// The log of a known build `who` may see: another tenant's build is
    /// `None`, exactly like an unknown id.
    pub fn get_for(&self, id: &str, who: &Identity) -> Option<Arc<BuildLog>> {
        self.get(id).filter(|log| who.may_see(log.tenant()))
    }

    /// The builds that have not ended, oldest first.
    pub fn running(&self) -> Vec<Arc<BuildLog>> {
        let guard = self.lock();
        let (map, order) = &*guard;
        order
            .iter()
            .filter_map(|id| map.get(id))
            .filter(|log| !log.finished())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_but_keeps_lifecycle_events() {
        let reg = Registry::new(10, 100);
        let log = reg.create("b1".into(), CancellationToken::new());
        log.phase(Phase::Boot);
        for _ in 0..50 {
            log.log(Stream::Stdout, &[b'x'; 10]);
        }
        let (history, rx) = log.subscribe();
        assert!(rx.is_some());
        let log_bytes: usize = history
            .iter()
            .filter_map(|e| match e {
                Event::Log { data, .. } => Some(data.len()),
                _ => None,
            })
            .sum();
        assert!(log_bytes <= 100, "{log_bytes}");
        assert!(matches!(history[0], Event::Phase(Phase::Boot)));
        assert_eq!(log.log_bytes(), 500);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let reg = Registry::new(1, 1000);
        let log = reg.create("b".into(), CancellationToken::new());
        for i in 0..100 {
            log.log(Stream::Stderr, format!("line {i}\n").as_bytes());
        }
        let tail = String::from_utf8(log.tail()).expect("utf8");
        assert!(
            tail.starts_with(&format!("line {}\n", 100 - LOG_TAIL_LINES)),
            "{tail}"
        );
        assert!(tail.ends_with("line 99\n"));
    }

    #[test]
    fn registry_forgets_the_oldest() {
        let reg = Registry::new(2, 10);
        reg.create("a".into(), CancellationToken::new());
        reg.create("b".into(), CancellationToken::new());
        reg.create("c".into(), CancellationToken::new());
        assert!(reg.get("a").is_none());
        assert!(reg.get("c").is_some());
    }

    #[test]
    fn finished_builds_have_no_live_stream() {
        let reg = Registry::new(2, 10);
        let log = reg.create("a".into(), CancellationToken::new());
        log.emit(Event::Failed(Arc::new(BuildError::Cancelled)));
        assert!(log.subscribe().1.is_none());
        log.phase(Phase::Boot);
        assert_eq!(log.subscribe().0.len(), 1, "nothing after the final event");
    }
}
