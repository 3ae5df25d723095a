//! The simulator under the Aos 9.1 wire revision, against the real router and server
//! (`smcontroller_routing::Controller` with `smProtocol` 9.1, served by
//! `smcontroller_grpc::server::serve_insecure` on 127.0.0.1) and a network provider of the
//! test's own that records every call and hands out addresses. A simulated node must do what
//! the reference 9.1.1 SM does: subscribe, register, sync its network state before it reads its
//! stream, have the network of each instance it starts allocated (the owner id is the network
//! id), release it when the instance stops, and take the firewall updates pushed to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use smcontroller_api::{
    Alert, AlertsReceiver, DisconnectReason, EnvVarsStatusSender, Error, FirewallRule,
    FirewallUpdates, InstanceEnvVarsStatus, InstanceIdent, InstanceInfo, InstanceNetworkState,
    InstanceRunner, InstanceStatus, InstanceStatusReceiver, ItemInfoProvider,
    ItemNetworkParameters, LogPart, LogSender, MonitoringReceiver, NetworkParameters,
    NetworkProvider, NodeId, NodeMonitoringData, PendingFirewallUpdate, SmInfo, SmInfoReceiver,
    SmProtocol, StartInstance, UpdateNetworkParameters,
};
use smcontroller_grpc::proto::common::v2 as pb_common;
use smcontroller_grpc::proto::servicemanager::v5 as pb;
use smcontroller_grpc::server::{self, ServerSettings};
use smcontroller_routing::{Controller, Receivers, Settings};
use smcontroller_sim::{NetworkCall, SimConfig, SimEvent, SimEventKind, SimEvents, Simulator};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long anything may take here before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// The network whose allocations the provider refuses.
const BROKEN: &str = "broken";
/// The network the provider does not know: `GetNodeNetworkParams` fails.
const UNKNOWN: &str = "unknown";

/// One call the network provider got.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    NodeParams {
        network: String,
        node: String,
    },
    Allocate {
        item: String,
        network: String,
        node: String,
        hosts: Vec<String>,
    },
    ReleaseInstance {
        item: String,
        node: String,
    },
    ReleaseNode {
        network: String,
        node: String,
    },
    Sync {
        node: String,
        instances: Vec<InstanceNetworkState>,
    },
}

/// A network provider that records its calls and hands out addresses: network n (in the
/// order they are asked for) is `172.18.n.0/24`, VLAN n, the node `.1`, the instances `.2`
/// on. Its `sync_network_state` waits until the gate is open.
struct Provider {
    calls: watch::Sender<Vec<Call>>,
    gate: watch::Receiver<bool>,
    networks: Mutex<BTreeMap<String, (u64, u64)>>,
}

impl Provider {
    fn new(gate: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            calls: watch::channel(Vec::new()).0,
            gate,
            networks: Mutex::default(),
        })
    }

    fn record(&self, call: Call) {
        self.calls.send_modify(|calls| calls.push(call));
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Waits until the calls satisfy `done`; fails the test after the deadline.
    async fn wait(&self, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let mut rx = self.calls.subscribe();
        match tokio::time::timeout(DEADLINE, rx.wait_for(|c| done(c))).await {
            Ok(Ok(calls)) => calls.clone(),
            _ => panic!(
                "{what}: not within {DEADLINE:?}; calls: {:#?}",
                self.calls()
            ),
        }
    }

    fn syncs(calls: &[Call]) -> Vec<&Vec<InstanceNetworkState>> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Sync { instances, .. } => Some(instances),
                _ => None,
            })
            .collect()
    }
}

fn refused(message: &str) -> Error {
    Error::Failed {
        aos_code: 8,
        exit_code: 0,
        message: message.to_owned(),
    }
}

#[async_trait]
impl NetworkProvider for Provider {
    async fn get_node_network_params(
        &self,
        network_id: &str,
        node: &NodeId,
    ) -> smcontroller_api::Result<UpdateNetworkParameters> {
        self.record(Call::NodeParams {
            network: network_id.to_owned(),
            node: node.to_string(),
        });
        if network_id == UNKNOWN {
            return Err(refused("no such network"));
        }
        let mut networks = self.networks.lock().unwrap();
        let next = networks.len() as u64 + 1;
        let (n, _) = *networks.entry(network_id.to_owned()).or_insert((next, 1));
        Ok(UpdateNetworkParameters {
            network_id: network_id.to_owned(),
            subnet: format!("172.18.{n}.0/24"),
            ip: format!("172.18.{n}.1"),
            vlan_id: n,
        })
    }

    async fn allocate_instance_network(
        &self,
        instance: &InstanceIdent,
        network_id: &str,
        node: &NodeId,
        params: &ItemNetworkParameters,
    ) -> smcontroller_api::Result<NetworkParameters> {
        self.record(Call::Allocate {
            item: instance.item_id.clone(),
            network: network_id.to_owned(),
            node: node.to_string(),
            hosts: params.hosts.clone(),
        });
        if network_id == BROKEN {
            return Err(refused("host name taken"));
        }
        let mut networks = self.networks.lock().unwrap();
        let (n, last) = networks
            .get_mut(network_id)
            .ok_or_else(|| refused("network not found"))?;
        *last += 1;
        Ok(NetworkParameters {
            network_id: network_id.to_owned(),
            subnet: format!("172.18.{n}.0/24"),
            ip: format!("172.18.{n}.{last}"),
            dns_servers: vec!["172.18.0.1".to_owned()],
            rules: Vec::new(),
        })
    }

    async fn release_instance_network(
        &self,
        instance: &InstanceIdent,
        node: &NodeId,
    ) -> smcontroller_api::Result<()> {
        self.record(Call::ReleaseInstance {
            item: instance.item_id.clone(),
            node: node.to_string(),
        });
        Ok(())
    }

    async fn release_node_network(
        &self,
        network_id: &str,
        node: &NodeId,
    ) -> smcontroller_api::Result<()> {
        self.record(Call::ReleaseNode {
            network: network_id.to_owned(),
            node: node.to_string(),
        });
        Ok(())
    }

    async fn sync_network_state(
        &self,
        node: &NodeId,
        instances: &[InstanceNetworkState],
    ) -> smcontroller_api::Result<()> {
        self.record(Call::Sync {
            node: node.to_string(),
            instances: instances.to_vec(),
        });
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        Ok(())
    }
}

/// What the controller's receivers heard: the nodes that registered, in order.
#[derive(Default)]
struct Heard {
    connected: watch::Sender<Vec<String>>,
}

impl Heard {
    /// Waits until `node` has registered `times` times.
    async fn registered(&self, node: &str, times: usize) {
        let mut rx = self.connected.subscribe();
        let seen = |c: &Vec<String>| c.iter().filter(|n| *n == node).count() >= times;
        if !matches!(
            tokio::time::timeout(DEADLINE, rx.wait_for(seen)).await,
            Ok(Ok(_))
        ) {
            panic!("{node} did not register {times} times within {DEADLINE:?}");
        }
    }
}

#[async_trait]
impl SmInfoReceiver for Heard {
    async fn on_node_connected(&self, node: &NodeId) {
        self.connected.send_modify(|c| c.push(node.to_string()));
    }
    async fn on_node_disconnected(&self, _: &NodeId, _: &DisconnectReason) {}
    async fn on_sm_info_received(&self, _: &SmInfo) {}
}

#[async_trait]
impl InstanceStatusReceiver for Heard {
    async fn on_instance_status_received(&self, _: &NodeId, _: &InstanceStatus) {}
    async fn on_node_instances_statuses_received(&self, _: &NodeId, _: &[InstanceStatus]) {}
}

#[async_trait]
impl EnvVarsStatusSender for Heard {
    async fn send_env_vars_statuses(&self, _: &NodeId, _: &[InstanceEnvVarsStatus]) {}
}

#[async_trait]
impl MonitoringReceiver for Heard {
    async fn on_monitoring_received(&self, _: &NodeId, _: &NodeMonitoringData) {}
}

#[async_trait]
impl AlertsReceiver for Heard {
    async fn on_alert_received(&self, _: &NodeId, _: &Alert) {}
}

#[async_trait]
impl LogSender for Heard {
    async fn send_log(&self, _: &LogPart) {}
}

/// Every manifest has a URL.
struct Blobs;

#[async_trait]
impl ItemInfoProvider for Blobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        Ok(format!("http://blobs/{digest}"))
    }
}

/// A 9.1 controller served on 127.0.0.1 over plain HTTP/2.
struct Unit {
    url: String,
    controller: Controller,
    provider: Arc<Provider>,
    heard: Arc<Heard>,
    gate: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Unit {
    /// Started with the provider's sync gate open (`open`) or closed.
    async fn start(open: bool) -> Self {
        let (gate, gate_rx) = watch::channel(open);
        let provider = Provider::new(gate_rx);
        let heard = Arc::new(Heard::default());
        let settings = Settings {
            sm_protocol: SmProtocol::V9_1,
            ..Settings::default()
        };
        let controller = Controller::new(settings, Receivers::all(heard.clone()))
            .with_network_provider(provider.clone());
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, mut stopped) = watch::channel(false);
        let server = tokio::spawn({
            let controller = controller.clone();
            async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                server::serve_insecure(
                    listener,
                    controller,
                    Arc::new(Blobs),
                    ServerSettings::default(),
                    shutdown,
                )
                .await
                .unwrap();
            }
        });
        Self {
            url,
            controller,
            provider,
            heard,
            gate,
            stop,
            server,
        }
    }

    /// A 9.1 simulation of one node with two instances, reconnecting after 50 ms.
    fn config(&self) -> SimConfig {
        SimConfig {
            sm_protocol: SmProtocol::V9_1,
            instances: 2,
            reconnect_delay: Duration::from_millis(50),
            ..SimConfig::new(self.url.clone(), 1)
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("the server stops within the deadline")
            .unwrap();
    }
}

/// The next event that satisfies `pred`, within the deadline; the events before it are added
/// to `seen`.
async fn wait_event(
    events: &mut SimEvents,
    seen: &mut Vec<SimEventKind>,
    what: &str,
    mut pred: impl FnMut(&SimEvent) -> bool,
) -> SimEvent {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(event)) => seen.push(event.kind),
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("{n} events lost"),
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("events closed"),
            Err(_) => panic!("{what}: not within {DEADLINE:?}; seen {seen:#?}"),
        }
    }
}

/// The next `update_instances_status` the node sends.
async fn next_instances_status(events: &mut SimEvents) -> Vec<pb::InstanceStatus> {
    let event = wait_event(events, &mut Vec::new(), "update_instances_status", |e| {
        matches!(&e.kind, SimEventKind::Sent(m) if matches!(m.sm_outgoing_message,
            Some(pb::sm_outgoing_messages::SmOutgoingMessage::UpdateInstancesStatus(_))))
    })
    .await;
    match event.kind {
        SimEventKind::Sent(pb::SmOutgoingMessages {
            sm_outgoing_message:
                Some(pb::sm_outgoing_messages::SmOutgoingMessage::UpdateInstancesStatus(s)),
        }) => s.instances,
        _ => unreachable!(),
    }
}

fn ident(item: &str) -> InstanceIdent {
    InstanceIdent {
        item_id: item.to_owned(),
        subject_id: "subject-1".to_owned(),
        instance: 0,
        ..InstanceIdent::default()
    }
}

fn wire_ident(item: &str) -> pb_common::InstanceIdent {
    pb_common::InstanceIdent {
        item_id: item.to_owned(),
        subject_id: "subject-1".to_owned(),
        instance: 0,
        ..pb_common::InstanceIdent::default()
    }
}

/// An instance of `item` to start, owned by `owner` (its network id).
fn start(item: &str, owner: &str) -> StartInstance {
    InstanceInfo {
        ident: ident(item),
        version: "1.0.0".to_owned(),
        manifest_digest: format!("sha256:{}", "ab".repeat(32)),
        owner_id: owner.to_owned(),
        runtime_id: "runc".to_owned(),
        ..InstanceInfo::default()
    }
    .into()
}

fn status_of<'a>(statuses: &'a [pb::InstanceStatus], item: &str) -> &'a pb::InstanceStatus {
    statuses
        .iter()
        .find(|s| s.instance.as_ref().is_some_and(|i| i.item_id == item))
        .unwrap_or_else(|| panic!("no status of {item}: {statuses:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9_1_node_uses_network_service_as_the_reference_sm_does() {
    let unit = Unit::start(false).await;
    let node = NodeId::new("node-1");
    let (sim, mut events) = Simulator::start_with_events(unit.config()).expect("start");
    let handle = sim.node("node-1").expect("node-1");

    // 1. Subscribed, registered, and syncing (the provider holds the sync) before a single
    //    command was read, although the controller has queued connection_status already.
    let calls = unit
        .provider
        .wait("the first sync", |c| !Provider::syncs(c).is_empty())
        .await;
    assert_eq!(
        calls,
        [Call::Sync {
            node: "node-1".to_owned(),
            instances: vec![]
        }],
        "the sync comes first, with no instance network yet"
    );
    assert!(
        unit.controller.firewall_updates().is_subscribed(&node),
        "subscribed before the sync"
    );
    let stats = handle.stats();
    assert!(stats.connected, "the stream is open");
    assert_eq!(
        stats.counters.commands.total(),
        0,
        "nothing read before the sync is answered"
    );
    unit.gate.send_replace(true);

    let mut seen = Vec::new();
    wait_event(&mut events, &mut seen, "the first command read", |e| {
        matches!(e.kind, SimEventKind::Received(_))
    })
    .await;
    let order: Vec<&str> = seen
        .iter()
        .filter_map(|kind| match kind {
            SimEventKind::Network { call, error: None } => Some(call.name()),
            SimEventKind::Connected { .. } => Some("connected"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "SubscribeInstanceNetworkUpdates",
            "connected",
            "SyncNetworkState"
        ]
    );

    // 2. Instances to start: two in net-1, one without an owner, one whose allocation the
    //    provider refuses, one in a network the provider does not know.
    unit.heard.registered("node-1", 1).await;
    unit.controller
        .update_instances(
            &node,
            &[],
            &[
                start("svc-a", "net-1"),
                start("svc-b", "net-1"),
                start("svc-c", ""),
                start("svc-d", BROKEN),
                start("svc-e", UNKNOWN),
            ],
        )
        .await
        .expect("update_instances queued");
    let statuses = next_instances_status(&mut events).await;
    assert_eq!(statuses.len(), 5);
    for item in ["svc-a", "svc-b", "svc-c"] {
        let status = status_of(&statuses, item);
        assert_eq!(status.state, "active", "{status:?}");
        assert_eq!(status.error, Some(pb_common::ErrorInfo::default()));
    }
    for (item, message) in [("svc-d", "host name taken"), ("svc-e", "no such network")] {
        let status = status_of(&statuses, item);
        assert_eq!(status.state, "failed", "{status:?}");
        let error = status.error.as_ref().expect("an error");
        assert_eq!(error.aos_code, 8, "the provider's code: {error:?}");
        assert!(error.message.contains(message), "{error:?}");
    }
    let node_params = |network: &str| Call::NodeParams {
        network: network.to_owned(),
        node: "node-1".to_owned(),
    };
    let allocate = |item: &str, network: &str| Call::Allocate {
        item: item.to_owned(),
        network: network.to_owned(),
        node: "node-1".to_owned(),
        hosts: vec![format!("0.subject-1.{item}")],
    };
    assert_eq!(
        unit.provider.calls()[1..],
        [
            node_params("net-1"),
            allocate("svc-a", "net-1"),
            allocate("svc-b", "net-1"),
            node_params(BROKEN),
            allocate("svc-d", BROKEN),
            node_params(UNKNOWN),
        ],
        "the node asks for a network it is not in once, then allocates per instance"
    );
    let networks = handle.networks();
    assert_eq!(networks.ip_of(&wire_ident("svc-a")), Some("172.18.1.2"));
    assert_eq!(networks.ip_of(&wire_ident("svc-b")), Some("172.18.1.3"));
    assert_eq!(networks.ip_of(&wire_ident("svc-c")), None, "no owner");
    assert_eq!(networks.ip_of(&wire_ident("svc-d")), None, "refused");
    assert_eq!(networks.instances.len(), 2);
    let a = networks.instance(&wire_ident("svc-a")).unwrap();
    assert_eq!(
        (a.network_id.as_str(), a.subnet.as_str()),
        ("net-1", "172.18.1.0/24")
    );
    assert_eq!(a.dns_servers, ["172.18.0.1"]);
    let net1 = networks.node("net-1").expect("the node is in net-1");
    assert_eq!((net1.ip.as_str(), net1.vlan_id), ("172.18.1.1", 1));
    assert!(networks.node(BROKEN).is_some());
    assert!(networks.node(UNKNOWN).is_none());

    // 3. A firewall update pushed through the controller replaces svc-a's rules.
    let rule = FirewallRule {
        dst_ip: "172.18.2.2".to_owned(),
        dst_port: "8080".to_owned(),
        proto: "tcp".to_owned(),
        src_ip: "172.18.1.2".to_owned(),
    };
    unit.controller
        .firewall_updates()
        .push_firewall_update(
            &node,
            &PendingFirewallUpdate {
                instance: ident("svc-a"),
                rules: vec![rule.clone()],
            },
        )
        .expect("pushed");
    wait_event(&mut events, &mut Vec::new(), "the firewall update", |e| {
        matches!(e.kind, SimEventKind::FirewallUpdate(_))
    })
    .await;
    let wire_rule = pb::FirewallRule {
        dst_ip: rule.dst_ip.clone(),
        dst_port: rule.dst_port.clone(),
        proto: rule.proto.clone(),
        src_ip: rule.src_ip.clone(),
    };
    let networks = handle.networks();
    assert_eq!(
        networks.instance(&wire_ident("svc-a")).unwrap().rules,
        [wire_rule]
    );
    assert!(
        networks
            .instance(&wire_ident("svc-b"))
            .unwrap()
            .rules
            .is_empty()
    );

    // 4. A new connection: subscribed again, and the sync reports what runs with a network,
    //    with the rules the node applies.
    assert!(handle.drop_stream());
    let calls = unit
        .provider
        .wait("the second sync", |c| Provider::syncs(c).len() == 2)
        .await;
    let synced = Provider::syncs(&calls)[1].clone();
    assert_eq!(
        synced,
        [
            InstanceNetworkState {
                instance: ident("svc-a"),
                network_id: "net-1".to_owned(),
                ip: "172.18.1.2".to_owned(),
                rules: vec![rule],
            },
            InstanceNetworkState {
                instance: ident("svc-b"),
                network_id: "net-1".to_owned(),
                ip: "172.18.1.3".to_owned(),
                rules: vec![],
            },
        ]
    );
    unit.heard.registered("node-1", 2).await;

    // 5. Stops: svc-a's network is released, the node stays in net-1 for svc-b; once svc-b
    //    goes too, the node leaves net-1. Instances without a network need no call.
    let before = unit.provider.calls().len();
    unit.controller
        .update_instances(&node, &[ident("svc-a")], &[])
        .await
        .expect("queued");
    assert!(next_instances_status(&mut events).await.is_empty());
    unit.controller
        .update_instances(
            &node,
            &[ident("svc-b"), ident("svc-c"), ident("svc-d")],
            &[],
        )
        .await
        .expect("queued");
    assert!(next_instances_status(&mut events).await.is_empty());
    let release = |item: &str| Call::ReleaseInstance {
        item: item.to_owned(),
        node: "node-1".to_owned(),
    };
    assert_eq!(
        unit.provider.calls()[before..],
        [
            release("svc-a"),
            release("svc-b"),
            Call::ReleaseNode {
                network: "net-1".to_owned(),
                node: "node-1".to_owned()
            },
        ]
    );
    let networks = handle.networks();
    assert!(networks.instances.is_empty(), "{networks:?}");
    assert!(networks.node("net-1").is_none(), "{networks:?}");

    // 6. The counters.
    let stats = sim.finish().await;
    let calls = stats.total.network_calls;
    assert_eq!(calls.get(NetworkCall::Subscribe), 2);
    assert_eq!(calls.sync_network_state, 2);
    assert_eq!(calls.get_node_network_params, 3);
    assert_eq!(calls.allocate_instance_network, 3);
    assert_eq!(calls.release_instance_network, 2);
    assert_eq!(calls.release_node_network, 1);
    let failures = stats.total.network_failures;
    assert_eq!(
        (
            failures.get_node_network_params,
            failures.allocate_instance_network
        ),
        (1, 1)
    );
    assert_eq!(failures.total(), 2, "{failures:?}");
    assert_eq!(stats.total.firewall_updates, 1);
    assert!(
        stats.to_string().contains("NetworkService: 13 calls"),
        "{stats}"
    );
    unit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_ends_is_renewed_after_the_reconnect_delay() {
    let unit = Unit::start(true).await;
    let node = NodeId::new("node-1");
    let (sim, mut events) = Simulator::start_with_events(unit.config()).expect("start");
    let subscribed = |e: &SimEvent| {
        matches!(
            e.kind,
            SimEventKind::Network {
                call: NetworkCall::Subscribe,
                error: None
            }
        )
    };
    wait_event(&mut events, &mut Vec::new(), "the subscription", subscribed).await;

    // A newer subscription of node-1 replaces the node's, whose stream ends; the node
    // subscribes again, which ends this one in turn. Its stream stayed up meanwhile.
    let mut ours = unit
        .controller
        .firewall_updates()
        .subscribe(&node)
        .expect("subscribed");
    let ended = tokio::time::timeout(DEADLINE, ours.next()).await;
    assert!(
        matches!(ended, Ok(None)),
        "the node subscribes again within {DEADLINE:?}"
    );
    wait_event(
        &mut events,
        &mut Vec::new(),
        "the new subscription",
        subscribed,
    )
    .await;
    let stats = sim.node("node-1").unwrap().stats();
    assert_eq!(stats.counters.network_calls.subscribe, 2);
    assert_eq!(stats.counters.network_failures.total(), 0);
    assert_eq!(stats.counters.connects, 1, "the stream stayed up");
    assert!(unit.controller.firewall_updates().is_subscribed(&node));
    sim.stop().await;
    unit.stop().await;
}
