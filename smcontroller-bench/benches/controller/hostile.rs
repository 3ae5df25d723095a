//! Soak of the controller under hostile peers (R-BAD-2, R-BAD-3, issue 9):
//! `cargo xtask bench --hostile`, not part of CI.
//!
//! Each scenario runs in a process of its own (`--hostile-scenario NAME`): the controller with
//! the daemon's default settings and counting receivers, its log (tracing at `info`, as the
//! daemon logs) written into a counter of bytes, five well-behaved SMs in the bench's SM
//! process (`--sm-child`), and the attacker in a third process (`--hostile-attacker NAME URL`),
//! so the controller's memory and CPU figures are its own. A scenario:
//!
//! 1. calm: [`CALM`] of sequential `get_node_config_status` calls round robin over the five
//!    SMs (through the controller's `NodeConfigHandler`), for the calm p50/p99;
//! 2. attack: the attacker starts; [`ATTACK`] of the same calls, with the controller's VmRSS
//!    and the five SMs' registrations sampled every 10 ms, its CPU time and log bytes counted;
//! 3. a new SM (a fresh SM process) registers while the attack goes on (within 15 s), and again
//!    after the attacker has gone.
//!
//! Scenarios ([`SCENARIOS`]): `baseline` (no attacker), `slowloris` (the controller's open-file
//! limit lowered to 1,024, 1,100 TCP connections that never send the HTTP/2 preface,
//! reconnecting when closed), `stream-flood` (10 connections opening RegisterSM streams as
//! fast as they can write HEADERS), `pending-flood` (100 connections x 15 RegisterSM streams
//! that never send `sm_info`: past the pending cap), `big-ids` (streams whose `sm_info` has a
//! distinct 1 MiB node id, 4 at a time), `empty-flood` (4 registered SMs sending empty messages
//! and empty alerts as fast as flow control allows, registering again on a new connection when
//! theirs is closed), `ping-flood` (10 connections sending PING
//! frames as fast as they can, reconnecting when closed), `outbound-stall` (4 SMs that register
//! and never read, and a caller in the controller's process sending them 60 KB commands
//! without pause), `decoded-bomb` (2 streams at a time sending a message of 4 MiB of empty
//! repeated elements). The attackers that are refused (`big-ids`, `empty-flood`,
//! `decoded-bomb`) open a new connection when theirs is closed (N-BAD-1's budget of refused
//! messages), as a determined attacker would.
//!
//! The bounds the run is held to are [`P99_RATIO_BOUND`], [`RSS_BOUND`] and
//! [`LOG_RATE_BOUND`], plus: the five SMs
//! registered at every sample, and a new SM registering during and after every attack.

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use prost::Message as _;
use smcontroller_api::{NodeConfigHandler, NodeId, NodeNetwork, UpdateNetworkParameters};
use smcontroller_grpc::proto::servicemanager::v5::{
    Alert, SmOutgoingMessages, sm_outgoing_messages::SmOutgoingMessage,
};
use smcontroller_sim::messages;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use smcontroller_daemon::config::Settings;

use super::{Harness, Latencies, ServerKind, connect_all, cpu_time, mib, node_ids, rss};

/// The scenarios, in the order they run.
pub(crate) const SCENARIOS: [&str; 9] = [
    "baseline",
    "slowloris",
    "stream-flood",
    "pending-flood",
    "big-ids",
    "empty-flood",
    "ping-flood",
    "outbound-stall",
    "decoded-bomb",
];
/// Well-behaved SMs of every scenario.
const GOOD: usize = 5;
/// The calm phase before each attack.
const CALM: Duration = Duration::from_secs(3);
/// The attack phase.
const ATTACK: Duration = Duration::from_secs(8);
/// The longest a new SM may take to register.
const NEWCOMER_DEADLINE: Duration = Duration::from_secs(15);
/// Peak resident memory of the controller's process the run is held to, in any scenario.
const RSS_BOUND: u64 = 256 * 1024 * 1024;
/// Log growth the run is held to, bytes per second of attack: the process-wide warning
/// ceiling (`smcontroller_limits::PROCESS_WARN_RATE`, 50 lines/s) at about 300 bytes a line.
const LOG_RATE_BOUND: f64 = 16.0 * 1024.0;
/// The well-behaved SMs' sync p99 under attack, at most this many times their calm p99
/// (N-BAD-1).
const P99_RATIO_BOUND: f64 = 2.0;
/// Prefix of a scenario process's result line.
const ROW: &str = "@hostile\t";
/// The controller's open-file limit in the slowloris scenario, as in the issue.
const SLOWLORIS_NOFILE: u64 = 1_024;

// ---------------------------------------------------------------------------------------------
// The orchestrator
// ---------------------------------------------------------------------------------------------

/// `--hostile [SCENARIO..] [--json PATH]`: every scenario in a process of its own, then the
/// table.
pub(crate) fn orchestrate(args: &[String]) -> anyhow::Result<()> {
    let mut json = None;
    let mut names = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--hostile" | "--bench" | "--quick" => {}
            "--json" => json = Some(args.next().context("--json needs a path")?.clone()),
            name if SCENARIOS.contains(&name) => names.push(name.to_owned()),
            other => bail!("--hostile: unknown argument {other:?}; scenarios: {SCENARIOS:?}"),
        }
    }
    if names.is_empty() {
        names = SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
    }
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    println!(
        "SM controller soak under hostile peers: {} scenarios, {GOOD} well-behaved SMs, \
         {CALM:?} calm then {ATTACK:?} of attack each",
        names.len()
    );
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for name in &names {
        println!("\n=== hostile: {name} ===");
        let mut child = std::process::Command::new(&exe)
            .args(["--hostile-scenario", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("scenario stdout")?;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            match line.strip_prefix(ROW) {
                Some(row) => rows.push(serde_json::from_str::<serde_json::Value>(row)?),
                None => println!("{line}"),
            }
        }
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("{name} ({status})"));
        }
    }
    print_table(&rows);
    println!(
        "\nbounds: sync p99 <= {P99_RATIO_BOUND}x calm, peak RSS <= {:.0} MiB, log <= {:.0} \
         KiB/s of attack, the {GOOD} SMs registered at every sample, a new SM registers during \
         and after each attack",
        mib(RSS_BOUND),
        LOG_RATE_BOUND / 1024.0
    );
    println!("whole run: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = json {
        let path = std::path::Path::new(&path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let document = serde_json::json!({
            "rss_bound_mib": mib(RSS_BOUND),
            "log_rate_bound_bytes_per_s": LOG_RATE_BOUND,
            "p99_ratio_bound": P99_RATIO_BOUND,
            "scenarios": rows,
            "failed": failed,
            "run_seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")?;
        println!("figures written to {}", path.display());
    }
    anyhow::ensure!(
        failed.is_empty(),
        "scenarios that could not run: {failed:?}"
    );
    let broken: Vec<&str> = rows
        .iter()
        .filter(|r| r["within_bounds"] != serde_json::Value::Bool(true))
        .filter_map(|r| r["scenario"].as_str())
        .collect();
    anyhow::ensure!(
        broken.is_empty(),
        "scenarios outside the bounds: {broken:?}"
    );
    Ok(())
}

fn print_table(rows: &[serde_json::Value]) {
    let header = [
        "scenario",
        "sync p50/p99 calm (µs)",
        "p50/p99 attack (µs)",
        "p99 ratio",
        "failed calls",
        "peak RSS (MiB)",
        "CPU (% of a core)",
        "log bytes (B/s)",
        "5 SMs stayed",
        "new SM during / after",
        "refusals",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let yes = |k: &str| {
                if r[k].as_bool() == Some(true) {
                    "yes"
                } else {
                    "NO"
                }
            };
            vec![
                r["scenario"].as_str().unwrap_or("?").to_owned(),
                format!("{:.0} / {:.0}", f("calm_p50_us"), f("calm_p99_us")),
                format!("{:.0} / {:.0}", f("attack_p50_us"), f("attack_p99_us")),
                format!("{:.2}", f("p99_ratio")),
                format!("{} of {}", r["attack_errors"], r["attack_calls"]),
                format!("{:.1}", f("peak_rss_mib")),
                format!("{:.0}", f("cpu_percent")),
                format!("{} ({:.0})", r["log_bytes"], f("log_bytes_per_s")),
                yes("stayed_registered").to_owned(),
                format!("{} / {}", yes("newcomer_during"), yes("newcomer_after")),
                r["refusals"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    println!("\n=== hostile peers (soak) ===");
    println!("| {} |", header.join(" | "));
    println!("|{}|", vec!["---"; header.len()].join("|"));
    for row in cells {
        println!("| {} |", row.join(" | "));
    }
}

// ---------------------------------------------------------------------------------------------
// A scenario process: the controller under test
// ---------------------------------------------------------------------------------------------

/// Bytes the controller's process has logged.
static LOGGED: AtomicU64 = AtomicU64::new(0);

struct CountingLog;

impl std::io::Write for CountingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGGED.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What one phase measured.
struct Phase {
    latencies: Latencies,
    calls: usize,
    errors: usize,
    peak_rss: u64,
    cpu: Duration,
    wall: Duration,
    log_bytes: u64,
    /// Fewest of the five SMs registered at any sample.
    min_registered: usize,
}

/// Sequential sync calls round robin over `ids` for `length`, with memory and registrations
/// sampled every 10 ms.
async fn phase(harness: &Harness, ids: &Arc<Vec<NodeId>>, length: Duration) -> Phase {
    let controller = harness.controller().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler: JoinHandle<(u64, usize)> = tokio::spawn({
        let controller = controller.clone();
        let ids = ids.clone();
        let stop = stop.clone();
        async move {
            let (mut peak, mut fewest) = (0, usize::MAX);
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss(None));
                let registered = ids
                    .iter()
                    .filter(|id| controller.node_status(id).is_some())
                    .count();
                fewest = fewest.min(registered);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (peak, fewest)
        }
    });
    let (cpu0, log0, started) = (
        cpu_time(None),
        LOGGED.load(Ordering::Relaxed),
        Instant::now(),
    );
    let mut ns = Vec::new();
    let mut errors = 0;
    let mut k = 0;
    while started.elapsed() < length && k < 200_000 {
        let t = Instant::now();
        if controller
            .get_node_config_status(&ids[k % ids.len()])
            .await
            .is_err()
        {
            errors += 1;
        }
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        k += 1;
    }
    let wall = started.elapsed();
    let cpu = cpu_time(None).saturating_sub(cpu0);
    let log_bytes = LOGGED.load(Ordering::Relaxed) - log0;
    stop.store(true, Ordering::Relaxed);
    let (peak_rss, min_registered) = sampler.await.unwrap_or((0, 0));
    Phase {
        calls: ns.len(),
        latencies: Latencies::new(ns),
        errors,
        peak_rss,
        cpu,
        wall,
        log_bytes,
        min_registered,
    }
}

/// A new SM, in a fresh SM process, registers within [`NEWCOMER_DEADLINE`].
async fn newcomer(harness: &Harness, name: &str) -> bool {
    match harness.sm_process().await {
        Ok(sm) => newcomer_in(harness, sm, name).await,
        Err(e) => {
            println!("new SM {name}: starting the SM process: {e:#}");
            false
        }
    }
}

/// A new SM, in the SM process `sm` started beforehand (during a slowloris this process has
/// no file descriptor to spare for spawning one), registers within [`NEWCOMER_DEADLINE`].
async fn newcomer_in(harness: &Harness, mut sm: super::SmProcess, name: &str) -> bool {
    let attempt = async {
        sm.request(&format!("connect {name} 1 1"), NEWCOMER_DEADLINE)
            .await?;
        let id = NodeId::new(format!("{name}-0"));
        let started = Instant::now();
        let mut registered = false;
        while !registered && started.elapsed() < Duration::from_secs(5) {
            registered = harness.controller().node_status(&id).is_some();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sm.quit().await;
        anyhow::Ok(registered)
    };
    match tokio::time::timeout(NEWCOMER_DEADLINE + Duration::from_secs(5), attempt).await {
        Ok(Ok(registered)) => registered,
        Ok(Err(e)) => {
            println!("new SM {name}: {e:#}");
            false
        }
        Err(_) => {
            println!("new SM {name}: not registered within {NEWCOMER_DEADLINE:?}");
            false
        }
    }
}

/// The attacker process of a scenario.
struct AttackerProcess {
    child: tokio::process::Child,
}

impl AttackerProcess {
    async fn start(name: &str, addr: &str) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["--hostile-attacker", name, addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("attacker stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout);
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line),
        )
        .await
        .context("the attacker did not get ready in 30 s")??;
        anyhow::ensure!(line.starts_with("ready"), "attacker: {line:?}");
        println!("attacker {name}: {}", line.trim());
        Ok(Self { child })
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// The caller of `outbound-stall`: 60 KB commands to the deaf SMs without pause, bounded by
/// count and time. Returns (taken, refused at once, other errors).
fn stall_caller(harness: &Harness, length: Duration) -> JoinHandle<(u64, u64, u64)> {
    let controller = harness.controller().clone();
    tokio::spawn(async move {
        let payload: Vec<UpdateNetworkParameters> = (0..600)
            .map(|i| UpdateNetworkParameters {
                network_id: format!("net-{i:0>60}"),
                subnet: "10.0.0.0/16".into(),
                ip: "10.0.0.1".into(),
                vlan_id: i,
            })
            .collect();
        let deaf: Vec<NodeId> = (0..DEAF)
            .map(|i| NodeId::new(format!("deaf-{i}")))
            .collect();
        let (mut taken, mut refused, mut other) = (0, 0, 0);
        let started = Instant::now();
        let mut k = 0;
        while started.elapsed() < length && k < 1_000_000 {
            match controller.update_networks(&deaf[k % DEAF], &payload).await {
                Ok(()) => taken += 1,
                Err(smcontroller_api::Error::ResourceExhausted(_)) => refused += 1,
                Err(_) => other += 1,
            }
            k += 1;
            if k % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        (taken, refused, other)
    })
}

/// `--hostile-scenario NAME`.
pub(crate) async fn scenario(name: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(|| CountingLog)
        .init();
    if name == "slowloris" {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
        rlimit::setrlimit(rlimit::Resource::NOFILE, SLOWLORIS_NOFILE.min(hard), hard)?;
    }
    let harness = Harness::start_with(ServerKind::Insecure, Settings::default()).await?;
    let mut sm = harness.sm_process().await?;
    connect_all(&harness, &mut sm, "good", GOOD).await?;
    let ids = node_ids("good", GOOD);
    let calm = phase(&harness, &ids, CALM).await;

    // Started now: under attack this process may have no descriptor left to spawn it.
    let late = harness.sm_process().await?;
    let addr = harness.url.trim_start_matches("http://").to_owned();
    let attacker = match name {
        "baseline" => None,
        _ => Some(AttackerProcess::start(name, &addr).await?),
    };
    let stall = if name == "outbound-stall" {
        let controller = harness.controller().clone();
        let deaf: Vec<NodeId> = (0..DEAF)
            .map(|i| NodeId::new(format!("deaf-{i}")))
            .collect();
        let started = Instant::now();
        while !deaf.iter().all(|d| controller.node_status(d).is_some()) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the deaf SMs did not register"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(stall_caller(&harness, ATTACK))
    } else {
        None
    };
    let attack = phase(&harness, &ids, ATTACK).await;
    let during = newcomer_in(&harness, late, "late").await;
    let stalled = match stall {
        Some(task) => Some(task.await?),
        None => None,
    };
    if let Some(attacker) = attacker {
        attacker.stop().await;
    }
    let after = newcomer(&harness, "after").await;
    let refusals: Vec<String> = harness
        .controller()
        .refusals()
        .snapshot()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(b, n)| format!("{b} {n}"))
        .collect();

    let secs = attack.wall.as_secs_f64().max(1e-9);
    let log_rate = attack.log_bytes as f64 / secs;
    let peak = calm.peak_rss.max(attack.peak_rss);
    let stayed = attack.min_registered == GOOD && calm.min_registered == GOOD;
    let p99_ratio = attack.latencies.quantile_us(0.99) / calm.latencies.quantile_us(0.99);
    let within = stayed
        && during
        && after
        && peak <= RSS_BOUND
        && log_rate <= LOG_RATE_BOUND
        && p99_ratio <= P99_RATIO_BOUND;
    println!(
        "calm: {}; attack: {}; {} failed of {} calls; CPU {:.2} s in {:.2} s; log {} bytes; \
         peak RSS {:.1} MiB{}",
        calm.latencies.describe(),
        attack.latencies.describe(),
        attack.errors,
        attack.calls,
        attack.cpu.as_secs_f64(),
        secs,
        attack.log_bytes,
        mib(peak),
        stalled.map_or(String::new(), |(t, r, o)| format!(
            "; stall caller: {t} commands taken, {r} refused at once, {o} other errors"
        ))
    );
    let row = serde_json::json!({
        "scenario": name,
        "calm_p50_us": calm.latencies.quantile_us(0.5),
        "calm_p99_us": calm.latencies.quantile_us(0.99),
        "attack_p50_us": attack.latencies.quantile_us(0.5),
        "attack_p99_us": attack.latencies.quantile_us(0.99),
        "p99_ratio": p99_ratio,
        "attack_calls": attack.calls,
        "attack_errors": attack.errors,
        "peak_rss_mib": mib(peak),
        "cpu_percent": attack.cpu.as_secs_f64() / secs * 100.0,
        "log_bytes": attack.log_bytes,
        "log_bytes_per_s": log_rate,
        "stayed_registered": stayed,
        "newcomer_during": during,
        "newcomer_after": after,
        "refusals": refusals.join(", "),
        "stall_caller": stalled.map(|(t, r, o)| serde_json::json!({"taken": t, "refused": r, "other": o})),
        "within_bounds": within,
    });
    println!("{ROW}{row}");
    sm.quit().await;
    harness.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The attacker process
// ---------------------------------------------------------------------------------------------

/// SMs of `outbound-stall` that never read.
const DEAF: usize = 4;
/// How long an attacker runs at most, whatever happens.
const ATTACKER_LIMIT: Duration = Duration::from_secs(60);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(0);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK of a RegisterSM request: literals without indexing, no Huffman.
fn register_headers() -> Vec<u8> {
    let mut out = vec![0x83, 0x86, 0x04];
    let path = "/servicemanager.v5.SMService/RegisterSM";
    out.push(path.len() as u8);
    out.extend_from_slice(path.as_bytes());
    out.push(0x01);
    out.push(9);
    out.extend_from_slice(b"127.0.0.1");
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        out.push(0);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn grpc_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A raw connection: preface, empty SETTINGS and its ACK of the server's (sent blindly), with
/// everything the server sends read and dropped. Returns the writer and whether it closed.
async fn raw(addr: SocketAddr) -> Option<(tokio::net::tcp::OwnedWriteHalf, Arc<AtomicBool>)> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let (mut read, mut write) = tcp.into_split();
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let closed = closed.clone();
        async move {
            let mut buf = vec![0_u8; 16 * 1024];
            while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
            closed.store(true, Ordering::Relaxed);
        }
    });
    let hello = [PREFACE, &frame(0x4, 0, 0, &[]), &frame(0x4, 0x1, 0, &[])].concat();
    write.write_all(&hello).await.ok()?;
    Some((write, closed))
}

/// An h2 client connection with its driver spawned.
async fn h2_client(addr: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri("http://127.0.0.1/servicemanager.v5.SMService/RegisterSM")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap_or_default()
}

/// One RegisterSM stream that sends `bodies` and waits (at most 10 s) for its end.
async fn one_stream(
    client: &h2::client::SendRequest<Bytes>,
    bodies: &[Bytes],
) -> anyhow::Result<()> {
    let mut client = client.clone().ready().await?;
    let (response, mut send) = client.send_request(request(), false)?;
    for body in bodies {
        send.send_data(body.clone(), false)?;
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut body = response.await?.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let _ = body.trailers().await;
        anyhow::Ok(())
    })
    .await??;
    Ok(())
}

/// One connection of `empty-flood`: registers `noisy-W`, then sends empty messages and empty
/// alerts as fast as flow control allows until the stream or the connection ends.
async fn empty_flood(addr: SocketAddr, w: usize, live: &impl Fn() -> bool) -> anyhow::Result<()> {
    let client = h2_client(addr).await?;
    let mut client = client.ready().await?;
    let (response, mut send) = client.send_request(request(), false)?;
    let info = grpc_frame(&messages::sm_info(&format!("noisy-{w}")).encode_to_vec());
    let empty = grpc_frame(&SmOutgoingMessages::default().encode_to_vec());
    let alert = grpc_frame(
        &SmOutgoingMessages {
            sm_outgoing_message: Some(SmOutgoingMessage::Alert(Alert::default())),
        }
        .encode_to_vec(),
    );
    let batch = Bytes::from([empty, alert].concat().repeat(1_000));
    send.send_data(Bytes::from(info), false)?;
    // The stream's end (its status) stops the flood as well as the connection's.
    let ended = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let ended = ended.clone();
        async move {
            if let Ok(response) = response.await {
                let mut body = response.into_body();
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
            }
            ended.store(true, Ordering::Relaxed);
        }
    });
    for _ in 0..100_000 {
        if !live() || ended.load(Ordering::Relaxed) {
            break;
        }
        send.reserve_capacity(batch.len());
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            _ => break,
        }
        send.send_data(batch.clone(), false)?;
    }
    Ok(())
}

/// `--hostile-attacker NAME ADDR`: prints `ready ...` once the attack is under way, attacks
/// until stdin closes (or [`ATTACKER_LIMIT`]), every loop bounded in count and time.
pub(crate) async fn attacker(name: &str, addr: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard.min(20_000), hard)?;
    let started = Instant::now();
    let live = move || started.elapsed() < ATTACKER_LIMIT;
    let ready = match name {
        "slowloris" => {
            for _ in 0..1_100 {
                tokio::spawn(async move {
                    for _ in 0..50 {
                        if !live() {
                            return;
                        }
                        let connect = TcpStream::connect(addr);
                        let Ok(Ok(mut tcp)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        else {
                            continue;
                        };
                        // Three bytes of the preface, never the rest (a socket lost to a
                        // full backlog is reset by them, and opened again).
                        if tcp.write_all(b"PRI").await.is_err() {
                            continue;
                        }
                        let mut buf = [0_u8; 256];
                        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                });
            }
            "1,100 connections that never finish the preface, reconnecting".to_owned()
        }
        "stream-flood" | "ping-flood" => {
            let ping = name == "ping-flood";
            for _ in 0..10 {
                tokio::spawn(async move {
                    let headers = register_headers();
                    for _ in 0..1_000 {
                        let Some((mut write, closed)) = raw(addr).await else {
                            if !live() {
                                return;
                            }
                            continue;
                        };
                        let mut stream = 1_u32;
                        for _ in 0..100_000 {
                            if !live() || closed.load(Ordering::Relaxed) {
                                break;
                            }
                            let mut batch = Vec::new();
                            for _ in 0..100 {
                                if ping {
                                    batch.extend(frame(0x6, 0, 0, &[1; 8]));
                                } else {
                                    batch.extend(frame(0x1, 0x4, stream, &headers));
                                    stream += 2;
                                }
                            }
                            if write.write_all(&batch).await.is_err() || stream > 1 << 30 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        if !live() {
                            return;
                        }
                    }
                });
            }
            format!(
                "10 connections of {}",
                if ping { "PINGs" } else { "HEADERS" }
            )
        }
        "pending-flood" => {
            let headers = register_headers();
            let mut held = Vec::new();
            for _ in 0..100 {
                if let Some((mut write, closed)) = raw(addr).await {
                    let mut burst = Vec::new();
                    for i in 0..15_u32 {
                        burst.extend(frame(0x1, 0x4, 2 * i + 1, &headers));
                    }
                    let _ = write.write_all(&burst).await;
                    held.push((write, closed));
                }
            }
            let n = held.len();
            // Held until the process ends.
            std::mem::forget(held);
            format!("{n} connections x 15 streams without sm_info")
        }
        "big-ids" | "decoded-bomb" => {
            let bomb = name == "decoded-bomb";
            let workers = if bomb { 2 } else { 4 };
            let counter = Arc::new(AtomicU64::new(0));
            for w in 0..workers {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let payload = if bomb {
                        // node_instances_status with ~2M empty instances, just under 4 MiB.
                        let n = (4 * 1024 * 1024 - 16) / 2;
                        let inner: Vec<u8> =
                            std::iter::repeat_n([0x0a_u8, 0x00], n).flatten().collect();
                        let mut body = vec![0x22];
                        let mut len = inner.len() as u64;
                        while len >= 0x80 {
                            body.push((len as u8) | 0x80);
                            len >>= 7;
                        }
                        body.push(len as u8);
                        body.extend(inner);
                        Some(Bytes::from(grpc_frame(&body)))
                    } else {
                        None
                    };
                    // A connection closed under us (its refusals used up) is opened again.
                    let mut client = None;
                    for k in 0..10_000 {
                        if !live() {
                            return;
                        }
                        let bodies = match &payload {
                            Some(bomb) => vec![
                                Bytes::from(grpc_frame(
                                    &messages::sm_info(&format!("bomb-{w}-{k}")).encode_to_vec(),
                                )),
                                bomb.clone(),
                            ],
                            None => {
                                let mut id = format!("{w}-{k}-");
                                id.push_str(&"x".repeat(1 << 20));
                                vec![Bytes::from(grpc_frame(
                                    &messages::sm_info(&id).encode_to_vec(),
                                ))]
                            }
                        };
                        let connection = match client.take() {
                            Some(connection) => connection,
                            None => match h2_client(addr).await {
                                Ok(connection) => connection,
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            },
                        };
                        if one_stream(&connection, &bodies).await.is_ok() {
                            client = Some(connection);
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            format!("{workers} streams at a time")
        }
        "empty-flood" => {
            for w in 0..4 {
                tokio::spawn(async move {
                    // Registers, floods until the stream or the connection is closed under
                    // it, and starts again on a new connection.
                    for _ in 0..10_000 {
                        if !live() {
                            return;
                        }
                        if empty_flood(addr, w, &live).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                });
            }
            "4 SMs sending empty messages and empty alerts".to_owned()
        }
        "outbound-stall" => {
            let mut deaf = Vec::new();
            for i in 0..DEAF {
                let client = h2_client(addr).await?;
                let mut client = client.ready().await?;
                let (response, mut send) = client.send_request(request(), false)?;
                send.send_data(
                    Bytes::from(grpc_frame(
                        &messages::sm_info(&format!("deaf-{i}")).encode_to_vec(),
                    )),
                    false,
                )?;
                // Headers only; the body is never read, its window never released.
                let response = response.await?;
                deaf.push((client, send, response));
            }
            std::mem::forget(deaf);
            format!("{DEAF} SMs registered that never read")
        }
        other => bail!("no attack {other:?}"),
    };
    println!("ready: {ready}");
    std::io::stdout().flush()?;
    // Until the scenario closes our stdin.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0_u8; 64];
    let _ = tokio::time::timeout(ATTACKER_LIMIT, async {
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    std::process::exit(0);
}
