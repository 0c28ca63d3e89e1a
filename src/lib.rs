//! kiln: a gRPC build executor that runs every build in a fresh microVM.
//!
//! Where a request goes, in order:
//! - [`proto`]: the wire layer (tvix/snix build and castore, kiln's events).
//! - [`server`]: one tonic server carrying every service.
//! - [`grpc`]: the build faces (`DoBuild` in both layouts, `BuildEvents`);
//!   wire requests become the domain [`executor::BuildRequest`] here, and
//!   results, events and errors become wire messages here.
//! - [`executor`]: plans the VM, admits it, materialises inputs, runs it
//!   through a [`vmm::session`], collects and ingests the outputs.
//! - [`vmm`]: VMM backends (QEMU microvm, cloud-hypervisor), host detection
//!   and virtiofsd.
//! - [`guest_image`]: kernel artifacts and the initramfs (agent + job).
//! - [`hostfs`]: handle-based access to what builds wrote on the host (never
//!   through a symlink, never out of the build's tree).
//! - [`castore`]: the content-addressed store the inputs come from and the
//!   outputs go to.
//! - [`nix`]: Nix derivations, NAR hashing (`kiln build --drv`).
//! - [`metrics`]: Prometheus metrics of builds, VMs and the castore
//!   (`kiln serve --metrics-listen`).
//! - [`db`]: PostgreSQL, when several hosts share one store
//!   (`--database`).
//! - [`records`]: build records and hosts shared through the database, so
//!   any host answers for a build another runs.
//! - [`tenant`]: who a build, a log or stored data belongs to.
//! - [`cli`]: the `kiln` subcommands other than `serve`.
//! - [`auth`], [`tls`], [`client`]: who may call the server (TLS, client
//!   certificates, bearer tokens) and how clients connect with credentials.

#![warn(missing_docs)]

/// Says that a unit test skipped and why, as `SKIPPED: …` written straight
/// to stderr, past libtest's capture, so `make test` shows it.
#[cfg(test)]
macro_rules! test_skip {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {}", format_args!($($arg)*));
    }};
}

pub mod auth;
pub mod castore;
pub mod cli;
pub mod client;
pub mod db;
pub mod executor;
pub mod grpc;
pub mod guest_image;
pub mod hostfs;
pub mod metrics;
pub mod nix;
pub mod proto;
pub mod records;
pub mod server;
pub mod tenant;
pub mod tls;
pub mod vmm;
