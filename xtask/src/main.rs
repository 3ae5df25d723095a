//! Development tasks of the SM controller workspace, run as `cargo xtask ...` (the alias is in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask ci [fmt|clippy|doc|test]`: the checks CI runs (`.ci/run` calls it); with no
//!   step, all of them in that order, stopping at the first failure. See [`ci`].
//! - `cargo xtask demo [ARGS..]`: the controller with simulated SMs on loopback (the daemon's
//!   `smcontroller-demo` binary, which runs `smcontrollerd`, `sm-sim` and `smctl`), with ARGS
//!   passed through. It runs over mTLS with a development
//!   PKI it writes to a temporary directory; `cargo xtask demo --insecure` runs it over plain
//!   HTTP/2.
//! - `cargo xtask bench [--quick] [ARGS..]`: the controller benchmark (every scenario of
//!   `smcontroller-bench/benches/controller.rs`, mTLS and the bare-relay floor included), with
//!   the figures written to `target/bench/results.json`. See [`bench()`].
//!   `cargo xtask bench --hostile`: the soak under hostile peers instead
//!   (`target/bench/hostile.json`).
//! - `cargo xtask gen-certs DIR [--nodes N] [--pkcs11]`: a development PKI (CA, server, one
//!   client per node, and the bad clients the tests refuse) for running over mTLS; with
//!   `--pkcs11` the server key is made in a SoftHSM2 token instead. See [`gen_certs`].
//!
//! This crate is a tool, not a library: it may depend on anything, and uses `anyhow`.

mod ci;
mod cmd;
mod gen_certs;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

use crate::cmd::Cmd;

/// `cargo xtask`: development tasks of the SM controller workspace.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Runs the CI checks: all of them, or the one step named.
    Ci {
        #[command(subcommand)]
        step: Option<ci::Step>,
    },
    /// Runs the controller with simulated SMs on loopback over mTLS (`smcontroller-demo`;
    /// `--insecure` for plain HTTP/2).
    Demo {
        /// Arguments passed to `smcontroller-demo` as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runs the controller benchmark (contract section 4, mTLS and the bare-relay floor
    /// included) and writes the figures to target/bench/results.json.
    Bench {
        /// Smaller counts, for a run under 2 minutes (said in the output and in the JSON).
        #[arg(long)]
        quick: bool,
        /// The soak under hostile peers instead (R-BAD-2/3, issue 9): each attack in turn
        /// against the controller with five well-behaved SMs; writes
        /// target/bench/hostile.json. Not part of CI.
        #[arg(long)]
        hostile: bool,
        /// More arguments for the bench executable as they are: scenario names
        /// (sync-rtt, telemetry, scale, idle, churn, floor, mtls-rtt, mtls-telemetry, handshakes,
        /// renewal-storm), --sm-protocol 9.1 (the Aos 9.1 wire revision; its figures go to
        /// target/bench/results-9.1.json), --cycles N, --scale-nodes N, ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Writes a development PKI for mTLS into DIR: ca.pem, server.pem/.key, client-node-N.pem/.key
    /// per node, and refused clients (expired, foreign CA, server-only).
    GenCerts {
        /// The directory to write into (created if needed; files there are replaced).
        dir: PathBuf,
        /// How many SM client certificates to make (node-1 .. node-N).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Make the server key in a SoftHSM2 token (DIR/softhsm/) rather than in server.key,
        /// and write DIR/smcontrollerd-pkcs11.json, a daemon config with its pkcs11: key URL.
        #[arg(long)]
        pkcs11: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let outcome = match cli.task {
        Task::Ci { step } => ci::run(&root, step),
        Task::Demo { args } => demo(&root, &args),
        Task::Bench {
            quick,
            hostile,
            args,
        } => bench(&root, quick, hostile, &args),
        Task::GenCerts {
            dir,
            nodes,
            pkcs11: false,
        } => gen_certs::run(&dir, nodes).map(|()| ExitCode::SUCCESS),
        Task::GenCerts {
            dir,
            nodes,
            pkcs11: true,
        } => gen_certs::run_pkcs11(&dir, nodes),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// `cargo run --quiet -p smcontroller-daemon --bin smcontroller-demo -- ARGS`, with the demo's
/// exit code as ours.
fn demo(root: &Path, args: &[String]) -> anyhow::Result<ExitCode> {
    let build = demo_build(root);
    eprintln!("xtask: {build}");
    build.run()?;
    let cmd = demo_run(root, args);
    eprintln!("xtask: {cmd}");
    cmd.hand_over()
}

/// Builds what the demo runs: the real daemon, the simulator and smctl.
pub(crate) fn demo_build(root: &Path) -> Cmd {
    Cmd::cargo(root).args([
        "build",
        "--quiet",
        "-p",
        "smcontroller-daemon",
        "-p",
        "smcontroller-sim",
        "-p",
        "smcontroller-admin",
        "--bins",
    ])
}

/// Runs the demo (built by [`demo_build`]) with `args`.
pub(crate) fn demo_run<S: AsRef<str>>(root: &Path, args: &[S]) -> Cmd {
    Cmd::cargo(root)
        .args([
            "run",
            "--quiet",
            "-p",
            "smcontroller-daemon",
            "--bin",
            "smcontroller-demo",
            "--",
        ])
        .args(args)
}

/// `cargo bench -p smcontroller-bench --bench controller -- --json target/bench/results.json
/// [--quick] ARGS`: the bench builds in release, runs each scenario in processes of its own on
/// 127.0.0.1, prints the figures beside their targets and floors, and writes them as JSON.
///
/// With `hostile`, `-- --hostile --json target/bench/hostile.json ARGS`: the soak under hostile
/// peers (`smcontroller-bench/benches/controller/hostile.rs`).
fn bench(root: &Path, quick: bool, hostile: bool, args: &[String]) -> anyhow::Result<ExitCode> {
    let file = if hostile {
        "hostile.json"
    } else {
        "results.json"
    };
    if !hostile && let Err(e) = ci::ensure_softhsm() {
        // Only the PKCS#11 handshake scenario needs the token; the others run without it.
        eprintln!("xtask: {e:#}; the handshakes-pkcs11 scenario will fail");
    }
    let results = root.join("target").join("bench").join(file);
    let mut cmd = Cmd::cargo(root)
        .args([
            "bench",
            "-p",
            "smcontroller-bench",
            "--bench",
            "controller",
            "--",
            "--json",
        ])
        .args([results.display().to_string()]);
    if quick {
        cmd = cmd.args(["--quick"]);
    }
    if hostile {
        cmd = cmd.args(["--hostile"]);
    }
    let cmd = cmd.args(args);
    eprintln!("xtask: {cmd}");
    cmd.hand_over()
}
