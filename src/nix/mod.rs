//! Nix derivations and their outputs: what `kiln build --drv` needs to run a
//! `.drv` file the way Nix would, and to prove the result equals Nix's.
//!
//! - [`nixbase32`] and [`store_path`]: Nix's names for things.
//! - [`derivation`]: the ATerm `.drv` format.
//! - [`nar`]: NAR serialisation and hashing of castore trees and host paths.
//! - [`build_request`]: a derivation as a `snix.build.v1.BuildRequest`, with
//!   [`structured_attrs`] for `__structuredAttrs` derivations.
//! - [`closure`]: importing a derivation's inputs from the local Nix store.
//! - [`hash`]: hash algorithms and the forms Nix writes hashes in;
//!   [`fixed_output`]: checking a fixed-output derivation's declared hash.
//! - [`daemon`]: the Nix worker protocol in front of kiln, with
//!   [`path_info`], the metadata it keeps per store path.

pub mod build_request;
pub mod closure;
pub mod daemon;
pub mod derivation;
pub mod fixed_output;
pub mod hash;
pub mod nar;
pub mod nixbase32;
pub mod path_info;
pub mod store_path;
pub mod structured_attrs;

pub use derivation::Derivation;
pub use store_path::StorePath;
