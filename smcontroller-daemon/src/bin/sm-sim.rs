//! `sm-sim`: simulated Service Managers that connect to an SM controller, register, answer its
//! commands and send monitoring and alerts, as real SMs do. Like a real SM, each node handles
//! its commands one at a time and replies in their order, sets an empty `error` on what it
//! reports when nothing failed, sends no reply to a node config it cannot read (one without
//! `nodeGroupSubject`), resolves manifests with `GetBlobsInfos` before it reports instances
//! started, ignores a repeated cloud status and reconnects after a fixed delay. Logs via
//! `RUST_LOG`; prints a summary of what was sent and received on exit (Ctrl-C or
//! `--duration-secs`).

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use smcontroller_daemon::sim::{Answers, Behaviour, Garbage, Registration, SimConfig, Simulator};
use tracing_subscriber::EnvFilter;

/// Simulated Service Managers for an SM controller.
#[derive(Debug, Parser)]
#[command(name = "sm-sim", version)]
struct Args {
    /// URL of the controller.
    #[arg(long, default_value = "http://127.0.0.1:8093")]
    url: String,
    /// Number of simulated nodes (one connection each).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Node ids are `{prefix}-{index}`, index from 0.
    #[arg(long, default_value = "node")]
    prefix: String,
    /// `instant_monitoring` messages per second per node (0 = off).
    #[arg(long, default_value_t = 1.0)]
    monitoring_rate: f64,
    /// `alert` messages per second per node (0 = off).
    #[arg(long, default_value_t = 0.0)]
    alert_rate: f64,
    /// `instant_monitoring` messages each node sends as fast as it can after registering.
    #[arg(long, default_value_t = 0)]
    burst: u64,
    /// Instances each node reports.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Fixed pause before every reconnect (after a stream ends or an attempt fails), in
    /// milliseconds; no backoff, as in a real SM, whose delay is 10000 unless configured.
    #[arg(long, default_value_t = 1000)]
    reconnect_delay_ms: u64,
    /// Pause between the first connection attempts of consecutive nodes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Never answer the sync requests (config status, check, set, average monitoring).
    #[arg(long, conflicts_with = "answer_delay_ms")]
    never_answer: bool,
    /// Take this many milliseconds to handle each command that gets a reply. Commands are
    /// handled one at a time, so the ones after it wait behind it.
    #[arg(long)]
    answer_delay_ms: Option<u64>,
    /// Send garbage: bad vocabulary values, alerts without timestamp, empty messages.
    #[arg(long)]
    garbage: bool,
    /// Register without `sm_info` (send `node_instances_status` first).
    #[arg(long, conflicts_with = "empty_node_id")]
    skip_sm_info: bool,
    /// Register with an empty node id.
    #[arg(long)]
    empty_node_id: bool,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration_secs: Option<u64>,
}

impl Args {
    fn behaviour(&self) -> Behaviour {
        let answers = if self.never_answer {
            Answers::Never
        } else if let Some(ms) = self.answer_delay_ms {
            Answers::Delayed(Duration::from_millis(ms))
        } else {
            Answers::Normal
        };
        let registration = if self.skip_sm_info {
            Registration::SkipSmInfo
        } else if self.empty_node_id {
            Registration::EmptyNodeId
        } else {
            Registration::Normal
        };
        let garbage = if self.garbage {
            Garbage::all()
        } else {
            Garbage::default()
        };
        Behaviour {
            answers,
            registration,
            garbage,
        }
    }

    fn config(&self) -> SimConfig {
        SimConfig {
            url: self.url.clone(),
            nodes: self.nodes,
            node_prefix: self.prefix.clone(),
            monitoring_rate: self.monitoring_rate,
            alert_rate: self.alert_rate,
            burst: self.burst,
            instances: self.instances,
            reconnect_delay: Duration::from_millis(self.reconnect_delay_ms),
            start_stagger: Duration::from_millis(self.stagger_ms),
            behaviour: self.behaviour(),
            ..SimConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = args.config();
    tracing::info!(url = %config.url, nodes = config.nodes, "starting simulated SMs");
    let sim = Simulator::start(config).context("starting the simulator")?;

    let run_for = async {
        match args.duration_secs {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        () = run_for => {}
    }

    let stats = sim.finish().await;
    println!("{stats}");
    Ok(())
}
