//! The daemon on a busy machine (issue 15): with a CPU-bound thread per core spinning for the
//! whole test, `smcontrollerd` still becomes ready (its ready file, never a log line), and the
//! demo's path works: simulated SMs register over mTLS, the admin API on its socket lists them
//! and relays a sync call and the cloud state, and SIGTERM stops it cleanly.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use smcontroller_admin::{
    client,
    proto::v1::{
        EventKind, ListNodesRequest, NodeRequest, SetCloudStateRequest, WatchEventsRequest,
    },
    server::AdminEndpoint,
};
use smcontroller_certs::test_util::TestPki;
use smcontroller_sim::{SimConfig, SimTls, Simulator};

mod process;

use process::{DEADLINE, Daemon};

/// The longest the hog spins, whatever happens to the test.
const HOG_LIMIT: Duration = Duration::from_secs(120);

/// One spinning thread per core until dropped (or [`HOG_LIMIT`]).
struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl CpuHog {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let until = Instant::now() + HOG_LIMIT;
                    let mut spins = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        spins = std::hint::black_box(spins.wrapping_add(1));
                    }
                    spins
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_gets_ready_and_serves_the_demo_path_while_every_core_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new()
        .unwrap()
        .write_dev_pki(dir.path(), 3)
        .unwrap();
    let socket = dir.path().join("admin.sock");
    let hog = CpuHog::start();

    let mut daemon = tokio::task::block_in_place(|| {
        Daemon::start(&[
            "--pki",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-socket",
            socket.to_str().unwrap(),
        ])
    });
    assert!(daemon.ready.mtls, "{:?}", daemon.ready);
    assert_eq!(
        daemon.ready.admin,
        [format!("unix:{}", socket.display())],
        "ready means the admin API serves too"
    );

    // The admin socket answers at once: nothing to wait for once the daemon is ready.
    let mut admin = client::connect(&AdminEndpoint::Unix(socket.clone()))
        .await
        .expect("the admin socket answers once the daemon is ready");
    // As the demo does, but on the events rather than by asking again and again: each node's
    // registration (sm_info) as the admin API reports it.
    let mut events = admin
        .watch_events(WatchEventsRequest {
            node_ids: vec![],
            kinds: vec![EventKind::SmInfo.into()],
        })
        .await
        .expect("WatchEvents")
        .into_inner();
    let sim = Simulator::start(SimConfig {
        tls: Some(SimTls::from_pki_dir(dir.path()).unwrap()),
        ..SimConfig::new(format!("https://{}", daemon.addr), 3)
    })
    .unwrap();
    let mut registered = BTreeSet::new();
    while registered.len() < 3 {
        let event = tokio::time::timeout(DEADLINE, events.message())
            .await
            .unwrap_or_else(|_| panic!("only {registered:?} registered; {}", sim.stats()))
            .expect("the event stream")
            .expect("the event stream goes on");
        registered.insert(event.node_id);
    }
    let nodes = admin
        .list_nodes(ListNodesRequest {})
        .await
        .expect("ListNodes")
        .into_inner()
        .nodes;
    assert_eq!(
        nodes.iter().filter(|n| !n.runtimes.is_empty()).count(),
        3,
        "{nodes:?}"
    );
    let status = admin
        .get_node_config_status(NodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .expect("node-1 answers through the admin API")
        .into_inner();
    assert_eq!(status.state, "absent");
    admin
        .set_cloud_state(SetCloudStateRequest { connected: true })
        .await
        .expect("the cloud state is relayed");

    sim.stop().await;
    let (success, _) = tokio::task::block_in_place(|| daemon.terminate());
    drop(hog);
    assert!(success, "log: {:#?}", daemon.log);
    assert!(!socket.exists(), "the admin socket is removed at the stop");
}
