//! Walking a tree a build wrote, however deep, without following links.
//!
//! A recursive walk overflows the stack on a tree of 30 000 nested
//! directories, and path-based calls fail on it (`ENAMETOOLONG`). This walk
//! is a loop holding one open handle: it descends into a child by name
//! (`O_NOFOLLOW`) and climbs back through `..`, checking that the directory
//! it reaches is the one it came from (device and inode), so a tree changed
//! underneath it cannot lead it anywhere else. Its memory grows with the
//! depth (a name and an identity per level) and the width of the levels it
//! is in, never the stack.

use std::ffi::{OsStr, OsString};
use std::io;

use super::{Dir, DirId, Kind};

/// What the walk reports, in order: a directory is entered, its
/// non-directory entries come as leaves, then its subdirectories, each
/// entered and left in turn, then it is left.
pub enum Event<'a> {
    /// A non-directory entry `name` of `dir`.
    Leaf {
        /// The directory holding it.
        dir: &'a Dir,
        /// Its name.
        name: &'a OsStr,
        /// What it is.
        kind: Kind,
    },
    /// The directory `name` is entered; its handle is `dir`.
    Enter {
        /// The directory itself.
        dir: &'a Dir,
        /// Its name in its parent.
        name: &'a OsStr,
    },
    /// Everything below `name` has been reported.
    Leave {
        /// The directory holding `name`.
        parent: &'a Dir,
        /// The directory just finished.
        name: &'a OsStr,
    },
}

/// One directory being walked: its name, identity and the subdirectories
/// still to visit.
struct Level {
    name: OsString,
    id: DirId,
    pending: Vec<OsString>,
}

/// How the walk opens directories.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Give each directory mode 0700 before reading it (for removal, where
    /// the build may have made directories unreadable).
    pub make_accessible: bool,
}

/// Walks `name` in `parent`, reporting every entry to `f`. If `name` is not
/// a directory it is reported as a single leaf. Blocking.
pub fn walk(
    parent: &Dir,
    name: &OsStr,
    options: Options,
    mut f: impl FnMut(Event<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let kind = parent.kind(name)?;
    if kind != Kind::Dir {
        return f(Event::Leaf {
            dir: parent,
            name,
            kind,
        });
    }
    let mut cur = enter(parent, name, options)?;
    let mut stack = vec![open_level(&cur, name, &mut f)?];
    while let Some(level) = stack.last_mut() {
        if let Some(child) = level.pending.pop() {
            let next = enter(&cur, &child, options)?;
            let level = open_level(&next, &child, &mut f)?;
            stack.push(level);
            cur = next;
            continue;
        }
        let Some(done) = stack.pop() else { break };
        let up = match stack.last() {
            None => parent.try_clone()?,
            Some(above) => cur.climb(above.id)?,
        };
        f(Event::Leave {
            parent: &up,
            name: &done.name,
        })?;
        cur = up;
    }
    Ok(())
}

/// Reports `dir` as entered and its leaves; returns its level.
fn open_level(
    dir: &Dir,
    name: &OsStr,
    f: &mut impl FnMut(Event<'_>) -> io::Result<()>,
) -> io::Result<Level> {
    f(Event::Enter { dir, name })?;
    let mut pending = Vec::new();
    for (child, kind) in dir.entries()? {
        if kind == Kind::Dir {
            pending.push(child);
        } else {
            f(Event::Leaf {
                dir,
                name: &child,
                kind,
            })?;
        }
    }
    // Visited by popping: reverse so they come in listing order.
    pending.reverse();
    Ok(Level {
        name: name.to_owned(),
        id: dir.id()?,
        pending,
    })
}

/// Opens the child directory `name`, first giving it back its search and
/// write bits if asked (and if the build took them away).
fn enter(parent: &Dir, name: &OsStr, options: Options) -> io::Result<Dir> {
    if !options.make_accessible {
        return parent.open_dir(name);
    }
    match parent.open_dir(name) {
        Ok(dir) => {
            dir.chmod(0o700)?;
            Ok(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            parent.chmod_child_dir(name, 0o700)?;
            parent.open_dir(name)
        }
        Err(e) => Err(e),
    }
}

/// What a tree stands for, as ingest would process it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// For a regular file the larger of its allocated blocks and its
    /// apparent size (a sparse 16 GiB file counts 16 GiB: that is what would
    /// be hashed and stored), for everything else its blocks.
    pub bytes: u64,
    /// Entries, the root included.
    pub entries: u64,
}

/// The [`Usage`] of the tree at `name` in `parent`. Entries that vanish
/// during the walk are skipped.
pub fn usage(parent: &Dir, name: &OsStr) -> io::Result<Usage> {
    let mut total = Usage::default();
    let count = |st: &rustix::fs::Stat, file: bool| {
        let blocks = (st.st_blocks as u64).saturating_mul(512);
        if file {
            blocks.max(st.st_size as u64)
        } else {
            blocks
        }
    };
    walk(parent, name, Options::default(), |event| {
        let (st, file) = match event {
            Event::Leaf { dir, name, kind } => match dir.stat(name) {
                Ok(st) => (st, kind == Kind::File),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
            Event::Enter { dir, .. } => (dir.self_stat()?, false),
            Event::Leave { .. } => return Ok(()),
        };
        total.bytes = total.bytes.saturating_add(count(&st, file));
        total.entries = total.entries.saturating_add(1);
        Ok(())
    })?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_counts_its_apparent_size() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = std::fs::File::create(tmp.path().join("sparse")).expect("create");
        f.set_len(16 << 30).expect("truncate");
        let root = Dir::open(tmp.path().parent().expect("parent")).expect("open");
        let name = tmp.path().file_name().expect("name");
        let used = usage(&root, name).expect("usage");
        assert!(used.bytes >= 16 << 30, "{used:?}");
        assert_eq!(used.entries, 2, "{used:?}");
    }

    #[test]
    fn reports_in_order_and_does_not_follow_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        let t = tmp.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).expect("mkdir");
        std::fs::write(t.join("a/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/", t.join("a/b/root")).expect("symlink");
        let root = Dir::open(tmp.path()).expect("open");
        let mut seen = Vec::new();
        walk(&root, OsStr::new("t"), Options::default(), |e| {
            seen.push(match e {
                Event::Enter { name, .. } => format!("enter {}", name.to_string_lossy()),
                Event::Leaf { name, kind, .. } => {
                    format!("leaf {} {kind:?}", name.to_string_lossy())
                }
                Event::Leave { name, .. } => format!("leave {}", name.to_string_lossy()),
            });
            Ok(())
        })
        .expect("walk");
        assert_eq!(
            seen,
            [
                "enter t",
                "enter a",
                "leaf f File",
                "enter b",
                "leaf root Symlink",
                "leave b",
                "leave a",
                "leave t"
            ]
        );
    }
}
