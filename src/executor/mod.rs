//! Builds: the validated request, the executor that runs it in a fresh VM,
//! and the gRPC services in front of it.

pub mod admission;
pub mod collect;
pub mod config;
pub mod error;
pub mod events;
pub mod executor;
pub mod paths;
pub mod plan;
pub mod refscan;
pub mod request;
pub mod scratch;
pub mod supervise;
pub mod workspace;

pub use error::BuildError;
pub use executor::{BuildOutcome, Executor, ExecutorConfig};
pub use request::BuildRequest;
