//! `smcontrollerd` as a real process, for the tests that run the binary: started with a
//! test's arguments, ready when it has written its ready file (`--ready-file`, never a log
//! line), its log (stderr) read line by line, stopped with SIGTERM, and killed if the test fails
//! first (no process is left behind).

#![allow(dead_code, unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use smcontroller_daemon::ready::{self, Ready};

/// The daemon binary of this crate.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_smcontrollerd");

/// How long the daemon may take to get ready, or to log what a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `smcontrollerd`.
pub struct Daemon {
    child: Child,
    exited: bool,
    /// The address its SM port listens on (from its ready file).
    pub addr: SocketAddr,
    /// What it wrote to its ready file.
    pub ready: Ready,
    /// Holds the ready file.
    _dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    /// Every log line read so far.
    pub log: Vec<String>,
}

impl Daemon {
    /// Starts the daemon with `args` (which should listen on port 0) and waits until it is
    /// ready. See [`start_with`](Self::start_with).
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, &[])
    }

    /// Starts the daemon with `args` and the environment `env`, and waits until it has written
    /// its ready file (every listener up); panics with its log if it exits first or is not
    /// ready within [`DEADLINE`]. The daemon logs at `info`, without colours, and is told nothing
    /// of systemd unless `env` says so. Without `--config` or `--admin-socket` among `args` it
    /// serves no admin socket: tests run at once, and as root its default is in `/run`.
    pub fn start_with(args: &[&str], env: &[(&str, &Path)]) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the ready file");
        let ready_file = dir.path().join("ready.json");
        let mut command = Command::new(DAEMON);
        command
            .args(args)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(["--log", "info"])
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped());
        if !args
            .iter()
            .any(|a| *a == "--config" || *a == "--admin-socket")
        {
            command.args(["--admin-socket", "off"]);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the daemon starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let waited = ready::wait(&ready_file, &mut child, DEADLINE);
        let ready = match waited {
            Ok(ready) => ready,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // The reader ends at the end of stderr: the daemon has exited.
                let log: Vec<String> = lines.iter().collect();
                panic!("{e}; log: {log:#?}");
            }
        };
        Self {
            child,
            exited: false,
            addr: ready.sm_listen,
            ready,
            _dir: dir,
            lines,
            log: Vec::new(),
        }
    }

    /// The first line of the log that `pred` accepts, waiting for it if it has not been logged
    /// yet (every line read is kept in `log`); panics with the log so far after [`DEADLINE`].
    pub fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.log.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let give_up = Instant::now() + DEADLINE;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("line not logged ({e}); log: {:#?}", self.log),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit (blocking: from an async test, call it within
    /// `tokio::task::block_in_place`). Returns whether the daemon exited successfully and how
    /// long it took; the whole log is then in `log`.
    pub fn terminate(&mut self) -> (bool, Duration) {
        let started = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(kill.success());
        let status = self.child.wait().expect("the daemon is waited for");
        let took = started.elapsed();
        self.exited = true;
        // The reader ends at the end of stderr: the daemon has exited.
        self.log.extend(self.lines.iter());
        (status.success(), took)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
