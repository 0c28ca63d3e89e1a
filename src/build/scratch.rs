//! Scratch space limits. A build's scratch share lives on the host disk
//! under `--data-dir`; virtiofs has no quota of its own, so kiln watches it:
//! the build is stopped when its scratch tree grows past the per-build limit
//! or when the filesystem's free space falls below the reserve.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::build::error::BuildError;
use crate::build::events::BuildLog;

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
    /// 20 GiB per build, 1 GiB kept free (the `kiln serve` defaults).
    fn default() -> Self {
        Self {
            max_bytes: 20 << 30,
            min_free_bytes: 1 << 30,
        }
    }
}

/// Resolves, with the error to fail the build with, once `dir` breaks a limit.
pub async fn watch(dir: PathBuf, limits: ScratchLimits, log: &BuildLog) -> BuildError {
    loop {
        tokio::time::sleep(INTERVAL).await;
        let d = dir.clone();
        let measured = tokio::task::spawn_blocking(move || {
            Ok::<_, io::Error>((disk_usage(&d)?, free_bytes(&d)?))
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

/// Bytes a tree occupies on disk (allocated blocks), not following symlinks.
/// Entries that vanish while it walks are skipped.
pub fn disk_usage(path: &Path) -> io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)?.flatten() {
            total += disk_usage(&entry.path()).unwrap_or(0);
        }
    }
    Ok(total)
}

fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_allocated_bytes_of_a_tree() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        std::fs::write(tmp.path().join("d/f"), vec![1u8; 1 << 20]).expect("write");
        std::os::unix::fs::symlink("/nonexistent", tmp.path().join("l")).expect("symlink");
        let used = disk_usage(tmp.path()).expect("du");
        assert!(used >= 1 << 20, "{used}");
        assert!(used < 2 << 20, "{used}");
        assert!(free_bytes(tmp.path()).expect("statvfs") > 0);
    }
}
