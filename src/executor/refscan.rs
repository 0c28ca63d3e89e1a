//! Reference scanning: which of the request's `refscan_needles` occur in an
//! output. As upstream: file contents and symlink targets are scanned, file
//! names are not; matches are non-overlapping. Files are streamed, never
//! read whole into memory, and the tree is walked through directory
//! handles ([`crate::hostfs::walk`]), never through a symlink.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use aho_corasick::AhoCorasick;

use crate::hostfs::walk::{walk, Event, Options};
use crate::hostfs::{Dir, Kind};

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

    /// Ascending indexes of the needles found under `path` (a path kiln
    /// trusts up to its last component).
    pub fn scan_path(&self, path: &Path) -> io::Result<Vec<u64>> {
        let (parent, name) = crate::hostfs::open_parent(path)?;
        self.scan_at(&parent, &name)
    }

    /// Ascending indexes of the needles found in the entry `name` of
    /// `parent` and below, walked through handles, never through a symlink.
    /// Blocking.
    pub fn scan_at(&self, parent: &Dir, name: &OsStr) -> io::Result<Vec<u64>> {
        let mut found = vec![false; self.count];
        if let Some(ac) = &self.automaton {
            walk(parent, name, Options::default(), |event| {
                let Event::Leaf { dir, name, kind } = event else {
                    return Ok(());
                };
                match kind {
                    Kind::Symlink => {
                        let target = dir.read_link(name)?;
                        for m in ac.find_iter(target.as_encoded_bytes()) {
                            found[m.pattern().as_usize()] = true;
                        }
                    }
                    Kind::File => {
                        let file = dir.open_file(name)?;
                        let reader = io::BufReader::with_capacity(256 * 1024, file);
                        for m in ac.stream_find_iter(reader) {
                            found[m?.pattern().as_usize()] = true;
                        }
                    }
                    // Ingest refuses these; nothing to scan.
                    Kind::Dir | Kind::Other(_) => {}
                }
                Ok(())
            })?;
        }
        Ok(found
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i as u64)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
