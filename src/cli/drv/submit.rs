//! Step 4: one build request to the server, through kiln's event stream
//! with the builder's log on stderr, or plain `snix.build.v1` `DoBuild`
//! where the server does not offer the events.

use std::io::Write;

use tonic::Code;

use crate::client::{submit_and_follow, EventSink, FollowError, KilnChannel};
use crate::grpc::status::failed_detail;
use crate::nix::StorePath;
use crate::proto::kiln_v1::{submit_request, LogChunk, SubmitRequest};
use crate::proto::snix_build;
use crate::proto::snix_build::build_service_client::BuildServiceClient;
use crate::server::MAX_MESSAGE_BYTES;

use super::error::{bad, DrvError};

/// Whether the server refused a build because it asked for network access
/// (the `network` precondition of its `kiln.v1.Failed`).
pub(super) fn refuses_network(error: &DrvError) -> bool {
    match error {
        DrvError::Submit { precondition, .. } => precondition == "network",
        DrvError::BuildFailed { failed, .. } => failed.precondition == "network",
        _ => false,
    }
}

/// Submits through kiln's event stream (log to stderr); falls back to plain
/// `DoBuild` when the server does not offer it.
pub(super) async fn submit(
    channel: &KilnChannel,
    drv: &StorePath,
    request: snix_build::BuildRequest,
) -> Result<snix_build::BuildResponse, DrvError> {
    let submit = SubmitRequest {
        request: Some(submit_request::Request::Snix(request.clone())),
    };
    let error = match submit_and_follow(channel.clone(), submit, &mut LogToStderr).await {
        Ok(done) => {
            return done
                .completed
                .snix
                .ok_or_else(|| bad(drv, "completed without a snix response"))
        }
        Err(error) => error,
    };
    let precondition = error.precondition().unwrap_or_default().to_owned();
    match error {
        FollowError::Refused {
            code: Code::Unimplemented,
            ..
        } => do_build(channel, drv, request).await,
        FollowError::Refused { code, message, .. } | FollowError::Stream { code, message, .. } => {
            Err(DrvError::Submit {
                drv: drv.clone(),
                code,
                message,
                precondition,
            })
        }
        FollowError::Failed { failed, .. } => {
            let _ = std::io::stderr().write_all(&failed.log_tail);
            Err(DrvError::BuildFailed {
                drv: drv.clone(),
                failed,
            })
        }
        FollowError::Ended { .. } => Err(bad(drv, "event stream ended before the build did")),
    }
}

/// `snix.build.v1.BuildService/DoBuild`, for a server without kiln's
/// events.
async fn do_build(
    channel: &KilnChannel,
    drv: &StorePath,
    request: snix_build::BuildRequest,
) -> Result<snix_build::BuildResponse, DrvError> {
    let mut client = BuildServiceClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    client
        .do_build(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| DrvError::Submit {
            drv: drv.clone(),
            code: status.code(),
            message: status.message().to_owned(),
            precondition: failed_detail(&status)
                .map(|f| f.precondition)
                .unwrap_or_default(),
        })
}

/// The builder's log, stdout and stderr alike, on this process's stderr
/// (stdout is for the output paths).
struct LogToStderr;

impl EventSink for LogToStderr {
    fn log(&mut self, _build_id: &str, chunk: &LogChunk) {
        // The log is best effort: a closed stderr must not fail the build.
        let _ = std::io::stderr().write_all(&chunk.data);
    }
}
