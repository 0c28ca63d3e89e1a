//! Host filesystem access that cannot leave a tree: directory handles.
//!
//! kiln runs as root, and much of what it touches on the host was written by
//! a build (its scratch share) or named by a client (input and output paths).
//! A path string joined onto a build directory would be resolved by the host
//! kernel through whatever symlinks the build left there, so nothing here
//! takes such a path. Instead a [`Dir`] is an open directory handle; every
//! operation names one *component* relative to it and never follows a
//! symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`), and multi-component paths
//! are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, which
//! the kernel refuses to walk out of the handle's tree or through any link.
//!
//! The only paths opened by name are ones kiln made itself (the data dir,
//! `runs/<id>/scratch`): [`Dir::open`].
//!
//! - [`remove`]: iterative, handle-based removal of a whole tree.
//! - [`walk`]: the disk usage of a tree, counted as ingest will process it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::OnceLock;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, CWD};
use rustix::process::Uid;

pub mod remove;
pub mod walk;

/// What a directory entry is, as far as kiln cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// Anything else: fifo, socket, device node; the name says which.
    Other(&'static str),
}

impl Kind {
    fn of(ft: FileType) -> Self {
        match ft {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Other("fifo"),
            FileType::Socket => Kind::Other("socket"),
            FileType::CharacterDevice => Kind::Other("character device"),
            FileType::BlockDevice => Kind::Other("block device"),
            FileType::Unknown => Kind::Other("file of unknown type"),
        }
    }

    /// The kind of a `stat` result.
    pub fn of_stat(st: &Stat) -> Self {
        Self::of(FileType::from_raw_mode(st.st_mode))
    }
}

/// (device, inode) of a directory.
pub type DirId = (u64, u64);

/// An open directory; everything below it is reached through it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// Flags for opening a directory handle: no symlink as the last component,
/// not inherited by children.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// One path component: not empty, no `/`, not `.` or `..`.
fn component(name: &OsStr) -> io::Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    Ok(name)
}

impl Dir {
    /// Opens a directory kiln itself made, by path. The last component must
    /// not be a symlink. Never use this on a path below a build's tree.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the child directory `name`; a symlink there is refused
    /// (`ELOOP` or `ENOTDIR`).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let fd = rustix::fs::openat(&self.fd, component(name)?, dir_flags(), Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the directory at the relative path `rel` beneath this one. The
    /// kernel refuses any symlink, `..` or absolute step on the way.
    pub fn open_beneath(&self, rel: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            dir_flags(),
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )?;
        Ok(Dir { fd })
    }

    /// `lstat` of the child `name`.
    pub fn stat(&self, name: &OsStr) -> io::Result<Stat> {
        Ok(rustix::fs::statat(
            &self.fd,
            component(name)?,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// The kind of the child `name`, without following it.
    pub fn kind(&self, name: &OsStr) -> io::Result<Kind> {
        Ok(Kind::of_stat(&self.stat(name)?))
    }

    /// `fstat` of this directory.
    pub fn self_stat(&self) -> io::Result<Stat> {
        Ok(rustix::fs::fstat(&self.fd)?)
    }

    /// The entries of this directory (without `.` and `..`), with their kinds.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Kind)>> {
        let mut dir = rustix::fs::Dir::read_from(&self.fd)?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsString::from_vec(name.to_vec());
            let kind = match entry.file_type() {
                // Some filesystems do not fill d_type.
                FileType::Unknown => self.kind(&name)?,
                ft => Kind::of(ft),
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        let target = rustix::fs::readlinkat(&self.fd, component(name)?, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// Opens the regular file `name` for reading. A symlink, fifo or device
    /// there is refused without being opened for I/O (`O_PATH` first, so a
    /// fifo cannot block and a device is never opened).
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        Ok(self.open_regular(name)?.file)
    }

    /// [`Dir::open_file`], answering the file's `stat` too (taken through
    /// the `O_PATH` handle, of the very inode opened).
    pub fn open_regular(&self, name: &OsStr) -> io::Result<RegularFile> {
        let name = component(name)?;
        let path_fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&path_fd)?;
        if Kind::of_stat(&stat) != Kind::File {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a regular file"),
            ));
        }
        let file = File::from(reopen_for_reading(&path_fd, &stat)?);
        Ok(RegularFile { file, stat })
    }

    /// Creates the directory `name` with `mode` (the umask applies).
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::mkdirat(
            &self.fd,
            component(name)?,
            Mode::from_raw_mode(mode),
        )?)
    }

    /// Opens `name`, creating it first if it does not exist. An existing
    /// entry that is not a real directory is refused.
    pub fn create_or_open_dir(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        match self.create_dir(name, mode) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.open_dir(name)
    }

    /// `mkdir -p` of the relative path `rel` beneath this directory, one
    /// component at a time, never through a symlink.
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> io::Result<Dir> {
        let mut dir = self.try_clone()?;
        for c in rel.components() {
            let std::path::Component::Normal(name) = c else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a clean relative path", rel.display()),
                ));
            };
            dir = dir.create_or_open_dir(name, mode)?;
        }
        Ok(dir)
    }

    /// Creates the new regular file `name` for writing (`O_EXCL`: an
    /// existing entry, symlink or not, is refused).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            component(name)?,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Creates the symlink `name` pointing at `target` (which is not resolved).
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.fd, component(name)?)?)
    }

    /// Hardlinks the file kiln owns at `source` (a trusted path, e.g. a blob)
    /// as `name` here.
    pub fn hard_link_from(&self, source: &Path, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::linkat(
            CWD,
            source,
            &self.fd,
            component(name)?,
            AtFlags::empty(),
        )?)
    }

    /// Removes the non-directory `name`.
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(
            &self.fd,
            component(name)?,
            AtFlags::empty(),
        )?)
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(
            &self.fd,
            component(name)?,
            AtFlags::REMOVEDIR,
        )?)
    }

    /// Renames `name` here to `to_name` in `to` (same filesystem only).
    pub fn rename(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::renameat(
            &self.fd,
            component(name)?,
            &to.fd,
            component(to_name)?,
        )?)
    }

    /// This directory's identity: (device, inode).
    pub fn id(&self) -> io::Result<DirId> {
        let st = self.self_stat()?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Opens this directory's parent through `..`, for loops that climb back
    /// up a tree they descended by name; refused unless it is `expected`
    /// (the identity recorded on the way down), so a tree changed meanwhile
    /// cannot lead the loop anywhere else.
    pub fn climb(&self, expected: DirId) -> io::Result<Dir> {
        let fd = rustix::fs::openat(&self.fd, "..", dir_flags(), Mode::empty())?;
        let up = Dir { fd };
        if up.id()? != expected {
            return Err(io::Error::other(
                "the tree changed while being walked: `..` is not the directory above",
            ));
        }
        Ok(up)
    }

    /// Sets the mode of the child directory `name` without reading it first
    /// (for a directory the build made unreadable) and without following a
    /// symlink there.
    pub fn chmod_child_dir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let path_fd = rustix::fs::openat(
            &self.fd,
            component(name)?,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // fchmod does not take O_PATH handles; the magic link names the same inode.
        Ok(rustix::fs::chmodat(
            CWD,
            format!("/proc/self/fd/{}", fd_number(&path_fd)),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )?)
    }

    /// Sets this directory's mode.
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))?)
    }

    /// Free bytes for unprivileged users on this directory's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::fstatvfs(&self.fd)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// A second handle on the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A regular file opened for reading beneath a [`Dir`].
#[derive(Debug)]
pub struct RegularFile {
    /// The file, opened read-only.
    pub file: File,
    /// Its `stat` when it was opened: its size bounds what is read of it.
    pub stat: Stat,
}

/// Reopens the inode an `O_PATH` handle names, for reading, through its
/// magic link in `/proc/self/fd` (the only way to upgrade such a handle).
/// That directory is opened once per process (it names this process's
/// descriptors, which all its threads share): resolving `/proc/self/fd/N`
/// from the root costs more than the open itself, on every file of a tree.
/// Without the access time (nothing reads it, and updating it dirties the
/// inode) when the kernel allows.
fn reopen_for_reading(path_fd: &OwnedFd, stat: &Stat) -> io::Result<OwnedFd> {
    /// `/proc/self/fd`, and the effective user the process had then.
    static PROC_FDS: OnceLock<(OwnedFd, Uid)> = OnceLock::new();
    let (fds, euid) = match PROC_FDS.get() {
        Some(opened) => opened,
        None => {
            let fds = rustix::fs::open("/proc/self/fd", dir_flags(), Mode::empty())?;
            PROC_FDS.get_or_init(|| (fds, rustix::process::geteuid()))
        }
    };
    let name = fd_number(path_fd).to_string();
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
    // O_NOATIME needs the file's owner or CAP_FOWNER (root, as kiln runs).
    if euid.is_root() || stat.st_uid == euid.as_raw() {
        match rustix::fs::openat(fds, name.as_str(), flags | OFlags::NOATIME, Mode::empty()) {
            Err(rustix::io::Errno::PERM) => {}
            opened => return Ok(opened?),
        }
    }
    Ok(rustix::fs::openat(
        fds,
        name.as_str(),
        flags,
        Mode::empty(),
    )?)
}

fn fd_number(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// Opens the directory holding `path`, a path kiln made whose last component
/// may be build-made, and returns it with that last component.
pub fn open_parent(path: &Path) -> io::Result<(Dir, OsString)> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok((Dir::open(parent)?, name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn nothing_is_reached_through_a_symlink() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), b"decoy").expect("write");
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).expect("mkdir");
        symlink(&outside, tree.join("l")).expect("symlink");
        symlink(outside.join("secret"), tree.join("f")).expect("symlink");
        let dir = Dir::open(&tree).expect("open");

        assert!(dir.open_dir(OsStr::new("l")).is_err());
        assert!(dir.open_beneath(Path::new("l")).is_err());
        assert!(dir.open_beneath(Path::new("../outside")).is_err());
        assert!(dir.open_file(OsStr::new("f")).is_err());
        assert!(dir.create_dir_all(Path::new("l/new"), 0o755).is_err());
        assert!(!outside.join("new").exists());
        assert!(dir.open_dir(OsStr::new("..")).is_err());
        assert_eq!(dir.kind(OsStr::new("l")).expect("kind"), Kind::Symlink);
        assert_eq!(
            dir.read_link(OsStr::new("f")).expect("readlink"),
            outside.join("secret").into_os_string()
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().expect("tmp");
        rustix::fs::mkfifoat(CWD, tmp.path().join("p"), Mode::from_raw_mode(0o644)).expect("fifo");
        let dir = Dir::open(tmp.path()).expect("open");
        assert!(dir.open_file(OsStr::new("p")).is_err());
        assert_eq!(
            dir.kind(OsStr::new("p")).expect("kind"),
            Kind::Other("fifo")
        );
    }

    #[test]
    fn creates_and_lists() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = Dir::open(tmp.path()).expect("open");
        let sub = dir
            .create_dir_all(Path::new("a/b"), 0o755)
            .expect("mkdir -p");
        drop(sub.create_file(OsStr::new("f"), 0o644).expect("create"));
        assert!(sub.create_file(OsStr::new("f"), 0o644).is_err());
        let a = dir.open_dir(OsStr::new("a")).expect("open a");
        assert_eq!(
            a.entries().expect("entries"),
            vec![(OsString::from("b"), Kind::Dir)]
        );
    }
}
