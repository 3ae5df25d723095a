//! Settings of the router.

use std::time::Duration;

use smcontroller_api::SmProtocol;

/// How the router waits and buffers. `Default` gives the contract's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a sync call waits for its reply (R-SYNC-1). Default 5 s.
    pub response_timeout: Duration,
    /// How long a new stream may take to send `sm_info` (R-REG-2). Default 10 s.
    pub registration_timeout: Duration,
    /// Messages each node's inbound queue holds before the controller stops reading that
    /// stream (R-TEL-3). Default 256.
    pub queue_bound: usize,
    /// How long a sync command that got no reply keeps its place in the reply matching
    /// (R-SYNC-3): its late reply is absorbed within that time, and after it the command no
    /// longer shifts the matching. `None`: twice the response timeout. Never shorter than the
    /// response timeout.
    pub reply_expiry: Option<Duration>,
    /// How long [`Controller::shutdown`](crate::Controller::shutdown) waits for sessions to
    /// finish before it aborts them (R-STOP-1). Default 500 ms.
    pub shutdown_grace: Duration,
    /// Nodes registered at once (R-BAD-2). An `sm_info` for a new node id beyond it ends that
    /// stream with `RESOURCE_EXHAUSTED`; a node that replaces its own stream is always taken.
    /// Default 4,096 (the connection cap's default: one stream per SM).
    pub max_nodes: usize,
    /// Streams that have not sent `sm_info` yet (R-BAD-2). A new stream beyond it is refused
    /// with `RESOURCE_EXHAUSTED`. Each is held at most the registration timeout. Default 1,024.
    pub max_pending_streams: usize,
    /// Bytes (as sent on the wire) each node's inbound queue holds before the controller stops
    /// reading that stream (R-BAD-2, with `queue_bound` for the count). One message larger
    /// than this is still taken when the queue is empty. Default 8 MiB.
    pub inbound_queue_bytes: usize,
    /// Commands waiting to be written to one node (R-BAD-2). A call beyond it fails at once with
    /// [`Error::ResourceExhausted`](smcontroller_api::Error::ResourceExhausted): the node is not
    /// reading its stream. Default 64.
    pub outbound_backlog: usize,
    /// Bytes of commands waiting to be written to one node (as encoded for the wire), beyond
    /// which a call fails like for `outbound_backlog`. Default 8 MiB.
    pub outbound_backlog_bytes: usize,
    /// The wire revision the unit's SMs speak (R-REV-1). Under 9.1 there is no
    /// `update_networks` and instances carry no network; asking for either fails at once with
    /// [`Error::NotSupported`](smcontroller_api::Error::NotSupported). Default 9.0.
    pub sm_protocol: SmProtocol,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(5),
            registration_timeout: Duration::from_secs(10),
            queue_bound: 256,
            reply_expiry: None,
            shutdown_grace: Duration::from_millis(500),
            max_nodes: 4096,
            max_pending_streams: 1024,
            inbound_queue_bytes: 8 * 1024 * 1024,
            outbound_backlog: 64,
            outbound_backlog_bytes: 8 * 1024 * 1024,
            sm_protocol: SmProtocol::V9_0,
        }
    }
}

impl Settings {
    /// The reply expiry in force: [`reply_expiry`](Self::reply_expiry), or twice the response
    /// timeout, and at least the response timeout.
    pub fn reply_expiry(&self) -> Duration {
        self.reply_expiry
            .unwrap_or(self.response_timeout.saturating_mul(2))
            .max(self.response_timeout)
    }
}
