//! `kiln builds`, `kiln cancel ID`, `kiln logs ID [--follow]`: the
//! operator's commands, over `kiln.v1.Admin` of a running server.
//!
//! `builds` prints one line per build that has not ended (a table, or one
//! JSON object per line with `--json`); `logs` writes the builder's stdout
//! to stdout and everything else (its stderr, phases, the end) to stderr,
//! like `kiln build`.

use std::io::Write;

use tonic::Code;

use crate::client::{self, ClientSecurity, ConnectError};
use crate::proto::kiln_v1::admin_client::AdminClient;
use crate::proto::kiln_v1::build_event::Event;
use crate::proto::kiln_v1::log_chunk::Stream;
use crate::proto::kiln_v1::{
    BuildEvent, BuildSummary, CancelBuildRequest, ListBuildsRequest, LogsRequest,
};
use crate::server::MAX_MESSAGE_BYTES;

/// An operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    /// The server could not be reached.
    #[error("connecting")]
    Connect(#[source] ConnectError),
    /// The server refused the call.
    #[error("the server refused {call} ({code:?}): {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// gRPC code.
        code: Code,
        /// gRPC message.
        message: String,
    },
    /// The log stream broke before its end.
    #[error("the log stream of build {build_id} broke ({code:?}): {message}")]
    Stream {
        /// The build.
        build_id: String,
        /// gRPC code.
        code: Code,
        /// gRPC message.
        message: String,
    },
}

fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> AdminCliError {
    move |status| AdminCliError::Refused {
        call,
        code: status.code(),
        message: status.message().to_owned(),
    }
}

async fn admin(
    addr: &str,
    security: &ClientSecurity,
) -> Result<AdminClient<client::KilnChannel>, AdminCliError> {
    let channel = client::connect(addr, security)
        .await
        .map_err(AdminCliError::Connect)?;
    Ok(AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// `kiln builds`: the builds that have not ended, oldest first.
pub async fn builds(
    addr: &str,
    security: &ClientSecurity,
    json: bool,
) -> Result<(), AdminCliError> {
    let builds = admin(addr, security)
        .await?
        .list_builds(ListBuildsRequest {})
        .await
        .map_err(refused("ListBuilds"))?
        .into_inner()
        .builds;
    let mut out = std::io::stdout().lock();
    if json {
        for build in &builds {
            let _ = writeln!(out, "{}", json_line(build));
        }
    } else {
        let _ = writeln!(out, "{}", table_header());
        for build in &builds {
            let _ = writeln!(out, "{}", table_row(build));
        }
    }
    Ok(())
}

fn table_header() -> String {
    format!(
        "{:<32}  {:<10}  {:<11}  {:>7}  {:>9}  {:>5}  {:<4}  {}",
        "ID", "TENANT", "PHASE", "AGE", "MEMORY", "VCPUS", "VM", "HOST"
    )
}

fn table_row(build: &BuildSummary) -> String {
    let (memory, vcpus, vm) = if build.guest_memory_bytes == 0 {
        ("-".to_owned(), "-".to_owned(), "-")
    } else {
        (
            format!("{} MiB", build.guest_memory_bytes >> 20),
            build.vcpus.to_string(),
            if build.warm { "warm" } else { "cold" },
        )
    };
    let row = format!(
        "{:<32}  {:<10}  {:<11}  {:>7}  {:>9}  {:>5}  {:<4}  {}",
        build.build_id,
        build.tenant,
        build.phase,
        age(build.age_secs),
        memory,
        vcpus,
        vm,
        if build.host.is_empty() {
            "-"
        } else {
            &build.host
        }
    );
    row.trim_end().to_owned()
}

/// `95s`, `12m05s`, `3h20m`.
fn age(secs: u64) -> String {
    match secs {
        0..=99 => format!("{secs}s"),
        100..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn json_line(build: &BuildSummary) -> serde_json::Value {
    serde_json::json!({
        "build_id": build.build_id,
        "tenant": build.tenant,
        "phase": build.phase,
        "age_secs": build.age_secs,
        "submitted_unix_secs": build.submitted_unix_secs,
        "guest_memory_bytes": build.guest_memory_bytes,
        "vcpus": build.vcpus,
        "warm": build.warm,
        "host": build.host,
    })
}

/// `kiln cancel ID`.
pub async fn cancel(
    addr: &str,
    security: &ClientSecurity,
    build_id: &str,
) -> Result<(), AdminCliError> {
    admin(addr, security)
        .await?
        .cancel_build(CancelBuildRequest {
            build_id: build_id.to_owned(),
        })
        .await
        .map_err(refused("CancelBuild"))?;
    let _ = writeln!(std::io::stderr(), "kiln: build {build_id} cancelled");
    Ok(())
}

/// `kiln logs ID [--follow]`.
pub async fn logs(
    addr: &str,
    security: &ClientSecurity,
    build_id: &str,
    follow: bool,
) -> Result<(), AdminCliError> {
    let mut events = admin(addr, security)
        .await?
        .logs(LogsRequest {
            build_id: build_id.to_owned(),
            follow,
        })
        .await
        .map_err(refused("Logs"))?
        .into_inner();
    loop {
        match events.message().await {
            Ok(Some(event)) => print_event(&event),
            Ok(None) => return Ok(()),
            Err(status) => {
                return Err(AdminCliError::Stream {
                    build_id: build_id.to_owned(),
                    code: status.code(),
                    message: status.message().to_owned(),
                })
            }
        }
    }
}

/// One event, written best effort (a closed pipe ends nothing here).
fn print_event(event: &BuildEvent) {
    let mut stderr = std::io::stderr().lock();
    let _ = match &event.event {
        Some(Event::Log(chunk)) if chunk.stream == Stream::Stdout as i32 => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&chunk.data).and_then(|()| stdout.flush())
        }
        Some(Event::Log(chunk)) => stderr.write_all(&chunk.data),
        Some(Event::Phase(phase)) => writeln!(stderr, "kiln: {}", phase.name),
        Some(Event::Started(s)) => writeln!(
            stderr,
            "kiln: on {} ({}), {} MiB, {} vCPU{}",
            s.vmm,
            s.accel,
            s.guest_memory_bytes >> 20,
            s.vcpus,
            if s.warm { ", warm VM" } else { "" }
        ),
        Some(Event::Output(o)) => writeln!(stderr, "kiln: output /{}", o.path),
        Some(Event::CacheHit(hit)) => writeln!(
            stderr,
            "kiln: answered from the result cache (built by {})",
            hit.build_id
        ),
        Some(Event::Completed(c)) => writeln!(
            stderr,
            "kiln: build {} succeeded in {} ms",
            event.build_id, c.duration_ms
        ),
        Some(Event::Failed(f)) => writeln!(
            stderr,
            "kiln: build {} failed ({}): {}",
            event.build_id, f.kind, f.message
        ),
        None => Ok(()),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m05s");
        assert_eq!(age(3 * 3600 + 20 * 60 + 7), "3h20m");
    }

    #[test]
    fn a_row_before_admission_has_no_vm() {
        let build = BuildSummary {
            build_id: "b".repeat(32),
            tenant: "default".into(),
            phase: "queued".into(),
            age_secs: 3,
            ..Default::default()
        };
        let row = table_row(&build);
        assert!(row.contains("queued") && row.ends_with("-     -"), "{row}");
        let admitted = BuildSummary {
            guest_memory_bytes: 512 << 20,
            vcpus: 2,
            warm: true,
            ..build
        };
        assert!(table_row(&admitted).contains("512 MiB"));
        assert!(table_row(&admitted).contains("warm"));
        let elsewhere = BuildSummary {
            host: "h2".into(),
            ..admitted
        };
        assert!(table_row(&elsewhere).ends_with("warm  h2"));
    }
}
