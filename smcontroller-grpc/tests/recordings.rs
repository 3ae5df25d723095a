//! The project against wire traffic recorded from the Aos reference implementation (v9.1.1,
//! `shared/fixtures/real-aos`, see its README).
//!
//! - What the real SM sent (`sm->cm` lines and `blobs-request` of `sm-session.jsonl`) decodes
//!   with our generated types, converts to [`Inbound`], and means what the bytes say: every
//!   empty `ErrorInfo` is a success (`error: None`), and the values come through.
//! - Every command in both files (`cm->sm`; in `cm-session.jsonl` the reference controller's own
//!   bytes) decodes, converts to [`Outbound`], and comes out of our conversion meaning the same:
//!   the same message field by field, node configuration documents compared as JSON values.
//! - Everywhere a status carries `error`, an `ErrorInfo` with both codes 0 is success whatever
//!   its message, a non-zero code is a failure with those codes, and our own statuses write
//!   success as an empty `ErrorInfo` and never write a failure that reads as success.

mod real_aos;

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proptest::prelude::*;
use prost::Message as _;
use real_aos::{CM_SESSION, Dir, Line, SM_SESSION, assert_same_command, load};
use smcontroller_api as api;
use smcontroller_grpc::proto::{
    common::v2 as common,
    servicemanager::v5::{
        self as pb, sm_incoming_messages::SmIncomingMessage,
        sm_outgoing_messages::SmOutgoingMessage,
    },
};
use smcontroller_routing::{Inbound, LogQuery, Outbound};

/// The manifest digest of the instance the recorded session starts.
const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

fn lines(file: &'static str, dir: Dir) -> Vec<Line> {
    load(file).into_iter().filter(|l| l.dir == dir).collect()
}

/// What the real SM sent, converted; panics naming the line if it does not convert.
fn real_sm_messages() -> Vec<(Line, Inbound)> {
    lines(SM_SESSION, Dir::SmToCm)
        .into_iter()
        .map(|line| {
            let inbound = Inbound::try_from(line.sm_outgoing())
                .unwrap_or_else(|e| panic!("{line}: does not convert: {e}"));
            (line, inbound)
        })
        .collect()
}

fn at(seconds: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(seconds, nanos)
}

fn ident(item_id: &str, subject_id: &str) -> api::InstanceIdent {
    api::InstanceIdent {
        item_id: item_id.into(),
        subject_id: subject_id.into(),
        ..Default::default()
    }
}

fn storages() -> Vec<api::PartitionUsage> {
    vec![api::PartitionUsage {
        name: "storages".into(),
        used_size: 64 << 20,
    }]
}

// ---------------------------------------------------------------------------------------------
// The fixtures themselves.

#[test]
fn a_missing_fixture_folder_fails_naming_where_it_looked_and_the_override() {
    let nowhere = Path::new("/nonexistent/shared/fixtures/real-aos");
    let panic = std::panic::catch_unwind(|| real_aos::load_from(nowhere, SM_SESSION))
        .expect_err("a missing folder must fail the test, never skip it");
    let message = panic
        .downcast_ref::<String>()
        .expect("the panic carries a message");
    assert!(message.contains("/nonexistent/shared/fixtures/real-aos/sm-session.jsonl"));
    assert!(message.contains("SMCONTROLLER_FIXTURES"), "{message}");
    assert!(message.contains("<workspace>/../shared/fixtures/real-aos"));
}

#[test]
fn every_recorded_message_re_encodes_to_its_recorded_bytes() {
    // prost drops fields it does not know, so equal bytes mean our schema carries every field
    // the reference wrote, and what a test sends after decoding a line is the recorded bytes.
    for file in [SM_SESSION, CM_SESSION] {
        for line in load(file) {
            let again = match line.dir {
                Dir::SmToCm => line.sm_outgoing().encode_to_vec(),
                Dir::CmToSm => line.sm_incoming().encode_to_vec(),
                Dir::BlobsRequest => line.blobs_request().encode_to_vec(),
                Dir::BlobsReply => line.blobs_reply().encode_to_vec(),
            };
            assert_eq!(again, line.bytes, "{line}");
        }
    }
}

/// The recordings are of Aos 9.1.1 (README, point 6): every command decodes with our 9.1
/// types to the same bytes, and what our 9.1 unit sends for it is the reference's command.
#[test]
fn r_rev_1_every_recorded_command_is_ours_in_the_9_1_revision_too() {
    use smcontroller_grpc::proto::v91::servicemanager::v5 as pb91;
    let mut compared = 0;
    for file in [SM_SESSION, CM_SESSION] {
        for line in lines(file, Dir::CmToSm) {
            let recorded = pb91::SmIncomingMessages::decode(line.bytes.as_slice())
                .unwrap_or_else(|e| panic!("{line}: not a 9.1 command: {e}"));
            assert_eq!(recorded.encode_to_vec(), line.bytes, "{line}");
            if lacks_node_group_subject(&line) {
                continue;
            }
            let command = Outbound::try_from(recorded)
                .unwrap_or_else(|e| panic!("{line}: does not convert to Outbound: {e}"));
            let ours = pb91::SmIncomingMessages::from(command);
            // Read back with 9.0's types, where the comparison knows every field: a 9.1
            // command without monitoring parameters has the same bytes in both revisions.
            let ours = pb::SmIncomingMessages::decode(ours.encode_to_vec().as_slice()).unwrap();
            assert_same_command(&line, &ours, &line.sm_incoming());
            compared += 1;
        }
    }
    assert_eq!(compared, 24);
}

// ---------------------------------------------------------------------------------------------
// What the real SM sent.

#[test]
fn every_message_the_real_sm_sent_converts_to_inbound() {
    let messages = real_sm_messages();
    assert_eq!(messages.len(), 28, "sm->cm lines of {SM_SESSION}");
    for (line, inbound) in &messages {
        assert_eq!(
            inbound.name(),
            line.kind,
            "{line}: converted to another kind"
        );
    }
}

#[test]
fn r_sync_1_every_empty_error_the_real_sm_sent_reads_as_success() {
    // The real SM writes an empty `ErrorInfo` on every status: on the wire it is present, in
    // the domain it is `None`. A check/set answered so succeeds (R-SYNC-1).
    let empty = Some(common::ErrorInfo::default());
    let (mut config, mut instances, mut env_vars, mut logs) = (0, 0, 0, 0);
    for (line, inbound) in real_sm_messages() {
        match (line.sm_outgoing().sm_outgoing_message, inbound) {
            (
                Some(SmOutgoingMessage::NodeConfigStatus(wire)),
                Inbound::NodeConfigStatus(status),
            ) => {
                assert_eq!(
                    wire.error, empty,
                    "{line}: the real SM sends an empty error"
                );
                assert_eq!(status.error, None, "{line}");
                config += 1;
            }
            (
                Some(
                    SmOutgoingMessage::UpdateInstancesStatus(pb::UpdateInstancesStatus {
                        instances: wire,
                    })
                    | SmOutgoingMessage::NodeInstancesStatus(pb::NodeInstancesStatus {
                        instances: wire,
                    }),
                ),
                Inbound::UpdateInstancesStatus(statuses) | Inbound::NodeInstancesStatus(statuses),
            ) => {
                for (wire, status) in wire.iter().zip(&statuses) {
                    assert_eq!(
                        wire.error, empty,
                        "{line}: the real SM sends an empty error"
                    );
                    assert_eq!(status.error, None, "{line}: instance {:?}", status.ident);
                    instances += 1;
                    for (wire, env) in wire.env_vars.iter().zip(&status.env_vars) {
                        assert_eq!(
                            wire.error, empty,
                            "{line}: the real SM sends an empty error"
                        );
                        assert_eq!(env.error, None, "{line}: env var {}", env.name);
                        env_vars += 1;
                    }
                }
            }
            (Some(SmOutgoingMessage::Log(wire)), Inbound::Log(part)) => {
                assert_eq!(
                    wire.error, empty,
                    "{line}: the real SM sends an empty error"
                );
                assert_eq!(part.error, None, "{line}");
                logs += 1;
            }
            _ => {}
        }
    }
    // Not vacuous: the recording has each kind of carrier.
    assert_eq!((config, instances, env_vars, logs), (4, 1, 1, 6));
}

#[test]
fn the_real_sms_sm_info_gives_node_a_its_runtime_and_resource() {
    let (line, first) = real_sm_messages().remove(0);
    let Inbound::SmInfo(info) = first else {
        panic!("{line}: the real SM's first message is not sm_info")
    };
    assert_eq!(
        info,
        api::SmInfo {
            node_id: api::NodeId::new("node-a"),
            runtimes: vec![api::RuntimeInfo {
                runtime_id: "runc".into(),
                runtime_type: "runc".into(),
                max_dmips: 10_000,
                allowed_dmips: 8_000,
                total_ram: 2 << 30,
                allowed_ram: 1 << 30,
                max_instances: 16,
                os_info: Some(api::OsInfo {
                    os: "linux".into(),
                    ..Default::default()
                }),
                arch_info: Some(api::ArchInfo {
                    architecture: "amd64".into(),
                    variant: String::new(),
                }),
            }],
            resources: vec![api::ResourceInfo {
                name: "peer-dev".into(),
                shared_count: 2,
            }],
        }
    );
}

#[test]
fn the_real_sms_statuses_carry_the_recorded_states_and_versions() {
    let messages = real_sm_messages();
    let configs: Vec<_> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Inbound::NodeConfigStatus(s) => Some((s.state, s.version.as_str())),
            _ => None,
        })
        .collect();
    let installed = api::NodeConfigState::Installed;
    assert_eq!(
        configs,
        [
            (installed, "1.0.0"), // get_node_config_status
            (installed, "2.0.0"), // check_node_config 2.0.0
            (installed, "2.0.0"), // set_node_config 2.0.0
            (installed, "1.0.0"), // get_node_config_status again
        ]
    );

    let instances: Vec<_> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Inbound::NodeInstancesStatus(s) => Some(("node", s.clone())),
            Inbound::UpdateInstancesStatus(s) => Some(("update", s.clone())),
            _ => None,
        })
        .collect();
    let started = api::InstanceStatus {
        ident: ident("svc-1", "subj-1"),
        version: "1.0.0".into(),
        runtime_id: "runc".into(),
        manifest_digest: DIGEST.into(),
        env_vars: vec![api::EnvVarStatus {
            name: "LOG_LEVEL".into(),
            error: None,
        }],
        state: api::InstanceState::Active,
        error: None,
    };
    assert_eq!(
        instances,
        [
            ("node", vec![]),          // the snapshot at registration: nothing runs
            ("update", vec![started]), // after the start
            ("update", vec![]),        // after the stop: no instances
        ]
    );
}

#[test]
fn the_real_sms_log_parts_answer_each_request_in_two_ok_parts() {
    let parts: Vec<api::LogPart> = real_sm_messages()
        .into_iter()
        .filter_map(|(_, m)| match m {
            Inbound::Log(part) => Some(part),
            _ => None,
        })
        .collect();
    let mut expected = Vec::new();
    for correlation_id in ["log-sys-1", "log-inst-1", "log-crash-1"] {
        for part in 1..=2 {
            expected.push(api::LogPart {
                node_id: api::NodeId::new(""), // the router fills it in from the stream
                correlation_id: correlation_id.into(),
                part,
                part_count: 2,
                data: format!("peer log part {part} from node-a\n").into_bytes(),
                status: api::LogStatus::Ok,
                error: None,
            });
        }
    }
    assert_eq!(parts, expected);
}

#[test]
fn the_real_sms_monitoring_and_alerts_convert_with_their_values() {
    let messages = real_sm_messages();
    let find = |line: usize| {
        messages
            .iter()
            .find(|(l, _)| l.number == line)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| panic!("{SM_SESSION} has no sm->cm line {line}"))
    };
    assert_eq!(
        find(6),
        Inbound::InstantMonitoring(api::NodeMonitoringData {
            node: api::MonitoringData {
                timestamp: at(1_795_631_842, 609_246_100),
                ram: 537_919_488,
                cpu: 10,
                partitions: storages(),
                download: 1000,
                upload: 500,
            },
            instances: vec![],
        })
    );
    assert_eq!(
        find(15),
        Inbound::AverageMonitoring(api::NodeMonitoringData {
            node: api::MonitoringData {
                timestamp: at(1_795_631_844, 130_889_237),
                ram: 540_016_640,
                cpu: 11,
                partitions: storages(),
                download: 3000,
                upload: 1500,
            },
            instances: vec![],
        })
    );
    let Inbound::InstantMonitoring(with_instance) = find(21) else {
        panic!("line 21 is not instant_monitoring")
    };
    assert_eq!(
        with_instance.instances,
        [api::InstanceMonitoring {
            ident: ident("svc-1", "subj-1"),
            runtime_id: "runc".into(),
            data: api::MonitoringData {
                timestamp: at(1_795_631_844, 610_472_758),
                ram: 32 << 20,
                cpu: 1,
                partitions: vec![],
                download: 0,
                upload: 0,
            },
        }]
    );
    assert_eq!(
        find(9),
        Inbound::Alert(api::Alert {
            timestamp: at(1_795_631_843, 108_952_671),
            kind: api::AlertKind::System {
                message: "peer system alert #1".into()
            },
        })
    );
    let alerts: Vec<String> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Inbound::Alert(api::Alert {
                kind: api::AlertKind::System { message },
                ..
            }) => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        alerts,
        (1..=5)
            .map(|n| format!("peer system alert #{n}"))
            .collect::<Vec<_>>()
    );
    let instant = messages
        .iter()
        .filter(|(_, m)| matches!(m, Inbound::InstantMonitoring(_)))
        .count();
    assert_eq!(instant, 8);
}

#[test]
fn the_real_sms_blob_lookup_asks_for_the_started_instances_manifest() {
    let requests = lines(SM_SESSION, Dir::BlobsRequest);
    let replies = lines(SM_SESSION, Dir::BlobsReply);
    assert_eq!((requests.len(), replies.len()), (1, 1));
    let request = requests[0].blobs_request();
    let reply = replies[0].blobs_reply();
    assert_eq!(request.digests, [DIGEST]);
    // One URL per digest, in order (R-BLOB-1).
    assert_eq!(
        reply.urls,
        [format!("https://cloud.example/blobs/{DIGEST}")]
    );

    // The digest is the manifest of the instance the last command before it started.
    let started = load(SM_SESSION)
        .into_iter()
        .take_while(|l| l.dir != Dir::BlobsRequest)
        .filter(|l| l.dir == Dir::CmToSm)
        .last()
        .expect("a command before the blob lookup");
    let Ok(Outbound::UpdateInstances { start, .. }) = Outbound::try_from(started.sm_incoming())
    else {
        panic!("{started}: not an update_instances")
    };
    assert_eq!(
        start[0].info.manifest_digest, request.digests[0],
        "{started}"
    );
}

// ---------------------------------------------------------------------------------------------
// The commands, ours against the reference's.

/// The line whose config the real SM cannot parse (it sends no reply).
fn lacks_node_group_subject(line: &Line) -> bool {
    line.note.starts_with("config without nodeGroupSubject")
}

#[test]
fn every_recorded_command_means_the_same_when_we_send_it() {
    for (file, expected) in [(SM_SESSION, 11), (CM_SESSION, 13)] {
        let mut compared = 0;
        for line in lines(file, Dir::CmToSm) {
            if lacks_node_group_subject(&line) {
                continue; // our api cannot build it: see the next test
            }
            let recorded = line.sm_incoming();
            let command = Outbound::try_from(recorded.clone())
                .unwrap_or_else(|e| panic!("{line}: does not convert to Outbound: {e}"));
            assert_eq!(
                command.name(),
                line.kind,
                "{line}: converted to another kind"
            );
            let ours = pb::SmIncomingMessages::from(command);
            // What we send, as an SM reads it from the wire.
            let ours = pb::SmIncomingMessages::decode(ours.encode_to_vec().as_slice()).unwrap();
            assert_same_command(&line, &ours, &recorded);
            compared += 1;
        }
        assert_eq!(compared, expected, "commands compared in {file}");
    }
}

#[test]
fn the_comparison_reads_node_configs_as_json_values() {
    let check = |json: &str| pb::SmIncomingMessages {
        sm_incoming_message: Some(SmIncomingMessage::CheckNodeConfig(pb::CheckNodeConfig {
            node_config: json.into(),
            version: "1".into(),
        })),
    };
    let recorded = check(r#"{"a":{"cpu":50,"x":[0.5]},"b":"s"}"#);
    // The same meaning: another number spelling, another key order.
    let same = check(r#"{"b":"s","a":{"x":[5e-1],"cpu":50.0}}"#);
    assert_same_command(&"same", &same, &recorded);
    for differs in [
        r#"{"a":{"cpu":51,"x":[0.5]},"b":"s"}"#,
        r#"{"a":{"cpu":50,"x":[0.5]}}"#,
        r#"{"a":{"cpu":50,"x":[0.5]},"b":"s","c":1}"#,
        r#"{"a":{"cpu":"50","x":[0.5]},"b":"s"}"#,
        r#"{"a":{"cpu":50,"x":[0.5,0.5]},"b":"s"}"#,
    ] {
        let ours = check(differs);
        let caught = std::panic::catch_unwind(|| assert_same_command(&"differs", &ours, &recorded));
        assert!(
            caught.is_err(),
            "{differs} passed as the same as the recording"
        );
    }
    // Outside the document, every field counts.
    let mut other_version = check(r#"{"a":{"cpu":50,"x":[0.5]},"b":"s"}"#);
    if let Some(SmIncomingMessage::CheckNodeConfig(c)) = &mut other_version.sm_incoming_message {
        c.version = "2".into();
    }
    let caught =
        std::panic::catch_unwind(|| assert_same_command(&"version", &other_version, &recorded));
    assert!(caught.is_err(), "a different version passed as the same");
}

#[test]
fn a_config_without_node_group_subject_does_not_convert_and_names_it() {
    let found: Vec<Line> = lines(SM_SESSION, Dir::CmToSm)
        .into_iter()
        .filter(lacks_node_group_subject)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "the line noted \"config without nodeGroupSubject\""
    );
    let line = &found[0];
    let Some(SmIncomingMessage::CheckNodeConfig(check)) = line.sm_incoming().sm_incoming_message
    else {
        panic!("{line}: not a check_node_config")
    };
    assert_eq!(check.node_config, r#"{"version":"3.0.0"}"#);
    let error = Outbound::try_from(line.sm_incoming())
        .expect_err("a config without nodeGroupSubject cannot be a NodeConfig");
    assert!(
        error.to_string().contains("nodeGroupSubject"),
        "{line}: {error}"
    );
    assert!(
        error.to_string().contains("check_node_config"),
        "{line}: {error}"
    );
}

#[test]
fn the_reference_controllers_commands_read_with_their_values() {
    let commands: Vec<Outbound> = lines(CM_SESSION, Dir::CmToSm)
        .iter()
        .map(|line| Outbound::try_from(line.sm_incoming()).unwrap())
        .collect();
    let config = |version: &str| {
        let mut config = api::NodeConfig::new(version, "peer-node");
        config.node = Some(api::Codename {
            codename: "node-a".into(),
        });
        config.labels = vec!["peer".into()];
        config.priority = 10;
        config
    };
    let start = |seq: &str| Outbound::UpdateInstances {
        stop: vec![],
        start: vec![api::StartInstance::from(api::InstanceInfo {
            ident: ident("service-1", "subject-1"),
            version: "1.0.0".into(),
            manifest_digest:
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            owner_id: "owner-1".into(),
            runtime_id: "runc".into(),
            uid: 5001,
            gid: 5001,
            priority: 100,
            storage_path: "/var/aos/storages/service-1".into(),
            state_path: "/var/aos/states/service-1".into(),
            env_vars: vec![api::EnvVarInfo {
                name: "PEER_SEQ".into(),
                value: seq.into(),
            }],
            monitoring_parameters: None,
        })],
    };
    let system_log = |correlation_id: &str, from: SystemTime| {
        Outbound::SystemLog(Box::new(LogQuery {
            correlation_id: correlation_id.into(),
            filter: api::InstanceFilter::default(),
            from: Some(from),
            till: None,
        }))
    };
    assert_eq!(
        commands,
        [
            Outbound::ConnectionStatus(true),
            Outbound::GetNodeConfigStatus,
            Outbound::GetAverageMonitoring,
            Outbound::CheckNodeConfig(Box::new(config("1.0.1"))),
            Outbound::SetNodeConfig(Box::new(config("1.0.1"))),
            start("1"),
            system_log("log-node-a-1", at(1_795_628_271, 60_513_959)),
            Outbound::GetNodeConfigStatus,
            Outbound::GetAverageMonitoring,
            Outbound::CheckNodeConfig(Box::new(config("1.0.2"))),
            Outbound::SetNodeConfig(Box::new(config("1.0.2"))),
            start("2"),
            system_log("log-node-a-2", at(1_795_628_273, 65_902_942)),
        ]
    );
}

#[test]
fn an_absent_error_from_the_recording_sm_reads_as_success() {
    // The recording SM of cm-session.jsonl wrote no `error` at all on its node_config_status.
    let mut seen = 0;
    for line in lines(CM_SESSION, Dir::SmToCm) {
        if let Some(SmOutgoingMessage::NodeConfigStatus(wire)) =
            line.sm_outgoing().sm_outgoing_message
        {
            assert_eq!(wire.error, None, "{line}");
            let Ok(Inbound::NodeConfigStatus(status)) = Inbound::try_from(line.sm_outgoing())
            else {
                panic!("{line}: does not convert")
            };
            assert_eq!(status.error, None, "{line}");
            assert_eq!(status.state, api::NodeConfigState::Installed, "{line}");
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
}

// ---------------------------------------------------------------------------------------------
// Every place a status carries `error` (wire spec, "Conventions of the protocol").

/// A place where an `ErrorInfo` travels in an SM message.
#[derive(Debug, Clone, Copy)]
enum Carrier {
    NodeConfigStatus,
    UpdatedInstance,
    SnapshotInstance,
    UpdatedInstanceEnvVar,
    SnapshotInstanceEnvVar,
    LogPart,
}

const CARRIERS: [Carrier; 6] = [
    Carrier::NodeConfigStatus,
    Carrier::UpdatedInstance,
    Carrier::SnapshotInstance,
    Carrier::UpdatedInstanceEnvVar,
    Carrier::SnapshotInstanceEnvVar,
    Carrier::LogPart,
];

impl Carrier {
    /// An SM message with `error` in this place and `rest` in every other place.
    fn wire(
        self,
        error: Option<common::ErrorInfo>,
        rest: Option<common::ErrorInfo>,
    ) -> pb::SmOutgoingMessages {
        let status = |error, env_error| pb::InstanceStatus {
            instance: Some(ident("svc-1", "subj-1").into()),
            env_vars: vec![pb::EnvVarStatus {
                name: "LOG_LEVEL".into(),
                error: env_error,
            }],
            state: "active".into(),
            error,
            ..Default::default()
        };
        let message = match self {
            Self::NodeConfigStatus => SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
                state: "installed".into(),
                version: "1.0.0".into(),
                error,
            }),
            Self::UpdatedInstance | Self::UpdatedInstanceEnvVar => {
                let instances = vec![match self {
                    Self::UpdatedInstance => status(error, rest),
                    _ => status(rest, error),
                }];
                SmOutgoingMessage::UpdateInstancesStatus(pb::UpdateInstancesStatus { instances })
            }
            Self::SnapshotInstance | Self::SnapshotInstanceEnvVar => {
                let instances = vec![match self {
                    Self::SnapshotInstance => status(error, rest),
                    _ => status(rest, error),
                }];
                SmOutgoingMessage::NodeInstancesStatus(pb::NodeInstancesStatus { instances })
            }
            Self::LogPart => SmOutgoingMessage::Log(pb::LogData {
                correlation_id: "log-1".into(),
                part_count: 1,
                part: 1,
                data: vec![],
                status: "error".into(),
                error,
            }),
        };
        pb::SmOutgoingMessages {
            sm_outgoing_message: Some(message),
        }
    }

    /// The domain message of [`wire`](Self::wire), with `error` in this place and success in
    /// every other place.
    fn domain(self, error: Option<api::ErrorInfo>) -> Inbound {
        let status = |error, env_error| api::InstanceStatus {
            ident: ident("svc-1", "subj-1"),
            version: String::new(),
            runtime_id: String::new(),
            manifest_digest: String::new(),
            env_vars: vec![api::EnvVarStatus {
                name: "LOG_LEVEL".into(),
                error: env_error,
            }],
            state: api::InstanceState::Active,
            error,
        };
        match self {
            Self::NodeConfigStatus => Inbound::NodeConfigStatus(api::NodeConfigStatus {
                state: api::NodeConfigState::Installed,
                version: "1.0.0".into(),
                error,
            }),
            Self::UpdatedInstance => Inbound::UpdateInstancesStatus(vec![status(error, None)]),
            Self::UpdatedInstanceEnvVar => {
                Inbound::UpdateInstancesStatus(vec![status(None, error)])
            }
            Self::SnapshotInstance => Inbound::NodeInstancesStatus(vec![status(error, None)]),
            Self::SnapshotInstanceEnvVar => Inbound::NodeInstancesStatus(vec![status(None, error)]),
            Self::LogPart => Inbound::Log(api::LogPart {
                node_id: api::NodeId::new(""),
                correlation_id: "log-1".into(),
                part: 1,
                part_count: 1,
                data: vec![],
                status: api::LogStatus::Error,
                error,
            }),
        }
    }
}

/// What an SM message becomes, read from its bytes.
fn read(message: &pb::SmOutgoingMessages) -> Inbound {
    let decoded = pb::SmOutgoingMessages::decode(message.encode_to_vec().as_slice()).unwrap();
    Inbound::try_from(decoded).expect("converts")
}

/// A non-zero code.
fn non_zero() -> impl Strategy<Value = i32> {
    any::<i32>().prop_filter("non-zero", |c| *c != 0)
}

/// `(aos_code, exit_code)` of a failure: either or both non-zero.
fn failing_codes() -> impl Strategy<Value = (i32, i32)> {
    prop_oneof![
        (non_zero(), Just(0)),
        (Just(0), non_zero()),
        (non_zero(), non_zero()),
    ]
}

proptest! {
    #[test]
    fn error_info_with_both_codes_zero_is_success_whatever_its_message(
        message in any::<String>(),
    ) {
        let empty = common::ErrorInfo { aos_code: 0, exit_code: 0, message };
        for carrier in CARRIERS {
            let wire = carrier.wire(Some(empty.clone()), None);
            prop_assert_eq!(read(&wire), carrier.domain(None), "{:?}", carrier);
        }
    }

    #[test]
    fn error_info_with_a_non_zero_code_is_a_failure_with_those_codes(
        (aos_code, exit_code) in failing_codes(),
        message in any::<String>(),
    ) {
        let wire_error = common::ErrorInfo { aos_code, exit_code, message: message.clone() };
        let error = api::ErrorInfo { aos_code, exit_code, message };
        for carrier in CARRIERS {
            let wire = carrier.wire(Some(wire_error.clone()), None);
            prop_assert_eq!(read(&wire), carrier.domain(Some(error.clone())), "{:?}", carrier);
            // And ours goes out with the same codes.
            prop_assert_eq!(
                pb::SmOutgoingMessages::from(carrier.domain(Some(error.clone()))),
                carrier.wire(Some(wire_error.clone()), Some(common::ErrorInfo::default())),
                "{:?}", carrier
            );
        }
    }

    #[test]
    fn error_info_a_failure_with_both_codes_zero_goes_as_the_generic_aos_failure(
        message in any::<String>(),
    ) {
        let error = api::ErrorInfo { aos_code: 0, exit_code: 0, message: message.clone() };
        let aos_failed = common::ErrorInfo {
            aos_code: api::ErrorInfo::AOS_FAILED,
            exit_code: 0,
            message: message.clone(),
        };
        prop_assert_eq!(aos_failed.aos_code, 1);
        for carrier in CARRIERS {
            let wire = pb::SmOutgoingMessages::from(carrier.domain(Some(error.clone())));
            prop_assert_eq!(
                &wire,
                &carrier.wire(Some(aos_failed.clone()), Some(common::ErrorInfo::default())),
                "{:?}", carrier
            );
            // It still reads as a failure, not as success.
            let failed = api::ErrorInfo { aos_code: 1, exit_code: 0, message: message.clone() };
            prop_assert_eq!(read(&wire), carrier.domain(Some(failed)), "{:?}", carrier);
        }
    }
}

#[test]
fn error_info_success_goes_as_an_empty_error_info_everywhere() {
    // Present, codes 0, no message: as the real SM writes it.
    for carrier in CARRIERS {
        let empty = Some(common::ErrorInfo::default());
        assert_eq!(
            pb::SmOutgoingMessages::from(carrier.domain(None)),
            carrier.wire(empty.clone(), empty),
            "{carrier:?}"
        );
    }
}
