//! Slowloris with a lowered open-file limit (R-BAD-3, issue 9 item 2): about a thousand TCP
//! connections that never send the HTTP/2 preface, until the server cannot accept any more
//! (EMFILE). The SMs connected before still answer; the accept loop backs off instead of
//! spinning (the process stays well under one core); after the handshake timeout the idle
//! sockets are closed and a new SM registers.
//!
//! A binary of its own: the test lowers RLIMIT_NOFILE of its whole process to 1,024. The
//! attacker runs in a child process (this same executable, test `slowloris_attacker`, with its
//! own, raised limit), so its sockets do not count against the server's.

mod hostile_support;
mod support;

use std::{
    io::{BufRead as _, Read as _, Seek as _, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hostile_support::{Hostile, eventually};
use rlimit::Resource;
use smcontroller_certs::AcceptSettings;
use smcontroller_grpc::server::ServerSettings;
use smcontroller_limits::Budget;
use smcontroller_routing::Settings;
use support::DEADLINE;

/// The environment variable that makes [`slowloris_attacker`] attack the address it holds.
const ATTACKER: &str = "SMCONTROLLER_TEST_SLOWLORIS_ATTACKER";
/// The server process's open-file limit in this test, as in the issue.
const NOFILE: u64 = 1_024;
/// Connections the attacker keeps open: more than the server can hold.
const HOLD: usize = 1_100;
/// The handshake timeout of the server under attack.
const HANDSHAKE: Duration = Duration::from_secs(3);
/// Prefix of the attacker's report lines on its stdout.
const REPORT: &str = "@attacker ";

/// The attacker: runs only in the child process the slowloris test starts.
///
/// Keeps [`HOLD`] connections open that send three bytes of the HTTP/2 preface and no more,
/// reconnecting each one the server closes (bounded: 20,000 connects, 60 s), until told `hold` on stdin (then it keeps what it has and
/// opens no more). Answers `status` with `open N closed N`. Exits when stdin closes.
#[test]
fn slowloris_attacker() {
    let Ok(addr) = std::env::var(ATTACKER) else {
        return; // run as an ordinary test: nothing to do
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let hard = rlimit::getrlimit(Resource::NOFILE).unwrap().1;
    rlimit::setrlimit(Resource::NOFILE, hard.min(20_000), hard).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let open = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let hold = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        for _ in 0..HOLD {
            let (open, closed, connects, hold) =
                (open.clone(), closed.clone(), connects.clone(), hold.clone());
            tokio::spawn(async move {
                loop {
                    if connects.fetch_add(1, Ordering::Relaxed) >= 20_000
                        || started.elapsed() > Duration::from_secs(60)
                    {
                        return;
                    }
                    let connect = tokio::net::TcpStream::connect(addr);
                    let Ok(Ok(mut tcp)) =
                        tokio::time::timeout(Duration::from_secs(2), connect).await
                    else {
                        continue;
                    };
                    // The first bytes of the preface, never the rest. A connection the
                    // server never took (its listen backlog overflowed by the burst, the last
                    // ACK of the handshake dropped) answers them with a reset, and is opened
                    // again.
                    if tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PRI")
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0_u8; 256];
                    loop {
                        match tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                    closed.fetch_add(1, Ordering::Relaxed);
                    if hold.load(Ordering::Relaxed) {
                        return;
                    }
                }
            });
        }
        // Commands come on stdin, read on a thread of its own.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(command) = rx.recv().await {
            if command.trim() == "hold" {
                hold.store(true, Ordering::Relaxed);
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{REPORT}open {} closed {} connects {}",
                open.load(Ordering::Relaxed),
                closed.load(Ordering::Relaxed),
                connects.load(Ordering::Relaxed)
            );
            let _ = out.flush();
        }
        std::process::exit(0);
    });
}

/// The attacker process, driven line by line.
struct Attacker {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: std::sync::mpsc::Receiver<(u64, u64)>,
}

impl Attacker {
    fn start(addr: SocketAddr) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "slowloris_attacker",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ATTACKER, addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the attacker process starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest's "test slowloris_attacker ... " may begin the first line.
                let Some(at) = line.find(REPORT) else {
                    continue;
                };
                let report = &line[at + REPORT.len()..];
                let words: Vec<&str> = report.split_whitespace().collect();
                let open = words.get(1).and_then(|w| w.parse().ok()).unwrap_or(0);
                let closed = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0);
                if tx.send((open, closed)).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            reports,
        }
    }

    /// Sends `command`; the attacker's (open, closed) right after it.
    async fn ask(&mut self, command: &str) -> (u64, u64) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let reports = &self.reports;
        tokio::task::block_in_place(|| reports.recv_timeout(DEADLINE))
            .expect("the attacker answers")
    }

    /// Asks `status` (every 100 ms) until `pred` holds of (open, closed), within `within`.
    async fn wait(&mut self, what: &str, within: Duration, pred: impl Fn(u64, u64) -> bool) {
        let started = Instant::now();
        loop {
            let (open, closed) = self.ask("status").await;
            if pred(open, closed) {
                return;
            }
            assert!(
                started.elapsed() < within,
                "timed out waiting for {what}: the attacker has {open} open, {closed} closed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU time of this process from a `/proc/self/stat` opened before the process
/// ran out of file descriptors (re-read from its start each time), at 100 ticks per second.
struct CpuClock(std::fs::File);

impl CpuClock {
    fn open() -> Self {
        Self(std::fs::File::open("/proc/self/stat").unwrap())
    }

    fn read(&mut self) -> Duration {
        let mut text = String::new();
        self.0.rewind().unwrap();
        self.0.read_to_string(&mut text).unwrap();
        let rest = &text[text.rfind(')').unwrap() + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields[11].parse().unwrap();
        let stime: u64 = fields[12].parse().unwrap();
        Duration::from_millis((utime + stime) * 10)
    }
}

/// File descriptors open in this process; `None` when it has none left to look.
fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// Whether this process has used up its file descriptors (opening the fd directory fails with
/// EMFILE) or nearly.
fn out_of_fds() -> bool {
    match std::fs::read_dir("/proc/self/fd") {
        Err(e) => e.raw_os_error() == Some(24),
        Ok(dir) => dir.count() as u64 >= NOFILE - 16,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_bad_3_slowloris_at_the_open_file_limit_leaves_the_server_responsive_and_idle() {
    let (_, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    rlimit::setrlimit(Resource::NOFILE, NOFILE.min(hard), hard).unwrap();
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            accept: AcceptSettings::default().with_handshake_timeout(HANDSHAKE),
            ..ServerSettings::default()
        },
    )
    .await;
    let mut cpu = CpuClock::open();
    let mut attacker = Attacker::start(h.addr);

    attacker
        .wait(
            "the attacker's connections open",
            Duration::from_secs(30),
            |open, _| open as usize >= HOLD - 50,
        )
        .await;
    eventually(
        "the server out of file descriptors",
        Duration::from_secs(30),
        out_of_fds,
    )
    .await;

    // Saturated: the SMs connected before answer, and the process is not spinning.
    h.good_ones_answer("with the process out of file descriptors")
        .await;
    let (wall, before) = (Instant::now(), cpu.read());
    // A measurement window, not a synchronisation: CPU time over two seconds of attack.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu.read().saturating_sub(before);
    let share = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    println!(
        "CPU while saturated: {used:?} over {:?} ({:.0} %)",
        wall.elapsed(),
        share * 100.0
    );
    assert!(
        share < 0.30,
        "the process used {:.0} % of a core while out of file descriptors (accept loop spinning?)",
        share * 100.0
    );
    h.good_ones_answer("after two seconds out of file descriptors")
        .await;
    // A new SM gets in while the attack goes on: the oldest connection that never sent its
    // preface gives its file descriptor (R-BAD-3).
    h.newcomer_registers("with the attacker holding every file descriptor")
        .await;
    assert!(h.controller.refusals().get(Budget::Connections) >= 1);

    // The attacker stops reconnecting but keeps its sockets: only the server's handshake
    // timeout can close them.
    attacker.ask("hold").await;
    // (Some of the attacker's sockets may never have been accepted: past a full listen
    // backlog the kernel drops the last ACK of their handshake, so only the attacker sees them
    // open. What counts is what the server holds.)
    eventually(
        "the server closing the idle sockets",
        Duration::from_secs(30),
        || open_fds().is_some_and(|n| n < 128),
    )
    .await;
    let closed = h.controller.refusals().get(Budget::Handshake);
    assert!(
        closed >= 500,
        "{closed} connections closed at the handshake timeout"
    );
    h.healthy("after the slowloris").await;
    drop(attacker);
    h.stop().await;
}
