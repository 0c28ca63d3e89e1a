//! Reads the job from the initramfs and checks what the agent relies on:
//! the host validated the request, but a broken job must become a clear
//! `AgentFailed { step: "job" }`, never a panic or a path outside the sandbox.

use std::ffi::CString;

use kiln_guest::contract::{Job, Warm, JOB_PATH, WARM_PATH};

use super::error::AgentError;

/// How this VM gets its job.
#[derive(Debug)]
pub enum Start {
    /// From the initramfs: a VM booted for its request.
    Cold(Box<Job>),
    /// Over the channel, later: a VM booted ahead of its request.
    Warm(Warm),
}

/// Reads and decodes [`JOB_PATH`], or else [`WARM_PATH`]; [`validate`]
/// checks the job once the channel is open.
pub fn load() -> Result<Start, AgentError> {
    if std::path::Path::new(WARM_PATH).exists() && !std::path::Path::new(JOB_PATH).exists() {
        let bytes = std::fs::read(WARM_PATH)
            .map_err(|e| AgentError::Job(format!("reading {WARM_PATH}: {e}")))?;
        return serde_json::from_slice(&bytes)
            .map(Start::Warm)
            .map_err(|e| AgentError::Job(format!("decoding {WARM_PATH}: {e}")));
    }
    let bytes =
        std::fs::read(JOB_PATH).map_err(|e| AgentError::Job(format!("reading {JOB_PATH}: {e}")))?;
    serde_json::from_slice(&bytes)
        .map(|job| Start::Cold(Box::new(job)))
        .map_err(|e| AgentError::Job(format!("decoding {JOB_PATH}: {e}")))
}

/// Decodes a job that came over the channel.
pub fn decode(bytes: &[u8]) -> Result<Job, AgentError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AgentError::Job(format!("decoding the job from the host: {e}")))
}

/// Checks the parts of a job the agent acts on.
pub fn validate(job: &Job) -> Result<(), String> {
    if job.command_args.is_empty() {
        return Err("command_args is empty".into());
    }
    if !job.command_args[0].starts_with('/') {
        return Err(format!(
            "builder {:?} is not an absolute path",
            job.command_args[0]
        ));
    }
    check_relative("working_dir", &job.working_dir)?;
    if job.working_dir.contains(['\n', ':']) {
        // It is the home field of /etc/passwd, which has no escaping.
        return Err(format!(
            "working_dir {:?} contains a newline or ':', which /etc/passwd cannot hold",
            job.working_dir
        ));
    }
    check_relative("inputs_dir", &job.inputs_dir)?;
    for p in &job.scratch_paths {
        check_relative("scratch path", p)?;
    }
    for (p, _) in &job.additional_files {
        check_relative("additional file", p)?;
        if p == &job.inputs_dir || p.starts_with(&format!("{}/", job.inputs_dir)) {
            // Where inputs (and symlinks of the request's making) live.
            return Err(format!(
                "additional file {p:?} is inside inputs_dir {:?}",
                job.inputs_dir
            ));
        }
    }
    for (tag, p) in &job.ro_paths {
        if tag.is_empty() || !p.starts_with('/') {
            return Err(format!(
                "read-only path {p:?} (tag {tag:?}) must be absolute with a tag"
            ));
        }
        check_relative("read-only path", &p[1..])?;
    }
    for m in &job.modules {
        if m.is_empty() || m.contains('/') || m.starts_with('.') {
            return Err(format!("module name {m:?} is not a plain name"));
        }
    }
    for a in &job.command_args {
        if a.contains('\0') {
            return Err(format!("argument {a:?} contains NUL"));
        }
    }
    if let Some(a) = job.argv0.as_ref().filter(|a| a.contains('\0')) {
        return Err(format!("argv0 {a:?} contains NUL"));
    }
    Ok(())
}

/// A clean relative path: non-empty, no leading `/`, no `.`/`..`/empty parts, no NUL.
fn check_relative(what: &str, p: &str) -> Result<(), String> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(format!("{what} {p:?} is not a clean relative path"))
    } else {
        Ok(())
    }
}

/// The builder's environment as `KEY=VALUE` C strings.
pub fn environment(job: &Job) -> Result<Vec<CString>, AgentError> {
    job.env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains(&b'=') {
                return Err(AgentError::Job(format!(
                    "environment key {:?} is empty or contains '='",
                    String::from_utf8_lossy(k)
                )));
            }
            CString::new([k.as_slice(), b"=", v.as_slice()].concat()).map_err(|_| {
                AgentError::Job(format!(
                    "environment variable {:?} contains NUL",
                    String::from_utf8_lossy(k)
                ))
            })
        })
        .collect()
}

/// The argv the builder sees, as C strings (NUL was rejected by
/// [`validate`]): `command_args`, with `argv[0]` replaced by [`Job::argv0`]
/// when that is set. The program executed is `command_args[0]` either way.
pub fn argv(job: &Job) -> Result<Vec<CString>, AgentError> {
    let (first, rest) = job
        .command_args
        .split_first()
        .ok_or_else(|| AgentError::Job("command_args is empty".into()))?;
    let argv0 = job.argv0.as_ref().unwrap_or(first);
    std::iter::once(argv0)
        .chain(rest)
        .map(|a| {
            CString::new(a.as_bytes())
                .map_err(|_| AgentError::Job(format!("argument {a:?} contains NUL")))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            command_args: vec!["/nix/store/x/bin/sh".into()],
            working_dir: "build".into(),
            inputs_dir: "nix/store".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            ..Job::default()
        }
    }

    #[test]
    fn accepts_a_nix_like_job() {
        assert_eq!(validate(&job()), Ok(()));
    }

    #[test]
    fn rejects_paths_that_leave_the_sandbox() {
        for bad in ["../etc", "/build", "build/../..", "", "a//b", "a/./b"] {
            let mut j = job();
            j.working_dir = bad.into();
            assert!(validate(&j).is_err(), "{bad:?} accepted");
        }
        let mut j = job();
        j.additional_files = vec![("../x".into(), vec![])];
        assert!(validate(&j).is_err());
    }

    #[test]
    fn rejects_a_working_dir_that_would_break_etc_passwd() {
        for bad in ["build\nevil:x:0:0::/:/bin/sh", "build:0"] {
            let mut j = job();
            j.working_dir = bad.into();
            j.scratch_paths = vec![bad.into()];
            let e = validate(&j).unwrap_err();
            assert!(
                e.contains("working_dir") && e.contains("/etc/passwd"),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_additional_files_among_the_inputs() {
        for bad in ["nix/store/x", "nix/store/x/kernel/foo", "nix/store"] {
            let mut j = job();
            j.additional_files = vec![(bad.into(), vec![])];
            let e = validate(&j).unwrap_err();
            assert!(e.contains("inputs_dir"), "{e}");
        }
        let mut j = job();
        j.additional_files = vec![
            ("nix/storex".into(), vec![]),
            ("build/.attrs.json".into(), vec![]),
        ];
        assert_eq!(validate(&j), Ok(()));
    }

    #[test]
    fn rejects_relative_builders_and_empty_commands() {
        let mut j = job();
        j.command_args = vec!["sh".into()];
        assert!(validate(&j).unwrap_err().contains("absolute"));
        j.command_args.clear();
        assert!(validate(&j).is_err());
    }

    fn strings(argv: &[CString]) -> Vec<&str> {
        argv.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn argv_is_command_args_unless_argv0_is_set() {
        let mut j = job();
        j.command_args = vec![
            "/nix/store/x/bin/busybox".into(),
            "-c".into(),
            "echo $0".into(),
        ];
        assert_eq!(
            strings(&argv(&j).unwrap()),
            ["/nix/store/x/bin/busybox", "-c", "echo $0"]
        );
        j.argv0 = Some("sh".into());
        assert_eq!(strings(&argv(&j).unwrap()), ["sh", "-c", "echo $0"]);
        // The program executed is still command_args[0].
        assert_eq!(j.command_args[0], "/nix/store/x/bin/busybox");
        j.command_args.truncate(1);
        assert_eq!(strings(&argv(&j).unwrap()), ["sh"]);
        j.command_args.clear();
        assert!(argv(&j).is_err());
    }

    #[test]
    fn rejects_an_argv0_with_nul() {
        let mut j = job();
        j.argv0 = Some("sh".into());
        assert_eq!(validate(&j), Ok(()));
        j.argv0 = Some("s\0h".into());
        assert!(validate(&j).unwrap_err().contains("argv0"));
        assert!(argv(&j).is_err());
    }

    #[test]
    fn environment_keeps_non_utf8_bytes_and_rejects_nul() {
        let mut j = job();
        j.env = vec![(b"A".to_vec(), vec![0xff, b'=', 0x80])];
        let env = environment(&j).expect("valid env");
        assert_eq!(env[0].as_bytes(), &[b'A', b'=', 0xff, b'=', 0x80]);
        j.env = vec![(b"A".to_vec(), vec![b'x', 0, b'y'])];
        assert!(environment(&j).is_err());
        j.env = vec![(b"A=B".to_vec(), vec![])];
        assert!(environment(&j).is_err());
    }
}
