//! A network provider for Aos 9.1 units (R-NET-4): what answers the `NetworkService` calls of
//! 9.1 nodes when no CM network manager is attached; `smcontrollerd` uses it under
//! `smProtocol` 9.1. Start reading at [`DefaultNetworks`].
//!
//! It implements the api's `NetworkProvider` and pushes through its `FirewallUpdates`; it
//! depends on `smcontroller-api` alone (no transport, no TLS, no admin API), so a CM can use it
//! as it is, or as the model of its own.
//!
//! - **Subnets and VLANs.** The first time a node asks for a network id (the instances' owner
//!   id), the network gets the lowest free subnet of the [`NetworkPool`] (/24 by default) and
//!   the lowest VLAN id in 1..=4094 that no other network has. Subnets and VLAN ids go back to
//!   the pool when the last node leaves the network.
//! - **Addresses.** The network address and the broadcast address of a subnet are never given;
//!   every other one, lowest free first, goes to whoever asks: a node's host address (the
//!   node's bridge in that network, which is the gateway of the node's instances there) or an
//!   instance's address. No address is kept aside as one gateway of the whole subnet, since
//!   each node is its own instances' gateway, as with the reference network manager.
//! - **Stability.** Asking again gives the same answer. An instance keeps its address while it
//!   is allocated, also when another node of the same network allocates it (it moved); a
//!   released address is given out again.
//! - **No DNS.** The daemon runs no DNS server: `dns_servers` is empty, and the instances' host
//!   names are kept with them but neither served nor checked for clashes.
//! - **Firewall rules** are computed as the reference does: an instance that may connect to
//!   `item/port[/proto]` (tcp by default) gets a rule towards every instance of that item in
//!   another subnet that exposes `port[/proto]`; none within its own subnet. A connection whose
//!   target has no instance yet is pending: when a matching target is allocated (or released),
//!   the requester's node gets the requester's **whole** new rule set through
//!   [`FirewallUpdates`], never a delta. A push that fails is kept (the latest per instance)
//!   and made again after the node's next `sync_network_state` (R-NET-3), as is the push of any
//!   instance whose rules the node reports differently from ours.
//! - **State** ([`DefaultNetworks::open`]): after each change the allocations are written to
//!   the state file as JSON, atomically (a temporary file in the same directory, synced, then
//!   renamed over the file, and the directory synced). A restarted provider on the same file
//!   gives the same answers. Pending connections and kept pushes are not stored: they follow
//!   from the stored instances' parameters, and a node's rules are checked at its next sync.
//! - **Bounds.** Networks are bounded by the pool's subnets and the 4094 VLAN ids, hosts and
//!   instances by their subnets' addresses, the entries of an instance's parameters by
//!   [`MAX_PARAMETER_ENTRIES`] of [`MAX_PARAMETER_LEN`] bytes, kept pushes by one per instance.
//!
//! One mutex guards the state; it is never held across an `.await`. With a state file, each
//! call runs on tokio's blocking pool, where it writes (and syncs) the file under the mutex,
//! so two writes cannot land out of order and no async worker waits on the disk. Firewall
//! updates are pushed under the mutex too, so a node gets an instance's rule sets in the order
//! they were made.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    io::{self, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smcontroller_api::{
    Error, FirewallRule, FirewallUpdates, InstanceIdent, InstanceNetworkState,
    ItemNetworkParameters, ItemType, NetworkParameters, NetworkProvider, NodeId,
    PendingFirewallUpdate, Result, UpdateNetworkParameters,
};
use tracing::{debug, info, warn};

/// The subnet size a [`NetworkPool`] cuts unless it says otherwise: /24.
pub const DEFAULT_SUBNET_PREFIX: u8 = 24;

/// The largest subnets a pool may cut (/16: 65534 addresses per network).
pub const MIN_SUBNET_PREFIX: u8 = 16;

/// The smallest subnets a pool may cut (/30: two addresses per network).
pub const MAX_SUBNET_PREFIX: u8 = 30;

/// The VLAN ids networks get: 1..=4094 (0 and 4095 are reserved by 802.1Q).
pub const VLAN_IDS: std::ops::RangeInclusive<u32> = 1..=4094;

/// At most this many host names, allowed connections or exposed ports per instance.
pub const MAX_PARAMETER_ENTRIES: usize = 256;

/// At most this many bytes per host name, allowed connection or exposed port.
pub const MAX_PARAMETER_LEN: usize = 256;

/// The version of the state file's format this daemon writes and reads.
const STATE_VERSION: u32 = 1;

/// Aos error kinds (`ErrorEnum` of the core library) given in [`Error::Failed`].
mod aos {
    /// Failed.
    pub(super) const FAILED: i32 = 1;
    /// NoMemory: a pool, subnet or VLAN range is used up.
    pub(super) const NO_MEMORY: i32 = 3;
    /// NotFound.
    pub(super) const NOT_FOUND: i32 = 5;
}

fn failed(aos_code: i32, message: String) -> Error {
    Error::Failed {
        aos_code,
        exit_code: 0,
        message,
    }
}

/// The address pool subnets are cut from: an IPv4 CIDR block (`networkPool`), and the size of
/// the subnets, /24 unless the value says otherwise with a `:/N` suffix
/// (`"10.10.0.0/16:/26"`, from /16 to /30).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPool {
    base: u32,
    prefix: u8,
    subnet_prefix: u8,
}

impl NetworkPool {
    /// The first address of the block.
    pub fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    /// The block's prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The prefix length of each subnet.
    pub fn subnet_prefix(&self) -> u8 {
        self.subnet_prefix
    }

    /// How many subnets the block holds.
    pub fn subnet_count(&self) -> u64 {
        1 << (self.subnet_prefix - self.prefix)
    }

    /// The subnet at `index` (below [`subnet_count`](Self::subnet_count)).
    fn subnet(&self, index: u32) -> Subnet {
        Subnet {
            base: self.base + (index << (32 - u32::from(self.subnet_prefix))),
            prefix: self.subnet_prefix,
        }
    }

    /// The index of `subnet` in the pool, if it is one of its subnets.
    fn index_of(&self, subnet: Subnet) -> Option<u32> {
        let size_bits = 32 - u32::from(self.subnet_prefix);
        let offset = subnet.base.checked_sub(self.base)?;
        let index = offset >> size_bits;
        (subnet.prefix == self.subnet_prefix
            && offset & ((1 << size_bits) - 1) == 0
            && u64::from(index) < self.subnet_count())
        .then_some(index)
    }
}

impl Default for NetworkPool {
    /// 172.17.0.0/16, in /24 subnets: 256 networks of 254 addresses.
    fn default() -> Self {
        Self {
            base: u32::from(Ipv4Addr::new(172, 17, 0, 0)),
            prefix: 16,
            subnet_prefix: DEFAULT_SUBNET_PREFIX,
        }
    }
}

impl fmt::Display for NetworkPool {
    /// `172.17.0.0/16`, with `:/N` when the subnets are not /24: what [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base(), self.prefix)?;
        if self.subnet_prefix != DEFAULT_SUBNET_PREFIX {
            write!(f, ":/{}", self.subnet_prefix)?;
        }
        Ok(())
    }
}

/// Why a string is not a [`NetworkPool`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network pool {value:?}: {reason}")]
pub struct BadNetworkPool {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for NetworkPool {
    type Err = BadNetworkPool;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| BadNetworkPool {
            value: value.to_owned(),
            reason,
        };
        // A `:/N` suffix follows a block that has its own `/`: "fd00::/64" has none.
        let suffix = value
            .rsplit_once(":/")
            .filter(|(block, _)| block.contains('/'));
        let (block, subnet_prefix) = match suffix {
            Some((block, size)) => {
                let prefix = size
                    .parse::<u8>()
                    .ok()
                    .filter(|p| (MIN_SUBNET_PREFIX..=MAX_SUBNET_PREFIX).contains(p))
                    .ok_or_else(|| {
                        bad(format!(
                            "the subnet size /{size} is not one from /{MIN_SUBNET_PREFIX} to \
                             /{MAX_SUBNET_PREFIX}"
                        ))
                    })?;
                (block, prefix)
            }
            None => (value, DEFAULT_SUBNET_PREFIX),
        };
        let (address, prefix) = block.split_once('/').ok_or_else(|| {
            bad("no prefix length: give an IPv4 CIDR block such as 172.17.0.0/16".to_owned())
        })?;
        let address: Ipv4Addr = address.parse().map_err(|_| {
            bad(if address.parse::<Ipv6Addr>().is_ok() {
                format!("{address} is an IPv6 address: the pool must be an IPv4 block")
            } else {
                format!("{address:?} is not an IPv4 address")
            })
        })?;
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| {
                bad(format!(
                    "the prefix length {prefix:?} is not one from 0 to 32"
                ))
            })?;
        if prefix > subnet_prefix {
            return Err(bad(format!(
                "a /{prefix} block is smaller than one /{subnet_prefix} subnet"
            )));
        }
        let base = u32::from(address);
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if base & !mask != 0 {
            return Err(bad(format!(
                "host bits are set: the /{prefix} block that holds {address} starts at {}",
                Ipv4Addr::from(base & mask)
            )));
        }
        Ok(Self {
            base,
            prefix,
            subnet_prefix,
        })
    }
}

/// One subnet of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subnet {
    base: u32,
    prefix: u8,
}

impl Subnet {
    /// The highest offset that is not the broadcast address.
    fn last_offset(self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 2
    }

    /// How many addresses it gives out.
    fn usable(self) -> u32 {
        self.last_offset()
    }

    fn address(self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + offset)
    }

    /// The offset of `ip` if it is an address the subnet gives out.
    fn offset_of(self, ip: Ipv4Addr) -> Option<u32> {
        u32::from(ip)
            .checked_sub(self.base)
            .filter(|o| (1..=self.last_offset()).contains(o))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = value
            .split_once('/')
            .ok_or_else(|| format!("{value:?} is not a CIDR subnet"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{value:?} is not a CIDR subnet"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{value:?} is not a CIDR subnet"))?;
        Ok(Self {
            base: u32::from(address),
            prefix,
        })
    }
}

/// The lowest value in `first..=last` that is not in `used`.
fn lowest_free(used: &BTreeSet<u32>, first: u32, last: u32) -> Option<u32> {
    let mut candidate = first;
    for &taken in used.range(first..=last) {
        if taken != candidate {
            break;
        }
        candidate += 1;
    }
    (candidate <= last).then_some(candidate)
}

/// What `item/port[/proto]` allows: a connection to port and protocol of every instance of
/// the item.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Connection {
    item: String,
    port: String,
    proto: String,
}

/// A port: `1..=65535`, or a range of them `low-high`.
fn port(value: &str) -> Option<String> {
    let one = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    match value.split_once('-') {
        None => one(value).map(|_| value.to_owned()),
        Some((low, high)) => match (one(low), one(high)) {
            (Some(l), Some(h)) if l <= h => Some(value.to_owned()),
            _ => None,
        },
    }
}

/// A protocol name (`tcp`, `udp`, ...), lowercased; `tcp` when absent.
fn proto(value: Option<&str>) -> Option<String> {
    match value {
        None => Some("tcp".to_owned()),
        Some(p)
            if !p.is_empty() && p.len() <= 16 && p.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            Some(p.to_ascii_lowercase())
        }
        Some(_) => None,
    }
}

/// An instance's network parameters, as given and as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Params {
    given: ItemNetworkParameters,
    allowed: Vec<Connection>,
    /// `(port, proto)` pairs.
    exposed: HashSet<(String, String)>,
}

impl Params {
    /// Reads `given`: every allowed connection must be `item/port[/proto]` and every exposed
    /// port `port[/proto]`; a bad entry is `InvalidArgument` naming it.
    fn parse(given: &ItemNetworkParameters) -> Result<Self> {
        for (field, list) in [
            ("hosts", &given.hosts),
            ("allowed_connections", &given.allowed_connections),
            ("exposed_ports", &given.exposed_ports),
        ] {
            if list.len() > MAX_PARAMETER_ENTRIES {
                return Err(Error::InvalidArgument(format!(
                    "{field}: {} entries, at most {MAX_PARAMETER_ENTRIES}",
                    list.len()
                )));
            }
            if let Some((i, _)) = list
                .iter()
                .enumerate()
                .find(|(_, e)| e.len() > MAX_PARAMETER_LEN)
            {
                return Err(Error::InvalidArgument(format!(
                    "{field}[{i}]: longer than {MAX_PARAMETER_LEN} bytes"
                )));
            }
        }
        let mut allowed = Vec::with_capacity(given.allowed_connections.len());
        for entry in &given.allowed_connections {
            let parts: Vec<&str> = entry.split('/').collect();
            let connection = match parts[..] {
                [item, p] | [item, p, _] if !item.is_empty() => {
                    port(p).zip(proto(parts.get(2).copied()))
                }
                _ => None,
            }
            .map(|(port, proto)| Connection {
                item: parts[0].to_owned(),
                port,
                proto,
            })
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "allowed connection {entry:?} is not itemID/port[/proto] (a port 1-65535 \
                     or a range low-high, a protocol such as tcp or udp)"
                ))
            })?;
            allowed.push(connection);
        }
        let mut exposed = HashSet::with_capacity(given.exposed_ports.len());
        for entry in &given.exposed_ports {
            let (p, pr) = match entry.split_once('/') {
                Some((p, pr)) => (p, Some(pr)),
                None => (entry.as_str(), None),
            };
            let pair = port(p).zip(proto(pr)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "exposed port {entry:?} is not port[/proto] (a port 1-65535 or a range \
                     low-high, a protocol such as tcp or udp)"
                ))
            })?;
            exposed.insert(pair);
        }
        Ok(Self {
            given: given.clone(),
            allowed,
            exposed,
        })
    }

    fn exposes(&self, port: &str, proto: &str) -> bool {
        self.exposed.contains(&(port.to_owned(), proto.to_owned()))
    }
}

/// An instance, as the provider keys it: item, subject, instance index (its type and whether
/// it is preinstalled do not make another instance).
type Key = (String, String, u64);

fn key_of(ident: &InstanceIdent) -> Key {
    (
        ident.item_id.clone(),
        ident.subject_id.clone(),
        ident.instance,
    )
}

fn ident_text(key: &Key) -> String {
    format!("{}/{}/{}", key.0, key.1, key.2)
}

/// One network id's allocations.
#[derive(Debug, Clone)]
struct Network {
    subnet: Subnet,
    vlan_id: u32,
    /// Each node's offset in the subnet.
    hosts: BTreeMap<NodeId, u32>,
    /// Every offset given out, to hosts and instances.
    used: BTreeSet<u32>,
}

impl Network {
    /// The lowest free offset, or the error naming the full subnet.
    fn take_offset(&mut self, network_id: &str) -> Result<u32> {
        let offset = lowest_free(&self.used, 1, self.subnet.last_offset()).ok_or_else(|| {
            failed(
                aos::NO_MEMORY,
                format!(
                    "subnet {} of network {network_id} is full: all {} addresses are in use",
                    self.subnet,
                    self.subnet.usable()
                ),
            )
        })?;
        self.used.insert(offset);
        Ok(offset)
    }
}

/// One instance's allocation.
#[derive(Debug, Clone)]
struct Instance {
    ident: InstanceIdent,
    network_id: String,
    node: NodeId,
    offset: u32,
    params: Params,
}

/// Everything the provider knows.
#[derive(Debug, Default)]
struct State {
    networks: BTreeMap<String, Network>,
    instances: BTreeMap<Key, Instance>,
    /// Per node, the instances whose latest rule set the node may not have (its push failed):
    /// pushed again after the node's next sync.
    unsent: HashMap<NodeId, BTreeSet<Key>>,
    /// The state file lags behind: its last write failed.
    dirty: bool,
}

/// Rules before a change, to push those that the change alters.
type RulesBefore = Vec<(Key, Vec<FirewallRule>)>;

impl State {
    fn ip_of(&self, instance: &Instance) -> Ipv4Addr {
        self.networks
            .get(&instance.network_id)
            .map_or(Ipv4Addr::UNSPECIFIED, |n| n.subnet.address(instance.offset))
    }

    /// Every instance of `item`.
    fn instances_of<'a>(&'a self, item: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances
            .range((item.to_owned(), String::new(), 0)..)
            .take_while(move |(k, _)| k.0 == item)
            .map(|(_, i)| i)
    }

    /// The whole current rule set of the instance `key`.
    fn rules_of(&self, key: &Key) -> Vec<FirewallRule> {
        let Some(me) = self.instances.get(key) else {
            return Vec::new();
        };
        let src_ip = self.ip_of(me).to_string();
        let mut seen = HashSet::new();
        let mut rules = Vec::new();
        for c in &me.params.allowed {
            for target in self.instances_of(&c.item) {
                if target.network_id == me.network_id || !target.params.exposes(&c.port, &c.proto) {
                    continue;
                }
                let dst_ip = self.ip_of(target).to_string();
                if seen.insert((dst_ip.clone(), c.port.clone(), c.proto.clone())) {
                    rules.push(FirewallRule {
                        dst_ip,
                        dst_port: c.port.clone(),
                        proto: c.proto.clone(),
                        src_ip: src_ip.clone(),
                    });
                }
            }
        }
        rules
    }

    /// The rules now of every instance (but those in `except`) that may connect to one of
    /// `items`: the instances a change of those items' instances may concern.
    fn rules_before(&self, items: &BTreeSet<String>, except: &BTreeSet<Key>) -> RulesBefore {
        self.instances
            .iter()
            .filter(|(k, i)| {
                !except.contains(*k) && i.params.allowed.iter().any(|c| items.contains(&c.item))
            })
            .map(|(k, _)| (k.clone(), self.rules_of(k)))
            .collect()
    }

    /// Removes the instance `key` and frees its address.
    fn remove_instance(&mut self, key: &Key) -> Option<Instance> {
        let instance = self.instances.remove(key)?;
        if let Some(network) = self.networks.get_mut(&instance.network_id) {
            network.used.remove(&instance.offset);
        }
        if let Some(unsent) = self.unsent.get_mut(&instance.node) {
            unsent.remove(key);
        }
        Some(instance)
    }

    /// What the admin API and the operator see.
    fn snapshot(&self, pool: &NetworkPool) -> NetworksSnapshot {
        let mut networks: BTreeMap<&str, NetworkSnapshot> = self
            .networks
            .iter()
            .map(|(id, n)| {
                let snapshot = NetworkSnapshot {
                    network_id: id.clone(),
                    subnet: n.subnet.to_string(),
                    vlan_id: n.vlan_id,
                    hosts: n
                        .hosts
                        .iter()
                        .map(|(node, offset)| HostSnapshot {
                            node_id: node.to_string(),
                            ip: n.subnet.address(*offset).to_string(),
                        })
                        .collect(),
                    instances: Vec::new(),
                };
                (id.as_str(), snapshot)
            })
            .collect();
        for instance in self.instances.values() {
            if let Some(network) = networks.get_mut(instance.network_id.as_str()) {
                network.instances.push(InstanceSnapshot {
                    item_id: instance.ident.item_id.clone(),
                    subject_id: instance.ident.subject_id.clone(),
                    instance: instance.ident.instance,
                    item_type: ItemTypeName::of(instance.ident.item_type),
                    preinstalled: instance.ident.preinstalled,
                    node_id: instance.node.to_string(),
                    ip: self.ip_of(instance).to_string(),
                });
            }
        }
        NetworksSnapshot {
            pool: pool.to_string(),
            networks: networks.into_values().collect(),
        }
    }
}

/// A rule set in a canonical order, without repeats.
fn canonical(rules: &[FirewallRule]) -> Vec<(&str, &str, &str, &str)> {
    let mut keys: Vec<_> = rules
        .iter()
        .map(|r| {
            (
                r.dst_ip.as_str(),
                r.dst_port.as_str(),
                r.proto.as_str(),
                r.src_ip.as_str(),
            )
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Two rule sets are the same whatever their order.
fn same_rules(a: &[FirewallRule], b: &[FirewallRule]) -> bool {
    canonical(a) == canonical(b)
}

/// An item type's name in the state file and the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemTypeName {
    /// A service.
    Service,
    /// A component.
    Component,
}

impl ItemTypeName {
    fn of(item_type: ItemType) -> Self {
        match item_type {
            ItemType::Service => Self::Service,
            ItemType::Component => Self::Component,
        }
    }

    /// The api's item type.
    pub fn item_type(self) -> ItemType {
        match self {
            Self::Service => ItemType::Service,
            Self::Component => ItemType::Component,
        }
    }
}

/// The state file: format version, the pool it was written with (for the reader's eyes; the
/// configured pool is what counts), networks and instances.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredState {
    version: u32,
    pool: String,
    networks: Vec<StoredNetwork>,
    instances: Vec<StoredInstance>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredNetwork {
    network_id: String,
    subnet: String,
    vlan_id: u32,
    hosts: Vec<StoredHost>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredHost {
    node_id: String,
    ip: Ipv4Addr,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredInstance {
    item_id: String,
    subject_id: String,
    instance: u64,
    item_type: ItemTypeName,
    preinstalled: bool,
    network_id: String,
    node_id: String,
    ip: Ipv4Addr,
    hosts: Vec<String>,
    allowed_connections: Vec<String>,
    exposed_ports: Vec<String>,
}

impl State {
    fn to_stored(&self, pool: &NetworkPool) -> StoredState {
        StoredState {
            version: STATE_VERSION,
            pool: pool.to_string(),
            networks: self
                .networks
                .iter()
                .map(|(id, n)| StoredNetwork {
                    network_id: id.clone(),
                    subnet: n.subnet.to_string(),
                    vlan_id: n.vlan_id,
                    hosts: n
                        .hosts
                        .iter()
                        .map(|(node, offset)| StoredHost {
                            node_id: node.to_string(),
                            ip: n.subnet.address(*offset),
                        })
                        .collect(),
                })
                .collect(),
            instances: self
                .instances
                .values()
                .map(|i| StoredInstance {
                    item_id: i.ident.item_id.clone(),
                    subject_id: i.ident.subject_id.clone(),
                    instance: i.ident.instance,
                    item_type: ItemTypeName::of(i.ident.item_type),
                    preinstalled: i.ident.preinstalled,
                    network_id: i.network_id.clone(),
                    node_id: i.node.to_string(),
                    ip: self.ip_of(i),
                    hosts: i.params.given.hosts.clone(),
                    allowed_connections: i.params.given.allowed_connections.clone(),
                    exposed_ports: i.params.given.exposed_ports.clone(),
                })
                .collect(),
        }
    }

    /// The state a file holds, checked against `pool` and for consistency: the error says what
    /// is wrong, naming the network or instance.
    fn from_stored(pool: &NetworkPool, stored: StoredState) -> Result<Self, String> {
        if stored.version != STATE_VERSION {
            return Err(format!(
                "format version {} (this daemon reads version {STATE_VERSION})",
                stored.version
            ));
        }
        let mut state = Self::default();
        let mut subnets = BTreeSet::new();
        let mut vlans = BTreeSet::new();
        for (i, n) in stored.networks.into_iter().enumerate() {
            let at = format!("networks[{i}] ({:?})", n.network_id);
            if n.network_id.is_empty() || state.networks.contains_key(&n.network_id) {
                return Err(format!("{at}: an empty or repeated network id"));
            }
            let subnet: Subnet = n.subnet.parse().map_err(|e| format!("{at}: {e}"))?;
            let index = pool.index_of(subnet).ok_or_else(|| {
                format!(
                    "{at}: {subnet} is not a /{} subnet of the pool {pool} (the file was \
                     written with the pool {}: was networkPool changed? move the file away to \
                     start afresh)",
                    pool.subnet_prefix(),
                    stored.pool
                )
            })?;
            if !subnets.insert(index) {
                return Err(format!("{at}: subnet {subnet} is given twice"));
            }
            if !VLAN_IDS.contains(&n.vlan_id) || !vlans.insert(n.vlan_id) {
                return Err(format!(
                    "{at}: VLAN id {} is out of 1..=4094 or given twice",
                    n.vlan_id
                ));
            }
            let mut network = Network {
                subnet,
                vlan_id: n.vlan_id,
                hosts: BTreeMap::new(),
                used: BTreeSet::new(),
            };
            for host in n.hosts {
                let offset = subnet
                    .offset_of(host.ip)
                    .filter(|o| !network.used.contains(o))
                    .ok_or_else(|| {
                        format!(
                            "{at}: host {} has {}, not a free address of {subnet}",
                            host.node_id, host.ip
                        )
                    })?;
                let node = NodeId::new(&host.node_id);
                if host.node_id.is_empty() || network.hosts.insert(node, offset).is_some() {
                    return Err(format!("{at}: an empty or repeated host node id"));
                }
                network.used.insert(offset);
            }
            state.networks.insert(n.network_id, network);
        }
        for (i, s) in stored.instances.into_iter().enumerate() {
            let key = (s.item_id.clone(), s.subject_id.clone(), s.instance);
            let at = format!("instances[{i}] ({})", ident_text(&key));
            if state.instances.contains_key(&key) {
                return Err(format!("{at}: the instance is given twice"));
            }
            let node = NodeId::new(&s.node_id);
            let network = state
                .networks
                .get_mut(&s.network_id)
                .ok_or_else(|| format!("{at}: no network {:?}", s.network_id))?;
            if !network.hosts.contains_key(&node) {
                return Err(format!(
                    "{at}: node {node} has no host in network {:?}",
                    s.network_id
                ));
            }
            let offset = network
                .subnet
                .offset_of(s.ip)
                .filter(|o| !network.used.contains(o))
                .ok_or_else(|| {
                    format!("{at}: {} is not a free address of {}", s.ip, network.subnet)
                })?;
            network.used.insert(offset);
            let params = Params::parse(&ItemNetworkParameters {
                hosts: s.hosts,
                allowed_connections: s.allowed_connections,
                exposed_ports: s.exposed_ports,
            })
            .map_err(|e| format!("{at}: {e}"))?;
            let ident = InstanceIdent {
                item_id: s.item_id,
                subject_id: s.subject_id,
                instance: s.instance,
                item_type: s.item_type.item_type(),
                preinstalled: s.preinstalled,
            };
            state.instances.insert(
                key,
                Instance {
                    ident,
                    network_id: s.network_id,
                    node,
                    offset,
                    params,
                },
            );
        }
        Ok(state)
    }
}

/// Why the network state cannot be opened or kept.
#[derive(Debug, thiserror::Error)]
pub enum NetworkStateError {
    /// The state file exists but cannot be read.
    #[error("cannot read the network state file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The state file is not a state this daemon wrote, or not one that fits the pool. Nothing
    /// of it is dropped silently: move it away to start afresh.
    #[error("the network state file {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The state file (or its directory) cannot be written.
    #[error("cannot write the network state file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (made if
/// missing), synced, renamed over `path`; then the directory is synced so the rename lasts.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".networks-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A [`NetworkProvider`] with no CM behind it (see the [module documentation](self)).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use smcontroller_api::FirewallUpdates;
/// # use smcontroller_network::DefaultNetworks;
/// # fn wire(updates: Arc<dyn FirewallUpdates>) -> Result<(), Box<dyn std::error::Error>> {
/// // `updates`: the controller's `firewall_updates()`; the provider then goes to the
/// // controller with `with_network_provider`.
/// let networks = DefaultNetworks::open(
///     "172.17.0.0/16".parse()?,
///     Some("/var/lib/smcontroller/networks.json".into()),
///     updates,
/// )?;
/// # let _ = networks;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DefaultNetworks {
    inner: Arc<Inner>,
}

impl fmt::Debug for DefaultNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultNetworks")
            .field("pool", &self.inner.pool)
            .field("state_file", &self.inner.file)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: NetworkPool,
    file: Option<PathBuf>,
    updates: Arc<dyn FirewallUpdates>,
    state: Mutex<State>,
}

impl DefaultNetworks {
    /// A provider that cuts subnets from `pool`, keeps its state in `state_file` (`None`:
    /// in memory only, for tests) and pushes firewall updates through `updates` (the
    /// controller's `firewall_updates()`).
    ///
    /// An existing file is loaded; one that cannot be read, does not parse, or does not fit
    /// `pool` is an error naming it (nothing is dropped silently). A missing one is written
    /// at once, empty, with its directory, so a path that cannot be written fails here and
    /// not at the first allocation.
    pub fn open(
        pool: NetworkPool,
        state_file: Option<PathBuf>,
        updates: Arc<dyn FirewallUpdates>,
    ) -> Result<Self, NetworkStateError> {
        let state = match &state_file {
            None => State::default(),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => {
                    let corrupt = |reason: String| NetworkStateError::Corrupt {
                        path: path.clone(),
                        reason,
                    };
                    let stored: StoredState =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                    let state = State::from_stored(&pool, stored).map_err(corrupt)?;
                    info!(file = %path.display(), networks = state.networks.len(),
                        instances = state.instances.len(), "network state loaded");
                    state
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let state = State::default();
                    let bytes = serde_json::to_vec_pretty(&state.to_stored(&pool))
                        .map_err(io::Error::other)
                        .and_then(|bytes| write_atomically(path, &bytes).map(|()| bytes.len()));
                    bytes.map_err(|source| NetworkStateError::Write {
                        path: path.clone(),
                        source,
                    })?;
                    state
                }
                Err(source) => {
                    return Err(NetworkStateError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                file: state_file,
                updates,
                state: Mutex::new(state),
            }),
        })
    }

    /// The pool subnets are cut from.
    pub fn pool(&self) -> &NetworkPool {
        &self.inner.pool
    }

    /// Every network now, with its hosts and instances: the operator's view.
    pub fn snapshot(&self) -> NetworksSnapshot {
        self.inner.lock().snapshot(&self.inner.pool)
    }

    /// Runs `call` on the state: on tokio's blocking pool when there is a file to write, at
    /// once otherwise.
    async fn run<T, F>(&self, call: F) -> Result<T>
    where
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        if self.inner.file.is_none() {
            return call(&self.inner);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || call(&inner))
            .await
            .map_err(|e| {
                failed(
                    aos::FAILED,
                    format!("the network provider's call did not finish: {e}"),
                )
            })?
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the state if `changed` or if an earlier write failed. A failed write is an
    /// error naming the file; the change stays (in memory), and the next call writes again.
    fn commit(&self, state: &mut State, changed: bool) -> Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        if !changed && !state.dirty {
            return Ok(());
        }
        let written = serde_json::to_vec_pretty(&state.to_stored(&self.pool))
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomically(path, &bytes));
        match written {
            Ok(()) => {
                state.dirty = false;
                Ok(())
            }
            Err(e) => {
                state.dirty = true;
                warn!(file = %path.display(), error = %e, "cannot write the network state");
                Err(failed(
                    aos::FAILED,
                    format!(
                        "cannot write the network state file {}: {e}",
                        path.display()
                    ),
                ))
            }
        }
    }

    /// Pushes the whole rule set of the instance `key` to its node; a failed push is kept for
    /// the node's next sync.
    fn push(&self, state: &mut State, key: &Key, rules: Vec<FirewallRule>) {
        let Some(instance) = state.instances.get(key) else {
            return;
        };
        let node = instance.node.clone();
        let update = PendingFirewallUpdate {
            instance: instance.ident.clone(),
            rules,
        };
        match self.updates.push_firewall_update(&node, &update) {
            Ok(()) => {
                if let Some(unsent) = state.unsent.get_mut(&node) {
                    unsent.remove(key);
                }
            }
            Err(e) => {
                match &e {
                    Error::NotFound { .. } => {
                        debug!(node_id = %node, instance = %ident_text(key), error = %e,
                            "firewall update kept for the node's next sync")
                    }
                    _ => warn!(node_id = %node, instance = %ident_text(key), error = %e,
                        "firewall update kept for the node's next sync"),
                }
                state.unsent.entry(node).or_default().insert(key.clone());
            }
        }
    }

    /// Pushes the rule sets that changed since `before`.
    fn push_changed(&self, state: &mut State, before: RulesBefore) {
        for (key, old) in before {
            if !state.instances.contains_key(&key) {
                continue;
            }
            let new = state.rules_of(&key);
            if !same_rules(&old, &new) {
                self.push(state, &key, new);
            }
        }
    }

    fn node_params(&self, network_id: &str, node: &NodeId) -> Result<UpdateNetworkParameters> {
        let mut state = self.lock();
        let state = &mut *state;
        let answer = |network: &Network, offset: u32| UpdateNetworkParameters {
            network_id: network_id.to_owned(),
            subnet: network.subnet.to_string(),
            ip: network.subnet.address(offset).to_string(),
            vlan_id: u64::from(network.vlan_id),
        };
        if let Some(network) = state.networks.get_mut(network_id) {
            if let Some(&offset) = network.hosts.get(node) {
                let answer = answer(network, offset);
                self.commit(state, false)?;
                return Ok(answer);
            }
            let offset = network.take_offset(network_id)?;
            network.hosts.insert(node.clone(), offset);
            let answer = answer(network, offset);
            debug!(network_id, node_id = %node, ip = %answer.ip, "node joins the network");
            self.commit(state, true)?;
            return Ok(answer);
        }
        let vlans: BTreeSet<u32> = state.networks.values().map(|n| n.vlan_id).collect();
        let vlan_id = lowest_free(&vlans, *VLAN_IDS.start(), *VLAN_IDS.end()).ok_or_else(|| {
            failed(
                aos::NO_MEMORY,
                format!(
                    "no free VLAN id for network {network_id}: {} networks have all of 1..=4094",
                    vlans.len()
                ),
            )
        })?;
        let subnets: BTreeSet<u32> = state
            .networks
            .values()
            .filter_map(|n| self.pool.index_of(n.subnet))
            .collect();
        let last = u32::try_from(self.pool.subnet_count() - 1).unwrap_or(u32::MAX);
        let index = lowest_free(&subnets, 0, last).ok_or_else(|| {
            failed(
                aos::NO_MEMORY,
                format!(
                    "network pool {} is exhausted: all {} subnets of /{} are in use, none is \
                     left for network {network_id}",
                    self.pool,
                    self.pool.subnet_count(),
                    self.pool.subnet_prefix()
                ),
            )
        })?;
        let mut network = Network {
            subnet: self.pool.subnet(index),
            vlan_id,
            hosts: BTreeMap::new(),
            used: BTreeSet::new(),
        };
        let offset = network.take_offset(network_id)?;
        network.hosts.insert(node.clone(), offset);
        let answer = answer(&network, offset);
        info!(network_id, subnet = %answer.subnet, vlan_id, node_id = %node, ip = %answer.ip,
            "network created");
        state.networks.insert(network_id.to_owned(), network);
        self.commit(state, true)?;
        Ok(answer)
    }

    fn allocate(
        &self,
        ident: &InstanceIdent,
        network_id: &str,
        node: &NodeId,
        params: &ItemNetworkParameters,
    ) -> Result<NetworkParameters> {
        let params = Params::parse(params)?;
        let key = key_of(ident);
        let mut state = self.lock();
        let state = &mut *state;
        let network = state.networks.get(network_id).ok_or_else(|| {
            failed(
                aos::NOT_FOUND,
                format!(
                    "network {network_id} not found: the node must get its network parameters \
                     first"
                ),
            )
        })?;
        if !network.hosts.contains_key(node) {
            return Err(failed(
                aos::NOT_FOUND,
                format!(
                    "node {node} has no host in network {network_id}: it must get its network \
                     parameters first"
                ),
            ));
        }
        let except = BTreeSet::from([key.clone()]);
        let before = state.rules_before(&BTreeSet::from([key.0.clone()]), &except);
        let offset = match state.instances.get(&key) {
            // Asked again, from this node or another one of the network: the same address.
            Some(existing) if existing.network_id == network_id => existing.offset,
            existing => {
                let old = existing.map(|e| (e.network_id.clone(), e.offset));
                let network = state.networks.get_mut(network_id).ok_or_else(|| {
                    failed(aos::NOT_FOUND, format!("network {network_id} not found"))
                })?;
                let offset = network.take_offset(network_id)?;
                // It moved to another network: its old address is free.
                if let Some((old_network, old_offset)) = old
                    && let Some(n) = state.networks.get_mut(&old_network)
                {
                    n.used.remove(&old_offset);
                }
                offset
            }
        };
        if let Some(previous) = state.instances.get(&key)
            && let Some(unsent) = state.unsent.get_mut(&previous.node)
        {
            // The answer carries the whole rule set.
            unsent.remove(&key);
        }
        state.instances.insert(
            key.clone(),
            Instance {
                ident: ident.clone(),
                network_id: network_id.to_owned(),
                node: node.clone(),
                offset,
                params,
            },
        );
        let answer = NetworkParameters {
            network_id: network_id.to_owned(),
            subnet: state.networks[network_id].subnet.to_string(),
            ip: state.networks[network_id]
                .subnet
                .address(offset)
                .to_string(),
            dns_servers: Vec::new(),
            rules: state.rules_of(&key),
        };
        debug!(network_id, node_id = %node, instance = %ident_text(&key), ip = %answer.ip,
            rules = answer.rules.len(), "instance network allocated");
        self.push_changed(state, before);
        self.commit(state, true)?;
        Ok(answer)
    }

    /// Releases the instances `keys` (those that exist) and pushes the rule sets that change.
    fn release(&self, state: &mut State, keys: BTreeSet<Key>) -> bool {
        let items: BTreeSet<String> = keys
            .iter()
            .filter(|k| state.instances.contains_key(*k))
            .map(|k| k.0.clone())
            .collect();
        if items.is_empty() {
            return false;
        }
        let before = state.rules_before(&items, &keys);
        for key in &keys {
            if let Some(instance) = state.remove_instance(key) {
                debug!(network_id = %instance.network_id, node_id = %instance.node,
                    instance = %ident_text(key), "instance network released");
            }
        }
        self.push_changed(state, before);
        true
    }

    fn release_instance(&self, ident: &InstanceIdent, node: &NodeId) -> Result<()> {
        let key = key_of(ident);
        let mut state = self.lock();
        let state = &mut *state;
        match state.instances.get(&key) {
            None => {
                debug!(node_id = %node, instance = %ident_text(&key),
                    "release of an instance without a network: nothing to do");
                self.commit(state, false)
            }
            // It moved: the node it left releases its copy, the address stays with the move.
            Some(instance) if instance.node != *node => {
                debug!(node_id = %node, now_on = %instance.node, instance = %ident_text(&key),
                    "release from a node the instance has left: kept");
                self.commit(state, false)
            }
            Some(_) => {
                let changed = self.release(state, BTreeSet::from([key]));
                self.commit(state, changed)
            }
        }
    }

    fn release_node(&self, network_id: &str, node: &NodeId) -> Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        let network = state
            .networks
            .get(network_id)
            .ok_or_else(|| failed(aos::NOT_FOUND, format!("network {network_id} not found")))?;
        if !network.hosts.contains_key(node) {
            return Err(failed(
                aos::NOT_FOUND,
                format!("node {node} has no host in network {network_id}"),
            ));
        }
        let keys: BTreeSet<Key> = state
            .instances
            .iter()
            .filter(|(_, i)| i.network_id == network_id && i.node == *node)
            .map(|(k, _)| k.clone())
            .collect();
        self.release(state, keys);
        let network = state
            .networks
            .get_mut(network_id)
            .ok_or_else(|| failed(aos::NOT_FOUND, format!("network {network_id} not found")))?;
        if let Some(offset) = network.hosts.remove(node) {
            network.used.remove(&offset);
        }
        debug!(network_id, node_id = %node, "node leaves the network");
        if network.hosts.is_empty() {
            // No node is left; instances need their node's host, so none is either.
            let orphans: BTreeSet<Key> = state
                .instances
                .iter()
                .filter(|(_, i)| i.network_id == network_id)
                .map(|(k, _)| k.clone())
                .collect();
            self.release(state, orphans);
            if let Some(network) = state.networks.remove(network_id) {
                info!(network_id, subnet = %network.subnet, vlan_id = network.vlan_id,
                    "network removed: its subnet and VLAN id are free");
            }
        }
        self.commit(state, true)
    }

    fn sync(&self, node: &NodeId, reported: &[InstanceNetworkState]) -> Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        let listed: HashMap<Key, &InstanceNetworkState> =
            reported.iter().map(|r| (key_of(&r.instance), r)).collect();
        let gone: BTreeSet<Key> = state
            .instances
            .iter()
            .filter(|(k, i)| i.node == *node && !listed.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            info!(node_id = %node, released = gone.len(),
                "sync: the node no longer has these instances");
        }
        let changed = self.release(state, gone);
        let mut again = state.unsent.remove(node).unwrap_or_default();
        for (key, report) in &listed {
            if state.instances.get(key).is_some_and(|i| i.node == *node)
                && !same_rules(&report.rules, &state.rules_of(key))
            {
                again.insert(key.clone());
            }
        }
        for key in again {
            if state.instances.get(&key).is_some_and(|i| i.node == *node) {
                let rules = state.rules_of(&key);
                self.push(state, &key, rules);
            }
        }
        self.commit(state, changed)
    }
}

#[async_trait]
impl NetworkProvider for DefaultNetworks {
    async fn get_node_network_params(
        &self,
        network_id: &str,
        node: &NodeId,
    ) -> Result<UpdateNetworkParameters> {
        let (network_id, node) = (network_id.to_owned(), node.clone());
        self.run(move |inner| inner.node_params(&network_id, &node))
            .await
    }

    async fn allocate_instance_network(
        &self,
        instance: &InstanceIdent,
        network_id: &str,
        node: &NodeId,
        params: &ItemNetworkParameters,
    ) -> Result<NetworkParameters> {
        let (instance, network_id, node, params) = (
            instance.clone(),
            network_id.to_owned(),
            node.clone(),
            params.clone(),
        );
        self.run(move |inner| inner.allocate(&instance, &network_id, &node, &params))
            .await
    }

    async fn release_instance_network(
        &self,
        instance: &InstanceIdent,
        node: &NodeId,
    ) -> Result<()> {
        let (instance, node) = (instance.clone(), node.clone());
        self.run(move |inner| inner.release_instance(&instance, &node))
            .await
    }

    async fn release_node_network(&self, network_id: &str, node: &NodeId) -> Result<()> {
        let (network_id, node) = (network_id.to_owned(), node.clone());
        self.run(move |inner| inner.release_node(&network_id, &node))
            .await
    }

    async fn sync_network_state(
        &self,
        node: &NodeId,
        instances: &[InstanceNetworkState],
    ) -> Result<()> {
        let (node, instances) = (node.clone(), instances.to_vec());
        self.run(move |inner| inner.sync(&node, &instances)).await
    }
}

/// Every network of a [`DefaultNetworks`] now ([`DefaultNetworks::snapshot`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworksSnapshot {
    /// The pool subnets are cut from.
    pub pool: String,
    /// Every network, sorted by id.
    pub networks: Vec<NetworkSnapshot>,
}

/// One network of a [`NetworksSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSnapshot {
    /// The network id.
    pub network_id: String,
    /// Its subnet, CIDR.
    pub subnet: String,
    /// Its VLAN id.
    pub vlan_id: u32,
    /// The nodes' addresses, sorted by node.
    pub hosts: Vec<HostSnapshot>,
    /// The instances' addresses, sorted by item, subject and instance.
    pub instances: Vec<InstanceSnapshot>,
}

/// A node's address in a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostSnapshot {
    /// The node.
    pub node_id: String,
    /// Its address.
    pub ip: String,
}

/// An instance's address in a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSnapshot {
    /// Its item (service) id.
    pub item_id: String,
    /// Its subject id.
    pub subject_id: String,
    /// Its instance index.
    pub instance: u64,
    /// Service or component.
    pub item_type: ItemTypeName,
    /// Whether the item was preinstalled on the node.
    pub preinstalled: bool,
    /// The node it was allocated from.
    pub node_id: String,
    /// Its address.
    pub ip: String,
}

impl InstanceSnapshot {
    /// `item/subject/instance`.
    pub fn ident(&self) -> String {
        format!("{}/{}/{}", self.item_id, self.subject_id, self.instance)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A [`FirewallUpdates`] that records what it is given: pushes to subscribed nodes succeed,
    /// others fail with `NotFound` (or all with `ResourceExhausted` when `full`).
    #[derive(Default)]
    struct FakeUpdates {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        subscribed: HashSet<NodeId>,
        full: bool,
        delivered: Vec<(NodeId, PendingFirewallUpdate)>,
        refused: Vec<NodeId>,
    }

    impl FakeUpdates {
        fn subscribe(&self, node: &str) {
            self.state
                .lock()
                .unwrap()
                .subscribed
                .insert(NodeId::new(node));
        }

        fn set_full(&self, full: bool) {
            self.state.lock().unwrap().full = full;
        }

        /// What was delivered since the last call.
        fn take(&self) -> Vec<(NodeId, PendingFirewallUpdate)> {
            std::mem::take(&mut self.state.lock().unwrap().delivered)
        }

        /// The nodes of refused pushes since the last call.
        fn take_refused(&self) -> Vec<NodeId> {
            std::mem::take(&mut self.state.lock().unwrap().refused)
        }
    }

    impl FirewallUpdates for FakeUpdates {
        fn push_firewall_update(
            &self,
            node: &NodeId,
            update: &PendingFirewallUpdate,
        ) -> Result<()> {
            let mut state = self.state.lock().unwrap();
            if state.full {
                state.refused.push(node.clone());
                return Err(Error::ResourceExhausted("updates unread".into()));
            }
            if !state.subscribed.contains(node) {
                state.refused.push(node.clone());
                return Err(Error::not_found(node.clone()));
            }
            state.delivered.push((node.clone(), update.clone()));
            Ok(())
        }

        fn is_subscribed(&self, node: &NodeId) -> bool {
            self.state.lock().unwrap().subscribed.contains(node)
        }
    }

    fn memory(pool: &str) -> (DefaultNetworks, Arc<FakeUpdates>) {
        let updates = Arc::new(FakeUpdates::default());
        let networks = DefaultNetworks::open(pool.parse().unwrap(), None, updates.clone())
            .expect("an in-memory provider opens");
        (networks, updates)
    }

    fn node(id: &str) -> NodeId {
        NodeId::new(id)
    }

    fn ident(item: &str, instance: u64) -> InstanceIdent {
        InstanceIdent {
            item_id: item.into(),
            subject_id: "subject".into(),
            instance,
            ..InstanceIdent::default()
        }
    }

    fn params(allowed: &[&str], exposed: &[&str]) -> ItemNetworkParameters {
        ItemNetworkParameters {
            hosts: vec![],
            allowed_connections: allowed.iter().map(|s| s.to_string()).collect(),
            exposed_ports: exposed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn rule(dst_ip: &str, dst_port: &str, proto: &str, src_ip: &str) -> FirewallRule {
        FirewallRule {
            dst_ip: dst_ip.into(),
            dst_port: dst_port.into(),
            proto: proto.into(),
            src_ip: src_ip.into(),
        }
    }

    /// The Aos code and message of a `Failed`.
    fn failure(error: Error) -> (i32, String) {
        match error {
            Error::Failed {
                aos_code, message, ..
            } => (aos_code, message),
            other => panic!("not Failed: {other:?}"),
        }
    }

    #[test]
    fn pools_parse_and_errors_say_what_is_wrong() {
        let pool: NetworkPool = "172.17.0.0/16".parse().unwrap();
        assert_eq!(pool, NetworkPool::default());
        assert_eq!(pool.to_string(), "172.17.0.0/16");
        assert_eq!(pool.subnet_count(), 256);
        let small: NetworkPool = "10.10.0.0/16:/26".parse().unwrap();
        assert_eq!(small.subnet_prefix(), 26);
        assert_eq!(small.subnet_count(), 1024);
        assert_eq!(small.to_string().parse::<NetworkPool>(), Ok(small));
        assert_eq!(
            "0.0.0.0/0".parse::<NetworkPool>().unwrap().subnet_count(),
            1 << 24
        );

        for (value, says) in [
            ("172.17.0.1/16", "host bits are set"),
            ("172.17.0.1/16", "starts at 172.17.0.0"),
            ("172.17.0.0", "no prefix length"),
            ("fd00::/64", "IPv6"),
            ("172.17.0/16", "not an IPv4 address"),
            ("172.17.0.0/33", "prefix length \"33\""),
            ("172.17.0.0/x", "prefix length \"x\""),
            ("10.0.0.0/28", "smaller than one /24 subnet"),
            ("10.0.0.0/16:/31", "subnet size /31"),
            ("10.0.0.0/8:/12", "subnet size /12"),
        ] {
            let error = value.parse::<NetworkPool>().unwrap_err().to_string();
            assert!(error.contains(value), "{value}: {error}");
            assert!(error.contains(says), "{value}: {error}");
        }
    }

    #[tokio::test]
    async fn node_parameters_are_idempotent_and_networks_get_their_own_subnet_and_vlan() {
        let (networks, _) = memory("172.17.0.0/16");
        let a1 = networks
            .get_node_network_params("net-a", &node("node-1"))
            .await
            .unwrap();
        assert_eq!(
            a1,
            UpdateNetworkParameters {
                network_id: "net-a".into(),
                subnet: "172.17.0.0/24".into(),
                ip: "172.17.0.1".into(),
                vlan_id: 1,
            }
        );
        let a2 = networks
            .get_node_network_params("net-a", &node("node-2"))
            .await
            .unwrap();
        assert_eq!(
            (a2.subnet.as_str(), a2.ip.as_str()),
            ("172.17.0.0/24", "172.17.0.2")
        );
        assert_eq!(a2.vlan_id, 1);
        let b1 = networks
            .get_node_network_params("net-b", &node("node-1"))
            .await
            .unwrap();
        assert_eq!(
            (b1.subnet.as_str(), b1.ip.as_str()),
            ("172.17.1.0/24", "172.17.1.1")
        );
        assert_eq!(b1.vlan_id, 2);
        // Asked again: the same answers.
        for (id, n, before) in [
            ("net-a", "node-1", &a1),
            ("net-a", "node-2", &a2),
            ("net-b", "node-1", &b1),
        ] {
            assert_eq!(
                &networks
                    .get_node_network_params(id, &node(n))
                    .await
                    .unwrap(),
                before
            );
        }
        let mut vlans = HashSet::new();
        for i in 0..20 {
            let p = networks
                .get_node_network_params(&format!("many-{i}"), &node("node-1"))
                .await
                .unwrap();
            assert!(VLAN_IDS.contains(&(p.vlan_id as u32)));
            assert!(vlans.insert(p.vlan_id), "VLAN {} given twice", p.vlan_id);
        }
        let snapshot = networks.snapshot();
        assert_eq!(snapshot.networks.len(), 22);
        let vlans: HashSet<u32> = snapshot.networks.iter().map(|n| n.vlan_id).collect();
        assert_eq!(vlans.len(), 22);
    }

    #[tokio::test]
    async fn instance_addresses_are_stable_and_released_ones_are_reused() {
        let (networks, _) = memory("10.1.0.0/16");
        for n in ["node-1", "node-2"] {
            networks
                .get_node_network_params("net", &node(n))
                .await
                .unwrap();
        }
        let none = params(&[], &[]);
        let a = networks
            .allocate_instance_network(&ident("svc", 0), "net", &node("node-1"), &none)
            .await
            .unwrap();
        assert_eq!(a.ip, "10.1.0.3", "hosts have .1 and .2");
        assert_eq!(a.subnet, "10.1.0.0/24");
        assert_eq!(a.network_id, "net");
        assert!(a.dns_servers.is_empty());
        let b = networks
            .allocate_instance_network(&ident("svc", 1), "net", &node("node-1"), &none)
            .await
            .unwrap();
        assert_eq!(b.ip, "10.1.0.4");
        // Again, and again from another node (it moved): the same address.
        let again = networks
            .allocate_instance_network(&ident("svc", 0), "net", &node("node-1"), &none)
            .await
            .unwrap();
        assert_eq!(again, a);
        let moved = networks
            .allocate_instance_network(&ident("svc", 0), "net", &node("node-2"), &none)
            .await
            .unwrap();
        assert_eq!(moved.ip, a.ip);
        // The node it left releases its copy: the address stays with the move.
        networks
            .release_instance_network(&ident("svc", 0), &node("node-1"))
            .await
            .unwrap();
        let listed = networks.snapshot().networks[0].instances.clone();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            (listed[0].node_id.as_str(), listed[0].ip.as_str()),
            ("node-2", "10.1.0.3")
        );
        assert_eq!(listed[0].ident(), "svc/subject/0");

        // Released: the address is given again.
        networks
            .release_instance_network(&ident("svc", 1), &node("node-1"))
            .await
            .unwrap();
        let c = networks
            .allocate_instance_network(&ident("other", 0), "net", &node("node-1"), &none)
            .await
            .unwrap();
        assert_eq!(c.ip, b.ip);
        // An unknown instance is released without error.
        networks
            .release_instance_network(&ident("never", 9), &node("node-1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn what_is_missing_or_used_up_is_a_clear_error() {
        // Two /30 subnets of two addresses each.
        let (networks, _) = memory("10.9.0.0/29:/30");
        let none = params(&[], &[]);
        let error = networks
            .allocate_instance_network(&ident("svc", 0), "net-a", &node("node-1"), &none)
            .await
            .unwrap_err();
        let (code, message) = failure(error);
        assert_eq!(code, aos::NOT_FOUND);
        assert!(message.contains("network net-a not found"), "{message}");

        networks
            .get_node_network_params("net-a", &node("node-1"))
            .await
            .unwrap();
        let error = networks
            .allocate_instance_network(&ident("svc", 0), "net-a", &node("node-2"), &none)
            .await
            .unwrap_err();
        let (_, message) = failure(error);
        assert!(
            message.contains("node node-2 has no host in network net-a"),
            "{message}"
        );

        networks
            .allocate_instance_network(&ident("svc", 0), "net-a", &node("node-1"), &none)
            .await
            .unwrap();
        let error = networks
            .allocate_instance_network(&ident("svc", 1), "net-a", &node("node-1"), &none)
            .await
            .unwrap_err();
        let (code, message) = failure(error);
        assert_eq!(code, aos::NO_MEMORY);
        assert!(
            message.contains("subnet 10.9.0.0/30 of network net-a is full"),
            "{message}"
        );
        let error = networks
            .get_node_network_params("net-a", &node("node-3"))
            .await
            .unwrap_err();
        assert!(failure(error).1.contains("is full"));

        networks
            .get_node_network_params("net-b", &node("node-1"))
            .await
            .unwrap();
        let error = networks
            .get_node_network_params("net-c", &node("node-1"))
            .await
            .unwrap_err();
        let (code, message) = failure(error);
        assert_eq!(code, aos::NO_MEMORY);
        assert!(
            message.contains("network pool 10.9.0.0/29:/30 is exhausted"),
            "{message}"
        );
        assert!(message.contains("net-c"), "{message}");
        // Nothing half-made stays behind.
        assert_eq!(networks.snapshot().networks.len(), 2);

        // A subnet goes back to the pool with the last node of its network.
        let error = networks
            .release_node_network("net-x", &node("node-1"))
            .await
            .unwrap_err();
        assert!(failure(error).1.contains("network net-x not found"));
        let error = networks
            .release_node_network("net-b", &node("node-9"))
            .await
            .unwrap_err();
        assert!(
            failure(error)
                .1
                .contains("node node-9 has no host in network net-b")
        );
        networks
            .release_node_network("net-b", &node("node-1"))
            .await
            .unwrap();
        let c = networks
            .get_node_network_params("net-c", &node("node-1"))
            .await
            .unwrap();
        assert_eq!(c.subnet, "10.9.0.4/30");
        assert_eq!(c.vlan_id, 2, "net-b's VLAN id is free again");
    }

    #[tokio::test]
    async fn bad_parameter_entries_are_invalid_arguments_naming_them() {
        let (networks, _) = memory("172.17.0.0/16");
        networks
            .get_node_network_params("net", &node("node-1"))
            .await
            .unwrap();
        for (allowed, exposed, named) in [
            (&["nonsense"][..], &[][..], "nonsense"),
            (&["svc/http"], &[], "svc/http"),
            (&["/80"], &[], "/80"),
            (&["svc/80/"], &[], "svc/80/"),
            (&["svc/0"], &[], "svc/0"),
            (&["svc/70000"], &[], "svc/70000"),
            (&["svc/90-80"], &[], "svc/90-80"),
            (&["svc/80/tcp/x"], &[], "svc/80/tcp/x"),
            (&[], &["80/tcp/x"], "80/tcp/x"),
            (&[], &["tcp"], "tcp"),
        ] {
            let error = networks
                .allocate_instance_network(
                    &ident("svc", 0),
                    "net",
                    &node("node-1"),
                    &params(allowed, exposed),
                )
                .await
                .unwrap_err();
            match error {
                Error::InvalidArgument(message) => {
                    assert!(message.contains(&format!("{named:?}")), "{message}")
                }
                other => panic!("{named}: {other:?}"),
            }
        }
        let many = vec!["80".to_owned(); MAX_PARAMETER_ENTRIES + 1];
        let error = networks
            .allocate_instance_network(
                &ident("svc", 0),
                "net",
                &node("node-1"),
                &ItemNetworkParameters {
                    exposed_ports: many,
                    ..ItemNetworkParameters::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(error, Error::InvalidArgument(m) if m.contains("exposed_ports")));
        // Good ones: ranges, protocols in any case.
        networks
            .allocate_instance_network(
                &ident("svc", 0),
                "net",
                &node("node-1"),
                &params(
                    &["db/5432", "dns/53/UDP", "web/8000-8080/tcp"],
                    &["80", "53/udp"],
                ),
            )
            .await
            .unwrap();
    }

    /// Networks `a` and `b` with `node-1` in `a` and `node-2` in `b`, both subscribed.
    async fn two_networks() -> (DefaultNetworks, Arc<FakeUpdates>) {
        let (networks, updates) = memory("172.17.0.0/16");
        networks
            .get_node_network_params("a", &node("node-1"))
            .await
            .unwrap();
        networks
            .get_node_network_params("b", &node("node-2"))
            .await
            .unwrap();
        updates.subscribe("node-1");
        updates.subscribe("node-2");
        (networks, updates)
    }

    #[tokio::test]
    async fn rules_go_to_targets_in_other_subnets_only() {
        let (networks, updates) = two_networks().await;
        // Servers: one in each network, both exposing 8080/tcp; one exposing only udp.
        let server_b = networks
            .allocate_instance_network(
                &ident("server", 0),
                "b",
                &node("node-2"),
                &params(&[], &["8080/tcp"]),
            )
            .await
            .unwrap();
        networks
            .allocate_instance_network(
                &ident("server", 1),
                "a",
                &node("node-1"),
                &params(&[], &["8080"]),
            )
            .await
            .unwrap();
        networks
            .allocate_instance_network(
                &ident("server", 2),
                "b",
                &node("node-2"),
                &params(&[], &["8080/udp"]),
            )
            .await
            .unwrap();
        let client = networks
            .allocate_instance_network(
                &ident("client", 0),
                "a",
                &node("node-1"),
                &params(&["server/8080", "server/8080/tcp"], &[]),
            )
            .await
            .unwrap();
        assert_eq!(
            client.rules,
            [rule(&server_b.ip, "8080", "tcp", &client.ip)],
            "the server in the client's own subnet gets none, the udp one none"
        );
        assert!(updates.take().is_empty(), "nothing changed for anyone else");
    }

    #[tokio::test]
    async fn a_pending_connection_is_resolved_with_the_whole_rule_set_on_the_requesters_node() {
        let (networks, updates) = two_networks().await;
        let client = networks
            .allocate_instance_network(
                &ident("client", 0),
                "a",
                &node("node-1"),
                &params(&["server/80"], &[]),
            )
            .await
            .unwrap();
        assert!(client.rules.is_empty(), "no server yet: pending");

        let first = networks
            .allocate_instance_network(
                &ident("server", 0),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].0, node("node-1"), "to the requester's node");
        assert_eq!(pushed[0].1.instance, ident("client", 0));
        assert_eq!(
            pushed[0].1.rules,
            [rule(&first.ip, "80", "tcp", &client.ip)]
        );

        let second = networks
            .allocate_instance_network(
                &ident("server", 1),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert!(
            same_rules(
                &pushed[0].1.rules,
                &[
                    rule(&first.ip, "80", "tcp", &client.ip),
                    rule(&second.ip, "80", "tcp", &client.ip)
                ]
            ),
            "the whole set, not the new rule alone: {pushed:?}"
        );

        // A target that goes away: the rest of the set.
        networks
            .release_instance_network(&ident("server", 0), &node("node-2"))
            .await
            .unwrap();
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(
            pushed[0].1.rules,
            [rule(&second.ip, "80", "tcp", &client.ip)]
        );

        // Allocating the same target again changes nothing: no push.
        networks
            .allocate_instance_network(
                &ident("server", 1),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        assert!(updates.take().is_empty());
        // The requester released: nothing is pushed for it any more.
        networks
            .release_instance_network(&ident("client", 0), &node("node-1"))
            .await
            .unwrap();
        networks
            .allocate_instance_network(
                &ident("server", 2),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        assert!(updates.take().is_empty());
    }

    #[tokio::test]
    async fn a_failed_push_is_made_again_after_the_nodes_sync() {
        let (networks, updates) = memory("172.17.0.0/16");
        networks
            .get_node_network_params("a", &node("node-1"))
            .await
            .unwrap();
        networks
            .get_node_network_params("b", &node("node-2"))
            .await
            .unwrap();
        let client = networks
            .allocate_instance_network(
                &ident("client", 0),
                "a",
                &node("node-1"),
                &params(&["server/80"], &[]),
            )
            .await
            .unwrap();
        // node-1 has no subscription: the push fails and is kept.
        let server = networks
            .allocate_instance_network(
                &ident("server", 0),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        assert_eq!(updates.take_refused(), [node("node-1")]);
        assert!(updates.take().is_empty());
        let reported = InstanceNetworkState {
            instance: ident("client", 0),
            network_id: "a".into(),
            ip: client.ip.clone(),
            rules: vec![],
        };
        // A sync while the node still cannot be reached keeps it again.
        networks
            .sync_network_state(&node("node-1"), std::slice::from_ref(&reported))
            .await
            .unwrap();
        assert_eq!(updates.take_refused(), [node("node-1")]);

        updates.subscribe("node-1");
        networks
            .sync_network_state(&node("node-1"), std::slice::from_ref(&reported))
            .await
            .unwrap();
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].0, node("node-1"));
        assert_eq!(
            pushed[0].1.rules,
            [rule(&server.ip, "80", "tcp", &client.ip)]
        );

        // Once the node reports the rules it got, a sync pushes nothing.
        let confirmed = InstanceNetworkState {
            rules: pushed[0].1.rules.clone(),
            ..reported.clone()
        };
        networks
            .sync_network_state(&node("node-1"), std::slice::from_ref(&confirmed))
            .await
            .unwrap();
        assert!(updates.take().is_empty());
        // A node that reports other rules than ours gets ours again, even with no failed push.
        networks
            .sync_network_state(&node("node-1"), std::slice::from_ref(&reported))
            .await
            .unwrap();
        assert_eq!(updates.take().len(), 1);

        // A node that does not read its updates (ResourceExhausted): kept the same way.
        updates.set_full(true);
        networks
            .allocate_instance_network(
                &ident("server", 1),
                "b",
                &node("node-2"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        assert_eq!(updates.take_refused(), [node("node-1")]);
        updates.set_full(false);
        networks
            .sync_network_state(&node("node-1"), std::slice::from_ref(&confirmed))
            .await
            .unwrap();
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].1.rules.len(), 2, "the whole set: {pushed:?}");
    }

    #[tokio::test]
    async fn sync_releases_what_the_node_no_longer_runs() {
        let (networks, updates) = two_networks().await;
        let none = params(&[], &[]);
        let kept = networks
            .allocate_instance_network(&ident("svc", 0), "a", &node("node-1"), &none)
            .await
            .unwrap();
        let gone = networks
            .allocate_instance_network(
                &ident("svc", 1),
                "a",
                &node("node-1"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        let client = networks
            .allocate_instance_network(
                &ident("client", 0),
                "b",
                &node("node-2"),
                &params(&["svc/80"], &[]),
            )
            .await
            .unwrap();
        assert_eq!(client.rules.len(), 1);
        networks
            .sync_network_state(
                &node("node-1"),
                &[InstanceNetworkState {
                    instance: ident("svc", 0),
                    network_id: "a".into(),
                    ip: kept.ip.clone(),
                    rules: vec![],
                }],
            )
            .await
            .unwrap();
        let listed: Vec<String> = networks.snapshot().networks[0]
            .instances
            .iter()
            .map(InstanceSnapshot::ident)
            .collect();
        assert_eq!(listed, ["svc/subject/0"]);
        // The client in the other network loses its rule towards the released one.
        let pushed = updates.take();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].0, node("node-2"));
        assert!(pushed[0].1.rules.is_empty());
        // Its address is free again.
        let next = networks
            .allocate_instance_network(&ident("svc", 2), "a", &node("node-1"), &none)
            .await
            .unwrap();
        assert_eq!(next.ip, gone.ip);
    }

    #[tokio::test]
    async fn a_restarted_provider_gives_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state").join("networks.json");
        let open = || {
            DefaultNetworks::open(
                NetworkPool::default(),
                Some(file.clone()),
                Arc::new(FakeUpdates::default()),
            )
            .unwrap()
        };
        let first = open();
        assert!(file.exists(), "a missing file is written at once");
        let a = first
            .get_node_network_params("a", &node("node-1"))
            .await
            .unwrap();
        let b = first
            .get_node_network_params("b", &node("node-2"))
            .await
            .unwrap();
        let b1 = first
            .get_node_network_params("b", &node("node-1"))
            .await
            .unwrap();
        let component = InstanceIdent {
            item_type: ItemType::Component,
            preinstalled: true,
            ..ident("comp", 3)
        };
        let p = params(&["svc/80"], &["81/udp"]);
        let x = first
            .allocate_instance_network(&component, "b", &node("node-1"), &p)
            .await
            .unwrap();
        let y = first
            .allocate_instance_network(
                &ident("svc", 0),
                "a",
                &node("node-1"),
                &params(&[], &["80"]),
            )
            .await
            .unwrap();
        assert_eq!(x.rules.len(), 0, "allocated before its target");
        let snapshot = first.snapshot();
        drop(first);

        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(stored["version"], 1);
        assert_eq!(stored["networks"][1]["networkId"], "b");
        assert_eq!(stored["instances"][0]["itemType"], "component");

        let second = open();
        assert_eq!(second.snapshot(), snapshot);
        assert_eq!(
            second
                .get_node_network_params("a", &node("node-1"))
                .await
                .unwrap(),
            a
        );
        assert_eq!(
            second
                .get_node_network_params("b", &node("node-2"))
                .await
                .unwrap(),
            b
        );
        assert_eq!(
            second
                .get_node_network_params("b", &node("node-1"))
                .await
                .unwrap(),
            b1
        );
        let again = second
            .allocate_instance_network(&component, "b", &node("node-1"), &p)
            .await
            .unwrap();
        assert_eq!(again.ip, x.ip);
        assert_eq!(
            again.rules,
            [rule(&y.ip, "80", "tcp", &x.ip)],
            "its connection resolved"
        );
        let c = second
            .get_node_network_params("c", &node("node-1"))
            .await
            .unwrap();
        assert_eq!((c.subnet.as_str(), c.vlan_id), ("172.17.2.0/24", 3));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["networks.json"]);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("networks.json");
        let open = |pool: &str| {
            DefaultNetworks::open(
                pool.parse().unwrap(),
                Some(file.clone()),
                Arc::new(FakeUpdates::default()),
            )
        };
        for (text, says) in [
            ("", "EOF"),
            ("{not json", "key must be a string"),
            (
                r#"{"version": 2, "pool": "", "networks": [], "instances": []}"#,
                "format version 2",
            ),
            (
                r#"{"version": 1, "pool": "10.0.0.0/8", "networks": [
                    {"networkId": "n", "subnet": "10.0.0.0/24", "vlanId": 1, "hosts": []}],
                    "instances": []}"#,
                "networks[0] (\"n\"): 10.0.0.0/24 is not a /24 subnet of the pool 172.17.0.0/16",
            ),
            (
                r#"{"version": 1, "pool": "", "networks": [
                    {"networkId": "n", "subnet": "172.17.0.0/24", "vlanId": 1,
                     "hosts": [{"nodeId": "x", "ip": "172.17.0.1"}]}],
                    "instances": [{"itemId": "i", "subjectId": "s", "instance": 0,
                     "itemType": "service", "preinstalled": false, "networkId": "n",
                     "nodeId": "x", "ip": "172.17.0.1", "hosts": [],
                     "allowedConnections": [], "exposedPorts": []}]}"#,
                "instances[0] (i/s/0): 172.17.0.1 is not a free address",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = open("172.17.0.0/16").unwrap_err();
            assert!(
                matches!(error, NetworkStateError::Corrupt { .. }),
                "{error:?}"
            );
            let message = error.to_string();
            assert!(message.contains(&file.display().to_string()), "{message}");
            assert!(message.contains(says), "{says}: {message}");
            // The file is left as it was.
            assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        }
        // A state file where a directory is: a read error naming it.
        let error = DefaultNetworks::open(
            NetworkPool::default(),
            Some(dir.path().to_owned()),
            Arc::new(FakeUpdates::default()),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&dir.path().display().to_string()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_an_error_naming_the_file_and_is_made_at_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let file = state_dir.join("networks.json");
        let open = || {
            DefaultNetworks::open(
                NetworkPool::default(),
                Some(file.clone()),
                Arc::new(FakeUpdates::default()),
            )
            .unwrap()
        };
        let networks = open();
        // The directory becomes a plain file: nothing can be written in it.
        std::fs::remove_dir_all(&state_dir).unwrap();
        std::fs::write(&state_dir, "in the way").unwrap();
        let error = networks
            .get_node_network_params("a", &node("node-1"))
            .await
            .unwrap_err();
        let (code, message) = failure(error);
        assert_eq!(code, aos::FAILED);
        assert!(message.contains(&file.display().to_string()), "{message}");
        // The allocation stands: once the file can be written, asking again gives it and
        // writes it.
        std::fs::remove_file(&state_dir).unwrap();
        let a = networks
            .get_node_network_params("a", &node("node-1"))
            .await
            .unwrap();
        assert_eq!(a.ip, "172.17.0.1");
        assert_eq!(open().snapshot(), networks.snapshot());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_allocations_get_distinct_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("networks.json");
        let networks = DefaultNetworks::open(
            NetworkPool::default(),
            Some(file.clone()),
            Arc::new(FakeUpdates::default()),
        )
        .unwrap();
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let networks = networks.clone();
                tokio::spawn(async move {
                    let node = node(&format!("node-{}", i % 4));
                    let network = format!("net-{}", i / 4 % 2);
                    networks
                        .get_node_network_params(&network, &node)
                        .await
                        .unwrap();
                    let p = networks
                        .allocate_instance_network(
                            &ident("svc", i),
                            &network,
                            &node,
                            &params(&[], &[]),
                        )
                        .await
                        .unwrap();
                    (network, p.ip)
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for task in tasks {
            let (network, ip) = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the allocation ends in time")
                .unwrap();
            assert!(seen.insert(ip.clone()), "{ip} given twice (in {network})");
        }
        let snapshot = networks.snapshot();
        assert_eq!(snapshot.networks.len(), 2);
        let hosts: usize = snapshot.networks.iter().map(|n| n.hosts.len()).sum();
        assert_eq!(hosts, 8);
        let mut addresses = HashSet::new();
        for n in &snapshot.networks {
            for ip in n
                .hosts
                .iter()
                .map(|h| &h.ip)
                .chain(n.instances.iter().map(|i| &i.ip))
            {
                assert!(addresses.insert(ip.clone()), "{ip} given twice");
            }
        }
        assert_eq!(addresses.len(), 40);
        // The file holds the last state.
        let reopened = DefaultNetworks::open(
            NetworkPool::default(),
            Some(file),
            Arc::new(FakeUpdates::default()),
        )
        .unwrap();
        assert_eq!(reopened.snapshot(), snapshot);
    }

    #[test]
    fn the_admin_view_mirrors_the_snapshot() {
        let (networks, _) = memory("172.17.0.0/16");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            networks
                .get_node_network_params("a", &node("node-1"))
                .await
                .unwrap();
            networks
                .allocate_instance_network(
                    &ident("svc", 0),
                    "a",
                    &node("node-1"),
                    &params(&[], &[]),
                )
                .await
                .unwrap();
        });
        let view = networks.snapshot();
        assert_eq!(view.pool, "172.17.0.0/16");
        assert_eq!(view.networks.len(), 1);
        let a = &view.networks[0];
        assert_eq!(
            (a.network_id.as_str(), a.subnet.as_str(), a.vlan_id),
            ("a", "172.17.0.0/24", 1)
        );
        assert_eq!(a.hosts[0].node_id, "node-1");
        assert_eq!(a.hosts[0].ip, "172.17.0.1");
        assert_eq!(a.instances[0].ident(), "svc/subject/0");
        assert_eq!(a.instances[0].ip, "172.17.0.2");
    }
}
