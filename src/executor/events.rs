//! Build logs kept on the server and the live event streams behind
//! `kiln.v1.BuildEvents`.
//!
//! Each build has a [`BuildLog`]: a bounded history of its events (old log
//! chunks are dropped first, lifecycle events are kept) plus a broadcast
//! channel for live watchers. The [`Registry`] keeps the most recent builds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::proto::kiln_v1::{self, build_event::Event, log_chunk::Stream, BuildEvent};

/// How many bytes of the log's end go into failure messages.
pub const LOG_TAIL_BYTES: usize = 4096;
/// How many lines of the log's end go into failure messages.
pub const LOG_TAIL_LINES: usize = 25;

struct State {
    history: VecDeque<BuildEvent>,
    history_log_bytes: usize,
    log_bytes_total: u64,
    tail: VecDeque<u8>,
    finished: bool,
}

/// The events of one build.
pub struct BuildLog {
    id: String,
    history_limit: usize,
    state: Mutex<State>,
    live: broadcast::Sender<BuildEvent>,
}

impl BuildLog {
    fn new(id: String, history_limit: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self {
            id,
            history_limit,
            state: Mutex::new(State {
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only log bookkeeping behind;
        // keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and broadcasts an event.
    pub fn emit(&self, event: Event) {
        let ev = BuildEvent {
            build_id: self.id.clone(),
            event: Some(event),
        };
        let mut st = self.lock();
        if let Some(Event::Log(chunk)) = &ev.event {
            let n = chunk.data.len();
            st.log_bytes_total += n as u64;
            st.history_log_bytes += n;
            for b in chunk.data.iter() {
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
                    .position(|e| matches!(e.event, Some(Event::Log(_))))
                else {
                    break;
                };
                if let Some(BuildEvent {
                    event: Some(Event::Log(old)),
                    ..
                }) = st.history.remove(pos)
                {
                    st.history_log_bytes -= old.data.len();
                }
            }
        }
        if matches!(ev.event, Some(Event::Completed(_)) | Some(Event::Failed(_))) {
            st.finished = true;
        }
        st.history.push_back(ev.clone());
        // No receivers is fine: nobody is watching live.
        let _ = self.live.send(ev);
    }

    /// Records a chunk of builder output.
    pub fn log(&self, stream: Stream, data: &[u8]) {
        self.emit(Event::Log(kiln_v1::LogChunk {
            stream: stream as i32,
            data: data.to_vec().into(),
        }));
    }

    /// Records a lifecycle phase.
    pub fn phase(&self, name: &str) {
        self.emit(Event::Phase(kiln_v1::Phase {
            name: name.to_owned(),
        }));
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

    /// The history so far and a receiver for what follows, without a gap.
    pub fn subscribe(&self) -> (Vec<BuildEvent>, Option<broadcast::Receiver<BuildEvent>>) {
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

    /// Creates the log of a new build.
    pub fn create(&self, id: String) -> Arc<BuildLog> {
        let log = Arc::new(BuildLog::new(id.clone(), self.history_limit));
        let mut guard = self.builds.lock().unwrap_or_else(|p| p.into_inner());
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

    /// The log of a known build.
    pub fn get(&self, id: &str) -> Option<Arc<BuildLog>> {
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_but_keeps_lifecycle_events() {
        let reg = Registry::new(10, 100);
        let log = reg.create("b1".into());
        log.phase("boot");
        for _ in 0..50 {
            log.log(Stream::Stdout, &[b'x'; 10]);
        }
        let (history, rx) = log.subscribe();
        assert!(rx.is_some());
        let log_bytes: usize = history
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Log(c)) => Some(c.data.len()),
                _ => None,
            })
            .sum();
        assert!(log_bytes <= 100, "{log_bytes}");
        assert!(matches!(history[0].event, Some(Event::Phase(_))));
        assert_eq!(log.log_bytes(), 500);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let reg = Registry::new(1, 1000);
        let log = reg.create("b".into());
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
        reg.create("a".into());
        reg.create("b".into());
        reg.create("c".into());
        assert!(reg.get("a").is_none());
        assert!(reg.get("c").is_some());
    }

    #[test]
    fn finished_builds_have_no_live_stream() {
        let reg = Registry::new(2, 10);
        let log = reg.create("a".into());
        log.emit(Event::Failed(kiln_v1::Failed::default()));
        assert!(log.subscribe().1.is_none());
    }
}
