//! The executor: a validated [`BuildRequest`] runs in a fresh VM and ends
//! as a [`BuildOutcome`] or a [`BuildError`], with its [`events`] on the way.
//! Nothing here knows the wire: `crate::grpc` converts in and out.
//!
//! [`run`] is the [`Executor`] and its top-level steps. The steps, in
//! order, each in its module: [`plan`] (constraints, VM
//! size), [`inputs`] (checked, then materialised), [`admission`] (VM slots,
//! guest memory, the queue), the VM session (`crate::vmm::session`),
//! [`supervise`] (the agent's frames into the build log), [`scratch`] (the
//! space limit while the build runs), [`collect`] (outputs found, scanned
//! by [`refscan`], ingested). [`workspace`] is the build's directory;
//! [`pool`] keeps VMs booted ahead of their builds (`--warm-vms`).

pub mod admission;
pub mod collect;
pub mod config;
pub mod error;
pub mod events;
pub mod inputs;
pub mod paths;
pub mod plan;
pub mod pool;
pub mod refscan;
pub mod request;
pub mod result_cache;
pub mod run;
pub mod scratch;
pub mod supervise;
pub mod workspace;

pub use error::{BuildError, Precondition};
pub use request::BuildRequest;
pub use run::{BuildOutcome, BuildResult, BuiltOutput, ClientLimits, Executor, ExecutorConfig};

#[cfg(test)]
mod pool_tests;
#[cfg(test)]
pub(crate) mod tests;
