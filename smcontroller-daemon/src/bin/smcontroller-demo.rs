//! `smcontroller-demo` (run it with `cargo xtask demo`): the SM controller on loopback with
//! three simulated SMs. Drives every provided interface once against each node, then prints
//! what happened: the nodes and their runtimes, the node config documents each SM accepted,
//! each call's answer and round trip, and the telemetry received. Exits 0 when every call got
//! the expected answer.
//!
//! It runs over mTLS, as a unit does: it writes a development PKI (the one `cargo xtask
//! gen-certs` writes) into a temporary directory, serves with the server certificate from it
//! and requires client certificates from its CA, and each simulated SM presents its own
//! (`client-node-N.pem`). `--insecure` runs it over plain HTTP/2 instead.
//!
//! The simulated SMs read node configs as a real SM does: one without `nodeGroupSubject` gets
//! no answer at all. The demo prints each JSON document it sends, so that what they accepted
//! is visible. Like real SMs they resolve the manifests of instances to start with
//! `GetBlobsInfos` first; a blob store that knows every digest answers them here.

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, ensure};
use async_trait::async_trait;
use clap::Parser;
use smcontroller_api::{
    Codename, EnvVarInfo, InstanceFilter, InstanceIdent, InstanceInfo, InstanceRunner,
    ItemInfoProvider, LogProvider, LogRequest, LogType, MonitoringProvider, NodeConfig,
    NodeConfigHandler, NodeConfigState, NodeId, NodeNetwork, UpdateNetworkParameters,
};
use smcontroller_certs::test_util::TestPki;
use smcontroller_daemon::{
    app,
    config::Settings,
    receivers::{Counts, Recorder, RecorderSnapshot},
    sim::{SimConfig, SimTls, Simulator},
};

/// Runs the SM controller with simulated SMs on loopback and prints a summary.
#[derive(Debug, Parser)]
struct Args {
    /// How many simulated SMs.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Instant monitoring messages per second per node.
    #[arg(long, default_value_t = 20.0)]
    monitoring_rate: f64,
    /// Alerts per second per node.
    #[arg(long, default_value_t = 2.0)]
    alert_rate: f64,
    /// Log filter (RUST_LOG syntax) for the controller's own log, printed to stderr.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Plain HTTP/2 without TLS instead of mTLS.
    #[arg(long)]
    insecure: bool,
}

/// One call of the demo: what was asked, what came back, how long it took.
struct Call {
    node: String,
    what: &'static str,
    /// The node config the call sent, if it sent one.
    config: Option<SentConfig>,
    outcome: Result<String, String>,
    took: Duration,
}

/// A node config as it went over the wire.
struct SentConfig {
    /// The command that carried it.
    command: &'static str,
    version: String,
    /// The JSON document, exactly as sent.
    json: String,
}

/// A blob store that knows every digest; counts the digests it resolved.
#[derive(Default)]
struct DemoBlobs {
    resolved: AtomicU64,
}

#[async_trait]
impl ItemInfoProvider for DemoBlobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        self.resolved.fetch_add(1, Ordering::Relaxed);
        Ok(format!("https://blobs.demo.invalid/{digest}"))
    }
}

const DEADLINE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nRESULT: some calls did not get the expected answer");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse()?,
        insecure: true,
        ..Settings::default()
    };
    // Removed when the demo ends.
    let pki_dir = if args.insecure {
        None
    } else {
        let dir = tempfile::Builder::new()
            .prefix("smcontroller-demo-pki-")
            .tempdir()
            .context("creating a directory for the development PKI")?;
        TestPki::new()
            .context("making the development PKI")?
            .write_dev_pki(dir.path(), args.nodes)
            .context("writing the development PKI")?;
        settings
            .use_dev_pki(dir.path())
            .context("using the development PKI")?;
        Some(dir)
    };
    let recorder = Recorder::new();
    let blobs = Arc::new(DemoBlobs::default());
    let running = app::start(&settings, recorder.clone(), blobs.clone()).await?;
    let (url, tls) = match &pki_dir {
        Some(dir) => {
            let url = format!("https://{}", running.addr);
            println!("SM controller listening on {url} over mTLS (loopback only)");
            println!(
                "  development PKI written to {} (removed on exit)",
                dir.path().display()
            );
            println!(
                "  CA {}: the server requires SM client certificates from it",
                dir.path().join("ca.pem").display()
            );
            println!(
                "  server certificate server.pem (SANs localhost, 127.0.0.1, ::1); each SM \
                 presents client-<node id>.pem (CN = node id)"
            );
            (url, Some(SimTls::from_pki_dir(dir.path())?))
        }
        None => {
            let url = format!("http://{}", running.addr);
            println!("SM controller listening on {url} (insecure: plain HTTP/2, loopback only)");
            (url, None)
        }
    };

    let mut sim_config = SimConfig::new(url.clone(), args.nodes);
    sim_config.tls = tls;
    sim_config.node_prefix = "node".into();
    sim_config.monitoring_rate = args.monitoring_rate;
    sim_config.alert_rate = args.alert_rate;
    let sim = Simulator::start(sim_config).context("starting the simulated SMs")?;
    let nodes = args.nodes;
    ensure!(
        recorder
            .wait_until(DEADLINE, |s| s.connected_nodes() >= nodes)
            .await,
        "only {} of {nodes} simulated SMs registered within {DEADLINE:?}",
        recorder.snapshot().connected_nodes()
    );
    let over = if args.insecure {
        "plain HTTP/2"
    } else {
        "mTLS, each with its client certificate"
    };
    println!("{nodes} simulated SMs registered over {over}\n");

    let controller = running.controller.clone();
    let mut calls = Vec::new();
    for node in controller.nodes() {
        drive_node(&controller, &node, &mut calls).await;
    }
    let log_request = LogRequest {
        correlation_id: "demo-system-all".into(),
        log_type: LogType::System,
        node_ids: vec![],
        instance_filter: InstanceFilter::default(),
        from: None,
        till: None,
    };
    calls.push(
        timed("*", "request_log(system, every node)", async {
            controller
                .request_log(&log_request)
                .await
                .map(|()| "queued".to_owned())
        })
        .await,
    );

    // Cloud status relay: every SM must hear connect, then disconnect.
    for connected in [true, false] {
        let started = Instant::now();
        controller.set_cloud_connected(connected);
        let expected = i32::from(connected);
        let all_heard = wait_sim(&sim, |s| {
            s.nodes
                .iter()
                .all(|n| n.last_cloud_status == Some(expected))
        })
        .await;
        calls.push(Call {
            node: "*".into(),
            config: None,
            what: if connected {
                "cloud connect"
            } else {
                "cloud disconnect"
            },
            outcome: if all_heard {
                Ok(format!("relayed to {nodes} SMs"))
            } else {
                Err("not every SM heard it".into())
            },
            took: started.elapsed(),
        });
    }

    // The asynchronous answers (instance statuses, env-var statuses, log parts) and some
    // unsolicited telemetry (monitoring, alerts) from every node.
    let async_answers = recorder
        .wait_until(DEADLINE, |s| {
            s.nodes.iter().all(|n| {
                n.counts.instance_status >= 2
                    && n.counts.env_vars >= 1
                    && n.counts.log >= 8
                    && n.counts.monitoring >= 3
                    && n.counts.alert >= 1
            })
        })
        .await;
    let snapshot = recorder.snapshot();
    print_nodes(&snapshot);
    let configs_ok = print_configs(&calls);
    let all_ok = print_calls(&calls) && configs_ok;
    println!(
        "  GetBlobsInfos: the SMs resolved {} manifest digests before reporting instances",
        blobs.resolved.load(Ordering::Relaxed)
    );
    print_telemetry(&snapshot);
    if !async_answers {
        println!(
            "\nmissing asynchronous answers or telemetry (instance statuses, env vars, logs, \
             monitoring, alerts) after {DEADLINE:?}"
        );
    }

    sim.stop().await;
    running.stop().await?;
    drop(pki_dir);
    let ok = all_ok && async_answers;
    if ok {
        println!("\nRESULT: every call got the expected answer");
    }
    Ok(ok)
}

async fn wait_sim(
    sim: &Simulator,
    pred: impl Fn(&smcontroller_daemon::sim::SimStats) -> bool,
) -> bool {
    let give_up = Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while Instant::now() < give_up {
        if pred(&sim.stats()) {
            return true;
        }
        tick.tick().await;
    }
    false
}

async fn timed<F>(node: &str, what: &'static str, call: F) -> Call
where
    F: std::future::Future<Output = smcontroller_api::Result<String>>,
{
    let started = Instant::now();
    let outcome = call.await.map_err(|e| e.to_string());
    Call {
        node: node.to_owned(),
        what,
        config: None,
        outcome,
        took: started.elapsed(),
    }
}

/// Checks an answer: `Err` with what was wrong.
fn expect(ok: bool, shown: String) -> Result<String, smcontroller_api::Error> {
    if ok {
        Ok(shown)
    } else {
        Err(smcontroller_api::Error::InvalidArgument(format!(
            "unexpected answer: {shown}"
        )))
    }
}

async fn drive_node(
    controller: &smcontroller_routing::Controller,
    node: &NodeId,
    calls: &mut Vec<Call>,
) {
    let name = node.as_str();
    let config = NodeConfig {
        node: Some(Codename {
            codename: name.into(),
        }),
        labels: vec!["demo".into()],
        priority: 1,
        ..NodeConfig::new("1.0.0", "demo")
    };
    let sent = |command| SentConfig {
        command,
        version: config.version.clone(),
        json: config.to_json(),
    };
    calls.push(
        timed(name, "get_node_config_status", async {
            let s = controller.get_node_config_status(node).await?;
            expect(true, format!("{} {:?}", s.state, s.version))
        })
        .await,
    );
    let mut call = timed(name, "check_node_config(1.0.0)", async {
        controller
            .check_node_config(node, &config)
            .await
            .map(|()| "accepted".into())
    })
    .await;
    call.config = Some(sent("check_node_config"));
    calls.push(call);
    let mut call = timed(name, "update_node_config(1.0.0)", async {
        controller
            .update_node_config(node, &config)
            .await
            .map(|()| "applied".into())
    })
    .await;
    call.config = Some(sent("set_node_config"));
    calls.push(call);
    calls.push(
        timed(name, "get_node_config_status", async {
            let s = controller.get_node_config_status(node).await?;
            expect(
                s.state == NodeConfigState::Installed && s.version == "1.0.0",
                format!("{} {:?}", s.state, s.version),
            )
        })
        .await,
    );
    calls.push(
        timed(name, "get_average_monitoring", async {
            let m = controller.get_average_monitoring(node).await?;
            expect(
                true,
                format!(
                    "ram {} B, cpu {}, {} instances",
                    m.node.ram,
                    m.node.cpu,
                    m.instances.len()
                ),
            )
        })
        .await,
    );
    let start: Vec<InstanceInfo> = (0..2)
        .map(|i| InstanceInfo {
            ident: InstanceIdent {
                item_id: "demo-service".into(),
                subject_id: "demo-subject".into(),
                instance: i,
                ..InstanceIdent::default()
            },
            version: "1.0.0".into(),
            manifest_digest: format!("sha256:{:064x}", 0xde30 + i),
            runtime_id: "runc".into(),
            env_vars: vec![EnvVarInfo {
                name: "DEMO_MODE".into(),
                value: "1".into(),
            }],
            ..InstanceInfo::default()
        })
        .collect();
    calls.push(
        timed(name, "update_instances(start 2)", async {
            controller
                .update_instances(node, &[], &start)
                .await
                .map(|()| "queued".into())
        })
        .await,
    );
    let networks = [UpdateNetworkParameters {
        network_id: "demo-net".into(),
        subnet: "172.17.0.0/16".into(),
        ip: "172.17.0.10".into(),
        vlan_id: 1,
    }];
    calls.push(
        timed(name, "update_networks", async {
            controller
                .update_networks(node, &networks)
                .await
                .map(|()| "queued".into())
        })
        .await,
    );
    for (what, log_type) in [
        ("request_log(system)", LogType::System),
        ("request_log(instance)", LogType::Instance),
        ("request_log(crash)", LogType::Crash),
    ] {
        let request = LogRequest {
            correlation_id: format!("demo-{name}-{log_type:?}"),
            log_type,
            node_ids: vec![node.clone()],
            instance_filter: InstanceFilter::default(),
            from: Some(SystemTime::now() - Duration::from_secs(3600)),
            till: None,
        };
        calls.push(
            timed(name, what, async {
                controller
                    .request_log(&request)
                    .await
                    .map(|()| "queued".into())
            })
            .await,
        );
    }
}

fn print_nodes(snapshot: &RecorderSnapshot) {
    println!("Nodes");
    println!(
        "  {:<10} {:<10} {:<40} {:>9}",
        "node", "state", "runtimes", "instances"
    );
    for node in &snapshot.nodes {
        let runtimes = node
            .sm_info
            .as_ref()
            .map(|info| {
                info.runtimes
                    .iter()
                    .map(|r| {
                        format!(
                            "{}({}, {} DMIPS)",
                            r.runtime_id, r.runtime_type, r.max_dmips
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let instances = node.instances.as_ref().map_or(0, Vec::len);
        let state = if node.connected { "connected" } else { "gone" };
        println!(
            "  {:<10} {:<10} {:<40} {:>9}",
            node.node_id.as_str(),
            state,
            runtimes,
            instances
        );
    }
}

/// Prints each node config document sent and whether the SM accepted it; true when all were.
fn print_configs(calls: &[Call]) -> bool {
    println!(
        "\nNode configs sent (an SM that cannot read one, e.g. without nodeGroupSubject, does \
         not answer it)"
    );
    let mut all_ok = true;
    for call in calls {
        let Some(config) = &call.config else {
            continue;
        };
        let verdict = match &call.outcome {
            Ok(_) => "accepted".to_owned(),
            Err(error) => {
                all_ok = false;
                format!("NOT accepted: {error}")
            }
        };
        println!(
            "  {:<8} {:<17} {} {}: {verdict}",
            call.node, config.command, config.version, config.json
        );
    }
    all_ok
}

/// Prints the calls; true when all succeeded.
fn print_calls(calls: &[Call]) -> bool {
    println!("\nCalls");
    println!("  {:<8} {:<34} {:>10}  answer", "node", "call", "rtt");
    let mut all_ok = true;
    for call in calls {
        let (mark, text) = match &call.outcome {
            Ok(answer) => ("ok ", answer.clone()),
            Err(error) => {
                all_ok = false;
                ("ERR", error.clone())
            }
        };
        println!(
            "  {:<8} {:<34} {:>10}  {mark} {text}",
            call.node,
            call.what,
            format!("{:.0?}", call.took)
        );
    }
    let mut sync: Vec<Duration> = calls
        .iter()
        .filter(|c| c.what.starts_with("get_") || c.what.contains("node_config"))
        .map(|c| c.took)
        .collect();
    sync.sort();
    if let (Some(first), Some(last)) = (sync.first(), sync.last()) {
        println!(
            "  sync round trips: {} calls, min {:.0?}, median {:.0?}, max {:.0?}",
            sync.len(),
            first,
            sync[sync.len() / 2],
            last
        );
    }
    all_ok
}

fn print_telemetry(snapshot: &RecorderSnapshot) {
    println!("\nTelemetry received");
    let header = [
        "sm_info",
        "inst_status",
        "node_inst",
        "env_vars",
        "monitoring",
        "alert",
        "log",
    ];
    print!("  {:<10}", "node");
    for h in header {
        print!(" {h:>11}");
    }
    println!();
    let row = |name: &str, c: &Counts| {
        print!("  {name:<10}");
        for v in [
            c.sm_info,
            c.instance_status,
            c.node_instances_status,
            c.env_vars,
            c.monitoring,
            c.alert,
            c.log,
        ] {
            print!(" {v:>11}");
        }
        println!();
    };
    for node in &snapshot.nodes {
        row(node.node_id.as_str(), &node.counts);
    }
    row("total", &snapshot.totals);
}
