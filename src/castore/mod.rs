//! The content-addressed store (tvix/snix castore format, BLAKE3).
//!
//! Where things are:
//! - Domain types, validated at the edge: [`B3Digest`], [`PathComponent`],
//!   [`SymlinkTarget`], [`Node`], [`Directory`] (whose docs state the
//!   `DirectoryNode.size` convention: kiln writes snix's, 2 × entries + child
//!   sizes, for interop with snix's validating services, and accepts any
//!   size a client sends); conversions
//!   from and to both wire packages (`tvix.castore.v1`, `snix.castore.v1`)
//!   in [`wire`].
//! - Storage behind two narrow traits, one file per backend:
//!   [`blob::BlobService`] (embedded files, gRPC) and
//!   [`directory_service::DirectoryService`] (embedded redb, gRPC), bundled
//!   in a [`Store`] and chosen by address in [`mod@from_addr`].
//! - [`grpc_server`]: any [`Store`] as the four castore gRPC services, each
//!   call served from the caller's view ([`scoped`]: a tenant sees what it
//!   put or its builds produced, and what is reachable from that).
//! - [`mod@ingest`] (host path to nodes) and [`mod@materialise`] (nodes to host path).

pub mod blob;
pub mod digest;
pub mod directory;
pub mod directory_service;
pub mod errors;
pub mod from_addr;
pub mod grpc_server;
pub mod ingest;
pub mod materialise;
pub mod node;
pub mod scoped;
pub mod wire;

pub use digest::B3Digest;
pub use directory::Directory;
pub use errors::{ValidationError, Violation};
pub use node::{Node, PathComponent, SymlinkTarget};
pub use wire::WireNode;

use std::sync::Arc;

/// A castore: where blobs and directories live. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The blob backend.
    pub blobs: Arc<dyn blob::BlobService>,
    /// The directory backend.
    pub directories: Arc<dyn directory_service::DirectoryService>,
}

pub use from_addr::from_addr;
pub use grpc_server::{grpc_services, grpc_services_scoped, CastoreServices};
pub use ingest::{ingest, IngestMode};
pub use materialise::materialise;
