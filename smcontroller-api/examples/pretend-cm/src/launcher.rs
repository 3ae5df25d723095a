//! The launcher: puts the desired instances on nodes and keeps track of what runs where.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use async_trait::async_trait;
use smcontroller_api::{
    Error, InstanceIdent, InstanceInfo, InstanceRunner, InstanceState, InstanceStatus,
    InstanceStatusReceiver, NodeConfigHandler, NodeConfigState, NodeId, Result, SmController,
    StartInstance,
};

/// The instances each node should run. A node that is not named should run none.
pub type Desired = BTreeMap<NodeId, Vec<InstanceInfo>>;

/// What [`Launcher::apply`] did, node by node.
pub type Report = BTreeMap<NodeId, NodeOutcome>;

/// What the launcher did with one node in one [`Launcher::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeOutcome {
    /// One `update_instances` was queued to the node.
    Updated {
        /// How many instances it stops.
        stopped: usize,
        /// How many instances it starts.
        started: usize,
    },
    /// Nothing to do: as far as the launcher knows, the node runs exactly what is desired.
    UpToDate,
    /// Left alone: the node's configuration is not installed, so it cannot run instances yet.
    NotConfigured(NodeConfigState),
    /// Left alone: the node is not registered. It is dealt with at the next apply after it
    /// connects.
    NotRegistered,
    /// Given up: every attempt timed out or lost the node's stream.
    Unreachable {
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last one.
        last_error: Error,
    },
}

/// Puts the desired instances on nodes through the SM controller.
///
/// It remembers what it started on each node, and corrects that from what the nodes report
/// (it is an [`InstanceStatusReceiver`]), so that each [`apply`](Self::apply) sends a node only
/// the difference: the instances to stop and the ones to start.
pub struct Launcher {
    config: Arc<dyn NodeConfigHandler>,
    runner: Arc<dyn InstanceRunner>,
    attempts: u32,
    /// The instances each node runs, as far as the launcher knows.
    running: Mutex<BTreeMap<NodeId, Vec<InstanceIdent>>>,
}

impl Launcher {
    /// How many times a node that times out or disconnects is tried, unless told otherwise.
    pub const DEFAULT_ATTEMPTS: u32 = 3;

    /// A launcher that reads node configurations from `config` and commands instances through
    /// `runner`.
    pub fn new(config: Arc<dyn NodeConfigHandler>, runner: Arc<dyn InstanceRunner>) -> Self {
        Self {
            config,
            runner,
            attempts: Self::DEFAULT_ATTEMPTS,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// A launcher that uses one SM controller for both.
    pub fn for_controller<C: SmController + 'static>(controller: Arc<C>) -> Self {
        Self::new(controller.clone(), controller)
    }

    /// Tries a node that times out or disconnects `attempts` times in all (at least once).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Brings every node named in `desired`, and every node the launcher started instances on,
    /// to the desired instances.
    ///
    /// Nodes are handled one at a time, in node id order. A node whose configuration is not
    /// installed, or that is not registered, is left alone; one that times out or disconnects
    /// is tried again, up to the number of attempts. Each of those is an outcome in the report.
    /// Any other error (an invalid argument, a broken transport, a node-reported failure) is
    /// one that trying again would not fix: it ends the apply and is returned.
    pub async fn apply(&self, desired: &Desired) -> Result<Report> {
        let mut nodes: BTreeSet<NodeId> = desired.keys().cloned().collect();
        nodes.extend(self.running().keys().cloned());

        let mut report = Report::new();
        for node in nodes {
            let want = desired.get(&node).map_or(&[][..], Vec::as_slice);
            let outcome = self.apply_to_node(&node, want).await?;
            report.insert(node, outcome);
        }
        Ok(report)
    }

    /// The instances the launcher believes `node` runs.
    pub fn running_on(&self, node: &NodeId) -> Vec<InstanceIdent> {
        self.running().get(node).cloned().unwrap_or_default()
    }

    async fn apply_to_node(&self, node: &NodeId, want: &[InstanceInfo]) -> Result<NodeOutcome> {
        let (stop, start) = self.difference(node, want);
        if stop.is_empty() && start.is_empty() {
            return Ok(NodeOutcome::UpToDate);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.update_node(node, &stop, &start).await {
                Ok(outcome) => return Ok(outcome),
                Err(Error::NotFound { .. }) => return Ok(NodeOutcome::NotRegistered),
                Err(Error::Timeout { .. } | Error::Disconnected { .. })
                    if attempt < self.attempts => {}
                Err(e @ (Error::Timeout { .. } | Error::Disconnected { .. })) => {
                    return Ok(NodeOutcome::Unreachable {
                        attempts: attempt,
                        last_error: e,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: check the node's configuration, then queue the update.
    async fn update_node(
        &self,
        node: &NodeId,
        stop: &[InstanceIdent],
        start: &[InstanceInfo],
    ) -> Result<NodeOutcome> {
        let status = self.config.get_node_config_status(node).await?;
        if status.state != NodeConfigState::Installed {
            return Ok(NodeOutcome::NotConfigured(status.state));
        }
        let start_instances: Vec<StartInstance> = start.iter().cloned().map(Into::into).collect();
        self.runner
            .update_instances(node, stop, &start_instances)
            .await?;

        let mut running = self.running();
        let now = running.entry(node.clone()).or_default();
        now.retain(|ident| !stop.contains(ident));
        now.extend(start.iter().map(|info| info.ident.clone()));
        if now.is_empty() {
            running.remove(node);
        }
        Ok(NodeOutcome::Updated {
            stopped: stop.len(),
            started: start.len(),
        })
    }

    /// What to stop on `node` (runs, not wanted) and what to start (wanted, does not run).
    fn difference(
        &self,
        node: &NodeId,
        want: &[InstanceInfo],
    ) -> (Vec<InstanceIdent>, Vec<InstanceInfo>) {
        let running = self.running();
        let now = running.get(node).map_or(&[][..], Vec::as_slice);
        let stop = now
            .iter()
            .filter(|ident| !want.iter().any(|info| &info.ident == *ident))
            .cloned()
            .collect();
        let start = want
            .iter()
            .filter(|info| !now.contains(&info.ident))
            .cloned()
            .collect();
        (stop, start)
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<NodeId, Vec<InstanceIdent>>> {
        // Nothing panics while holding the lock; if something did, the map is still whole.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether an instance in `state` counts as running (so is not started again).
fn is_running(state: InstanceState) -> bool {
    matches!(state, InstanceState::Activating | InstanceState::Active)
}

#[async_trait]
impl InstanceStatusReceiver for Launcher {
    /// An instance that stopped or failed is forgotten, so the next apply starts it again.
    async fn on_instance_status_received(&self, node: &NodeId, status: &InstanceStatus) {
        let mut running = self.running();
        let now = running.entry(node.clone()).or_default();
        let known = now.contains(&status.ident);
        if is_running(status.state) && !known {
            now.push(status.ident.clone());
        } else if !is_running(status.state) && known {
            now.retain(|ident| ident != &status.ident);
        }
        if now.is_empty() {
            running.remove(node);
        }
    }

    /// The node's snapshot replaces what the launcher believed about it.
    async fn on_node_instances_statuses_received(
        &self,
        node: &NodeId,
        statuses: &[InstanceStatus],
    ) {
        let now: Vec<InstanceIdent> = statuses
            .iter()
            .filter(|status| is_running(status.state))
            .map(|status| status.ident.clone())
            .collect();
        let mut running = self.running();
        if now.is_empty() {
            running.remove(node);
        } else {
            running.insert(node.clone(), now);
        }
    }
}
