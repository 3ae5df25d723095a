//! Properties of the `convert` module.
//!
//! - Every [`Outbound`] command and every [`Inbound`] message survives
//!   domain -> proto -> bytes -> proto -> domain unchanged.
//! - A node configuration survives its JSON form.
//! - Contract R-TEL-4 (a message the controller cannot convert is rejected with a reason that
//!   names the field and the value): every vocabulary field rejects every string outside its
//!   vocabulary with `UnknownValue { field, value }` carrying that exact string; undeclared enum
//!   numbers, empty oneofs, missing required parts, bad timestamps, durations and node
//!   configurations are rejected with the field named.

use std::{
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proptest::{collection::vec, option, prelude::*, sample::select};
use prost::Message as _;
use smcontroller_api as api;
use smcontroller_grpc::{
    convert::ConvertError,
    proto::{
        common::v2 as common,
        servicemanager::v5::{
            self as pb, alert::AlertItem, sm_incoming_messages::SmIncomingMessage,
            sm_outgoing_messages::SmOutgoingMessage,
        },
    },
};
use smcontroller_routing::{Inbound, LogQuery, Outbound};

// ---------------------------------------------------------------------------------------------
// Strategies for the domain types.

/// Any short text, Unicode included.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,8}"
}

/// Text that is never empty (an empty string means "any" or "missing" in some fields).
fn non_empty_text() -> impl Strategy<Value = String> {
    "\\PC{1,8}"
}

/// Any finite double: the wire carries every bit of it.
fn finite() -> BoxedStrategy<f64> {
    any::<f64>()
        .prop_filter("finite", |f| f.is_finite())
        .boxed()
}

/// Doubles with a short exact decimal form (multiples of 1/1024), for JSON documents.
fn json_float() -> BoxedStrategy<f64> {
    (-1_000_000_i32..1_000_000)
        .prop_map(|n| f64::from(n) / 1024.0)
        .boxed()
}

/// A point in time from about 1653 to 5138, with whole nanoseconds.
fn time() -> impl Strategy<Value = SystemTime> {
    (-10_000_000_000_i64..100_000_000_000, 0_u32..1_000_000_000).prop_map(|(secs, nanos)| {
        let base = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        base + Duration::from_nanos(u64::from(nanos))
    })
}

/// A duration up to about 300 years, with whole nanoseconds.
fn duration() -> impl Strategy<Value = Duration> {
    (0_u64..10_000_000_000, 0_u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n))
}

/// `None` (success) or a failure as the wire can say it: at least one code non-zero. A domain
/// error with both codes 0 is normalised on the way out (see `error_info_*` in recordings.rs).
fn error_info() -> impl Strategy<Value = Option<api::ErrorInfo>> {
    option::of(
        (any::<i32>(), any::<i32>(), text())
            .prop_filter("a failure has a non-zero code", |(a, e, _)| {
                *a != 0 || *e != 0
            })
            .prop_map(|(aos_code, exit_code, message)| api::ErrorInfo {
                aos_code,
                exit_code,
                message,
            }),
    )
}

fn item_type() -> impl Strategy<Value = api::ItemType> {
    prop_oneof![Just(api::ItemType::Service), Just(api::ItemType::Component)]
}

fn ident() -> impl Strategy<Value = api::InstanceIdent> {
    (text(), text(), any::<u64>(), item_type(), any::<bool>()).prop_map(
        |(item_id, subject_id, instance, item_type, preinstalled)| api::InstanceIdent {
            item_id,
            subject_id,
            instance,
            item_type,
            preinstalled,
        },
    )
}

/// Filters that the wire can express: set strings are non-empty, a set instance fits `int64`.
fn filter() -> impl Strategy<Value = api::InstanceFilter> {
    (
        option::of(non_empty_text()),
        option::of(non_empty_text()),
        option::of(0..=i64::MAX.unsigned_abs()),
    )
        .prop_map(|(item_id, subject_id, instance)| api::InstanceFilter {
            item_id,
            subject_id,
            instance,
        })
}

fn log_query(filter: BoxedStrategy<api::InstanceFilter>) -> impl Strategy<Value = LogQuery> {
    (text(), filter, option::of(time()), option::of(time())).prop_map(
        |(correlation_id, filter, from, till)| LogQuery {
            correlation_id,
            filter,
            from,
            till,
        },
    )
}

fn percents(f: BoxedStrategy<f64>) -> impl Strategy<Value = api::AlertRulePercents> {
    (duration(), f.clone(), f).prop_map(|(min_timeout, min_threshold, max_threshold)| {
        api::AlertRulePercents {
            min_timeout,
            min_threshold,
            max_threshold,
        }
    })
}

fn points() -> impl Strategy<Value = api::AlertRulePoints> {
    (duration(), any::<u64>(), any::<u64>()).prop_map(
        |(min_timeout, min_threshold, max_threshold)| api::AlertRulePoints {
            min_timeout,
            min_threshold,
            max_threshold,
        },
    )
}

fn partition_rule(f: BoxedStrategy<f64>) -> impl Strategy<Value = api::PartitionAlertRule> {
    (text(), duration(), f.clone(), f).prop_map(
        |(name, min_timeout, min_threshold, max_threshold)| api::PartitionAlertRule {
            name,
            min_timeout,
            min_threshold,
            max_threshold,
        },
    )
}

fn alert_rules(f: BoxedStrategy<f64>) -> impl Strategy<Value = api::AlertRules> {
    (
        option::of(percents(f.clone())),
        option::of(percents(f.clone())),
        vec(partition_rule(f), 0..3),
        option::of(points()),
        option::of(points()),
    )
        .prop_map(|(ram, cpu, partitions, download, upload)| api::AlertRules {
            ram,
            cpu,
            partitions,
            download,
            upload,
        })
}

fn codename() -> impl Strategy<Value = api::Codename> {
    text().prop_map(|codename| api::Codename { codename })
}

fn node_config() -> impl Strategy<Value = api::NodeConfig> {
    let ratios = (
        option::of(json_float()),
        option::of(json_float()),
        option::of(json_float()),
        option::of(json_float()),
    )
        .prop_map(|(cpu, ram, storage, state)| api::ResourceRatios {
            cpu,
            ram,
            storage,
            state,
        });
    (
        text(),
        option::of(codename()),
        codename(),
        option::of(alert_rules(json_float())),
        option::of(ratios),
        vec(text(), 0..3),
        any::<u64>(),
    )
        .prop_map(
            |(
                version,
                node,
                node_group_subject,
                alert_rules,
                resource_ratios,
                labels,
                priority,
            )| {
                api::NodeConfig {
                    version,
                    node,
                    node_group_subject,
                    alert_rules,
                    resource_ratios,
                    labels,
                    priority,
                }
            },
        )
}

fn network_parameters() -> impl Strategy<Value = api::NetworkParameters> {
    let rule = (text(), text(), text(), text()).prop_map(|(dst_ip, dst_port, proto, src_ip)| {
        api::FirewallRule {
            dst_ip,
            dst_port,
            proto,
            src_ip,
        }
    });
    (text(), text(), text(), vec(text(), 0..3), vec(rule, 0..3)).prop_map(
        |(network_id, subnet, ip, dns_servers, rules)| api::NetworkParameters {
            network_id,
            subnet,
            ip,
            dns_servers,
            rules,
        },
    )
}

fn instance_info() -> impl Strategy<Value = api::StartInstance> {
    let env = (text(), text()).prop_map(|(name, value)| api::EnvVarInfo { name, value });
    let monitoring = option::of(alert_rules(finite()))
        .prop_map(|alert_rules| api::MonitoringParameters { alert_rules });
    (
        (ident(), text(), text(), text(), text()),
        (any::<u32>(), any::<u32>(), any::<u64>(), text(), text()),
        (
            vec(env, 0..3),
            option::of(network_parameters()),
            option::of(monitoring),
        ),
    )
        .prop_map(
            |(
                (ident, version, manifest_digest, owner_id, runtime_id),
                (uid, gid, priority, storage_path, state_path),
                (env_vars, network, monitoring_parameters),
            )| api::StartInstance {
                info: api::InstanceInfo {
                    ident,
                    version,
                    manifest_digest,
                    owner_id,
                    runtime_id,
                    uid,
                    gid,
                    priority,
                    storage_path,
                    state_path,
                    env_vars,
                    monitoring_parameters,
                },
                network,
            },
        )
}

fn update_network() -> impl Strategy<Value = api::UpdateNetworkParameters> {
    (text(), text(), text(), any::<u64>()).prop_map(|(network_id, subnet, ip, vlan_id)| {
        api::UpdateNetworkParameters {
            network_id,
            subnet,
            ip,
            vlan_id,
        }
    })
}

/// Every command the controller sends.
fn outbound() -> impl Strategy<Value = Outbound> {
    prop_oneof![
        Just(Outbound::GetNodeConfigStatus),
        node_config().prop_map(|c| Outbound::CheckNodeConfig(Box::new(c))),
        node_config().prop_map(|c| Outbound::SetNodeConfig(Box::new(c))),
        (vec(ident(), 0..3), vec(instance_info(), 0..3))
            .prop_map(|(stop, start)| Outbound::UpdateInstances { stop, start }),
        vec(update_network(), 0..3).prop_map(Outbound::UpdateNetworks),
        // A system log request carries no filter.
        log_query(Just(api::InstanceFilter::default()).boxed())
            .prop_map(|q| Outbound::SystemLog(Box::new(q))),
        log_query(filter().boxed()).prop_map(|q| Outbound::InstanceLog(Box::new(q))),
        log_query(filter().boxed()).prop_map(|q| Outbound::CrashLog(Box::new(q))),
        Just(Outbound::GetAverageMonitoring),
        any::<bool>().prop_map(Outbound::ConnectionStatus),
    ]
}

fn runtime_info() -> impl Strategy<Value = api::RuntimeInfo> {
    let os = (text(), text(), vec(text(), 0..3)).prop_map(|(os, version, features)| api::OsInfo {
        os,
        version,
        features,
    });
    let arch = (text(), text()).prop_map(|(architecture, variant)| api::ArchInfo {
        architecture,
        variant,
    });
    (
        (text(), text()),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (option::of(os), option::of(arch)),
    )
        .prop_map(
            |(
                (runtime_id, runtime_type),
                (max_dmips, allowed_dmips, total_ram, allowed_ram, max_instances),
                (os_info, arch_info),
            )| api::RuntimeInfo {
                runtime_id,
                runtime_type,
                max_dmips,
                allowed_dmips,
                total_ram,
                allowed_ram,
                max_instances,
                os_info,
                arch_info,
            },
        )
}

fn sm_info() -> impl Strategy<Value = api::SmInfo> {
    let resource = (text(), any::<u64>())
        .prop_map(|(name, shared_count)| api::ResourceInfo { name, shared_count });
    (
        non_empty_text(),
        vec(runtime_info(), 0..3),
        vec(resource, 0..3),
    )
        .prop_map(|(node_id, runtimes, resources)| api::SmInfo {
            node_id: api::NodeId::new(node_id),
            runtimes,
            resources,
        })
}

fn instance_status() -> impl Strategy<Value = api::InstanceStatus> {
    let env = (text(), error_info()).prop_map(|(name, error)| api::EnvVarStatus { name, error });
    (
        ident(),
        (text(), text(), text()),
        vec(env, 0..3),
        select(api::InstanceState::ALL),
        error_info(),
    )
        .prop_map(
            |(ident, (version, runtime_id, manifest_digest), env_vars, state, error)| {
                api::InstanceStatus {
                    ident,
                    version,
                    runtime_id,
                    manifest_digest,
                    env_vars,
                    state,
                    error,
                }
            },
        )
}

/// A log part as the converter returns it: `node_id` empty, for the router to fill in.
fn log_part() -> impl Strategy<Value = api::LogPart> {
    (
        text(),
        any::<u64>(),
        any::<u64>(),
        vec(any::<u8>(), 0..32),
        select(api::LogStatus::ALL),
        error_info(),
    )
        .prop_map(
            |(correlation_id, part, part_count, data, status, error)| api::LogPart {
                node_id: api::NodeId::new(""),
                correlation_id,
                part,
                part_count,
                data,
                status,
                error,
            },
        )
}

fn monitoring_data() -> impl Strategy<Value = api::MonitoringData> {
    let partition = (text(), any::<u64>())
        .prop_map(|(name, used_size)| api::PartitionUsage { name, used_size });
    (
        time(),
        any::<u64>(),
        any::<u64>(),
        vec(partition, 0..3),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(timestamp, ram, cpu, partitions, download, upload)| api::MonitoringData {
                timestamp,
                ram,
                cpu,
                partitions,
                download,
                upload,
            },
        )
}

fn node_monitoring() -> impl Strategy<Value = api::NodeMonitoringData> {
    let instance = (ident(), text(), monitoring_data()).prop_map(|(ident, runtime_id, data)| {
        api::InstanceMonitoring {
            ident,
            runtime_id,
            data,
        }
    });
    (monitoring_data(), vec(instance, 0..3))
        .prop_map(|(node, instances)| api::NodeMonitoringData { node, instances })
}

fn alert() -> impl Strategy<Value = api::Alert> {
    let quota = || select(api::QuotaAlertState::ALL);
    let kind = prop_oneof![
        (text(), any::<u64>(), quota()).prop_map(|(parameter, value, status)| {
            api::AlertKind::SystemQuota {
                parameter,
                value,
                status,
            }
        }),
        (ident(), text(), any::<u64>(), quota()).prop_map(|(ident, parameter, value, status)| {
            api::AlertKind::InstanceQuota {
                ident,
                parameter,
                value,
                status,
            }
        }),
        (ident(), text(), text()).prop_map(|(ident, resource, message)| {
            api::AlertKind::ResourceAllocate {
                ident,
                resource,
                message,
            }
        }),
        text().prop_map(|message| api::AlertKind::System { message }),
        (select(api::CoreComponent::ALL), text())
            .prop_map(|(component, message)| api::AlertKind::Core { component, message }),
        (ident(), text(), text()).prop_map(|(ident, service_version, message)| {
            api::AlertKind::Instance {
                ident,
                service_version,
                message,
            }
        }),
    ];
    (time(), kind).prop_map(|(timestamp, kind)| api::Alert { timestamp, kind })
}

/// Every message an SM sends.
fn inbound() -> impl Strategy<Value = Inbound> {
    prop_oneof![
        sm_info().prop_map(Inbound::SmInfo),
        (select(api::NodeConfigState::ALL), text(), error_info()).prop_map(
            |(state, version, error)| Inbound::NodeConfigStatus(api::NodeConfigStatus {
                state,
                version,
                error,
            })
        ),
        vec(instance_status(), 0..3).prop_map(Inbound::UpdateInstancesStatus),
        vec(instance_status(), 0..3).prop_map(Inbound::NodeInstancesStatus),
        log_part().prop_map(Inbound::Log),
        node_monitoring().prop_map(Inbound::InstantMonitoring),
        node_monitoring().prop_map(Inbound::AverageMonitoring),
        alert().prop_map(Inbound::Alert),
    ]
}

/// Strings outside a vocabulary: arbitrary text, plus near misses of the real values (other
/// case, a stray space, a letter short) which arbitrary text would rarely hit.
fn not_in<T>(all: &'static [T], as_str: fn(T) -> &'static str) -> BoxedStrategy<String>
where
    T: Copy + std::fmt::Debug + FromStr + 'static,
{
    let near_miss = select(all).prop_flat_map(move |value| {
        let s = as_str(value);
        prop_oneof![
            Just(s.to_uppercase()),
            Just(s.to_lowercase()),
            Just(format!("{s} ")),
            Just(format!(" {s}")),
            Just(s[1..].to_owned()),
            Just(format!("{s}{s}")),
        ]
    });
    prop_oneof![Just(String::new()), "\\PC{0,12}", near_miss]
        .prop_filter("must not be in the vocabulary", |s| T::from_str(s).is_err())
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn through_bytes<M: prost::Message + Default>(message: &M) -> M {
    M::decode(message.encode_to_vec().as_slice()).expect("what prost encodes, it decodes")
}

fn ident_pb() -> common::InstanceIdent {
    api::InstanceIdent::default().into()
}

fn now_pb() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    })
}

fn outgoing(message: SmOutgoingMessage) -> pb::SmOutgoingMessages {
    pb::SmOutgoingMessages {
        sm_outgoing_message: Some(message),
    }
}

fn incoming(message: SmIncomingMessage) -> pb::SmIncomingMessages {
    pb::SmIncomingMessages {
        sm_incoming_message: Some(message),
    }
}

fn alert_pb(item: AlertItem) -> pb::SmOutgoingMessages {
    outgoing(SmOutgoingMessage::Alert(pb::Alert {
        timestamp: now_pb(),
        alert_item: Some(item),
    }))
}

fn status_pb(state: String) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance: Some(ident_pb()),
        state,
        ..Default::default()
    }
}

fn inbound_error(message: pb::SmOutgoingMessages) -> ConvertError {
    Inbound::try_from(message).expect_err("conversion must fail")
}

fn outbound_error(message: pb::SmIncomingMessages) -> ConvertError {
    Outbound::try_from(message).expect_err("conversion must fail")
}

fn unknown(field: &'static str, value: impl Into<String>) -> ConvertError {
    ConvertError::UnknownValue {
        field,
        value: value.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips.

proptest! {
    #[test]
    fn every_outbound_command_survives_the_wire(command in outbound()) {
        let wire = pb::SmIncomingMessages::from(command.clone());
        let decoded = through_bytes(&wire);
        prop_assert_eq!(&decoded, &wire);
        prop_assert_eq!(Outbound::try_from(decoded), Ok(command));
    }

    /// R-REV-1: every command a 9.1 unit sends (no networks) survives its 9.1 envelope.
    #[test]
    fn every_outbound_command_survives_the_9_1_wire(command in outbound()) {
        use smcontroller_grpc::proto::v91::servicemanager::v5 as pb91;
        let command = match command {
            Outbound::UpdateNetworks(_) => return Ok(()),
            Outbound::UpdateInstances { stop, start } => Outbound::UpdateInstances {
                stop,
                start: start
                    .into_iter()
                    .map(|s| api::StartInstance::from(s.info))
                    .collect(),
            },
            other => other,
        };
        let wire = pb91::SmIncomingMessages::from(command.clone());
        let decoded = through_bytes(&wire);
        prop_assert_eq!(&decoded, &wire);
        prop_assert_eq!(Outbound::try_from(decoded), Ok(command));
    }

    #[test]
    fn every_inbound_message_survives_the_wire(message in inbound()) {
        let wire = pb::SmOutgoingMessages::from(message.clone());
        let decoded = through_bytes(&wire);
        prop_assert_eq!(&decoded, &wire);
        prop_assert_eq!(Inbound::try_from(decoded), Ok(message));
    }

    #[test]
    fn node_config_survives_its_json(config in node_config()) {
        let json = serde_json::to_string(&config).unwrap();
        let back: api::NodeConfig = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, config);
    }

    #[test]
    fn node_config_version_travels_beside_the_document(config in node_config()) {
        let Some(SmIncomingMessage::CheckNodeConfig(check)) =
            pb::SmIncomingMessages::from(Outbound::CheckNodeConfig(Box::new(config.clone())))
                .sm_incoming_message
        else {
            panic!("not check_node_config");
        };
        prop_assert_eq!(&check.version, &config.version);
        prop_assert_eq!(serde_json::to_string(&config).unwrap(), check.node_config);
    }

    #[test]
    fn a_log_part_comes_back_without_its_node_id(part in log_part(), node in non_empty_text()) {
        let sent = api::LogPart { node_id: api::NodeId::new(node), ..part.clone() };
        let wire = through_bytes(&pb::SmOutgoingMessages::from(Inbound::Log(sent)));
        prop_assert_eq!(Inbound::try_from(wire), Ok(Inbound::Log(part)));
    }

    #[test]
    fn a_filter_instance_above_int64_saturates(instance in (i64::MAX.unsigned_abs() + 1)..) {
        let filter = api::InstanceFilter { instance: Some(instance), ..Default::default() };
        prop_assert_eq!(common::InstanceFilter::from(filter).instance, i64::MAX);
    }

    #[test]
    fn a_negative_filter_instance_means_any(instance in i64::MIN..0) {
        let filter = common::InstanceFilter { instance, ..Default::default() };
        prop_assert_eq!(api::InstanceFilter::from(filter).instance, None);
    }
}

// ---------------------------------------------------------------------------------------------
// R-TEL-4: unknown vocabulary values are rejected, naming the field and the exact value.

proptest! {
    #[test]
    fn r_tel_4_node_config_status_state_outside_vocabulary(
        state in not_in(api::NodeConfigState::ALL, api::NodeConfigState::as_str),
    ) {
        let message = outgoing(SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
            state: state.clone(),
            ..Default::default()
        }));
        prop_assert_eq!(inbound_error(message), unknown("node_config_status.state", state));
    }

    #[test]
    fn r_tel_4_instance_status_state_outside_vocabulary(
        state in not_in(api::InstanceState::ALL, api::InstanceState::as_str),
        snapshot in any::<bool>(),
    ) {
        let instances = vec![status_pb("active".into()), status_pb(state.clone())];
        let message = outgoing(if snapshot {
            SmOutgoingMessage::NodeInstancesStatus(pb::NodeInstancesStatus { instances })
        } else {
            SmOutgoingMessage::UpdateInstancesStatus(pb::UpdateInstancesStatus { instances })
        });
        prop_assert_eq!(inbound_error(message), unknown("instance_status.state", state));
    }

    #[test]
    fn r_tel_4_log_data_status_outside_vocabulary(
        status in not_in(api::LogStatus::ALL, api::LogStatus::as_str),
    ) {
        let message = outgoing(SmOutgoingMessage::Log(pb::LogData {
            status: status.clone(),
            ..Default::default()
        }));
        prop_assert_eq!(inbound_error(message), unknown("log_data.status", status));
    }

    #[test]
    fn r_tel_4_system_quota_alert_status_outside_vocabulary(
        status in not_in(api::QuotaAlertState::ALL, api::QuotaAlertState::as_str),
    ) {
        let message = alert_pb(AlertItem::SystemQuotaAlert(pb::SystemQuotaAlert {
            parameter: "cpu".into(),
            value: 1,
            status: status.clone(),
        }));
        prop_assert_eq!(inbound_error(message), unknown("system_quota_alert.status", status));
    }

    #[test]
    fn r_tel_4_instance_quota_alert_status_outside_vocabulary(
        status in not_in(api::QuotaAlertState::ALL, api::QuotaAlertState::as_str),
    ) {
        let message = alert_pb(AlertItem::InstanceQuotaAlert(pb::InstanceQuotaAlert {
            instance: Some(ident_pb()),
            parameter: "ram".into(),
            value: 1,
            status: status.clone(),
        }));
        prop_assert_eq!(inbound_error(message), unknown("instance_quota_alert.status", status));
    }

    #[test]
    fn r_tel_4_core_alert_component_outside_vocabulary(
        component in not_in(api::CoreComponent::ALL, api::CoreComponent::as_str),
    ) {
        let message = alert_pb(AlertItem::CoreAlert(pb::CoreAlert {
            core_component: component.clone(),
            message: String::new(),
        }));
        prop_assert_eq!(inbound_error(message), unknown("core_alert.core_component", component));
    }

    #[test]
    fn r_tel_4_undeclared_item_type_number(number in any::<i32>().prop_filter("undeclared", |n| !(0..=1).contains(n))) {
        let mut ident = ident_pb();
        ident.r#type = number;
        let message = outgoing(SmOutgoingMessage::UpdateInstancesStatus(pb::UpdateInstancesStatus {
            instances: vec![pb::InstanceStatus {
                instance: Some(ident),
                state: "active".into(),
                ..Default::default()
            }],
        }));
        prop_assert_eq!(inbound_error(message), unknown("instance_ident.type", number.to_string()));
    }

    #[test]
    fn undeclared_connection_status_number(number in any::<i32>().prop_filter("undeclared", |n| !(0..=1).contains(n))) {
        let message = incoming(SmIncomingMessage::ConnectionStatus(pb::ConnectionStatus {
            cloud_status: number,
        }));
        prop_assert_eq!(
            outbound_error(message),
            unknown("connection_status.cloud_status", number.to_string())
        );
    }
}

#[test]
fn r_tel_4_every_vocabulary_value_is_accepted() {
    // The other side of the rejection properties: the spec's table, value by value.
    for state in ["absent", "installed", "failed"] {
        let message = outgoing(SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
            state: state.into(),
            ..Default::default()
        }));
        assert!(Inbound::try_from(message).is_ok(), "{state}");
    }
    for state in ["activating", "active", "inactive", "failed"] {
        let message = outgoing(SmOutgoingMessage::NodeInstancesStatus(
            pb::NodeInstancesStatus {
                instances: vec![status_pb(state.into())],
            },
        ));
        assert!(Inbound::try_from(message).is_ok(), "{state}");
    }
    for status in ["ok", "error", "empty", "absent"] {
        let message = outgoing(SmOutgoingMessage::Log(pb::LogData {
            status: status.into(),
            ..Default::default()
        }));
        assert!(Inbound::try_from(message).is_ok(), "{status}");
    }
    for status in ["raise", "continue", "fall"] {
        let message = alert_pb(AlertItem::SystemQuotaAlert(pb::SystemQuotaAlert {
            status: status.into(),
            ..Default::default()
        }));
        assert!(Inbound::try_from(message).is_ok(), "{status}");
    }
    for component in ["CM", "SM", "IAM", "MP", "unknown"] {
        let message = alert_pb(AlertItem::CoreAlert(pb::CoreAlert {
            core_component: component.into(),
            message: String::new(),
        }));
        assert!(Inbound::try_from(message).is_ok(), "{component}");
    }
}

#[test]
fn r_tel_4_the_reason_names_field_and_value() {
    let error = inbound_error(outgoing(SmOutgoingMessage::NodeConfigStatus(
        pb::NodeConfigStatus {
            state: "instaled".into(),
            ..Default::default()
        },
    )));
    assert_eq!(
        error.to_string(),
        r#"node_config_status.state: unknown value "instaled""#
    );
    let status = tonic::Status::from(error.clone());
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), error.to_string());
}

// ---------------------------------------------------------------------------------------------
// Empty oneofs.

#[test]
fn empty_oneofs_are_named() {
    assert_eq!(
        inbound_error(pb::SmOutgoingMessages::default()),
        ConvertError::EmptyOneof("sm_outgoing_messages.SMOutgoingMessage")
    );
    assert_eq!(
        outbound_error(pb::SmIncomingMessages::default()),
        ConvertError::EmptyOneof("sm_incoming_messages.SMIncomingMessage")
    );
    assert_eq!(
        inbound_error(outgoing(SmOutgoingMessage::Alert(pb::Alert {
            timestamp: now_pb(),
            alert_item: None,
        }))),
        ConvertError::EmptyOneof("alert.AlertItem")
    );
    // Zero bytes on the wire are an empty oneof too.
    assert_eq!(
        inbound_error(pb::SmOutgoingMessages::decode(&[][..]).unwrap()),
        ConvertError::EmptyOneof("sm_outgoing_messages.SMOutgoingMessage")
    );
}

// ---------------------------------------------------------------------------------------------
// R-TEL-4: missing required parts.

#[test]
fn r_tel_4_missing_required_parts_are_named() {
    let sample = pb::MonitoringData {
        timestamp: now_pb(),
        ..Default::default()
    };
    let instant = |node_monitoring, instances_monitoring| {
        outgoing(SmOutgoingMessage::InstantMonitoring(
            pb::InstantMonitoring {
                node_monitoring,
                instances_monitoring,
            },
        ))
    };
    let cases: Vec<(&str, pb::SmOutgoingMessages)> = vec![
        (
            "sm_info.node_id",
            outgoing(SmOutgoingMessage::SmInfo(pb::SmInfo::default())),
        ),
        (
            "instance_status.instance",
            outgoing(SmOutgoingMessage::UpdateInstancesStatus(
                pb::UpdateInstancesStatus {
                    instances: vec![pb::InstanceStatus {
                        state: "active".into(),
                        ..Default::default()
                    }],
                },
            )),
        ),
        ("instant_monitoring.node_monitoring", instant(None, vec![])),
        (
            "average_monitoring.node_monitoring",
            outgoing(SmOutgoingMessage::AverageMonitoring(
                pb::AverageMonitoring::default(),
            )),
        ),
        (
            "monitoring_data.timestamp",
            instant(Some(pb::MonitoringData::default()), vec![]),
        ),
        (
            "instance_monitoring.instance",
            instant(
                Some(sample.clone()),
                vec![pb::InstanceMonitoring {
                    instance: None,
                    runtime_id: String::new(),
                    monitoring_data: Some(sample.clone()),
                }],
            ),
        ),
        (
            "instance_monitoring.monitoring_data",
            instant(
                Some(sample.clone()),
                vec![pb::InstanceMonitoring {
                    instance: Some(ident_pb()),
                    runtime_id: String::new(),
                    monitoring_data: None,
                }],
            ),
        ),
        (
            "alert.timestamp",
            outgoing(SmOutgoingMessage::Alert(pb::Alert {
                timestamp: None,
                alert_item: Some(AlertItem::SystemAlert(pb::SystemAlert::default())),
            })),
        ),
        (
            "instance_quota_alert.instance",
            alert_pb(AlertItem::InstanceQuotaAlert(pb::InstanceQuotaAlert {
                status: "raise".into(),
                ..Default::default()
            })),
        ),
        (
            "resource_allocate_alert.instance",
            alert_pb(AlertItem::ResourceAllocateAlert(
                pb::ResourceAllocateAlert::default(),
            )),
        ),
        (
            "instance_alert.instance",
            alert_pb(AlertItem::InstanceAlert(pb::InstanceAlert::default())),
        ),
    ];
    for (field, message) in cases {
        let error = inbound_error(message);
        assert_eq!(error, ConvertError::MissingField(field));
        assert!(error.to_string().starts_with(field), "{error}");
    }

    assert_eq!(
        outbound_error(incoming(SmIncomingMessage::UpdateInstances(
            pb::UpdateInstances {
                start_instances: vec![pb::InstanceInfo::default()],
                stop_instances: vec![],
            }
        ))),
        ConvertError::MissingField("instance_info.instance")
    );
}

#[test]
fn optional_parts_may_be_absent() {
    let message = outgoing(SmOutgoingMessage::SmInfo(pb::SmInfo {
        node_id: "n1".into(),
        runtimes: vec![pb::RuntimeInfo::default()],
        resources: vec![],
    }));
    let Ok(Inbound::SmInfo(info)) = Inbound::try_from(message) else {
        panic!("sm_info without os_info/arch_info must convert");
    };
    assert_eq!(info.runtimes[0].os_info, None);
    assert_eq!(info.runtimes[0].arch_info, None);

    let message = outgoing(SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
        state: "installed".into(),
        version: "1.0.0".into(),
        error: None,
    }));
    let Ok(Inbound::NodeConfigStatus(status)) = Inbound::try_from(message) else {
        panic!("node_config_status without error must convert");
    };
    assert_eq!(status.error, None);
}

#[test]
fn a_missing_alert_rule_duration_is_zero() {
    let rules = pb::AlertRules {
        ram: Some(pb::AlertRulePercents {
            duration: None,
            min_threshold: 1.0,
            max_threshold: 2.0,
        }),
        download: Some(pb::AlertRulePoints {
            duration: None,
            min_threshold: 1,
            max_threshold: 2,
        }),
        partitions: vec![pb::PartitionAlertRule {
            name: "state".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let rules = api::AlertRules::try_from(rules).unwrap();
    assert_eq!(rules.ram.unwrap().min_timeout, Duration::ZERO);
    assert_eq!(rules.download.unwrap().min_timeout, Duration::ZERO);
    assert_eq!(rules.partitions[0].min_timeout, Duration::ZERO);
}

#[test]
fn an_absent_log_filter_means_any_instance() {
    let message = incoming(SmIncomingMessage::InstanceLogRequest(
        pb::InstanceLogRequest {
            correlation_id: "c".into(),
            ..Default::default()
        },
    ));
    assert_eq!(
        Outbound::try_from(message),
        Ok(Outbound::InstanceLog(Box::new(LogQuery {
            correlation_id: "c".into(),
            ..Default::default()
        })))
    );
}

// ---------------------------------------------------------------------------------------------
// Timestamps, durations and node configurations that are not valid.

#[test]
fn out_of_range_timestamp_nanos_are_rejected() {
    for nanos in [-1, 1_000_000_000, i32::MAX, i32::MIN] {
        let error = inbound_error(outgoing(SmOutgoingMessage::Alert(pb::Alert {
            timestamp: Some(prost_types::Timestamp { seconds: 1, nanos }),
            alert_item: Some(AlertItem::SystemAlert(pb::SystemAlert::default())),
        })));
        let ConvertError::InvalidTimestamp { field, reason } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(*field, "alert.timestamp");
        assert!(reason.contains(&nanos.to_string()), "{reason}");
    }
    let error = outbound_error(incoming(SmIncomingMessage::SystemLogRequest(
        pb::SystemLogRequest {
            from: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            }),
            ..Default::default()
        },
    )));
    assert!(
        matches!(
            error,
            ConvertError::InvalidTimestamp {
                field: "system_log_request.from",
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn negative_and_malformed_durations_are_rejected() {
    let info = |duration| {
        incoming(SmIncomingMessage::UpdateInstances(pb::UpdateInstances {
            start_instances: vec![pb::InstanceInfo {
                instance: Some(ident_pb()),
                monitoring_parameters: Some(pb::MonitoringParameters {
                    alert_rules: Some(pb::AlertRules {
                        cpu: Some(pb::AlertRulePercents {
                            duration: Some(duration),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }],
            stop_instances: vec![],
        }))
    };
    for (seconds, nanos) in [(-1, 0), (0, -1), (1, 1_000_000_000)] {
        let error = outbound_error(info(prost_types::Duration { seconds, nanos }));
        assert!(
            matches!(
                &error,
                ConvertError::InvalidDuration {
                    field: "alert_rule_percents.duration",
                    reason,
                } if reason.contains(&seconds.to_string()) && reason.contains(&nanos.to_string())
            ),
            "{error:?}"
        );
    }
}

#[test]
fn bad_node_config_json_names_the_field() {
    for (message, field) in [
        (
            SmIncomingMessage::CheckNodeConfig(pb::CheckNodeConfig {
                node_config: "{not json".into(),
                version: "1".into(),
            }),
            "check_node_config.node_config",
        ),
        (
            SmIncomingMessage::SetNodeConfig(pb::SetNodeConfig {
                node_config: r#"{"version":"1","alertRules":{"ram":{"minTimeout":"P1M"}}}"#.into(),
                version: "1".into(),
            }),
            "set_node_config.node_config",
        ),
    ] {
        let error = outbound_error(incoming(message));
        assert!(
            matches!(&error, ConvertError::InvalidNodeConfig { field: f, .. } if *f == field),
            "{error:?}"
        );
        assert!(error.to_string().starts_with(field), "{error}");
    }
}

#[test]
fn the_spec_example_node_config_parses() {
    let json = r#"{"version":"1.0.0","node":{"codename":"node-id"},
        "nodeGroupSubject":{"codename":"mainType"},
        "alertRules":{"ram":{"minTimeout":"PT1S","minThreshold":0.1,"maxThreshold":0.2}},
        "resourceRatios":{"cpu":50,"ram":51,"storage":52,"state":53},
        "labels":["mainNode"],"priority":1}"#;
    let command = Outbound::try_from(incoming(SmIncomingMessage::SetNodeConfig(
        pb::SetNodeConfig {
            node_config: json.into(),
            version: "1.0.0".into(),
        },
    )))
    .unwrap();
    let Outbound::SetNodeConfig(config) = command else {
        panic!("not set_node_config");
    };
    assert_eq!(config.version, "1.0.0");
    assert_eq!(
        config.alert_rules.unwrap().ram.unwrap().min_timeout,
        Duration::from_secs(1)
    );
    assert_eq!(config.resource_ratios.unwrap().storage, Some(52.0));
    assert_eq!(config.labels, ["mainNode"]);
}
