//! Following one build over `kiln.v1.BuildEvents` to its end: submit a
//! request (or watch a build by id), hand each event to an [`EventSink`]
//! as it arrives, and finish with the `Completed` answer or with an error
//! that keeps the `kiln.v1.Failed` detail.
//!
//! `kiln build`, `kiln build --drv`, the bench and the tests all follow
//! builds through here; they differ only in their sink (what they print or
//! record) and in how they present a [`FollowError`].

use tonic::{Code, Status, Streaming};

use crate::client::KilnChannel;
use crate::grpc::status::failed_detail;
use crate::proto::kiln_v1::build_event::Event;
use crate::proto::kiln_v1::build_events_client::BuildEventsClient;
use crate::proto::kiln_v1::{
    BuildEvent, CacheHit, Completed, Failed, LogChunk, Output, Phase, Started, SubmitRequest,
    WatchRequest,
};
use crate::server::MAX_MESSAGE_BYTES;

/// What a follower does with the events before the last. Every method
/// defaults to ignoring its event; `()` ignores them all.
pub trait EventSink {
    /// The VM was started for the build.
    fn started(&mut self, _build_id: &str, _started: &Started) {}
    /// The build entered a lifecycle step (`materialise`, `boot`, …).
    fn phase(&mut self, _build_id: &str, _phase: &Phase) {}
    /// The builder wrote to stdout or stderr.
    fn log(&mut self, _build_id: &str, _chunk: &LogChunk) {}
    /// An output was ingested.
    fn output(&mut self, _build_id: &str, _output: &Output) {}
    /// The build is answered from the result cache (no VM runs).
    fn cache_hit(&mut self, _build_id: &str, _hit: &CacheHit) {}
}

impl EventSink for () {}

/// A build that completed.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The server's build id.
    pub build_id: String,
    /// The answer, in the layout the build was submitted in.
    pub completed: Completed,
}

/// Why following a build did not end in `Completed`.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The server refused the call itself (the request broke a rule, the
    /// service is not offered, the build id is unknown, …).
    #[error("the server refused the build ({code:?}): {message}")]
    Refused {
        /// gRPC code.
        code: Code,
        /// gRPC message.
        message: String,
        /// The `kiln.v1.Failed` detail, when kiln put one in the status
        /// (boxed: it is large and the error is returned by value).
        failed: Option<Box<Failed>>,
    },
    /// The event stream broke before the build ended.
    #[error("the event stream of build {build_id} broke ({code:?}): {message}")]
    Stream {
        /// The build, as far as its events said.
        build_id: String,
        /// gRPC code.
        code: Code,
        /// gRPC message.
        message: String,
    },
    /// The build ended in `Failed`.
    #[error("build {build_id} failed ({}): {}", .failed.kind, .failed.message)]
    Failed {
        /// The server's build id.
        build_id: String,
        /// The event: kind, exit code or signal, log tail, precondition.
        failed: Box<Failed>,
    },
    /// The stream ended without `Completed` or `Failed`.
    #[error("the event stream of build {build_id} ended before the build did")]
    Ended {
        /// The build, as far as its events said.
        build_id: String,
    },
}

impl FollowError {
    fn refused(status: &Status) -> Self {
        Self::Refused {
            code: status.code(),
            message: status.message().to_owned(),
            // A status without details would decode as an empty Failed.
            failed: (!status.details().is_empty())
                .then(|| failed_detail(status))
                .flatten()
                .map(Box::new),
        }
    }

    /// The `kiln.v1.Failed` detail: the event, or the refusal's status
    /// detail.
    pub fn failed(&self) -> Option<&Failed> {
        match self {
            Self::Refused { failed, .. } => failed.as_deref(),
            Self::Failed { failed, .. } => Some(failed),
            Self::Stream { .. } | Self::Ended { .. } => None,
        }
    }

    /// Which host precondition the build failed (`kiln.v1.Failed.precondition`:
    /// `system`, `memory`, `network`, …), if that is why.
    pub fn precondition(&self) -> Option<&str> {
        self.failed()
            .map(|f| f.precondition.as_str())
            .filter(|p| !p.is_empty())
    }

    /// The gRPC code `DoBuild` would have answered with; UNAVAILABLE for a
    /// stream that just ended.
    pub fn code(&self) -> Code {
        match self {
            Self::Refused { code, .. } | Self::Stream { code, .. } => *code,
            Self::Failed { failed, .. } => Code::from_i32(failed.code),
            Self::Ended { .. } => Code::Unavailable,
        }
    }
}

/// One build's event stream, followed.
pub struct Follow {
    events: Streaming<BuildEvent>,
    build_id: String,
}

impl Follow {
    /// Submits `request` (`kiln.v1.BuildEvents/Submit`).
    pub async fn submit(
        channel: impl Into<KilnChannel>,
        request: impl tonic::IntoRequest<SubmitRequest>,
    ) -> Result<Self, FollowError> {
        let events = client(channel)
            .submit(request)
            .await
            .map_err(|s| FollowError::refused(&s))?
            .into_inner();
        Ok(Self {
            events,
            build_id: String::new(),
        })
    }

    /// Follows the build `build_id` from its first kept event
    /// (`kiln.v1.BuildEvents/Watch`).
    pub async fn watch(
        channel: impl Into<KilnChannel>,
        build_id: &str,
    ) -> Result<Self, FollowError> {
        let events = client(channel)
            .watch(WatchRequest {
                build_id: build_id.to_owned(),
            })
            .await
            .map_err(|s| FollowError::refused(&s))?
            .into_inner();
        Ok(Self {
            events,
            build_id: build_id.to_owned(),
        })
    }

    /// The build's id, once an event has named it.
    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    /// Waits for the next event and hands it to `sink`: `Some` once the
    /// build completed, `None` while it goes on, an error when it failed
    /// or the stream ended. Call it again only after `None`.
    pub async fn next<S: EventSink + ?Sized>(
        &mut self,
        sink: &mut S,
    ) -> Result<Option<Completion>, FollowError> {
        match self.events.message().await {
            Ok(Some(event)) => step(&mut self.build_id, event, sink),
            Ok(None) => Err(FollowError::Ended {
                build_id: self.build_id.clone(),
            }),
            Err(status) => Err(FollowError::Stream {
                build_id: self.build_id.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }),
        }
    }

    /// Follows the build to its end.
    pub async fn to_end<S: EventSink + ?Sized>(
        mut self,
        sink: &mut S,
    ) -> Result<Completion, FollowError> {
        loop {
            if let Some(done) = self.next(sink).await? {
                return Ok(done);
            }
        }
    }
}

/// Submits `request` and follows it to its end.
pub async fn submit_and_follow<S: EventSink + ?Sized>(
    channel: impl Into<KilnChannel>,
    request: impl tonic::IntoRequest<SubmitRequest>,
    sink: &mut S,
) -> Result<Completion, FollowError> {
    Follow::submit(channel, request).await?.to_end(sink).await
}

/// `request` asking to be built even when the server's result cache would
/// answer it (`x-kiln-result-cache: bypass`).
pub fn bypassing_result_cache(request: SubmitRequest) -> tonic::Request<SubmitRequest> {
    let mut request = tonic::Request::new(request);
    bypass_result_cache(&mut request);
    request
}

/// Sets `x-kiln-result-cache: bypass` on any build call (`DoBuild` too).
pub fn bypass_result_cache<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        crate::executor::result_cache::BYPASS_HEADER,
        tonic::metadata::MetadataValue::from_static(crate::executor::result_cache::BYPASS),
    );
}

/// A client taking messages as large as the server sends (a `Completed`
/// carries every output entry).
fn client(channel: impl Into<KilnChannel>) -> BuildEventsClient<KilnChannel> {
    BuildEventsClient::new(channel.into())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// One event: to the sink, or the end of the build.
fn step<S: EventSink + ?Sized>(
    build_id: &mut String,
    event: BuildEvent,
    sink: &mut S,
) -> Result<Option<Completion>, FollowError> {
    if !event.build_id.is_empty() {
        *build_id = event.build_id;
    }
    let id = build_id.as_str();
    match event.event {
        Some(Event::Started(s)) => sink.started(id, &s),
        Some(Event::Phase(p)) => sink.phase(id, &p),
        Some(Event::Log(chunk)) => sink.log(id, &chunk),
        Some(Event::Output(o)) => sink.output(id, &o),
        Some(Event::CacheHit(hit)) => sink.cache_hit(id, &hit),
        Some(Event::Completed(completed)) => {
            return Ok(Some(Completion {
                build_id: id.to_owned(),
                completed,
            }))
        }
        Some(Event::Failed(failed)) => {
            return Err(FollowError::Failed {
                build_id: id.to_owned(),
                failed: Box::new(failed),
            })
        }
        // An event kind newer than this client.
        None => {}
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reached the sink.
    #[derive(Default)]
    struct Seen(Vec<String>);

    impl EventSink for Seen {
        fn started(&mut self, id: &str, s: &Started) {
            self.0.push(format!("{id} started {}", s.vmm));
        }
        fn phase(&mut self, id: &str, p: &Phase) {
            self.0.push(format!("{id} phase {}", p.name));
        }
        fn log(&mut self, id: &str, c: &LogChunk) {
            self.0
                .push(format!("{id} log {}", String::from_utf8_lossy(&c.data)));
        }
        fn output(&mut self, id: &str, o: &Output) {
            self.0.push(format!("{id} output {}", o.path));
        }
    }

    fn event(id: &str, event: Event) -> BuildEvent {
        BuildEvent {
            build_id: id.into(),
            event: Some(event),
        }
    }

    /// Runs `events` through [`step`] until one ends the build.
    fn follow(events: Vec<BuildEvent>, sink: &mut Seen) -> Option<Result<Completion, FollowError>> {
        let mut id = String::new();
        for e in events {
            match step(&mut id, e, sink) {
                Ok(None) => {}
                Ok(Some(done)) => return Some(Ok(done)),
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }

    #[test]
    fn events_reach_the_sink_in_order_until_completed() {
        let mut seen = Seen::default();
        let completed = Completed {
            duration_ms: 7,
            ..Default::default()
        };
        let events = vec![
            event(
                "b1",
                Event::Phase(Phase {
                    name: "boot".into(),
                }),
            ),
            event(
                "b1",
                Event::Started(Started {
                    vmm: "qemu".into(),
                    ..Default::default()
                }),
            ),
            event(
                "b1",
                Event::Log(LogChunk {
                    stream: 0,
                    data: b"hi".to_vec().into(),
                }),
            ),
            // No id on this one: the build's id carries over.
            BuildEvent {
                build_id: String::new(),
                event: Some(Event::Output(Output {
                    path: "nix/store/x".into(),
                    ..Default::default()
                })),
            },
            BuildEvent {
                build_id: "b1".into(),
                event: None,
            },
            event("b1", Event::Completed(completed.clone())),
            event(
                "b1",
                Event::Phase(Phase {
                    name: "late".into(),
                }),
            ),
        ];
        let done = follow(events, &mut seen).expect("ends").expect("completes");
        assert_eq!(
            done,
            Completion {
                build_id: "b1".into(),
                completed
            }
        );
        assert_eq!(
            seen.0,
            [
                "b1 phase boot",
                "b1 started qemu",
                "b1 log hi",
                "b1 output nix/store/x"
            ]
        );
    }

    #[test]
    fn failed_keeps_the_detail() {
        let failed = Failed {
            code: Code::FailedPrecondition as i32,
            message: "no network here".into(),
            kind: "precondition".into(),
            precondition: "network".into(),
            ..Default::default()
        };
        let events = vec![event("b2", Event::Failed(failed.clone()))];
        let err = follow(events, &mut Seen::default())
            .expect("ends")
            .expect_err("fails");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.precondition(), Some("network"));
        assert_eq!(err.failed(), Some(&failed));
        assert_eq!(
            err.to_string(),
            "build b2 failed (precondition): no network here"
        );
    }

    #[test]
    fn a_refusal_keeps_the_status_detail() {
        use prost::Message;
        let failed = Failed {
            code: Code::FailedPrecondition as i32,
            kind: "precondition".into(),
            precondition: "memory".into(),
            ..Default::default()
        };
        let status = Status::with_details(
            Code::FailedPrecondition,
            "too much memory",
            failed.encode_to_vec().into(),
        );
        let err = FollowError::refused(&status);
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.precondition(), Some("memory"));
        let plain = FollowError::refused(&Status::unimplemented("no events"));
        assert_eq!(plain.code(), Code::Unimplemented);
        assert_eq!(plain.precondition(), None);
        assert!(plain.failed().is_none());
    }

    #[test]
    fn an_empty_precondition_is_none() {
        let err = FollowError::Failed {
            build_id: "b3".into(),
            failed: Box::new(Failed {
                kind: "builder_failed".into(),
                exit_code: Some(2),
                ..Default::default()
            }),
        };
        assert_eq!(err.precondition(), None);
    }
}
