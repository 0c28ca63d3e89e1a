//! Scratch space limits. A build's scratch share lives on the host disk
//! under `--data-dir`; virtiofs has no quota of its own, so kiln watches it:
//! the build is stopped when its scratch tree grows past the per-build limit
//! or when the filesystem's free space falls below the reserve. The tree is
//! measured through handles, never following a link the build made, and
//! counted as ingest would process it (a sparse file by its apparent size,
//! [`crate::hostfs::walk::usage`]); collect measures it once more after the
//! VM is gone.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::executor::error::BuildError;
use crate::executor::events::BuildLog;

/// How often the scratch tree is measured.
const INTERVAL: Duration = Duration::from_secs(2);

/// The limits the watch enforces.
#[derive(Debug, Clone, Copy)]
pub struct ScratchLimits {
    /// Bytes one build's scratch tree may occupy on disk.
    pub max_bytes: u64,
    /// Free bytes the data filesystem must keep.
    pub min_free_bytes: u64,
}

impl Default for ScratchLimits {
    /// The `kiln serve` defaults ([`crate::executor::config::defaults`]).
    fn default() -> Self {
        use crate::executor::config::defaults;
        Self {
            max_bytes: defaults::MAX_SCRATCH_BYTES,
            min_free_bytes: defaults::MIN_FREE_DISK_BYTES,
        }
    }
}

/// Resolves, with the error to fail the build with, once `dir` breaks a limit.
pub async fn watch(dir: PathBuf, limits: ScratchLimits, log: &BuildLog) -> BuildError {
    loop {
        tokio::time::sleep(INTERVAL).await;
        let d = dir.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let (parent, name) = crate::hostfs::open_parent(&d)?;
            Ok::<_, io::Error>((
                crate::hostfs::walk::usage(&parent, &name)?.bytes,
                parent.free_bytes()?,
            ))
        })
        .await;
        let Ok(Ok((used, free))) = measured else {
            continue;
        };
        if used > limits.max_bytes || free < limits.min_free_bytes {
            return BuildError::ScratchFull {
                used,
                limit: limits.max_bytes,
                free,
                reserve: limits.min_free_bytes,
                log_tail: log.tail(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_tree_without_following_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        let t = tmp.path().join("t");
        std::fs::create_dir_all(t.join("d")).expect("mkdir");
        std::fs::write(t.join("d/f"), vec![1u8; 1 << 20]).expect("write");
        std::os::unix::fs::symlink("/usr", t.join("l")).expect("symlink");
        let (parent, name) = crate::hostfs::open_parent(&t).expect("open");
        let used = crate::hostfs::walk::usage(&parent, &name)
            .expect("du")
            .bytes;
        assert!(used >= 1 << 20, "{used}");
        assert!(used < 2 << 20, "{used}");
        assert!(parent.free_bytes().expect("statvfs") > 0);
    }
}
