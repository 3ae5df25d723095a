//! `smctl` end to end: the daemon (its library: router, receivers, admin server) serving on
//! loopback with simulated SMs, and every `smctl` subcommand run as a real process against
//! its admin socket. Covers every admin call and every error code it maps (NOT_FOUND,
//! DEADLINE_EXCEEDED, UNAVAILABLE, INVALID_ARGUMENT), the events stream (each kind, filters),
//! and that the admin API is not on the SM listener.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use smcontroller_admin::server::{AdminEndpoint, default_socket_path};
use smcontroller_api::{
    InstanceIdent, ItemInfoProvider, ItemNetworkParameters, NetworkProvider, NodeId,
};
use smcontroller_daemon::{
    app::{self, Running},
    config::Settings,
    receivers::Recorder,
};
use smcontroller_grpc::proto::servicemanager::v5::sm_incoming_messages::SmIncomingMessage;
use smcontroller_sim::{Behaviour, SimConfig, SimEventKind, Simulator};
use tokio::io::{AsyncBufReadExt, BufReader};

const SMCTL: &str = env!("CARGO_BIN_EXE_smctl");

/// The longest any step may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// A blob store that knows every digest, so started instances become active.
struct Blobs;

#[async_trait]
impl ItemInfoProvider for Blobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        Ok(format!("https://blobs.test/{digest}"))
    }
}

/// The daemon with simulated nodes `node-1`.. and its admin socket.
struct Fixture {
    running: Option<Running>,
    sim: Option<Simulator>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(nodes: usize, tweak: impl FnOnce(SimConfig) -> SimConfig) -> Self {
        Self::start_with(nodes, Duration::from_secs(3), tweak).await
    }

    async fn start_with(
        nodes: usize,
        response_timeout: Duration,
        tweak: impl FnOnce(SimConfig) -> SimConfig,
    ) -> Self {
        let settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            insecure: true,
            response_timeout,
            ..Settings::default()
        };
        let mut running = app::start(&settings, Recorder::new(), Arc::new(Blobs))
            .await
            .expect("the daemon starts");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        running
            .serve_admin(&AdminEndpoint::Unix(socket.clone()))
            .await
            .expect("the admin API serves");
        let mut config = SimConfig::new(format!("http://{}", running.addr), nodes);
        config.reconnect_delay = Duration::from_millis(100);
        let sim = Simulator::start(tweak(config)).expect("the simulator starts");
        assert!(
            sim.wait_connected(nodes, DEADLINE).await,
            "the simulated nodes did not connect"
        );
        let recorder = running.recorder.clone();
        assert!(
            recorder
                .wait_until(DEADLINE, |s| s
                    .nodes
                    .iter()
                    .filter(|n| n.connected
                        && n.sm_info.is_some()
                        && n.counts.node_instances_status > 0)
                    .count()
                    == nodes)
                .await,
            "the receivers did not hear every node register"
        );
        Self {
            running: Some(running),
            sim: Some(sim),
            socket,
            dir,
        }
    }

    fn admin(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn sim(&self) -> &Simulator {
        self.sim.as_ref().unwrap()
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    /// Writes `text` to a file in the fixture's directory.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `smctl --admin SOCKET ARGS..` to its end.
    async fn smctl(&self, args: &[&str]) -> Run {
        run(tokio::process::Command::new(SMCTL)
            .arg("--admin")
            .arg(self.admin())
            .args(args))
        .await
    }

    async fn stop(mut self) {
        if let Some(sim) = self.sim.take() {
            sim.stop().await;
        }
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }
}

/// What a finished `smctl` printed.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        assert!(self.ok, "smctl failed: {self:#?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }

    /// Asserts that it failed with this gRPC code (as smctl prints it).
    fn failed_with(&self, code: &str) -> &Self {
        assert!(!self.ok, "smctl should have failed with {code}: {self:#?}");
        assert!(
            self.stderr.contains(&format!("smctl: {code}:")),
            "expected {code}: {self:#?}"
        );
        self
    }
}

async fn run(command: &mut tokio::process::Command) -> Run {
    command
        .env_remove("SMCTL_ADMIN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out: Output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("smctl ends within the deadline")
        .expect("smctl runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const CONFIG: &str =
    r#"{"version": "2.0.0", "nodeGroupSubject": {"codename": "main"}, "priority": 1}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_node_show_the_simulated_nodes() {
    let fx = Fixture::start(3, |c| c).await;

    let table = fx.smctl(&["nodes"]).await;
    assert!(table.ok, "{table:#?}");
    for node in ["node-1", "node-2", "node-3"] {
        assert!(table.stdout.contains(node), "{node} missing: {table:#?}");
    }
    assert!(table.stdout.contains("runc"), "{table:#?}");

    // --json before and after the subcommand.
    for args in [&["--json", "nodes"][..], &["nodes", "--json"][..]] {
        let json = fx.smctl(args).await.json();
        let nodes = json["nodes"].as_array().unwrap();
        let ids: Vec<&str> = nodes
            .iter()
            .map(|n| n["node_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["node-1", "node-2", "node-3"]);
        for n in nodes {
            assert!(n["connected_since"].is_string(), "{n}");
            assert!(n["last_message_at"].is_string(), "{n}");
            assert!(n["queued_messages"].is_string(), "{n}");
            assert!(!n["runtimes"].as_array().unwrap().is_empty(), "{n}");
            // 64-bit integers are strings in the protobuf JSON mapping.
            assert_ne!(n["counts"]["sm_info"], "0", "{n}");
        }
        let generations: HashSet<String> =
            nodes.iter().map(|n| n["generation"].to_string()).collect();
        assert_eq!(generations.len(), 3, "each stream has its own generation");
    }

    let one = fx.smctl(&["node", "node-2"]).await;
    assert!(one.ok, "{one:#?}");
    assert!(one.stdout.contains("node:            node-2"), "{one:#?}");
    assert!(one.stdout.contains("runtimes:"), "{one:#?}");
    let json = fx.smctl(&["node", "node-2", "--json"]).await.json();
    assert_eq!(json["node_id"], "node-2");

    fx.smctl(&["node", "nope"]).await.failed_with("NOT_FOUND");
    let empty = fx.smctl(&["node", ""]).await;
    empty.failed_with("INVALID_ARGUMENT");
    assert!(empty.stderr.contains("node_id"), "{empty:#?}");

    // A node that leaves is listed as departed, with its reason.
    assert!(fx.sim().node("node-3").unwrap().drop_stream());
    let recorder = fx.running().recorder.clone();
    assert!(
        recorder
            .wait_until(DEADLINE, |s| s
                .node("node-3")
                .is_some_and(|n| n.disconnects >= 1))
            .await
    );
    let json = fx.smctl(&["--json", "nodes"]).await.json();
    let departed = json["departed"].as_array().unwrap();
    // It may be back already (the simulator reconnects); if not, it is departed.
    let listed: Vec<&str> = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    if !listed.contains(&"node-3") {
        assert_eq!(departed[0]["node_id"], "node-3", "{json}");
    }
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_status_check_and_set() {
    let fx = Fixture::start(2, |c| c).await;

    let status = fx.smctl(&["config", "status", "node-1"]).await;
    assert!(status.ok, "{status:#?}");
    assert!(status.stdout.contains("state:   absent"), "{status:#?}");

    let file = fx.file("config.json", CONFIG);
    let file = file.to_str().unwrap();
    let check = fx.smctl(&["config", "check", "node-1", file]).await;
    assert!(check.ok, "{check:#?}");
    assert!(check.stdout.contains("2.0.0"), "{check:#?}");

    let set = fx
        .smctl(&["--json", "config", "set", "node-1", file])
        .await
        .json();
    assert_eq!(set["version"], "2.0.0");

    let status = fx
        .smctl(&["config", "status", "node-1", "--json"])
        .await
        .json();
    assert_eq!(status["state"], "installed");
    assert_eq!(status["version"], "2.0.0");
    // node-2 was left alone.
    let other = fx
        .smctl(&["--json", "config", "status", "node-2"])
        .await
        .json();
    assert_eq!(other["state"], "absent");

    // Bad input names the field.
    let bad = fx.file("bad.json", "{not json");
    let run = fx
        .smctl(&["config", "check", "node-1", bad.to_str().unwrap()])
        .await;
    run.failed_with("INVALID_ARGUMENT");
    assert!(run.stderr.contains("node_config"), "{run:#?}");
    fx.smctl(&["config", "set", "nope", file])
        .await
        .failed_with("NOT_FOUND");
    fx.smctl(&["config", "status", "nope"])
        .await
        .failed_with("NOT_FOUND");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_deadline_exceeded() {
    let fx = Fixture::start_with(2, Duration::from_millis(500), |c| {
        c.with_node_behaviour(1, Behaviour::never_answer())
    })
    .await;
    let run = fx.smctl(&["config", "status", "node-2"]).await;
    run.failed_with("DEADLINE_EXCEEDED");
    assert!(run.stderr.contains("node-2"), "{run:#?}");
    fx.smctl(&["monitoring", "node-2"])
        .await
        .failed_with("DEADLINE_EXCEEDED");
    // node-1 answers.
    assert!(fx.smctl(&["config", "status", "node-1"]).await.ok);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_mid_call_is_unavailable() {
    let fx = Fixture::start_with(1, Duration::from_secs(15), |c| {
        c.with_node_behaviour(0, Behaviour::answer_delay(Duration::from_secs(30)))
    })
    .await;
    let mut events = fx.sim().subscribe();
    let admin = fx.admin();
    let call = tokio::spawn(async move {
        run(tokio::process::Command::new(SMCTL)
            .args(["--admin", &admin, "config", "status", "node-1"]))
        .await
    });
    // Once the node has the command, it goes away.
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = events.recv().await.unwrap();
            if let SimEventKind::Received(m) = &event.kind
                && matches!(
                    m.sm_incoming_message,
                    Some(SmIncomingMessage::GetNodeConfigStatus(_))
                )
            {
                break;
            }
        }
    })
    .await
    .expect("the node receives the command");
    assert!(fx.sim().node("node-1").unwrap().drop_stream());
    let run = call.await.unwrap();
    run.failed_with("UNAVAILABLE");
    assert!(run.stderr.contains("node-1"), "{run:#?}");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_networks_monitoring_cloud_and_events() {
    let fx = Fixture::start(2, |c| SimConfig {
        monitoring_rate: 20.0,
        alert_rate: 10.0,
        ..c
    })
    .await;

    // Follow every event from here on.
    let mut follow = tokio::process::Command::new(SMCTL)
        .args(["--admin", &fx.admin(), "events", "--json"])
        .env_remove("SMCTL_ADMIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    // A filtered follower: alerts of node-2 only, three of them.
    let admin = fx.admin();
    let filtered = tokio::spawn(async move {
        run(tokio::process::Command::new(SMCTL).args([
            "--admin", &admin, "events", "--node", "node-2", "--kind", "alert", "--count", "3",
        ]))
        .await
    });
    // Both subscribed: the follower prints its first monitoring event.
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("an event within the deadline")
        .unwrap()
        .unwrap();
    assert!(first.starts_with('{'), "{first}");

    // update_instances: one to start, one to stop; the statuses come as events.
    let start = fx.file(
        "start.json",
        r#"[{"instance": {"itemId": "svc", "subjectId": "subj", "instance": 0},
            "version": "1.0.0", "manifestDigest": "sha256:aa", "runtimeId": "runc"}]"#,
    );
    let stop = fx.file(
        "stop.json",
        r#"{"item_id": "old", "subject_id": "subj", "instance": 1}"#,
    );
    let run_ = fx
        .smctl(&[
            "instances",
            "update",
            "node-1",
            "--start",
            start.to_str().unwrap(),
            "--stop",
            stop.to_str().unwrap(),
        ])
        .await;
    assert!(run_.ok, "{run_:#?}");
    assert!(run_.stdout.contains("1 to start, 1 to stop"), "{run_:#?}");
    let bad = fx.file("bad-start.json", r#"[{"version": 3}]"#);
    fx.smctl(&[
        "instances",
        "update",
        "node-1",
        "--start",
        bad.to_str().unwrap(),
    ])
    .await;
    fx.smctl(&[
        "instances",
        "update",
        "nope",
        "--start",
        start.to_str().unwrap(),
    ])
    .await
    .failed_with("NOT_FOUND");
    let no_ident = fx.file("no-ident.json", r#"[{"version": "1"}]"#);
    let run_ = fx
        .smctl(&[
            "instances",
            "update",
            "node-1",
            "--start",
            no_ident.to_str().unwrap(),
        ])
        .await;
    run_.failed_with("INVALID_ARGUMENT");
    assert!(run_.stderr.contains("start_instances[0]"), "{run_:#?}");

    // update_networks.
    let networks = fx.file(
        "networks.json",
        r#"[{"network_id": "net1", "subnet": "10.0.0.0/24", "ip": "10.0.0.5", "vlan_id": 3}]"#,
    );
    let run_ = fx
        .smctl(&["networks", "update", "node-1", networks.to_str().unwrap()])
        .await;
    assert!(run_.ok, "{run_:#?}");
    assert!(run_.stdout.contains("1 networks"), "{run_:#?}");
    let json = fx
        .smctl(&[
            "--json",
            "networks",
            "update",
            "node-2",
            networks.to_str().unwrap(),
        ])
        .await
        .json();
    assert!(json.is_object());

    // Averaged monitoring.
    let run_ = fx.smctl(&["monitoring", "node-1"]).await;
    assert!(run_.ok, "{run_:#?}");
    assert!(run_.stdout.contains("ram"), "{run_:#?}");
    let json = fx.smctl(&["monitoring", "node-2", "--json"]).await.json();
    assert!(json["node_monitoring"].is_object(), "{json}");
    fx.smctl(&["monitoring", "nope"])
        .await
        .failed_with("NOT_FOUND");

    // Cloud state: relayed to both nodes.
    let run_ = fx.smctl(&["cloud", "connected"]).await;
    assert!(run_.ok, "{run_:#?}");
    assert!(run_.stdout.contains("relayed to 2"), "{run_:#?}");
    let sim = fx.sim();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let stats = sim.stats();
            if stats.nodes.iter().all(|n| n.last_cloud_status == Some(1)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both nodes hear the cloud connected");
    let json = fx.smctl(&["--json", "cloud", "disconnected"]).await.json();
    assert_eq!(json["nodes"], "2");

    // A log request: its parts show up as events too.
    let run_ = fx.smctl(&["logs", "system", "--node", "node-1"]).await;
    assert!(run_.ok, "{run_:#?}");

    // A reconnect: disconnected, connected, sm_info, node_instances_status.
    assert!(fx.sim().node("node-1").unwrap().drop_stream());

    let mut kinds = HashSet::new();
    let wanted = [
        "connected",
        "disconnected",
        "sm_info",
        "instance_status",
        "node_instances_status",
        "monitoring",
        "alert",
        "log",
    ];
    let mut instance_started = false;
    tokio::time::timeout(DEADLINE, async {
        while !wanted.iter().all(|k| kinds.contains(*k)) || !instance_started {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the follower goes on");
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            for kind in wanted {
                if !event[kind].is_null() {
                    kinds.insert(kind);
                }
            }
            if event["instance_status"]["instance"]["item_id"] == "svc" {
                assert_eq!(event["node_id"], "node-1");
                instance_started = true;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not every kind of event came; seen {kinds:?}"));
    drop(follow);

    let filtered = filtered.await.unwrap();
    assert!(filtered.ok, "{filtered:#?}");
    let lines: Vec<&str> = filtered.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{filtered:#?}");
    assert!(
        lines.iter().all(|l| l.contains(" node-2 alert ")),
        "{filtered:#?}"
    );
    fx.smctl(&["events", "--kind", "nonsense"]).await;
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_assembled_per_node() {
    let fx = Fixture::start(2, |c| c).await;
    let run_ = fx.smctl(&["logs", "system"]).await;
    assert!(run_.ok, "{run_:#?}");
    for node in ["node-1", "node-2"] {
        assert!(
            run_.stdout
                .contains(&format!("==> {node}: 2 part(s), status ok")),
            "{run_:#?}"
        );
    }
    let first = run_.stdout.find("part 1/2").expect("part 1");
    let second = run_.stdout.find("part 2/2").expect("part 2");
    assert!(first < second, "parts in order: {run_:#?}");

    let json = fx
        .smctl(&[
            "--json", "logs", "instance", "--node", "node-2", "--item", "svc",
        ])
        .await;
    assert!(json.ok, "{json:#?}");
    let parts: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parts.len(), 2, "{json:#?}");
    assert!(parts.iter().all(|p| p["node_id"] == "node-2"));

    let crash = fx
        .smctl(&["logs", "crash", "--node", "node-1", "--node", "nope"])
        .await;
    crash.failed_with("NOT_FOUND");
    assert!(crash.stderr.contains("nope"), "{crash:#?}");
    let bad_time = fx.smctl(&["logs", "system", "--from", "yesterday"]).await;
    assert!(!bad_time.ok);
    assert!(bad_time.stderr.contains("RFC 3339"), "{bad_time:#?}");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_not_on_the_sm_listener() {
    let fx = Fixture::start(1, |c| c).await;
    // The SM listener does not serve the admin service.
    let sm_addr = fx.running().addr.to_string();
    let run_ = run(tokio::process::Command::new(SMCTL).args(["--admin", &sm_addr, "nodes"])).await;
    run_.failed_with("UNIMPLEMENTED");

    // The socket is for its owner and group only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fx.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");

    // SMCTL_ADMIN names the endpoint like --admin.
    let via_env = run(tokio::process::Command::new(SMCTL)
        .arg("nodes")
        .env("SMCTL_ADMIN", fx.admin()))
    .await;
    // (run() removes SMCTL_ADMIN; set it again after.)
    let _ = via_env;
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(SMCTL)
            .arg("nodes")
            .env("SMCTL_ADMIN", fx.admin())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-1"));

    // A second daemon cannot take a live socket.
    let mut other = app::start(
        &Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            insecure: true,
            ..Settings::default()
        },
        Recorder::new(),
        Arc::new(Blobs),
    )
    .await
    .unwrap();
    let err = other
        .serve_admin(&AdminEndpoint::Unix(fx.socket.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    // Nor a non-loopback TCP address.
    let err = other
        .serve_admin(&AdminEndpoint::Tcp("192.0.2.7:9000".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
    // A loopback port works.
    let tcp = other
        .serve_admin(&AdminEndpoint::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let run_ = run(tokio::process::Command::new(SMCTL).args([
        "--admin",
        &tcp.to_string(),
        "--json",
        "nodes",
    ]))
    .await;
    assert_eq!(run_.json()["nodes"].as_array().unwrap().len(), 0);
    other.stop().await.unwrap();

    // The socket file goes with the daemon.
    let socket = fx.socket.clone();
    fx.stop().await;
    assert!(!Path::new(&socket).exists());
}

/// A daemon speaking 9.1 (with its default network provider, in memory), no SMs, its admin
/// API on a socket in the directory it returns.
async fn daemon_91() -> (Running, tempfile::TempDir, PathBuf) {
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        insecure: true,
        sm_protocol: smcontroller_api::SmProtocol::V9_1,
        network_state_file: None,
        ..Settings::default()
    };
    let mut running = app::start(&settings, Recorder::new(), Arc::new(Blobs))
        .await
        .expect("a 9.1 daemon starts");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    running
        .serve_admin(&AdminEndpoint::Unix(socket.clone()))
        .await
        .unwrap();
    (running, dir, socket)
}

/// R-REV-1: the wire revision is visible to an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_names_the_wire_revision_the_controller_speaks() {
    let fx = Fixture::start(1, |c| c).await;
    let text = fx.smctl(&["info"]).await;
    assert!(text.ok, "{text:#?}");
    assert!(text.stdout.contains("sm protocol:     9.0"), "{text:#?}");
    assert!(
        text.stdout.contains("network service: not served"),
        "{text:#?}"
    );
    let json = fx.smctl(&["--json", "info"]).await.json();
    assert_eq!(json["sm_protocol"], "9.0", "{json}");
    assert_eq!(json["nodes"], "1", "{json}");
    fx.stop().await;

    let (running, _dir, socket) = daemon_91().await;
    let json = run(tokio::process::Command::new(SMCTL)
        .arg("--admin")
        .arg(format!("unix:{}", socket.display()))
        .args(["--json", "info"]))
    .await
    .json();
    assert_eq!(json["sm_protocol"], "9.1", "{json}");
    assert_eq!(json["network_service"], true, "{json}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_list_shows_the_network_providers_networks() {
    let fx = Fixture::start(1, |c| c).await;
    // This daemon speaks 9.0: it has no network provider to list.
    let run_ = fx.smctl(&["networks", "list"]).await;
    run_.failed_with("FAILED_PRECONDITION");
    assert!(run_.stderr.contains("update_networks"), "{run_:#?}");

    fx.stop().await;

    // A 9.1 daemon: its admin API shows its network provider.
    let (running, _dir, socket) = daemon_91().await;
    let networks = running.networks.clone().expect("a 9.1 daemon has networks");
    let smctl = |args: &'static [&'static str]| {
        let admin = format!("unix:{}", socket.display());
        async move {
            run(tokio::process::Command::new(SMCTL)
                .arg("--admin")
                .arg(admin)
                .args(args))
            .await
        }
    };

    let empty = smctl(&["networks", "list"]).await;
    assert!(empty.ok, "{empty:#?}");
    assert!(
        empty
            .stdout
            .contains("no networks yet (pool 172.17.0.0/16)"),
        "{empty:#?}"
    );

    for n in ["node-1", "node-2"] {
        networks
            .get_node_network_params("net-a", &NodeId::new(n))
            .await
            .unwrap();
    }
    networks
        .get_node_network_params("net-b", &NodeId::new("node-2"))
        .await
        .unwrap();
    let instance = InstanceIdent {
        item_id: "svc".into(),
        subject_id: "subj".into(),
        instance: 1,
        ..InstanceIdent::default()
    };
    networks
        .allocate_instance_network(
            &instance,
            "net-a",
            &NodeId::new("node-2"),
            &ItemNetworkParameters::default(),
        )
        .await
        .unwrap();

    let table = smctl(&["networks", "list"]).await;
    assert!(table.ok, "{table:#?}");
    for text in [
        "pool 172.17.0.0/16",
        "net-a",
        "172.17.0.0/24",
        "node-1 172.17.0.1, node-2 172.17.0.2",
        "net-b",
        "172.17.1.0/24",
        "svc/subj/1",
        "172.17.0.3",
    ] {
        assert!(table.stdout.contains(text), "{text} missing: {table:#?}");
    }

    let json = smctl(&["networks", "list", "--json"]).await.json();
    assert_eq!(json["pool"], "172.17.0.0/16");
    let listed = json["networks"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{json}");
    assert_eq!(listed[0]["network_id"], "net-a");
    assert_eq!(listed[0]["subnet"], "172.17.0.0/24");
    assert_eq!(listed[0]["vlan_id"], 1);
    assert_eq!(listed[1]["vlan_id"], 2);
    assert_eq!(listed[0]["hosts"][1]["node_id"], "node-2");
    assert_eq!(listed[0]["hosts"][1]["ip"], "172.17.0.2");
    let instances = listed[0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{json}");
    assert_eq!(instances[0]["instance"]["item_id"], "svc");
    assert_eq!(instances[0]["instance"]["instance"], "1");
    assert_eq!(instances[0]["node_id"], "node-2");
    assert_eq!(instances[0]["ip"], "172.17.0.3");

    running.stop().await.unwrap();
}

#[tokio::test]
async fn without_options_smctl_looks_for_the_daemons_default_socket() {
    // No daemon is asked here: the error says where smctl looked, which is where smcontrollerd
    // serves by default for this user and environment.
    let run_ = run(tokio::process::Command::new(SMCTL).arg("nodes")).await;
    if run_.ok {
        // A daemon with its defaults runs on this machine: smctl reached it.
        return;
    }
    let expected = default_socket_path();
    assert!(
        run_.stderr.contains(&expected.display().to_string()),
        "smctl did not look at {}: {run_:#?}",
        expected.display()
    );
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for args in [
        &["--help"][..],
        &["nodes", "--help"],
        &["node", "--help"],
        &["config", "--help"],
        &["config", "status", "--help"],
        &["config", "check", "--help"],
        &["config", "set", "--help"],
        &["instances", "update", "--help"],
        &["networks", "list", "--help"],
        &["networks", "update", "--help"],
        &["logs", "--help"],
        &["logs", "system", "--help"],
        &["logs", "instance", "--help"],
        &["logs", "crash", "--help"],
        &["monitoring", "--help"],
        &["cloud", "--help"],
        &["events", "--help"],
    ] {
        let run_ = run(tokio::process::Command::new(SMCTL).args(args)).await;
        assert!(run_.ok, "{args:?}: {run_:#?}");
        assert!(run_.stdout.contains("Usage: smctl"), "{args:?}: {run_:#?}");
    }
}
