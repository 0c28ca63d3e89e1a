//! Step 6, collect: every declared output is found, scanned for the
//! request's needles and ingested into the castore, in request order.
//!
//! The VM is gone by now, but everything in the scratch share was written
//! by it, so nothing here resolves a path on the host: each output is
//! reached component by component beneath a handle of the scratch share,
//! refusing a parent that is a symlink or not a directory
//! ([`resolve_output`]), and scanned and ingested through handles
//! ([`crate::hostfs`]). Errors name the output as the guest saw it.
//! Before anything is ingested the scratch tree is measured once more as
//! ingest will process it (apparent sizes: a sparse file counts in full),
//! and ingest runs under the build's deadline.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::castore::ingest::{self, IngestError, IngestMode};
use crate::castore::Store;
use crate::executor::error::BuildError;
use crate::executor::paths::RelPath;
use crate::executor::refscan::Scanner;
use crate::executor::run::{BuiltOutput, Steps};
use crate::executor::scratch::ScratchLimits;
use crate::hostfs::{self, Dir, Kind};

/// Every output, in request order.
pub(crate) async fn collect_outputs(
    store: &Store,
    steps: &Steps<'_>,
    limits: &ScratchLimits,
    max_entries: u64,
) -> Result<Vec<BuiltOutput>, BuildError> {
    let Steps { req, ws, log, .. } = *steps;
    let scanner = Arc::new(
        Scanner::new(&req.refscan_needles)
            .map_err(|e| BuildError::infra("compile refscan needles", e))?,
    );
    let scratch = ws
        .scratch_dir()
        .map_err(|e| BuildError::infra("open the scratch share", e))?;
    check_usage(ws.root(), limits, max_entries, log).await?;
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for out in &req.outputs {
        let guest = format!("/{out}");
        let (parent, name) = resolve_output(&scratch, out).map_err(|reason| match reason {
            Resolve::Missing => BuildError::MissingOutput {
                path: out.to_string(),
                log_tail: log.tail(),
            },
            Resolve::Invalid(reason) => invalid(&guest, reason, log),
            Resolve::Io(e) => BuildError::infra("find outputs", e),
        })?;
        let needles = scan(&scanner, &parent, &name, steps)
            .await
            .map_err(|e| BuildError::infra("scan outputs for references", e))?;
        let node = ingest::ingest_at(
            store,
            parent,
            name,
            PathBuf::from(&guest),
            IngestMode::Move,
            Some(steps.deadline),
        )
        .await
        .map_err(|e| ingest_error(e, steps))?;
        outputs.push(BuiltOutput {
            path: out.clone(),
            node,
            needles,
        });
    }
    Ok(outputs)
}

/// Why an output could not be reached.
enum Resolve {
    /// It, or a parent, does not exist.
    Missing,
    /// A parent is not a real directory, or the output is not storable.
    Invalid(String),
    /// The host failed.
    Io(io::Error),
}

/// Opens the directory holding `out` beneath `scratch`, one component at a
/// time with no symlink followed, and checks that `out` itself exists and
/// is a file, directory or symlink.
fn resolve_output(scratch: &Dir, out: &RelPath) -> Result<(Dir, OsString), Resolve> {
    let components: Vec<&str> = out.as_str().split('/').collect();
    let Some((last, parents)) = components.split_last() else {
        return Err(Resolve::Missing);
    };
    let mut dir = scratch.try_clone().map_err(Resolve::Io)?;
    for (i, c) in parents.iter().enumerate() {
        let shown = format!("/{}", components[..=i].join("/"));
        let name = OsStr::new(c);
        match dir.kind(name) {
            Ok(Kind::Dir) => {}
            Ok(Kind::Symlink) => {
                return Err(Resolve::Invalid(format!(
                    "its parent {shown} is a symlink, not a directory"
                )))
            }
            Ok(Kind::File) => {
                return Err(Resolve::Invalid(format!(
                    "its parent {shown} is a file, not a directory"
                )))
            }
            Ok(Kind::Other(what)) => {
                return Err(Resolve::Invalid(format!(
                    "its parent {shown} is a {what}, not a directory"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Resolve::Missing),
            Err(e) => return Err(Resolve::Io(e)),
        }
        // O_NOFOLLOW: if it became a symlink since, this fails.
        dir = dir.open_dir(name).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                Resolve::Invalid(format!("its parent {shown} is not a directory"))
            }
            _ => Resolve::Io(e),
        })?;
    }
    let name = OsString::from(last);
    match dir.kind(&name) {
        Ok(Kind::Other(what)) => Err(Resolve::Invalid(format!(
            "it is a {what}: only regular files, directories and symlinks can be stored"
        ))),
        Ok(_) => Ok((dir, name)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Resolve::Missing),
        Err(e) => Err(Resolve::Io(e)),
    }
}

/// Refscan of one output on a blocking thread, under the deadline.
async fn scan(
    scanner: &Arc<Scanner>,
    parent: &Dir,
    name: &OsStr,
    steps: &Steps<'_>,
) -> io::Result<Vec<u64>> {
    let (scanner, parent, name) = (scanner.clone(), parent.try_clone()?, name.to_owned());
    let scanned = tokio::task::spawn_blocking(move || scanner.scan_at(&parent, &name));
    match tokio::time::timeout_at(steps.deadline.into(), scanned).await {
        Ok(joined) => joined.map_err(io::Error::other)?,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "scanning the outputs ran past the build's deadline",
        )),
    }
}

/// The scratch tree measured as ingest will process it, once the VM is
/// gone: the watch during the build samples every few seconds and counts
/// allocated blocks as they grow, this counts what would be hashed, and
/// the entries ingest would hold in memory (bounded like the inputs').
async fn check_usage(
    root: &std::path::Path,
    limits: &ScratchLimits,
    max_entries: u64,
    log: &crate::executor::events::BuildLog,
) -> Result<(), BuildError> {
    let root = root.to_owned();
    let (used, free) = tokio::task::spawn_blocking(move || {
        let parent = Dir::open(&root)?;
        Ok::<_, io::Error>((
            hostfs::walk::usage(&parent, OsStr::new("scratch"))?,
            parent.free_bytes()?,
        ))
    })
    .await
    .map_err(|e| BuildError::infra("measure scratch space", io::Error::other(e)))?
    .map_err(|e| BuildError::infra("measure scratch space", e))?;
    if used.entries > max_entries {
        return Err(BuildError::ScratchEntries {
            entries: used.entries,
            limit: max_entries,
            log_tail: log.tail(),
        });
    }
    if used.bytes > limits.max_bytes {
        return Err(BuildError::ScratchFull {
            used: used.bytes,
            limit: limits.max_bytes,
            free,
            reserve: limits.min_free_bytes,
            log_tail: log.tail(),
        });
    }
    Ok(())
}

fn invalid(guest: &str, reason: String, log: &crate::executor::events::BuildLog) -> BuildError {
    BuildError::InvalidOutput {
        path: guest.to_owned(),
        reason,
        log_tail: log.tail(),
    }
}

/// Ingest failures: what the builder left is its fault (ABORTED), the
/// deadline is a timeout, the rest is the host's.
fn ingest_error(e: IngestError, steps: &Steps<'_>) -> BuildError {
    let log = steps.log;
    match e {
        IngestError::Unsupported { path, kind } => invalid(
            &path.display().to_string(),
            format!("it is a {kind}: only regular files, directories and symlinks can be stored"),
            log,
        ),
        IngestError::Name { path, source } | IngestError::Target { path, source } => {
            invalid(&path.display().to_string(), source.to_string(), log)
        }
        IngestError::Deadline { .. } => BuildError::Timeout {
            secs: steps.timeout_secs(),
            log_tail: log.tail(),
        },
        e => BuildError::infra("ingest outputs", e),
    }
}
