//! Paths beneath a directory handle, never through a symbolic link.
//!
//! The agent builds the sandbox as guest root, outside the chroot, and much
//! of what it creates there is shaped by the request: a symlink input is
//! recreated as a symlink (in the Nix layout the inputs dir is a scratch
//! path too), and additional files, read-only paths and the working dir are
//! paths the request names. Resolved the ordinary way, `nix/store/x ->
//! /proc/sys` plus an additional file `nix/store/x/kernel/foo` would write
//! into the guest's `/proc/sys`, and a link to `/kiln/shares/scratch` would
//! write on the host outside every scratch path.
//!
//! So every path is walked one component at a time from an open directory
//! ([`Dir`]) with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symlink
//! anywhere on the way is an error naming the component, and nothing is
//! created past it. Mounts take their target as `/proc/self/fd/N` of such a
//! handle ([`proc_path`]), so `mount(2)` never resolves the path again.
//! Nothing else runs while the agent sets up, so what a handle names cannot
//! change under it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, makedev, mkdirat, mknodat, FchmodatFlags, Mode, SFlag,
};
use nix::unistd::{fchown, symlinkat, Gid, Uid};

/// Owner and mode given to something the agent creates. Set explicitly
/// (`fchown`, `fchmod`), so neither the umask nor a default decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits, including setgid/sticky.
    pub mode: u32,
}

impl Meta {
    /// Owned by root.
    pub const fn root(mode: u32) -> Self {
        Self {
            uid: 0,
            gid: 0,
            mode,
        }
    }
}

/// A path that could not be used, named as the build would see it.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}{}", hint(*.source))]
pub struct PathError {
    /// What was being done (`opening`, `creating directory`, ...).
    pub op: &'static str,
    /// The path up to the component that failed.
    pub path: String,
    /// The kernel's answer.
    #[source]
    pub source: Errno,
}

/// Says what an errno means for a walk that refuses links.
fn hint(e: Errno) -> &'static str {
    match e {
        Errno::ELOOP => ": it is a symbolic link, which the agent never follows inside the sandbox",
        Errno::EXDEV => ": it leads out of the sandbox root",
        Errno::ENOTDIR => ": a component is not a directory",
        Errno::EEXIST => ": it already exists",
        _ => "",
    }
}

/// An open directory; paths given to its methods are relative to it and
/// clean (no empty, `.` or `..` components: `job::validate` checked them).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Where it is as the build sees it (`/nix/store`), for messages.
    shown: String,
}

/// How each component is resolved: beneath the handle, no link followed.
/// (No `O_NOFOLLOW`: with `O_PATH` it would hand back the link itself
/// instead of refusing it.)
fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY);

/// `/proc/self/fd/N` of `fd`: a path `mount(2)` resolves to exactly the
/// object the handle holds.
pub fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl Dir {
    /// Opens `path`, a directory the agent itself made (no request part),
    /// shown in messages as `shown`.
    pub fn open_trusted(path: &str, shown: &str) -> Result<Dir, PathError> {
        let fd = open(path, DIR_FLAGS | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
            PathError {
                op: "opening",
                path: path.into(),
                source,
            }
        })?;
        Ok(Dir {
            fd,
            shown: shown.into(),
        })
    }

    /// `rel` as the build sees it.
    pub fn show(&self, rel: &str) -> String {
        match (self.shown.as_str(), rel) {
            (s, "") => s.to_string(),
            ("/", r) => format!("/{r}"),
            (s, r) => format!("{s}/{r}"),
        }
    }

    /// The handle, for `*at` calls and [`proc_path`].
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The existing directory at `rel`.
    pub fn dir(&self, rel: &str) -> Result<Dir, PathError> {
        self.walk(rel, None)
    }

    /// The directory at `rel`, creating what is missing with `meta`.
    pub fn mkdirs(&self, rel: &str, meta: Meta) -> Result<Dir, PathError> {
        self.walk(rel, Some(meta))
    }

    /// Whether anything is at `rel`; a symlink on the way is an error.
    pub fn exists(&self, rel: &str) -> Result<bool, PathError> {
        let (parent, name) = self.parent_of(rel)?;
        match openat2(parent.fd.as_fd(), name, how(OFlag::O_PATH, 0)) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(source) => Err(PathError {
                op: "looking up",
                path: self.show(rel),
                source,
            }),
        }
    }

    /// An `O_PATH` handle on whatever is at `rel` (a mount point, typically),
    /// not following a link.
    pub fn handle(&self, rel: &str) -> Result<OwnedFd, PathError> {
        let (parent, name) = self.parent_of(rel)?;
        openat2(parent.fd.as_fd(), name, how(OFlag::O_PATH, 0)).map_err(|source| PathError {
            op: "opening",
            path: self.show(rel),
            source,
        })
    }

    /// Creates the file `rel` (its parent must exist) with `contents` and
    /// `meta`. An existing file, link or directory there is an error.
    pub fn create_file(&self, rel: &str, contents: &[u8], meta: Meta) -> Result<(), PathError> {
        let (parent, name) = self.parent_of(rel)?;
        let fail = |op, source| PathError {
            op,
            path: self.show(rel),
            source,
        };
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let fd =
            openat2(parent.fd.as_fd(), name, how(flags, 0o600)).map_err(|e| fail("creating", e))?;
        let mut file = File::from(fd);
        file.write_all(contents)
            .map_err(|e| fail("writing", io_errno(&e)))?;
        set_meta(&file, meta).map_err(|e| fail("setting owner and mode of", e))
    }

    /// Creates the symlink `name` (one component) pointing at `target`.
    pub fn symlink(&self, name: &str, target: &Path) -> Result<(), PathError> {
        symlinkat(target, self.fd.as_fd(), name).map_err(|source| PathError {
            op: "creating symlink",
            path: self.show(name),
            source,
        })
    }

    /// Creates the character device `name` (one component) with `mode`.
    pub fn mknod(&self, name: &str, major: u64, minor: u64, mode: u32) -> Result<(), PathError> {
        let fail = |op, source| PathError {
            op,
            path: self.show(name),
            source,
        };
        let m = Mode::from_bits_truncate(mode);
        mknodat(
            self.fd.as_fd(),
            name,
            SFlag::S_IFCHR,
            m,
            makedev(major, minor),
        )
        .map_err(|e| fail("mknod", e))?;
        // mknod honours the umask; a device node cannot be opened just to
        // fchmod it (opening a tty has effects), and mknodat just created
        // this name (it fails on anything already there), so following it
        // reaches the new node.
        fchmodat(self.fd.as_fd(), name, m, FchmodatFlags::FollowSymlink)
            .map_err(|e| fail("chmod", e))
    }

    /// Sets this directory's owner and mode.
    pub fn set_meta(&self, meta: Meta) -> Result<(), PathError> {
        set_meta(&self.fd, meta).map_err(|source| PathError {
            op: "setting owner and mode of",
            path: self.shown.clone(),
            source,
        })
    }

    /// The parent directory of `rel` and its last component.
    fn parent_of<'a>(&self, rel: &'a str) -> Result<(Dir, &'a str), PathError> {
        match rel.rsplit_once('/') {
            Some((parent, name)) => Ok((self.dir(parent)?, name)),
            None => Ok((self.dup()?, rel)),
        }
    }

    fn dup(&self) -> Result<Dir, PathError> {
        let fd = self.fd.try_clone().map_err(|e| PathError {
            op: "duplicating the handle of",
            path: self.shown.clone(),
            source: io_errno(&e),
        })?;
        Ok(Dir {
            fd,
            shown: self.shown.clone(),
        })
    }

    /// Opens `rel` one component at a time, creating missing directories
    /// with `create` if given.
    fn walk(&self, rel: &str, create: Option<Meta>) -> Result<Dir, PathError> {
        let mut cur = self.dup()?;
        if rel.is_empty() {
            return Ok(cur);
        }
        let mut done = 0;
        for name in rel.split('/') {
            done += name.len() + 1;
            let shown = self.show(&rel[..done - 1]);
            let fail = |op, source| PathError {
                op,
                path: shown.clone(),
                source,
            };
            let fd = match (openat2(cur.fd.as_fd(), name, how(DIR_FLAGS, 0)), create) {
                (Ok(fd), _) => fd,
                (Err(Errno::ENOENT), Some(meta)) => {
                    let mode = Mode::from_bits_truncate(meta.mode);
                    mkdirat(cur.fd.as_fd(), name, mode)
                        .map_err(|e| fail("creating directory", e))?;
                    let fd = openat2(cur.fd.as_fd(), name, how(DIR_FLAGS, 0))
                        .map_err(|e| fail("opening", e))?;
                    set_meta(&fd, meta).map_err(|e| fail("setting owner and mode of", e))?;
                    fd
                }
                (Err(e), _) => return Err(fail("opening", e)),
            };
            cur = Dir { fd, shown };
        }
        Ok(cur)
    }
}

/// Gives `fd` exactly `meta`'s owner and mode, changing only what differs:
/// on a virtiofs share each change is a round trip to the host, while the
/// `fstat` is answered from the attributes the guest already holds. The
/// mode is compared after any owner change, which may clear bits.
fn set_meta(fd: &impl AsFd, meta: Meta) -> Result<(), Errno> {
    let st = fstat(fd.as_fd())?;
    if st.st_uid != meta.uid || st.st_gid != meta.gid {
        fchown(
            fd.as_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    let mode = fstat(fd.as_fd())?.st_mode & 0o7777;
    if mode != meta.mode & 0o7777 {
        fchmod(fd.as_fd(), Mode::from_bits_truncate(meta.mode))?;
    }
    Ok(())
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    /// A temp dir holding `root/` (the handle) and `outside/` (a decoy).
    fn setup() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("root/real")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/decoy"), "decoy").unwrap();
        symlink(t.path().join("outside"), t.path().join("root/abs")).unwrap();
        symlink("../outside", t.path().join("root/rel")).unwrap();
        symlink("real", t.path().join("root/inner")).unwrap();
        std::fs::write(t.path().join("root/file"), "").unwrap();
        let root = Dir::open_trusted(t.path().join("root").to_str().unwrap(), "/").unwrap();
        (t, root)
    }

    fn me(mode: u32) -> Meta {
        // Whoever runs the tests can chown to itself.
        Meta {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            mode,
        }
    }

    fn outside_untouched(t: &Path) {
        let names: Vec<_> = std::fs::read_dir(t.join("outside"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["decoy"]);
        assert_eq!(std::fs::read(t.join("outside/decoy")).unwrap(), b"decoy");
    }

    #[test]
    fn refuses_every_link_on_the_way_and_names_it() {
        let (t, root) = setup();
        for link in ["abs", "rel", "inner"] {
            let e = root.mkdirs(&format!("{link}/a/b"), me(0o755)).unwrap_err();
            assert_eq!(
                (e.path.as_str(), e.source),
                (&*format!("/{link}"), Errno::ELOOP)
            );
            assert!(e.to_string().contains("symbolic link"), "{e}");
            let e = root
                .create_file(&format!("{link}/decoy"), b"x", me(0o644))
                .unwrap_err();
            assert_eq!(e.source, Errno::ELOOP, "{e}");
            assert!(root.exists(&format!("{link}/decoy")).is_err());
        }
        // The link itself as the last component.
        let e = root.create_file("abs", b"x", me(0o644)).unwrap_err();
        assert_eq!(e.source, Errno::EEXIST, "{e}");
        assert_eq!(root.dir("abs").unwrap_err().source, Errno::ELOOP);
        assert_eq!(root.handle("abs").unwrap_err().source, Errno::ELOOP);
        assert_eq!(root.exists("inner").unwrap_err().source, Errno::ELOOP);
        assert_eq!(
            root.mkdirs("file/x", me(0o755)).unwrap_err().source,
            Errno::ENOTDIR
        );
        outside_untouched(t.path());
    }

    #[test]
    fn creates_with_the_exact_mode_whatever_the_umask() {
        let (t, root) = setup();
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
        let d = root.mkdirs("real/a/b", me(0o755)).unwrap();
        d.create_file("f", b"hi", me(0o644)).unwrap();
        root.create_file("real/a/g", b"", me(0o444)).unwrap();
        nix::sys::stat::umask(old);
        let mode = |p: &str| std::fs::metadata(t.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("root/real/a"), 0o755);
        assert_eq!(mode("root/real/a/b"), 0o755);
        assert_eq!(mode("root/real/a/b/f"), 0o644);
        assert_eq!(mode("root/real/a/g"), 0o444);
        assert_eq!(
            std::fs::read(t.path().join("root/real/a/b/f")).unwrap(),
            b"hi"
        );
        assert!(root.exists("real/a/b/f").unwrap());
        assert!(!root.exists("real/a/none").unwrap());
        assert_eq!(d.show("f"), "/real/a/b/f");
    }

    #[test]
    fn refuses_to_replace_what_is_there() {
        let (_t, root) = setup();
        root.create_file("real/f", b"1", me(0o644)).unwrap();
        let e = root.create_file("real/f", b"2", me(0o644)).unwrap_err();
        assert_eq!((e.path.as_str(), e.source), ("/real/f", Errno::EEXIST));
    }
}
