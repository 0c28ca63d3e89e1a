//! The gRPC faces of the executor and the conversions at the wire edge.
//!
//! Prost types stop here. Inwards, both request layouts become the domain
//! [`crate::executor::BuildRequest`] ([`request`]); outwards, the
//! executor's outcomes ([`answer`]), events ([`events`]) and errors
//! ([`status`], the one status-code table) become wire messages.
//!
//! - [`build_service`]: `DoBuild` in the `tvix.build.v1` and `snix.build.v1`
//!   layouts;
//! - [`events`]: `kiln.v1.BuildEvents` (`Submit`, `Watch`);
//! - [`admin`]: `kiln.v1.Admin` (list, cancel, logs), for operators.

pub mod admin;
pub mod answer;
pub mod build_service;
pub mod events;
pub mod request;
pub mod status;

pub use build_service::{BuildService, BUILD_ID_HEADER};
