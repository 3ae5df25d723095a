//! Settings of the router.

use std::time::Duration;

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
    /// How long [`Controller::shutdown`](crate::Controller::shutdown) waits for sessions to
    /// finish before it aborts them (R-STOP-1). Default 500 ms.
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(5),
            registration_timeout: Duration::from_secs(10),
            queue_bound: 256,
            shutdown_grace: Duration::from_millis(500),
        }
    }
}
