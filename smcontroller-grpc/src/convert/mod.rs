//! The one place where `servicemanager.v5` messages become domain types and back.
//!
//! Two directions, each with its envelope:
//!
//! - **Commands** (controller -> SM): [`Outbound`](smcontroller_routing::Outbound) converts
//!   infallibly into [`SmIncomingMessages`](crate::proto::servicemanager::v5::SmIncomingMessages).
//!   The reverse, `TryFrom<SmIncomingMessages> for Outbound`, exists for the SM simulator and
//!   round-trip tests.
//! - **Telemetry and replies** (SM -> controller): `TryFrom<SmOutgoingMessages> for`
//!   [`Inbound`](smcontroller_routing::Inbound) checks everything a node sends; the reverse,
//!   `From<Inbound> for SmOutgoingMessages`, is what a simulated SM sends.
//!
//! Every rule about the wire lives here, once:
//!
//! - Vocabulary strings (`wire-protocol.md`, "String vocabularies") are parsed with the domain
//!   enum's `FromStr`; anything else, the empty string included, is
//!   [`ConvertError::UnknownValue`] naming the field and the value (contract R-TEL-4). The same
//!   goes for an `ItemType` or `ConnectionEnum` number that is not declared.
//! - Required sub-messages (a timestamp, an instance ident, a node's monitoring sample, an
//!   alert's item) that are absent give [`ConvertError::MissingField`]; so does an empty
//!   `sm_info.node_id`. Optional sub-messages (`ErrorInfo`, `os_info`, `arch_info`, network and
//!   monitoring parameters, alert rules) become `Option`.
//! - An empty oneof gives [`ConvertError::EmptyOneof`].
//! - Timestamps must have `nanos` in `0..=999_999_999`; durations must not be negative. An alert
//!   rule without a `duration` has a `min_timeout` of zero.
//! - A node configuration travels as a JSON document (`serde_json` of
//!   [`NodeConfig`](smcontroller_api::NodeConfig)) with its version beside it.
//!
//! Field names in errors are `message.field`, both in the wire's snake_case
//! (`sm_info.node_id`, `instance_ident.type`, `log_data.status`).

mod common;
mod inbound;
mod outbound;
mod v91;

use std::{str::FromStr, time::SystemTime};

use smcontroller_api::UnknownValue;

/// Why a protocol message could not be converted to a domain type.
///
/// Its `Display` names the offending field (`message.field`) and, where there is one, the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field or sub-message is absent (or, for `sm_info.node_id`, empty).
    #[error("{0}: required field is missing")]
    MissingField(&'static str),
    /// A vocabulary string or an enum number that the protocol does not define.
    #[error("{field}: unknown value {value:?}")]
    UnknownValue {
        /// The field, as `message.field`.
        field: &'static str,
        /// The value received, verbatim (an enum number in decimal).
        value: String,
    },
    /// A oneof with no member set; names the oneof as `message.Oneof`.
    #[error("{0}: no member of the oneof is set")]
    EmptyOneof(&'static str),
    /// A timestamp that is not a valid point in time.
    #[error("{field}: invalid timestamp: {reason}")]
    InvalidTimestamp {
        /// The field, as `message.field`.
        field: &'static str,
        /// What is wrong with it, with the value.
        reason: String,
    },
    /// A duration that is negative or malformed.
    #[error("{field}: invalid duration: {reason}")]
    InvalidDuration {
        /// The field, as `message.field`.
        field: &'static str,
        /// What is wrong with it, with the value.
        reason: String,
    },
    /// A node configuration document that is not valid node configuration JSON.
    #[error("{field}: invalid node configuration: {reason}")]
    InvalidNodeConfig {
        /// The field, as `message.field`.
        field: &'static str,
        /// What the JSON parser said.
        reason: String,
    },
}

impl From<ConvertError> for tonic::Status {
    /// Bad input at the edge: `INVALID_ARGUMENT`, with the error's message.
    fn from(error: ConvertError) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// Parses a vocabulary string with the domain enum's `FromStr`.
fn vocabulary<T>(field: &'static str, value: String) -> Result<T, ConvertError>
where
    T: FromStr<Err = UnknownValue>,
{
    value
        .parse()
        .map_err(|_| ConvertError::UnknownValue { field, value })
}

/// A sub-message that must be present.
fn required<T>(field: &'static str, value: Option<T>) -> Result<T, ConvertError> {
    value.ok_or(ConvertError::MissingField(field))
}

/// An enum number that is not declared by the protocol.
fn unknown_number(field: &'static str, value: i32) -> ConvertError {
    ConvertError::UnknownValue {
        field,
        value: value.to_string(),
    }
}

/// A point in time on the wire.
fn timestamp_to_proto(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// A wire timestamp as a point in time; `nanos` must be in `0..=999_999_999`.
fn timestamp_from_proto(
    field: &'static str,
    timestamp: prost_types::Timestamp,
) -> Result<SystemTime, ConvertError> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(ConvertError::InvalidTimestamp {
            field,
            reason: format!(
                "nanos {} is outside 0..=999999999 (seconds {})",
                timestamp.nanos, timestamp.seconds
            ),
        });
    }
    SystemTime::try_from(timestamp).map_err(|e| ConvertError::InvalidTimestamp {
        field,
        reason: e.to_string(),
    })
}

/// A required wire timestamp.
fn required_timestamp(
    field: &'static str,
    timestamp: Option<prost_types::Timestamp>,
) -> Result<SystemTime, ConvertError> {
    timestamp_from_proto(field, required(field, timestamp)?)
}

/// An optional wire timestamp.
fn optional_timestamp(
    field: &'static str,
    timestamp: Option<prost_types::Timestamp>,
) -> Result<Option<SystemTime>, ConvertError> {
    timestamp
        .map(|t| timestamp_from_proto(field, t))
        .transpose()
}

/// A duration on the wire; one longer than `i64::MAX` seconds saturates.
fn duration_to_proto(duration: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Always below 10^9, so it fits.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// A wire duration (absent means zero); negative or with `nanos` out of range is an error.
fn duration_from_proto(
    field: &'static str,
    duration: Option<prost_types::Duration>,
) -> Result<std::time::Duration, ConvertError> {
    let Some(duration) = duration else {
        return Ok(std::time::Duration::ZERO);
    };
    let fail = |what: &str| ConvertError::InvalidDuration {
        field,
        reason: format!(
            "{what} (seconds {}, nanos {})",
            duration.seconds, duration.nanos
        ),
    };
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(fail("negative duration"));
    }
    let nanos = u32::try_from(duration.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| fail("nanos outside 0..=999999999"))?;
    // `seconds` is non-negative here.
    Ok(std::time::Duration::new(
        duration.seconds.unsigned_abs(),
        nanos,
    ))
}
