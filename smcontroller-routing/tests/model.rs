//! A randomised model test of the routing core (issue 7): random sequences of attach,
//! telemetry (quick, busy or panicking receivers), SM-side close, replacement, sync calls
//! answered in order or left unanswered as a real SM does, time passing (timeouts, late
//! replies) and shutdown, across three node ids, under tokio's paused clock.
//!
//! After every step: connected and disconnected alternate per node id and nothing of a stream
//! is reported outside its connected..disconnected (R-REG-4, R-REG-5). Every caller gets its
//! own reply or an error (R-SYNC-2, R-SYNC-3). Once everything has ended: no node slot and no
//! task is left (N-LEAK-1), every call has returned, and a stream the SM closed itself had all
//! its telemetry delivered (R-TEL-3).
//!
//! `cargo test -p smcontroller-routing --test model` runs 64 cases; a longer run is
//! `PROPTEST_CASES=5000 cargo test -p smcontroller-routing --test model --release`.

mod support;

use std::{collections::VecDeque, time::Duration};

use futures::FutureExt;
use proptest::prelude::*;
use smcontroller_api::{MonitoringProvider, NodeConfig, NodeConfigHandler, NodeId};
use smcontroller_routing::{Controller, Inbound, Outbound, Outgoing, Settings};
use support::{BUSY_FOR_A_WHILE, Ev, PANIC, Sm, assert_alternation, config_status, monitoring};
use tokio::task::JoinHandle;

const NODES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    /// A new stream for a node id (replacing a live one, or reconnecting).
    Attach(usize),
    /// Telemetry on a live stream: 0 quick, 1 a busy receiver, 2 a panicking receiver.
    Telemetry(usize, u8),
    /// The SM ends a live stream.
    Close(usize),
    /// `get_average_monitoring` on a node id.
    CallMonitoring(usize),
    /// `check_node_config` on a node id; `false`: a config the SM cannot parse (no answer).
    CallCheck(usize, bool),
    /// The SM of a live stream handles its oldest command.
    Answer(usize),
    /// Time passes, in milliseconds.
    Settle(u64),
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NODES.len()).prop_map(Op::Attach),
        4 => (any::<usize>(), 0_u8..3).prop_map(|(s, k)| Op::Telemetry(s, k)),
        1 => any::<usize>().prop_map(Op::Close),
        2 => (0..NODES.len()).prop_map(Op::CallMonitoring),
        2 => (0..NODES.len(), prop::bool::weighted(0.8)).prop_map(|(n, ok)| Op::CallCheck(n, ok)),
        4 => any::<usize>().prop_map(Op::Answer),
        3 => prop_oneof![0_u64..50, 50_u64..7_000].prop_map(Op::Settle),
        1 => Just(Op::Shutdown),
    ]
}

/// A sync command as the simulated SM received it, and when.
struct Command {
    sent: tokio::time::Instant,
    kind: CommandKind,
}

enum CommandKind {
    Monitoring { call: u64 },
    Check { version: String, parses: bool },
}

struct Stream {
    sm: Sm,
    node: usize,
    tag: u64,
    sent: u64,
    /// A newer stream of the node came while this one was live: what this one sent after
    /// that may go unread.
    replaced: bool,
    /// Quick and busy samples sent (panicking ones are lost by design).
    delivered_expected: Vec<u64>,
    commands: VecDeque<Command>,
}

enum Call {
    Monitoring(
        u64,
        JoinHandle<smcontroller_api::Result<smcontroller_api::NodeMonitoringData>>,
    ),
    Check(JoinHandle<smcontroller_api::Result<()>>),
}

struct Model {
    controller: Controller,
    recorder: std::sync::Arc<support::Recorder>,
    live: Vec<Stream>,
    closed_by_sm: Vec<Stream>,
    next_tag: u64,
    next_call: u64,
    calls: Vec<Call>,
    shut_down: bool,
}

impl Model {
    fn pick(&self, index: usize) -> Option<usize> {
        (!self.live.is_empty()).then(|| index % self.live.len())
    }

    /// Polls a call once, so that its command is sent, then finds the stream that got it.
    fn start_call<T: Send + 'static>(
        &mut self,
        node: usize,
        call: impl std::future::Future<Output = T> + Send + 'static,
        command: impl FnOnce() -> CommandKind,
    ) -> JoinHandle<T> {
        let mut call = Box::pin(call);
        let first = (&mut call).now_or_never();
        for stream in self.live.iter_mut().filter(|s| s.node == node) {
            while let Some(item) = stream.sm.out.try_recv() {
                match item {
                    Outgoing::Command(Outbound::ConnectionStatus(_)) => {}
                    Outgoing::Command(_) => {
                        assert!(
                            first.is_none(),
                            "a call that sent its command already returned"
                        );
                        stream.commands.push_back(Command {
                            sent: tokio::time::Instant::now(),
                            kind: command(),
                        });
                        return tokio::spawn(call);
                    }
                    Outgoing::Close(_) => {}
                }
            }
        }
        match first {
            Some(result) => tokio::spawn(async move { result }),
            None => tokio::spawn(call),
        }
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Attach(node) => {
                if self.shut_down {
                    return;
                }
                self.next_tag += 1;
                let tag = self.next_tag;
                for older in self.live.iter_mut().filter(|s| s.node == node) {
                    older.replaced = true;
                }
                let sm = Sm::register(&self.controller, NODES[node], &format!("s{tag}"));
                self.live.push(Stream {
                    sm,
                    node,
                    tag,
                    sent: 0,
                    replaced: false,
                    delivered_expected: Vec::new(),
                    commands: VecDeque::new(),
                });
            }
            Op::Telemetry(pick, kind) => {
                let Some(i) = self.pick(pick) else { return };
                let stream = &mut self.live[i];
                if stream.sent >= 999 {
                    return;
                }
                let ram = stream.tag * 1000 + stream.sent;
                stream.sent += 1;
                let cpu = [0, BUSY_FOR_A_WHILE, PANIC][usize::from(kind)];
                if cpu != PANIC {
                    stream.delivered_expected.push(ram);
                }
                stream.sm.monitoring(ram, cpu);
            }
            Op::Close(pick) => {
                let Some(i) = self.pick(pick) else { return };
                let mut stream = self.live.swap_remove(i);
                stream.sm.close();
                self.closed_by_sm.push(stream);
            }
            Op::CallMonitoring(node) => {
                self.next_call += 1;
                let call = self.next_call;
                let controller = self.controller.clone();
                let id = NodeId::new(NODES[node]);
                let handle = self.start_call(
                    node,
                    async move { controller.get_average_monitoring(&id).await },
                    || CommandKind::Monitoring { call },
                );
                self.calls.push(Call::Monitoring(call, handle));
            }
            Op::CallCheck(node, parses) => {
                self.next_call += 1;
                let version = format!("v{}", self.next_call);
                let controller = self.controller.clone();
                let id = NodeId::new(NODES[node]);
                let config = NodeConfig::new(version.clone(), "main");
                let handle = self.start_call(
                    node,
                    async move { controller.check_node_config(&id, &config).await },
                    || CommandKind::Check { version, parses },
                );
                self.calls.push(Call::Check(handle));
            }
            Op::Answer(pick) => {
                let Some(i) = self.pick(pick) else { return };
                let stream = &mut self.live[i];
                let Some(command) = stream.commands.pop_front() else {
                    return;
                };
                // The contract bounds how late a reply may come (R-SYNC-3: the reply expiry);
                // a real SM that has not answered by then is taken as never answering.
                if command.sent.elapsed() >= self.controller.settings().reply_expiry() {
                    return;
                }
                match command.kind {
                    CommandKind::Monitoring { call } => {
                        stream
                            .sm
                            .send(Inbound::AverageMonitoring(monitoring(call, 0)));
                    }
                    CommandKind::Check {
                        version,
                        parses: true,
                    } => {
                        stream.sm.send(config_status(&version, false));
                    }
                    // The real SM sends nothing for a config it cannot parse.
                    CommandKind::Check { parses: false, .. } => {}
                }
            }
            Op::Settle(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Op::Shutdown => {
                if !self.shut_down {
                    self.shut_down = true;
                    self.controller.shutdown().await;
                }
            }
        }
    }

    fn check_events(&self) {
        let events = self.recorder.events();
        for node in NODES {
            let of_node: Vec<Ev> = events
                .iter()
                .filter(|e| e.node() == node)
                .cloned()
                .collect();
            assert_alternation(&of_node);
        }
    }

    async fn finish(mut self) {
        for stream in &mut self.live {
            stream.sm.close();
        }
        // Long enough for every timeout, busy receiver and reply expiry to run out.
        tokio::time::sleep(Duration::from_secs(60)).await;
        self.check_events();
        for call in self.calls {
            match call {
                Call::Monitoring(id, handle) => {
                    assert!(handle.is_finished(), "call {id} has not returned");
                    if let Ok(data) = handle.await.expect("call task") {
                        assert_eq!(data.node.ram, id, "a caller got another call's reply");
                    }
                }
                Call::Check(handle) => {
                    assert!(handle.is_finished(), "a check has not returned");
                    let _ = handle.await.expect("call task");
                }
            }
        }
        if !self.shut_down {
            let events = self.recorder.events();
            for stream in self.closed_by_sm.iter().filter(|s| !s.replaced) {
                let got: Vec<u64> = events
                    .iter()
                    .filter_map(|e| match e {
                        Ev::Monitoring(_, ram) if ram / 1000 == stream.tag => Some(*ram),
                        _ => None,
                    })
                    .collect();
                assert_eq!(
                    got, stream.delivered_expected,
                    "stream s{} lost telemetry",
                    stream.tag
                );
            }
        }
        assert_eq!(
            self.controller.node_slots(),
            0,
            "a node slot was left behind"
        );
        assert_eq!(self.controller.live_tasks(), 0, "a task was left behind");
    }
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (controller, recorder) = support::controller(Settings::default());
        let mut model = Model {
            controller,
            recorder,
            live: Vec::new(),
            closed_by_sm: Vec::new(),
            next_tag: 0,
            next_call: 0,
            calls: Vec::new(),
            shut_down: false,
        };
        for op in ops {
            model.apply(op).await;
            model.check_events();
        }
        model.finish().await;
    });
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn r_reg_5_r_sync_3_the_core_holds_its_invariants_in_any_interleaving(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        run(ops);
    }
}
