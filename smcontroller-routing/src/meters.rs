//! The metric handles counted on every message and call, made once per label value.
//!
//! `metrics::counter!` with a label builds and hashes its key, and the recorder looks it up in
//! its registry, on every use: three times per sync call (message out, message in, round trip).
//! These tables keep the handle of each label value after its first use instead. A handle is
//! taken from the recorder installed at that moment, so the recorder must be installed before
//! the first stream is served (the daemon does it first thing).

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use smcontroller_api::SmMessageKind;

use crate::message::Outbound;

/// One handle per label value, registered on first use.
struct PerLabel<T, const N: usize>([OnceLock<T>; N]);

impl<T, const N: usize> PerLabel<T, N> {
    const fn new() -> Self {
        Self([const { OnceLock::new() }; N])
    }

    fn get(&self, index: usize, make: impl FnOnce() -> T) -> &T {
        self.0[index].get_or_init(make)
    }
}

static MESSAGES_IN: PerLabel<Counter, { SmMessageKind::ALL.len() }> = PerLabel::new();
static MESSAGES_OUT: PerLabel<Counter, { Outbound::KINDS }> = PerLabel::new();
static ROUND_TRIP: PerLabel<Histogram, { Outbound::KINDS }> = PerLabel::new();

/// `smcontroller_messages_in_total{kind}`: one message of `kind` read from an SM.
pub(crate) fn message_in(kind: SmMessageKind) {
    MESSAGES_IN
        .get(
            kind.index(),
            || metrics::counter!("smcontroller_messages_in_total", "kind" => kind.name()),
        )
        .increment(1);
}

/// `smcontroller_messages_out_total{kind}`: `command` taken by the transport to be written.
pub(crate) fn message_out(command: &Outbound) {
    let name = command.name();
    MESSAGES_OUT
        .get(
            command.kind_index(),
            || metrics::counter!("smcontroller_messages_out_total", "kind" => name),
        )
        .increment(1);
}

/// `smcontroller_sync_round_trip_seconds{command}`: a sync call answered after `seconds`.
pub(crate) fn round_trip(kind_index: usize, command: &'static str, seconds: f64) {
    ROUND_TRIP
        .get(
            kind_index,
            || metrics::histogram!("smcontroller_sync_round_trip_seconds", "command" => command),
        )
        .record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_its_own_slot() {
        let config = || {
            Box::new(smcontroller_api::NodeConfig {
                version: "1".into(),
                node: None,
                node_group_subject: smcontroller_api::Codename::default(),
                alert_rules: None,
                resource_ratios: None,
                labels: Vec::new(),
                priority: 0,
            })
        };
        let commands = [
            Outbound::GetNodeConfigStatus,
            Outbound::CheckNodeConfig(config()),
            Outbound::SetNodeConfig(config()),
            Outbound::UpdateInstances {
                stop: Vec::new(),
                start: Vec::new(),
            },
            Outbound::UpdateNetworks(Vec::new()),
            Outbound::SystemLog(Box::default()),
            Outbound::InstanceLog(Box::default()),
            Outbound::CrashLog(Box::default()),
            Outbound::GetAverageMonitoring,
            Outbound::ConnectionStatus(true),
        ];
        let mut seen = [false; Outbound::KINDS];
        for command in &commands {
            let i = command.kind_index();
            assert!(!seen[i], "{} shares slot {i}", command.name());
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
