//! Starting the agent's children the cheap way: `clone(CLONE_VM |
//! CLONE_VFORK)` on a stack of their own, as `posix_spawn` does, instead of
//! `fork`.
//!
//! A fork copies the agent's page tables and then pays a copy-on-write
//! fault for every page either side touches; under TCG each of those is
//! emulated, and a fork plus exec cost 10–25 ms of a build's start. A
//! child that shares the agent's memory copies nothing. The price is
//! discipline in the child, which every caller keeps:
//!
//! - the agent is suspended until the child execs or exits
//!   (`CLONE_VFORK`), so nothing changes the memory under the child, and
//!   the child changes nothing the agent relies on: it only makes system
//!   calls, on values prepared before the clone, then execs or `_exit`s;
//! - it changes its ids with raw system calls, never glibc's wrappers,
//!   which in a multi-threaded process would signal the threads of the
//!   memory it shares (the agent has none, but the child need not rely on
//!   that);
//! - it never returns into the agent's code: the closure ends in `execve`
//!   or `_exit`.

use nix::sched::{clone, CloneFlags};
use nix::unistd::Pid;

/// The child's stack. Its closures make a few system calls through `nix`,
/// whose path arguments live on the stack (under 1 KiB each).
const STACK_BYTES: usize = 256 * 1024;

/// Runs `child` in a new process sharing the agent's memory and returns
/// its pid once it has exec'd or exited (its status is the caller's to
/// reap). `child` must follow the rules in the module docs.
pub fn spawn(child: impl FnMut() -> isize) -> nix::Result<Pid> {
    let mut stack = vec![0u8; STACK_BYTES];
    let flags = CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK;
    // SAFETY: the child runs on `stack`, which outlives it: with
    // CLONE_VFORK the call returns only after the child exec'd or exited,
    // so it no longer uses the stack or the closure. The closure keeps the
    // module's rules (system calls only, then exec or _exit), so sharing
    // the agent's memory is safe while the agent is suspended.
    unsafe { clone(Box::new(child), &mut stack, flags, Some(libc::SIGCHLD)) }
}

/// Makes the calling process the build user: no supplementary groups,
/// then gid, then uid, each by the raw system call (see the module docs).
pub fn become_user(uid: u32, gid: u32) -> nix::Result<()> {
    // SAFETY: setgroups with a count of 0 reads no list.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
    nix::errno::Errno::result(rc)?;
    // SAFETY: setgid and setuid take plain integers.
    let rc = unsafe { libc::syscall(libc::SYS_setgid, gid) };
    nix::errno::Errno::result(rc)?;
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_setuid, uid) };
    nix::errno::Errno::result(rc).map(drop)
}
