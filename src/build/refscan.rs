//! Reference scanning: which of the request's `refscan_needles` occur in an
//! output. As upstream: file contents and symlink targets are scanned, file
//! names are not; matches are non-overlapping. Files are streamed, never
//! read whole into memory.

use std::fs;
use std::io;
use std::path::Path;

use aho_corasick::AhoCorasick;

/// A compiled set of needles.
pub struct Scanner {
    automaton: Option<AhoCorasick>,
    count: usize,
}

impl Scanner {
    /// Compiles the needles; an empty set scans nothing.
    pub fn new(needles: &[String]) -> io::Result<Self> {
        if needles.is_empty() {
            return Ok(Self {
                automaton: None,
                count: 0,
            });
        }
        let automaton = AhoCorasick::new(needles).map_err(io::Error::other)?;
        Ok(Self {
            automaton: Some(automaton),
            count: needles.len(),
        })
    }

    /// Ascending indexes of the needles found under `path`.
    pub fn scan_path(&self, path: &Path) -> io::Result<Vec<u64>> {
        let mut found = vec![false; self.count];
        if let Some(ac) = &self.automaton {
            scan_tree(ac, path, &mut found)?;
        }
        Ok(found
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i as u64)
            .collect())
    }
}

fn scan_tree(ac: &AhoCorasick, path: &Path, found: &mut [bool]) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path)?;
        for m in ac.find_iter(target.as_os_str().as_encoded_bytes()) {
            found[m.pattern().as_usize()] = true;
        }
    } else if ft.is_file() {
        let file = fs::File::open(path)?;
        for m in ac.stream_find_iter(io::BufReader::with_capacity(256 * 1024, file)) {
            found[m?.pattern().as_usize()] = true;
        }
    } else if ft.is_dir() {
        for entry in fs::read_dir(path)? {
            scan_tree(ac, &entry?.path(), found)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_needles_in_contents_and_symlink_targets_not_names() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("out");
        fs::create_dir(&out).expect("mkdir");
        fs::write(out.join("a"), b"xx /nix/store/aaaa-dep yy").expect("write");
        fs::write(out.join("cccc-named-only"), b"nothing").expect("write");
        std::os::unix::fs::symlink("/nix/store/bbbb-other", out.join("link")).expect("symlink");
        let needles = [
            "aaaa".to_string(),
            "bbbb".into(),
            "cccc".into(),
            "dddd".into(),
        ];
        let scanner = Scanner::new(&needles).expect("compile");
        assert_eq!(scanner.scan_path(&out).expect("scan"), vec![0, 1]);
    }

    #[test]
    fn no_needles_no_matches() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::write(tmp.path().join("f"), b"data").expect("write");
        assert!(Scanner::new(&[])
            .expect("empty")
            .scan_path(tmp.path())
            .expect("scan")
            .is_empty());
    }
}
