//! The one harness of kiln's integration tests. Each test file that needs it
//! says `mod harness;`.
//!
//! - [`gate`]: whether a test can run here; `SKIPPED: <test>: <why>` where
//!   `cargo test` shows it, or a failure under `KILN_REQUIRE_VM_TESTS`.
//! - [`server`]: a kiln server in this process booting real VMs.
//! - [`serve`]: the `kiln serve` binary as a child process.
//! - [`guest`]: one VM booted without the executor, for the guest's view.
//! - [`fixtures`]: the busybox toolset and the Nix-shaped test request.
//! - [`events`]: following a build's events.
//! - [`procs`]: what a server left behind (directories, processes).
//! - [`sshd`]: a real OpenSSH server on loopback for `ssh-ng://` tests.
//! - [`postgres`]: a real PostgreSQL server on loopback (`--database`).
//! - [`haproxy`]: a real HAProxy balancing gRPC over kiln hosts.
//! - [`garage`]: a real Garage (S3) cluster on loopback (`--blob-store`).

// Each test file uses part of the harness.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub mod events;
pub mod fixtures;
pub mod garage;
pub mod gate;
pub mod guest;
pub mod haproxy;
pub mod netns;
pub mod postgres;
pub mod procs;
pub mod serve;
pub mod server;
pub mod sshd;

pub use events::{submit_until_log, LogBytes};
pub use fixtures::{busybox_tree, nix_request, syscall_probe, BUSYBOX, PROBE};
pub use gate::{can_run, python_unavailable, skip, vm_tests_can_run, vm_unavailable};
pub use procs::{build_leftovers, build_processes, leftovers, processes_mentioning, rss_kib};
pub use server::{start, Options, TestServer};
