//! The protobuf codec of `SMService`: prost's, with two guards in front of decoding (contract
//! R-BAD-1, R-BAD-2).
//!
//! - **Decoded size.** A message's decoded form can be far larger than its wire form: an empty
//!   element of a repeated message field is two bytes on the wire and a whole struct in memory
//!   (about 100 times more). Before decoding, a message larger than [`SCAN_FROM`] bytes is
//!   walked with the schema (which fields are messages, from the compiled descriptor set) and
//!   the messages it holds are counted. Each costs [`MESSAGE_COST`] bytes in the estimate; a
//!   message whose estimate exceeds [`INFLATION`] times its wire size is refused with
//!   `RESOURCE_EXHAUSTED` before prost allocates anything.
//! - **Undecodable bytes** (invalid UTF-8 in a string, a truncated field) are the peer's
//!   error: `INVALID_ARGUMENT` naming the field, where prost's codec says `INTERNAL`.

use std::{collections::HashMap, marker::PhantomData, sync::OnceLock};

use prost::{
    Message,
    bytes::Buf,
    encoding::{WireType, decode_key, decode_varint},
};
use prost_types::{FileDescriptorSet, field_descriptor_proto::Type};
use smcontroller_api::SmProtocol;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

/// Messages up to this size are decoded without a scan: even made of nothing but empty
/// elements, they cannot inflate past [`INFLATION`] times [`SCAN_FROM`].
pub const SCAN_FROM: usize = 4 * 1024;
/// What one message nested in another is taken to cost once decoded, bytes (a prost struct
/// with a few strings and vectors; `InstanceStatus` is about 200).
pub const MESSAGE_COST: usize = 128;
/// How many times its wire size a message may take once decoded, by the estimate. A real
/// node's messages stay well under 8; a message of empty elements is at about 64.
pub const INFLATION: usize = 16;
/// The start of the status message of a refusal for decoded size, so the service can count it.
pub(crate) const DECODED_SIZE_REFUSAL: &str = "message would decode to";
/// The start of the status message of an undecodable message.
pub(crate) const UNDECODABLE: &str = "undecodable message:";

/// The codec `tonic-prost-build` is told to use (see `build.rs`): prost's encoder, and
/// [`GuardedDecoder`].
#[derive(Debug, Clone)]
pub struct GuardedCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for GuardedCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for GuardedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder { _type: PhantomData }
    }
}

/// Decodes `U` after the decoded-size guard; decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct GuardedDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for GuardedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let wire = buf.remaining();
        if wire > SCAN_FROM {
            // The whole message is in one contiguous chunk (tonic collects it before decoding);
            // if it ever is not, the guard falls back to decoding unguarded rather than failing.
            let chunk = buf.chunk();
            let (protocol, name) = full_name::<U>();
            if chunk.len() == wire
                && let Some(schema) = schema(protocol)
                && let Some(nested) = schema.count_nested(&name, chunk, nested_limit(wire))
            {
                check_inflation(wire, nested)?;
            }
        }
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("{UNDECODABLE} {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Refuses a message of `wire` bytes holding `nested` messages if its decoded estimate is over
/// the inflation bound.
fn check_inflation(wire: usize, nested: usize) -> Result<(), Status> {
    let estimate = wire.saturating_add(nested.saturating_mul(MESSAGE_COST));
    let bound = wire.saturating_mul(INFLATION);
    if estimate > bound {
        return Err(Status::resource_exhausted(format!(
            "{DECODED_SIZE_REFUSAL} about {estimate} bytes ({nested} nested messages in \
             {wire} bytes), over {INFLATION} times its size on the wire; refused"
        )));
    }
    Ok(())
}

/// The wire revision and protobuf full name of a message type of this crate, from its Rust
/// path: types of the 9.1 tree (`proto::v91`) are walked with the 9.1 schema, the others with
/// 9.0's. prost keeps the proto names but for the `SM` prefix, which it writes `Sm`.
fn full_name<U>() -> (SmProtocol, String) {
    let path = std::any::type_name::<U>();
    let protocol = if path.contains("::v91::") {
        SmProtocol::V9_1
    } else {
        SmProtocol::V9_0
    };
    let rust = path.rsplit("::").next().unwrap_or_default();
    let proto = match rust.strip_prefix("Sm") {
        Some(rest) if rest.ends_with("Messages") => format!("SM{rest}"),
        _ => rust.to_owned(),
    };
    (protocol, format!(".servicemanager.v5.{proto}"))
}

/// Which fields of each message type are messages themselves: all the scan needs, as tables
/// indexed by type so that the walk looks nothing up by name.
#[derive(Debug, Default)]
struct Schema {
    /// Message full name (`.package.Name`) to its index in `types`.
    index: HashMap<String, usize>,
    /// Each message type's message-typed fields: number to the field type's index, or `None`
    /// for a type the set does not describe (counted, not walked).
    types: Vec<Vec<(u32, Option<usize>)>>,
}

/// How deep the scan follows nested messages (prost's own recursion limit is 100).
const MAX_DEPTH: usize = 100;

/// The schema of a wire revision, read once from its compiled descriptor set.
fn schema(protocol: SmProtocol) -> Option<&'static Schema> {
    static SCHEMA_90: OnceLock<Option<Schema>> = OnceLock::new();
    static SCHEMA_91: OnceLock<Option<Schema>> = OnceLock::new();
    let cell = match protocol {
        SmProtocol::V9_0 => &SCHEMA_90,
        SmProtocol::V9_1 => &SCHEMA_91,
    };
    cell.get_or_init(|| {
        let set = FileDescriptorSet::decode(crate::proto::file_descriptor_set(protocol)).ok()?;
        let mut named = Vec::new();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                collect(&format!(".{package}"), message, &mut named);
            }
        }
        let index: HashMap<String, usize> = named
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i))
            .collect();
        let types = named
            .into_iter()
            .map(|(_, fields)| {
                fields
                    .into_iter()
                    .map(|(number, type_name)| (number, index.get(&type_name).copied()))
                    .collect()
            })
            .collect();
        Some(Schema { index, types })
    })
    .as_ref()
}

/// Every message type under `scope` (nested ones too), with its message-typed fields by name.
fn collect(
    scope: &str,
    message: &prost_types::DescriptorProto,
    out: &mut Vec<(String, Vec<(u32, String)>)>,
) {
    let name = format!("{scope}.{}", message.name());
    let fields = message
        .field
        .iter()
        .filter(|f| f.r#type() == Type::Message)
        .filter_map(|f| Some((u32::try_from(f.number()).ok()?, f.type_name().to_owned())))
        .collect();
    for nested in &message.nested_type {
        collect(&name, nested, out);
    }
    out.push((name, fields));
}

impl Schema {
    /// How many messages `bytes` (a `type_name` on the wire) holds, at every depth, counting
    /// no further than just past `limit`; `None` if the type is unknown or the bytes do not
    /// parse (prost then says what is wrong).
    fn count_nested(&self, type_name: &str, bytes: &[u8], limit: usize) -> Option<usize> {
        let &root = self.index.get(type_name)?;
        let mut count = 0;
        self.walk(root, bytes, 0, &mut count, limit)
            .then_some(count)
    }

    /// Walks `bytes` of type `ty`; `false` if they do not parse. Stops (parsed so far) once
    /// `count` is over `limit`.
    fn walk(
        &self,
        ty: usize,
        mut bytes: &[u8],
        depth: usize,
        count: &mut usize,
        limit: usize,
    ) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        let fields = &self.types[ty];
        while bytes.has_remaining() && *count <= limit {
            let Ok((number, wire_type)) = decode_key(&mut bytes) else {
                return false;
            };
            match wire_type {
                WireType::Varint => {
                    if decode_varint(&mut bytes).is_err() {
                        return false;
                    }
                }
                WireType::SixtyFourBit => {
                    if bytes.remaining() < 8 {
                        return false;
                    }
                    bytes.advance(8);
                }
                WireType::ThirtyTwoBit => {
                    if bytes.remaining() < 4 {
                        return false;
                    }
                    bytes.advance(4);
                }
                WireType::LengthDelimited => {
                    let Ok(len) = decode_varint(&mut bytes) else {
                        return false;
                    };
                    let Ok(len) = usize::try_from(len) else {
                        return false;
                    };
                    if bytes.remaining() < len {
                        return false;
                    }
                    let (inner, rest) = bytes.split_at(len);
                    bytes = rest;
                    if let Some(&(_, child)) = fields.iter().find(|(n, _)| *n == number) {
                        *count += 1;
                        if let Some(child) = child
                            && !inner.is_empty()
                            && !self.walk(child, inner, depth + 1, count, limit)
                        {
                            return false;
                        }
                    }
                }
                WireType::StartGroup | WireType::EndGroup => return false,
            }
        }
        true
    }
}

/// How many nested messages a message of `wire` bytes may hold before its estimate is over the
/// bound (see [`check_inflation`]).
fn nested_limit(wire: usize) -> usize {
    wire.saturating_mul(INFLATION - 1) / MESSAGE_COST
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::common::v2::InstanceIdent;
    use crate::proto::servicemanager::v5::{
        InstanceStatus, NodeInstancesStatus, SmOutgoingMessages,
        sm_outgoing_messages::SmOutgoingMessage,
    };

    /// `n` instance statuses: empty ones, or small but real ones (short ids, as a test SM
    /// might send).
    fn instances(n: usize, real: bool) -> SmOutgoingMessages {
        let status = |i: usize| {
            if !real {
                return InstanceStatus::default();
            }
            InstanceStatus {
                instance: Some(InstanceIdent {
                    item_id: "item1".into(),
                    subject_id: "subj1".into(),
                    instance: i as u64,
                    ..InstanceIdent::default()
                }),
                version: "1.0.0".into(),
                runtime_id: "crun".into(),
                state: "active".into(),
                ..InstanceStatus::default()
            }
        };
        SmOutgoingMessages {
            sm_outgoing_message: Some(SmOutgoingMessage::NodeInstancesStatus(
                NodeInstancesStatus {
                    instances: (0..n).map(status).collect(),
                },
            )),
        }
    }

    #[test]
    fn the_scan_counts_every_nested_message() {
        let schema = schema(SmProtocol::V9_0).expect("the descriptor set parses");
        let bytes = instances(1000, false).encode_to_vec();
        // The oneof member, and each instance.
        assert_eq!(
            schema.count_nested(".servicemanager.v5.SMOutgoingMessages", &bytes, usize::MAX),
            Some(1001)
        );
        // And each instance's ident.
        let bytes = instances(1000, true).encode_to_vec();
        assert_eq!(
            schema.count_nested(".servicemanager.v5.SMOutgoingMessages", &bytes, usize::MAX),
            Some(2001)
        );
    }

    #[test]
    fn r_bad_2_empty_elements_are_refused_and_real_ones_pass() {
        let schema = schema(SmProtocol::V9_0).unwrap();
        let bomb = instances(100_000, false).encode_to_vec();
        let nested = schema
            .count_nested(
                ".servicemanager.v5.SMOutgoingMessages",
                &bomb,
                nested_limit(bomb.len()),
            )
            .unwrap();
        assert_eq!(
            nested,
            nested_limit(bomb.len()) + 1,
            "the scan stops as soon as the bound is passed"
        );
        let refused = check_inflation(bomb.len(), nested).expect_err("a decode bomb");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().starts_with(DECODED_SIZE_REFUSAL));

        let real = instances(10_000, true).encode_to_vec();
        let nested = schema
            .count_nested(
                ".servicemanager.v5.SMOutgoingMessages",
                &real,
                nested_limit(real.len()),
            )
            .unwrap();
        check_inflation(real.len(), nested).expect("real instance statuses pass");
    }

    #[test]
    fn truncated_bytes_are_left_to_prost() {
        let schema = schema(SmProtocol::V9_0).unwrap();
        let mut bytes = instances(10, true).encode_to_vec();
        bytes.truncate(bytes.len() - 3);
        assert_eq!(
            schema.count_nested(".servicemanager.v5.SMOutgoingMessages", &bytes, usize::MAX),
            None
        );
    }

    #[test]
    fn every_decoded_type_has_a_name_in_the_schema_of_its_revision() {
        use crate::proto::{servicemanager::v5 as pb, v91::servicemanager::v5 as pb91};
        for (protocol, name) in [
            full_name::<SmOutgoingMessages>(),
            full_name::<pb::SmIncomingMessages>(),
            full_name::<pb::BlobsInfosRequest>(),
            full_name::<pb::BlobsInfos>(),
            full_name::<pb91::SmIncomingMessages>(),
            full_name::<pb91::GetNodeNetworkParamsRequest>(),
            full_name::<pb91::AllocateInstanceNetworkRequest>(),
            full_name::<pb91::ReleaseInstanceNetworkRequest>(),
            full_name::<pb91::ReleaseNodeNetworkRequest>(),
            full_name::<pb91::SubscribeInstanceNetworkUpdatesRequest>(),
            full_name::<pb91::SyncNetworkStateRequest>(),
            full_name::<pb91::InstanceNetworkUpdateNotification>(),
        ] {
            let schema = schema(protocol).unwrap();
            assert!(schema.index.contains_key(&name), "{protocol}: {name}");
        }
        assert_eq!(full_name::<pb91::SmIncomingMessages>().0, SmProtocol::V9_1);
        assert_eq!(full_name::<SmOutgoingMessages>().0, SmProtocol::V9_0);
    }

    #[test]
    fn r_rev_1_each_schema_has_its_revision_of_instance_info() {
        let message_fields = |protocol| {
            let schema = schema(protocol).unwrap();
            let name = |ty: Option<usize>| {
                schema
                    .index
                    .iter()
                    .find(|(_, i)| Some(**i) == ty)
                    .map(|(name, _)| name.clone())
                    .unwrap_or_default()
            };
            let mut fields: Vec<_> = schema.types[schema.index[".servicemanager.v5.InstanceInfo"]]
                .iter()
                .map(|(n, t)| (*n, name(*t)))
                .collect();
            fields.sort();
            fields
        };
        let v90 = message_fields(SmProtocol::V9_0);
        let v91 = message_fields(SmProtocol::V9_1);
        assert!(v90.contains(&(12, ".servicemanager.v5.NetworkParameters".into())));
        assert!(v90.contains(&(13, ".servicemanager.v5.MonitoringParameters".into())));
        assert!(v91.contains(&(12, ".servicemanager.v5.MonitoringParameters".into())));
        assert!(!v91.iter().any(|(n, _)| *n == 13), "{v91:?}");
    }
}
