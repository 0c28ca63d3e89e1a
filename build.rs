//! Compiles the wire contract in `protos/` with tonic/prost and writes the
//! file descriptor set that gRPC reflection and the JSON request mapping use.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "protos/tvix/castore/v1/castore.proto",
    "protos/tvix/castore/v1/rpc_blobstore.proto",
    "protos/tvix/castore/v1/rpc_directory.proto",
    "protos/snix/castore/v1/castore.proto",
    "protos/snix/castore/v1/rpc_blobstore.proto",
    "protos/snix/castore/v1/rpc_directory.proto",
    "protos/tvix/build/v1/build.proto",
    "protos/tvix/build/v1/rpc_build.proto",
    "protos/snix/build/v1/build.proto",
    "protos/snix/build/v1/rpc_build.proto",
    "protos/snix/store/v1/pathinfo.proto",
    "protos/snix/store/v1/rpc_pathinfo.proto",
    "protos/kiln/v1/events.proto",
    "protos/kiln/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kiln_descriptor.bin"))
        .bytes(".")
        .codec_path("crate::proto::codec::StrictCodec")
        .compile_protos(PROTOS, &["protos"])?;
    println!("cargo:rerun-if-changed=protos");
    Ok(())
}
