//! Test data of a given shape: one large file, or many small files, filled
//! with pseudo-random bytes (so nothing deduplicates or compresses away).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

/// A fast pseudo-random byte source (xorshift64*); not for anything but
/// filling files.
struct Bytes(u64);

impl Bytes {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `size` bytes to a new file at `path`.
pub fn big_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut rng = Bytes::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// Writes `count` files of 100 B to 2 KiB under `root`, `per_dir` to a
/// directory. Returns their total size in bytes.
pub fn small_files(root: &Path, count: usize, per_dir: usize, seed: u64) -> std::io::Result<u64> {
    let mut rng = Bytes::new(seed);
    let mut buf = [0u8; 2048];
    let mut total = 0u64;
    for i in 0..count {
        let dir = root.join(format!("d{:04}", i / per_dir.max(1)));
        if i % per_dir.max(1) == 0 {
            fs::create_dir_all(&dir)?;
        }
        let mut size_bytes = [0u8; 8];
        rng.fill(&mut size_bytes);
        let size = 100 + (u64::from_le_bytes(size_bytes) % 1949) as usize;
        rng.fill(&mut buf[..size]);
        fs::write(dir.join(format!("f{i:06}")), &buf[..size])?;
        total += size as u64;
    }
    Ok(total)
}

/// Recreates the tree at `src` under `dst` with hard links to its files (a
/// tree a moving ingest may consume while `src` stays).
pub fn hardlink_clone(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if meta.is_dir() {
        fs::create_dir_all(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            hardlink_clone(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        fs::hard_link(src, dst)
    }
}

/// Total bytes of the regular files under `path`.
pub fn tree_bytes(path: &Path) -> std::io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += tree_bytes(&entry?.path())?;
    }
    Ok(total)
}

/// Relative paths of the regular files under `root`, sorted.
pub fn file_list(root: &Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, "", &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_asked_sizes_and_clones_share_inodes() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let big = tmp.path().join("big");
        big_file(&big, 3 * 1024 * 1024 + 5, 1).expect("big file");
        assert_eq!(tree_bytes(&big).expect("size"), 3 * 1024 * 1024 + 5);
        let many = tmp.path().join("many");
        let total = small_files(&many, 25, 10, 2).expect("small files");
        let files = file_list(&many).expect("list");
        assert_eq!(files.len(), 25);
        assert_eq!(files[0], "d0000/f000000");
        assert_eq!(tree_bytes(&many).expect("size"), total);
        let clone = tmp.path().join("clone");
        hardlink_clone(&many, &clone).expect("clone");
        let a = fs::metadata(many.join(&files[7])).expect("meta");
        let b = fs::metadata(clone.join(&files[7])).expect("meta");
        assert_eq!(a.ino(), b.ino());
    }
}
