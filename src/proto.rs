//! The wire layer: code generated from `protos/` (tonic + prost), and the
//! file descriptor set used by gRPC reflection and the JSON request mapping.
//!
//! Prost types stop at the gRPC edge: everything past the service wrappers
//! works on the validated domain types in [`crate::castore`] and [`crate::build`].

#![allow(missing_docs, clippy::all)]

/// `tvix.*`: the seed's packages.
pub mod tvix {
    /// `tvix.castore.v1`: the castore as the seed's clients speak it.
    pub mod castore {
        pub mod v1 {
            tonic::include_proto!("tvix.castore.v1");
        }
    }
    /// `tvix.build.v1`: the seed's build service layout.
    pub mod build {
        pub mod v1 {
            tonic::include_proto!("tvix.build.v1");
        }
    }
}

/// `snix.*`: today's packages, identical castore wire format.
pub mod snix {
    /// `snix.castore.v1`.
    pub mod castore {
        pub mod v1 {
            tonic::include_proto!("snix.castore.v1");
        }
    }
    /// `snix.build.v1`.
    pub mod build {
        pub mod v1 {
            tonic::include_proto!("snix.build.v1");
        }
    }
}

/// `kiln.v1`: kiln's build event streaming extension.
pub mod kiln {
    pub mod v1 {
        tonic::include_proto!("kiln.v1");
    }
}

pub use kiln::v1 as kiln_v1;
pub use snix::build::v1 as snix_build;
pub use snix::castore::v1 as snix_castore;
pub use tvix::build::v1 as tvix_build;
pub use tvix::castore::v1 as tvix_castore;

/// Encoded `FileDescriptorSet` of every proto above.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
