//! `smctl`: see the SM controller's nodes and drive them, over the admin API of a running
//! `smcontrollerd`.
//!
//! Without `--admin` (or `SMCTL_ADMIN`) it reaches the daemon started with its defaults on the
//! same machine, through its default admin socket. Every command takes `--json` for scripts:
//! one JSON document (or, for `events` and `logs`, one per line) in the protobuf JSON mapping,
//! with the proto field names. Errors go to stderr with the gRPC code, e.g. `NOT_FOUND`, and
//! exit with 1.

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use smcontroller_admin::{
    client::{self, AdminClient},
    events::EventKind,
    json,
    proto::v1 as pb,
    server::AdminEndpoint,
};
use smcontroller_grpc::proto::{common::v2 as common, servicemanager::v5 as sm};
use tonic::Code;

/// See the SM controller's nodes and drive them (over smcontrollerd's admin API).
#[derive(Debug, Parser)]
#[command(name = "smctl", version)]
struct Cli {
    /// The admin endpoint: unix:PATH (or an absolute path) or a loopback host:port. Default:
    /// the socket smcontrollerd serves with its defaults.
    #[arg(long, global = true, env = "SMCTL_ADMIN", value_name = "ADDR")]
    admin: Option<String>,

    /// Print JSON (protobuf JSON mapping, proto field names) instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What the controller is: its version, the wire revision its SMs speak (smProtocol).
    Info,
    /// The registered nodes (a table), and the last ones that went away.
    Nodes,
    /// One registered node in detail.
    Node {
        /// The node id.
        id: String,
    },
    /// Read, check or set a node's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start and stop service instances on a node.
    #[command(subcommand)]
    Instances(InstancesCommand),
    /// List the unit's networks (smProtocol 9.1) or push network settings to a node (9.0).
    #[command(subcommand)]
    Networks(NetworksCommand),
    /// Request a log from nodes and print its parts, assembled.
    #[command(subcommand)]
    Logs(LogsCommand),
    /// A node's averaged monitoring.
    Monitoring {
        /// The node id.
        id: String,
    },
    /// Set the cloud connection state that the controller relays to every node.
    Cloud {
        /// The state to set.
        state: CloudState,
    },
    /// Follow what nodes send, one line per event, until interrupted.
    Events {
        /// Only this node (repeat for more).
        #[arg(long = "node", value_name = "ID")]
        nodes: Vec<String>,
        /// Only this kind (repeat for more): connected, disconnected, sm_info,
        /// instance_status, node_instances_status, monitoring, alert, log.
        #[arg(long = "kind", value_name = "KIND", value_parser = parse_kind)]
        kinds: Vec<EventKind>,
        /// Stop after this many events (default: follow until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The node's configuration status: state, version, error.
    Status {
        /// The node id.
        id: String,
    },
    /// Ask the node whether it would accept a configuration (JSON document).
    Check {
        /// The node id.
        id: String,
        /// The node configuration JSON; standard input when absent or `-`.
        file: Option<PathBuf>,
    },
    /// Apply a configuration (JSON document) on the node.
    Set {
        /// The node id.
        id: String,
        /// The node configuration JSON; standard input when absent or `-`.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum InstancesCommand {
    /// Queue an update_instances: instances to stop and to start.
    Update {
        /// The node id.
        id: String,
        /// JSON file: an InstanceInfo, or an array of them, to start.
        #[arg(long, value_name = "FILE")]
        start: Option<PathBuf>,
        /// JSON file: an InstanceIdent, or an array of them, to stop.
        #[arg(long, value_name = "FILE")]
        stop: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum NetworksCommand {
    /// The networks of the daemon's network provider (smProtocol 9.1): subnet, VLAN, the
    /// nodes' and the instances' addresses.
    List,
    /// Queue an update_networks (smProtocol 9.0).
    Update {
        /// The node id.
        id: String,
        /// JSON file: an UpdateNetworkParameters, or an array of them.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LogsCommand {
    /// The nodes' system log.
    System(LogArgs),
    /// Instance logs.
    Instance(InstanceLogArgs),
    /// Instance crash logs.
    Crash(InstanceLogArgs),
}

#[derive(Debug, Args)]
struct LogArgs {
    /// Ask this node (repeat for more; default: every registered node).
    #[arg(long = "node", value_name = "ID")]
    nodes: Vec<String>,
    /// Entries from this time (RFC 3339, e.g. 2024-01-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    from: Option<prost_types::Timestamp>,
    /// Entries up to this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    till: Option<prost_types::Timestamp>,
    /// How long to wait for every part, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct InstanceLogArgs {
    #[command(flatten)]
    common: LogArgs,
    /// Only this item (service) id.
    #[arg(long)]
    item: Option<String>,
    /// Only this subject id.
    #[arg(long)]
    subject: Option<String>,
    /// Only this instance index.
    #[arg(long)]
    instance: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CloudState {
    /// The unit is connected to the cloud.
    Connected,
    /// The unit is not connected to the cloud.
    Disconnected,
}

fn parse_kind(value: &str) -> Result<EventKind, String> {
    EventKind::from_name(value).ok_or_else(|| {
        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown event kind {value:?}; one of {}", names.join(", "))
    })
}

fn parse_time(value: &str) -> Result<prost_types::Timestamp, String> {
    value
        .parse()
        .map_err(|e| format!("{value:?} is not an RFC 3339 time: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("smctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => {
                    eprintln!("smctl: {}: {}", code_name(status.code()), status.message())
                }
                None => eprintln!("smctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The gRPC code as the gRPC specification spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let endpoint = match &cli.admin {
        Some(value) => value.parse::<AdminEndpoint>()?,
        None => AdminEndpoint::default_local(),
    };
    let mut admin = client::connect(&endpoint).await?;
    let out = Output { json: cli.json };
    match cli.command {
        Command::Info => info(&mut admin, out).await,
        Command::Nodes => nodes(&mut admin, out).await,
        Command::Node { id } => node(&mut admin, out, id).await,
        Command::Config(command) => config(&mut admin, out, command).await,
        Command::Instances(InstancesCommand::Update { id, start, stop }) => {
            update_instances(&mut admin, out, id, start, stop).await
        }
        Command::Networks(NetworksCommand::List) => list_networks(&mut admin, out).await,
        Command::Networks(NetworksCommand::Update { id, file }) => {
            update_networks(&mut admin, out, id, file).await
        }
        Command::Logs(command) => logs(&mut admin, out, command).await,
        Command::Monitoring { id } => monitoring(&mut admin, out, id).await,
        Command::Cloud { state } => cloud(&mut admin, out, state).await,
        Command::Events {
            nodes,
            kinds,
            count,
        } => events(&mut admin, out, nodes, kinds, count).await,
    }
}

/// Where and how results are printed.
#[derive(Debug, Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// Prints `message` as one line of JSON.
    fn json_line<M: prost::Message>(self, message: &M, full_name: &str) -> anyhow::Result<()> {
        let value = json::to_json(message, full_name)?;
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &value)?;
        writeln!(stdout)?;
        Ok(())
    }

    /// Prints `message` as pretty JSON.
    fn json_pretty<M: prost::Message>(self, message: &M, full_name: &str) -> anyhow::Result<()> {
        let value = json::to_json(message, full_name)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(
        || "-".to_owned(),
        |t| {
            let mut t = *t;
            // Whole seconds are enough for a table.
            t.nanos = 0;
            t.to_string()
        },
    )
}

fn runtimes(runtimes: &[sm::RuntimeInfo]) -> String {
    if runtimes.is_empty() {
        return "-".to_owned();
    }
    runtimes
        .iter()
        .map(|r| format!("{} ({})", r.runtime_id, r.r#type))
        .collect::<Vec<_>>()
        .join(", ")
}

fn resources(resources: &[sm::ResourceInfo]) -> String {
    if resources.is_empty() {
        return "-".to_owned();
    }
    resources
        .iter()
        .map(|r| format!("{} x{}", r.name, r.shared_count))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn info(admin: &mut AdminClient, out: Output) -> anyhow::Result<()> {
    let info = admin.get_info(pb::GetInfoRequest {}).await?.into_inner();
    if out.json {
        return out.json_pretty(&info, "smcontroller.admin.v1.Info");
    }
    println!("version:         {}", info.version);
    println!("sm protocol:     {}", info.sm_protocol);
    println!(
        "network service: {}",
        if info.network_service {
            "served"
        } else {
            "not served"
        }
    );
    println!("nodes:           {}", info.nodes);
    println!("pending streams: {}", info.pending_streams);
    Ok(())
}

async fn nodes(admin: &mut AdminClient, out: Output) -> anyhow::Result<()> {
    let response = admin
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&response, "smcontroller.admin.v1.ListNodesResponse");
    }
    if response.nodes.is_empty() {
        println!("no nodes registered");
    } else {
        let mut table = Table::new();
        table.load_preset(UTF8_BORDERS_ONLY).set_header([
            "NODE",
            "GEN",
            "CONNECTED SINCE",
            "LAST MESSAGE",
            "RUNTIMES",
            "RESOURCES",
            "QUEUE",
            "STALLS",
        ]);
        for n in &response.nodes {
            table.add_row([
                n.node_id.clone(),
                n.generation.to_string(),
                time(n.connected_since.as_ref()),
                time(n.last_message_at.as_ref()),
                runtimes(&n.runtimes),
                resources(&n.resources),
                format!("{} ({} B)", n.queued_messages, n.queued_bytes),
                format!("{}{}", n.stalls, if n.stalled { " (paused)" } else { "" }),
            ]);
        }
        println!("{table}");
    }
    if !response.departed.is_empty() {
        println!("\ndeparted:");
        for d in &response.departed {
            println!(
                "  {}  {}  {}",
                d.node_id,
                time(d.disconnected_at.as_ref()),
                d.detail
            );
        }
    }
    Ok(())
}

async fn node(admin: &mut AdminClient, out: Output, id: String) -> anyhow::Result<()> {
    let n = admin
        .get_node(pb::NodeRequest { node_id: id })
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&n, "smcontroller.admin.v1.Node");
    }
    println!("node:            {}", n.node_id);
    println!("generation:      {}", n.generation);
    println!("connected since: {}", time(n.connected_since.as_ref()));
    println!("last message:    {}", time(n.last_message_at.as_ref()));
    println!(
        "queue:           {} messages, {} bytes",
        n.queued_messages, n.queued_bytes
    );
    println!(
        "stalls:          {}{}",
        n.stalls,
        if n.stalled { " (paused now)" } else { "" }
    );
    println!("connects:        {}", n.connects);
    println!("runtimes:");
    for r in &n.runtimes {
        println!(
            "  {} ({}): max {} instances, {} / {} DMIPS, RAM {} / {} bytes",
            r.runtime_id,
            r.r#type,
            r.max_instances,
            r.allowed_dmips,
            r.max_dmips,
            r.allowed_ram,
            r.total_ram
        );
    }
    println!("resources:       {}", resources(&n.resources));
    if let Some(c) = n.counts {
        println!(
            "messages:        sm_info {}, instance_status {}, node_instances_status {}, \
             monitoring {}, alert {}, log {}",
            c.sm_info, c.instance_status, c.node_instances_status, c.monitoring, c.alert, c.log
        );
    }
    Ok(())
}

/// The text of FILE, or of standard input when FILE is absent or `-`.
fn read_input(file: Option<&PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        }
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            Ok(text)
        }
    }
}

fn error_text(error: Option<&common::ErrorInfo>) -> String {
    match error {
        Some(e) if e.aos_code != 0 || e.exit_code != 0 || !e.message.is_empty() => format!(
            "{} (aos code {}, exit code {})",
            e.message, e.aos_code, e.exit_code
        ),
        _ => "-".to_owned(),
    }
}

async fn config(
    admin: &mut AdminClient,
    out: Output,
    command: ConfigCommand,
) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Status { id } => {
            let status = admin
                .get_node_config_status(pb::NodeRequest {
                    node_id: id.clone(),
                })
                .await?
                .into_inner();
            if out.json {
                return out.json_pretty(&status, "servicemanager.v5.NodeConfigStatus");
            }
            println!("node:    {id}");
            println!("state:   {}", status.state);
            println!("version: {}", status.version);
            println!("error:   {}", error_text(status.error.as_ref()));
        }
        ConfigCommand::Check { id, file } => {
            let request = pb::NodeConfigRequest {
                node_id: id.clone(),
                node_config: read_input(file.as_ref())?,
            };
            let reply = admin.check_node_config(request).await?.into_inner();
            if out.json {
                return out.json_pretty(&reply, "smcontroller.admin.v1.NodeConfigResponse");
            }
            println!(
                "{id}: configuration version {} checked: accepted",
                reply.version
            );
        }
        ConfigCommand::Set { id, file } => {
            let request = pb::NodeConfigRequest {
                node_id: id.clone(),
                node_config: read_input(file.as_ref())?,
            };
            let reply = admin.set_node_config(request).await?.into_inner();
            if out.json {
                return out.json_pretty(&reply, "smcontroller.admin.v1.NodeConfigResponse");
            }
            println!("{id}: configuration version {} set", reply.version);
        }
    }
    Ok(())
}

async fn update_instances(
    admin: &mut AdminClient,
    out: Output,
    id: String,
    start: Option<PathBuf>,
    stop: Option<PathBuf>,
) -> anyhow::Result<()> {
    if start.is_none() && stop.is_none() {
        bail!("give instances to start (--start FILE) or to stop (--stop FILE), or both");
    }
    let start_instances: Vec<sm::InstanceInfo> = match &start {
        Some(path) => {
            json::list_from_json(&read_input(Some(path))?, "servicemanager.v5.InstanceInfo")
                .with_context(|| format!("--start {}", path.display()))?
        }
        None => Vec::new(),
    };
    let stop_instances: Vec<common::InstanceIdent> = match &stop {
        Some(path) => json::list_from_json(&read_input(Some(path))?, "common.v2.InstanceIdent")
            .with_context(|| format!("--stop {}", path.display()))?,
        None => Vec::new(),
    };
    let (starting, stopping) = (start_instances.len(), stop_instances.len());
    let reply = admin
        .update_instances(pb::UpdateInstancesRequest {
            node_id: id.clone(),
            stop_instances,
            start_instances,
        })
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&reply, "smcontroller.admin.v1.Queued");
    }
    println!(
        "{id}: update_instances queued ({starting} to start, {stopping} to stop); follow the \
         statuses with `smctl events --node {id} --kind instance_status`"
    );
    Ok(())
}

async fn update_networks(
    admin: &mut AdminClient,
    out: Output,
    id: String,
    file: PathBuf,
) -> anyhow::Result<()> {
    let networks: Vec<sm::UpdateNetworkParameters> = json::list_from_json(
        &read_input(Some(&file))?,
        "servicemanager.v5.UpdateNetworkParameters",
    )
    .with_context(|| format!("{}", file.display()))?;
    let count = networks.len();
    let reply = admin
        .update_networks(pb::UpdateNetworksRequest {
            node_id: id.clone(),
            networks,
        })
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&reply, "smcontroller.admin.v1.Queued");
    }
    println!("{id}: update_networks queued ({count} networks)");
    Ok(())
}

async fn list_networks(admin: &mut AdminClient, out: Output) -> anyhow::Result<()> {
    let response = admin
        .list_networks(pb::ListNetworksRequest {})
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&response, "smcontroller.admin.v1.ListNetworksResponse");
    }
    if response.networks.is_empty() {
        println!("no networks yet (pool {})", response.pool);
        return Ok(());
    }
    let mut networks = Table::new();
    networks.load_preset(UTF8_BORDERS_ONLY).set_header([
        "NETWORK",
        "SUBNET",
        "VLAN",
        "HOSTS",
        "INSTANCES",
    ]);
    let mut instances = Table::new();
    instances
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["NETWORK", "INSTANCE", "NODE", "IP"]);
    for n in &response.networks {
        let hosts: Vec<String> = n
            .hosts
            .iter()
            .map(|h| format!("{} {}", h.node_id, h.ip))
            .collect();
        networks.add_row([
            n.network_id.clone(),
            n.subnet.clone(),
            n.vlan_id.to_string(),
            if hosts.is_empty() {
                "-".to_owned()
            } else {
                hosts.join(", ")
            },
            n.instances.len().to_string(),
        ]);
        for i in &n.instances {
            instances.add_row([
                n.network_id.clone(),
                i.instance.as_ref().map_or_else(
                    || "?".to_owned(),
                    |x| format!("{}/{}/{}", x.item_id, x.subject_id, x.instance),
                ),
                i.node_id.clone(),
                i.ip.clone(),
            ]);
        }
    }
    println!("pool {}", response.pool);
    println!("{networks}");
    if instances.row_count() > 0 {
        println!("{instances}");
    }
    Ok(())
}

async fn logs(admin: &mut AdminClient, out: Output, command: LogsCommand) -> anyhow::Result<()> {
    let (log_type, args, filter) = match command {
        LogsCommand::System(args) => (pb::LogType::System, args, None),
        LogsCommand::Instance(a) => (
            pb::LogType::Instance,
            a.common,
            Some(filter_of(a.item, a.subject, a.instance)),
        ),
        LogsCommand::Crash(a) => (
            pb::LogType::Crash,
            a.common,
            Some(filter_of(a.item, a.subject, a.instance)),
        ),
    };
    let request = pb::RequestLogRequest {
        log_type: log_type as i32,
        node_ids: args.nodes,
        correlation_id: String::new(),
        filter,
        from: args.from,
        till: args.till,
        timeout_ms: args.timeout.saturating_mul(1000),
    };
    let mut parts = admin.request_log(request).await?.into_inner();
    let show_progress = !out.json && std::io::stdout().is_terminal();
    let bar = ProgressBar::hidden();
    if show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} parts")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message("collecting log");
    }
    // Parts per node, in arrival order; printed per node once complete.
    let mut per_node: std::collections::BTreeMap<String, Vec<sm::LogData>> = Default::default();
    let mut totals: std::collections::HashMap<String, u64> = Default::default();
    while let Some(part) = parts.next().await {
        let part = match part {
            Ok(part) => part,
            Err(status) => {
                bar.finish_and_clear();
                return Err(status.into());
            }
        };
        if out.json {
            out.json_line(&part, "smcontroller.admin.v1.LogPart")?;
            continue;
        }
        let data = part.data.unwrap_or_default();
        totals.insert(part.node_id.clone(), data.part_count.max(1));
        bar.set_length(totals.values().sum());
        bar.inc(1);
        per_node.entry(part.node_id).or_default().push(data);
    }
    bar.finish_and_clear();
    if out.json {
        return Ok(());
    }
    if per_node.is_empty() {
        println!("no log parts (no node was asked)");
    }
    let mut stdout = std::io::stdout().lock();
    for (node, mut parts) in per_node {
        parts.sort_by_key(|p| p.part);
        let first = &parts[0];
        writeln!(
            stdout,
            "==> {node}: {} part(s), status {}{} <==",
            parts.len(),
            first.status,
            match error_text(first.error.as_ref()).as_str() {
                "-" => String::new(),
                e => format!(", error: {e}"),
            }
        )?;
        for p in &parts {
            stdout.write_all(&p.data)?;
        }
        if parts
            .last()
            .is_some_and(|p| !p.data.ends_with(b"\n") && !p.data.is_empty())
        {
            writeln!(stdout)?;
        }
    }
    Ok(())
}

fn filter_of(
    item: Option<String>,
    subject: Option<String>,
    instance: Option<u64>,
) -> common::InstanceFilter {
    // Empty ids and a negative instance mean "any" on the wire.
    common::InstanceFilter {
        item_id: item.unwrap_or_default(),
        subject_id: subject.unwrap_or_default(),
        instance: instance.and_then(|i| i64::try_from(i).ok()).unwrap_or(-1),
    }
}

async fn monitoring(admin: &mut AdminClient, out: Output, id: String) -> anyhow::Result<()> {
    let m = admin
        .get_average_monitoring(pb::NodeRequest {
            node_id: id.clone(),
        })
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&m, "servicemanager.v5.AverageMonitoring");
    }
    println!("node: {id} (average monitoring)");
    if let Some(n) = &m.node_monitoring {
        print_sample("  node", n);
    }
    for i in &m.instances_monitoring {
        let ident = i.instance.as_ref().map_or_else(
            || "?".to_owned(),
            |x| format!("{}/{}/{}", x.item_id, x.subject_id, x.instance),
        );
        if let Some(data) = &i.monitoring_data {
            print_sample(&format!("  {ident} ({})", i.runtime_id), data);
        }
    }
    Ok(())
}

fn print_sample(label: &str, m: &sm::MonitoringData) {
    let partitions: Vec<String> = m
        .partitions
        .iter()
        .map(|p| format!("{} {} B", p.name, p.used_size))
        .collect();
    println!(
        "{label}: ram {} B, cpu {} DMIPS, download {} B, upload {} B{}",
        m.ram,
        m.cpu,
        m.download,
        m.upload,
        if partitions.is_empty() {
            String::new()
        } else {
            format!(", partitions: {}", partitions.join(", "))
        }
    );
}

async fn cloud(admin: &mut AdminClient, out: Output, state: CloudState) -> anyhow::Result<()> {
    let connected = matches!(state, CloudState::Connected);
    let reply = admin
        .set_cloud_state(pb::SetCloudStateRequest { connected })
        .await?
        .into_inner();
    if out.json {
        return out.json_pretty(&reply, "smcontroller.admin.v1.SetCloudStateResponse");
    }
    println!(
        "cloud {}; relayed to {} registered node(s)",
        if connected {
            "connected"
        } else {
            "disconnected"
        },
        reply.nodes
    );
    Ok(())
}

async fn events(
    admin: &mut AdminClient,
    out: Output,
    nodes: Vec<String>,
    kinds: Vec<EventKind>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        node_ids: nodes,
        kinds: kinds.iter().map(|k| k.to_proto() as i32).collect(),
    };
    let mut stream = admin.watch_events(request).await?.into_inner();
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let Some(event) = stream.next().await else {
            bail!("the daemon ended the event stream");
        };
        let event = event?;
        seen += 1;
        if out.json {
            out.json_line(&event, "smcontroller.admin.v1.Event")?;
        } else {
            println!("{}", event_line(&event));
        }
    }
    Ok(())
}

/// One line of text for an event: time, node, kind, and the gist.
fn event_line(event: &pb::Event) -> String {
    use pb::event::Event as E;
    let (kind, gist) = match &event.event {
        Some(E::Connected(_)) => ("connected", String::new()),
        Some(E::Disconnected(d)) => ("disconnected", format!("{}: {}", d.reason, d.detail)),
        Some(E::SmInfo(i)) => (
            "sm_info",
            format!(
                "runtimes {}; resources {}",
                runtimes(&i.runtimes),
                resources(&i.resources)
            ),
        ),
        Some(E::InstanceStatus(s)) => (
            "instance_status",
            format!(
                "{} {} {}{}",
                s.instance.as_ref().map_or_else(
                    || "?".to_owned(),
                    |x| format!("{}/{}/{}", x.item_id, x.subject_id, x.instance)
                ),
                s.version,
                s.state,
                match error_text(s.error.as_ref()).as_str() {
                    "-" => String::new(),
                    e => format!(" error: {e}"),
                }
            ),
        ),
        Some(E::NodeInstancesStatus(s)) => (
            "node_instances_status",
            format!("{} instances", s.instances.len()),
        ),
        Some(E::Monitoring(m)) => (
            "monitoring",
            m.node_monitoring.as_ref().map_or_else(String::new, |n| {
                format!(
                    "ram {} B, cpu {} DMIPS, {} instances",
                    n.ram,
                    n.cpu,
                    m.instances_monitoring.len()
                )
            }),
        ),
        Some(E::Alert(a)) => ("alert", format!("{:?}", a.alert_item)),
        Some(E::Log(l)) => (
            "log",
            format!(
                "{} part {}/{} {} ({} bytes)",
                l.correlation_id,
                l.part,
                l.part_count,
                l.status,
                l.data.len()
            ),
        ),
        Some(E::Lagged(l)) => ("lagged", format!("{} events skipped", l.skipped)),
        None => ("unknown", String::new()),
    };
    let node = if event.node_id.is_empty() {
        "-"
    } else {
        &event.node_id
    };
    format!("{} {node} {kind} {gist}", time(event.time.as_ref()))
        .trim_end()
        .to_owned()
}
