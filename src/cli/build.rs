//! `kiln build --addr URL request.json`: submits a build written as JSON
//! (the protobuf JSON mapping), shows its log live with a progress line on
//! stderr, and prints the outputs on stdout.
//!
//! The file holds either a `kiln.v1.SubmitRequest` (`{"snix": {...}}` or
//! `{"tvix": {...}}`, optionally with `"argv0"`), or a bare build request
//! whose layout `--layout` names.

use std::io::Write;
use std::path::Path;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::Code;

use crate::cli::ClientError;
use crate::client::{
    bypassing_result_cache, connect, submit_and_follow, ClientSecurity, EventSink, FollowError,
};
use crate::proto::kiln_v1::{
    log_chunk::Stream, submit_request, CacheHit, LogChunk, Output, Phase, Started, SubmitRequest,
};
use crate::proto::{self, snix_build, tvix_build};

/// Which layout a bare JSON request is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JsonLayout {
    /// `snix.build.v1.BuildRequest`.
    Snix,
    /// `tvix.build.v1.BuildRequest` (the seed's layout).
    Tvix,
}

/// Errors of `kiln build`.
#[derive(Debug, thiserror::Error)]
pub enum BuildCliError {
    /// The request file could not be read.
    #[error("reading {0}")]
    Read(String, #[source] std::io::Error),
    /// The JSON is not a valid request.
    #[error("{path} is not a valid {message} in the protobuf JSON mapping: {detail}")]
    Json {
        /// The file.
        path: String,
        /// The message type tried.
        message: String,
        /// What the decoder said.
        detail: String,
    },
    /// Connecting or calling failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server refused or failed the build.
    #[error("build failed ({code:?}): {message}")]
    Failed {
        /// gRPC code.
        code: Code,
        /// Message.
        message: String,
    },
}

fn decode_json<M: Message + Default>(
    path: &str,
    json: &str,
    full_name: &str,
) -> Result<M, BuildCliError> {
    let err = |detail: String| BuildCliError::Json {
        path: path.into(),
        message: full_name.into(),
        detail,
    };
    let pool =
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).map_err(|e| err(e.to_string()))?;
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| err("unknown message type".into()))?;
    let mut de = serde_json::Deserializer::from_str(json);
    let dynamic = DynamicMessage::deserialize(desc, &mut de).map_err(|e| err(e.to_string()))?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| err(e.to_string()))
}

/// Parses a request file into a `SubmitRequest`.
pub fn parse_request(path: &Path, layout: JsonLayout) -> Result<SubmitRequest, BuildCliError> {
    let p = path.display().to_string();
    let json = std::fs::read_to_string(path).map_err(|e| BuildCliError::Read(p.clone(), e))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| BuildCliError::Json {
            path: p.clone(),
            message: "JSON".into(),
            detail: e.to_string(),
        })?;
    // A wrapper has one of `snix`/`tvix`, maybe `argv0`, and nothing else;
    // no bare request has fields of those names.
    let is_submit = value.as_object().is_some_and(|o| {
        (o.contains_key("snix") || o.contains_key("tvix"))
            && o.keys()
                .all(|k| ["snix", "tvix", "argv0"].contains(&k.as_str()))
    });
    if is_submit {
        return decode_json(&p, &json, "kiln.v1.SubmitRequest");
    }
    let request = match layout {
        JsonLayout::Snix => submit_request::Request::Snix(decode_json::<snix_build::BuildRequest>(
            &p,
            &json,
            "snix.build.v1.BuildRequest",
        )?),
        JsonLayout::Tvix => submit_request::Request::Tvix(decode_json::<tvix_build::BuildRequest>(
            &p,
            &json,
            "tvix.build.v1.BuildRequest",
        )?),
    };
    Ok(SubmitRequest {
        request: Some(request),
        argv0: String::new(),
        limits: None,
    })
}

/// Submits to the server at `addr` (reached with `security`), streams the
/// log, prints outputs.
pub async fn run(
    addr: &str,
    security: &ClientSecurity,
    path: &Path,
    layout: JsonLayout,
    json_out: bool,
    rebuild: bool,
) -> Result<(), BuildCliError> {
    let request = parse_request(path, layout)?;
    let request = match rebuild {
        true => bypassing_result_cache(request),
        false => tonic::Request::new(request),
    };
    let channel = connect(addr, security).await?;
    let done = submit_and_follow(channel, request, &mut Progress)
        .await
        .map_err(|e| match e {
            FollowError::Ended { .. } => BuildCliError::Failed {
                code: Code::Unavailable,
                message: "event stream ended early".into(),
            },
            FollowError::Refused { code, message, .. }
            | FollowError::Stream { code, message, .. } => BuildCliError::Failed { code, message },
            FollowError::Failed { failed, .. } => BuildCliError::Failed {
                code: Code::from_i32(failed.code),
                message: failed.message,
            },
        })?;
    print_outputs(&done.completed, json_out);
    let _ = writeln!(std::io::stderr(), "kiln: build {} succeeded", done.build_id);
    Ok(())
}

/// The progress of a build on stderr, the builder's stdout on stdout. A
/// closed stream must not fail the build: writes are best effort.
struct Progress;

impl EventSink for Progress {
    fn started(&mut self, build_id: &str, s: &Started) {
        let _ = writeln!(
            std::io::stderr(),
            "kiln: build {build_id} on {} ({}), {} MiB, {} vCPU{}",
            s.vmm,
            s.accel,
            s.guest_memory_bytes >> 20,
            s.vcpus,
            if s.warm { ", warm VM" } else { "" }
        );
    }

    fn phase(&mut self, build_id: &str, p: &Phase) {
        let _ = writeln!(
            std::io::stderr(),
            "kiln: [{}] {}",
            build_id.get(..8).unwrap_or(build_id),
            p.name
        );
    }

    fn log(&mut self, _build_id: &str, chunk: &LogChunk) {
        let _ = if chunk.stream == Stream::Stdout as i32 {
            let mut stdout = std::io::stdout();
            stdout.write_all(&chunk.data).and_then(|_| stdout.flush())
        } else {
            std::io::stderr().write_all(&chunk.data)
        };
    }

    fn output(&mut self, _build_id: &str, o: &Output) {
        let _ = writeln!(std::io::stderr(), "kiln: output /{}", o.path);
    }

    fn cache_hit(&mut self, build_id: &str, hit: &CacheHit) {
        let _ = writeln!(
            std::io::stderr(),
            "kiln: build {build_id} answered from the result cache (built by {}; --rebuild builds again)",
            hit.build_id
        );
    }
}

fn print_outputs(c: &crate::proto::kiln_v1::Completed, json_out: bool) {
    if json_out {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET);
        if let Ok(pool) = pool {
            if let Some(desc) = pool.get_message_by_name("kiln.v1.Completed") {
                if let Ok(dynamic) = DynamicMessage::decode(desc, c.encode_to_vec().as_slice()) {
                    if let Ok(s) = serde_json::to_string_pretty(&dynamic) {
                        println!("{s}");
                        return;
                    }
                }
            }
        }
    }
    if let Some(snix) = &c.snix {
        for (i, o) in snix.outputs.iter().enumerate() {
            println!(
                "output[{i}] {} needles={:?}",
                describe_entry(o.output.as_ref()),
                o.needles
            );
        }
    }
    if let Some(tvix) = &c.tvix {
        for o in &tvix.outputs {
            let entry =
                crate::proto::snix_castore::Entry::decode(o.encode_to_vec().as_slice()).ok();
            println!("{}", describe_entry(entry.as_ref()));
        }
    }
}

fn describe_entry(e: Option<&crate::proto::snix_castore::Entry>) -> String {
    use crate::proto::snix_castore::entry::Entry as E;
    match e.and_then(|e| e.entry.as_ref()) {
        Some(E::Directory(d)) => format!(
            "{} directory {} size={}",
            name(&d.name),
            hex(&d.digest),
            d.size
        ),
        Some(E::File(f)) => format!(
            "{} file {} size={}{}",
            name(&f.name),
            hex(&f.digest),
            f.size,
            if f.executable { " executable" } else { "" }
        ),
        Some(E::Symlink(s)) => format!(
            "{} symlink -> {}",
            name(&s.name),
            String::from_utf8_lossy(&s.target)
        ),
        None => "(empty)".into(),
    }
}

fn name(n: &[u8]) -> String {
    if n.is_empty() {
        "(anonymous)".into()
    } else {
        String::from_utf8_lossy(n).into_owned()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_layouts_and_the_submit_wrapper() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("r.json");
        std::fs::write(&p, r#"{"commandArgs":["/bin/sh"],"outputs":["nix/store/x"],"environmentVars":[{"key":"A","value":"/w=="}]}"#).expect("write");
        let r = parse_request(&p, JsonLayout::Snix).expect("snix");
        let Some(submit_request::Request::Snix(s)) = r.request else {
            panic!("snix expected")
        };
        assert_eq!(s.environment_vars[0].value.as_ref(), &[0xff]);
        std::fs::write(
            &p,
            r#"{"tvix":{"commandArgs":["/bin/sh"],"outputs":["x"]}}"#,
        )
        .expect("write");
        let r = parse_request(&p, JsonLayout::Snix).expect("wrapper");
        assert!(matches!(r.request, Some(submit_request::Request::Tvix(_))));
        assert_eq!(r.argv0, "");
        std::fs::write(
            &p,
            r#"{"snix":{"commandArgs":["/bin/busybox","-c","echo $0"]},"argv0":"sh"}"#,
        )
        .expect("write");
        let r = parse_request(&p, JsonLayout::Tvix).expect("wrapper with argv0");
        assert!(matches!(r.request, Some(submit_request::Request::Snix(_))));
        assert_eq!(r.argv0, "sh");
        std::fs::write(&p, r#"{"commandArgs":7}"#).expect("write");
        let err = parse_request(&p, JsonLayout::Snix).expect_err("bad");
        assert!(
            err.to_string().contains("snix.build.v1.BuildRequest"),
            "{err}"
        );
    }
}
