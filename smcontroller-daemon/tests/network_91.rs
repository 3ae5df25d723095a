//! A unit of Aos 9.1 nodes end to end (issue 17): the daemon's controller with `smProtocol`
//! 9.1 over real mTLS on 127.0.0.1, its default network provider, and an SM written here that
//! does what the reference 9.1.1 SM client (`aos_core_cpp` `src/sm/smclient`) does, in its
//! order: subscribe to network updates, open `RegisterSM` and send `sm_info` and the instance
//! statuses, then call `SyncNetworkState` before it reads its stream (R-NET-2); then, for an
//! instance to start, `GetNodeNetworkParams` and `AllocateInstanceNetwork` with the owner id as
//! the network id; on stop `ReleaseInstanceNetwork`, and `ReleaseNodeNetwork` once the
//! network's last instance is gone.

mod support;

use std::{path::Path, sync::Arc, time::Duration};

use smcontroller_api::{
    AlertRulePercents, AlertRules, Error, FirewallRule, InstanceIdent, InstanceInfo,
    InstanceRunner, MonitoringParameters, NetworkParameters, NodeId, NodeNetwork, SmProtocol,
    StartInstance, UpdateNetworkParameters,
};
use smcontroller_certs::test_util::TestPki;
use smcontroller_daemon::{
    app::{self, NoBlobStore, Running},
    config::Settings,
    receivers::Recorder,
};
use smcontroller_grpc::proto::{
    common::v2 as common,
    servicemanager::v5::{self as pb, SmOutgoingMessages, sm_outgoing_messages::SmOutgoingMessage},
    v91::servicemanager::v5::{
        self as pb91, network_service_client::NetworkServiceClient,
        sm_incoming_messages::SmIncomingMessage, sm_service_client::SmServiceClient,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// How long anything may take here before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A 9.1 unit: `smcontrollerd`'s controller over mTLS with the dev PKI in `dir`.
struct Unit {
    running: Running,
    dir: tempfile::TempDir,
}

impl Unit {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Unit::start`] with `change` made to the settings.
    async fn start_with(change: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        TestPki::new()
            .unwrap()
            .write_dev_pki(dir.path(), 3)
            .unwrap();
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            sm_protocol: SmProtocol::V9_1,
            network_state_file: Some(dir.path().join("networks.json")),
            ..Settings::default()
        };
        settings.use_dev_pki(dir.path()).unwrap();
        change(&mut settings);
        let running = app::start(&settings, Recorder::new(), Arc::new(NoBlobStore))
            .await
            .expect("the 9.1 controller starts");
        Self { running, dir }
    }

    /// A channel to the SM port over mTLS, as node `node` (its client certificate).
    async fn channel(&self, node: &str) -> Channel {
        channel(self.dir.path(), self.running.addr, node).await
    }
}

async fn channel(pki: &Path, addr: std::net::SocketAddr, node: &str) -> Channel {
    let read = |name: String| std::fs::read(pki.join(name)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            read(format!("client-{node}.pem")),
            read(format!("client-{node}.key")),
        ));
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("an mTLS connection to the SM port")
}

/// Within the test's deadline, or fail naming what did not happen.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {DEADLINE:?}"))
}

fn ident(item: &str, instance: u64) -> common::InstanceIdent {
    common::InstanceIdent {
        item_id: item.into(),
        subject_id: "subject-1".into(),
        instance,
        r#type: common::ItemType::Service.into(),
        preinstalled: false,
    }
}

fn sm_info(node: &str) -> SmOutgoingMessages {
    SmOutgoingMessages {
        sm_outgoing_message: Some(SmOutgoingMessage::SmInfo(pb::SmInfo {
            node_id: node.into(),
            runtimes: vec![pb::RuntimeInfo {
                runtime_id: "runc".into(),
                r#type: "runc".into(),
                max_instances: 10,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

fn no_instances() -> SmOutgoingMessages {
    SmOutgoingMessages {
        sm_outgoing_message: Some(SmOutgoingMessage::NodeInstancesStatus(
            pb::NodeInstancesStatus { instances: vec![] },
        )),
    }
}

/// An instance with monitoring parameters (a RAM rule), to start under 9.1.
fn instance_to_start(item: &str) -> StartInstance {
    InstanceInfo {
        ident: InstanceIdent {
            item_id: item.into(),
            subject_id: "subject-1".into(),
            instance: 0,
            ..InstanceIdent::default()
        },
        version: "1.0.0".into(),
        manifest_digest: format!("sha256:{}", "ab".repeat(32)),
        owner_id: "owner-1".into(),
        runtime_id: "runc".into(),
        monitoring_parameters: Some(MonitoringParameters {
            alert_rules: Some(AlertRules {
                ram: Some(AlertRulePercents {
                    min_timeout: Duration::from_secs(3),
                    min_threshold: 0.5,
                    max_threshold: 0.9,
                }),
                ..AlertRules::default()
            }),
        }),
        ..InstanceInfo::default()
    }
    .into()
}

/// The first command on a 9.1 stream that is not `connection_status`.
async fn next_command(stream: &mut Streaming<pb91::SmIncomingMessages>) -> SmIncomingMessage {
    loop {
        let message = within("a command", stream.message())
            .await
            .expect("the stream is up")
            .expect("the stream goes on");
        match message.sm_incoming_message {
            Some(SmIncomingMessage::ConnectionStatus(_)) => continue,
            Some(command) => return command,
            None => panic!("an empty command"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_net_2_a_9_1_sm_syncs_before_it_reads_its_stream_and_gets_its_networks() {
    let unit = Unit::start().await;
    let channel = unit.channel("node-1").await;
    let mut network = NetworkServiceClient::new(channel.clone());
    let mut sm = SmServiceClient::new(channel);

    // 1. The subscription, first (the SM's subscription thread starts before RegisterSM).
    let mut updates = within(
        "the subscription",
        network.subscribe_instance_network_updates(pb91::SubscribeInstanceNetworkUpdatesRequest {
            node_id: "node-1".into(),
        }),
    )
    .await
    .expect("subscribed")
    .into_inner();

    // 2. RegisterSM with sm_info and the instance statuses; the stream is NOT read yet.
    let (tx, rx) = mpsc::channel(8);
    tx.send(sm_info("node-1")).await.unwrap();
    tx.send(no_instances()).await.unwrap();
    let mut commands = within("RegisterSM", sm.register_sm(ReceiverStream::new(rx)))
        .await
        .expect("registered")
        .into_inner();

    // 3. SyncNetworkState before reading the stream: answered, with no error (R-NET-2).
    let synced = within(
        "SyncNetworkState before the stream is read",
        network.sync_network_state(pb91::SyncNetworkStateRequest {
            node_id: "node-1".into(),
            instances: vec![],
        }),
    )
    .await
    .expect("SyncNetworkState answers")
    .into_inner();
    assert_eq!(synced.error, None, "success leaves error unset");

    // 4. An instance to start: in the 9.1 envelope, the monitoring parameters in field 12.
    let controller = unit.running.controller.clone();
    let node = NodeId::new("node-1");
    assert!(
        unit.running
            .recorder
            .wait_until(DEADLINE, |r| r.node("node-1").is_some_and(|n| n.connected))
            .await,
        "node-1 registered"
    );
    controller
        .update_instances(&node, &[], &[instance_to_start("service-1")])
        .await
        .expect("update_instances is queued");
    let SmIncomingMessage::UpdateInstances(update) = next_command(&mut commands).await else {
        panic!("not update_instances");
    };
    let info = &update.start_instances[0];
    let ram = info
        .monitoring_parameters
        .as_ref()
        .and_then(|m| m.alert_rules.as_ref())
        .and_then(|r| r.ram.as_ref())
        .expect("the monitoring parameters arrive in field 12");
    assert_eq!(ram.max_threshold, 0.9);
    assert_eq!(info.owner_id, "owner-1");

    // 5. The SM prepares the instance's network: the node's, then the instance's, with the
    //    owner id as the network id.
    let params = network
        .get_node_network_params(pb91::GetNodeNetworkParamsRequest {
            network_id: info.owner_id.clone(),
            node_id: "node-1".into(),
        })
        .await
        .expect("GetNodeNetworkParams")
        .into_inner();
    assert_eq!(params.error, None);
    assert!(params.subnet.ends_with("/24"), "{params:?}");
    assert!((1..4095).contains(&params.vlan_id), "{params:?}");
    let again = network
        .get_node_network_params(pb91::GetNodeNetworkParamsRequest {
            network_id: info.owner_id.clone(),
            node_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, params, "asking again gives the same answer");

    let allocate = |item: &str| pb91::AllocateInstanceNetworkRequest {
        instance: Some(ident(item, 0)),
        network_id: "owner-1".into(),
        node_id: "node-1".into(),
        service_data: Some(pb91::UpdateItemNetworkParams {
            hosts: vec![format!("0.subject-1.{item}")],
            allowed_connections: vec![],
            exposed_ports: vec!["8080/tcp".into()],
        }),
    };
    let allocated = network
        .allocate_instance_network(allocate("service-1"))
        .await
        .expect("AllocateInstanceNetwork")
        .into_inner();
    assert_eq!(allocated.error, None, "{allocated:?}");
    assert_eq!(allocated.subnet, params.subnet);
    assert_ne!(
        allocated.ip, params.ip,
        "the instance has an address of its own"
    );
    let same = network
        .allocate_instance_network(allocate("service-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.ip, allocated.ip, "the same instance keeps its address");

    // 6. Stop: release the instance, then the node's network (its last instance went).
    let released = network
        .release_instance_network(pb91::ReleaseInstanceNetworkRequest {
            instance: Some(ident("service-1", 0)),
            node_id: "node-1".into(),
        })
        .await
        .expect("ReleaseInstanceNetwork")
        .into_inner();
    assert_eq!(released.error, None);
    let left = network
        .release_node_network(pb91::ReleaseNodeNetworkRequest {
            network_id: "owner-1".into(),
            node_id: "node-1".into(),
        })
        .await
        .expect("ReleaseNodeNetwork")
        .into_inner();
    assert_eq!(left.error, None);

    // 7. 9.1 has no update_networks, and no network beside an instance.
    let refused = controller
        .update_networks(&node, &[UpdateNetworkParameters::default()])
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::NotSupported(m) if m.contains("9.1")),
        "{refused}"
    );
    let with_network = StartInstance {
        network: Some(NetworkParameters::default()),
        ..instance_to_start("service-2")
    };
    let refused = controller
        .update_instances(&node, &[], &[with_network])
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::NotSupported(_)), "{refused}");

    // The subscription got nothing (no rules), and is still open.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), updates.message())
            .await
            .is_err(),
        "nothing is sent on subscribe"
    );
    drop(tx);
    unit.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_net_1_bad_ids_are_invalid_argument_naming_the_field_and_domain_errors_go_in_error() {
    let unit = Unit::start().await;
    let mut network = NetworkServiceClient::new(unit.channel("node-1").await);
    let long = "n".repeat(300);

    let status = network
        .get_node_network_params(pb91::GetNodeNetworkParamsRequest {
            network_id: "owner-1".into(),
            node_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("node_id is empty"), "{status:?}");

    let status = network
        .get_node_network_params(pb91::GetNodeNetworkParamsRequest {
            network_id: long.clone(),
            node_id: "node-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("network_id is 300 bytes"),
        "{status:?}"
    );

    let status = network
        .allocate_instance_network(pb91::AllocateInstanceNetworkRequest {
            instance: None,
            network_id: "owner-1".into(),
            node_id: "node-1".into(),
            service_data: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("instance"), "{status:?}");

    let status = network
        .sync_network_state(pb91::SyncNetworkStateRequest {
            node_id: "node-1".into(),
            instances: vec![pb91::InstanceNetworkStateInfo {
                instance: Some(common::InstanceIdent {
                    item_id: long,
                    ..ident("x", 0)
                }),
                network_id: "owner-1".into(),
                ip: "172.17.0.2".into(),
                firewall_rules: vec![],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("instances[0].instance.item_id"),
        "{status:?}"
    );

    // A domain error: an instance of a network the node never asked for. gRPC OK, the error
    // inside, with an Aos code that is not 0.
    let answer = network
        .allocate_instance_network(pb91::AllocateInstanceNetworkRequest {
            instance: Some(ident("service-1", 0)),
            network_id: "nobody-asked".into(),
            node_id: "node-1".into(),
            service_data: None,
        })
        .await
        .expect("a domain error is not a gRPC error")
        .into_inner();
    let error = answer.error.expect("the error is in the response");
    assert_ne!(error.aos_code, 0, "{error:?}");
    assert!(error.message.contains("nobody-asked"), "{error:?}");

    // The SMService of a 9.1 unit is the 9.1 one, but GetBlobsInfos is the same.
    let status = SmServiceClient::new(unit.channel("node-2").await)
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: vec![format!("sha256:{}", "cd".repeat(32))],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    unit.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_net_3_a_newer_subscription_replaces_the_older_and_a_missed_push_comes_after_sync() {
    let unit = Unit::start().await;
    let mut node1 = NetworkServiceClient::new(unit.channel("node-1").await);
    let mut node2 = NetworkServiceClient::new(unit.channel("node-2").await);
    let subscribe = |node: &str| pb91::SubscribeInstanceNetworkUpdatesRequest {
        node_id: node.into(),
    };
    let mut old = node1
        .subscribe_instance_network_updates(subscribe("node-1"))
        .await
        .unwrap()
        .into_inner();
    let new = node1
        .subscribe_instance_network_updates(subscribe("node-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        within("the older subscription to end", old.message())
            .await
            .expect("it ends cleanly")
            .is_none(),
        "the older subscription ends when a newer one replaces it"
    );

    // client-1 (node-1, network net-a) may reach server-1:8080; the server is not there yet.
    for (client, node, network) in [
        (&mut node1, "node-1", "net-a"),
        (&mut node2, "node-2", "net-b"),
    ] {
        let params = client
            .get_node_network_params(pb91::GetNodeNetworkParamsRequest {
                network_id: network.into(),
                node_id: node.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(params.error, None);
    }
    let client = node1
        .allocate_instance_network(pb91::AllocateInstanceNetworkRequest {
            instance: Some(ident("client-1", 0)),
            network_id: "net-a".into(),
            node_id: "node-1".into(),
            service_data: Some(pb91::UpdateItemNetworkParams {
                allowed_connections: vec!["server-1/8080/tcp".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(client.error, None, "{client:?}");
    assert!(client.firewall_rules.is_empty(), "no server yet");

    // node-1 goes away (its subscription ends) before the server comes.
    drop(new);
    let server = node2
        .allocate_instance_network(pb91::AllocateInstanceNetworkRequest {
            instance: Some(ident("server-1", 0)),
            network_id: "net-b".into(),
            node_id: "node-2".into(),
            service_data: Some(pb91::UpdateItemNetworkParams {
                exposed_ports: vec!["8080/tcp".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.error, None, "{server:?}");
    let expected = pb::FirewallRule {
        dst_ip: server.ip.clone(),
        dst_port: "8080".into(),
        proto: "tcp".into(),
        src_ip: client.ip.clone(),
    };

    // node-1 comes back: subscribes, syncs (reporting no rules yet), and gets the rule it
    // missed: client-1's whole rule set.
    let mut back = node1
        .subscribe_instance_network_updates(subscribe("node-1"))
        .await
        .unwrap()
        .into_inner();
    let synced = node1
        .sync_network_state(pb91::SyncNetworkStateRequest {
            node_id: "node-1".into(),
            instances: vec![pb91::InstanceNetworkStateInfo {
                instance: Some(ident("client-1", 0)),
                network_id: "net-a".into(),
                ip: client.ip.clone(),
                firewall_rules: vec![],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(synced.error, None);
    let notification = within("the missed firewall update", back.message())
        .await
        .expect("the subscription is up")
        .expect("an update comes");
    let update: smcontroller_api::PendingFirewallUpdate = notification.try_into().unwrap();
    assert_eq!(update.instance.item_id, "client-1");
    assert_eq!(
        update.rules,
        [FirewallRule::from(expected)],
        "the full rule set of the instance"
    );
    unit.running.stop().await.unwrap();
}

/// N-BAD-1 under 9.1: refused `NetworkService` calls count against their connection's budget of
/// refused messages like refused stream messages do; when it is used up the connection is
/// closed, and a new connection of the same node is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_bad_1_refused_network_service_calls_close_their_connection() {
    let unit = Unit::start_with(|settings| settings.max_refused_messages = 2).await;
    let mut network = NetworkServiceClient::new(unit.channel("node-1").await);
    let empty_node = pb91::GetNodeNetworkParamsRequest {
        network_id: "owner-1".into(),
        node_id: String::new(),
    };
    for _ in 0..2 {
        let status = within(
            "a refused call",
            network.get_node_network_params(empty_node.clone()),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let refusals = unit.running.controller.refusals();
    assert_eq!(
        refusals.get(smcontroller_limits::Budget::RefusedMessages),
        1
    );
    within(
        "the connection closed",
        support::until_closed(|| {
            let mut network = network.clone();
            let request = empty_node.clone();
            async move { network.get_node_network_params(request).await }
        }),
    )
    .await;
    // A new connection has a whole budget: a domain answer, not a refusal.
    let mut network = NetworkServiceClient::new(unit.channel("node-1").await);
    let answer = within(
        "a call on a new connection",
        network.get_node_network_params(pb91::GetNodeNetworkParamsRequest {
            network_id: "owner-1".into(),
            node_id: "node-1".into(),
        }),
    )
    .await;
    assert!(answer.is_ok(), "{answer:?}");
    unit.running.stop().await.unwrap();
}
