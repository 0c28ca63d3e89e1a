//! Following builds over `kiln.v1.BuildEvents`.

use std::time::Duration;

use kiln::proto::snix_build;
use tonic::transport::Channel;

/// Submits `req` through `kiln.v1.BuildEvents` on `channel` and returns the
/// event stream once the builder has printed a line starting with `marker`.
pub async fn submit_until_log(
    channel: Channel,
    req: snix_build::BuildRequest,
    marker: &[u8],
) -> tonic::Streaming<kiln::proto::kiln_v1::BuildEvent> {
    use kiln::proto::kiln_v1::build_event::Event;
    use kiln::proto::kiln_v1::{submit_request, SubmitRequest};
    let mut client = kiln::proto::kiln_v1::build_events_client::BuildEventsClient::new(channel);
    let mut stream = client
        .submit(SubmitRequest {
            request: Some(submit_request::Request::Snix(req)),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(180), stream.message())
            .await
            .expect("the builder should print within 180 s")
            .unwrap()
            .expect("the stream ended before the builder printed");
        match ev.event {
            Some(Event::Log(c)) if c.data.starts_with(marker) => return stream,
            Some(Event::Failed(f)) => panic!("build failed before printing {marker:?}: {f:?}"),
            _ => {}
        }
    }
}
