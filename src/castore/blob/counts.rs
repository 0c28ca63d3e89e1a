//! How many blobs the embedded store holds and their bytes, kept up to date
//! as blobs are stored, without walking the store per question.
//!
//! The counts are kept per shard (`blobs/<hex[0..2]>/`, 256 of them). A
//! shard is counted once, by [`BlobCounts::scan`] (started by the first
//! [`BlobCounts::get`]: only a server that reports metrics pays for the
//! walk), and from then on every blob newly placed in it adds itself. The
//! walk of a shard and a blob's rename into it take the same lock, so a
//! blob is counted exactly once: by the walk if it was renamed before, by
//! its own store if after. Nothing is ever removed from the store, so
//! nothing is ever subtracted. Executable variants (`blobs-x/`) are copies
//! of counted blobs and are not counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::castore::digest::B3Digest;

/// Blobs and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobStats {
    /// Distinct blobs stored.
    pub blobs: u64,
    /// Their summed sizes.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Shard {
    counted: bool,
    stats: BlobStats,
}

/// The counts of one store; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct BlobCounts {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    shards: Vec<Mutex<Shard>>,
    scan_started: AtomicBool,
    shards_counted: AtomicUsize,
}

/// A shard held while a blob is placed in it.
pub struct ShardGuard<'a>(MutexGuard<'a, Shard>);

impl ShardGuard<'_> {
    /// A blob of `size` bytes was newly placed in this shard.
    pub fn added(&mut self, size: u64) {
        if self.0.counted {
            self.0.stats.blobs += 1;
            self.0.stats.bytes += size;
        }
    }
}

impl BlobCounts {
    /// Counts of the blobs under `root` (the store's `blobs/`), not yet
    /// walked.
    pub fn new(root: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                root,
                shards: (0..256).map(|_| Mutex::new(Shard::default())).collect(),
                scan_started: AtomicBool::new(false),
                shards_counted: AtomicUsize::new(0),
            }),
        }
    }

    /// Holds the shard of `digest`: rename a blob into place while holding
    /// it, then say [`ShardGuard::added`] if it was new.
    pub fn shard(&self, digest: &B3Digest) -> ShardGuard<'_> {
        let index = usize::from(digest.as_bytes()[0]);
        ShardGuard(lock(&self.inner.shards[index]))
    }

    /// The counts, once every shard has been walked; the first call starts
    /// the walk (on a thread of its own) and answers `None` until it ends.
    pub fn get(&self) -> Option<BlobStats> {
        if !self.inner.scan_started.swap(true, Ordering::SeqCst) {
            let counts = self.clone();
            let spawned = std::thread::Builder::new()
                .name("kiln-blob-count".into())
                .spawn(move || counts.scan());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot count the castore's blobs");
                self.inner.scan_started.store(false, Ordering::SeqCst);
            }
        }
        if self.inner.shards_counted.load(Ordering::SeqCst) < self.inner.shards.len() {
            return None;
        }
        Some(
            self.inner
                .shards
                .iter()
                .fold(BlobStats::default(), |sum, shard| {
                    let s = lock(shard).stats;
                    BlobStats {
                        blobs: sum.blobs + s.blobs,
                        bytes: sum.bytes + s.bytes,
                    }
                }),
        )
    }

    /// Walks every shard once, each under its lock. Blocking.
    pub fn scan(&self) {
        for (index, shard) in self.inner.shards.iter().enumerate() {
            let mut shard = lock(shard);
            if shard.counted {
                continue;
            }
            let dir = self.inner.root.join(format!("{index:02x}"));
            shard.stats = count_dir(&dir);
            shard.counted = true;
            drop(shard);
            self.inner.shards_counted.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Counting is bookkeeping: a panic elsewhere must not stop it.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// The regular files in `dir` and their sizes; a missing shard is empty,
/// an unreadable entry is skipped (and said once).
fn count_dir(dir: &Path) -> BlobStats {
    let mut stats = BlobStats::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return stats,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot count blobs in a shard");
            return stats;
        }
    };
    for entry in entries.flatten() {
        if let Ok(meta) = entry.metadata() {
            if meta.is_file() {
                stats.blobs += 1;
                stats.bytes += meta.len();
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(first: u8, rest: u8) -> B3Digest {
        let mut bytes = [rest; 32];
        bytes[0] = first;
        B3Digest::from(bytes)
    }

    #[test]
    fn a_blob_is_counted_by_the_walk_or_by_its_store_never_both() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("blobs");
        std::fs::create_dir_all(root.join("ab")).expect("shard");
        std::fs::write(root.join("ab").join("one"), b"12345").expect("blob");
        let counts = BlobCounts::new(root.clone());
        // Stored before the walk: the walk counts it, the store does not.
        counts.shard(&digest(0xab, 1)).added(5);
        counts.scan();
        assert_eq!(
            counts.get(),
            Some(BlobStats { blobs: 1, bytes: 5 }),
            "counted once"
        );
        // Stored after: the store counts it.
        std::fs::write(root.join("ab").join("two"), b"123").expect("blob");
        counts.shard(&digest(0xab, 2)).added(3);
        assert_eq!(counts.get(), Some(BlobStats { blobs: 2, bytes: 8 }));
    }

    #[test]
    fn no_answer_until_every_shard_is_walked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let counts = BlobCounts::new(tmp.path().join("missing"));
        // The first question starts the walk; it ends quickly on an empty store.
        let mut answer = counts.get();
        for _ in 0..100 {
            if answer.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            answer = counts.get();
        }
        assert_eq!(answer, Some(BlobStats::default()));
    }
}
