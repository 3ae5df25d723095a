//! The one error type of the SM controller's interfaces.

use std::time::Duration;

use crate::types::NodeId;

/// What went wrong with a call to the SM controller (or to an interface it requires).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The named nodes are not registered: no SM with that node id holds a stream.
    #[error("node(s) not registered: {}", join(nodes))]
    NotFound {
        /// Every node of the request that is not registered.
        nodes: Vec<NodeId>,
    },
    /// The node did not answer within the response timeout.
    #[error("node {node} did not answer {request} within {after:?}")]
    Timeout {
        /// The node that was asked.
        node: NodeId,
        /// The request that went unanswered (its wire name).
        request: &'static str,
        /// How long the controller waited.
        after: Duration,
    },
    /// The node's stream ended before the request could be answered.
    #[error("node {node} disconnected before {request} was answered")]
    Disconnected {
        /// The node that went away.
        node: NodeId,
        /// The request that was pending (its wire name).
        request: &'static str,
    },
    /// The caller passed something that cannot be sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node (or a provider) reported an error.
    #[error("failed (aos code {aos_code}, exit code {exit_code}): {message}")]
    Failed {
        /// The Aos error kind, as a number.
        aos_code: i32,
        /// A process exit code, where one applies (0 otherwise).
        exit_code: i32,
        /// The message the node gave.
        message: String,
    },
    /// A budget of the controller is used up (contract R-BAD-2): for example the node is not
    /// reading its commands and its backlog is full. The message names the budget.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The transport failed (stream error, TLS, I/O).
    #[error("transport error: {0}")]
    Transport(String),
    /// What was asked does not exist in the wire revision the unit speaks (`smProtocol`): for
    /// example `update_networks` to a 9.1 unit. The message names the revision.
    #[error("not supported: {0}")]
    NotSupported(String),
}

impl Error {
    /// `NotFound` for one node.
    pub fn not_found(node: impl Into<NodeId>) -> Self {
        Self::NotFound {
            nodes: vec![node.into()],
        }
    }
}

impl From<crate::types::ErrorInfo> for Error {
    fn from(info: crate::types::ErrorInfo) -> Self {
        Self::Failed {
            aos_code: info.aos_code,
            exit_code: info.exit_code,
            message: info.message,
        }
    }
}

fn join(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result of every fallible call of the SM controller's interfaces.
pub type Result<T, E = Error> = std::result::Result<T, E>;
