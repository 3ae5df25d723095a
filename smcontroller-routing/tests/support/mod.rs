//! Test doubles for the router's core, without any network: in-memory SM streams driven through
//! `Controller::attach`, and a receiver that records what it hears and can be scripted to be
//! slow or to panic.

#![allow(dead_code, unreachable_pub)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use smcontroller_api::{
    Alert, AlertsReceiver, DisconnectReason, EnvVarsStatusSender, InstanceEnvVarsStatus,
    InstanceStatus, InstanceStatusReceiver, LogPart, LogSender, MonitoringData, MonitoringReceiver,
    NodeConfigState, NodeConfigStatus, NodeId, NodeMonitoringData, ResourceInfo, SmInfo,
    SmInfoReceiver,
};
use smcontroller_routing::{
    Commands, Controller, Inbound, InboundEvent, Outbound, Outgoing, Receivers, Settings,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A monitoring sample with this `cpu` blocks its receiver call until [`Recorder::release`].
pub const SLOW: u64 = 1;
/// A monitoring sample with this `cpu` makes its receiver call panic.
pub const PANIC: u64 = 2;
/// A monitoring sample with this `cpu` keeps its receiver busy for [`BUSY`] (of tokio's clock,
/// which a test may have paused).
pub const BUSY_FOR_A_WHILE: u64 = 3;
/// How long a [`BUSY_FOR_A_WHILE`] receiver call takes.
pub const BUSY: Duration = Duration::from_millis(100);

/// What a receiver heard. `stream` is the tag an SM stream puts in its `sm_info` resources and
/// monitoring samples carry their own `ram` tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Connected(String),
    SmInfo(String, String),
    Monitoring(String, u64),
    Disconnected(String, String),
}

impl Ev {
    pub fn node(&self) -> &str {
        match self {
            Self::Connected(n)
            | Self::SmInfo(n, _)
            | Self::Monitoring(n, _)
            | Self::Disconnected(n, _) => n,
        }
    }
}

/// Records every event in order; scripted by the monitoring samples' `cpu`.
pub struct Recorder {
    events: Mutex<Vec<Ev>>,
    changed: Notify,
    release: watch::Sender<bool>,
    /// Node ids whose `on_node_connected` panics.
    panic_on_connect: Mutex<Vec<String>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            events: Mutex::default(),
            changed: Notify::new(),
            release: watch::Sender::new(false),
            panic_on_connect: Mutex::default(),
        }
    }
}

impl Recorder {
    fn push(&self, ev: Ev) {
        self.events.lock().unwrap().push(ev);
        self.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    /// The events of one node, in order.
    pub fn of(&self, node: &str) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.node() == node)
            .collect()
    }

    /// Lets every slow receiver call (now and later) return.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    pub fn panic_on_connect(&self, node: &str) {
        self.panic_on_connect.lock().unwrap().push(node.into());
    }

    /// Waits until `done` holds for the events, failing the test after `deadline`.
    pub async fn wait_for(&self, what: &str, deadline: Duration, done: impl Fn(&[Ev]) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.events()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(deadline, wait).await.is_err() {
            panic!("timed out waiting for {what}; events: {:#?}", self.events());
        }
    }
}

#[async_trait]
impl SmInfoReceiver for Recorder {
    async fn on_node_connected(&self, node: &NodeId) {
        if self
            .panic_on_connect
            .lock()
            .unwrap()
            .iter()
            .any(|n| n == node.as_str())
        {
            panic!("scripted panic in on_node_connected");
        }
        self.push(Ev::Connected(node.to_string()));
    }

    async fn on_node_disconnected(&self, node: &NodeId, reason: &DisconnectReason) {
        self.push(Ev::Disconnected(node.to_string(), reason.to_string()));
    }

    async fn on_sm_info_received(&self, info: &SmInfo) {
        let tag = info
            .resources
            .first()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        self.push(Ev::SmInfo(info.node_id.to_string(), tag));
    }
}

#[async_trait]
impl MonitoringReceiver for Recorder {
    async fn on_monitoring_received(&self, node: &NodeId, data: &NodeMonitoringData) {
        match data.node.cpu {
            SLOW => {
                let mut release = self.release.subscribe();
                let _ = release.wait_for(|r| *r).await;
            }
            PANIC => panic!("scripted panic in on_monitoring_received"),
            BUSY_FOR_A_WHILE => tokio::time::sleep(BUSY).await,
            _ => {}
        }
        self.push(Ev::Monitoring(node.to_string(), data.node.ram));
    }
}

#[async_trait]
impl InstanceStatusReceiver for Recorder {
    async fn on_instance_status_received(&self, _: &NodeId, _: &InstanceStatus) {}
    async fn on_node_instances_statuses_received(&self, _: &NodeId, _: &[InstanceStatus]) {}
}

#[async_trait]
impl EnvVarsStatusSender for Recorder {
    async fn send_env_vars_statuses(&self, _: &NodeId, _: &[InstanceEnvVarsStatus]) {}
}

#[async_trait]
impl AlertsReceiver for Recorder {
    async fn on_alert_received(&self, _: &NodeId, _: &Alert) {}
}

#[async_trait]
impl LogSender for Recorder {
    async fn send_log(&self, _: &LogPart) {}
}

/// A controller and its recorder.
pub fn controller(settings: Settings) -> (Controller, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let controller = Controller::new(settings, Receivers::all(recorder.clone()));
    (controller, recorder)
}

/// One in-memory SM stream.
pub struct Sm {
    tx: Option<mpsc::UnboundedSender<InboundEvent>>,
    pub out: Commands,
}

impl Sm {
    /// Attaches a stream to `controller`.
    pub fn attach(controller: &Controller) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = controller
            .attach(UnboundedReceiverStream::new(rx))
            .expect("controller is running");
        Self { tx: Some(tx), out }
    }

    /// Attaches a stream the SM has already ended: its reader may finish before `attach`
    /// returns.
    pub fn attach_ended(controller: &Controller) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<InboundEvent>();
        drop(tx);
        let out = controller
            .attach(UnboundedReceiverStream::new(rx))
            .expect("controller is running");
        Self { tx: None, out }
    }

    /// Attaches a stream and registers `node` with `tag` in its `sm_info`.
    pub fn register(controller: &Controller, node: &str, tag: &str) -> Self {
        let sm = Self::attach(controller);
        sm.send(Inbound::SmInfo(sm_info(node, tag)));
        sm
    }

    pub fn send(&self, message: Inbound) {
        self.send_sized(message, 64);
    }

    /// Sends `message` as if it took `wire_size` bytes on the wire.
    pub fn send_sized(&self, message: Inbound, wire_size: usize) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(InboundEvent::Message { message, wire_size });
        }
    }

    pub fn monitoring(&self, ram: u64, cpu: u64) {
        self.send(Inbound::InstantMonitoring(monitoring(ram, cpu)));
    }

    /// The SM ends its stream (as when it closes it or its connection is lost).
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// The next command the controller sends, skipping cloud status.
    pub async fn command(&mut self, deadline: Duration) -> Outbound {
        loop {
            match tokio::time::timeout(deadline, self.out.recv()).await {
                Ok(Some(Outgoing::Command(Outbound::ConnectionStatus(_)))) => {}
                Ok(Some(Outgoing::Command(command))) => return command,
                Ok(other) => panic!("expected a command, got {other:?}"),
                Err(_) => panic!("no command within {deadline:?}"),
            }
        }
    }

    /// Waits until the controller ends the stream; returns the end status it gave.
    pub async fn end_status(
        &mut self,
        deadline: Duration,
    ) -> Option<smcontroller_routing::EndStatus> {
        let wait = async {
            loop {
                match self.out.recv().await {
                    Some(Outgoing::Close(status)) => return status,
                    None => return None,
                    Some(Outgoing::Command(_)) => {}
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .expect("the controller did not end the stream in time")
    }

    /// Waits until the controller ends the stream.
    pub async fn closed(&mut self, deadline: Duration) {
        let wait = async {
            loop {
                match self.out.recv().await {
                    Some(Outgoing::Close(_)) | None => return,
                    Some(Outgoing::Command(_)) => {}
                }
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .expect("the controller did not end the stream in time");
    }

    /// Every cloud status the controller sent so far, in order.
    pub fn cloud_statuses(&mut self) -> Vec<bool> {
        let mut statuses = Vec::new();
        while let Some(item) = self.out.try_recv() {
            if let Outgoing::Command(Outbound::ConnectionStatus(c)) = item {
                statuses.push(c);
            }
        }
        statuses
    }
}

/// Waits up to `deadline` until `node`'s stream is paused for its receivers (R-TEL-2); panics
/// with `what` if it is not.
pub async fn until_stalled(controller: &Controller, node: &str, deadline: Duration, what: &str) {
    let id = NodeId::new(node);
    tokio::time::timeout(deadline, async {
        while !controller.node_status(&id).is_some_and(|s| s.stalled) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

pub fn sm_info(node: &str, tag: &str) -> SmInfo {
    SmInfo {
        node_id: NodeId::new(node),
        runtimes: Vec::new(),
        resources: vec![ResourceInfo {
            name: tag.into(),
            shared_count: 1,
        }],
    }
}

pub fn monitoring(ram: u64, cpu: u64) -> NodeMonitoringData {
    NodeMonitoringData {
        node: MonitoringData {
            timestamp: SystemTime::UNIX_EPOCH,
            ram,
            cpu,
            partitions: Vec::new(),
            download: 0,
            upload: 0,
        },
        instances: Vec::new(),
    }
}

pub fn config_status(version: &str, error: bool) -> Inbound {
    Inbound::NodeConfigStatus(NodeConfigStatus {
        state: if error {
            NodeConfigState::Failed
        } else {
            NodeConfigState::Installed
        },
        version: version.into(),
        error: error.then(|| smcontroller_api::ErrorInfo::new(1, "refused")),
    })
}

/// Checks R-REG-5 on one node's events: connected and disconnected alternate, starting with
/// connected; everything else comes between a connected and its disconnected; and every
/// event between a connect and its disconnect belongs to the stream whose `sm_info` followed
/// that connect (the tag: sm_info's resource name, and monitoring ram / 1000).
pub fn assert_alternation(events: &[Ev]) {
    let mut open: Option<String> = None;
    let mut awaiting_info = false;
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Ev::Connected(_) => {
                assert!(
                    open.is_none() && !awaiting_info,
                    "connected twice in a row at {i}: {events:#?}"
                );
                awaiting_info = true;
            }
            Ev::SmInfo(_, tag) if awaiting_info => {
                awaiting_info = false;
                open = Some(tag.clone());
            }
            Ev::SmInfo(_, tag) => {
                assert_eq!(
                    open.as_deref(),
                    Some(tag.as_str()),
                    "sm_info of another stream at {i}: {events:#?}"
                );
            }
            Ev::Monitoring(_, ram) => {
                let tag = format!("s{}", ram / 1000);
                assert_eq!(
                    open.as_deref(),
                    Some(tag.as_str()),
                    "telemetry outside its stream at {i}: {events:#?}"
                );
            }
            Ev::Disconnected(..) => {
                assert!(
                    open.is_some(),
                    "disconnected without connected at {i}: {events:#?}"
                );
                open = None;
            }
        }
    }
}
