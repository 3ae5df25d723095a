//! The canonical protobuf JSON mapping of the admin API's messages (and the
//! `servicemanager.v5` ones it carries), read from the compiled descriptors with
//! `prost-reflect`: what `smctl --json` prints and what its input files hold.
//!
//! Output uses the proto field names (`node_id`, `runtime_id`) and writes every field, also
//! those at their default, so that scripts see a stable shape. Input accepts both the proto
//! names and the JSON (lowerCamelCase) names.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use crate::proto::FILE_DESCRIPTOR_SET;

/// Why a JSON document is not the message it should be.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The message is not in the admin API's descriptors (a bug).
    #[error("unknown message type {0}")]
    UnknownType(String),
    /// The document does not parse as the message (names the field where it can).
    #[error("not a valid {message}: {reason}")]
    Invalid {
        /// The message's full name.
        message: String,
        /// What the parser said.
        reason: String,
    },
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the admin descriptor set compiled by build.rs decodes")
    })
}

fn descriptor(full_name: &str) -> Result<MessageDescriptor, JsonError> {
    pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| JsonError::UnknownType(full_name.to_owned()))
}

/// `message` (of the protobuf type `full_name`, e.g. `smcontroller.admin.v1.Node`) as JSON.
pub fn to_json<M: prost::Message>(
    message: &M,
    full_name: &str,
) -> Result<serde_json::Value, JsonError> {
    let desc = descriptor(full_name)?;
    let invalid = |reason: String| JsonError::Invalid {
        message: full_name.to_owned(),
        reason,
    };
    let dynamic = DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .map_err(|e| invalid(e.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| invalid(e.to_string()))
}

/// A message of the protobuf type `full_name` from a JSON value.
pub fn from_json<M: prost::Message + Default>(
    value: serde_json::Value,
    full_name: &str,
) -> Result<M, JsonError> {
    let desc = descriptor(full_name)?;
    let invalid = |reason: String| JsonError::Invalid {
        message: full_name.to_owned(),
        reason,
    };
    let dynamic = match DynamicMessage::deserialize(desc.clone(), value.clone()) {
        Ok(dynamic) => dynamic,
        Err(e) => return Err(invalid(offending_field(&desc, &value, e.to_string()))),
    };
    dynamic.transcode_to().map_err(|e| invalid(e.to_string()))
}

/// The parser's message, prefixed with the (top-level) field that fails on its own, found by
/// parsing each field of the object alone.
fn offending_field(desc: &MessageDescriptor, value: &serde_json::Value, reason: String) -> String {
    if let serde_json::Value::Object(fields) = value {
        for (key, field) in fields {
            let alone =
                serde_json::Value::Object([(key.clone(), field.clone())].into_iter().collect());
            if let Err(e) = DynamicMessage::deserialize(desc.clone(), alone) {
                return format!("field {key:?}: {e}");
            }
        }
    }
    reason
}

/// Messages of the type `full_name` from a JSON document that holds either one message or an
/// array of them. Errors name the array index.
pub fn list_from_json<M: prost::Message + Default>(
    text: &str,
    full_name: &str,
) -> Result<Vec<M>, JsonError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| JsonError::Invalid {
        message: full_name.to_owned(),
        reason: e.to_string(),
    })?;
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                from_json(item, full_name).map_err(|e| match e {
                    JsonError::Invalid { message, reason } => JsonError::Invalid {
                        message: format!("{message} (item {i})"),
                        reason,
                    },
                    other => other,
                })
            })
            .collect(),
        one => Ok(vec![from_json(one, full_name)?]),
    }
}

#[cfg(test)]
mod tests {
    use smcontroller_grpc::proto::servicemanager::v5 as sm;

    use super::*;

    #[test]
    fn a_message_round_trips_through_json() {
        let info = sm::UpdateNetworkParameters {
            network_id: "net".into(),
            subnet: "10.0.0.0/24".into(),
            ip: "10.0.0.2".into(),
            vlan_id: 7,
        };
        let json = to_json(&info, "servicemanager.v5.UpdateNetworkParameters").unwrap();
        assert_eq!(json["network_id"], "net");
        let back: Vec<sm::UpdateNetworkParameters> = list_from_json(
            &format!("[{json}]"),
            "servicemanager.v5.UpdateNetworkParameters",
        )
        .unwrap();
        assert_eq!(back, [info]);
    }

    #[test]
    fn bad_input_names_the_item_and_field() {
        let err = list_from_json::<sm::UpdateNetworkParameters>(
            r#"[{"networkId": "a"}, {"vlanId": "x"}]"#,
            "servicemanager.v5.UpdateNetworkParameters",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("item 1"), "{err}");
        assert!(err.to_lowercase().contains("vlan"), "{err}");
    }
}
