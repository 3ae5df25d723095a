//! `common.v2`: error info, instance idents and filters, OS and architecture.

use smcontroller_api as api;

use super::{ConvertError, unknown_number};
use crate::proto::common::v2 as pb;

/// The `error` of a status as the domain reads it (wire spec, "Conventions of the protocol").
///
/// The real SM puts an `ErrorInfo` on every `node_config_status`, `InstanceStatus`,
/// `EnvVarStatus` and `LogData`, also when nothing failed. Absent, or `aos_code` 0 and
/// `exit_code` 0, is success: `None`, whatever the `message` says. `aos_code` non-zero is a
/// failure of that Aos error kind; `aos_code` 0 with a non-zero `exit_code` is a failure with that
/// exit code. This is the only place an `ErrorInfo` is read.
pub(super) fn error_from_proto(error: Option<pb::ErrorInfo>) -> Option<api::ErrorInfo> {
    let error = error?;
    let error = api::ErrorInfo {
        aos_code: error.aos_code,
        exit_code: error.exit_code,
        message: error.message,
    };
    error.is_failure().then_some(error)
}

/// The `error` of a status as a real SM writes it, so that the reference reads it the same way.
///
/// Success goes as an empty `ErrorInfo`, as the real SM sends it. A failure whose codes are both
/// 0 would read as success, so it goes as the generic Aos failure
/// ([`ErrorInfo::AOS_FAILED`](api::ErrorInfo::AOS_FAILED)) with its message. This is the only
/// place an `ErrorInfo` is written.
pub(super) fn error_to_proto(error: Option<api::ErrorInfo>) -> Option<pb::ErrorInfo> {
    Some(match error {
        None => pb::ErrorInfo::default(),
        Some(error) => pb::ErrorInfo {
            aos_code: if error.is_failure() {
                error.aos_code
            } else {
                api::ErrorInfo::AOS_FAILED
            },
            exit_code: error.exit_code,
            message: error.message,
        },
    })
}

impl From<api::ItemType> for pb::ItemType {
    fn from(t: api::ItemType) -> Self {
        match t {
            api::ItemType::Service => Self::Service,
            api::ItemType::Component => Self::Component,
        }
    }
}

impl From<pb::ItemType> for api::ItemType {
    fn from(t: pb::ItemType) -> Self {
        match t {
            pb::ItemType::Service => Self::Service,
            pb::ItemType::Component => Self::Component,
        }
    }
}

impl From<api::InstanceIdent> for pb::InstanceIdent {
    fn from(i: api::InstanceIdent) -> Self {
        Self {
            item_id: i.item_id,
            subject_id: i.subject_id,
            instance: i.instance,
            r#type: pb::ItemType::from(i.item_type).into(),
            preinstalled: i.preinstalled,
        }
    }
}

impl TryFrom<pb::InstanceIdent> for api::InstanceIdent {
    type Error = ConvertError;

    /// Fails with `UnknownValue` on an `ItemType` number the protocol does not declare.
    fn try_from(i: pb::InstanceIdent) -> Result<Self, ConvertError> {
        let item_type = pb::ItemType::try_from(i.r#type)
            .map_err(|_| unknown_number("instance_ident.type", i.r#type))?;
        Ok(Self {
            item_id: i.item_id,
            subject_id: i.subject_id,
            instance: i.instance,
            item_type: item_type.into(),
            preinstalled: i.preinstalled,
        })
    }
}

/// Converts every ident of a list, stopping at the first bad one.
pub(super) fn idents_from_proto(
    idents: Vec<pb::InstanceIdent>,
) -> Result<Vec<api::InstanceIdent>, ConvertError> {
    idents.into_iter().map(TryInto::try_into).collect()
}

/// A required instance ident, `field` naming where it sits.
pub(super) fn required_ident(
    field: &'static str,
    ident: Option<pb::InstanceIdent>,
) -> Result<api::InstanceIdent, ConvertError> {
    super::required(field, ident)?.try_into()
}

impl From<api::InstanceFilter> for pb::InstanceFilter {
    /// "Any" goes as an empty string or `-1`; an instance above `i64::MAX` saturates to it.
    fn from(f: api::InstanceFilter) -> Self {
        Self {
            item_id: f.item_id.unwrap_or_default(),
            subject_id: f.subject_id.unwrap_or_default(),
            instance: f
                .instance
                .map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX)),
        }
    }
}

impl From<pb::InstanceFilter> for api::InstanceFilter {
    /// An empty string or a negative instance means "any" (`None`).
    fn from(f: pb::InstanceFilter) -> Self {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Self {
            item_id: non_empty(f.item_id),
            subject_id: non_empty(f.subject_id),
            instance: u64::try_from(f.instance).ok(),
        }
    }
}

impl From<api::ArchInfo> for pb::ArchInfo {
    fn from(a: api::ArchInfo) -> Self {
        Self {
            architecture: a.architecture,
            variant: a.variant,
        }
    }
}

impl From<pb::ArchInfo> for api::ArchInfo {
    fn from(a: pb::ArchInfo) -> Self {
        Self {
            architecture: a.architecture,
            variant: a.variant,
        }
    }
}

impl From<api::OsInfo> for pb::OsInfo {
    fn from(o: api::OsInfo) -> Self {
        Self {
            os: o.os,
            version: o.version,
            features: o.features,
        }
    }
}

impl From<pb::OsInfo> for api::OsInfo {
    fn from(o: pb::OsInfo) -> Self {
        Self {
            os: o.os,
            version: o.version,
            features: o.features,
        }
    }
}
