//! The gRPC faces of the executor and the conversions at the wire edge.
//!
//! Prost types stop here. Inwards, every request becomes the domain
//! [`crate::executor::BuildRequest`] ([`request`]); outwards, the
//! executor's results, events and errors become wire messages and one
//! status mapping ([`build_service`]).

pub mod build_service;
pub mod request;

pub use build_service::{BuildService, BUILD_ID_HEADER};
