//! What a simulation is asked to do: [`SimConfig`] for the whole run, [`Behaviour`] for each node.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use smcontroller_api::SmProtocol;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::SimError;

/// A hook that finishes the [`Endpoint`] of every connection attempt before it connects.
///
/// The simulator builds the endpoint from [`SimConfig::url`], sets the keepalive and timeout
/// options of a real SM and the node's TLS ([`SimConfig::tls`]); the hook can then change what
/// it likes.
pub type EndpointHook =
    Arc<dyn Fn(Endpoint) -> Result<Endpoint, tonic::transport::Error> + Send + Sync>;

/// The reconnect delay of a real SM by default: fixed (no backoff), configurable on the SM.
pub const REAL_SM_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Configuration of a [`Simulator`](super::Simulator) run.
#[derive(Clone)]
pub struct SimConfig {
    /// URL of the controller: `https://127.0.0.1:8093` with [`SimConfig::tls`],
    /// `http://127.0.0.1:8093` without (plain HTTP/2).
    pub url: String,
    /// mTLS: the CA that verifies the controller and each node's client certificate. `None`:
    /// plain HTTP/2 (the URL must be `http://`).
    pub tls: Option<SimTls>,
    /// Number of simulated nodes, each with its own connection.
    pub nodes: usize,
    /// The wire revision the nodes speak, which must be the controller's (`smProtocol`): 9.0
    /// (the default), or 9.1, where each node also calls `NetworkService` on its connection
    /// as the reference 9.1.1 SM does (see the [crate](crate) documentation).
    pub sm_protocol: SmProtocol,
    /// Node ids are `{node_prefix}-{n}`, `n` counted from 1 (the node's index plus one), as
    /// `cargo xtask gen-certs` names the nodes of its client certificates.
    pub node_prefix: String,
    /// `instant_monitoring` messages per second per node (0 = off).
    pub monitoring_rate: f64,
    /// `alert` messages per second per node (0 = off).
    pub alert_rate: f64,
    /// Messages of `instant_monitoring` each node sends as fast as flow control allows right
    /// after each registration (0 = off). See also [`NodeHandle::burst`](super::NodeHandle::burst).
    pub burst: u64,
    /// Pause after a stream ends (or a connection attempt fails) before the next attempt. It is
    /// fixed, as a real SM's reconnect timeout is: the same pause before every attempt, no
    /// backoff. A real SM waits [`REAL_SM_RECONNECT_DELAY`] unless configured otherwise; the
    /// default here is 1 s, so that demos and tests see a reconnect soon.
    pub reconnect_delay: Duration,
    /// Delay between the first connection attempts of consecutive nodes (0 = all at once).
    pub start_stagger: Duration,
    /// Timeout of one TCP/HTTP/2 connection attempt.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval (a real SM: 10 s, also while idle).
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout (a real SM: 3 s).
    pub keepalive_timeout: Duration,
    /// Optional hook applied to each connection's [`Endpoint`], after its TLS is set.
    pub endpoint_hook: Option<EndpointHook>,
    /// Instances each node reports at start (the `node_instances_status` snapshot).
    pub instances: usize,
    /// Node config state each node reports before any `set_node_config` (`absent` normally).
    pub initial_config_state: String,
    /// Node config version each node reports before any `set_node_config` (empty normally).
    pub initial_config_version: String,
    /// Capacity of each stream's outbound queue (messages waiting for HTTP/2 flow control).
    pub outbound_capacity: usize,
    /// Capacity of the event broadcast channel (see [`SimEvent`](super::SimEvent)).
    pub event_capacity: usize,
    /// Behaviour of every node without an entry in [`SimConfig::node_behaviours`].
    pub behaviour: Behaviour,
    /// Per-node behaviour, by node index (0-based), overriding [`SimConfig::behaviour`].
    pub node_behaviours: HashMap<usize, Behaviour>,
}

impl SimConfig {
    /// A configuration with the defaults for `nodes` nodes talking to `url`.
    pub fn new(url: impl Into<String>, nodes: usize) -> Self {
        Self {
            url: url.into(),
            nodes,
            ..Self::default()
        }
    }

    /// Sets the behaviour of the node with index `index` (builder style).
    #[must_use]
    pub fn with_node_behaviour(mut self, index: usize, behaviour: Behaviour) -> Self {
        self.node_behaviours.insert(index, behaviour);
        self
    }

    /// The behaviour of the node with index `index`.
    pub fn behaviour_for(&self, index: usize) -> &Behaviour {
        self.node_behaviours.get(&index).unwrap_or(&self.behaviour)
    }

    /// The id of the node with index `index` (0-based): `{node_prefix}-{index + 1}`.
    pub fn node_id(&self, index: usize) -> String {
        format!("{}-{}", self.node_prefix, index + 1)
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8093".to_owned(),
            tls: None,
            nodes: 1,
            sm_protocol: SmProtocol::V9_0,
            node_prefix: "node".to_owned(),
            monitoring_rate: 0.0,
            alert_rate: 0.0,
            burst: 0,
            reconnect_delay: Duration::from_secs(1),
            start_stagger: Duration::ZERO,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(3),
            endpoint_hook: None,
            instances: 3,
            initial_config_state: "absent".to_owned(),
            initial_config_version: String::new(),
            outbound_capacity: 256,
            event_capacity: 4096,
            behaviour: Behaviour::default(),
            node_behaviours: HashMap::new(),
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("url", &self.url)
            .field("tls", &self.tls)
            .field("nodes", &self.nodes)
            .field("sm_protocol", &self.sm_protocol)
            .field("node_prefix", &self.node_prefix)
            .field("monitoring_rate", &self.monitoring_rate)
            .field("alert_rate", &self.alert_rate)
            .field("burst", &self.burst)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("start_stagger", &self.start_stagger)
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field(
                "endpoint_hook",
                &self.endpoint_hook.as_ref().map(|_| "<hook>"),
            )
            .field("instances", &self.instances)
            .field("initial_config_state", &self.initial_config_state)
            .field("initial_config_version", &self.initial_config_version)
            .field("outbound_capacity", &self.outbound_capacity)
            .field("event_capacity", &self.event_capacity)
            .field("behaviour", &self.behaviour)
            .field("node_behaviours", &self.node_behaviours)
            .finish()
    }
}

/// mTLS of the simulated nodes, as a real SM does it: the controller's certificate is verified
/// against the unit's CA, and each node presents its own client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimTls {
    /// The CA certificate(s), PEM, that the controller's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// The name the controller's certificate must be valid for. `None`: the host of
    /// [`SimConfig::url`] (an IP address such as `127.0.0.1` is matched against the
    /// certificate's IP SANs).
    pub server_name: Option<String>,
    /// Where each node's client certificate comes from.
    pub client_certs: ClientCerts,
}

/// Where the client certificate of each simulated node comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// `DIR/client-<node id>.pem` and `DIR/client-<node id>.key` (as `cargo xtask gen-certs
    /// DIR` writes them: `client-node-1.pem`, ...), read when the simulation starts.
    Dir(PathBuf),
    /// No client certificate: a controller that requires one refuses the nodes.
    None,
}

impl SimTls {
    /// The development PKI in `dir`, as `cargo xtask gen-certs DIR` writes it: the CA
    /// `dir/ca.pem`, and each node's certificate and key from `dir` ([`ClientCerts::Dir`]).
    pub fn from_pki_dir(dir: impl Into<PathBuf>) -> Result<Self, SimError> {
        let dir = dir.into();
        Self::new(&dir.join("ca.pem"), ClientCerts::Dir(dir))
    }

    /// The CA certificate in the file `ca`, and the client certificates `client_certs`.
    pub fn new(ca: &Path, client_certs: ClientCerts) -> Result<Self, SimError> {
        Ok(Self {
            ca_pem: read(ca, "the CA certificate")?,
            server_name: None,
            client_certs,
        })
    }

    /// With `name` as the name the controller's certificate must be valid for.
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The TLS settings of the node `node_id`; reads its certificate and key.
    pub fn client_config(&self, node_id: &str) -> Result<ClientTlsConfig, SimError> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        match &self.client_certs {
            ClientCerts::Dir(dir) => {
                let what = format!("the client certificate of {node_id}");
                let cert = read(&dir.join(format!("client-{node_id}.pem")), &what)?;
                let what = format!("the private key of {node_id}");
                let key = read(&dir.join(format!("client-{node_id}.key")), &what)?;
                Ok(tls.identity(Identity::from_pem(cert, key)))
            }
            ClientCerts::None => Ok(tls),
        }
    }
}

/// The bytes of a certificate or key file; errors name the file and what it is for.
fn read(path: &Path, what: &str) -> Result<Vec<u8>, SimError> {
    std::fs::read(path).map_err(|e| {
        SimError::InvalidConfig(format!("cannot read {what}, {}: {e}", path.display()))
    })
}

/// How one simulated node behaves; the default is a well-behaved SM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// How replies to commands are sent.
    pub answers: Answers,
    /// What the node sends when its stream opens.
    pub registration: Registration,
    /// Which invalid messages the node sends.
    pub garbage: Garbage,
}

impl Behaviour {
    /// A node that never answers the sync requests.
    pub fn never_answer() -> Self {
        Self {
            answers: Answers::Never,
            ..Self::default()
        }
    }

    /// A node that sends each reply `delay` late.
    pub fn answer_delay(delay: Duration) -> Self {
        Self {
            answers: Answers::Delayed(delay),
            ..Self::default()
        }
    }

    /// A node that sends every kind of garbage of [`Garbage::all`].
    pub fn garbage() -> Self {
        Self {
            garbage: Garbage::all(),
            ..Self::default()
        }
    }

    /// A node that registers as `registration` says.
    pub fn registration(registration: Registration) -> Self {
        Self {
            registration,
            ..Self::default()
        }
    }
}

/// How a node answers commands.
///
/// Whatever the variant, a node handles its stream as a real SM does: one command at a time,
/// in the order they arrive, so its replies come in the order of the commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Answers {
    /// Every command gets its reply as soon as it is handled (a real SM).
    #[default]
    Normal,
    /// The sync requests (`get_node_config_status`, `check_node_config`, `set_node_config`,
    /// `get_average_monitoring`) never get a reply; instance updates and logs still do.
    Never,
    /// Handling each command that gets a reply takes this long: the reply goes out this late,
    /// and the commands after it wait behind it (never overtaking), so the reply to the n-th of
    /// a burst of commands comes at least n times this late.
    Delayed(Duration),
}

/// What a node sends when its stream opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Registration {
    /// `sm_info` then `node_instances_status` (a real SM).
    #[default]
    Normal,
    /// `sm_info` with an empty `node_id`, then `node_instances_status`.
    EmptyNodeId,
    /// `node_instances_status` only: the first message is not `sm_info`.
    SkipSmInfo,
    /// Nothing at all until a command arrives (for registration timeouts).
    Silent,
}

/// The invalid messages a node sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Garbage {
    /// Vocabulary fields carry values outside the vocabulary (`bogus`): node config state,
    /// instance state, log status, quota alert status, core alert component.
    pub bad_vocabulary: bool,
    /// Alerts carry no timestamp.
    pub alert_without_timestamp: bool,
    /// An `SMOutgoingMessages` with an empty oneof after registration and before every alert.
    pub empty_oneof: bool,
}

impl Garbage {
    /// Every kind of garbage.
    pub fn all() -> Self {
        Self {
            bad_vocabulary: true,
            alert_without_timestamp: true,
            empty_oneof: true,
        }
    }
}
