//! Compiles `proto/` with protox (pure Rust, no system `protoc`, R-SHAPE-2) and generates the
//! prost messages and the tonic client and server from the resulting descriptor set.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        proto_root.join("common/v2/common.proto"),
        proto_root.join("servicemanager/v5/servicemanager.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("smcontroller_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    // Our codec: prost's, with a guard against decode bombs and INVALID_ARGUMENT for
    // undecodable messages (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::GuardedCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
