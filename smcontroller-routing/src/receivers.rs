//! The receivers the router hands node data to.

use std::sync::Arc;

use smcontroller_api::{
    AlertsReceiver, EnvVarsStatusSender, InstanceStatusReceiver, LogSender, MonitoringReceiver,
    SmInfoReceiver,
};

/// Where everything SMs send goes (contract section 2, R-TEL-1).
#[derive(Clone)]
pub struct Receivers {
    /// Node connected/disconnected and `sm_info`.
    pub sm_info: Arc<dyn SmInfoReceiver>,
    /// Instance statuses and node snapshots.
    pub instance_status: Arc<dyn InstanceStatusReceiver>,
    /// Env-var statuses carried in instance statuses.
    pub env_vars: Arc<dyn EnvVarsStatusSender>,
    /// Instant monitoring.
    pub monitoring: Arc<dyn MonitoringReceiver>,
    /// Alerts.
    pub alerts: Arc<dyn AlertsReceiver>,
    /// Log parts.
    pub logs: Arc<dyn LogSender>,
}

impl Receivers {
    /// One object that implements every receiver trait, for all six roles.
    pub fn all<R>(receiver: Arc<R>) -> Self
    where
        R: SmInfoReceiver
            + InstanceStatusReceiver
            + EnvVarsStatusSender
            + MonitoringReceiver
            + AlertsReceiver
            + LogSender
            + 'static,
    {
        Self {
            sm_info: receiver.clone(),
            instance_status: receiver.clone(),
            env_vars: receiver.clone(),
            monitoring: receiver.clone(),
            alerts: receiver.clone(),
            logs: receiver,
        }
    }
}

impl std::fmt::Debug for Receivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receivers { .. }")
    }
}
