//! Compiles `proto/smcontroller/admin/v1/admin.proto` with protox (pure Rust, no system
//! `protoc`, R-SHAPE-2). The `servicemanager.v5` and `common.v2` messages it uses are not
//! generated again: they map onto `smcontroller-grpc`'s, so its conversions apply.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let admin = proto_root.join("smcontroller/admin/v1/admin.proto");
    for file in [
        &admin,
        &proto_root.join("common/v2/common.proto"),
        &proto_root.join("servicemanager/v5/servicemanager.proto"),
    ] {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile([&admin], [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("admin_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(
            ".servicemanager.v5",
            "::smcontroller_grpc::proto::servicemanager::v5",
        )
        .extern_path(".common.v2", "::smcontroller_grpc::proto::common::v2")
        .compile_fds(descriptors)?;
    Ok(())
}
