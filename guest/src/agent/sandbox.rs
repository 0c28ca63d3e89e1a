//! Builds the sandbox root the way Nix builds its chroot, at [`ROOT`]:
//!
//! - scratch paths: bind mounts of the scratch share, writable by the build
//!   user (the inputs dir, if also scratch, is `root:nixbld 1775` like
//!   `/nix/store`: outputs can be created there, inputs cannot be removed);
//! - inputs at `/<inputs_dir>/<name>`: bind mounts of the inputs share,
//!   remounted read-only, so even root inside cannot write them;
//! - a minimal `/dev`, `/proc`, `/tmp`, `/etc/{passwd,group,hosts}`, `/bin/sh`
//!   if asked, operator-allowed read-only shares, and the additional files.
//!
//! The root itself is a tmpfs owned by root, mode 0755. Everything in it is
//! created through [`beneath`](super::beneath) handles, so a symlink the
//! request put there (a symlink input) is never followed: a path through one
//! fails the set-up, naming the path. Everything gets an explicit owner and
//! mode: directories and mount points `root 0755`, `/etc` `0555` with its
//! files `0644` (as Nix: 2.8 leaves `/etc` 0755, later versions make it 0555).

use std::fs;
use std::os::fd::OwnedFd;
use std::path::Path;

use kiln_guest::contract::{Job, BUILD_GID, BUILD_UID, SHELL_PATH};
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fstat, Mode, SFlag};

use super::beneath::{proc_path, Dir, Meta, PathError};
use super::boot::{mount_virtiofs_on, INPUTS_MNT, SCRATCH_MNT};
use super::error::{sandbox, AgentError, Step};

/// Where the sandbox root is built; the builder is chrooted into it.
pub const ROOT: &str = "/kiln/root";

/// Directories the agent creates, mount points included.
const DIR: Meta = Meta::root(0o755);
/// A mount point for a single file (an input that is a file, `/bin/sh`).
const FILE_MOUNT_POINT: Meta = Meta::root(0o644);
/// A directory or file the agent creates inside a scratch path, where the
/// build user owns everything (as Nix's `passAsFile` files).
const fn build_user(mode: u32) -> Meta {
    Meta {
        uid: BUILD_UID,
        gid: BUILD_GID,
        mode,
    }
}

/// Character devices of the minimal /dev: (name, major, minor).
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Builds the root. `kvm` is `/dev/kvm`'s device number when it was asked for.
pub fn build(job: &Job, kvm: Option<(u64, u64)>) -> Result<(), AgentError> {
    fs::create_dir_all(ROOT).step(sandbox, || format!("creating {ROOT}"))?;
    mount(
        Some("tmpfs"),
        ROOT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .step(sandbox, || format!("mounting tmpfs on {ROOT}"))?;
    let root = Dir::open_trusted(ROOT, "/").map_err(placing(|| "opening the root".into()))?;
    scratch(&root, job)?;
    working_dir(&root, job)?;
    inputs(&root, job)?;
    dev(&root, kvm)?;
    let noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(&root, "proc", "proc", noexec, "")?;
    if !job.scratch_paths.iter().any(|p| p == "tmp") {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount_fs(&root, "tmp", "tmpfs", flags, "mode=1777")?;
    }
    etc(&root, job)?;
    if job.provide_bin_sh {
        bin_sh(&root)?;
    }
    for (tag, path) in &job.ro_paths {
        let rel = &path[1..];
        let point = root.mkdirs(rel, DIR).map_err(placing(|| {
            format!("creating the mount point of read-only path {path}")
        }))?;
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount_virtiofs_on(tag, &proc_path(point.fd()), path, flags)?;
    }
    for (path, contents) in &job.additional_files {
        additional_file(&root, job, path, contents)?;
    }
    Ok(())
}

/// Maps a refused path to the set-up step it failed.
fn placing(what: impl FnOnce() -> String) -> impl FnOnce(PathError) -> AgentError {
    move |source| AgentError::SandboxPath {
        what: what(),
        source,
    }
}

/// Mounts `fstype` at `parent/rel` (created as [`DIR`]) and returns a handle
/// on the new mount: the mount point's own handle still names the directory
/// underneath.
fn mount_fs(
    parent: &Dir,
    rel: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<Dir, AgentError> {
    let shown = parent.show(rel);
    let point = parent
        .mkdirs(rel, DIR)
        .map_err(placing(|| format!("creating the mount point for {fstype}")))?;
    let data = (!data.is_empty()).then_some(data);
    mount(
        Some(fstype),
        proc_path(point.fd()).as_str(),
        Some(fstype),
        flags,
        data,
    )
    .step(sandbox, || format!("mounting {fstype} on {shown}"))?;
    parent
        .dir(rel)
        .map_err(placing(|| format!("opening the new {fstype} mount")))
}

/// Bind-mounts `source` (a handle, shown as `shown`) on `parent/rel`,
/// creating a mount point of the same kind if none is there, and makes that
/// mount read-only; a bind mount ignores `MS_RDONLY` until remounted.
fn bind_ro(parent: &Dir, rel: &str, source: &OwnedFd, shown: &str) -> Result<(), AgentError> {
    let target = parent.show(rel);
    let stat = fstat(source).step(sandbox, || format!("stat {shown}"))?;
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let make_point = || -> Result<(), PathError> {
        if is_dir {
            parent.mkdirs(rel, DIR).map(drop)
        } else if !parent.exists(rel)? {
            parent.create_file(rel, b"", FILE_MOUNT_POINT)
        } else {
            Ok(())
        }
    };
    make_point().map_err(placing(|| format!("creating the mount point for {shown}")))?;
    let point = parent
        .handle(rel)
        .map_err(placing(|| format!("opening the mount point for {shown}")))?;
    mount(
        Some(proc_path(source).as_str()),
        proc_path(&point).as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step(sandbox, || format!("bind-mounting {shown} on {target}"))?;
    let mounted = parent
        .handle(rel)
        .map_err(placing(|| format!("opening the bind mount of {shown}")))?;
    let ro = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(
        None::<&str>,
        proc_path(&mounted).as_str(),
        None::<&str>,
        ro,
        None::<&str>,
    )
    .step(sandbox, || format!("making {target} read-only"))
}

/// Binds every scratch path from the scratch share, parents first.
fn scratch(root: &Dir, job: &Job) -> Result<(), AgentError> {
    let share = Dir::open_trusted(SCRATCH_MNT, SCRATCH_MNT)
        .map_err(placing(|| "opening the scratch share".into()))?;
    let mut paths: Vec<&String> = job.scratch_paths.iter().collect();
    paths.sort_by_key(|p| p.matches('/').count());
    for p in paths {
        let what = || format!("preparing scratch path /{p}");
        let source = share.mkdirs(p, DIR).map_err(placing(what))?;
        let point = root.mkdirs(p, DIR).map_err(placing(what))?;
        mount(
            Some(proc_path(source.fd()).as_str()),
            proc_path(point.fd()).as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step(sandbox, || format!("bind-mounting scratch path /{p}"))?;
        let meta = if *p == job.inputs_dir {
            Meta {
                gid: BUILD_GID,
                ..Meta::root(0o1775)
            }
        } else if *p == job.working_dir {
            build_user(0o700)
        } else {
            build_user(0o755)
        };
        let mounted = root.dir(p).map_err(placing(what))?;
        mounted.set_meta(meta).map_err(placing(what))?;
    }
    Ok(())
}

/// Unless it is a scratch path: a private, build-user-owned directory.
fn working_dir(root: &Dir, job: &Job) -> Result<(), AgentError> {
    let wd = &job.working_dir;
    let what = || format!("creating the working dir /{wd}");
    if root.exists(wd).map_err(placing(what))? {
        return Ok(());
    }
    let (parent, leaf) = wd.rsplit_once('/').unwrap_or(("", wd));
    root.mkdirs(parent, DIR)
        .and_then(|p| p.mkdirs(leaf, build_user(0o700)))
        .map(drop)
        .map_err(placing(what))
}

/// Makes every input visible read-only at `/<inputs_dir>/<name>`.
fn inputs(root: &Dir, job: &Job) -> Result<(), AgentError> {
    let share = Dir::open_trusted(INPUTS_MNT, INPUTS_MNT)
        .map_err(placing(|| "opening the inputs share".into()))?;
    if !job.scratch_paths.contains(&job.inputs_dir) {
        // Nothing else lives there: one read-only bind of the whole share.
        return bind_ro(root, &job.inputs_dir, share.fd(), INPUTS_MNT);
    }
    let dir = root
        .dir(&job.inputs_dir)
        .map_err(placing(|| "opening the inputs dir".into()))?;
    let entries = fs::read_dir(INPUTS_MNT).step(sandbox, || format!("listing {INPUTS_MNT}"))?;
    for entry in entries {
        let entry = entry.step(sandbox, || format!("listing {INPUTS_MNT}"))?;
        let source = entry.path();
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            sandbox(
                format!("input {}", source.display()),
                std::io::Error::other("its name is not UTF-8"),
            )
        })?;
        let kind = entry
            .file_type()
            .step(sandbox, || format!("stat {}", source.display()))?;
        if kind.is_symlink() {
            // Recreated as it is; the agent itself never follows it.
            let dest = fs::read_link(&source)
                .step(sandbox, || format!("readlink {}", source.display()))?;
            dir.symlink(name, &dest)
                .map_err(placing(|| format!("recreating symlink input {name}")))?;
        } else {
            let handle = share
                .handle(name)
                .map_err(placing(|| format!("opening input {name}")))?;
            bind_ro(&dir, name, &handle, &source.to_string_lossy())?;
        }
    }
    Ok(())
}

/// The minimal /dev of a Nix sandbox, plus `kvm` when asked.
fn dev(root: &Dir, kvm: Option<(u64, u64)>) -> Result<(), AgentError> {
    let dev = mount_fs(
        root,
        "dev",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755",
    )?;
    let mut nodes: Vec<(&str, u64, u64)> = DEVICES.to_vec();
    if let Some((major, minor)) = kvm {
        nodes.push(("kvm", major, minor));
    }
    for (name, major, minor) in nodes {
        dev.mknod(name, major, minor, 0o666)
            .map_err(placing(|| format!("creating /dev/{name}")))?;
    }
    let noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let ptmx = "newinstance,ptmxmode=0666,mode=0620";
    mount_fs(&dev, "pts", "devpts", noexec, ptmx)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs(&dev, "shm", "tmpfs", flags, "mode=1777")?;
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        dev.symlink(name, Path::new(target))
            .map_err(placing(|| format!("creating /dev/{name}")))?;
    }
    Ok(())
}

/// `/etc/passwd`, `/etc/group`, `/etc/hosts` as in a Nix sandbox, and for a
/// networked build `resolv.conf`, `nsswitch.conf` and `services`. The home
/// field is the working dir, which `job::validate` checked holds no `:` or
/// newline.
fn etc(root: &Dir, job: &Job) -> Result<(), AgentError> {
    let etc = root
        .mkdirs("etc", DIR)
        .map_err(placing(|| "creating /etc".into()))?;
    let home = format!("/{}", job.working_dir);
    let passwd = format!(
        "root:x:0:0:Nix build user:{home}:/noshell\n\
         nixbld:x:{BUILD_UID}:{BUILD_GID}:Nix build user:{home}:/noshell\n\
         nobody:x:65534:65534:Nobody:/:/noshell\n"
    );
    let group = format!("root:x:0:\nnixbld:!:{BUILD_GID}:\nnogroup:x:65534:\n");
    let hosts = "127.0.0.1 localhost\n::1 localhost\n";
    let mut files = vec![
        ("passwd", passwd),
        ("group", group),
        ("hosts", hosts.to_owned()),
    ];
    if let Some(network) = &job.network {
        // What Nix gives a fixed-output derivation: a resolver, name
        // service limited to files and DNS, and the host's services list.
        files.push(("resolv.conf", format!("nameserver {}\n", network.dns)));
        files.push((
            "nsswitch.conf",
            "hosts: files dns\nservices: files\n".into(),
        ));
        if !network.services.is_empty() {
            files.push(("services", network.services.clone()));
        }
    }
    for (name, contents) in &files {
        etc.create_file(name, contents.as_bytes(), Meta::root(0o644))
            .map_err(placing(|| format!("writing /etc/{name}")))?;
    }
    etc.set_meta(Meta::root(0o555))
        .map_err(placing(|| "making /etc read-only".into()))
}

/// The agent's static shell at `/bin/sh`, read-only.
fn bin_sh(root: &Dir) -> Result<(), AgentError> {
    let bin = root
        .mkdirs("bin", DIR)
        .map_err(placing(|| "creating /bin".into()))?;
    let shell = open(SHELL_PATH, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .step(sandbox, || format!("opening {SHELL_PATH}"))?;
    bind_ro(&bin, "sh", &shell, SHELL_PATH)
}

/// Writes one additional file. Inside a scratch path it, and any directory
/// made for it, belongs to the build user, as Nix's `passAsFile` files do.
fn additional_file(root: &Dir, job: &Job, path: &str, contents: &[u8]) -> Result<(), AgentError> {
    let what = || format!("creating additional file /{path}");
    let scratch = job
        .scratch_paths
        .iter()
        .filter(|s| path.starts_with(&format!("{s}/")))
        .max_by_key(|s| s.len());
    let (base, rest, dirs, file) = match scratch {
        Some(s) => (
            s.as_str(),
            &path[s.len() + 1..],
            build_user(0o755),
            build_user(0o644),
        ),
        None => ("", path, DIR, Meta::root(0o644)),
    };
    let base = root.dir(base).map_err(placing(what))?;
    let (parent, name) = rest.rsplit_once('/').unwrap_or(("", rest));
    base.mkdirs(parent, dirs)
        .and_then(|d| d.create_file(name, contents, file))
        .map_err(placing(what))
}
