//! Length limits on the ids and names an SM sends (contract R-BAD-3): node id, runtime ids,
//! resource names, instance idents (item and subject ids), log correlation ids, config
//! versions. A message that breaks one is refused with the field named, before anything of it
//! is kept or logged.

use crate::proto::{
    common::v2::InstanceIdent,
    servicemanager::v5::{alert::AlertItem, sm_outgoing_messages::SmOutgoingMessage},
};

/// The default limit, bytes.
pub const DEFAULT_MAX_ID_LEN: usize = 256;

/// An id over the limit: which field, how long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes, over the limit of {max} bytes for ids")]
pub struct TooLong {
    /// The field's path, e.g. `sm_info.runtimes[2].runtime_id`.
    pub field: String,
    /// Its length, bytes.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

/// Checks every id of `message` against `max` bytes.
pub fn check(message: &SmOutgoingMessage, max: usize) -> Result<(), TooLong> {
    let mut check = Check { max };
    match message {
        SmOutgoingMessage::SmInfo(info) => {
            check.id(|| "sm_info.node_id".into(), &info.node_id)?;
            for (i, r) in info.runtimes.iter().enumerate() {
                check.id(
                    || format!("sm_info.runtimes[{i}].runtime_id"),
                    &r.runtime_id,
                )?;
            }
            for (i, r) in info.resources.iter().enumerate() {
                check.id(|| format!("sm_info.resources[{i}].name"), &r.name)?;
            }
        }
        SmOutgoingMessage::NodeConfigStatus(s) => {
            check.id(|| "node_config_status.version".into(), &s.version)?;
        }
        SmOutgoingMessage::UpdateInstancesStatus(s) => {
            check.statuses("update_instances_status", &s.instances)?;
        }
        SmOutgoingMessage::NodeInstancesStatus(s) => {
            check.statuses("node_instances_status", &s.instances)?;
        }
        SmOutgoingMessage::Log(log) => {
            check.id(|| "log.correlation_id".into(), &log.correlation_id)?;
        }
        SmOutgoingMessage::InstantMonitoring(m) => {
            check.monitoring("instant_monitoring", &m.instances_monitoring)?;
        }
        SmOutgoingMessage::AverageMonitoring(m) => {
            check.monitoring("average_monitoring", &m.instances_monitoring)?;
        }
        SmOutgoingMessage::Alert(alert) => {
            let instance = match &alert.alert_item {
                Some(AlertItem::InstanceQuotaAlert(a)) => a.instance.as_ref(),
                Some(AlertItem::ResourceAllocateAlert(a)) => a.instance.as_ref(),
                Some(AlertItem::InstanceAlert(a)) => a.instance.as_ref(),
                _ => None,
            };
            check.ident(|| "alert.instance".into(), instance)?;
        }
    }
    Ok(())
}

struct Check {
    max: usize,
}

impl Check {
    fn id(&mut self, field: impl FnOnce() -> String, value: &str) -> Result<(), TooLong> {
        if value.len() > self.max {
            return Err(TooLong {
                field: field(),
                len: value.len(),
                max: self.max,
            });
        }
        Ok(())
    }

    fn ident(
        &mut self,
        field: impl Fn() -> String,
        ident: Option<&InstanceIdent>,
    ) -> Result<(), TooLong> {
        if let Some(ident) = ident {
            self.id(|| format!("{}.item_id", field()), &ident.item_id)?;
            self.id(|| format!("{}.subject_id", field()), &ident.subject_id)?;
        }
        Ok(())
    }

    fn statuses(
        &mut self,
        message: &str,
        statuses: &[crate::proto::servicemanager::v5::InstanceStatus],
    ) -> Result<(), TooLong> {
        for (i, s) in statuses.iter().enumerate() {
            self.ident(
                || format!("{message}.instances[{i}].instance"),
                s.instance.as_ref(),
            )?;
            self.id(
                || format!("{message}.instances[{i}].runtime_id"),
                &s.runtime_id,
            )?;
        }
        Ok(())
    }

    fn monitoring(
        &mut self,
        message: &str,
        instances: &[crate::proto::servicemanager::v5::InstanceMonitoring],
    ) -> Result<(), TooLong> {
        for (i, m) in instances.iter().enumerate() {
            self.ident(
                || format!("{message}.instances_monitoring[{i}].instance"),
                m.instance.as_ref(),
            )?;
            self.id(
                || format!("{message}.instances_monitoring[{i}].runtime_id"),
                &m.runtime_id,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::servicemanager::v5::{
        InstanceStatus, NodeInstancesStatus, RuntimeInfo, SmInfo,
    };

    #[test]
    fn r_bad_3_a_long_node_id_is_named_with_its_length() {
        let info = SmOutgoingMessage::SmInfo(SmInfo {
            node_id: "x".repeat(1 << 20),
            ..SmInfo::default()
        });
        let e = check(&info, DEFAULT_MAX_ID_LEN).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sm_info.node_id is 1048576 bytes, over the limit of 256 bytes for ids"
        );
    }

    #[test]
    fn r_bad_3_nested_ids_are_named_with_their_place() {
        let info = SmOutgoingMessage::SmInfo(SmInfo {
            node_id: "n1".into(),
            runtimes: vec![
                RuntimeInfo::default(),
                RuntimeInfo {
                    runtime_id: "r".repeat(300),
                    ..RuntimeInfo::default()
                },
            ],
            ..SmInfo::default()
        });
        assert_eq!(
            check(&info, 256).unwrap_err().field,
            "sm_info.runtimes[1].runtime_id"
        );
        let statuses = SmOutgoingMessage::NodeInstancesStatus(NodeInstancesStatus {
            instances: vec![InstanceStatus {
                instance: Some(InstanceIdent {
                    item_id: "i".into(),
                    subject_id: "s".repeat(257),
                    ..InstanceIdent::default()
                }),
                ..InstanceStatus::default()
            }],
        });
        assert_eq!(
            check(&statuses, 256).unwrap_err().field,
            "node_instances_status.instances[0].instance.subject_id"
        );
        assert!(check(&statuses, 257).is_ok());
    }
}
