//! The daemon's ready file (`--ready-file PATH`): how another program learns, without reading
//! the log, that `smcontrollerd` serves and where.
//!
//! Once every listener is up (the SM port, the admin endpoints, `/metrics`), at the same point
//! where it tells systemd `READY=1`, the daemon writes a [`Ready`] record as one JSON object to
//! the file, atomically (a temporary file in the same directory, renamed over the path), so a
//! reader sees the whole record or none. It removes the file when it stops.
//!
//! A program that starts the daemon passes a path of its own and calls [`wait`], which polls
//! for the file with a deadline and fails early, with the exit status, if the daemon exits
//! first. The demo, the tests that run the binary and the benchmarks all wait this way.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use smcontroller_api::SmProtocol;

/// What a serving daemon writes to its ready file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// The daemon's process id: a reader can tell a file of an earlier run from its own.
    pub pid: u32,
    /// The address the SM port is bound to (with the port chosen when `:0` was asked).
    pub sm_listen: SocketAddr,
    /// Whether the SM port speaks mTLS (`false`: plain HTTP/2, `--insecure`).
    pub mtls: bool,
    /// The wire revision it speaks (`smProtocol`): `"9.0"` or `"9.1"`.
    pub sm_protocol: SmProtocol,
    /// Where the admin API serves (`unix:PATH` or `ADDR`), in the order they were bound; empty
    /// when it is off or could not be served.
    pub admin: Vec<String>,
    /// Where `/metrics` is served, if it is.
    pub metrics: Option<SocketAddr>,
}

impl Ready {
    /// Writes the record to `path` atomically: a temporary file beside it, renamed over it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = temporary_beside(path);
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
    }

    /// The record in `path`, or `None` if there is no file (yet). A file that is there but not
    /// a record is an error naming the path.
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a ready file: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `PATH.tmp-PID`, in the directory of `path`, so that the rename stays on one file system.
fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Why [`wait`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The daemon exited before it was ready (a bad config, a port in use...).
    #[error("smcontrollerd exited before it was ready ({0})")]
    Exited(ExitStatus),
    /// The deadline passed without a ready file.
    #[error("smcontrollerd was not ready within {0:?} (no ready file)")]
    Timeout(Duration),
    /// The ready file or the process could not be read.
    #[error("waiting for smcontrollerd: {0}")]
    Io(#[from] io::Error),
}

/// How often [`wait`] looks for the file.
const POLL: Duration = Duration::from_millis(10);

/// Waits until the daemon `child`, started with `--ready-file path`, has written its record
/// there; at most `deadline`. Fails as soon as the daemon exits. A record with another pid (a
/// file left by an earlier run) is not taken.
pub fn wait(path: &Path, child: &mut Child, deadline: Duration) -> Result<Ready, WaitError> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(ready) = Ready::read(path)?
            && ready.pid == child.id()
        {
            return Ok(ready);
        }
        if let Some(status) = child.try_wait()? {
            return Err(WaitError::Exited(status));
        }
        if Instant::now() >= until {
            return Err(WaitError::Timeout(deadline));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Ready {
        Ready {
            pid: 42,
            sm_listen: "127.0.0.1:8093".parse().unwrap(),
            mtls: true,
            sm_protocol: SmProtocol::V9_1,
            admin: vec!["unix:/run/smcontroller/admin.sock".into()],
            metrics: None,
        }
    }

    #[test]
    fn a_written_record_reads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        assert_eq!(Ready::read(&path).unwrap(), None, "no file yet");
        record().write(&path).unwrap();
        assert_eq!(Ready::read(&path).unwrap(), Some(record()));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ready.json"]);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["smListen"], "127.0.0.1:8093", "{json}");
        assert_eq!(json["smProtocol"], "9.1", "{json}");
    }

    #[test]
    fn a_file_that_is_not_a_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        std::fs::write(&path, "{\"pid\": 1").unwrap();
        let e = Ready::read(&path).unwrap_err();
        assert!(e.to_string().contains("ready.json"), "{e}");
    }

    #[test]
    fn waiting_ends_with_the_exit_status_of_a_process_that_never_gets_ready() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("false").spawn().unwrap();
        let e = wait(
            &dir.path().join("ready.json"),
            &mut child,
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(matches!(e, WaitError::Exited(s) if !s.success()), "{e}");
    }

    #[test]
    fn a_record_of_another_process_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        record().write(&path).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let e = wait(&path, &mut child, Duration::from_millis(50)).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(e, WaitError::Timeout(_)), "{e}");
    }
}
