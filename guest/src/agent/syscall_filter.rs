//! The builder's syscall filter: what Nix's sandbox refuses a builder, kiln
//! refuses it too, so the same derivation gives the same bytes.
//!
//! Nix (`filter-syscalls`, on by default) installs a seccomp filter on every
//! builder, and so does the agent, on the builder and everything it spawns:
//!
//! - `chmod`, `fchmod`, `fchmodat` and `fchmodat2` with `S_ISUID` or
//!   `S_ISGID` in the mode fail with `EPERM` and change nothing, so no build
//!   makes a setuid or setgid file (a `chmod 4755 f` leaves `f` as it was);
//! - `setxattr`, `lsetxattr` and `fsetxattr` fail with `ENOTSUP`, so no
//!   build makes extended attributes or ACLs, which a NAR cannot hold;
//! - for the x86_64, i386 (`int 0x80`) and x32 syscall ABIs alike, as Nix
//!   adds both 32-bit ABIs on x86_64 hosts;
//! - everything else is allowed, and `no_new_privs` is set (Nix's default,
//!   `allow-new-privileges = false`).
//!
//! The rules are Nix's (current Nix also refuses reading xattrs; 2.8, the
//! conformance reference, does not, and neither does kiln). The program is
//! compiled by libseccomp, the library Nix uses, so the per-ABI syscall
//! numbers and argument layouts are the library's, not kiln's. It is
//! compiled in the agent before the fork ([`SyscallFilter::compile`]); the
//! forked child only installs it ([`SyscallFilter::install`]: two `prctl`
//! calls, no allocation). Either failing fails the build as an agent
//! failure; a builder never runs unfiltered.

use std::io::{Read, Seek};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use nix::errno::Errno;

use super::error::AgentError;

/// Calls that change a file's mode, with the index of their mode argument.
const MODE_CHANGES: &[(&str, u32)] = &[
    ("chmod", 1),
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
];

/// Calls that set an extended attribute (ACLs are extended attributes).
const XATTR_SETTERS: &[&str] = &["setxattr", "lsetxattr", "fsetxattr"];

/// The ABIs an x86_64 kernel also runs, besides the native one.
const OTHER_ABIS: &[ScmpArch] = &[ScmpArch::X86, ScmpArch::X32];

/// The mode bits no build may set.
const PRIVILEGE_BITS: &[u64] = &[libc::S_ISUID as u64, libc::S_ISGID as u64];

/// Most instructions the kernel accepts in one program (`BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

/// A compiled filter, ready to install.
pub struct SyscallFilter {
    program: Vec<libc::sock_filter>,
}

impl SyscallFilter {
    /// Compiles the filter described in the module docs.
    pub fn compile() -> Result<SyscallFilter, AgentError> {
        let bytes = rules().and_then(export)?;
        let program = decode(&bytes)?;
        Ok(SyscallFilter { program })
    }

    /// Sets `no_new_privs` and installs the filter on the calling thread,
    /// which keeps it across `execve` and hands it to every child. Meant for
    /// a forked child just before exec: it allocates nothing.
    pub fn install(&self) -> Result<(), Errno> {
        let program = libc::sock_fprog {
            // `decode` bounded the length to MAX_INSTRUCTIONS.
            len: self.program.len() as u16,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(Errno::last());
        }
        // SAFETY: `program` points at `self.program`, which outlives the
        // call; the kernel copies the instructions before returning.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
        Ok(())
    }
}

/// The filter as libseccomp rules.
fn rules() -> Result<ScmpFilterContext, AgentError> {
    let failed = |what: String| move |e: libseccomp::error::SeccompError| seccomp(what, e);
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)
        .map_err(failed("creating the seccomp filter".into()))?;
    for &arch in OTHER_ABIS {
        ctx.add_arch(arch)
            .map_err(failed(format!("adding the {arch:?} syscall ABI")))?;
    }
    for &(name, mode_arg) in MODE_CHANGES {
        let call = syscall(name)?;
        for &bit in PRIVILEGE_BITS {
            let sets_bit = ScmpArgCompare::new(mode_arg, ScmpCompareOp::MaskedEqual(bit), bit);
            ctx.add_rule_conditional(ScmpAction::Errno(libc::EPERM), call, &[sets_bit])
                .map_err(failed(format!("refusing {name} with mode bit {bit:o}")))?;
        }
    }
    for &name in XATTR_SETTERS {
        ctx.add_rule(ScmpAction::Errno(libc::ENOTSUP), syscall(name)?)
            .map_err(failed(format!("refusing {name}")))?;
    }
    Ok(ctx)
}

/// A syscall by name; a library too old to know it is an error, never a
/// rule quietly left out.
fn syscall(name: &str) -> Result<ScmpSyscall, AgentError> {
    ScmpSyscall::from_name(name)
        .map_err(|e| seccomp(format!("resolving syscall {name} (libseccomp too old?)"), e))
}

/// The BPF program of `ctx`, as the kernel takes it.
fn export(ctx: ScmpFilterContext) -> Result<Vec<u8>, AgentError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| AgentError::Seccomp { what, source: e }
    };
    let memfd =
        nix::sys::memfd::memfd_create(c"kiln-seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| io("creating a memfd for the filter")(e.into()))?;
    ctx.export_bpf(&memfd)
        .map_err(|e| seccomp("exporting the seccomp program".into(), e))?;
    let mut file = std::fs::File::from(memfd);
    file.rewind().map_err(io("reading the seccomp program"))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io("reading the seccomp program"))?;
    Ok(bytes)
}

/// Decodes `struct sock_filter` records (native endianness, as exported).
fn decode(bytes: &[u8]) -> Result<Vec<libc::sock_filter>, AgentError> {
    const SIZE: usize = std::mem::size_of::<libc::sock_filter>();
    let count = bytes.len() / SIZE;
    if !bytes.len().is_multiple_of(SIZE) || count == 0 || count > MAX_INSTRUCTIONS {
        return Err(AgentError::Seccomp {
            what: "checking the exported seccomp program".into(),
            source: std::io::Error::other(format!(
                "{} bytes is not 1 to {MAX_INSTRUCTIONS} instructions of {SIZE} bytes",
                bytes.len()
            )),
        });
    }
    Ok(bytes
        .chunks_exact(SIZE)
        .map(|b| libc::sock_filter {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

fn seccomp(what: String, e: libseccomp::error::SeccompError) -> AgentError {
    AgentError::Seccomp {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
#[path = "syscall_filter/tests.rs"]
mod tests;
