//! The wire layer: code generated from `protos/` (tonic + prost), and the
//! file descriptor set used by gRPC reflection and the JSON request mapping.
//!
//! Prost types stop at the gRPC edge: everything past the service wrappers
//! works on the validated domain types in [`crate::castore`] and [`crate::executor`].

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
    /// `snix.store.v1`: path metadata for the Nix front.
    pub mod store {
        pub mod v1 {
            tonic::include_proto!("snix.store.v1");
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
pub use snix::store::v1 as snix_store;
pub use tvix::build::v1 as tvix_build;
pub use tvix::castore::v1 as tvix_castore;

/// Encoded `FileDescriptorSet` of every proto above.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");

/// The protobuf codec of every kiln service: prost's, except that a message
/// that does not decode is the client's fault (INVALID_ARGUMENT naming the
/// problem), not INTERNAL as prost's codec reports it.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::ProstCodec;

    /// prost encoding with client-error decoding failures.
    #[derive(Debug)]
    pub struct StrictCodec<E, D>(ProstCodec<E, D>, PhantomData<(E, D)>);

    impl<E, D> Default for StrictCodec<E, D> {
        fn default() -> Self {
            Self(ProstCodec::default(), PhantomData)
        }
    }

    impl<E, D> Codec for StrictCodec<E, D>
    where
        E: prost::Message + Send + 'static,
        D: prost::Message + Default + Send + 'static,
    {
        type Encode = E;
        type Decode = D;
        type Encoder = <ProstCodec<E, D> as Codec>::Encoder;
        type Decoder = StrictDecoder<<ProstCodec<E, D> as Codec>::Decoder>;

        fn encoder(&mut self) -> Self::Encoder {
            self.0.encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            StrictDecoder(self.0.decoder())
        }
    }

    /// Wraps prost's decoder, turning its INTERNAL into INVALID_ARGUMENT.
    #[derive(Debug)]
    pub struct StrictDecoder<T>(T);

    impl<T: Decoder<Error = Status>> Decoder for StrictDecoder<T> {
        type Item = T::Item;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
            self.0.decode(src).map_err(|s| match s.code() {
                Code::Internal => {
                    Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
                }
                _ => s,
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
