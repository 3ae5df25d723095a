//! The compiled `proto/` must be exactly the wire contract of `wire-protocol.md`.
//!
//! `SCHEMA` below is transcribed by hand from the spec's tables. The test decodes the
//! `FileDescriptorSet` that `build.rs` compiles from `proto/` and compares both ways: every
//! row of the table must be in the descriptor with the same number, type, label and oneof, and
//! the descriptor must declare nothing the table lacks. Renumbering, retyping, renaming or adding
//! a field, an enum value, a message or a method in `proto/` makes it fail, naming
//! `message.field` with the expected and the actual value.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};
use smcontroller_api::SmMessageKind;
use smcontroller_grpc::proto::{
    FILE_DESCRIPTOR_SET, servicemanager::v5::sm_outgoing_messages::SmOutgoingMessage,
};

/// The contract, one declaration per line:
///
/// - `file <path> <package>`
/// - `import <path>`
/// - `message <Name>` then `<number> <field> [repeated] <type> [oneof <Oneof>]`, where `<type>` is
///   a scalar (`string`, `uint64`, ...), `message <fully.qualified.Name>` or
///   `enum <fully.qualified.Name>`
/// - `enum <Name>` then `<VALUE> = <number>`
/// - `service <Name>` then `rpc <Method> [stream] <input> [stream] <output>`
const SCHEMA: &str = "
file common/v2/common.proto common.v2

message ErrorInfo
  1 aos_code int32
  2 exit_code int32
  3 message string

enum ItemType
  SERVICE = 0
  COMPONENT = 1

message InstanceIdent
  1 item_id string
  2 subject_id string
  3 instance uint64
  4 type enum common.v2.ItemType
  5 preinstalled bool

message InstanceFilter
  1 item_id string
  2 subject_id string
  3 instance int64

message ArchInfo
  1 architecture string
  2 variant string

message OSInfo
  1 os string
  2 version string
  3 features repeated string

file servicemanager/v5/servicemanager.proto servicemanager.v5
import google/protobuf/timestamp.proto
import google/protobuf/duration.proto
import common/v2/common.proto

service SMService
  rpc RegisterSM stream servicemanager.v5.SMOutgoingMessages stream servicemanager.v5.SMIncomingMessages
  rpc GetBlobsInfos servicemanager.v5.BlobsInfosRequest servicemanager.v5.BlobsInfos

message SMIncomingMessages
  1 get_node_config_status message servicemanager.v5.GetNodeConfigStatus oneof SMIncomingMessage
  2 check_node_config message servicemanager.v5.CheckNodeConfig oneof SMIncomingMessage
  3 set_node_config message servicemanager.v5.SetNodeConfig oneof SMIncomingMessage
  4 update_instances message servicemanager.v5.UpdateInstances oneof SMIncomingMessage
  5 system_log_request message servicemanager.v5.SystemLogRequest oneof SMIncomingMessage
  6 instance_log_request message servicemanager.v5.InstanceLogRequest oneof SMIncomingMessage
  7 instance_crash_log_request message servicemanager.v5.InstanceCrashLogRequest oneof SMIncomingMessage
  8 get_average_monitoring message servicemanager.v5.GetAverageMonitoring oneof SMIncomingMessage
  9 connection_status message servicemanager.v5.ConnectionStatus oneof SMIncomingMessage
  10 update_networks message servicemanager.v5.UpdateNetworks oneof SMIncomingMessage

message SMOutgoingMessages
  1 sm_info message servicemanager.v5.SMInfo oneof SMOutgoingMessage
  2 node_config_status message servicemanager.v5.NodeConfigStatus oneof SMOutgoingMessage
  3 update_instances_status message servicemanager.v5.UpdateInstancesStatus oneof SMOutgoingMessage
  4 node_instances_status message servicemanager.v5.NodeInstancesStatus oneof SMOutgoingMessage
  5 log message servicemanager.v5.LogData oneof SMOutgoingMessage
  6 instant_monitoring message servicemanager.v5.InstantMonitoring oneof SMOutgoingMessage
  7 average_monitoring message servicemanager.v5.AverageMonitoring oneof SMOutgoingMessage
  8 alert message servicemanager.v5.Alert oneof SMOutgoingMessage

message BlobsInfosRequest
  1 digests repeated string

message BlobsInfos
  1 urls repeated string

message GetNodeConfigStatus

message CheckNodeConfig
  1 node_config string
  2 version string

message SetNodeConfig
  1 node_config string
  2 version string

message EnvVarInfo
  1 name string
  2 value string

message InstanceInfo
  1 instance message common.v2.InstanceIdent
  2 version string
  3 manifest_digest string
  4 owner_id string
  5 runtime_id string
  6 uid uint32
  7 gid uint32
  8 priority uint64
  9 storage_path string
  10 state_path string
  11 env_vars repeated message servicemanager.v5.EnvVarInfo
  12 network_parameters message servicemanager.v5.NetworkParameters
  13 monitoring_parameters message servicemanager.v5.MonitoringParameters

message UpdateInstances
  1 start_instances repeated message servicemanager.v5.InstanceInfo
  2 stop_instances repeated message common.v2.InstanceIdent

message SystemLogRequest
  1 correlation_id string
  2 from message google.protobuf.Timestamp
  3 till message google.protobuf.Timestamp

message InstanceLogRequest
  1 correlation_id string
  2 filter message common.v2.InstanceFilter
  3 from message google.protobuf.Timestamp
  4 till message google.protobuf.Timestamp

message InstanceCrashLogRequest
  1 correlation_id string
  2 filter message common.v2.InstanceFilter
  3 from message google.protobuf.Timestamp
  4 till message google.protobuf.Timestamp

message AlertRulePercents
  1 duration message google.protobuf.Duration
  2 min_threshold double
  3 max_threshold double

message AlertRulePoints
  1 duration message google.protobuf.Duration
  2 min_threshold uint64
  3 max_threshold uint64

message PartitionAlertRule
  1 name string
  2 duration message google.protobuf.Duration
  3 min_threshold double
  4 max_threshold double

message AlertRules
  1 ram message servicemanager.v5.AlertRulePercents
  2 cpu message servicemanager.v5.AlertRulePercents
  3 partitions repeated message servicemanager.v5.PartitionAlertRule
  4 download message servicemanager.v5.AlertRulePoints
  5 upload message servicemanager.v5.AlertRulePoints

message MonitoringParameters
  1 alert_rules message servicemanager.v5.AlertRules

message GetAverageMonitoring

enum ConnectionEnum
  DISCONNECTED = 0
  CONNECTED = 1

message ConnectionStatus
  1 cloud_status enum servicemanager.v5.ConnectionEnum

message FirewallRule
  1 dst_ip string
  2 dst_port string
  3 proto string
  4 src_ip string

message NetworkParameters
  1 network_id string
  2 subnet string
  3 ip string
  4 dns_servers repeated string
  5 rules repeated message servicemanager.v5.FirewallRule

message UpdateNetworkParameters
  1 network_id string
  2 subnet string
  3 ip string
  4 vlan_id uint64

message UpdateNetworks
  1 networks repeated message servicemanager.v5.UpdateNetworkParameters

message ResourceInfo
  1 name string
  2 shared_count uint64

message RuntimeInfo
  1 runtime_id string
  2 type string
  3 max_dmips uint64
  4 allowed_dmips uint64
  5 total_ram uint64
  6 allowed_ram uint64
  7 max_instances uint64
  8 os_info message common.v2.OSInfo
  9 arch_info message common.v2.ArchInfo

message SMInfo
  1 node_id string
  2 runtimes repeated message servicemanager.v5.RuntimeInfo
  3 resources repeated message servicemanager.v5.ResourceInfo

message NodeConfigStatus
  1 state string
  2 version string
  3 error message common.v2.ErrorInfo

message EnvVarStatus
  1 name string
  2 error message common.v2.ErrorInfo

message InstanceStatus
  1 instance message common.v2.InstanceIdent
  2 version string
  3 runtime_id string
  4 manifest_digest string
  5 env_vars repeated message servicemanager.v5.EnvVarStatus
  6 state string
  7 error message common.v2.ErrorInfo

message UpdateInstancesStatus
  1 instances repeated message servicemanager.v5.InstanceStatus

message NodeInstancesStatus
  1 instances repeated message servicemanager.v5.InstanceStatus

message LogData
  1 correlation_id string
  2 part_count uint64
  3 part uint64
  4 data bytes
  5 status string
  6 error message common.v2.ErrorInfo

message PartitionUsage
  1 name string
  2 used_size uint64

message MonitoringData
  1 timestamp message google.protobuf.Timestamp
  2 ram uint64
  3 cpu uint64
  4 partitions repeated message servicemanager.v5.PartitionUsage
  5 download uint64
  6 upload uint64

message InstanceMonitoring
  1 instance message common.v2.InstanceIdent
  2 runtime_id string
  3 monitoring_data message servicemanager.v5.MonitoringData

message InstantMonitoring
  1 node_monitoring message servicemanager.v5.MonitoringData
  2 instances_monitoring repeated message servicemanager.v5.InstanceMonitoring

message AverageMonitoring
  1 node_monitoring message servicemanager.v5.MonitoringData
  2 instances_monitoring repeated message servicemanager.v5.InstanceMonitoring

message SystemQuotaAlert
  1 parameter string
  2 value uint64
  3 status string

message InstanceQuotaAlert
  1 instance message common.v2.InstanceIdent
  2 parameter string
  3 value uint64
  4 status string

message ResourceAllocateAlert
  1 instance message common.v2.InstanceIdent
  2 resource string
  3 message string

message SystemAlert
  1 message string

message CoreAlert
  1 core_component string
  2 message string

message InstanceAlert
  1 instance message common.v2.InstanceIdent
  2 service_version string
  3 message string

message Alert
  1 timestamp message google.protobuf.Timestamp
  2 system_quota_alert message servicemanager.v5.SystemQuotaAlert oneof AlertItem
  3 instance_quota_alert message servicemanager.v5.InstanceQuotaAlert oneof AlertItem
  4 resource_allocate_alert message servicemanager.v5.ResourceAllocateAlert oneof AlertItem
  5 system_alert message servicemanager.v5.SystemAlert oneof AlertItem
  6 core_alert message servicemanager.v5.CoreAlert oneof AlertItem
  7 instance_alert message servicemanager.v5.InstanceAlert oneof AlertItem
";

/// The packages the contract owns; other files in the set (google well-known types) are
/// imports and not compared.
const OWN_PACKAGES: [&str; 2] = ["common.v2", "servicemanager.v5"];

/// Everything the comparison looks at, flattened to `key -> description`: a key is a
/// declaration (`file common/v2/common.proto`, `field servicemanager.v5.SMInfo.node_id`,
/// `value common.v2.ItemType.SERVICE`, `rpc servicemanager.v5.SMService.RegisterSM`, ...) and
/// its description is what must match.
type Facts = BTreeMap<String, String>;

fn insert(facts: &mut Facts, key: String, value: String) {
    if let Some(old) = facts.insert(key.clone(), value) {
        panic!("{key} is declared twice (first as {old:?})");
    }
}

/// Parses `SCHEMA` into facts.
fn expected_facts() -> Facts {
    let mut facts = Facts::new();
    let mut file = String::new();
    let mut package = String::new();
    let mut scope = String::new(); // "message X", "enum X" or "service X", fully qualified
    for (n, raw) in SCHEMA.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["file", path, pkg] => {
                file = (*path).to_owned();
                package = (*pkg).to_owned();
                insert(
                    &mut facts,
                    format!("file {file}"),
                    format!("package {package}, proto3"),
                );
            }
            ["import", path] => {
                insert(
                    &mut facts,
                    format!("import {file} -> {path}"),
                    String::new(),
                );
            }
            ["message" | "enum" | "service", name] => {
                scope = format!("{} {package}.{name}", words[0]);
                insert(&mut facts, scope.clone(), format!("in {file}"));
            }
            ["rpc", method, rest @ ..] => {
                let (client_stream, rest) = match rest {
                    ["stream", rest @ ..] => (true, rest),
                    _ => (false, rest),
                };
                let (input, rest) = rest.split_first().unwrap_or_else(|| bad(n, line));
                let (server_stream, rest) = match rest {
                    ["stream", rest @ ..] => (true, rest),
                    _ => (false, rest),
                };
                let [output] = rest else { bad(n, line) };
                let service = scope
                    .strip_prefix("service ")
                    .unwrap_or_else(|| bad(n, line));
                insert(
                    &mut facts,
                    format!("rpc {service}.{method}"),
                    rpc_description(input, client_stream, output, server_stream),
                );
            }
            [value, "=", number] => {
                let enumeration = scope.strip_prefix("enum ").unwrap_or_else(|| bad(n, line));
                insert(
                    &mut facts,
                    format!("value {enumeration}.{value}"),
                    format!("number {number}"),
                );
            }
            [number, name, rest @ ..] => {
                let message = scope
                    .strip_prefix("message ")
                    .unwrap_or_else(|| bad(n, line));
                let number: i32 = number.parse().unwrap_or_else(|_| bad(n, line));
                let (repeated, rest) = match rest {
                    ["repeated", rest @ ..] => (true, rest),
                    _ => (false, rest),
                };
                let (ty, rest) = match rest {
                    [kind @ ("message" | "enum"), name, rest @ ..] => {
                        (format!("{kind} {name}"), rest)
                    }
                    [scalar, rest @ ..] => ((*scalar).to_owned(), rest),
                    [] => bad(n, line),
                };
                let oneof = match rest {
                    [] => None,
                    ["oneof", oneof] => Some(*oneof),
                    _ => bad(n, line),
                };
                if let Some(oneof) = oneof {
                    facts.insert(format!("oneof {message}.{oneof}"), String::new());
                }
                insert(
                    &mut facts,
                    format!("field {message}.{name}"),
                    field_description(number, &ty, repeated, oneof),
                );
            }
            _ => bad(n, line),
        }
    }
    facts
}

/// Stops at a line of `SCHEMA` that does not parse.
fn bad(n: usize, line: &str) -> ! {
    panic!("SCHEMA line {n}: cannot read {line:?}")
}

fn field_description(number: i32, ty: &str, repeated: bool, oneof: Option<&str>) -> String {
    let label = if repeated { "repeated" } else { "singular" };
    let oneof = oneof.map_or_else(String::new, |o| format!(", oneof {o}"));
    format!("number {number}, type {ty}, {label}{oneof}")
}

fn rpc_description(input: &str, client_stream: bool, output: &str, server_stream: bool) -> String {
    let stream = |s: bool| if s { "stream " } else { "" };
    format!(
        "({}{input}) returns ({}{output})",
        stream(client_stream),
        stream(server_stream)
    )
}

/// The scalar spelling of a field type, or `message X` / `enum X` with the leading dot removed.
fn type_description(ty: Type, type_name: &str) -> String {
    let name = type_name.trim_start_matches('.');
    match ty {
        Type::Message => format!("message {name}"),
        Type::Enum => format!("enum {name}"),
        Type::Group => format!("group {name}"),
        Type::Double => "double".into(),
        Type::Float => "float".into(),
        Type::Int64 => "int64".into(),
        Type::Uint64 => "uint64".into(),
        Type::Int32 => "int32".into(),
        Type::Fixed64 => "fixed64".into(),
        Type::Fixed32 => "fixed32".into(),
        Type::Bool => "bool".into(),
        Type::String => "string".into(),
        Type::Bytes => "bytes".into(),
        Type::Uint32 => "uint32".into(),
        Type::Sfixed32 => "sfixed32".into(),
        Type::Sfixed64 => "sfixed64".into(),
        Type::Sint32 => "sint32".into(),
        Type::Sint64 => "sint64".into(),
    }
}

fn enum_facts(facts: &mut Facts, file: &str, qualified: &str, e: &EnumDescriptorProto) {
    insert(facts, format!("enum {qualified}"), format!("in {file}"));
    for value in &e.value {
        insert(
            facts,
            format!("value {qualified}.{}", value.name()),
            format!("number {}", value.number()),
        );
    }
}

fn message_facts(facts: &mut Facts, file: &str, qualified: &str, m: &DescriptorProto) {
    insert(facts, format!("message {qualified}"), format!("in {file}"));
    for oneof in &m.oneof_decl {
        facts.insert(format!("oneof {qualified}.{}", oneof.name()), String::new());
    }
    for field in &m.field {
        let oneof = field
            .oneof_index
            .map(|i| m.oneof_decl[usize::try_from(i).unwrap()].name());
        let mut description = field_description(
            field.number(),
            &type_description(field.r#type(), field.type_name()),
            field.label() == Label::Repeated,
            oneof,
        );
        // Anything proto3 declares beyond the plain field is a difference too.
        if field.proto3_optional() {
            description.push_str(", proto3 optional");
        }
        if field.label() == Label::Required {
            description.push_str(", required");
        }
        if field.default_value.is_some() || field.extendee.is_some() || field.options.is_some() {
            description.push_str(", with options/default/extendee");
        }
        insert(
            facts,
            format!("field {qualified}.{}", field.name()),
            description,
        );
    }
    // Nested declarations are not part of the contract: they show up as extra facts.
    for nested in &m.nested_type {
        message_facts(
            facts,
            file,
            &format!("{qualified}.{}", nested.name()),
            nested,
        );
    }
    for nested in &m.enum_type {
        enum_facts(
            facts,
            file,
            &format!("{qualified}.{}", nested.name()),
            nested,
        );
    }
}

fn file_facts(facts: &mut Facts, file: &FileDescriptorProto) {
    let name = file.name();
    let package = file.package();
    insert(
        facts,
        format!("file {name}"),
        format!("package {package}, {}", file.syntax()),
    );
    for import in &file.dependency {
        insert(facts, format!("import {name} -> {import}"), String::new());
    }
    for m in &file.message_type {
        message_facts(facts, name, &format!("{package}.{}", m.name()), m);
    }
    for e in &file.enum_type {
        enum_facts(facts, name, &format!("{package}.{}", e.name()), e);
    }
    for service in &file.service {
        let qualified = format!("{package}.{}", service.name());
        insert(facts, format!("service {qualified}"), format!("in {name}"));
        for method in &service.method {
            insert(
                facts,
                format!("rpc {qualified}.{}", method.name()),
                rpc_description(
                    method.input_type().trim_start_matches('.'),
                    method.client_streaming(),
                    method.output_type().trim_start_matches('.'),
                    method.server_streaming(),
                ),
            );
        }
    }
    if !file.extension.is_empty() {
        insert(facts, format!("extensions in {name}"), String::new());
    }
}

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
}

fn actual_facts() -> Facts {
    let mut facts = Facts::new();
    for file in &descriptor_set().file {
        if OWN_PACKAGES.contains(&file.package()) {
            file_facts(&mut facts, file);
        }
    }
    facts
}

/// Lists every difference between the table and the descriptor.
fn differences(expected: &Facts, actual: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    for (key, want) in expected {
        match actual.get(key) {
            None => out.push(format!(
                "{key}: in the spec table ({want}) but not in proto/"
            )),
            Some(got) if got != want => {
                out.push(format!("{key}: expected {want:?}, actual {got:?}"));
            }
            Some(_) => {}
        }
    }
    for (key, got) in actual {
        if !expected.contains_key(key) {
            out.push(format!(
                "{key}: in proto/ ({got}) but not in the spec table"
            ));
        }
    }
    out
}

#[test]
fn proto_matches_the_wire_contract_both_ways() {
    let expected = expected_facts();
    let actual = actual_facts();
    let diff = differences(&expected, &actual);
    assert!(
        diff.is_empty(),
        "proto/ differs from wire-protocol.md in {} place(s):\n  {}",
        diff.len(),
        diff.join("\n  ")
    );
}

/// `SmMessageKind` (smcontroller-api), the one list of the kinds of SM -> controller message,
/// is the oneof of `SMOutgoingMessages`: the same names in field-number order, and the
/// transport names each member with its own kind.
#[test]
fn message_kinds_are_the_members_of_sm_outgoing_messages() {
    let set = descriptor_set();
    let message = set
        .file
        .iter()
        .filter(|f| f.package() == "servicemanager.v5")
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "SMOutgoingMessages")
        .expect("SMOutgoingMessages in the descriptor");
    let fields: Vec<(i32, &str)> = message
        .field
        .iter()
        .map(|f| (f.number(), f.name()))
        .collect();
    let kinds: Vec<(i32, &str)> = SmMessageKind::ALL
        .iter()
        .map(|k| (i32::try_from(k.index()).expect("few kinds") + 1, k.name()))
        .collect();
    assert_eq!(kinds, fields);

    use SmOutgoingMessage as M;
    let members = [
        M::SmInfo(Default::default()),
        M::NodeConfigStatus(Default::default()),
        M::UpdateInstancesStatus(Default::default()),
        M::NodeInstancesStatus(Default::default()),
        M::Log(Default::default()),
        M::InstantMonitoring(Default::default()),
        M::AverageMonitoring(Default::default()),
        M::Alert(Default::default()),
    ];
    let named: Vec<SmMessageKind> = members.iter().map(SmOutgoingMessage::kind).collect();
    assert_eq!(named, SmMessageKind::ALL);
}

#[test]
fn the_table_is_complete_enough_to_mean_something() {
    // Guards the parser of SCHEMA: a silently skipped section would weaken the comparison.
    let expected = expected_facts();
    let count = |prefix: &str| expected.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(count("file "), 2);
    assert_eq!(count("message common.v2."), 5);
    assert_eq!(count("message servicemanager.v5."), 45);
    assert_eq!(count("enum "), 2);
    assert_eq!(count("value "), 4);
    assert_eq!(count("rpc "), 2);
    assert_eq!(count("oneof "), 3);
}

#[test]
fn the_contract_packages_and_google_imports_are_in_the_set() {
    let set = descriptor_set();
    let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
    for wanted in [
        "common/v2/common.proto",
        "servicemanager/v5/servicemanager.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    let packages: Vec<&str> = set.file.iter().map(|f| f.package()).collect();
    for wanted in OWN_PACKAGES {
        assert!(packages.contains(&wanted), "package {wanted} missing");
    }
}

#[test]
fn a_renumbered_field_is_reported_with_its_name_and_both_numbers() {
    // Edits a copy of the real descriptor, as a changed `proto/` would, and checks that the
    // comparison catches it and says where.
    let mut set = descriptor_set();
    let file = set
        .file
        .iter_mut()
        .find(|f| f.package() == "servicemanager.v5")
        .unwrap();
    let message = file
        .message_type
        .iter_mut()
        .find(|m| m.name() == "SMIncomingMessages")
        .unwrap();
    let field = message
        .field
        .iter_mut()
        .find(|f| f.name() == "update_networks")
        .unwrap();
    field.number = Some(11);

    let mut actual = Facts::new();
    for file in set
        .file
        .iter()
        .filter(|f| OWN_PACKAGES.contains(&f.package()))
    {
        file_facts(&mut actual, file);
    }
    let diff = differences(&expected_facts(), &actual);
    assert_eq!(diff.len(), 1, "{diff:#?}");
    assert!(
        diff[0].starts_with("field servicemanager.v5.SMIncomingMessages.update_networks:")
            && diff[0].contains("number 10")
            && diff[0].contains("number 11"),
        "{}",
        diff[0]
    );
}

#[test]
fn an_extra_field_and_a_missing_enum_value_are_reported() {
    let mut set = descriptor_set();
    let common = set
        .file
        .iter_mut()
        .find(|f| f.package() == "common.v2")
        .unwrap();
    let ident = common
        .message_type
        .iter_mut()
        .find(|m| m.name() == "InstanceIdent")
        .unwrap();
    let mut extra = ident.field[0].clone();
    extra.name = Some("extra".into());
    extra.number = Some(6);
    ident.field.push(extra);
    common.enum_type[0].value.pop();

    let mut actual = Facts::new();
    for file in set
        .file
        .iter()
        .filter(|f| OWN_PACKAGES.contains(&f.package()))
    {
        file_facts(&mut actual, file);
    }
    let diff = differences(&expected_facts(), &actual);
    assert!(
        diff.iter()
            .any(|d| d.starts_with("field common.v2.InstanceIdent.extra: in proto/")),
        "{diff:#?}"
    );
    assert!(
        diff.iter()
            .any(|d| d.starts_with("value common.v2.ItemType.COMPONENT: in the spec table")),
        "{diff:#?}"
    );
}
