//! The event hub: what nodes send, fanned out to admin subscribers.
//!
//! The daemon's receiver publishes each event once; every [`EventHub::subscribe`]r gets its own
//! copy through a bounded `tokio::sync::broadcast`. Publishing never waits: a subscriber that
//! falls behind loses the oldest events and is told how many (a `lagged` marker), and the SMs
//! are never slowed down by an admin client. While nobody subscribes, publishing costs one
//! atomic read and clones nothing.

use std::{sync::Arc, time::SystemTime};

use smcontroller_api::{
    Alert, DisconnectReason, InstanceStatus, LogPart, NodeId, NodeMonitoringData, SmInfo,
};
use smcontroller_routing::Inbound;
use tokio::sync::broadcast;

use crate::proto::v1 as pb;

/// How many events a subscriber may fall behind before it loses some, by default.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What happened, without the node and the time.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    /// The node registered.
    Connected,
    /// The node's stream ended.
    Disconnected(DisconnectReason),
    /// The node sent `sm_info`.
    SmInfo(SmInfo),
    /// One instance's status (from `update_instances_status`).
    InstanceStatus(InstanceStatus),
    /// A `node_instances_status` snapshot.
    NodeInstancesStatus(Vec<InstanceStatus>),
    /// An `instant_monitoring` sample.
    Monitoring(NodeMonitoringData),
    /// An alert.
    Alert(Alert),
    /// A log part.
    Log(LogPart),
}

impl EventBody {
    /// Which kind of event this is.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Connected => EventKind::Connected,
            Self::Disconnected(_) => EventKind::Disconnected,
            Self::SmInfo(_) => EventKind::SmInfo,
            Self::InstanceStatus(_) => EventKind::InstanceStatus,
            Self::NodeInstancesStatus(_) => EventKind::NodeInstancesStatus,
            Self::Monitoring(_) => EventKind::Monitoring,
            Self::Alert(_) => EventKind::Alert,
            Self::Log(_) => EventKind::Log,
        }
    }
}

/// The kinds of events, as `smctl events --kind` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `connected`.
    Connected,
    /// `disconnected`.
    Disconnected,
    /// `sm_info`.
    SmInfo,
    /// `instance_status`.
    InstanceStatus,
    /// `node_instances_status`.
    NodeInstancesStatus,
    /// `monitoring`.
    Monitoring,
    /// `alert`.
    Alert,
    /// `log`.
    Log,
}

impl EventKind {
    /// Every kind.
    pub const ALL: &'static [Self] = &[
        Self::Connected,
        Self::Disconnected,
        Self::SmInfo,
        Self::InstanceStatus,
        Self::NodeInstancesStatus,
        Self::Monitoring,
        Self::Alert,
        Self::Log,
    ];

    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::SmInfo => "sm_info",
            Self::InstanceStatus => "instance_status",
            Self::NodeInstancesStatus => "node_instances_status",
            Self::Monitoring => "monitoring",
            Self::Alert => "alert",
            Self::Log => "log",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The kind on the admin wire.
    pub fn to_proto(self) -> pb::EventKind {
        match self {
            Self::Connected => pb::EventKind::Connected,
            Self::Disconnected => pb::EventKind::Disconnected,
            Self::SmInfo => pb::EventKind::SmInfo,
            Self::InstanceStatus => pb::EventKind::InstanceStatus,
            Self::NodeInstancesStatus => pb::EventKind::NodeInstancesStatus,
            Self::Monitoring => pb::EventKind::Monitoring,
            Self::Alert => pb::EventKind::Alert,
            Self::Log => pb::EventKind::Log,
        }
    }

    /// The kind from the admin wire; `None` for `EVENT_KIND_UNSPECIFIED`.
    pub fn from_proto(kind: pb::EventKind) -> Option<Self> {
        Some(match kind {
            pb::EventKind::Unspecified => return None,
            pb::EventKind::Connected => Self::Connected,
            pb::EventKind::Disconnected => Self::Disconnected,
            pb::EventKind::SmInfo => Self::SmInfo,
            pb::EventKind::InstanceStatus => Self::InstanceStatus,
            pb::EventKind::NodeInstancesStatus => Self::NodeInstancesStatus,
            pb::EventKind::Monitoring => Self::Monitoring,
            pb::EventKind::Alert => Self::Alert,
            pb::EventKind::Log => Self::Log,
        })
    }
}

/// One thing a node did, when the daemon heard of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The node.
    pub node_id: NodeId,
    /// When the daemon's receiver got it.
    pub at: SystemTime,
    /// What happened.
    pub body: EventBody,
}

/// The short name of a disconnect reason: `closed`, `error`, `replaced`, `protocol_violation`,
/// `shutdown`.
pub fn reason_name(reason: &DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::Closed => "closed",
        DisconnectReason::Error(_) => "error",
        DisconnectReason::Replaced => "replaced",
        DisconnectReason::ProtocolViolation(_) => "protocol_violation",
        DisconnectReason::Shutdown => "shutdown",
    }
}

/// A protobuf timestamp of a system time (before 1970 is taken as 1970).
pub fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

impl Event {
    /// The event on the admin wire.
    pub fn to_proto(&self) -> pb::Event {
        use pb::event::Event as E;
        use smcontroller_grpc::proto::servicemanager::v5::{
            self as sm, sm_outgoing_messages::SmOutgoingMessage,
        };
        let body = match &self.body {
            EventBody::Connected => E::Connected(pb::Connected {}),
            EventBody::Disconnected(reason) => E::Disconnected(pb::Disconnected {
                reason: reason_name(reason).to_owned(),
                detail: reason.to_string(),
            }),
            EventBody::SmInfo(info) => E::SmInfo(info.clone().into()),
            EventBody::InstanceStatus(status) => E::InstanceStatus(status.clone().into()),
            EventBody::NodeInstancesStatus(statuses) => {
                E::NodeInstancesStatus(sm::NodeInstancesStatus {
                    instances: statuses.iter().cloned().map(Into::into).collect(),
                })
            }
            EventBody::Monitoring(data) => {
                match sm::SmOutgoingMessages::from(Inbound::InstantMonitoring(data.clone()))
                    .sm_outgoing_message
                {
                    Some(SmOutgoingMessage::InstantMonitoring(m)) => E::Monitoring(m),
                    _ => E::Monitoring(sm::InstantMonitoring::default()),
                }
            }
            EventBody::Alert(alert) => E::Alert(alert.clone().into()),
            EventBody::Log(part) => E::Log(part.clone().into()),
        };
        pb::Event {
            node_id: self.node_id.to_string(),
            time: Some(timestamp(self.at)),
            event: Some(body),
        }
    }
}

/// The averaged monitoring reply on the admin wire.
pub fn average_monitoring_to_proto(
    data: NodeMonitoringData,
) -> smcontroller_grpc::proto::servicemanager::v5::AverageMonitoring {
    use smcontroller_grpc::proto::servicemanager::v5::{
        self as sm, sm_outgoing_messages::SmOutgoingMessage,
    };
    match sm::SmOutgoingMessages::from(Inbound::AverageMonitoring(data)).sm_outgoing_message {
        Some(SmOutgoingMessage::AverageMonitoring(m)) => m,
        _ => sm::AverageMonitoring::default(),
    }
}

/// Fans events out to admin subscribers. Cheap to clone: clones share one hub.
#[derive(Debug, Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventHub {
    /// A hub whose subscribers may each fall `capacity` events behind (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Whether anyone listens: publishers skip building events when nobody does.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes an event built by `body`, stamped now; `body` is called only while someone
    /// subscribes. Never waits.
    pub fn publish(&self, node_id: &NodeId, body: impl FnOnce() -> EventBody) {
        if !self.has_subscribers() {
            return;
        }
        let _ = self.tx.send(Arc::new(Event {
            node_id: node_id.clone(),
            at: SystemTime::now(),
            body: body(),
        }));
    }

    /// A new subscriber: every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name_and_proto() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(*kind));
            assert_eq!(EventKind::from_proto(kind.to_proto()), Some(*kind));
        }
        assert_eq!(EventKind::from_name("nope"), None);
        assert_eq!(EventKind::from_proto(pb::EventKind::Unspecified), None);
    }

    #[tokio::test]
    async fn publish_without_subscribers_builds_nothing() {
        let hub = EventHub::new(4);
        hub.publish(&NodeId::new("a"), || panic!("built an event nobody reads"));
        let mut rx = hub.subscribe();
        hub.publish(&NodeId::new("a"), || EventBody::Connected);
        let event = rx.recv().await.unwrap();
        assert_eq!(event.node_id.as_str(), "a");
        assert_eq!(event.body, EventBody::Connected);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_and_never_blocks_the_publisher() {
        let hub = EventHub::new(4);
        let mut rx = hub.subscribe();
        for _ in 0..10 {
            hub.publish(&NodeId::new("a"), || EventBody::Connected);
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(skipped)) => assert_eq!(skipped, 6),
            other => panic!("expected lagged, got {other:?}"),
        }
        assert!(rx.recv().await.is_ok());
    }
}
