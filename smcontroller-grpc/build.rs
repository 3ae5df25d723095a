//! Compiles `proto/` with protox (pure Rust, no system `protoc`, R-SHAPE-2) and generates the
//! prost messages and the tonic clients and servers from the resulting descriptor sets.
//!
//! Two wire revisions of `servicemanager.v5` (R-REV-1), in two runs, because both define
//! `servicemanager.v5.FirewallRule` and one protoc run refuses the duplicate:
//! - 9.0, `proto/servicemanager/v5/servicemanager.proto`: the module tree every shared type
//!   comes from;
//! - 9.1, `proto/v9.1/servicemanager/v5/{servicemanager,network}.proto`, generated into `v91/`:
//!   only what differs is generated (`SMIncomingMessages`, `UpdateInstances`, `InstanceInfo`,
//!   the `SMService` whose stream carries them) and what is new (`NetworkService` and its
//!   messages); every message both revisions share is mapped onto the 9.0 Rust type
//!   (`extern_path`), so a decoded `SMOutgoingMessages` is one type whatever the revision.

use std::{env, fs, path::PathBuf};

/// The messages of the 9.1 `servicemanager.proto` that differ from 9.0 and are generated anew;
/// its other messages and enums are the 9.0 types.
const DIFFERS_IN_9_1: [&str; 3] = ["SMIncomingMessages", "UpdateInstances", "InstanceInfo"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", proto_root.display());

    // 9.0.
    let files = [
        proto_root.join("common/v2/common.proto"),
        proto_root.join("servicemanager/v5/servicemanager.proto"),
    ];
    let descriptors = protox::compile(&files, [&proto_root])?;
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

    // 9.1: its own directory first on the include path, so its servicemanager.proto is found
    // before the 9.0 one; common/v2 comes from the shared root.
    let v91_root = proto_root.join("v9.1");
    let files = [
        proto_root.join("common/v2/common.proto"),
        v91_root.join("servicemanager/v5/servicemanager.proto"),
        v91_root.join("servicemanager/v5/network.proto"),
    ];
    let descriptors = protox::compile(&files, [&v91_root, &proto_root])?;
    fs::write(
        out_dir.join("smcontroller_descriptor_v91.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let v91_out = out_dir.join("v91");
    fs::create_dir_all(&v91_out)?;
    let mut config = tonic_prost_build::configure()
        .codec_path("crate::codec::GuardedCodec")
        .build_client(true)
        .build_server(true)
        .out_dir(&v91_out)
        .extern_path(".common.v2", "crate::proto::common::v2");
    let shared = descriptors
        .file
        .iter()
        .filter(|file| {
            file.name()
                .ends_with("servicemanager/v5/servicemanager.proto")
        })
        .flat_map(|file| {
            let messages = file.message_type.iter().map(|m| m.name().to_owned());
            let enums = file.enum_type.iter().map(|e| e.name().to_owned());
            messages.chain(enums).collect::<Vec<_>>()
        })
        .filter(|name| !DIFFERS_IN_9_1.contains(&name.as_str()));
    for name in shared {
        config = config.extern_path(
            format!(".servicemanager.v5.{name}"),
            format!(
                "crate::proto::servicemanager::v5::{}",
                heck::ToUpperCamelCase::to_upper_camel_case(name.as_str())
            ),
        );
    }
    // network.proto defines FirewallRule again, field for field as 9.0 does: one Rust type.
    config = config.extern_path(
        ".servicemanager.v5.FirewallRule",
        "crate::proto::servicemanager::v5::FirewallRule",
    );
    config.compile_fds(descriptors)?;
    Ok(())
}
