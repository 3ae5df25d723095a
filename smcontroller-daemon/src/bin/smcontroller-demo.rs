//! `smcontroller-demo` (run it with `cargo xtask demo`): the real daemon, `smcontrollerd`, on
//! loopback with simulated SMs (`sm-sim`), driven by the operator's tool, `smctl`, over the
//! daemon's admin socket. It prints each `smctl` command and its answer: the nodes, a node's
//! configuration status before and after a configuration is set, its averaged monitoring, a
//! system log, the cloud state relayed to every node, and a few events. Then it stops
//! everything. Exits 0 when every command succeeded.
//!
//! It runs over mTLS, as a unit does: it writes a development PKI (the one `cargo xtask
//! gen-certs` writes) into a temporary directory and starts the daemon with `--pki`; each
//! simulated SM presents its own client certificate. `--insecure` runs it over plain HTTP/2.
//!
//! `--sm-protocol 9.1` runs a unit of Aos 9.1 nodes: the daemon speaks the 9.1 wire revision
//! with its own network provider (its state in the temporary directory), the simulated SMs use
//! `NetworkService` as a 9.1.1 SM does, and after the commands above the demo starts an
//! instance on node-1 with an owner id (its network id), waits until the network provider has
//! given it an address, and shows the unit's networks with `smctl networks list`.
//!
//! The three programs are looked for beside this one (`cargo xtask demo` builds them first).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use smcontroller_api::SmProtocol;
use smcontroller_certs::test_util::TestPki;
use smcontroller_daemon::ready;

/// Runs smcontrollerd with simulated SMs on loopback and drives it with smctl.
#[derive(Debug, Parser)]
struct Args {
    /// How many simulated SMs.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Instant monitoring messages per second per node.
    #[arg(long, default_value_t = 5.0)]
    monitoring_rate: f64,
    /// Alerts per second per node.
    #[arg(long, default_value_t = 1.0)]
    alert_rate: f64,
    /// Plain HTTP/2 without TLS instead of mTLS.
    #[arg(long)]
    insecure: bool,
    /// The wire revision of the unit: 9.0, or 9.1 (the nodes get their instances' networks
    /// from the daemon's network provider, and the demo shows them).
    #[arg(long, value_name = "9.0|9.1", default_value_t = SmProtocol::V9_0)]
    sm_protocol: SmProtocol,
}

/// The instance the 9.1 demo starts on node-1: its item, and its owner (its network id).
const DEMO_ITEM: &str = "demo-service";
const DEMO_OWNER: &str = "demo-owner";

/// How long the daemon and the nodes may take to come up.
const DEADLINE: Duration = Duration::from_secs(60);

/// A child process that is ended when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    /// Asks it to stop (SIGTERM, as systemd does) and waits at most `grace`, then kills it.
    fn stop(mut self, grace: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nRESULT: some commands failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A program built beside this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the demo's own executable")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo xtask demo`, or `cargo build -p smcontroller-daemon \
             -p smcontroller-sim -p smcontroller-admin --bins` first",
            path.display()
        );
    }
    Ok(path)
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let daemon_exe = sibling("smcontrollerd")?;
    let sim_exe = sibling("sm-sim")?;
    let smctl_exe = sibling("smctl")?;
    // Removed when the demo ends.
    let dir = tempfile::Builder::new()
        .prefix("smcontroller-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let socket = dir.path().join("admin.sock");
    let pki = dir.path().join("pki");
    if !args.insecure {
        TestPki::new()
            .context("making the development PKI")?
            .write_dev_pki(&pki, args.nodes)
            .context("writing the development PKI")?;
    }
    let tls: Vec<&str> = if args.insecure {
        vec!["--insecure"]
    } else {
        vec!["--pki", path_str(&pki)?]
    };
    let v9_1 = args.sm_protocol == SmProtocol::V9_1;
    let sm_protocol = args.sm_protocol.to_string();
    // Under 9.1 the daemon is the unit's network manager, its state in the temporary
    // directory; it answers GetBlobsInfos from a URL template, so that the nodes resolve the
    // manifest of the instance the demo starts.
    let mut daemon_args: Vec<String> = tls.iter().map(|a| (*a).to_owned()).collect();
    if v9_1 {
        let config = dir.path().join("smcontrollerd.json");
        std::fs::write(
            &config,
            r#"{"blobUrlTemplate": "https://blobs.demo.invalid/{digest}"}"#,
        )?;
        daemon_args.extend([
            "--sm-protocol".to_owned(),
            sm_protocol.clone(),
            "--network-state".to_owned(),
            path_str(&dir.path().join("networks.json"))?.to_owned(),
            "--config".to_owned(),
            path_str(&config)?.to_owned(),
        ]);
    }

    println!(
        "SM controller demo: smcontrollerd with {} simulated SMs (Aos {} wire revision) on \
         127.0.0.1, {}",
        args.nodes,
        args.sm_protocol,
        if args.insecure {
            "over plain HTTP/2 (--insecure)".to_owned()
        } else {
            format!(
                "over mTLS (development CA in {})",
                pki.join("ca.pem").display()
            )
        }
    );
    let (daemon, addr) = start_daemon(&daemon_exe, dir.path(), &socket, &daemon_args)?;
    println!(
        "smcontrollerd listens on {addr}; admin socket {}",
        socket.display()
    );

    let scheme = if args.insecure { "http" } else { "https" };
    let sim = Process {
        name: "sm-sim",
        child: Command::new(&sim_exe)
            .args(&tls)
            .args(["--url", &format!("{scheme}://{addr}")])
            .args(["--nodes", &args.nodes.to_string()])
            .args(["--monitoring-rate", &args.monitoring_rate.to_string()])
            .args(["--alert-rate", &args.alert_rate.to_string()])
            .args(["--sm-protocol", &sm_protocol])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting sm-sim")?,
    };

    let smctl = Smctl {
        exe: smctl_exe,
        admin: format!("unix:{}", socket.display()),
    };
    wait_for_nodes(&smctl, args.nodes)?;
    // Let some monitoring come in, so that the averages have samples.
    std::thread::sleep(Duration::from_millis(1500));

    let node = "node-1";
    let node_config = dir.path().join("node-config.json");
    std::fs::write(
        &node_config,
        r#"{"version": "1.0.1", "nodeGroupSubject": {"codename": "main"}, "priority": 10,
            "labels": ["demo"]}"#,
    )?;
    let node_config = path_str(&node_config)?;
    let mut ok = true;
    for command in [
        &["nodes"][..],
        &["node", node],
        &["config", "status", node],
        &["config", "check", node, node_config],
        &["config", "set", node, node_config],
        &["config", "status", node],
        &["monitoring", node],
        &["logs", "system", "--node", node],
        &["cloud", "connected"],
        &["events", "--kind", "monitoring", "--count", "3"],
        &["config", "status", "node-99"],
    ] {
        let expect_ok = command != ["config", "status", "node-99"];
        ok &= smctl.show(command, expect_ok)?;
    }
    if v9_1 {
        ok &= show_networks(&smctl, dir.path(), node)?;
    }

    let sim_stopped = sim.stop(Duration::from_secs(2));
    let _ = sim_stopped;
    let daemon_stopped = daemon.stop(Duration::from_secs(3));
    println!(
        "\nstopped sm-sim and smcontrollerd{}",
        if daemon_stopped {
            ""
        } else {
            " (the daemon did not exit cleanly)"
        }
    );
    Ok(ok && daemon_stopped)
}

/// The 9.1 part: starts an instance of [`DEMO_ITEM`] owned by [`DEMO_OWNER`] on `node`, waits
/// until the daemon's network provider lists its address (the node asked for it with
/// `GetNodeNetworkParams` and `AllocateInstanceNetwork`), and shows the unit's networks.
fn show_networks(smctl: &Smctl, dir: &Path, node: &str) -> anyhow::Result<bool> {
    let instance = dir.join("instance.json");
    std::fs::write(
        &instance,
        format!(
            r#"{{"instance": {{"item_id": "{DEMO_ITEM}", "subject_id": "demo-subject",
                "instance": 0}},
              "version": "1.0.0", "manifest_digest": "sha256:{}",
              "owner_id": "{DEMO_OWNER}", "runtime_id": "runc"}}"#,
            "5d".repeat(32)
        ),
    )?;
    let mut ok = smctl.show(
        &["instances", "update", node, "--start", path_str(&instance)?],
        true,
    )?;
    let ip = smctl.wait_for_instance_ip(DEMO_ITEM)?;
    println!(
        "
({DEMO_ITEM} on {node} has the address {ip} in the network {DEMO_OWNER})"
    );
    ok &= smctl.show(&["networks", "list"], true)?;
    Ok(ok)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Starts the daemon on a free loopback port with its admin API on `socket`, and waits until
/// it is ready: until it has written its ready file (`--ready-file`), never by reading its log.
/// Returns it with the address of its SM port.
fn start_daemon(
    exe: &Path,
    dir: &Path,
    socket: &Path,
    args: &[String],
) -> anyhow::Result<(Process, SocketAddr)> {
    let ready_file = dir.join("ready.json");
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--admin-socket")
        .arg(socket)
        .arg("--ready-file")
        .arg(&ready_file)
        .args(args)
        .args(["--log", "info"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting smcontrollerd")?;
    let stderr = child.stderr.take().context("the daemon's log")?;
    // The daemon's warnings and errors go on to our stderr; the rest of its log is drained, so
    // that it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                eprintln!("smcontrollerd: {line}");
            }
        }
    });
    let ready = ready::wait(&ready_file, &mut child, DEADLINE);
    let daemon = Process {
        name: "smcontrollerd",
        child,
    };
    let ready = ready?;
    let admin = format!("unix:{}", socket.display());
    if !ready.admin.contains(&admin) {
        bail!(
            "smcontrollerd is ready but does not serve its admin API on {admin} (it serves {:?})",
            ready.admin
        );
    }
    Ok((daemon, ready.sm_listen))
}

/// `smctl` against the demo's daemon.
struct Smctl {
    exe: PathBuf,
    admin: String,
}

impl Smctl {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.exe);
        command.arg("--admin").arg(&self.admin).args(args);
        command
    }

    /// Runs `smctl ARGS` and prints the command and what it printed; whether it did as
    /// expected (succeeded, or failed when `expect_ok` is false).
    fn show(&self, args: &[&str], expect_ok: bool) -> anyhow::Result<bool> {
        println!("\n$ smctl {}", args.join(" "));
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .context("running smctl")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        print!("{}", String::from_utf8_lossy(&out.stderr));
        let as_expected = out.status.success() == expect_ok;
        if !as_expected {
            println!("(unexpected: smctl exited with {})", out.status);
        }
        Ok(as_expected)
    }

    /// Waits until `smctl nodes` lists `nodes` nodes.
    fn wait_for_nodes(&self, nodes: usize) -> anyhow::Result<()> {
        let until = Instant::now() + DEADLINE;
        loop {
            let out = self.command(&["--json", "nodes"]).output()?;
            if out.status.success() {
                let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let registered = json["nodes"].as_array().map_or(0, |n| {
                    n.iter()
                        .filter(|n| !n["runtimes"].as_array().is_none_or(Vec::is_empty))
                        .count()
                });
                if registered >= nodes {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                bail!(
                    "the simulated nodes did not all register: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `smctl networks list` gives an instance of `item` an address; returns it.
    fn wait_for_instance_ip(&self, item: &str) -> anyhow::Result<String> {
        let until = Instant::now() + DEADLINE;
        loop {
            let out = self.command(&["--json", "networks", "list"]).output()?;
            if out.status.success() {
                let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let ip = json["networks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|n| n["instances"].as_array().into_iter().flatten())
                    .find(|i| i["instance"]["item_id"] == item)
                    .and_then(|i| i["ip"].as_str())
                    .filter(|ip| !ip.is_empty());
                if let Some(ip) = ip {
                    return Ok(ip.to_owned());
                }
            }
            if Instant::now() >= until {
                bail!(
                    "{item} got no address within {DEADLINE:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_for_nodes(smctl: &Smctl, nodes: usize) -> anyhow::Result<()> {
    smctl.wait_for_nodes(nodes)
}
