//! The SM simulator: simulated Service Managers that speak `servicemanager.v5` to an SM
//! controller exactly as real SMs do, for tests, demos and benchmarks; `sm-sim` is its command
//! line.
//!
//! It is a client of the wire and nothing more: it depends on the generated code of
//! `smcontroller-grpc` and on tonic's TLS client, never on the daemon (`smcontroller-daemon`),
//! the admin API (`smcontroller-admin`), a metrics exporter or sd-notify, so that a CM
//! integrator can run simulated nodes against a controller without building the daemon. Start
//! reading at [`Simulator`] (a fleet of nodes) and [`Behaviour`] (how one node misbehaves);
//! [`SimStats`] is what a run counted.
//!
//! Each simulated node has its own HTTP/2 connection (HTTP/2 keepalive every 10 s, 3 s timeout,
//! also while idle), calls `RegisterSM`, sends `sm_info` and `node_instances_status`, answers
//! every command, sends `instant_monitoring` and `alert`s at configured rates, and reconnects
//! after a fixed delay whenever its stream ends. [`Behaviour`] makes single nodes misbehave.
//!
//! Where the recordings of the real Aos SM (`shared/fixtures/real-aos`) show how it behaves, a
//! node does the same: it handles its stream serially, one command at a time, so its replies
//! come in command order (also with [`Answers::Delayed`]: later commands wait behind); every
//! `node_config_status`, `InstanceStatus`, `EnvVarStatus` and `LogData` carries an `error`,
//! empty when nothing failed; a check or set of a node config it cannot read (no
//! `nodeGroupSubject`) gets no reply at all; on `update_instances` it resolves the manifest
//! digests of the instances to start with `GetBlobsInfos` on its own connection before it
//! reports them (`failed` if that fails), and a stop alone gets an `update_instances_status`
//! without instances; it ignores a `connection_status` that repeats its cloud status; its
//! reconnect delay is fixed ([`SimConfig::reconnect_delay`]).
//!
//! It speaks the wire revision of [`SimConfig::sm_protocol`]. Under 9.0 (the default) that is
//! all. Under 9.1 each node also does, on its own connection, what the reference 9.1.1 SM does
//! with `NetworkService`, in this order:
//!
//! 1. before `RegisterSM`, it subscribes to its network updates
//!    (`SubscribeInstanceNetworkUpdates`) and reads them for as long as the connection lasts,
//!    subscribing again after the reconnect delay whenever the subscription ends; each update
//!    replaces the firewall rules of its instance;
//! 2. it registers as under 9.0 (`sm_info`, `node_instances_status`), then calls
//!    `SyncNetworkState` with the instances it runs with a network *before* it reads its
//!    stream (a failure is only logged and counted);
//! 3. on `update_instances` it releases the networks of the instances to stop
//!    (`ReleaseInstanceNetwork`, and `ReleaseNodeNetwork` after a network's last instance on
//!    the node; failures only logged), resolves the manifests as under 9.0, then for each
//!    instance to start with an owner id, the network id, asks `GetNodeNetworkParams` if the
//!    node is not in that network yet and `AllocateInstanceNetwork`; an error fails the
//!    instance (`failed`, with the error), as in the reference.
//!
//! Its commands arrive in the 9.1 envelope and are handled as the 9.0 ones (one conversion at
//! the edge). [`NodeHandle::networks`] shows what a node was given; [`Counters`] counts the
//! calls ([`NetworkCall`]), their failures and the firewall updates.
//!
//! ```no_run
//! # async fn demo() -> Result<(), smcontroller_sim::SimError> {
//! use std::time::Duration;
//! use smcontroller_sim::{SimConfig, Simulator};
//!
//! let sim = Simulator::start(SimConfig::new("http://127.0.0.1:8093", 3))?;
//! assert!(sim.wait_connected(3, Duration::from_secs(5)).await);
//! println!("{}", sim.stats());
//! sim.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! The simulator builds and reads the prost messages itself ([`messages`]); it shares no
//! conversion code with the controller, so each end checks the other. The one exception is
//! the move of a 9.1 command into the 9.0 envelope, prost message to prost message (the
//! `smcontroller-grpc` conversion written for the simulator; no domain type on the way).

mod config;
mod events;
pub mod messages;
mod network;
mod node;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfosRequest, SmOutgoingMessages, sm_service_client::SmServiceClient,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{ClientTlsConfig, Endpoint};

pub use config::{
    Answers, Behaviour, ClientCerts, EndpointHook, Garbage, REAL_SM_RECONNECT_DELAY, Registration,
    SimConfig, SimTls,
};
pub use events::{SimEvent, SimEventKind, SimEvents};
pub use network::{InstanceNetwork, NETWORK_TIMEOUT, Networks, NodeNetwork};
pub use smcontroller_api::{SmMessageKind, SmProtocol};
pub use stats::{
    CommandCounts, CommandKind, Counters, NetworkCall, NetworkCallCounts, NodeStats, SentCounts,
    SimStats,
};

use events::EventBus;
use node::{NodeShared, Outbound, SimContext};

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration cannot work (bad URL, bad rate, ...).
    #[error("invalid simulator configuration: {0}")]
    InvalidConfig(String),
    /// [`Simulator::start`] was called outside a Tokio runtime.
    #[error("the simulator must be started inside a Tokio runtime")]
    NoRuntime,
    /// No node has this id.
    #[error("no simulated node {0}")]
    UnknownNode(String),
    /// The node has no open stream now.
    #[error("node {0} has no open stream")]
    NotConnected(String),
    /// Building the endpoint failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A unary call failed.
    #[error("call failed: {0}")]
    Rpc(Box<tonic::Status>),
}

/// The endpoint one connection attempt of a node uses: [`SimConfig::url`] with the keepalive
/// and timeouts of a real SM, the node's TLS settings `tls` (from
/// [`SimTls::client_config`]) if any, then [`SimConfig::endpoint_hook`].
pub fn endpoint(config: &SimConfig, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, SimError> {
    let mut endpoint = Endpoint::from_shared(config.url.clone())?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    match &config.endpoint_hook {
        Some(hook) => Ok(hook(endpoint)?),
        None => Ok(endpoint),
    }
}

/// Each node's TLS settings, by index, when [`SimConfig::tls`] is set; checks that the URL's
/// scheme goes with it (tonic speaks TLS to `https://` URLs only).
fn node_tls(config: &SimConfig) -> Result<Vec<Option<ClientTlsConfig>>, SimError> {
    let https = config.url.starts_with("https://");
    let Some(tls) = &config.tls else {
        if https {
            return Err(SimError::InvalidConfig(format!(
                "{} is an https:// URL but no TLS is configured; use http:// for plain HTTP/2",
                config.url
            )));
        }
        return Ok(vec![None; config.nodes]);
    };
    if !https {
        return Err(SimError::InvalidConfig(format!(
            "mTLS needs an https:// URL, not {}",
            config.url
        )));
    }
    (0..config.nodes)
        .map(|index| {
            let client = tls.client_config(&config.node_id(index))?;
            // Builds the TLS connector once now, so that a bad certificate or key shows here.
            endpoint(config, Some(&client))?;
            Ok(Some(client))
        })
        .collect()
}

fn validate(config: &SimConfig) -> Result<(), SimError> {
    endpoint(config, None)?;
    for (name, rate) in [
        ("monitoring_rate", config.monitoring_rate),
        ("alert_rate", config.alert_rate),
    ] {
        if !rate.is_finite() || rate < 0.0 {
            return Err(SimError::InvalidConfig(format!(
                "{name} must be a finite number >= 0, not {rate}"
            )));
        }
    }
    if config.keepalive_interval.is_zero() || config.keepalive_timeout.is_zero() {
        return Err(SimError::InvalidConfig(
            "keepalive interval and timeout must be > 0".to_owned(),
        ));
    }
    Ok(())
}

/// A running simulation of [`SimConfig::nodes`] nodes, each driven by its own task.
///
/// Dropping it stops every node too, without waiting; [`Simulator::stop`] waits.
pub struct Simulator {
    ctx: Arc<SimContext>,
    nodes: Vec<Arc<NodeShared>>,
    by_id: HashMap<Arc<str>, usize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Simulator {
    /// Starts every node (spawns one task each on the current Tokio runtime).
    pub fn start(config: SimConfig) -> Result<Self, SimError> {
        Self::start_with_events(config).map(|(sim, _)| sim)
    }

    /// Like [`Simulator::start`], and subscribes to the events before any node runs, so the
    /// receiver sees every event from the first connection on.
    pub fn start_with_events(config: SimConfig) -> Result<(Self, SimEvents), SimError> {
        validate(&config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let tls = node_tls(&config)?;
        let events = Arc::new(EventBus::new(config.event_capacity));
        let receiver = events.subscribe();
        let (registered, _) = watch::channel(0);
        let nodes: Vec<Arc<NodeShared>> = tls
            .into_iter()
            .enumerate()
            .map(|(i, tls)| Arc::new(NodeShared::new(i, &config, tls)))
            .collect();
        let by_id = nodes.iter().map(|n| (n.id.clone(), n.index)).collect();
        let ctx = Arc::new(SimContext {
            config,
            stop: CancellationToken::new(),
            events,
            registered,
        });
        let tasks = nodes
            .iter()
            .map(|n| runtime.spawn(node::run_node(n.clone(), ctx.clone())))
            .collect();
        Ok((
            Self {
                ctx,
                nodes,
                by_id,
                tasks,
            },
            receiver,
        ))
    }

    /// The configuration the simulation runs with.
    pub fn config(&self) -> &SimConfig {
        &self.ctx.config
    }

    /// Ids of every node, in index order.
    pub fn node_ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.id.to_string()).collect()
    }

    /// The node with id `id`.
    pub fn node(&self, id: &str) -> Option<NodeHandle> {
        self.by_id.get(id).map(|&i| self.node_at(i))
    }

    /// The node with index `index`.
    ///
    /// # Panics
    /// When `index >= nodes`.
    pub fn node_at(&self, index: usize) -> NodeHandle {
        NodeHandle {
            node: self.nodes[index].clone(),
            ctx: self.ctx.clone(),
        }
    }

    /// A new receiver of the events of every node (events from now on).
    pub fn subscribe(&self) -> SimEvents {
        self.ctx.events.subscribe()
    }

    /// A snapshot of every node's counters and their sum.
    pub fn stats(&self) -> SimStats {
        SimStats::from_nodes(self.nodes.iter().map(|n| n.stats()).collect())
    }

    /// Nodes that have registered at least once (sent `sm_info`, then received a message).
    pub fn registered(&self) -> usize {
        *self.ctx.registered.borrow()
    }

    /// Waits until at least `n` nodes have registered at least once; false after `deadline`.
    pub async fn wait_connected(&self, n: usize, deadline: Duration) -> bool {
        let mut rx = self.ctx.registered.subscribe();
        matches!(
            tokio::time::timeout(deadline, rx.wait_for(|count| *count >= n)).await,
            Ok(Ok(_))
        )
    }

    /// Makes every connected node send `count` `instant_monitoring` messages as fast as flow
    /// control allows, all nodes at once; returns the messages sent in total.
    pub async fn burst(&self, count: u64) -> u64 {
        let bursts = self.nodes.iter().map(|n| {
            let handle = NodeHandle {
                node: n.clone(),
                ctx: self.ctx.clone(),
            };
            async move { handle.burst(count).await.unwrap_or(0) }
        });
        futures::future::join_all(bursts).await.into_iter().sum()
    }

    /// Ends every stream and waits for every node task.
    pub async fn stop(self) {
        self.finish().await;
    }

    /// Like [`Simulator::stop`], and returns the final stats (every stream counted as ended).
    pub async fn finish(mut self) -> SimStats {
        self.ctx.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "simulated node task failed");
            }
        }
        self.stats()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.ctx.stop.cancel();
    }
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("url", &self.ctx.config.url)
            .field("nodes", &self.nodes.len())
            .field("registered", &self.registered())
            .finish_non_exhaustive()
    }
}

/// One simulated node, to act on it directly.
#[derive(Clone)]
pub struct NodeHandle {
    node: Arc<NodeShared>,
    ctx: Arc<SimContext>,
}

impl NodeHandle {
    /// The node id.
    pub fn id(&self) -> &str {
        &self.node.id
    }

    /// The node's behaviour.
    pub fn behaviour(&self) -> &Behaviour {
        &self.node.behaviour
    }

    /// A stream is open now.
    pub fn is_connected(&self) -> bool {
        self.node.connected.load(Ordering::Relaxed)
    }

    /// A snapshot of the node.
    pub fn stats(&self) -> NodeStats {
        self.node.stats()
    }

    /// The networks `NetworkService` gave the node (9.1; empty under 9.0): its address in each
    /// network it is in, and each running instance's address and firewall rules. They outlive
    /// the node's streams, as a real SM keeps them.
    pub fn networks(&self) -> Networks {
        self.node.networks()
    }

    fn outbound(&self) -> Result<(Outbound, node::Link), SimError> {
        let link = self
            .node
            .link()
            .ok_or_else(|| SimError::NotConnected(self.node.id.to_string()))?;
        let out = Outbound {
            tx: link.tx.clone(),
            node: self.node.clone(),
            events: self.ctx.events.clone(),
            session: link.session.clone(),
        };
        Ok((out, link))
    }

    /// Sends `msg` on the node's open stream, as it is (it may be garbage).
    pub async fn send(&self, msg: SmOutgoingMessages) -> Result<(), SimError> {
        self.outbound()?.0.send(msg).await
    }

    /// Sends `count` `instant_monitoring` messages as fast as flow control allows.
    pub async fn burst(&self, count: u64) -> Result<u64, SimError> {
        self.outbound()?.0.burst(count).await
    }

    /// Ends the node's open stream from the SM side; the node reconnects after the reconnect
    /// delay. False when no stream is open.
    pub fn drop_stream(&self) -> bool {
        match self.node.link() {
            Some(link) => {
                link.session.cancel();
                true
            }
            None => false,
        }
    }

    /// Calls `GetBlobsInfos` on the node's connection, as a real SM does.
    pub async fn get_blobs_infos(&self, digests: Vec<String>) -> Result<Vec<String>, SimError> {
        let (_, link) = self.outbound()?;
        let mut client = SmServiceClient::new(link.channel);
        let response = client
            .get_blobs_infos(BlobsInfosRequest { digests })
            .await
            .map_err(|s| SimError::Rpc(Box::new(s)))?;
        Ok(response.into_inner().urls)
    }
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("id", &self.node.id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}
