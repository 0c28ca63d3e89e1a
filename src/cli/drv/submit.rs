//! Step 4: one build request to the server, through kiln's event stream
//! with the builder's log on stderr, or plain `snix.build.v1` `DoBuild`
//! where the server does not offer the events.
//!
//! Only the event stream's `kiln.v1.SubmitRequest` carries `argv0`, the
//! builder's basename that Nix passes as `argv[0]`. Plain `DoBuild` cannot:
//! there the builder sees its full path as `argv[0]`, and a builder that
//! looks at `$0` may produce other bytes than under Nix (a line on stderr
//! says so).

use std::io::Write;

use tonic::Code;

use crate::client::{
    bypassing_result_cache, submit_and_follow, EventSink, FollowError, KilnChannel,
};
use crate::grpc::status::failed_detail;
use crate::nix::build_request::submit_request;
use crate::nix::{Derivation, StorePath};
use crate::proto::kiln_v1::LogChunk;
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

/// Submits `request`, made for `derivation`, through kiln's event stream
/// (log to stderr), with the builder's `argv[0]` as Nix sets it; falls back
/// to plain `DoBuild` when the server does not offer the stream.
pub(super) async fn submit(
    channel: &KilnChannel,
    drv: &StorePath,
    derivation: &Derivation,
    request: snix_build::BuildRequest,
    rebuild: bool,
) -> Result<snix_build::BuildResponse, DrvError> {
    let submit = submit_request(derivation, request.clone());
    let argv0 = submit.argv0.clone();
    let submit = match rebuild {
        true => bypassing_result_cache(submit),
        false => tonic::Request::new(submit),
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
        } => {
            if !argv0.is_empty() {
                eprintln!(
                    "kiln: the server has no kiln.v1 events; {drv} runs through plain DoBuild, \
                     where the builder's argv[0] is its full path, not {argv0:?} as under Nix"
                );
            }
            do_build(channel, drv, request, rebuild).await
        }
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
/// events. The request has no `argv0` (see the module docs): the builder
/// gets argv = `command_args`.
async fn do_build(
    channel: &KilnChannel,
    drv: &StorePath,
    request: snix_build::BuildRequest,
    rebuild: bool,
) -> Result<snix_build::BuildResponse, DrvError> {
    let mut client = BuildServiceClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(request);
    if rebuild {
        crate::client::bypass_result_cache(&mut request);
    }
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
