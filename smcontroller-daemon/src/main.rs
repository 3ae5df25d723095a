//! `smcontrollerd`: the SM controller daemon.
//!
//! Reads the config (`--config`, JSON, the CM's keys plus ours), serves `SMService` over mTLS
//! (or plain HTTP/2 with `--insecure`, logged as a warning), records what nodes send in its log,
//! and exits cleanly on SIGINT/SIGTERM. A bad config, or TLS credentials that cannot be loaded
//! at start, exit with 64. Under systemd (`Type=notify`, `packaging/smcontrollerd.service`) it
//! notifies `READY=1` once it listens and `STOPPING=1` when it stops; with `--ready-file PATH`
//! it also writes where it serves to PATH at that moment (see `smcontroller_daemon::ready`).

use std::process::ExitCode;

use clap::Parser;
use smcontroller_daemon::{
    app,
    config::{self, Cli, EXIT_BAD_CONFIG},
    ready::Ready,
    receivers::Recorder,
};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());
    let settings = match config::load(&cli) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("smcontrollerd: bad configuration: {e}");
            return exit(EXIT_BAD_CONFIG);
        }
    };
    if !settings.unknown_keys.is_empty() {
        info!(keys = ?settings.unknown_keys, "config keys not used by the SM controller");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("smcontrollerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut signals = StopSignals::listen();
        // Before anything records a metric.
        if let Some(addr) = settings.metrics_listen {
            if let Err(e) = app::serve_metrics(addr) {
                error!(error = %e, %addr, "cannot serve metrics");
                eprintln!("smcontrollerd: cannot serve metrics on {addr} (metricsListen): {e}");
                return ExitCode::FAILURE;
            }
            metrics::gauge!("smcontroller_sm_protocol_info", "revision" => settings.sm_protocol.as_str())
                .set(1.0);
        }
        let blobs = app::blob_resolver(&settings);
        let mut running = match app::start(&settings, Recorder::new(), blobs).await {
            Ok(running) => running,
            Err(e) => {
                error!(error = %e, "cannot serve");
                if e.exit_code() == EXIT_BAD_CONFIG {
                    eprintln!("smcontrollerd: bad configuration: {e}");
                } else {
                    eprintln!("smcontrollerd: {e}");
                }
                return exit(e.exit_code());
            }
        };
        info!(addr = %running.addr, sm_protocol = %settings.sm_protocol, "SM controller listening");
        if settings.metrics_listen.is_some() {
            running.publish_gauges();
        }
        serve_admin(&mut running, &settings).await;
        if let Some(path) = &cli.ready_file {
            let ready = Ready {
                pid: std::process::id(),
                sm_listen: running.addr,
                mtls: !settings.insecure,
                sm_protocol: settings.sm_protocol,
                admin: running
                    .admin_endpoints()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                metrics: settings.metrics_listen,
            };
            if let Err(e) = ready.write(path) {
                error!(error = %e, path = %path.display(), "cannot write the ready file");
                eprintln!(
                    "smcontrollerd: cannot write the ready file {}: {e}",
                    path.display()
                );
                let _ = running.stop().await;
                return ExitCode::FAILURE;
            }
        }
        notify_systemd(&[
            "READY=1",
            &format!("STATUS=serving SMs on {}", running.addr),
        ]);
        let signal = signals.wait().await;
        info!(signal, "stopping");
        notify_systemd(&["STOPPING=1"]);
        if let Some(path) = &cli.ready_file {
            let _ = std::fs::remove_file(path);
        }
        match running.stop().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                warn!(error = %e, "server ended with an error");
                ExitCode::FAILURE
            }
        }
    })
}

/// Serves the admin API on `adminSocket` and `adminListen`. The SMs come first: an admin
/// endpoint that cannot be served is logged, and the daemon serves SMs without it.
async fn serve_admin(running: &mut app::Running, settings: &config::Settings) {
    use smcontroller_admin::server::AdminEndpoint;
    let endpoints = settings
        .admin_socket
        .path()
        .map(AdminEndpoint::Unix)
        .into_iter()
        .chain(settings.admin_listen.map(AdminEndpoint::Tcp));
    for endpoint in endpoints {
        if let Err(e) = running.serve_admin(&endpoint).await {
            warn!(error = %e, "the admin API (smctl) is not served there");
        }
    }
}

/// Tells systemd how the daemon is doing (`Type=notify`: `READY=1` once it listens,
/// `STOPPING=1` when it stops); nothing when `NOTIFY_SOCKET` is unset, as outside systemd.
fn notify_systemd(states: &[&str]) {
    #[cfg(unix)]
    {
        let states: Vec<_> = states
            .iter()
            .map(|s| sd_notify::NotifyState::Custom(s))
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            warn!(error = %e, "cannot notify systemd");
        }
    }
    #[cfg(not(unix))]
    let _ = states;
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(flag: Option<&str>) {
    let filter = flag
        .map(EnvFilter::try_new)
        .unwrap_or_else(|| {
            EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info"))
        })
        .unwrap_or_else(|e| {
            eprintln!("smcontrollerd: bad log filter ({e}); using \"info\"");
            EnvFilter::new("info")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// SIGINT and SIGTERM, listened for from the start: a signal that comes as soon as the daemon
/// has said it is ready (a service manager stopping it at once) must stop it cleanly, not find
/// the default action that kills the process.
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Installs the handlers now. Must be called within the runtime.
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .inspect_err(|e| warn!(error = %e, "cannot listen for {name}"))
                    .ok()
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// The first stop signal; its name.
    async fn wait(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.int) => "SIGINT",
                () = next(&mut self.term) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
