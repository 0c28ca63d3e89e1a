//! Domain → wire for results: a build's outcome as each layout answers it,
//! and as `kiln.v1.Completed`.

use prost::Message;
use tonic::Status;

use crate::executor::request::Layout;
use crate::executor::run::BuildOutcome;
use crate::proto::{kiln_v1, snix_build, tvix_build};

/// The `tvix.build.v1` answer: the request echoed, outputs named by
/// basename and sorted by name.
pub fn tvix(outcome: &BuildOutcome) -> Result<tvix_build::Build, Status> {
    // The echo was encoded by this process from a valid message: missing
    // or undecodable means a bug, said as such.
    let echo = outcome
        .wire_echo
        .clone()
        .ok_or_else(|| Status::internal("the tvix.build.v1 request echo was not kept"))?;
    let request = tvix_build::BuildRequest::decode(echo)
        .map_err(|e| Status::internal(format!("the kept tvix.build.v1 request echo: {e}")))?;
    let mut outputs: Vec<_> = outcome
        .outputs
        .iter()
        .map(|o| {
            let path = o.path.as_str();
            let name = path.rsplit('/').next().unwrap_or(path);
            (name, o.node.to_tvix_node(name.as_bytes()))
        })
        .collect();
    outputs.sort_by(|a, b| a.0.cmp(b.0));
    Ok(tvix_build::Build {
        build_request: Some(request),
        outputs: outputs.into_iter().map(|(_, node)| node).collect(),
    })
}

/// The `snix.build.v1` answer: anonymous outputs in request order, with
/// their needles.
pub fn snix(outcome: &BuildOutcome) -> snix_build::BuildResponse {
    snix_build::BuildResponse {
        outputs: outcome
            .outputs
            .iter()
            .map(|o| snix_build::build_response::Output {
                output: Some(o.node.to_snix_entry(b"")),
                needles: o.needles.clone(),
            })
            .collect(),
    }
}

/// `kiln.v1.Completed`: the answer in the request's layout.
pub fn completed(outcome: &BuildOutcome) -> kiln_v1::Completed {
    let (tvix, snix) = match outcome.layout {
        Layout::Tvix => match tvix(outcome) {
            Ok(answer) => (Some(answer), None),
            Err(status) => {
                tracing::error!(error = %status.message(), "cannot answer in the tvix layout");
                (None, None)
            }
        },
        Layout::Snix => (None, Some(snix(outcome))),
    };
    let r = &outcome.report;
    kiln_v1::Completed {
        tvix,
        snix,
        duration_ms: r.boot_ms + r.setup_ms + r.build_ms,
    }
}
