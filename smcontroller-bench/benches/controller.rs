//! Benchmark of the SM controller against the non-functional goals of the contract (section 4).
//!
//! This is the whole of the `smcontroller-bench` crate, a tool of the workspace: the harness
//! (this file), the mTLS scenarios (`controller/tls.rs`), the hostile-peer soak
//! (`controller/hostile.rs`) and the floor they are measured against, the bare relay
//! (`controller/relay.rs`). It may depend on any crate of the workspace (the daemon's settings
//! and wiring, the simulator's messages); no crate may depend on it, and it is never published.
//!
//! # Running
//!
//! ```text
//! cargo xtask bench [--quick]                                              # all, JSON too
//! cargo xtask bench [--quick] --sm-protocol 9.1                            # the same, Aos 9.1
//! cargo bench -p smcontroller-bench --bench controller                       # all scenarios
//! cargo bench -p smcontroller-bench --bench controller -- sync-rtt floor     # some of them
//! cargo bench -p smcontroller-bench --bench controller -- churn --cycles 100000
//! ```
//!
//! Options (after `--`): scenario names (`sync-rtt`, `telemetry`, `scale`, `idle`, `churn`,
//! `floor`, `mtls-rtt`, `mtls-telemetry`, `handshakes`, `handshakes-pkcs11`, `renewal-storm`;
//! none means all), `--json PATH` (the figures as
//! `{"sm_protocol","figures":[{"id","name","value","target","pass","unit","sm_protocol",..}..]}`,
//! with the machine, the counts and whether the run was quick), `--sm-protocol 9.0|9.1` (the
//! revision of `servicemanager.v5` the controller and the SMs speak, default 9.0; under 9.1 the
//! JSON goes to PATH with `-9.1` before its extension, `target/bench/results-9.1.json` from
//! `cargo xtask bench`), `--quick` (smaller counts: 5,000 sync calls, 3,000 messages per
//! telemetry node, 3,000 handshakes; churn keeps its 200,000 cycles, which N-LEAK-2 needs; the
//! whole run in about 3 minutes on 2 cores), `--cycles N` (churn connect/register/disconnect
//! cycles, default 200,000 as N-LEAK-2 asks, about 60 s here), `--scale-nodes N` (default 10,000), `--rtt-calls N` (default 20,000),
//! `--telemetry-per-node N` (default 20,000 messages per node), `--handshakes N` (default
//! 10,000), `--storm-nodes N` (default 1,000), `--idle-seconds N` (how long `idle` measures,
//! default 60, in quick runs too, which therefore take a minute longer), `--no-pin` (the
//! floor's latency process and its SM processes left where the kernel puts them, instead of on
//! a CPU each: see `controller/pin.rs`).
//!
//! The bench prints figures; it asserts nothing about speed. It exits non-zero only when a
//! scenario could not run (nodes failed to register, a process died, a deadline passed).
//!
//! # How it is built
//!
//! Three kinds of process, all this same executable:
//!
//! - the orchestrator (what `cargo bench` starts) runs each scenario in a process of its own, so
//!   the memory and CPU figures of one scenario are not coloured by the one before, and prints
//!   the summary table at the end;
//! - a scenario process (`--scenario NAME`) holds the server under test only: the router
//!   (`smcontroller_routing::Controller`) behind the insecure tonic server
//!   (`smcontroller_grpc::server::serve_insecure`) or the mTLS one (`smcontroller_grpc::tls::
//!   serve_tls`, credentials from files through `FileCertProvider` and `CredentialsReloader`),
//!   with the daemon's default settings (`smProtocol` from `--sm-protocol`; under 9.1 no network
//!   provider is attached, so `NetworkService` is not served: nothing here calls it) and
//!   receivers that only count with atomics; or, for the floor, the bare relay
//!   (`controller/relay.rs`, revision-free). Its resident memory (VmRSS) and CPU time
//!   (`/proc/self/stat`) are therefore the server's, plus the bench's own small driver;
//! - an SM process (`--sm-child URL`) holds the simulated SMs: a lean client written here (not
//!   `smcontroller_sim::Simulator`, whose per-node producer tasks, event bus and stats would
//!   share the two cores with the controller). Each node has its own TCP connection (tonic
//!   `Channel`), calls `RegisterSM`, sends `sm_info` and `node_instances_status` (built by
//!   `smcontroller_sim::messages`), answers `get_node_config_status` and keeps the last
//!   `connection_status`. Under 9.1 it is the 9.1 `SMService` client, whose commands are moved
//!   into the 9.0 envelope as they arrive (`Commands`), so the rest is shared; against the bare
//!   relay too (its `get_node_config_status` is the same bytes in both). Under mTLS
//!   (`--pki DIR`) every node presents the same client certificate and each connection builds
//!   a fresh rustls client (no session resumption). The scenario process drives it with
//!   one-line commands on its stdin (`connect`, `burst`, `arm_cloud`, `await_cloud`,
//!   `reconnect`, `reconnects`, `keepalive`, `handshakes`, `close`, `quit`).
//!
//! Both processes run a multi-thread tokio runtime with 2 workers, on a 2-core machine: the SMs
//! and the controller compete for the same cores, as they would not in production, so every
//! throughput figure here is a lower bound of the controller's own.
//!
//! # Scenarios
//!
//! - `sync-rtt` (N-PERF-1): 1,000 SMs; `get_node_config_status` called through the
//!   `NodeConfigHandler` trait of the controller, from a task on the controller's runtime: api
//!   call -> router -> gRPC over loopback -> SM process -> reply -> caller. First one at a time
//!   (round robin over the nodes), then 64 callers at once. Prints p50/p90/p99/max and calls/s.
//! - `telemetry` (N-PERF-2): 100 SMs each send N `instant_monitoring` as fast as HTTP/2 flow
//!   control allows (bounded by count and by 20 s); the receivers count. Prints messages/s into
//!   the receivers, from the first message received to the last, and the CPU time of both
//!   processes during the burst.
//! - `scale` (N-SCALE-1): N SMs (default 10,000), each on its own connection, connecting with at
//!   most 512 connection attempts in flight; time until the receivers heard every
//!   `on_node_connected`; VmRSS of the controller process before and after, per node; then
//!   `set_cloud_connected(true)` and back to `false`: time until every SM has received its
//!   `connection_status` (the SM process counts the nodes whose last status is the wanted one
//!   and answers as soon as all are). Also a short sync-call sample at that scale.
//! - `idle` (N-IDLE): 100 SMs connect and register, then send nothing at all (the SM process
//!   turns its HTTP/2 keepalive pings off for them: `keepalive 0`, like an SM whose stream is
//!   open and quiet); the controller process's CPU time over `--idle-seconds` (default 60 s) as
//!   % of one core and ms of CPU per second (target: at most 1 % of a core), its context
//!   switches per second (how often its threads wake), and its VmRSS before any SM connected
//!   and with the 100 idle. What still runs is the server's own HTTP/2 keepalive: a PING to
//!   each connection every `keepaliveInterval` (10 s), i.e. 10 PINGs a second for 100 nodes.
//! - `churn` (N-LEAK-1, N-LEAK-2): rounds of 100 SMs that connect, register, and close their
//!   streams (same node ids every round, as a rebooting SM would), until `--cycles` connects
//!   (default 200,000, also with `--quick`; bounded to 300 s), with the daemon's memory return
//!   (`memoryReturnDelay`) running as in `smcontrollerd`. VmRSS after 10 warm-up rounds
//!   (information), after 20,000 cycles and at the end, each right after the last disconnect
//!   (information) and once the freed memory was returned (the levels N-LEAK-1 and N-LEAK-2
//!   compare), and at ten checkpoints (with the slope between the first and the last); the
//!   live heap (glibc's `mallinfo2`) beside them. With the `heap-profile` feature the live
//!   heap is dhat's, and it writes the dhat profile of what is live at the end, before the
//!   server stops.
//! - `floor` (N-PERF-3): for 1, 100 and 1,000 nodes, the bare relay and the controller on the
//!   same SM load: sequential sync calls (p50/p99) to both in one process, in alternating
//!   batches (5 rounds, at least 10,000 calls each; that process on the first CPU and its SM
//!   processes on the last, `controller/pin.rs`), and VmRSS at 1,000 nodes, each in a process
//!   of its own (3 rounds). The orchestrator prints each controller figure over its
//!   floor, the median of the rounds' ratios.
//! - `mtls-rtt`, `mtls-telemetry`: `sync-rtt` and `telemetry` over mTLS.
//! - `handshakes` (N-TLS-1): 32 raw clients open new connections (TCP, a full TLS 1.3
//!   handshake with ECDSA P-256 certificates and the client certificate, then the HTTP/2 preface
//!   until the server's SETTINGS frame, which it sends only after verifying the client) until
//!   `--handshakes` are done or 30 s pass; handshakes per second.
//! - `handshakes-pkcs11` (R-TLS-5): the same burst with the server key in a SoftHSM2 token
//!   (every signature made by the token), beside a burst with the key in a file, one after the
//!   other in one process; both rates and their ratio. Needs SoftHSM2 (Debian `softhsm2`).
//! - `renewal-storm` (N-TLS-1): 1,000 SMs over mTLS that register again at once on a new
//!   connection when their stream ends; the server's certificate and key files are replaced
//!   (the file provider polls every 20 ms here, [`PROVIDER_POLL`]); time from the replacement
//!   (and from the renewal notice) until every SM is registered again, which can only be on a
//!   connection handshaken after the notice, i.e. on the new certificate (a new handshake is
//!   checked to serve it); the controller's peak VmRSS during the storm (sampled every 2 ms,
//!   and VmHWM after resetting it through `/proc/self/clear_refs`).

#[path = "controller/hostile.rs"]
mod hostile;
#[path = "controller/pin.rs"]
mod pin;
#[path = "controller/relay.rs"]
mod relay;
#[path = "controller/tls.rs"]
mod tls;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader as StdBufReader},
    process::{ExitCode, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use async_trait::async_trait;
use smcontroller_api::{
    Alert, AlertsReceiver, DisconnectReason, EnvVarsStatusSender, InstanceEnvVarsStatus,
    InstanceStatus as ApiInstanceStatus, InstanceStatusReceiver, LogPart, LogSender,
    MonitoringReceiver, NodeConfigHandler, NodeId, NodeMonitoringData, SmInfo, SmInfoReceiver,
    SmProtocol,
};
use smcontroller_daemon::{
    app::{self, NoBlobStore},
    config::Settings,
    memory::MemoryReturn,
};
use smcontroller_grpc::{
    connections::Connections,
    proto::{
        servicemanager::v5::{
            InstanceStatus, SmIncomingMessages, SmOutgoingMessages,
            sm_incoming_messages::SmIncomingMessage, sm_service_client::SmServiceClient,
        },
        v91::servicemanager::v5::{
            SmIncomingMessages as SmIncomingMessages91,
            sm_service_client::SmServiceClient as SmServiceClient91,
        },
    },
    server::{self, ServeError},
    tls as tls_server,
};
use smcontroller_routing::{Controller, Receivers};
use smcontroller_sim::messages;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    process::{Child, ChildStdin, ChildStdout},
    sync::{Notify, Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// Tokio workers of every process of the bench.
const WORKERS: usize = 2;
/// Every process of the bench exits by itself after this long.
const PROCESS_LIMIT: Duration = Duration::from_secs(600);
/// Nodes of `sync-rtt`.
const RTT_NODES: usize = 1_000;
/// Concurrent callers of the second half of `sync-rtt`.
const RTT_CALLERS: usize = 64;
/// Nodes of `telemetry`.
const TELEMETRY_NODES: usize = 100;
/// Longest a telemetry burst may run.
const TELEMETRY_LIMIT: Duration = Duration::from_secs(20);
/// Nodes per churn round.
const CHURN_NODES: usize = 100;
/// Warm-up rounds of `churn` before its baseline.
const CHURN_WARMUP_ROUNDS: usize = 10;
/// Longest the churn rounds may run altogether (200,000 cycles take 50-70 s here).
const CHURN_LIMIT: Duration = Duration::from_secs(300);
/// Cycles after which `churn` takes the reference level of N-LEAK-2.
const CHURN_REFERENCE_CYCLES: usize = 20_000;
/// Cycles N-LEAK-2 asks for, and `churn`'s default in every run (also `--quick`).
const CHURN_LEAK2_CYCLES: usize = 200_000;
/// Connection attempts in flight in the SM process.
const CONNECT_CONCURRENCY: usize = 512;
/// Scenarios in their default order. `floor` runs `rtt:both:N`, `rtt:relay:N` and
/// `rtt:controller:N` for N in [`FLOOR_NODES`], each in a process of its own, in turn: the
/// latency process [`FLOOR_LATENCY_ROUNDS`] times, the memory processes [`FLOOR_ROUNDS`] times.
const ALL_SCENARIOS: [&str; 11] = [
    "sync-rtt",
    "telemetry",
    "scale",
    "idle",
    "churn",
    "floor",
    "mtls-rtt",
    "mtls-telemetry",
    "handshakes",
    "handshakes-pkcs11",
    "renewal-storm",
];
/// Quiet nodes of `idle`.
const IDLE_NODES: usize = 100;
/// Node counts of the floor comparison.
const FLOOR_NODES: [usize; 3] = [1, 100, 1_000];
/// Rounds of the floor: for each node count, this many times the latency process (both servers)
/// then the relay's and the controller's memory processes; each N-PERF-3 ratio is the median of
/// the rounds' ratios. Within a process the alternating batches cancel what the machine does
/// meanwhile, but not where the scheduler happened to put each server's SM process: the p99
/// ratio at 1 node still moved from 1.05 to 1.35 between two single rounds.
const FLOOR_ROUNDS: usize = 3;
/// Rounds of the floor's latency process (`rtt:both:N`), the first [`FLOOR_ROUNDS`] of them
/// beside the memory processes: at 5,000 calls and 3 rounds the quick bench's latency ratios
/// still moved by ±0.05 from one run to the next (1.01x-1.11x at 1 node) while the CPU per call
/// moved by ±0.02; more rounds of more calls narrow what the median of the rounds can land on.
const FLOOR_LATENCY_ROUNDS: usize = 5;
/// The fewest calls of each server in a floor latency process, also with `--quick`
/// (`--rtt-calls` above it is taken as it is).
const FLOOR_MIN_CALLS: usize = 10_000;
/// Sequential calls to one server before the floor's latency run turns to the other.
const FLOOR_BATCH: usize = 250;
/// SMs of the renewal storm.
const STORM_NODES: usize = 1_000;
/// How often the file provider of the mTLS scenarios looks at the server's files (the daemon's
/// default is longer; the storm is timed from the replacement of the files).
const PROVIDER_POLL: Duration = Duration::from_millis(20);
/// Prefix of the lines a scenario process prints for the JSON figures.
const FIGURE: &str = "@figure\t";
/// Prefix of the lines a scenario process prints for the summary table.
const SUMMARY: &str = "@summary\t";

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Options {
    scenarios: Vec<String>,
    cycles: usize,
    scale_nodes: usize,
    rtt_calls: usize,
    telemetry_per_node: u64,
    handshakes: usize,
    storm_nodes: usize,
    /// How long `idle` measures, seconds.
    idle_seconds: u64,
    /// Smaller counts, for a run under 2 minutes.
    quick: bool,
    /// Where the orchestrator writes the figures as JSON.
    json: Option<String>,
    /// The wire revision the controller and the SMs speak (`--sm-protocol`, default 9.0).
    sm_protocol: SmProtocol,
    /// Whether the floor's latency process and its SM processes run on a CPU each
    /// (`--no-pin` turns it off; see `controller/pin.rs`).
    pin: bool,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut options = Self {
            scenarios: Vec::new(),
            cycles: CHURN_LEAK2_CYCLES,
            scale_nodes: 10_000,
            rtt_calls: if quick { 5_000 } else { 20_000 },
            telemetry_per_node: if quick { 3_000 } else { 20_000 },
            handshakes: if quick { 3_000 } else { 10_000 },
            storm_nodes: STORM_NODES,
            idle_seconds: 60,
            quick,
            json: None,
            sm_protocol: SmProtocol::default(),
            pin: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut text = |name: &str| -> anyhow::Result<String> {
                args.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            let mut value = |name: &str| -> anyhow::Result<u64> {
                let v = text(name)?;
                v.parse()
                    .with_context(|| format!("{name} {v}: not a number"))
            };
            match arg.as_str() {
                // cargo passes `--bench` to every bench executable.
                "--bench" | "--quick" => {}
                "--no-pin" => options.pin = false,
                "--cycles" => options.cycles = usize::try_from(value(arg)?)?,
                "--scale-nodes" => options.scale_nodes = usize::try_from(value(arg)?)?,
                "--rtt-calls" => options.rtt_calls = usize::try_from(value(arg)?)?,
                "--telemetry-per-node" => options.telemetry_per_node = value(arg)?,
                "--handshakes" => options.handshakes = usize::try_from(value(arg)?)?,
                "--storm-nodes" => options.storm_nodes = usize::try_from(value(arg)?)?,
                "--idle-seconds" => options.idle_seconds = value(arg)?.max(1),
                "--json" => options.json = Some(text(arg)?),
                "--sm-protocol" => {
                    options.sm_protocol = text(arg)?.parse().map_err(|e: String| anyhow!(e))?;
                }
                name if ALL_SCENARIOS.contains(&name) || name.starts_with("rtt:") => {
                    options.scenarios.push(name.to_owned());
                }
                other => bail!(
                    "unknown argument {other:?}; scenarios: {ALL_SCENARIOS:?}, options: \
                     --quick, --json PATH, --sm-protocol 9.0|9.1, --cycles N, --scale-nodes N, \
                     --rtt-calls N, --telemetry-per-node N, --handshakes N, --storm-nodes N, \
                     --idle-seconds N, --no-pin"
                ),
            }
        }
        if options.scenarios.is_empty() {
            options.scenarios = ALL_SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
        }
        Ok(options)
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--cycles".into(),
            self.cycles.to_string(),
            "--scale-nodes".into(),
            self.scale_nodes.to_string(),
            "--rtt-calls".into(),
            self.rtt_calls.to_string(),
            "--telemetry-per-node".into(),
            self.telemetry_per_node.to_string(),
            "--handshakes".into(),
            self.handshakes.to_string(),
            "--storm-nodes".into(),
            self.storm_nodes.to_string(),
            "--idle-seconds".into(),
            self.idle_seconds.to_string(),
            "--sm-protocol".into(),
            self.sm_protocol.to_string(),
        ];
        if self.quick {
            args.push("--quick".into());
        }
        if !self.pin {
            args.push("--no-pin".into());
        }
        args
    }

    /// Where the figures go: `--json PATH` as given under 9.0; under another revision the same
    /// path with `-REVISION` before its extension (`results.json` -> `results-9.1.json`), so
    /// `cargo xtask bench --sm-protocol 9.1` keeps the 9.0 figures beside its own. A path that
    /// already ends so is kept.
    fn json_path(&self) -> Option<std::path::PathBuf> {
        let path = std::path::PathBuf::from(self.json.as_ref()?);
        if self.sm_protocol == SmProtocol::V9_0 {
            return Some(path);
        }
        let suffix = format!("-{}", self.sm_protocol);
        let stem = path.file_stem()?.to_string_lossy().into_owned();
        if stem.ends_with(&suffix) {
            return Some(path);
        }
        let name = match path.extension() {
            Some(ext) => format!("{stem}{suffix}.{}", ext.to_string_lossy()),
            None => format!("{stem}{suffix}"),
        };
        Some(path.with_file_name(name))
    }

    /// The counts of this run, for the JSON.
    fn counts(&self) -> serde_json::Value {
        serde_json::json!({
            "churn_cycles": self.cycles,
            "scale_nodes": self.scale_nodes,
            "rtt_calls": self.rtt_calls,
            "telemetry_per_node": self.telemetry_per_node,
            "handshakes": self.handshakes,
            "storm_nodes": self.storm_nodes,
            "idle_seconds": self.idle_seconds,
            "floor_latency_pinned": self.pin,
        })
    }
}

/// Under the `heap-profile` feature every allocation of every process of the bench goes through
/// dhat's allocator; only a scenario process starts its profiler (see [`heap_profiler`]).
#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Under the `mimalloc` feature, the whole bench allocates with mimalloc.
#[cfg(all(feature = "mimalloc", not(feature = "heap-profile")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Under the `jemalloc` feature, the whole bench allocates with jemalloc.
#[cfg(all(
    feature = "jemalloc",
    not(feature = "mimalloc"),
    not(feature = "heap-profile")
))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Under the `heap-profile` feature, the profiler of a scenario process, started by
/// [`start_heap_profile`] and ended by [`end_heap_profile`].
#[cfg(feature = "heap-profile")]
static PROFILER: std::sync::Mutex<Option<dhat::Profiler>> = std::sync::Mutex::new(None);

/// Under the `heap-profile` feature, starts the profiler of a scenario process.
#[cfg(feature = "heap-profile")]
fn start_heap_profile(scenario: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("dhat-heap-{}.json", scenario.replace(':', "-")));
    eprintln!("heap profile of {scenario} -> {}", file.display());
    let profiler = dhat::Profiler::builder().file_name(file).build();
    *PROFILER.lock().unwrap_or_else(|e| e.into_inner()) = Some(profiler);
}

#[cfg(not(feature = "heap-profile"))]
fn start_heap_profile(_scenario: &str) {}

/// Under the `heap-profile` feature, ends the profile: what is live now is its `t-end`, by
/// allocation site. A scenario calls it while the server still runs (so what the server retains
/// is in it), else it ends with the process.
#[cfg(feature = "heap-profile")]
fn end_heap_profile() {
    let profiler = PROFILER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(profiler);
}

#[cfg(not(feature = "heap-profile"))]
fn end_heap_profile() {}

/// The bytes the program has allocated and not freed (dhat's count), under `heap-profile`.
#[cfg(feature = "heap-profile")]
fn live_heap() -> Option<u64> {
    PROFILER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|_| dhat::HeapStats::get().curr_bytes as u64)
}

/// Without dhat: what glibc says is allocated (`mallinfo2`), the same live bytes without the
/// call stacks.
#[cfg(not(feature = "heap-profile"))]
fn live_heap() -> Option<u64> {
    smcontroller_daemon::memory::heap_in_use()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--sm-child") => match args.get(1) {
            Some(url) => {
                watchdog("SM process");
                sm_child_options(&args[2..]).and_then(|(pki, protocol, cpu)| {
                    cpu.map_or(Ok(()), pin::pin_to)?;
                    runtime().and_then(|rt| rt.block_on(sm_child(url.clone(), pki, protocol)))
                })
            }
            None => Err(anyhow!("--sm-child needs the controller's URL")),
        },
        Some("--scenario") => {
            watchdog("scenario process");
            let name = args.get(1).cloned().unwrap_or_default();
            start_heap_profile(&name);
            Options::parse(&args[2.min(args.len())..])
                .inspect(|options| {
                    let _ = SM_PROTOCOL.set(options.sm_protocol);
                })
                .and_then(|options| place_floor_latency(&name, &options).map(|()| options))
                .and_then(|options| runtime().map(|rt| (rt, options)))
                .and_then(|(rt, options)| rt.block_on(run_scenario(&name, &options)))
                .inspect(|()| end_heap_profile())
        }
        // The soak under hostile peers (`controller/hostile.rs`).
        Some("--hostile-scenario") => {
            watchdog("hostile scenario process");
            let name = args.get(1).cloned().unwrap_or_default();
            runtime().and_then(|rt| rt.block_on(hostile::scenario(&name)))
        }
        Some("--hostile-attacker") => {
            watchdog("hostile attacker process");
            let (name, addr) = (args.get(1).cloned(), args.get(2).cloned());
            let (name, addr) = (name.unwrap_or_default(), addr.unwrap_or_default());
            runtime().and_then(|rt| rt.block_on(hostile::attacker(&name, &addr)))
        }
        _ if args.iter().any(|a| a == "--hostile") => hostile::orchestrate(&args),
        _ => Options::parse(&args).and_then(|options| orchestrate(&options)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The options of an SM process after its URL: `[--pki DIR] [--sm-protocol REVISION]
/// [--cpu N]`.
fn sm_child_options(
    args: &[String],
) -> anyhow::Result<(Option<std::path::PathBuf>, SmProtocol, Option<usize>)> {
    let (mut pki, mut protocol, mut cpu) = (None, SmProtocol::default(), None);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--pki" => pki = Some(std::path::PathBuf::from(value)),
            "--sm-protocol" => protocol = value.parse().map_err(|e: String| anyhow!(e))?,
            "--cpu" => {
                cpu = Some(
                    value
                        .parse()
                        .with_context(|| format!("--cpu {value}: not a CPU number"))?,
                );
            }
            other => bail!("SM process: unknown argument {other:?}"),
        }
    }
    Ok((pki, protocol, cpu))
}

/// Where this scenario process put itself and puts its SM processes: set by
/// [`place_floor_latency`] for the floor's latency process only.
static PLACEMENT: OnceLock<pin::Placement> = OnceLock::new();

/// The floor's latency process (`rtt:both:N`) runs on one CPU and has its SM processes run on
/// another, unless `--no-pin` or the machine gives it fewer than two; every other scenario is
/// left where the kernel puts it. Runs before the runtime is built, so its threads inherit it.
fn place_floor_latency(name: &str, options: &Options) -> anyhow::Result<()> {
    if !name.starts_with("rtt:both:") || !options.pin {
        return Ok(());
    }
    let Some(placement) = pin::floor_placement() else {
        println!("fewer than two CPUs to run on: the latency process is not pinned");
        return Ok(());
    };
    pin::pin_to(placement.server)?;
    let _ = PLACEMENT.set(placement);
    Ok(())
}

/// The wire revision of this scenario process (`--sm-protocol`, set once from its options):
/// the controllers it starts speak it, and so do their SM processes.
static SM_PROTOCOL: OnceLock<SmProtocol> = OnceLock::new();

fn sm_protocol() -> SmProtocol {
    SM_PROTOCOL.get().copied().unwrap_or_default()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()?)
}

/// Ends the process after [`PROCESS_LIMIT`] whatever happens: every run is bounded.
fn watchdog(what: &'static str) {
    std::thread::spawn(move || {
        std::thread::sleep(PROCESS_LIMIT);
        eprintln!("{what}: still running after {PROCESS_LIMIT:?}; giving up");
        std::process::exit(3);
    });
}

/// The processes a scenario name stands for, each with its round of the floor.
fn expand(name: &str) -> Vec<(String, Option<usize>)> {
    if name == "floor" {
        FLOOR_NODES
            .iter()
            .flat_map(|n| {
                (0..FLOOR_LATENCY_ROUNDS).flat_map(move |round| {
                    let memory = (round < FLOOR_ROUNDS).then(|| {
                        [
                            (format!("rtt:relay:{n}"), Some(round)),
                            (format!("rtt:controller:{n}"), Some(round)),
                        ]
                    });
                    std::iter::once((format!("rtt:both:{n}"), Some(round)))
                        .chain(memory.into_iter().flatten())
                })
            })
            .collect()
    } else {
        vec![(name.to_owned(), None)]
    }
}

/// Runs each scenario in a process of its own, then prints the summary table, the floor ratios
/// and, with `--json`, writes the figures.
fn orchestrate(options: &Options) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let run_started = Instant::now();
    println!(
        "SM controller bench: {} cores seen, tokio {WORKERS} workers per process; SM wire \
         revision {} (servicemanager.v5); scenarios: {}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        options.sm_protocol,
        options.scenarios.join(", "),
        if options.quick {
            format!(
                "\nQUICK run: smaller counts ({})",
                options.counts().to_string().replace('"', "")
            )
        } else {
            String::new()
        }
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut figures: Vec<serde_json::Value> = Vec::new();
    let mut failed = Vec::new();
    for (name, round) in options.scenarios.iter().flat_map(|n| expand(n)) {
        match round {
            Some(round) => {
                let of = if name.starts_with("rtt:both") {
                    FLOOR_LATENCY_ROUNDS
                } else {
                    FLOOR_ROUNDS
                };
                println!("\n=== {name} (round {} of {of}) ===", round + 1);
            }
            None => println!("\n=== {name} ==="),
        }
        let started = Instant::now();
        let mut child = std::process::Command::new(&exe)
            .arg("--scenario")
            .arg(&name)
            .args(options.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let stdout = child.stdout.take().context("scenario stdout")?;
        for line in StdBufReader::new(stdout).lines() {
            let line = line?;
            if let Some(row) = line.strip_prefix(SUMMARY) {
                // The floor's rows of the first round stand for the others (the ratios below
                // are over all rounds).
                if round.unwrap_or(0) == 0 {
                    rows.push(row.split('\t').map(str::to_owned).collect());
                }
            } else if let Some(json) = line.strip_prefix(FIGURE) {
                let mut figure: serde_json::Value =
                    serde_json::from_str(json).context("a figure line")?;
                figure["sm_protocol"] = options.sm_protocol.as_str().into();
                if let Some(round) = round {
                    figure["round"] = round.into();
                }
                figures.push(figure);
            } else {
                println!("{line}");
            }
        }
        let status = child.wait()?;
        println!("({name} took {:.1} s)", started.elapsed().as_secs_f64());
        if !status.success() {
            failed.push(format!("{name} ({status})"));
            rows.push(vec![
                name.clone(),
                "-".into(),
                "-".into(),
                format!("scenario failed: {status}"),
                "-".into(),
            ]);
        }
    }
    let mut ratios = floor_ratios(&figures);
    for ratio in &mut ratios {
        rows.push(ratio_row(ratio));
        ratio["sm_protocol"] = options.sm_protocol.as_str().into();
    }
    figures.extend(ratios);
    print_table(&rows, options.sm_protocol);
    println!(
        "\nwhole run: {:.1} s{}, SM wire revision {}",
        run_started.elapsed().as_secs_f64(),
        if options.quick { " (quick)" } else { "" },
        options.sm_protocol
    );
    if let Some(path) = options.json_path() {
        let path = path.as_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let document = serde_json::json!({
            "sm_protocol": options.sm_protocol.as_str(),
            "quick": options.quick,
            "counts": options.counts(),
            "scenarios": options.scenarios,
            "failed": failed,
            "machine": machine(),
            "run_seconds": run_started.elapsed().as_secs_f64(),
            "figures": figures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    ensure!(
        failed.is_empty(),
        "scenarios that could not run: {}",
        failed.join(", ")
    );
    Ok(())
}

/// nproc, memory and kernel of this machine.
fn machine() -> serde_json::Value {
    let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "mem_total_mib": mem_total_kib / 1024,
        "kernel": kernel,
    })
}

/// The N-PERF-3 ratios: each `controller_*` figure of the floor runs over its `relay_*` twin
/// of the same round, the median over the rounds (with the median of each side beside it).
fn floor_ratios(figures: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let by_round = |name: &str| -> Vec<(u64, f64)> {
        figures
            .iter()
            .filter(|f| f["name"] == name)
            .filter_map(|f| Some((f["round"].as_u64().unwrap_or(0), f["value"].as_f64()?)))
            .collect()
    };
    let median = |mut values: Vec<f64>| -> Option<f64> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        })
    };
    let mut out = Vec::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for n in FLOOR_NODES {
        for q in ["p50", "p99"] {
            pairs.push((
                format!("sync_{q}_{n}_nodes"),
                format!("sync_{q}_ratio_{n}_nodes"),
            ));
        }
    }
    pairs.push(("rss_1000_nodes".into(), "rss_ratio_1000_nodes".into()));
    pairs.push((
        "rss_per_node_1000_nodes".into(),
        "rss_per_node_ratio_1000_nodes".into(),
    ));
    for (measured, ratio_name) in pairs {
        let controllers = by_round(&format!("controller_{measured}"));
        let relays = by_round(&format!("relay_{measured}"));
        let ratios: Vec<f64> = controllers
            .iter()
            .filter_map(|(round, c)| {
                let (_, r) = relays.iter().find(|(rr, _)| rr == round)?;
                Some(c / r.max(1e-9))
            })
            .collect();
        let rounds = ratios.len();
        let (Some(ratio), Some(controller), Some(floor)) = (
            median(ratios),
            median(controllers.iter().map(|(_, v)| *v).collect()),
            median(relays.iter().map(|(_, v)| *v).collect()),
        ) else {
            continue;
        };
        let info = ratio_name.starts_with("rss_per_node");
        // N-PERF-3: 1.1x of the floor for latency, 1.05x for resident memory (revised).
        let target = if ratio_name.starts_with("rss") {
            1.05
        } else {
            1.1
        };
        let unit = figures
            .iter()
            .find(|f| f["name"] == format!("controller_{measured}"))
            .and_then(|f| f["unit"].as_str())
            .unwrap_or("")
            .to_owned();
        out.push(serde_json::json!({
            "id": "N-PERF-3",
            "name": ratio_name,
            "value": (ratio * 1000.0).round() / 1000.0,
            "target": if info { serde_json::Value::Null } else { target.into() },
            "pass": if info { serde_json::Value::Null } else { (ratio <= target).into() },
            "unit": "ratio",
            "compare": "<=",
            "measured": controller,
            "floor": floor,
            "rounds": rounds,
            "measured_unit": unit,
        }));
    }
    out
}

fn ratio_row(ratio: &serde_json::Value) -> Vec<String> {
    let pass = match ratio["pass"].as_bool() {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    vec![
        "N-PERF-3".into(),
        ratio["name"].as_str().unwrap_or("").to_owned(),
        match ratio["target"].as_f64() {
            Some(target) => format!("<= {target}x"),
            None => "-".into(),
        },
        format!(
            "{:.2}x ({:.1} vs floor {:.1} {}; median of {} rounds)",
            ratio["value"].as_f64().unwrap_or(f64::NAN),
            ratio["measured"].as_f64().unwrap_or(f64::NAN),
            ratio["floor"].as_f64().unwrap_or(f64::NAN),
            ratio["measured_unit"].as_str().unwrap_or(""),
            ratio["rounds"]
        ),
        pass.into(),
    ]
}

fn print_table(rows: &[Vec<String>], protocol: SmProtocol) {
    let header: Vec<String> = ["goal", "figure", "target", "measured", "within target"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mut widths = vec![0; header.len()];
    for row in std::iter::once(&header).chain(rows) {
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    println!(
        "\n=== summary (contract section 4; SM wire revision {protocol}; 2 shared cores, noisy) ==="
    );
    for (n, row) in std::iter::once(&header).chain(rows).enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .take(widths.len())
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}

/// One row of the summary table (printed by a scenario process, collected by the orchestrator).
fn summary(goal: &str, figure: &str, target: &str, measured: String, within: Option<bool>) {
    let within = match within {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    println!("{SUMMARY}{goal}\t{figure}\t{target}\t{measured}\t{within}");
}

/// How a figure is held against its target.
#[derive(Debug, Clone, Copy)]
enum Cmp {
    AtMost,
    AtLeast,
    /// The absolute value at most.
    AbsAtMost,
}

/// One entry of `results.json` (printed by a scenario process, collected by the orchestrator).
struct Figure {
    json: serde_json::Map<String, serde_json::Value>,
}

impl Figure {
    fn new(id: &str, name: &str, value: f64, unit: &str) -> Self {
        let mut json = serde_json::Map::new();
        json.insert("id".into(), id.into());
        json.insert("name".into(), name.into());
        let rounded = (value * 1000.0).round() / 1000.0;
        json.insert(
            "value".into(),
            serde_json::Number::from_f64(rounded).map_or(serde_json::Value::Null, Into::into),
        );
        json.insert("target".into(), serde_json::Value::Null);
        json.insert("pass".into(), serde_json::Value::Null);
        json.insert("unit".into(), unit.into());
        Self { json }
    }

    fn target(mut self, cmp: Cmp, target: f64) -> Self {
        let value = self.json["value"].as_f64().unwrap_or(f64::NAN);
        let pass = match cmp {
            Cmp::AtMost => value <= target,
            Cmp::AtLeast => value >= target,
            Cmp::AbsAtMost => value.abs() <= target,
        };
        self.json.insert("target".into(), target.into());
        self.json.insert("pass".into(), pass.into());
        let compare = match cmp {
            Cmp::AtMost => "<=",
            Cmp::AtLeast => ">=",
            Cmp::AbsAtMost => "abs <=",
        };
        self.json.insert("compare".into(), compare.into());
        self
    }

    fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.json.insert(key.into(), value.into());
        self
    }

    fn emit(self) {
        println!("{FIGURE}{}", serde_json::Value::Object(self.json));
    }
}

async fn run_scenario(name: &str, options: &Options) -> anyhow::Result<()> {
    if let Some(rest) = name.strip_prefix("rtt:") {
        let (server, nodes) = rest.split_once(':').context("rtt:SERVER:NODES")?;
        if server == "both" {
            return floor_latency(options, nodes.parse()?).await;
        }
        let kind = match server {
            "relay" => ServerKind::Relay,
            "controller" => ServerKind::Insecure,
            other => bail!("no server {other:?}"),
        };
        return floor_point(options, kind, nodes.parse()?).await;
    }
    match name {
        "sync-rtt" => sync_rtt(options, ServerKind::Insecure).await,
        "mtls-rtt" => sync_rtt(options, ServerKind::Tls).await,
        "telemetry" => telemetry(options, ServerKind::Insecure).await,
        "mtls-telemetry" => telemetry(options, ServerKind::Tls).await,
        "scale" => scale(options).await,
        "idle" => idle(options).await,
        "churn" => churn(options).await,
        "handshakes" => tls::handshakes(options).await,
        "handshakes-pkcs11" => tls::handshakes_pkcs11(options).await,
        "renewal-storm" => tls::renewal_storm(options).await,
        other => bail!("no scenario {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The controller under test, with counting receivers
// ---------------------------------------------------------------------------------------------

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Receivers that only count (relaxed atomics), and time the monitoring.
#[derive(Debug, Default)]
struct Counting {
    connected: AtomicU64,
    disconnected: AtomicU64,
    sm_info: AtomicU64,
    snapshots: AtomicU64,
    statuses: AtomicU64,
    monitoring: AtomicU64,
    monitoring_first_ns: AtomicU64,
    monitoring_last_ns: AtomicU64,
    other: AtomicU64,
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed)
}

#[async_trait]
impl SmInfoReceiver for Counting {
    async fn on_node_connected(&self, _node: &NodeId) {
        bump(&self.connected);
    }
    async fn on_node_disconnected(&self, _node: &NodeId, _reason: &DisconnectReason) {
        bump(&self.disconnected);
    }
    async fn on_sm_info_received(&self, _info: &SmInfo) {
        bump(&self.sm_info);
    }
}

#[async_trait]
impl InstanceStatusReceiver for Counting {
    async fn on_instance_status_received(&self, _node: &NodeId, _status: &ApiInstanceStatus) {
        bump(&self.statuses);
    }
    async fn on_node_instances_statuses_received(
        &self,
        _node: &NodeId,
        _statuses: &[ApiInstanceStatus],
    ) {
        bump(&self.snapshots);
    }
}

#[async_trait]
impl EnvVarsStatusSender for Counting {
    async fn send_env_vars_statuses(&self, _node: &NodeId, _statuses: &[InstanceEnvVarsStatus]) {
        bump(&self.other);
    }
}

#[async_trait]
impl MonitoringReceiver for Counting {
    async fn on_monitoring_received(&self, _node: &NodeId, _data: &NodeMonitoringData) {
        let before = bump(&self.monitoring);
        let now = now_ns();
        if before == 0 {
            self.monitoring_first_ns.store(now, Ordering::Relaxed);
        }
        self.monitoring_last_ns.fetch_max(now, Ordering::Relaxed);
    }
}

#[async_trait]
impl AlertsReceiver for Counting {
    async fn on_alert_received(&self, _node: &NodeId, _alert: &Alert) {
        bump(&self.other);
    }
}

#[async_trait]
impl LogSender for Counting {
    async fn send_log(&self, _part: &LogPart) {
        bump(&self.other);
    }
}

/// What a scenario process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    /// The controller behind its insecure server.
    Insecure,
    /// The controller behind its mTLS server, with credentials from files.
    Tls,
    /// The bare relay of N-PERF-3 behind the same insecure transport.
    Relay,
}

impl ServerKind {
    fn label(self) -> &'static str {
        match self {
            Self::Insecure => "controller",
            Self::Tls => "controller over mTLS",
            Self::Relay => "bare relay",
        }
    }
}

/// Who answers sync calls.
#[derive(Clone)]
enum Target {
    Controller(Controller),
    Relay(Arc<relay::Relay>),
}

impl Target {
    /// One `get_node_config_status` round trip; whether it succeeded.
    async fn config_status(&self, node: &NodeId) -> bool {
        match self {
            Self::Controller(c) => c.get_node_config_status(node).await.is_ok(),
            Self::Relay(r) => r.get_node_config_status(node.as_str()).await.is_some(),
        }
    }

    fn node_count(&self) -> usize {
        match self {
            Self::Controller(c) => c.node_count(),
            Self::Relay(r) => r.node_count(),
        }
    }
}

/// The server under test, serving on a loopback port.
struct Harness {
    target: Target,
    url: String,
    counts: Arc<Counting>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServeError>>,
    /// The PKI and the server's credential files, with mTLS.
    tls: Option<tls::ServerFiles>,
    /// The wire revision of the controller, which its SM processes speak too (the bare relay
    /// has none: its one command, `get_node_config_status`, is the same bytes in both).
    protocol: SmProtocol,
}

impl Harness {
    /// The controller wired as `app::start` does, with the daemon's default settings, the
    /// revision of this process ([`sm_protocol`]) and counting receivers; insecure.
    async fn start() -> anyhow::Result<Self> {
        Self::start_kind(ServerKind::Insecure).await
    }

    async fn start_kind(kind: ServerKind) -> anyhow::Result<Self> {
        // The daemon's defaults, but for the budgets that would refuse the scale scenario's
        // 10,000 nodes on as many connections at once (defaults 4,096 and 1,024).
        Self::start_with(
            kind,
            Settings {
                max_nodes: 16_384,
                max_pending_streams: 16_384,
                max_connections: 16_384,
                sm_protocol: sm_protocol(),
                ..Settings::default()
            },
        )
        .await
    }

    /// The controller with the daemon's settings `settings` (listening on a free loopback
    /// port, insecure unless `kind` says mTLS): the hostile-peer soak runs on the daemon's
    /// own budgets.
    async fn start_with(kind: ServerKind, settings: Settings) -> anyhow::Result<Self> {
        let settings = Settings {
            listen: "127.0.0.1:0".parse()?,
            insecure: true,
            ..settings
        };
        let counts = Arc::new(Counting::default());
        let listener = server::bind_with_backlog(settings.listen, settings.listen_backlog)?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let stopped = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let (target, server, tls) = match kind {
            ServerKind::Relay => {
                let relay = relay::Relay::new(counts.clone());
                let server = tokio::spawn(relay::serve(
                    listener,
                    relay.clone(),
                    app::server_settings(&settings),
                    stopped,
                ));
                (Target::Relay(relay), server, None)
            }
            ServerKind::Insecure | ServerKind::Tls => {
                let controller = Controller::new(
                    app::router_settings(&settings),
                    Receivers::all(counts.clone()),
                );
                if kind == ServerKind::Tls {
                    let files = tls::ServerFiles::new().await?;
                    let server = tokio::spawn(tls_server::serve_tls(
                        listener,
                        controller.clone(),
                        Arc::new(NoBlobStore),
                        app::server_settings(&settings),
                        tls_server::Tls {
                            credentials: files.reloader.subscribe(),
                            settings: app::tls_settings(&settings),
                        },
                        Connections::new(),
                        stopped,
                    ));
                    (Target::Controller(controller), server, Some(files))
                } else {
                    let server = tokio::spawn(server::serve_insecure(
                        listener,
                        controller.clone(),
                        Arc::new(NoBlobStore),
                        app::server_settings(&settings),
                        stopped,
                    ));
                    (Target::Controller(controller), server, None)
                }
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Self {
            target,
            url: format!("{scheme}://{addr}"),
            counts,
            stop,
            server,
            tls,
            protocol: settings.sm_protocol,
        })
    }

    fn controller(&self) -> &Controller {
        match &self.target {
            Target::Controller(c) => c,
            Target::Relay(_) => panic!("the bare relay has no controller"),
        }
    }

    /// The daemon's memory return over this controller, with the daemon's default delay
    /// (`memoryReturnDelay`, as `app::start` runs it).
    fn memory_return(&self) -> MemoryReturn {
        MemoryReturn::spawn(
            self.controller().clone(),
            smcontroller_daemon::memory::DEFAULT_MEMORY_RETURN_DELAY,
        )
    }

    /// Waits until `memory` has returned what every stream ended so far freed (with a
    /// deadline); the time it took.
    async fn memory_returned(&self, memory: &MemoryReturn) -> anyhow::Result<Duration> {
        let ended = self.controller().streams_ended();
        let started = Instant::now();
        while memory.covered() < ended {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no memory return after {ended} streams ended ({} returns, the last after {} \
                 ended)",
                memory.returns(),
                memory.covered()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(started.elapsed())
    }

    /// The SM process for this server (with the client PKI under mTLS), speaking its revision.
    async fn sm_process(&self) -> anyhow::Result<SmProcess> {
        SmProcess::spawn(
            &self.url,
            self.tls.as_ref().map(|t| t.dir.path()),
            self.protocol,
        )
        .await
    }

    /// Waits until `counter` reaches `want` (polled every millisecond); the time it took.
    async fn wait_count(
        &self,
        what: &str,
        counter: impl Fn(&Counting) -> u64,
        want: u64,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while counter(&self.counts) < want {
            if started.elapsed() > deadline {
                bail!(
                    "{what}: {} of {want} after {deadline:?}",
                    counter(&self.counts)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(started.elapsed())
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Target::Controller(controller) = &self.target {
            controller.shutdown().await;
        }
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process figures from /proc
// ---------------------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_field(pid: Option<u32>, field: &str) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// CPU time of this process's threads so far, nanoseconds: the sum of the on-CPU times in
/// `/proc/self/task/*/schedstat` (exact, where `getrusage` counts in clock ticks here). A
/// thread that has exited is no longer counted; the runtimes' workers live as long as the
/// scenario.
fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident memory in bytes (`VmRSS`).
fn rss(pid: Option<u32>) -> u64 {
    proc_status_field(pid, "VmRSS:") * 1024
}

/// This process's resident memory in two parts, bytes: anonymous (heap, stacks) and
/// file-backed (the pages of the binary and libraries it has touched).
fn rss_split() -> (u64, u64) {
    (
        proc_status_field(None, "RssAnon:") * 1024,
        proc_status_field(None, "RssFile:") * 1024,
    )
}

/// [`rss_split`] in words.
fn split_text() -> String {
    let (anon, file) = rss_split();
    format!(
        "anonymous {:.2} MiB, file-backed {:.2} MiB",
        mib(anon),
        mib(file)
    )
}

/// OS threads of the process.
fn threads(pid: Option<u32>) -> u64 {
    proc_status_field(pid, "Threads:")
}

/// User + system CPU time of the whole process (all threads), from `/proc/<pid>/stat`, at the
/// kernel's 100 ticks per second (`getconf CLK_TCK` is 100 here): 10 ms resolution.
fn cpu_time(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let ticks = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            let rest = &text[text.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat(5), counted from `state` (field 3).
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// CPU time of the controller process and the SM process over a phase.
struct CpuMeter {
    sm_pid: u32,
    wall: Instant,
    controller: Duration,
    sm: Duration,
}

impl CpuMeter {
    fn start(sm_pid: u32) -> Self {
        Self {
            sm_pid,
            wall: Instant::now(),
            controller: cpu_time(None),
            sm: cpu_time(Some(sm_pid)),
        }
    }

    /// (wall, controller CPU, SM CPU) since start.
    fn read(&self) -> (Duration, Duration, Duration) {
        (
            self.wall.elapsed(),
            cpu_time(None).saturating_sub(self.controller),
            cpu_time(Some(self.sm_pid)).saturating_sub(self.sm),
        )
    }

    fn describe(&self) -> String {
        let (wall, controller, sm) = self.read();
        let cores = |cpu: Duration| cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
        format!(
            "wall {:.2} s; CPU controller process {:.2} s ({:.2} cores), SM process {:.2} s \
             ({:.2} cores)",
            wall.as_secs_f64(),
            controller.as_secs_f64(),
            cores(controller),
            sm.as_secs_f64(),
            cores(sm)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Latency statistics
// ---------------------------------------------------------------------------------------------

struct Latencies {
    sorted_ns: Vec<u64>,
}

impl Latencies {
    fn new(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        Self { sorted_ns: ns }
    }

    /// The `p`-quantile (nearest rank), in µs.
    fn quantile_us(&self, p: f64) -> f64 {
        if self.sorted_ns.is_empty() {
            return f64::NAN;
        }
        let rank = (p * self.sorted_ns.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.sorted_ns.len()) - 1;
        self.sorted_ns[index] as f64 / 1_000.0
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs (n = {})",
            self.quantile_us(0.50),
            self.quantile_us(0.90),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.quantile_us(1.0),
            self.sorted_ns.len()
        )
    }
}

/// `calls` sync calls by `callers` concurrent tasks on the controller's runtime, node `i` of
/// caller `c`'s `k`-th call being `(c + k * callers) % nodes`. Returns the latencies, the errors
/// and the wall time.
async fn sync_calls(
    target: &Target,
    ids: &Arc<Vec<NodeId>>,
    calls: usize,
    callers: usize,
) -> anyhow::Result<(Latencies, usize, Duration)> {
    let started = Instant::now();
    let tasks: Vec<JoinHandle<(Vec<u64>, usize)>> = (0..callers)
        .map(|c| {
            let target = target.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut ns = Vec::with_capacity(calls / callers + 1);
                let mut errors = 0;
                let mut k = 0;
                while c + k * callers < calls {
                    let node = &ids[(c + k * callers) % ids.len()];
                    let t = Instant::now();
                    let ok = target.config_status(node).await;
                    ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    if !ok {
                        errors += 1;
                    }
                    k += 1;
                }
                (ns, errors)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(calls);
    let mut errors = 0;
    for task in tasks {
        let (ns, e) = task.await?;
        all.extend(ns);
        errors += e;
    }
    Ok((Latencies::new(all), errors, started.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// The controller, plus an SM process with `nodes` registered SMs named `{prefix}-{i}`.
async fn setup(
    kind: ServerKind,
    prefix: &str,
    nodes: usize,
) -> anyhow::Result<(Harness, SmProcess)> {
    let harness = Harness::start_kind(kind).await?;
    let mut sm = harness.sm_process().await?;
    let started = Instant::now();
    let reply = connect_all(&harness, &mut sm, prefix, nodes).await?;
    println!(
        "{nodes} SMs registered with the {} ({}) in {:.2} s (SM process: {})",
        kind.label(),
        harness.protocol,
        started.elapsed().as_secs_f64(),
        reply.join(" ")
    );
    Ok((harness, sm))
}

fn node_ids(prefix: &str, nodes: usize) -> Arc<Vec<NodeId>> {
    Arc::new(
        (0..nodes)
            .map(|i| NodeId::new(format!("{prefix}-{i}")))
            .collect(),
    )
}

async fn sync_rtt(options: &Options, kind: ServerKind) -> anyhow::Result<()> {
    let (harness, sm) = setup(kind, "rtt", RTT_NODES).await?;
    let ids = node_ids("rtt", RTT_NODES);
    let controller = harness.target.clone();
    let mtls = kind == ServerKind::Tls;
    let (prefix, how) = if mtls { ("mtls_", ", mTLS") } else { ("", "") };

    // Warm-up: one call per node.
    let (_, errors, _) = sync_calls(&controller, &ids, RTT_NODES, 1).await?;
    ensure!(errors == 0, "{errors} warm-up calls failed");

    let cpu = CpuMeter::start(sm.pid);
    let (seq, seq_errors, seq_wall) = sync_calls(&controller, &ids, options.rtt_calls, 1).await?;
    let seq_rate = options.rtt_calls as f64 / seq_wall.as_secs_f64();
    println!(
        "sequential, {} calls over {RTT_NODES} nodes: {}; {seq_rate:.0} calls/s; {seq_errors} \
         errors",
        options.rtt_calls,
        seq.describe()
    );
    println!("  {}", cpu.describe());

    let cpu = CpuMeter::start(sm.pid);
    let (conc, conc_errors, conc_wall) =
        sync_calls(&controller, &ids, options.rtt_calls, RTT_CALLERS).await?;
    let conc_rate = options.rtt_calls as f64 / conc_wall.as_secs_f64();
    println!(
        "{RTT_CALLERS} concurrent callers, {} calls: {}; {conc_rate:.0} calls/s; {conc_errors} \
         errors",
        options.rtt_calls,
        conc.describe()
    );
    println!("  {}", cpu.describe());
    println!(
        "controller process: {} threads, VmRSS {:.1} MiB",
        threads(None),
        mib(rss(None))
    );

    let (p50, p99) = (seq.quantile_us(0.5), seq.quantile_us(0.99));
    summary(
        "N-PERF-1",
        &format!("sync p50, 1,000 nodes, sequential{how}"),
        "<= 150 µs",
        format!("{p50:.0} µs"),
        Some(p50 <= 150.0),
    );
    summary(
        "N-PERF-1",
        &format!("sync p99, 1,000 nodes, sequential{how}"),
        "<= 500 µs",
        format!("{p99:.0} µs"),
        Some(p99 <= 500.0),
    );
    summary(
        "N-PERF-1",
        &format!("sync, 64 callers{how} (info)"),
        "-",
        format!(
            "{conc_rate:.0} calls/s, p50 {:.0} µs, p99 {:.0} µs",
            conc.quantile_us(0.5),
            conc.quantile_us(0.99)
        ),
        None,
    );
    let id = if mtls { "N-TLS-1" } else { "N-PERF-1" };
    for (q, value, target) in [("p50", p50, 150.0), ("p99", p99, 500.0)] {
        Figure::new(id, &format!("{prefix}sync_{q}_us"), value, "µs")
            .target(Cmp::AtMost, target)
            .with("nodes", RTT_NODES)
            .with("calls", options.rtt_calls)
            .with("mtls", mtls)
            .emit();
    }
    Figure::new(
        id,
        &format!("{prefix}sync_calls_per_s_64_callers"),
        conc_rate,
        "calls/s",
    )
    .with("p50_us", conc.quantile_us(0.5))
    .with("p99_us", conc.quantile_us(0.99))
    .emit();

    sm.quit().await;
    harness.stop().await;
    ensure!(
        seq_errors + conc_errors == 0,
        "{} sync calls failed",
        seq_errors + conc_errors
    );
    Ok(())
}

async fn telemetry(options: &Options, kind: ServerKind) -> anyhow::Result<()> {
    let (harness, mut sm) = setup(kind, "tel", TELEMETRY_NODES).await?;
    let mtls = kind == ServerKind::Tls;
    let counts = harness.counts.clone();
    counts.monitoring.store(0, Ordering::Relaxed);
    let per_node = options.telemetry_per_node;

    let cpu = CpuMeter::start(sm.pid);
    let reply = sm
        .request(
            &format!("burst {per_node} {}", TELEMETRY_LIMIT.as_millis()),
            TELEMETRY_LIMIT + Duration::from_secs(30),
        )
        .await?;
    let sent: u64 = reply
        .get(1)
        .and_then(|s| s.parse().ok())
        .context("burst reply without a count")?;
    // Everything sent has left the SM process; wait until the receivers have it all.
    let drained = harness
        .wait_count(
            "monitoring received",
            |c| c.monitoring.load(Ordering::Relaxed),
            sent,
            Duration::from_secs(30),
        )
        .await;
    let cpu_line = cpu.describe();
    let (_, controller_cpu, sm_cpu) = cpu.read();
    let received = counts.monitoring.load(Ordering::Relaxed);
    let first = counts.monitoring_first_ns.load(Ordering::Relaxed);
    let last = counts.monitoring_last_ns.load(Ordering::Relaxed);
    let span = Duration::from_nanos(last.saturating_sub(first));
    let rate = received as f64 / span.as_secs_f64().max(1e-9);
    println!(
        "{TELEMETRY_NODES} SMs x {per_node} instant_monitoring: SM process sent {sent} ({}), \
         receivers got {received} in {:.3} s (first to last): {rate:.0} messages/s",
        reply.join(" "),
        span.as_secs_f64()
    );
    println!("  {cpu_line}");
    println!(
        "  controller CPU per message {:.2} µs, SM process CPU per message {:.2} µs",
        controller_cpu.as_secs_f64() * 1e6 / received.max(1) as f64,
        sm_cpu.as_secs_f64() * 1e6 / received.max(1) as f64
    );
    println!(
        "controller process: {} threads, VmRSS {:.1} MiB",
        threads(None),
        mib(rss(None))
    );
    let (how, name, target) = if mtls {
        ("mTLS", "mtls_msgs_per_s", 150_000.0)
    } else {
        ("insecure", "msgs_per_s", 200_000.0)
    };
    let cpu_per_message = controller_cpu.as_secs_f64() * 1e6 / received.max(1) as f64;
    summary(
        "N-PERF-2",
        &format!("telemetry, 100 SMs, {how}"),
        &format!(">= {target:.0} msg/s"),
        format!("{rate:.0} msg/s"),
        Some(rate >= target),
    );
    summary(
        "N-PERF-2",
        &format!("controller CPU per message, {how} (info)"),
        "-",
        format!("{cpu_per_message:.2} µs"),
        None,
    );
    Figure::new("N-PERF-2", name, rate, "msg/s")
        .target(Cmp::AtLeast, target)
        .with("nodes", TELEMETRY_NODES)
        .with("messages", received)
        .with("controller_cpu_us_per_msg", cpu_per_message)
        .emit();
    sm.quit().await;
    harness.stop().await;
    drained.map(drop)
}

async fn scale(options: &Options) -> anyhow::Result<()> {
    let nodes = options.scale_nodes;
    let harness = Harness::start().await?;
    let memory = harness.memory_return();
    let mut sm = harness.sm_process().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss(None);
    let threads_before = threads(None);
    println!(
        "controller process before: VmRSS {:.1} MiB, {threads_before} threads",
        mib(rss_before)
    );

    let cpu = CpuMeter::start(sm.pid);
    // The clock starts as the command leaves: `wait_count` measures from its own start.
    sm.send(&format!("connect scale {nodes} {CONNECT_CONCURRENCY}"))
        .await?;
    let registered = harness
        .wait_count(
            "nodes registered",
            |c| c.connected.load(Ordering::Relaxed),
            nodes as u64,
            Duration::from_secs(120),
        )
        .await;
    let reply = sm.receive(Duration::from_secs(120)).await?;
    let registered = registered?;
    println!(
        "{nodes} SMs registered (every on_node_connected heard) in {:.2} s; SM process: {}",
        registered.as_secs_f64(),
        reply.join(" ")
    );
    println!("  {}", cpu.describe());
    ensure!(
        harness.controller().node_count() == nodes,
        "the registry holds {} nodes, not {nodes}",
        harness.controller().node_count()
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss(None);
    let per_node = rss_after.saturating_sub(rss_before) / nodes as u64;
    println!(
        "controller process with {nodes} streams: VmRSS {:.1} MiB (+{:.1} MiB, {:.1} KiB per \
         node), {} threads; SM process VmRSS {:.1} MiB",
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before)),
        per_node as f64 / 1024.0,
        threads(None),
        mib(rss(Some(sm.pid)))
    );

    // Cloud status fan-out, both ways.
    let mut fanout = Vec::new();
    for connected in [true, false] {
        let want = u8::from(connected);
        sm.request(&format!("arm_cloud {want}"), Duration::from_secs(10))
            .await?;
        let started = Instant::now();
        harness.controller().set_cloud_connected(connected);
        let call = started.elapsed();
        let reply = sm
            .request("await_cloud 10000", Duration::from_secs(15))
            .await?;
        let all = started.elapsed();
        println!(
            "set_cloud_connected({connected}): call returned after {:.1} ms; all {nodes} SMs had \
             the new connection_status after {:.1} ms (SM process: {})",
            call.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3,
            reply.join(" ")
        );
        fanout.push(all);
    }

    // A sync-call sample at this scale.
    let ids = node_ids("scale", nodes);
    let (lat, errors, wall) = sync_calls(&harness.target, &ids, 2_000, 1).await?;
    println!(
        "sync calls at {nodes} nodes, 2,000 sequential: {}; {:.0} calls/s; {errors} errors",
        lat.describe(),
        2_000.0 / wall.as_secs_f64()
    );
    let rss_peak = rss(None);

    // Everyone leaves.
    let started = Instant::now();
    sm.request("close", Duration::from_secs(60)).await?;
    let left = harness
        .wait_count(
            "nodes disconnected",
            |c| c.disconnected.load(Ordering::Relaxed),
            nodes as u64,
            Duration::from_secs(60),
        )
        .await;
    let rss_left = rss(None);
    let disconnects = started.elapsed();
    let returned = harness.memory_returned(&memory).await;
    let rss_returned = rss(None);
    println!(
        "all {nodes} streams closed by the SMs, disconnects heard after {:.2} s; controller \
         VmRSS {:.1} MiB then (peak seen {:.1} MiB), {:.1} MiB once the freed memory was \
         returned ({}); {} threads, {} nodes in the registry",
        disconnects.as_secs_f64(),
        mib(rss_left),
        mib(rss_peak),
        mib(rss_returned),
        match &returned {
            Ok(took) => format!(
                "{:.1} s later, the purge itself {:.1} ms",
                took.as_secs_f64(),
                memory.last_purge_took().as_secs_f64() * 1e3
            ),
            Err(e) => format!("{e:#}"),
        },
        threads(None),
        harness.controller().node_count()
    );
    summary(
        "N-SCALE-1",
        &format!("controller VmRSS once all {nodes} left, then returned (info)"),
        "-",
        format!(
            "{:.1} MiB, then {:.1} MiB (at start {:.1} MiB)",
            mib(rss_left),
            mib(rss_returned),
            mib(rss_before)
        ),
        None,
    );
    Figure::new("N-SCALE-1", "rss_after_all_left_mib", mib(rss_left), "MiB")
        .with("nodes", nodes)
        .with("returned_mib", mib(rss_returned))
        .with("purge_ms", memory.last_purge_took().as_secs_f64() * 1e3)
        .with("start_mib", mib(rss_before))
        .emit();

    let worst_fanout = fanout.iter().max().copied().unwrap_or_default();
    summary(
        "N-SCALE-1",
        &format!("{nodes} streams all registered"),
        "<= 10 s",
        format!("{:.2} s", registered.as_secs_f64()),
        Some(registered <= Duration::from_secs(10)),
    );
    summary(
        "N-SCALE-1",
        &format!("controller VmRSS with {nodes} streams"),
        "<= 640 MiB",
        format!("{:.1} MiB", mib(rss_after)),
        Some(rss_after <= 640 << 20),
    );
    summary(
        "N-SCALE-1",
        "VmRSS increase per node",
        "<= 64 KiB",
        format!("{:.1} KiB", per_node as f64 / 1024.0),
        Some(per_node <= 64 << 10),
    );
    summary(
        "N-SCALE-1",
        &format!("cloud status reaches all {nodes} (worst of 2)"),
        "<= 500 ms",
        format!("{:.1} ms", worst_fanout.as_secs_f64() * 1e3),
        Some(worst_fanout <= Duration::from_millis(500)),
    );
    Figure::new("N-SCALE-1", "registration_s", registered.as_secs_f64(), "s")
        .target(Cmp::AtMost, 10.0)
        .with("nodes", nodes)
        .emit();
    Figure::new("N-SCALE-1", "rss_mib", mib(rss_after), "MiB")
        .target(Cmp::AtMost, 640.0)
        .with("nodes", nodes)
        .emit();
    Figure::new(
        "N-SCALE-1",
        "rss_per_node_kib",
        per_node as f64 / 1024.0,
        "KiB",
    )
    .target(Cmp::AtMost, 64.0)
    .with("nodes", nodes)
    .emit();
    Figure::new(
        "N-SCALE-1",
        "cloud_fanout_ms",
        worst_fanout.as_secs_f64() * 1e3,
        "ms",
    )
    .target(Cmp::AtMost, 500.0)
    .with("nodes", nodes)
    .with("of", "worst of connected and disconnected")
    .emit();
    sm.quit().await;
    harness.stop().await;
    left.map(drop)
}

/// Context switches of every thread of this process so far (voluntary and not): how often its
/// threads woke up and slept again.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `idle` (N-IDLE): the controller's cost with [`IDLE_NODES`] registered SMs that send nothing
/// (no keepalive pings either): its CPU time over `--idle-seconds`, its VmRSS before any SM
/// connected and with them idle, and how often its threads woke up.
async fn idle(options: &Options) -> anyhow::Result<()> {
    let nodes = IDLE_NODES;
    let window = Duration::from_secs(options.idle_seconds);
    let harness = Harness::start().await?;
    let mut sm = harness.sm_process().await?;
    sm.request("keepalive 0", Duration::from_secs(10)).await?;
    let rss_start = rss(None);
    println!(
        "controller process before any SM connected: VmRSS {:.1} MiB, {} threads",
        mib(rss_start),
        threads(None)
    );
    let reply = connect_all(&harness, &mut sm, "idle", nodes).await?;
    println!(
        "{nodes} quiet SMs registered; SM process: {}",
        reply.join(" ")
    );
    // The registrations' own work (replies, logs) is over before the window opens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let switches = context_switches();
    let cpu = CpuMeter::start(sm.pid);
    tokio::time::sleep(window).await;
    let (wall, controller, sm_cpu) = cpu.read();
    let wakeups = context_switches().saturating_sub(switches) as f64 / wall.as_secs_f64();
    let rss_idle = rss(None);
    let ms_per_s = controller.as_secs_f64() * 1e3 / wall.as_secs_f64();
    let pct = ms_per_s / 10.0;
    let sm_pct = sm_cpu.as_secs_f64() * 100.0 / wall.as_secs_f64();
    println!(
        "{nodes} idle SMs for {:.1} s: controller process CPU {:.0} ms ({pct:.2} % of one core, \
         {ms_per_s:.2} ms/s; /proc resolution 10 ms), {wakeups:.1} context switches/s; SM \
         process CPU {:.0} ms ({sm_pct:.2} %); controller VmRSS {:.1} MiB ({:+.1} MiB since \
         the start)",
        wall.as_secs_f64(),
        controller.as_secs_f64() * 1e3,
        sm_cpu.as_secs_f64() * 1e3,
        mib(rss_idle),
        mib(rss_idle) - mib(rss_start)
    );
    ensure!(
        harness.controller().node_count() == nodes,
        "the registry holds {} nodes, not {nodes}",
        harness.controller().node_count()
    );
    summary(
        "N-IDLE",
        &format!("controller CPU, {nodes} idle SMs"),
        "<= 1 % of a core",
        format!("{pct:.2} % ({ms_per_s:.2} ms/s)"),
        Some(pct <= 1.0),
    );
    summary(
        "N-IDLE",
        "controller VmRSS at start",
        "-",
        format!("{:.1} MiB", mib(rss_start)),
        None,
    );
    summary(
        "N-IDLE",
        &format!("controller VmRSS, {nodes} idle SMs"),
        "-",
        format!("{:.1} MiB", mib(rss_idle)),
        None,
    );
    let seconds = wall.as_secs_f64();
    Figure::new("N-IDLE", "cpu_pct_of_core", pct, "%")
        .target(Cmp::AtMost, 1.0)
        .with("nodes", nodes)
        .with("seconds", seconds)
        .emit();
    Figure::new("N-IDLE", "cpu_ms_per_s", ms_per_s, "ms/s")
        .with("nodes", nodes)
        .with("seconds", seconds)
        .emit();
    Figure::new("N-IDLE", "context_switches_per_s", wakeups, "1/s")
        .with("nodes", nodes)
        .emit();
    Figure::new("N-IDLE", "rss_start_mib", mib(rss_start), "MiB").emit();
    Figure::new("N-IDLE", "rss_idle_mib", mib(rss_idle), "MiB")
        .with("nodes", nodes)
        .emit();
    Figure::new("N-IDLE", "sm_process_cpu_pct_of_core", sm_pct, "%")
        .with("nodes", nodes)
        .emit();
    sm.quit().await;
    harness.stop().await;
    Ok(())
}

/// One point of the floor comparison (N-PERF-3): `nodes` SMs on `kind` (the controller or the
/// bare relay), sequential sync calls, and the process's VmRSS before and after they connected.
/// Has the SM process connect `nodes` SMs named `prefix-N` and waits until the controller (or
/// relay) has registered them all; the SM process's reply.
async fn connect_all(
    harness: &Harness,
    sm: &mut SmProcess,
    prefix: &str,
    nodes: usize,
) -> anyhow::Result<Vec<String>> {
    let reply = sm
        .request(
            &format!("connect {prefix} {nodes} {CONNECT_CONCURRENCY}"),
            Duration::from_secs(120),
        )
        .await?;
    harness
        .wait_count(
            "nodes registered",
            |c| c.connected.load(Ordering::Relaxed),
            nodes as u64,
            Duration::from_secs(60),
        )
        .await?;
    Ok(reply)
}

/// The latency half of the floor (N-PERF-3): the relay and the controller both in this
/// process, `nodes` nodes each (an SM process each), and sequential sync calls alternating
/// between them in batches of [`FLOOR_BATCH`], the first server of each batch in turn, so that
/// whatever else the machine does at a moment falls on both alike. (Measured one process after
/// the other, the ratio of two runs moved by 15 % from one run to the next on this machine.)
/// Both servers share one CPU and their SM processes another (see [`place_floor_latency`]).
async fn floor_latency(options: &Options, nodes: usize) -> anyhow::Result<()> {
    let relay = Harness::start_kind(ServerKind::Relay).await?;
    let controller = Harness::start_kind(ServerKind::Insecure).await?;
    let mut relay_sm = relay.sm_process().await?;
    let mut controller_sm = controller.sm_process().await?;
    connect_all(&relay, &mut relay_sm, "floor", nodes).await?;
    connect_all(&controller, &mut controller_sm, "floor", nodes).await?;
    let ids = node_ids("floor", nodes);
    match PLACEMENT.get() {
        Some(p) => println!(
            "this process (both servers and the caller) on CPU {}, the SM processes on CPU {}",
            p.server, p.sm
        ),
        None => println!("not pinned: the kernel places this process and the SM processes"),
    }
    let servers = [(&relay, "relay"), (&controller, "controller")];
    for (harness, name) in servers {
        let (_, errors, _) = sync_calls(&harness.target, &ids, nodes.max(100), 1).await?;
        ensure!(errors == 0, "{errors} warm-up calls to the {name} failed");
    }
    let mut ns: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    // This process's CPU time in each server's batches: the servers and the caller, not the
    // SM processes. At one node the latency ratio amplifies a difference in CPU per call (an
    // SM thread parks more often before a slower server's next command, see BENCHMARKS.md),
    // and from one run to the next it moves by more than the effect of a cut; the CPU per call
    // is the steadier figure of what a change to the path saves.
    let mut cpu_ns = [0u64; 2];
    let batches = options.rtt_calls.max(FLOOR_MIN_CALLS).div_ceil(FLOOR_BATCH);
    for batch in 0..batches {
        // Each batch starts where the last one stopped, so every node is called.
        let start = (batch * FLOOR_BATCH) % ids.len();
        let rotated: Arc<Vec<NodeId>> =
            Arc::new(ids[start..].iter().chain(&ids[..start]).cloned().collect());
        for turn in 0..2 {
            let which = (batch + turn) % 2;
            let (harness, name) = servers[which];
            let cpu_before = process_cpu_ns();
            let (lat, errors, _) = sync_calls(&harness.target, &rotated, FLOOR_BATCH, 1).await?;
            cpu_ns[which] += process_cpu_ns().saturating_sub(cpu_before);
            ensure!(errors == 0, "{errors} sync calls to the {name} failed");
            ns[which].extend(lat.sorted_ns);
        }
    }
    let calls = batches * FLOOR_BATCH;
    for (((_, name), ns), cpu_ns) in servers.into_iter().zip(ns).zip(cpu_ns) {
        let lat = Latencies::new(ns);
        let cpu_us = cpu_ns as f64 / 1e3 / calls as f64;
        println!(
            "{name}, {nodes} nodes, {calls} sequential calls in batches of {FLOOR_BATCH} \
             alternating with the other server: {}; {cpu_us:.1} µs CPU per call in this process",
            lat.describe()
        );
        Figure::new(
            "N-PERF-3",
            &format!("{name}_cpu_per_call_{nodes}_nodes"),
            cpu_us,
            "µs",
        )
        .with("calls", calls)
        .emit();
        for (q, p) in [("p50", 0.5), ("p99", 0.99)] {
            Figure::new(
                "N-PERF-3",
                &format!("{name}_sync_{q}_{nodes}_nodes"),
                lat.quantile_us(p),
                "µs",
            )
            .with("calls", batches * FLOOR_BATCH)
            .emit();
        }
    }
    relay_sm.quit().await;
    controller_sm.quit().await;
    relay.stop().await;
    controller.stop().await;
    Ok(())
}

async fn floor_point(options: &Options, kind: ServerKind, nodes: usize) -> anyhow::Result<()> {
    let harness = Harness::start_kind(kind).await?;
    let mut sm = harness.sm_process().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss(None);
    let split_before = rss_split();
    connect_all(&harness, &mut sm, "floor", nodes).await?;
    let ids = node_ids("floor", nodes);
    let (_, errors, _) = sync_calls(&harness.target, &ids, nodes.max(100), 1).await?;
    ensure!(errors == 0, "{errors} warm-up calls failed");
    let (lat, errors, wall) = sync_calls(&harness.target, &ids, options.rtt_calls, 1).await?;
    ensure!(errors == 0, "{errors} sync calls failed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss(None);
    let split_after = rss_split();
    // Under `heap-profile`: what is live with every node connected, by allocation site.
    end_heap_profile();
    let per_node = rss_after.saturating_sub(rss_before) as f64 / nodes as f64;
    println!(
        "{} (SMs on {}), {nodes} nodes, {} sequential calls: {}; {:.0} calls/s",
        kind.label(),
        harness.protocol,
        options.rtt_calls,
        lat.describe(),
        options.rtt_calls as f64 / wall.as_secs_f64()
    );
    println!(
        "  VmRSS {:.1} MiB before the SMs connected, {:.1} MiB after ({:.1} KiB per node), {} \
         threads, {} nodes registered",
        mib(rss_before),
        mib(rss_after),
        per_node / 1024.0,
        threads(None),
        harness.target.node_count()
    );
    println!(
        "  of which anonymous {:.1} -> {:.1} MiB, file-backed (the binary's pages) {:.1} -> {:.1} \
         MiB",
        mib(split_before.0),
        mib(split_after.0),
        mib(split_before.1),
        mib(split_after.1)
    );
    let server = if kind == ServerKind::Relay {
        "relay"
    } else {
        "controller"
    };
    // The latency figures of N-PERF-3 come from `floor_latency`, both servers side by side;
    // these calls only bring the process to the state it has under calls.
    if nodes == 1_000 {
        Figure::new(
            "N-PERF-3",
            &format!("{server}_rss_{nodes}_nodes"),
            mib(rss_after),
            "MiB",
        )
        .emit();
        Figure::new(
            "N-PERF-3",
            &format!("{server}_rss_per_node_{nodes}_nodes"),
            per_node / 1024.0,
            "KiB",
        )
        .emit();
    }
    sm.quit().await;
    harness.stop().await;
    Ok(())
}

async fn churn(options: &Options) -> anyhow::Result<()> {
    let rounds = options.cycles.div_ceil(CHURN_NODES).max(1);
    let harness = Harness::start().await?;
    // As the daemon runs it: the heap departed nodes freed goes back to the OS once streams
    // stand still. N-LEAK-2's levels are taken after it, the raw levels are information.
    let memory = harness.memory_return();
    let mut sm = harness.sm_process().await?;

    // Warm-up rounds, then the baseline.
    let mut expected = 0u64;
    for w in 0..CHURN_WARMUP_ROUNDS {
        expected += CHURN_NODES as u64;
        churn_round(&harness, &mut sm, expected).await?;
        if w == 0 {
            println!(
                "after 1 warm-up round of {CHURN_NODES}: controller VmRSS {:.1} MiB",
                mib(rss(None))
            );
        }
    }
    // The checkpoints' levels are raw (taken right after a round), against the raw level
    // after the warm-up; the baselines of N-LEAK-1/2 are taken after the memory return.
    let warm = rss(None);
    harness.memory_returned(&memory).await?;
    let baseline = rss(None);
    println!(
        "baseline after {CHURN_WARMUP_ROUNDS} warm-up rounds ({} cycles): controller VmRSS \
         {:.1} MiB, {:.1} MiB once the freed memory was returned; {} threads",
        CHURN_WARMUP_ROUNDS * CHURN_NODES,
        mib(warm),
        mib(baseline),
        threads(None)
    );

    let cpu = CpuMeter::start(sm.pid);
    let started = Instant::now();
    let checkpoint = (rounds / 10).max(1);
    let reference_round = CHURN_REFERENCE_CYCLES / CHURN_NODES;
    let mut done = 0;
    // (cycles, VmRSS) at each checkpoint, for the slope; VmRSS after the reference cycles.
    let mut samples: Vec<(usize, u64)> = Vec::new();
    let mut reference = None;
    for r in 0..rounds {
        if started.elapsed() > CHURN_LIMIT {
            println!("time bound of {CHURN_LIMIT:?} reached after {r} rounds");
            break;
        }
        expected += CHURN_NODES as u64;
        churn_round(&harness, &mut sm, expected).await?;
        done = r + 1;
        if done % checkpoint != 0 && done != reference_round {
            continue;
        }
        let raw = rss(None);
        if done % checkpoint == 0 {
            samples.push((done * CHURN_NODES, raw));
            println!(
                "  after {:>6} cycles ({:5.1} s): VmRSS {:.1} MiB ({:+.1} %), {} threads{}",
                done * CHURN_NODES,
                started.elapsed().as_secs_f64(),
                mib(raw),
                (raw as f64 / warm as f64 - 1.0) * 100.0,
                threads(None),
                live_heap()
                    .map(|b| format!(", live heap {:.1} MiB", mib(b)))
                    .unwrap_or_default()
            );
        }
        if done == reference_round {
            let took = harness.memory_returned(&memory).await?;
            let level = rss(None);
            println!(
                "  reference after {CHURN_REFERENCE_CYCLES} cycles: VmRSS {:.1} MiB, {:.1} MiB \
                 once the freed memory was returned ({:.1} s after the last disconnect, the \
                 purge {:.1} ms; {}){}",
                mib(raw),
                mib(level),
                took.as_secs_f64(),
                memory.last_purge_took().as_secs_f64() * 1e3,
                split_text(),
                live_heap()
                    .map(|b| format!("; live heap {:.2} MiB", mib(b)))
                    .unwrap_or_default()
            );
            reference = Some((raw, level));
        }
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last())
        && last.0 > first.0
    {
        let slope = (last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64;
        println!(
            "  VmRSS slope from the first checkpoint to the last: {slope:+.1} bytes per cycle \
             ({:+.1} MiB per 100,000 cycles)",
            slope * 100_000.0 / (1024.0 * 1024.0)
        );
    }
    let cycles = done * CHURN_NODES;
    let wall = started.elapsed();
    println!(
        "{cycles} connect/register/disconnect cycles ({done} rounds of {CHURN_NODES}) in {:.1} \
         s: {:.0} cycles/s",
        wall.as_secs_f64(),
        cycles as f64 / wall.as_secs_f64()
    );
    println!("  {}", cpu.describe());
    let end_raw = rss(None);
    let took = harness.memory_returned(&memory).await?;
    let end = rss(None);
    let early = (end as f64 / baseline as f64 - 1.0) * 100.0;
    println!(
        "end: controller VmRSS {:.1} MiB at the last disconnect, {:.1} MiB once the freed \
         memory was returned ({:.1} s later; {}; {} returns in the run) vs {:.1} MiB after the \
         warm-up: {early:+.1} %; {} threads; connected {} / disconnected {} heard{}",
        mib(end_raw),
        mib(end),
        took.as_secs_f64(),
        split_text(),
        memory.returns(),
        mib(baseline),
        threads(None),
        harness.counts.connected.load(Ordering::Relaxed),
        harness.counts.disconnected.load(Ordering::Relaxed),
        live_heap()
            .map(|b| format!("; live heap {:.2} MiB", mib(b)))
            .unwrap_or_default()
    );
    // The level after 1,000 cycles is before glibc's per-thread arenas have reached their
    // working set (BENCHMARKS.md, "The slow leak"): information, not N-LEAK-1's baseline.
    summary(
        "N-LEAK-1",
        &format!(
            "VmRSS after {cycles} cycles vs after {} cycles (info)",
            CHURN_WARMUP_ROUNDS * CHURN_NODES
        ),
        "-",
        format!(
            "{early:+.1} % ({:.1} -> {:.1} MiB)",
            mib(baseline),
            mib(end)
        ),
        None,
    );
    Figure::new("N-LEAK-1", "rss_change_from_1k_pct", early, "%")
        .with("cycles", cycles)
        .with("baseline_after_cycles", CHURN_WARMUP_ROUNDS * CHURN_NODES)
        .with("baseline_mib", mib(baseline))
        .with("end_mib", mib(end))
        .emit();
    // Without the return: the levels the allocator leaves, which vary from run to run with
    // where its arenas settle (BENCHMARKS.md, "Returning freed memory").
    if let Some((reference_raw, _)) = reference {
        let diff = (end_raw as f64 / reference_raw as f64 - 1.0) * 100.0;
        summary(
            "N-LEAK-2",
            &format!(
                "VmRSS at the last disconnect, before the memory return, after {cycles} vs \
                 {CHURN_REFERENCE_CYCLES} cycles (info)"
            ),
            "-",
            format!(
                "{diff:+.1} % ({:.1} -> {:.1} MiB)",
                mib(reference_raw),
                mib(end_raw)
            ),
            None,
        );
        Figure::new("N-LEAK-2", "rss_change_before_return_pct", diff, "%")
            .with("cycles", cycles)
            .with("reference_mib", mib(reference_raw))
            .with("end_mib", mib(end_raw))
            .emit();
    }
    let reference = reference.map(|(_, level)| level);
    // N-LEAK-1: memory returns to its warmed-up baseline (after the reference cycles) ±10 %.
    if let Some(reference) = reference {
        let diff = (end as f64 / reference as f64 - 1.0) * 100.0;
        summary(
            "N-LEAK-1",
            &format!("VmRSS after {cycles} cycles vs baseline (after {CHURN_REFERENCE_CYCLES})"),
            "within ±10 %",
            format!(
                "{diff:+.1} % ({:.1} -> {:.1} MiB)",
                mib(reference),
                mib(end)
            ),
            Some(diff.abs() <= 10.0),
        );
        Figure::new("N-LEAK-1", "rss_change_pct", diff, "%")
            .target(Cmp::AbsAtMost, 10.0)
            .with("cycles", cycles)
            .with("baseline_after_cycles", CHURN_REFERENCE_CYCLES)
            .with("baseline_mib", mib(reference))
            .with("end_mib", mib(end))
            .emit();
    }
    // N-LEAK-2: the level after the reference cycles against the end, over the contract's
    // 200,000 cycles (a run cut short by the time bound says so and does not pass).
    match reference {
        Some(reference) => {
            let growth = (end as f64 / reference as f64 - 1.0) * 100.0;
            let complete = cycles >= CHURN_LEAK2_CYCLES;
            summary(
                "N-LEAK-2",
                &format!("VmRSS after {cycles} cycles vs after {CHURN_REFERENCE_CYCLES}"),
                "within ±5 % (200,000 cycles)",
                format!(
                    "{growth:+.1} % ({:.1} -> {:.1} MiB){}",
                    mib(reference),
                    mib(end),
                    if complete { "" } else { ", too few cycles" }
                ),
                Some(complete && growth.abs() <= 5.0),
            );
            Figure::new("N-LEAK-2", "rss_change_from_20k_pct", growth, "%")
                .target(Cmp::AbsAtMost, 5.0)
                .with("cycles", cycles)
                .with("complete", complete)
                .with("reference_after_cycles", CHURN_REFERENCE_CYCLES)
                .with("reference_mib", mib(reference))
                .with("end_mib", mib(end))
                .emit();
        }
        None => summary(
            "N-LEAK-2",
            &format!("VmRSS after {cycles} cycles vs after {CHURN_REFERENCE_CYCLES}"),
            "within ±5 % (200,000 cycles)",
            format!("not measured: {cycles} cycles"),
            Some(false),
        ),
    }
    // What the server still holds with no node connected.
    end_heap_profile();
    sm.quit().await;
    harness.stop().await;
    Ok(())
}

/// One churn round: [`CHURN_NODES`] SMs connect and register, then close their streams; returns
/// once the controller has reported every disconnect and its registry is empty.
async fn churn_round(harness: &Harness, sm: &mut SmProcess, expected: u64) -> anyhow::Result<()> {
    sm.request(
        &format!("connect churn {CHURN_NODES} {CONNECT_CONCURRENCY}"),
        Duration::from_secs(60),
    )
    .await?;
    harness
        .wait_count(
            "churn nodes registered",
            |c| c.connected.load(Ordering::Relaxed),
            expected,
            Duration::from_secs(30),
        )
        .await?;
    sm.request("close", Duration::from_secs(60)).await?;
    harness
        .wait_count(
            "churn nodes disconnected",
            |c| c.disconnected.load(Ordering::Relaxed),
            expected,
            Duration::from_secs(30),
        )
        .await?;
    let started = Instant::now();
    while harness.controller().node_count() != 0 {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "{} nodes still in the registry after every disconnect",
            harness.controller().node_count()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The SM process, seen from the scenario process
// ---------------------------------------------------------------------------------------------

/// A child process of simulated SMs, driven by line commands.
struct SmProcess {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl SmProcess {
    async fn spawn(
        url: &str,
        pki: Option<&std::path::Path>,
        protocol: SmProtocol,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut command = tokio::process::Command::new(exe);
        command.arg("--sm-child").arg(url);
        if let Some(dir) = pki {
            command.arg("--pki").arg(dir);
        }
        command.args(["--sm-protocol", protocol.as_str()]);
        if let Some(placement) = PLACEMENT.get() {
            command.args(["--cpu", &placement.sm.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the SM process")?;
        let pid = child.id().context("SM process id")?;
        let stdin = child.stdin.take().context("SM process stdin")?;
        let stdout = child.stdout.take().context("SM process stdout")?;
        let mut sm = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            pid,
        };
        sm.request("ping", Duration::from_secs(10)).await?;
        Ok(sm)
    }

    async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn receive(&mut self, deadline: Duration) -> anyhow::Result<Vec<String>> {
        let line = tokio::time::timeout(deadline, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("SM process did not answer within {deadline:?}"))??
            .context("SM process ended")?;
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if words.first().map(String::as_str) == Some("error") {
            bail!("SM process: {line}");
        }
        Ok(words)
    }

    async fn request(&mut self, command: &str, deadline: Duration) -> anyhow::Result<Vec<String>> {
        self.send(command).await?;
        self.receive(deadline)
            .await
            .with_context(|| format!("command {command:?}"))
    }

    async fn quit(mut self) {
        let _ = self.send("quit").await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The SM process itself: lean simulated SMs
// ---------------------------------------------------------------------------------------------

/// What every node of the SM process shares.
struct Fleet {
    url: String,
    /// The client side of mTLS (a fresh rustls config, hence no session resumption, for each
    /// connection), and the PKI directory it came from.
    tls: Option<(ClientTlsConfig, std::path::PathBuf)>,
    /// Which `SMService` client the nodes use: 9.0's, or 9.1's (commands in the 9.1 envelope).
    protocol: SmProtocol,
    /// Whether a node whose stream ends opens a new connection and registers again at once.
    reconnect: std::sync::atomic::AtomicBool,
    /// Whether new connections ping the controller (HTTP/2 keepalive every 10 s, also while
    /// idle); off for `idle`, whose SMs send nothing at all once registered.
    keepalive: std::sync::atomic::AtomicBool,
    reconnects: AtomicU64,
    reconnect_errors: AtomicU64,
    instances: Vec<InstanceStatus>,
    /// Nodes whose last `connection_status` said connected.
    cloud_up: AtomicUsize,
    /// The `cloud_up` value `await_cloud` waits for (`usize::MAX`: nobody waits).
    cloud_want: AtomicUsize,
    cloud_reached: Notify,
    cloud_first_ns: AtomicU64,
    cloud_last_ns: AtomicU64,
    config_requests: AtomicU64,
}

impl Fleet {
    fn cloud_changed(&self, up: usize) {
        let now = now_ns();
        self.cloud_first_ns.fetch_min(now, Ordering::Relaxed);
        self.cloud_last_ns.fetch_max(now, Ordering::Relaxed);
        if up == self.cloud_want.load(Ordering::Acquire) {
            self.cloud_reached.notify_one();
        }
    }
}

/// One simulated SM with an open stream.
struct LeanNode {
    /// The only strong sender of the request stream: dropping it ends the stream.
    tx: mpsc::Sender<SmOutgoingMessages>,
    task: JoinHandle<()>,
}

/// The commands a node receives, in the envelope of its revision. What SMs send is the same
/// type in both; a 9.1 command is moved into the 9.0 envelope as it arrives (the edge), so the
/// rest of the lean client is the same for both.
enum Commands {
    V90(Streaming<SmIncomingMessages>),
    V91(Streaming<SmIncomingMessages91>),
}

impl Commands {
    /// The next command, in the 9.0 envelope; `None` once the stream ended or failed.
    async fn next(&mut self) -> Option<SmIncomingMessages> {
        match self {
            Self::V90(inbound) => inbound.message().await.ok().flatten(),
            Self::V91(inbound) => inbound.message().await.ok().flatten().map(Into::into),
        }
    }
}

/// A new connection (a full TLS handshake under mTLS) and a `RegisterSM` stream for `id`, with
/// the client of the fleet's revision: the request stream's only strong sender, and the
/// commands.
async fn open_stream(
    fleet: &Fleet,
    id: &str,
) -> anyhow::Result<(mpsc::Sender<SmOutgoingMessages>, Commands)> {
    let mut endpoint = Endpoint::from_shared(fleet.url.clone())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(20));
    if fleet.keepalive.load(Ordering::Acquire) {
        endpoint = endpoint
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
    }
    if let Some((tls, _)) = &fleet.tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    let channel = endpoint.connect().await.context("connect")?;
    let (tx, rx) = mpsc::channel(256);
    tx.send(messages::sm_info(id)).await?;
    tx.send(messages::node_instances_status(&fleet.instances))
        .await?;
    let requests = ReceiverStream::new(rx);
    let inbound = match fleet.protocol {
        SmProtocol::V9_0 => SmServiceClient::new(channel)
            .register_sm(requests)
            .await
            .map(|r| Commands::V90(r.into_inner())),
        SmProtocol::V9_1 => SmServiceClient91::new(channel)
            .register_sm(requests)
            .await
            .map(|r| Commands::V91(r.into_inner())),
    };
    Ok((tx, inbound.context("RegisterSM")?))
}

/// Answers the controller on one stream until it ends.
async fn serve_stream(
    fleet: &Fleet,
    mut inbound: Commands,
    replies: mpsc::WeakSender<SmOutgoingMessages>,
) {
    let mut cloud = -1;
    while let Some(message) = inbound.next().await {
        match message.sm_incoming_message {
            Some(SmIncomingMessage::GetNodeConfigStatus(_)) => {
                fleet.config_requests.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = replies.upgrade() {
                    let _ = tx
                        .send(messages::node_config_status("absent", "", None))
                        .await;
                }
            }
            Some(SmIncomingMessage::ConnectionStatus(status)) => {
                let now_up = status.cloud_status == 1;
                if now_up && cloud != 1 {
                    let up = fleet.cloud_up.fetch_add(1, Ordering::AcqRel) + 1;
                    fleet.cloud_changed(up);
                } else if !now_up && cloud == 1 {
                    let up = fleet.cloud_up.fetch_sub(1, Ordering::AcqRel) - 1;
                    fleet.cloud_changed(up);
                }
                cloud = status.cloud_status;
            }
            _ => {}
        }
    }
    if cloud == 1 {
        fleet.cloud_up.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Most reconnect attempts one node makes in a row before it gives up.
const RECONNECT_ATTEMPTS: u32 = 50;

async fn connect_node(fleet: Arc<Fleet>, id: String) -> anyhow::Result<LeanNode> {
    let (tx, inbound) = open_stream(&fleet, &id).await?;
    let replies = tx.downgrade();
    let task = tokio::spawn(async move {
        serve_stream(&fleet, inbound, replies).await;
        // With `reconnect` on (the renewal storm), register again at once on a new connection.
        // Such a stream's sender lives here: the SM process exits rather than closing it.
        let mut failures = 0;
        while fleet.reconnect.load(Ordering::Acquire) && failures < RECONNECT_ATTEMPTS {
            match open_stream(&fleet, &id).await {
                Ok((tx, inbound)) => {
                    failures = 0;
                    fleet.reconnects.fetch_add(1, Ordering::Relaxed);
                    serve_stream(&fleet, inbound, tx.downgrade()).await;
                    drop(tx);
                }
                Err(_) => {
                    failures += 1;
                    fleet.reconnect_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    Ok(LeanNode { tx, task })
}

async fn sm_child(
    url: String,
    pki: Option<std::path::PathBuf>,
    protocol: SmProtocol,
) -> anyhow::Result<()> {
    let tls = match pki {
        Some(dir) => {
            let read = |file: &str| {
                std::fs::read_to_string(dir.join(file))
                    .with_context(|| format!("reading {}", dir.join(file).display()))
            };
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("ca.pem")?))
                .identity(Identity::from_pem(read("client.pem")?, read("client.key")?))
                .domain_name("localhost");
            Some((config, dir))
        }
        None => None,
    };
    let fleet = Arc::new(Fleet {
        url,
        tls,
        protocol,
        reconnect: std::sync::atomic::AtomicBool::new(false),
        keepalive: std::sync::atomic::AtomicBool::new(true),
        reconnects: AtomicU64::new(0),
        reconnect_errors: AtomicU64::new(0),
        instances: messages::initial_instances(3),
        cloud_up: AtomicUsize::new(0),
        cloud_want: AtomicUsize::new(usize::MAX),
        cloud_reached: Notify::new(),
        cloud_first_ns: AtomicU64::new(u64::MAX),
        cloud_last_ns: AtomicU64::new(0),
        config_requests: AtomicU64::new(0),
    });
    let mut nodes: Vec<LeanNode> = Vec::new();
    let mut out = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match sm_command(&fleet, &mut nodes, &words).await {
            Ok(Some(reply)) => reply,
            Ok(None) => break,
            Err(e) => format!("error {e:#}").replace('\n', " "),
        };
        out.write_all(format!("{reply}\n").as_bytes()).await?;
        out.flush().await?;
    }
    if fleet.reconnect.load(Ordering::Acquire) {
        // Reconnected streams have no sender here to drop: leave without closing them.
        std::process::exit(0);
    }
    close_all(&mut nodes).await;
    Ok(())
}

fn arg<T: std::str::FromStr>(words: &[&str], i: usize) -> anyhow::Result<T> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("argument {i} of {:?}", words.join(" ")))
}

/// Runs one command; `None` to quit.
async fn sm_command(
    fleet: &Arc<Fleet>,
    nodes: &mut Vec<LeanNode>,
    words: &[&str],
) -> anyhow::Result<Option<String>> {
    let reply = match words.first().copied().unwrap_or("") {
        "ping" => "pong".to_owned(),
        "quit" => return Ok(None),
        // connect PREFIX COUNT CONCURRENCY
        "connect" => {
            let prefix: String = arg(words, 1)?;
            let count: usize = arg(words, 2)?;
            let concurrency: usize = arg(words, 3)?;
            let started = Instant::now();
            let permits = Arc::new(Semaphore::new(concurrency.max(1)));
            let attempts: Vec<JoinHandle<anyhow::Result<LeanNode>>> = (0..count)
                .map(|i| {
                    let fleet = fleet.clone();
                    let permits = permits.clone();
                    let id = format!("{prefix}-{i}");
                    tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await?;
                        connect_node(fleet, id).await
                    })
                })
                .collect();
            let mut errors: HashMap<String, usize> = HashMap::new();
            for attempt in attempts {
                match attempt.await? {
                    Ok(node) => nodes.push(node),
                    Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
                }
            }
            ensure!(
                errors.is_empty(),
                "{} of {count} nodes failed to connect: {errors:?}",
                errors.values().sum::<usize>()
            );
            format!(
                "connected {count} in {:.0} ms (open streams {})",
                started.elapsed().as_secs_f64() * 1e3,
                nodes.len()
            )
        }
        // burst PER_NODE MAX_MS
        "burst" => {
            let per_node: u64 = arg(words, 1)?;
            let limit = Duration::from_millis(arg(words, 2)?);
            let started = Instant::now();
            let bursts: Vec<JoinHandle<u64>> = nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let tx = node.tx.clone();
                    let message = messages::instant_monitoring(&fleet.instances, i as u64);
                    tokio::spawn(async move {
                        let mut sent = 0;
                        while sent < per_node {
                            if sent % 1024 == 0 && started.elapsed() > limit {
                                break;
                            }
                            if tx.send(message.clone()).await.is_err() {
                                break;
                            }
                            sent += 1;
                        }
                        sent
                    })
                })
                .collect();
            let mut sent = 0;
            for burst in bursts {
                sent += burst.await?;
            }
            let wall = started.elapsed();
            format!(
                "sent {sent} queued-in {:.3} s ({:.0}/s)",
                wall.as_secs_f64(),
                sent as f64 / wall.as_secs_f64()
            )
        }
        // arm_cloud 0|1: the next await_cloud waits for every node to be down (0) or up (1).
        "arm_cloud" => {
            let up: u8 = arg(words, 1)?;
            fleet.cloud_first_ns.store(u64::MAX, Ordering::Relaxed);
            fleet.cloud_last_ns.store(0, Ordering::Relaxed);
            let want = if up == 1 { nodes.len() } else { 0 };
            fleet.cloud_want.store(want, Ordering::Release);
            format!("armed {want}")
        }
        // await_cloud MAX_MS
        "await_cloud" => {
            let limit = Duration::from_millis(arg(words, 1)?);
            let want = fleet.cloud_want.load(Ordering::Acquire);
            let deadline = tokio::time::Instant::now() + limit;
            while fleet.cloud_up.load(Ordering::Acquire) != want {
                tokio::select! {
                    () = fleet.cloud_reached.notified() => {}
                    () = tokio::time::sleep_until(deadline) => bail!(
                        "{} nodes up, waiting for {want}, after {limit:?}",
                        fleet.cloud_up.load(Ordering::Acquire)
                    ),
                }
            }
            fleet.cloud_want.store(usize::MAX, Ordering::Release);
            let first = fleet.cloud_first_ns.load(Ordering::Relaxed);
            let last = fleet.cloud_last_ns.load(Ordering::Relaxed);
            format!(
                "reached {want}: first to last node {:.1} ms",
                last.saturating_sub(first) as f64 / 1e6
            )
        }
        // reconnect 0|1: whether ended streams register again at once.
        "reconnect" => {
            let on: u8 = arg(words, 1)?;
            fleet.reconnect.store(on == 1, Ordering::Release);
            format!("reconnect {on}")
        }
        // keepalive 0|1: whether connections opened from now on ping the controller.
        "keepalive" => {
            let on: u8 = arg(words, 1)?;
            fleet.keepalive.store(on == 1, Ordering::Release);
            format!("keepalive {on}")
        }
        "reconnects" => format!(
            "reconnects {} errors {}",
            fleet.reconnects.load(Ordering::Relaxed),
            fleet.reconnect_errors.load(Ordering::Relaxed)
        ),
        // handshakes COUNT CONCURRENCY MAX_MS
        "handshakes" => {
            let dir = &fleet.tls.as_ref().context("handshakes need --pki")?.1;
            tls::handshake_burst(
                &fleet.url,
                dir,
                arg(words, 1)?,
                arg(words, 2)?,
                Duration::from_millis(arg(words, 3)?),
            )
            .await?
        }
        "close" => {
            let started = Instant::now();
            let (count, stragglers) = close_all(nodes).await;
            format!(
                "closed {count} in {:.0} ms ({stragglers} aborted)",
                started.elapsed().as_secs_f64() * 1e3
            )
        }
        other => bail!("unknown command {other:?}"),
    };
    Ok(Some(reply))
}

/// Ends every stream from the SM side and waits until the controller has finished them; the
/// count, and how many had to be aborted after 20 s.
async fn close_all(nodes: &mut Vec<LeanNode>) -> (usize, usize) {
    let count = nodes.len();
    let tasks: Vec<JoinHandle<()>> = nodes.drain(..).map(|n| n.task).collect();
    // `nodes.drain` dropped every strong sender: each request stream ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut stragglers = 0;
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            stragglers += 1;
        }
    }
    (count, stragglers)
}
