//! `sm-sim`: simulated Service Managers that connect to an SM controller, register, answer its
//! commands and send monitoring and alerts, as real SMs do. Like a real SM, each node handles
//! its commands one at a time and replies in their order, sets an empty `error` on what it
//! reports when nothing failed, sends no reply to a node config it cannot read (one without
//! `nodeGroupSubject`), resolves manifests with `GetBlobsInfos` before it reports instances
//! started, ignores a repeated cloud status and reconnects after a fixed delay. Logs via
//! `RUST_LOG`; prints a summary of what was sent and received on exit (Ctrl-C or
//! `--duration-secs`).
//!
//! mTLS by default: `--pki DIR` (a PKI from `cargo xtask gen-certs DIR`) verifies the controller
//! with `DIR/ca.pem` and gives each node `DIR/client-<node id>.pem` and `.key`; `--ca` and
//! `--cert-dir` name those places one by one. `--insecure` speaks plain HTTP/2 instead, with a
//! warning.
//!
//! `--sm-protocol 9.1` speaks the Aos 9.1 wire revision (the controller's `smProtocol` must be
//! 9.1 too): each node also subscribes to its network updates, syncs its network state on
//! every connection and has the networks of the instances it starts allocated, and released
//! when they stop, through `NetworkService`, as the reference 9.1.1 SM does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use smcontroller_sim::{
    Answers, Behaviour, ClientCerts, Garbage, Registration, SimConfig, SimTls, Simulator,
    SmProtocol,
};
use tracing_subscriber::EnvFilter;

/// The controller's address when `--url` is not given.
const DEFAULT_ADDR: &str = "127.0.0.1:8093";

/// Simulated Service Managers for an SM controller.
#[derive(Debug, Parser)]
#[command(name = "sm-sim", version)]
struct Args {
    /// URL of the controller: https://… over mTLS, http://… with --insecure [default:
    /// https://127.0.0.1:8093, or http://127.0.0.1:8093 with --insecure].
    #[arg(long)]
    url: Option<String>,
    /// mTLS with the development PKI in DIR (`cargo xtask gen-certs DIR`): the CA DIR/ca.pem,
    /// each node's `DIR/client-<node id>.pem` and `.key`.
    #[arg(long, value_name = "DIR")]
    pki: Option<PathBuf>,
    /// The CA certificate (PEM) that verifies the controller [default: DIR/ca.pem of --pki].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Where each node's `client-<node id>.pem` and `client-<node id>.key` are [default: the DIR
    /// of --pki].
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// The name the controller's certificate must be valid for [default: the URL's host].
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Plain HTTP/2 without TLS. For development only.
    #[arg(long, conflicts_with_all = ["pki", "ca", "cert_dir", "server_name"])]
    insecure: bool,
    /// The wire revision the nodes speak, as the controller's smProtocol: 9.0, or 9.1 (nodes
    /// also use NetworkService).
    #[arg(long, value_name = "9.0|9.1", default_value_t = SmProtocol::V9_0)]
    sm_protocol: SmProtocol,
    /// Number of simulated nodes (one connection each).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Node ids are `{prefix}-{n}`, n from 1 (as gen-certs names the client certificates).
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

    /// The URL, with the default that goes with `--insecure`; refuses a scheme that does not.
    fn url(&self) -> anyhow::Result<String> {
        let (scheme, other) = if self.insecure {
            ("http://", "https://")
        } else {
            ("https://", "http://")
        };
        let Some(url) = &self.url else {
            return Ok(format!("{scheme}{DEFAULT_ADDR}"));
        };
        if url.starts_with(other) {
            if self.insecure {
                bail!("--url {url}: plain HTTP/2 (--insecure) needs an http:// URL");
            }
            bail!("--url {url}: mTLS needs an https:// URL; pass --insecure to speak plain HTTP/2");
        }
        Ok(url.clone())
    }

    /// The nodes' TLS: `None` with `--insecure`.
    fn tls(&self) -> anyhow::Result<Option<SimTls>> {
        if self.insecure {
            return Ok(None);
        }
        let ca = self
            .ca
            .clone()
            .or_else(|| self.pki.as_ref().map(|dir| dir.join("ca.pem")));
        let cert_dir = self.cert_dir.clone().or_else(|| self.pki.clone());
        let (Some(ca), Some(cert_dir)) = (ca, cert_dir) else {
            bail!(
                "mTLS needs the CA and the nodes' client certificates: pass --pki DIR (a PKI \
                 from `cargo xtask gen-certs DIR`) or --ca FILE and --cert-dir DIR; or \
                 --insecure for plain HTTP/2"
            );
        };
        let mut tls = SimTls::new(&ca, ClientCerts::Dir(cert_dir))?;
        if let Some(name) = &self.server_name {
            tls = tls.with_server_name(name.clone());
        }
        Ok(Some(tls))
    }

    fn config(&self) -> anyhow::Result<SimConfig> {
        Ok(SimConfig {
            url: self.url()?,
            tls: self.tls()?,
            nodes: self.nodes,
            sm_protocol: self.sm_protocol,
            node_prefix: self.prefix.clone(),
            monitoring_rate: self.monitoring_rate,
            alert_rate: self.alert_rate,
            burst: self.burst,
            instances: self.instances,
            reconnect_delay: Duration::from_millis(self.reconnect_delay_ms),
            start_stagger: Duration::from_millis(self.stagger_ms),
            behaviour: self.behaviour(),
            ..SimConfig::default()
        })
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
    let config = args.config()?;
    match &config.tls {
        Some(tls) => tracing::info!(url = %config.url, nodes = config.nodes,
            sm_protocol = %config.sm_protocol, client_certs = ?tls.client_certs,
            "starting simulated SMs over mTLS"),
        None => tracing::warn!(url = %config.url, nodes = config.nodes,
            sm_protocol = %config.sm_protocol,
            "starting simulated SMs WITHOUT TLS (insecure, development only)"),
    }
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
