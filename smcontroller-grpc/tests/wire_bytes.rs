//! Bytes on the wire, computed by hand from the field numbers of `wire-protocol.md`.
//!
//! A protobuf key is one varint: `field_number << 3 | wire_type`, with wire type 0 for varints
//! (`int32`, `int64`, `uint64`, `bool`, enums), 1 for 64-bit (`double`) and 2 for
//! length-delimited (strings, bytes, sub-messages). A length-delimited value is its length as a
//! varint, then its bytes. Fields with their default value are not written (proto3), and prost
//! writes fields in field-number order. Each expected byte string below is derived in its
//! comments and compared with `prost::Message::encode_to_vec`; hand-written bytes are also
//! decoded back.

use std::time::{Duration, UNIX_EPOCH};

use prost::Message as _;
use smcontroller_api as api;
use smcontroller_grpc::proto::v91::servicemanager::v5::{
    self as pb91, sm_incoming_messages::SmIncomingMessage as Incoming91,
};
use smcontroller_grpc::proto::{
    common::v2 as common,
    servicemanager::v5::{
        self as pb, alert::AlertItem, sm_incoming_messages::SmIncomingMessage,
        sm_outgoing_messages::SmOutgoingMessage,
    },
};
use smcontroller_routing::{Inbound, Outbound};

#[test]
fn connection_status_connected() {
    let message = pb::SmIncomingMessages::from(Outbound::ConnectionStatus(true));
    let expected = [
        0x4A, // SMIncomingMessages.connection_status: field 9, wire type 2 -> 9 << 3 | 2 = 74
        0x02, // length of the ConnectionStatus that follows: 2 bytes
        0x08, // ConnectionStatus.cloud_status: field 1, wire type 0 -> 1 << 3 | 0 = 8
        0x01, // CONNECTED = 1
    ];
    assert_eq!(message.encode_to_vec(), expected);

    let decoded = pb::SmIncomingMessages::decode(&expected[..]).unwrap();
    assert_eq!(
        decoded.sm_incoming_message,
        Some(SmIncomingMessage::ConnectionStatus(pb::ConnectionStatus {
            cloud_status: pb::ConnectionEnum::Connected.into(),
        }))
    );
    assert_eq!(
        Outbound::try_from(decoded).unwrap(),
        Outbound::ConnectionStatus(true)
    );
}

#[test]
fn connection_status_disconnected_is_an_empty_but_present_sub_message() {
    let message = pb::SmIncomingMessages::from(Outbound::ConnectionStatus(false));
    // Field 9, wire type 2 (0x4A), length 0: DISCONNECTED = 0 is the default and is not
    // written, but the oneof member itself is present.
    let expected = [0x4A, 0x00];
    assert_eq!(message.encode_to_vec(), expected);
    assert_eq!(
        Outbound::try_from(pb::SmIncomingMessages::decode(&expected[..]).unwrap()).unwrap(),
        Outbound::ConnectionStatus(false)
    );
}

#[test]
fn update_networks_with_one_network() {
    let network = api::UpdateNetworkParameters {
        network_id: "net1".into(),
        subnet: "10.1.0.0/16".into(),
        ip: "10.1.0.2".into(),
        vlan_id: 300,
    };
    let message = pb::SmIncomingMessages::from(Outbound::UpdateNetworks(vec![network.clone()]));

    let mut parameters = vec![
        0x0A, // UpdateNetworkParameters.network_id: field 1, wire type 2 -> 0x0A
        0x04, // "net1" is 4 bytes
    ];
    parameters.extend_from_slice(b"net1");
    parameters.extend_from_slice(&[
        0x12, // subnet: field 2, wire type 2 -> 2 << 3 | 2 = 18
        0x0B, // "10.1.0.0/16" is 11 bytes
    ]);
    parameters.extend_from_slice(b"10.1.0.0/16");
    parameters.extend_from_slice(&[
        0x1A, // ip: field 3, wire type 2 -> 3 << 3 | 2 = 26
        0x08, // "10.1.0.2" is 8 bytes
    ]);
    parameters.extend_from_slice(b"10.1.0.2");
    parameters.extend_from_slice(&[
        0x20, // vlan_id: field 4, wire type 0 -> 4 << 3 = 32
        0xAC, // 300 = 0b10_0101100: low 7 bits 0101100 = 0x2C, with the continuation bit 0xAC
        0x02, // then the remaining bits: 300 >> 7 = 2
    ]);
    // 6 + 13 + 10 + 3 bytes.
    assert_eq!(parameters.len(), 32);

    let mut networks = vec![
        0x0A, // UpdateNetworks.networks: field 1, wire type 2
        0x20, // length 32
    ];
    networks.extend_from_slice(&parameters);
    assert_eq!(networks.len(), 34);

    let mut expected = vec![
        0x52, // SMIncomingMessages.update_networks: field 10, wire type 2 -> 10 << 3 | 2 = 82
        0x22, // length 34
    ];
    expected.extend_from_slice(&networks);

    assert_eq!(message.encode_to_vec(), expected);
    assert_eq!(
        Outbound::try_from(pb::SmIncomingMessages::decode(&expected[..]).unwrap()).unwrap(),
        Outbound::UpdateNetworks(vec![network])
    );
}

#[test]
fn sm_info_with_node_id_n1() {
    let message = pb::SmOutgoingMessages {
        sm_outgoing_message: Some(SmOutgoingMessage::SmInfo(pb::SmInfo {
            node_id: "n1".into(),
            ..Default::default()
        })),
    };
    let expected = [
        0x0A, // SMOutgoingMessages.sm_info: field 1, wire type 2
        0x04, // the SMInfo is 4 bytes
        0x0A, // SMInfo.node_id: field 1, wire type 2
        0x02, // "n1" is 2 bytes
        b'n', b'1',
    ];
    assert_eq!(message.encode_to_vec(), expected);

    let decoded = pb::SmOutgoingMessages::decode(&expected[..]).unwrap();
    assert_eq!(decoded, message);
    let Inbound::SmInfo(info) = Inbound::try_from(decoded).unwrap() else {
        panic!("not sm_info");
    };
    assert_eq!(info.node_id.as_str(), "n1");
    assert!(info.runtimes.is_empty() && info.resources.is_empty());
}

/// The instance of the `InstanceInfo` golden tests: version "1.0", uid 1, monitoring with a
/// CPU rule (1 s, up to 0.5).
fn golden_instance() -> api::InstanceInfo {
    api::InstanceInfo {
        version: "1.0".into(),
        uid: 1,
        monitoring_parameters: Some(api::MonitoringParameters {
            alert_rules: Some(api::AlertRules {
                cpu: Some(api::AlertRulePercents {
                    min_timeout: Duration::from_secs(1),
                    min_threshold: 0.0,
                    max_threshold: 0.5,
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The bytes of [`golden_instance`]'s version and uid.
fn golden_head() -> Vec<u8> {
    let mut bytes = vec![
        0x12, // InstanceInfo.version: field 2, wire type 2 -> 18
        0x03, // "1.0" is 3 bytes
    ];
    bytes.extend_from_slice(b"1.0");
    bytes.extend_from_slice(&[
        0x30, // uid: field 6, wire type 0 -> 6 << 3 = 48
        0x01, // 1
    ]);
    bytes
}

/// The bytes of [`golden_instance`]'s `MonitoringParameters` after its key: 17 bytes.
///
/// MonitoringParameters { alert_rules (1) { cpu (2) { duration (1) { seconds (1): 1 },
/// max_threshold (3): 0.5 } } }, from the inside out:
///   Duration: 0x08 0x01 = 2 bytes
///   AlertRulePercents: 0x0A 0x02 <2> + 0x19 (3 << 3 | 1) <8 bytes of 0.5> = 4 + 9 = 13
///     (min_threshold 0.0 is the default and is not written)
///   AlertRules: 0x12 (2 << 3 | 2) 0x0D <13> = 15
///   MonitoringParameters: 0x0A 0x0F <15> = 17
const GOLDEN_MONITORING: [u8; 18] = [
    0x11, // length 17
    0x0A, 0x0F, // alert_rules, 15 bytes
    0x12, 0x0D, // cpu, 13 bytes
    0x0A, 0x02, // duration, 2 bytes
    0x08, 0x01, // seconds = 1
    0x19, // max_threshold: field 3, wire type 1 (64-bit)
    // 0.5 as an IEEE 754 double is 0x3FE0_0000_0000_0000, little-endian on the wire
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xE0, 0x3F,
];

#[test]
fn r_rev_1_instance_info_9_0_has_the_network_in_12_and_monitoring_in_13() {
    let start = api::StartInstance {
        info: golden_instance(),
        network: Some(api::NetworkParameters {
            ip: "1.2.3.4".into(),
            dns_servers: vec!["8.8.8.8".into()],
            ..Default::default()
        }),
    };
    let mut message = pb::InstanceInfo::from(start);
    // The conversion always sends the ident; leave it out here to keep the bytes short.
    message.instance = None;

    let mut expected = golden_head();
    // NetworkParameters: ip (field 3: 0x1A, 7, "1.2.3.4") = 9 bytes, dns_servers (field 4:
    // 0x22, 7, "8.8.8.8") = 9 bytes; 18 in all.
    expected.extend_from_slice(&[
        0x62, // network_parameters: field 12, wire type 2 -> 12 << 3 | 2 = 98
        0x12, // length 18
        0x1A, 0x07,
    ]);
    expected.extend_from_slice(b"1.2.3.4");
    expected.extend_from_slice(&[0x22, 0x07]);
    expected.extend_from_slice(b"8.8.8.8");
    expected.push(0x6A); // monitoring_parameters: field 13, wire type 2 -> 13 << 3 | 2 = 106
    expected.extend_from_slice(&GOLDEN_MONITORING);
    assert_eq!(expected.len(), 5 + 2 + 20 + 19);
    assert_eq!(message.encode_to_vec(), expected);

    let decoded = pb::InstanceInfo::decode(&expected[..]).unwrap();
    assert_eq!(decoded, message);
    assert_eq!(
        decoded.network_parameters.as_ref().unwrap().dns_servers,
        ["8.8.8.8"]
    );
    assert_eq!(
        decoded
            .monitoring_parameters
            .and_then(|m| m.alert_rules)
            .and_then(|r| r.cpu)
            .map(|c| (c.duration, c.max_threshold)),
        Some((
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 0
            }),
            0.5
        ))
    );
}

/// Aos 9.1 (`aos_core_api` v9.1.0, `InstanceInfo`): `monitoring_parameters = 12`, no network.
/// The same instance as above, as a 9.1 unit sends it in `update_instances`.
#[test]
fn r_rev_1_instance_info_9_1_has_the_monitoring_in_12() {
    let command = Outbound::UpdateInstances {
        stop: vec![],
        start: vec![golden_instance().into()],
    };
    let message = pb91::SmIncomingMessages::from(command.clone());
    let Some(Incoming91::UpdateInstances(update)) = &message.sm_incoming_message else {
        panic!("not update_instances: {message:?}");
    };
    let mut info = update.start_instances[0].clone();
    info.instance = None;

    let mut expected = golden_head();
    expected.push(0x62); // monitoring_parameters: field 12, wire type 2 -> 12 << 3 | 2 = 98
    expected.extend_from_slice(&GOLDEN_MONITORING);
    assert_eq!(expected.len(), 5 + 2 + 19);
    assert_eq!(info.encode_to_vec(), expected);

    // Read by a 9.1 SM: the monitoring parameters, whole.
    let decoded = pb91::InstanceInfo::decode(&expected[..]).unwrap();
    assert_eq!(decoded, info);
    // The whole command round-trips through the 9.1 envelope.
    let bytes = message.encode_to_vec();
    let back = Outbound::try_from(pb91::SmIncomingMessages::decode(&bytes[..]).unwrap()).unwrap();
    assert_eq!(back, command);

    // The breakage of a mixed unit: a 9.0 reader takes field 12 for a network, whose
    // network_id (field 1) is then the AlertRules bytes, not UTF-8 (the 0xE0 of 0.5): the
    // whole instance does not parse.
    let misread = pb::InstanceInfo::decode(&expected[..]).unwrap_err();
    assert!(
        misread.to_string().contains("network_id")
            || misread.to_string().contains("UTF-8")
            || misread.to_string().contains("utf-8"),
        "{misread}"
    );
}

/// A 9.1 unit never puts `update_networks` (field 10) on the wire: the router refuses it
/// before it is queued, and the 9.1 envelope has no place for it.
#[test]
fn r_rev_1_update_networks_has_no_9_1_form() {
    let message = pb91::SmIncomingMessages::from(Outbound::UpdateNetworks(vec![
        api::UpdateNetworkParameters::default(),
    ]));
    assert_eq!(message.sm_incoming_message, None);
    assert!(message.encode_to_vec().is_empty());
}

#[test]
fn instance_filter_any_instance_is_minus_one() {
    // The domain's "any" filter goes as empty strings (not written) and instance -1.
    let message = common::InstanceFilter::from(api::InstanceFilter::default());
    assert_eq!(message.instance, -1);
    let expected = [
        0x18, // InstanceFilter.instance: field 3, wire type 0 -> 3 << 3 = 24
        // int64 -1 is sign-extended to 64 bits, 0xFFFF_FFFF_FFFF_FFFF: nine groups of seven
        // one-bits with the continuation bit (0xFF), then the last bit alone (0x01); 10 bytes.
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
    ];
    assert_eq!(message.encode_to_vec(), expected);
    assert_eq!(
        api::InstanceFilter::from(common::InstanceFilter::decode(&expected[..]).unwrap()),
        api::InstanceFilter::default()
    );
}

#[test]
fn instance_ident_component_type() {
    let ident = api::InstanceIdent {
        item_id: "s".into(),
        instance: 2,
        item_type: api::ItemType::Component,
        ..Default::default()
    };
    let expected = [
        0x0A, 0x01, b's', // item_id: field 1, wire type 2, 1 byte
        0x18, 0x02, // instance: field 3, wire type 0, 2
        0x20, 0x01, // type: field 4, wire type 0, COMPONENT = 1
    ];
    assert_eq!(
        common::InstanceIdent::from(ident.clone()).encode_to_vec(),
        expected
    );
    assert_eq!(
        api::InstanceIdent::try_from(common::InstanceIdent::decode(&expected[..]).unwrap()),
        Ok(ident)
    );
}

#[test]
fn hand_written_core_alert_decodes_and_converts() {
    let bytes = [
        0x42, // SMOutgoingMessages.alert: field 8, wire type 2 -> 8 << 3 | 2 = 66
        0x0D, // the Alert is 13 bytes: 4 (timestamp) + 9 (core_alert)
        0x0A, 0x02, // Alert.timestamp: field 1, wire type 2, 2 bytes
        0x08, 0x01, // Timestamp.seconds: field 1, wire type 0, 1
        0x32, // Alert.core_alert: field 6, wire type 2 -> 6 << 3 | 2 = 50
        0x07, // the CoreAlert is 7 bytes
        0x0A, 0x02, b'S', b'M', // core_component: field 1, "SM"
        0x12, 0x01, b'x', // message: field 2, "x"
    ];
    let decoded = pb::SmOutgoingMessages::decode(&bytes[..]).unwrap();
    assert_eq!(
        decoded.sm_outgoing_message,
        Some(SmOutgoingMessage::Alert(pb::Alert {
            timestamp: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0
            }),
            alert_item: Some(AlertItem::CoreAlert(pb::CoreAlert {
                core_component: "SM".into(),
                message: "x".into(),
            })),
        }))
    );
    assert_eq!(
        decoded.encode_to_vec(),
        bytes,
        "re-encodes to the same bytes"
    );
    assert_eq!(
        Inbound::try_from(decoded).unwrap(),
        Inbound::Alert(api::Alert {
            timestamp: UNIX_EPOCH + Duration::from_secs(1),
            kind: api::AlertKind::Core {
                component: api::CoreComponent::Sm,
                message: "x".into(),
            },
        })
    );
}

#[test]
fn unknown_fields_from_a_newer_sm_are_skipped() {
    // sm_info { node_id: "n1", field 99 (varint) = 5 }: 99 << 3 | 0 = 792, a two-byte varint
    // 0x98 0x06 (792 = 0b110_0011000: low seven bits 0x18 | 0x80, then 792 >> 7 = 6).
    let bytes = [0x0A, 0x07, 0x0A, 0x02, b'n', b'1', 0x98, 0x06, 0x05];
    let decoded = pb::SmOutgoingMessages::decode(&bytes[..]).unwrap();
    let Inbound::SmInfo(info) = Inbound::try_from(decoded).unwrap() else {
        panic!("not sm_info");
    };
    assert_eq!(info.node_id.as_str(), "n1");
}

#[test]
fn node_config_goes_as_json_with_its_version() {
    let mut config = api::NodeConfig::new("1.0.0", "main");
    config.priority = 1;
    let message = pb::SmIncomingMessages::from(Outbound::SetNodeConfig(Box::new(config)));
    let json = br#"{"version":"1.0.0","nodeGroupSubject":{"codename":"main"},"priority":1}"#;
    assert_eq!(json.len(), 71);
    let mut expected = vec![
        0x1A, // SMIncomingMessages.set_node_config: field 3, wire type 2
        0x50, // 80 bytes: 2 + 71 (node_config) + 2 + 5 (version)
        0x0A, 0x47, // SetNodeConfig.node_config: field 1, wire type 2, 71 bytes
    ];
    expected.extend_from_slice(json);
    expected.extend_from_slice(&[0x12, 0x05]); // version: field 2, wire type 2, 5 bytes
    expected.extend_from_slice(b"1.0.0");
    assert_eq!(message.encode_to_vec(), expected);
}
