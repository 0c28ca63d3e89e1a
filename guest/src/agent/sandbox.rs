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
//! The root itself is a tmpfs owned by root, mode 0755.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_guest::contract::{Job, BUILD_GID, BUILD_UID, SHELL_PATH};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};

use super::boot::{mount_virtiofs, INPUTS_MNT, SCRATCH_MNT};
use super::error::{sandbox, AgentError, Step};

/// Where the sandbox root is built; the builder is chrooted into it.
pub const ROOT: &str = "/kiln/root";

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
    mount_fs("tmpfs", ROOT, MsFlags::MS_NOSUID, "mode=0755")?;
    scratch(job)?;
    let workdir = at(&job.working_dir);
    if !Path::new(&workdir).exists() {
        // Not a scratch path: a private, build-user-owned directory in the root.
        mkdir(&workdir)?;
        own(&workdir, BUILD_UID, BUILD_GID, 0o700)?;
    }
    inputs(job)?;
    dev(kvm)?;
    mkdir(&at("proc"))?;
    mount_fs(
        "proc",
        &at("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;
    if !job.scratch_paths.iter().any(|p| p == "tmp") {
        mount_fs(
            "tmpfs",
            &at("tmp"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        )?;
    }
    etc(job)?;
    if job.provide_bin_sh {
        mkdir(&at("bin"))?;
        bind_ro(Path::new(SHELL_PATH), &at("bin/sh"))?;
    }
    for (tag, path) in &job.ro_paths {
        let target = at(&path[1..]);
        mount_virtiofs(
            tag,
            &target,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        )?;
    }
    for (path, contents) in &job.additional_files {
        additional_file(job, path, contents)?;
    }
    Ok(())
}

/// `ROOT/rel`.
fn at(rel: &str) -> String {
    format!("{ROOT}/{rel}")
}

fn mkdir(path: &str) -> Result<(), AgentError> {
    fs::create_dir_all(path).step(sandbox, || format!("creating {path}"))
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: &str) -> Result<(), AgentError> {
    mkdir(target)?;
    let data = (!data.is_empty()).then_some(data);
    mount(Some(fstype), target, Some(fstype), flags, data)
        .step(sandbox, || format!("mounting {fstype} on {target}"))
}

fn own(path: &str, uid: u32, gid: u32, mode: u32) -> Result<(), AgentError> {
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .step(sandbox, || format!("chown {path}"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .step(sandbox, || format!("chmod {path}"))
}

/// Bind-mounts `source` on `target` (created to match) and makes that mount
/// read-only; a bind mount ignores `MS_RDONLY` until remounted.
fn bind_ro(source: &Path, target: &str) -> Result<(), AgentError> {
    let is_dir = source.is_dir();
    if is_dir {
        mkdir(target)?;
    } else if !Path::new(target).exists() {
        fs::File::create(target).step(sandbox, || format!("creating mount point {target}"))?;
    }
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step(sandbox, || {
        format!("bind-mounting {} on {target}", source.display())
    })?;
    let ro = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(None::<&str>, target, None::<&str>, ro, None::<&str>)
        .step(sandbox, || format!("making {target} read-only"))
}

/// Binds every scratch path from the scratch share, parents first.
fn scratch(job: &Job) -> Result<(), AgentError> {
    let mut paths: Vec<&String> = job.scratch_paths.iter().collect();
    paths.sort_by_key(|p| p.matches('/').count());
    for p in paths {
        let source = format!("{SCRATCH_MNT}/{p}");
        let target = at(p);
        mkdir(&source)?;
        mkdir(&target)?;
        mount(
            Some(source.as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step(sandbox, || format!("bind-mounting scratch path {p}"))?;
        if *p == job.inputs_dir {
            own(&target, 0, BUILD_GID, 0o1775)?;
        } else if *p == job.working_dir {
            own(&target, BUILD_UID, BUILD_GID, 0o700)?;
        } else {
            own(&target, BUILD_UID, BUILD_GID, 0o755)?;
        }
    }
    Ok(())
}

/// Makes every input visible read-only at `/<inputs_dir>/<name>`.
fn inputs(job: &Job) -> Result<(), AgentError> {
    let dir = at(&job.inputs_dir);
    if !job.scratch_paths.contains(&job.inputs_dir) {
        // Nothing else lives there: one read-only bind of the whole share.
        return bind_ro(Path::new(INPUTS_MNT), &dir);
    }
    mkdir(&dir)?;
    let entries = fs::read_dir(INPUTS_MNT).step(sandbox, || format!("listing {INPUTS_MNT}"))?;
    for entry in entries {
        let entry = entry.step(sandbox, || format!("listing {INPUTS_MNT}"))?;
        let name = entry.file_name();
        let source = entry.path();
        let target = format!("{dir}/{}", name.to_string_lossy());
        let kind = entry
            .file_type()
            .step(sandbox, || format!("stat {}", source.display()))?;
        if kind.is_symlink() {
            let dest = fs::read_link(&source)
                .step(sandbox, || format!("readlink {}", source.display()))?;
            symlink(&dest, &target).step(sandbox, || format!("creating symlink {target}"))?;
        } else {
            bind_ro(&source, &target)?;
        }
    }
    Ok(())
}

/// The minimal /dev of a Nix sandbox, plus `kvm` when asked.
fn dev(kvm: Option<(u64, u64)>) -> Result<(), AgentError> {
    let dev = at("dev");
    mount_fs(
        "tmpfs",
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755",
    )?;
    let mut nodes: Vec<(&str, u64, u64)> = DEVICES.to_vec();
    if let Some((major, minor)) = kvm {
        nodes.push(("kvm", major, minor));
    }
    for (name, major, minor) in nodes {
        let path = format!("{dev}/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .step(sandbox, || format!("mknod {path}"))?;
        // mknod honours the umask; make the mode exact.
        own(&path, 0, 0, 0o666)?;
    }
    mount_fs(
        "devpts",
        &format!("{dev}/pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount_fs(
        "tmpfs",
        &format!("{dev}/shm"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    )?;
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = format!("{dev}/{name}");
        symlink(target, &path).step(sandbox, || format!("creating symlink {path}"))?;
    }
    Ok(())
}

/// `/etc/passwd`, `/etc/group`, `/etc/hosts` as in a Nix sandbox.
fn etc(job: &Job) -> Result<(), AgentError> {
    mkdir(&at("etc"))?;
    let home = format!("/{}", job.working_dir);
    let passwd = format!(
        "root:x:0:0:Nix build user:{home}:/noshell\n\
         nixbld:x:{BUILD_UID}:{BUILD_GID}:Nix build user:{home}:/noshell\n\
         nobody:x:65534:65534:Nobody:/:/noshell\n"
    );
    let group = format!("root:x:0:\nnixbld:!:{BUILD_GID}:\nnogroup:x:65534:\n");
    let hosts = "127.0.0.1 localhost\n::1 localhost\n";
    for (name, contents) in [
        ("passwd", passwd.as_str()),
        ("group", group.as_str()),
        ("hosts", hosts),
    ] {
        let path = at(&format!("etc/{name}"));
        fs::write(&path, contents).step(sandbox, || format!("writing {path}"))?;
    }
    Ok(())
}

/// Writes one additional file; inside a scratch path it belongs to the build
/// user, as Nix's `passAsFile` files do.
fn additional_file(job: &Job, path: &str, contents: &[u8]) -> Result<(), AgentError> {
    let target = PathBuf::from(at(path));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).step(sandbox, || format!("creating {}", parent.display()))?;
    }
    fs::write(&target, contents).step(sandbox, || format!("writing additional file {path}"))?;
    let in_scratch = job
        .scratch_paths
        .iter()
        .any(|s| path.starts_with(&format!("{s}/")));
    if in_scratch {
        own(&at(path), BUILD_UID, BUILD_GID, 0o644)?;
    }
    Ok(())
}
