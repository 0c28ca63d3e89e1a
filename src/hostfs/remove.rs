//! Removing a tree a build wrote, however deep, without following links:
//! the [`walk`](super::walk) loop, unlinking leaves and removing each
//! directory once it is left. Directories the build made read-only or
//! unreadable are given back their bits first (root does not need them, a
//! non-root kiln in tests does).

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use super::walk::{walk, Event, Options};
use super::{open_parent, Dir};

/// Removes `name` in `parent` and everything below it. A missing entry is
/// not an error. Blocking: call it off the async runtime.
pub fn remove_all(parent: &Dir, name: &OsStr) -> io::Result<()> {
    let options = Options {
        make_accessible: true,
    };
    let result = walk(parent, name, options, |event| match event {
        Event::Leaf { dir, name, .. } => ignore_missing(dir.unlink(name)),
        Event::Enter { .. } => Ok(()),
        Event::Leave { parent, name } => ignore_missing(parent.remove_dir(name)),
    });
    ignore_missing(result)
}

/// Removes the tree at `path`, a path kiln made (its last component may be
/// build-made and is not followed).
pub fn remove_path(path: &Path) -> io::Result<()> {
    let (parent, name) = match open_parent(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_all(&parent, &name)
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn removes_a_deep_tree_without_following_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"decoy").expect("write");
        let root = Dir::open(tmp.path()).expect("open");
        let mut dir = root.create_or_open_dir(OsStr::new("t"), 0o755).expect("t");
        // Deeper than any path the kernel accepts (PATH_MAX is 4096 bytes).
        for _ in 0..3_000 {
            drop(dir.create_file(OsStr::new("f"), 0o644).expect("file"));
            dir.symlink(outside.as_os_str(), OsStr::new("l"))
                .expect("symlink");
            dir = dir.create_or_open_dir(OsStr::new("d"), 0o755).expect("d");
        }
        dir.chmod(0o500).expect("chmod");
        remove_path(&tmp.path().join("t")).expect("remove");
        assert!(!tmp.path().join("t").exists());
        assert_eq!(
            std::fs::read(outside.join("keep")).expect("decoy"),
            b"decoy"
        );
    }

    #[test]
    fn a_symlink_or_file_is_removed_itself() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"decoy").expect("write");
        symlink(&outside, tmp.path().join("l")).expect("symlink");
        remove_path(&tmp.path().join("l")).expect("remove");
        assert!(outside.join("keep").exists());
        assert!(std::fs::symlink_metadata(tmp.path().join("l")).is_err());
        remove_path(&tmp.path().join("missing")).expect("missing is fine");
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        std::fs::write(ro.join("f"), b"x").expect("write");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        remove_path(&ro).expect("remove unreadable dir");
        assert!(!ro.exists());
    }
}
