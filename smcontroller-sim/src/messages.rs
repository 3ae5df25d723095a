//! Builders of the protocol messages a simulated SM sends, with plausible values.
//!
//! Everything here builds prost messages directly: the simulator shares no conversion code with
//! the controller, so the two ends check each other.

use std::time::SystemTime;

use prost_types::Timestamp;
use smcontroller_grpc::proto::common::v2::{ArchInfo, ErrorInfo, InstanceIdent, ItemType, OsInfo};
use smcontroller_grpc::proto::servicemanager::v5::{
    Alert, AverageMonitoring, CoreAlert, EnvVarStatus, InstanceAlert, InstanceInfo,
    InstanceMonitoring, InstanceQuotaAlert, InstanceStatus, InstantMonitoring, LogData,
    MonitoringData, NodeConfigStatus, NodeInstancesStatus, PartitionUsage, ResourceAllocateAlert,
    ResourceInfo, RuntimeInfo, SmInfo, SmOutgoingMessages, SystemAlert, SystemQuotaAlert,
    UpdateInstancesStatus, alert::AlertItem, sm_outgoing_messages::SmOutgoingMessage,
};

/// The value the simulator puts in a vocabulary field when it sends garbage.
pub const BOGUS: &str = "bogus";

/// Runtime ids every simulated node offers.
pub const RUNTIMES: [&str; 2] = ["runc", "crun"];

/// Values of the quota alert `status` vocabulary.
pub const QUOTA_STATUSES: [&str; 3] = ["raise", "continue", "fall"];

/// Values of the `core_component` vocabulary.
pub const CORE_COMPONENTS: [&str; 5] = ["CM", "SM", "IAM", "MP", "unknown"];

/// Quota alert parameters the simulator uses.
pub const QUOTA_PARAMETERS: [&str; 4] = ["cpu", "ram", "download", "upload"];

/// Aos error code the simulator reports for a failure (`eFailed`).
pub const AOS_CODE_FAILED: i32 = 1;

/// The `error` a real SM sets on every `node_config_status`, `InstanceStatus`, `EnvVarStatus`
/// and `LogData` when nothing failed: present, both codes 0, no message.
pub fn no_error() -> ErrorInfo {
    ErrorInfo::default()
}

/// A failure of kind [`AOS_CODE_FAILED`] that says `message`.
pub fn failure(message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        aos_code: AOS_CODE_FAILED,
        exit_code: 0,
        message: message.into(),
    }
}

/// Wraps `msg` into an `SMOutgoingMessages`.
pub fn outgoing(msg: SmOutgoingMessage) -> SmOutgoingMessages {
    SmOutgoingMessages {
        sm_outgoing_message: Some(msg),
    }
}

/// An `SMOutgoingMessages` whose oneof is empty (garbage).
pub fn empty() -> SmOutgoingMessages {
    SmOutgoingMessages {
        sm_outgoing_message: None,
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

/// `sm_info` of node `node_id`: two runtimes and two shared resources.
pub fn sm_info(node_id: &str) -> SmOutgoingMessages {
    let os_info = OsInfo {
        os: "linux".to_owned(),
        version: "6.6".to_owned(),
        features: vec!["cgroup2".to_owned()],
    };
    let arch_info = ArchInfo {
        architecture: "x86_64".to_owned(),
        variant: String::new(),
    };
    let runtimes = vec![
        RuntimeInfo {
            runtime_id: RUNTIMES[0].to_owned(),
            r#type: "runc".to_owned(),
            max_dmips: 10_000,
            allowed_dmips: 8_000,
            total_ram: 2 << 30,
            allowed_ram: 3 << 29,
            max_instances: 32,
            os_info: Some(os_info.clone()),
            arch_info: Some(arch_info.clone()),
        },
        RuntimeInfo {
            runtime_id: RUNTIMES[1].to_owned(),
            r#type: "crun".to_owned(),
            max_dmips: 10_000,
            allowed_dmips: 4_000,
            total_ram: 2 << 30,
            allowed_ram: 1 << 29,
            max_instances: 8,
            os_info: Some(os_info),
            arch_info: Some(arch_info),
        },
    ];
    let resources = vec![
        ResourceInfo {
            name: "camera".to_owned(),
            shared_count: 1,
        },
        ResourceInfo {
            name: "soundcard".to_owned(),
            shared_count: 2,
        },
    ];
    outgoing(SmOutgoingMessage::SmInfo(SmInfo {
        node_id: node_id.to_owned(),
        runtimes,
        resources,
    }))
}

/// The ident of the `n`-th instance a node starts with.
pub fn instance_ident(n: usize) -> InstanceIdent {
    InstanceIdent {
        item_id: format!("service-{}", n % 4),
        subject_id: "subject-1".to_owned(),
        instance: n as u64,
        r#type: ItemType::Service as i32,
        preinstalled: false,
    }
}

/// The `count` instances a node runs before any `update_instances`, all `active`.
pub fn initial_instances(count: usize) -> Vec<InstanceStatus> {
    (0..count)
        .map(|n| InstanceStatus {
            instance: Some(instance_ident(n)),
            version: "1.0.0".to_owned(),
            runtime_id: RUNTIMES[n % RUNTIMES.len()].to_owned(),
            manifest_digest: format!("sha256:{n:064x}"),
            env_vars: Vec::new(),
            state: "active".to_owned(),
            error: Some(no_error()),
        })
        .collect()
}

/// A `node_instances_status` snapshot of `instances`.
pub fn node_instances_status(instances: &[InstanceStatus]) -> SmOutgoingMessages {
    outgoing(SmOutgoingMessage::NodeInstancesStatus(
        NodeInstancesStatus {
            instances: instances.to_vec(),
        },
    ))
}

/// A `node_config_status` reply; `error` `None` means nothing failed and is sent as a real SM
/// sends it, as [`no_error`].
pub fn node_config_status(
    state: &str,
    version: &str,
    error: Option<ErrorInfo>,
) -> SmOutgoingMessages {
    outgoing(SmOutgoingMessage::NodeConfigStatus(NodeConfigStatus {
        state: state.to_owned(),
        version: version.to_owned(),
        error: Some(error.unwrap_or_else(no_error)),
    }))
}

/// The status of an instance the node was asked to start, in state `state` (`active`, or
/// `failed` with `error`); each env var with [`no_error`], and `error` `None` sent as
/// [`no_error`], as a real SM does.
pub fn instance_status(
    info: &InstanceInfo,
    state: &str,
    error: Option<ErrorInfo>,
) -> InstanceStatus {
    InstanceStatus {
        instance: info.instance.clone(),
        version: info.version.clone(),
        runtime_id: info.runtime_id.clone(),
        manifest_digest: info.manifest_digest.clone(),
        env_vars: info
            .env_vars
            .iter()
            .map(|e| EnvVarStatus {
                name: e.name.clone(),
                error: Some(no_error()),
            })
            .collect(),
        state: state.to_owned(),
        error: Some(error.unwrap_or_else(no_error)),
    }
}

/// An `update_instances_status` message.
pub fn update_instances_status(instances: Vec<InstanceStatus>) -> SmOutgoingMessages {
    outgoing(SmOutgoingMessage::UpdateInstancesStatus(
        UpdateInstancesStatus { instances },
    ))
}

/// The `part_count` parts of a log answer to request `correlation_id`, with status `status`,
/// each with [`no_error`].
pub fn log_parts(correlation_id: &str, part_count: u64, status: &str) -> Vec<SmOutgoingMessages> {
    (1..=part_count)
        .map(|part| {
            outgoing(SmOutgoingMessage::Log(LogData {
                correlation_id: correlation_id.to_owned(),
                part_count,
                part,
                data: format!("log of {correlation_id}, part {part}/{part_count}\n").into_bytes(),
                status: status.to_owned(),
                error: Some(no_error()),
            }))
        })
        .collect()
}

/// A monitoring sample; `seq` varies the values a little.
pub fn monitoring_data(seq: u64, timestamp: Timestamp) -> MonitoringData {
    MonitoringData {
        timestamp: Some(timestamp),
        ram: (256 << 20) + (seq % 64) * 4096,
        cpu: 10 + seq % 50,
        partitions: vec![PartitionUsage {
            name: "storages".to_owned(),
            used_size: (64 << 20) + seq % 1024,
        }],
        download: seq % 2048,
        upload: seq % 1024,
    }
}

/// Per-instance monitoring of `instances` (timestamps set to `timestamp`).
pub fn instances_monitoring(
    instances: &[InstanceStatus],
    seq: u64,
    timestamp: Timestamp,
) -> Vec<InstanceMonitoring> {
    instances
        .iter()
        .map(|status| InstanceMonitoring {
            instance: status.instance.clone(),
            runtime_id: status.runtime_id.clone(),
            monitoring_data: Some(monitoring_data(seq, timestamp)),
        })
        .collect()
}

/// An `instant_monitoring` message for a node running `instances`.
pub fn instant_monitoring(instances: &[InstanceStatus], seq: u64) -> SmOutgoingMessages {
    let ts = now();
    outgoing(SmOutgoingMessage::InstantMonitoring(InstantMonitoring {
        node_monitoring: Some(monitoring_data(seq, ts)),
        instances_monitoring: instances_monitoring(instances, seq, ts),
    }))
}

/// An `average_monitoring` reply for a node running `instances`.
pub fn average_monitoring(instances: &[InstanceStatus], seq: u64) -> SmOutgoingMessages {
    let ts = now();
    outgoing(SmOutgoingMessage::AverageMonitoring(AverageMonitoring {
        node_monitoring: Some(monitoring_data(seq, ts)),
        instances_monitoring: instances_monitoring(instances, seq, ts),
    }))
}

/// The `seq`-th alert of a node: the six alert kinds in turn, vocabulary values in turn.
///
/// With `bad_vocabulary` the quota status and core component are [`BOGUS`]; with
/// `with_timestamp` false the alert has no timestamp.
pub fn alert(
    seq: u64,
    instance: &InstanceIdent,
    bad_vocabulary: bool,
    with_timestamp: bool,
) -> SmOutgoingMessages {
    let i = seq as usize;
    let pick = |values: &[&'static str]| {
        if bad_vocabulary {
            BOGUS
        } else {
            values[(i / 6) % values.len()]
        }
    };
    let parameter = QUOTA_PARAMETERS[(i / 6) % QUOTA_PARAMETERS.len()].to_owned();
    let item = match i % 6 {
        0 => AlertItem::SystemQuotaAlert(SystemQuotaAlert {
            parameter,
            value: 90 + seq % 10,
            status: pick(&QUOTA_STATUSES).to_owned(),
        }),
        1 => AlertItem::InstanceQuotaAlert(InstanceQuotaAlert {
            instance: Some(instance.clone()),
            parameter,
            value: 80 + seq % 20,
            status: pick(&QUOTA_STATUSES).to_owned(),
        }),
        2 => AlertItem::ResourceAllocateAlert(ResourceAllocateAlert {
            instance: Some(instance.clone()),
            resource: "camera".to_owned(),
            message: "resource is busy".to_owned(),
        }),
        3 => AlertItem::SystemAlert(SystemAlert {
            message: format!("system alert #{seq}"),
        }),
        4 => AlertItem::CoreAlert(CoreAlert {
            core_component: pick(&CORE_COMPONENTS).to_owned(),
            message: format!("core alert #{seq}"),
        }),
        _ => AlertItem::InstanceAlert(InstanceAlert {
            instance: Some(instance.clone()),
            service_version: "1.0.0".to_owned(),
            message: format!("instance alert #{seq}"),
        }),
    };
    outgoing(SmOutgoingMessage::Alert(Alert {
        timestamp: with_timestamp.then(now),
        alert_item: Some(item),
    }))
}
