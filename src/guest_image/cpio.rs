//! A writer for the cpio "newc" format (`070701`), the format Linux unpacks
//! into the initial root filesystem.
//!
//! Entries carry fixed metadata (mtime 0, owner root) so the same inputs give
//! the same bytes, which is what lets the base image be cached by content.
//! Parent directories are emitted automatically before their first child,
//! because the kernel's unpacker does not create them.

use std::collections::BTreeSet;
use std::io::{self, Write};

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Writes one newc archive to `W`. Call [`CpioWriter::finish`] to write the
/// trailer; without it the archive is incomplete.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its missing parents).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, S_IFDIR | (mode & 0o7777), 2, &[])?;
        }
        Ok(())
    }

    /// Adds a regular file with `data` (and its missing parent directories).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// Adds a symlink to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if self.dirs.insert(prefix.clone()) {
                self.entry(&prefix.clone(), S_IFDIR | 0o755, 2, &[])?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is larger than 4 GiB"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let name_size = name.len() as u32 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name_size, 0];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

/// Strips leading `/` and rejects empty, `.`, `..` or NUL components.
fn clean(path: &str) -> io::Result<String> {
    let p = path.trim_start_matches('/');
    let bad = p.is_empty()
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path:?} is not a clean archive path"),
        ));
    }
    Ok(p.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    /// One parsed entry: (name, mode, data).
    type Entry = (String, u32, Vec<u8>);

    /// An independent reader of the format, following the spec field by field.
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at offset {off}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_start = (110 + namesize + 3) & !3;
            let data = b[data_start..data_start + size].to_vec();
            let next = (data_start + size + 3) & !3;
            off += next;
            b = &b[next..];
            if name == TRAILER {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, data));
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"#!agent").unwrap();
        w.file("kiln/modules/virtio.ko", 0o644, b"odd-size!")
            .unwrap();
        w.symlink("kiln/sh-link", "/kiln/sh").unwrap();
        w.dir("kiln/modules", 0o700).unwrap();
        w.dir("empty", 0o700).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_files_dirs_and_symlinks_with_parents_first() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "kiln",
                "kiln/modules",
                "kiln/modules/virtio.ko",
                "kiln/sh-link",
                "empty"
            ]
        );
        assert_eq!(entries[0].1, 0o100755);
        assert_eq!(entries[0].2, b"#!agent");
        assert_eq!(entries[1].1, 0o040755);
        assert_eq!(entries[3].2, b"odd-size!");
        assert_eq!(entries[4].1, 0o120777);
        assert_eq!(entries[4].2, b"/kiln/sh");
        assert_eq!(entries[5].1, 0o040700);
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_unclean_paths() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a/../b", "a//b", "./a", "a\0b"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn gnu_cpio_agrees_when_installed() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            test_skip!("gnu_cpio_agrees_when_installed because `cpio` is not installed");
            return;
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&sample()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 6, "{listing}");
        assert!(
            lines[0].starts_with("-rwxr-xr-x") && lines[0].ends_with(" init"),
            "{}",
            lines[0]
        );
        assert!(
            lines[3].contains(" 9 ") && lines[3].ends_with("kiln/modules/virtio.ko"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].starts_with("lrwxrwxrwx") && lines[4].ends_with("kiln/sh-link -> /kiln/sh"),
            "{}",
            lines[4]
        );
    }
}
