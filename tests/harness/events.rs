//! Following builds over `kiln.v1.BuildEvents`, through the client's one
//! event loop ([`kiln::client::Follow`]).

use std::time::Duration;

use kiln::client::{EventSink, Follow};
use kiln::proto::kiln_v1::{submit_request, LogChunk, SubmitRequest};
use kiln::proto::snix_build;
use tonic::transport::Channel;

/// How long a test waits for any one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(180);

/// Submits `req` on `channel` and returns the followed build once the
/// builder has printed a chunk starting with `marker` (dropping it cancels
/// the build).
pub async fn submit_until_log(
    channel: impl Into<kiln::client::KilnChannel>,
    req: snix_build::BuildRequest,
    marker: &[u8],
) -> Follow {
    let request = SubmitRequest {
        request: Some(submit_request::Request::Snix(req)),
        argv0: String::new(),
        limits: None,
    };
    let mut follow = Follow::submit(channel, request).await.unwrap();
    let mut seen = Marker {
        marker,
        seen: false,
    };
    while !seen.seen {
        let step = tokio::time::timeout(EVENT_TIMEOUT, follow.next(&mut seen))
            .await
            .unwrap_or_else(|_| panic!("no event within {EVENT_TIMEOUT:?}"));
        match step {
            Ok(None) => {}
            Ok(Some(_)) => panic!("the build completed before printing {marker:?}"),
            Err(e) => panic!("the build ended before printing {marker:?}: {e}"),
        }
    }
    follow
}

/// Waits for the end of `follow`, at most [`EVENT_TIMEOUT`] per event.
pub async fn to_end(
    mut follow: Follow,
    sink: &mut impl EventSink,
) -> Result<kiln::client::Completion, kiln::client::FollowError> {
    loop {
        let step = tokio::time::timeout(EVENT_TIMEOUT, follow.next(sink))
            .await
            .unwrap_or_else(|_| panic!("no event within {EVENT_TIMEOUT:?}"));
        if let Some(done) = step? {
            return Ok(done);
        }
    }
}

/// Notes a log chunk starting with the marker.
struct Marker<'a> {
    marker: &'a [u8],
    seen: bool,
}

impl EventSink for Marker<'_> {
    fn log(&mut self, _build_id: &str, chunk: &LogChunk) {
        self.seen |= chunk.data.starts_with(self.marker);
    }
}

/// Collects the builder's log.
#[derive(Default)]
pub struct LogBytes(pub Vec<u8>);

impl EventSink for LogBytes {
    fn log(&mut self, _build_id: &str, chunk: &LogChunk) {
        self.0.extend_from_slice(&chunk.data);
    }
}
