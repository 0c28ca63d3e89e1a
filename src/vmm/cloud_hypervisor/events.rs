//! cloud-hypervisor's event monitor (`--event-monitor path=…`): a stream of
//! JSON objects (`{"timestamp", "source", "event", "properties"}`), written
//! one after another as things happen in the VMM.
//!
//! kiln reads it for one reason: to notice a guest *reboot*. cloud-hypervisor
//! has no "exit instead of reboot" switch, so a guest kernel that panics
//! (kiln's command line says `panic=-1`, reboot at once) would come back up
//! and run the job a second time. The runner kills the VMM instead when it
//! sees [`ChEvent::is_reboot`].

use serde::Deserialize;

/// One event, as far as kiln cares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChEvent {
    /// Which part of the VMM speaks (`vmm`, `vm`, `cpu_manager`, ...).
    pub source: String,
    /// What happened (`booting`, `booted`, `rebooting`, `shutdown`, ...).
    pub event: String,
}

impl ChEvent {
    /// The guest asked for a reset (reboot, triple fault, panic with
    /// `panic=-1`).
    pub fn is_reboot(&self) -> bool {
        self.source == "vm" && (self.event == "rebooting" || self.event == "rebooted")
    }
}

/// Splits the byte stream into events; bytes of an incomplete object wait for
/// the next [`EventParser::push`].
#[derive(Debug, Default)]
pub struct EventParser {
    pending: Vec<u8>,
}

/// Upper bound on an incomplete event kept around; a stream that never
/// completes an object is garbage and is dropped rather than kept growing.
const MAX_PENDING: usize = 64 * 1024;

impl EventParser {
    /// Feeds `bytes`, returns the events they complete. Values that are not
    /// events (other JSON, garbage) are skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ChEvent> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut consumed = 0;
        loop {
            let rest = &self.pending[consumed..];
            let mut stream =
                serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
            match stream.next() {
                None => {
                    consumed = self.pending.len();
                    break;
                }
                Some(Ok(value)) => {
                    consumed += stream.byte_offset();
                    if let Ok(event) = serde_json::from_value::<ChEvent>(value) {
                        events.push(event);
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not JSON: resynchronise at the next object.
                    let skip = rest
                        .iter()
                        .skip(1)
                        .position(|&b| b == b'{')
                        .map_or(rest.len(), |p| p + 1);
                    consumed += skip;
                }
            }
        }
        self.pending.drain(..consumed);
        if self.pending.len() > MAX_PENDING {
            self.pending.clear();
        }
        events
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn ev(source: &str, event: &str) -> ChEvent {
        ChEvent {
            source: source.into(),
            event: event.into(),
        }
    }

    /// What cloud-hypervisor writes: pretty-printed objects, one after another.
    const STREAM: &str = r#"{
  "timestamp": {"secs": 0, "nanos": 1200},
  "source": "vmm",
  "event": "starting",
  "properties": null
}

{
  "timestamp": {"secs": 0, "nanos": 9000},
  "source": "vm",
  "event": "booted",
  "properties": null
}

{
  "timestamp": {"secs": 3, "nanos": 0},
  "source": "vm",
  "event": "rebooting",
  "properties": null
}
"#;

    #[test]
    fn parses_a_whole_stream() {
        let events = EventParser::default().push(STREAM.as_bytes());
        assert_eq!(
            events,
            vec![
                ev("vmm", "starting"),
                ev("vm", "booted"),
                ev("vm", "rebooting")
            ]
        );
        assert_eq!(
            events.iter().map(ChEvent::is_reboot).collect::<Vec<_>>(),
            [false, false, true]
        );
    }

    #[test]
    fn events_split_across_reads_come_out_once_complete() {
        let mut parser = EventParser::default();
        let mut got = Vec::new();
        for chunk in STREAM.as_bytes().chunks(7) {
            got.extend(parser.push(chunk));
        }
        assert_eq!(got.len(), 3);
        assert!(got[2].is_reboot());
        assert!(parser.pending.is_empty());
    }

    #[test]
    fn garbage_and_foreign_values_are_skipped() {
        let mut parser = EventParser::default();
        let events = parser
            .push(b"oops not json {\"source\":\"vm\",\"event\":\"shutdown\"} [1,2] 17 {\"x\":1}");
        assert_eq!(events, vec![ev("vm", "shutdown")]);
        assert!(!events[0].is_reboot());
    }

    #[test]
    fn an_endless_object_does_not_grow_without_bound() {
        let mut parser = EventParser::default();
        parser.push(b"{\"source\": \"");
        for _ in 0..100 {
            parser.push(&[b'a'; 1024]);
        }
        assert!(parser.pending.len() <= MAX_PENDING);
    }
}
