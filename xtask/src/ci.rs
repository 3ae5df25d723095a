//! `cargo xtask ci`: the checks CI runs, one step at a time, stopping at the first failure.
//!
//! Steps, in the order `cargo xtask ci` runs them (cheapest first, so a mistake shows early):
//!
//! | step | commands |
//! |---|---|
//! | `fmt` | `cargo fmt --all -- --check` |
//! | `clippy` | `cargo hack clippy --workspace --all-targets --each-feature -- -D warnings` |
//! | `doc` | `RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features`, then `cargo hack doc --no-deps --each-feature --exclude-all-features` on each crate with features |
//! | `test` | SoftHSM2 installed if missing (below), then `cargo test --workspace --all-features`, then `cargo hack test --each-feature --exclude-all-features` on each crate with features |
//! | `demo` | the README's first command, `cargo xtask demo`, over mTLS and again with `--insecure`, then a unit of Aos 9.1 nodes over mTLS, `--sm-protocol 9.1`; fails on a non-zero exit |
//!
//! The PKCS#11 tests (contract R-TLS-5) need a real token: SoftHSM2, the Debian package
//! `softhsm2`. When its module is missing, the `test` step installs it with `apt-get` if it runs
//! as root (as CI does, on a fresh machine), and otherwise stops, saying how to install it.
//!
//! # The feature matrix, and what it costs
//!
//! Every crate is checked with its default features, `--no-default-features`, each feature
//! alone and `--all-features` (cargo-hack's `--each-feature`; it drops duplicate combinations
//! and runs a crate without features once). `--each-feature` grows linearly with the number of
//! features where `--feature-powerset` grows exponentially; with the features we have
//! (`smcontroller-api/mock`, `smcontroller-certs/test-util` and `smcontroller-certs/pkcs11`)
//! the difference is one combination.
//!
//! - clippy runs on the whole matrix, crate by crate: cargo-hack checks each crate on its own,
//!   which also catches a crate that builds only thanks to features another workspace member
//!   turns on in a shared dependency. Clippy only type-checks, so this is cheap.
//! - doc and test run once over the workspace with `--all-features` (the build that the daemon,
//!   which turns every feature on, really is), then again only for the crates that declare
//!   features (found with `cargo metadata`), in their other combinations. For a crate without
//!   features `--all-features` *is* its default build, so repeating it would cost time (each
//!   crate built alone resolves its dependencies' features anew, so they would be compiled again)
//!   and find nothing. The feature-specific test runs really run the tests, not just build them
//!   (`--no-run`): today that is `smcontroller-api`, whose tests take milliseconds, and a test
//!   that passes only with a feature on is what this is for. If a crate with slow tests (gRPC
//!   integration, proptests) gains a feature, make its extra runs `--no-run`.

use std::{
    path::Path,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Subcommand;
use smcontroller_certs::test_util::softhsm;

use crate::cmd::Cmd;

/// The cargo-hack release this xtask installs when there is none.
const CARGO_HACK_VERSION: &str = "0.6.46";

/// One step of `cargo xtask ci`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub(crate) enum Step {
    /// Checks formatting: `cargo fmt --all -- --check`.
    Fmt,
    /// Lints every target of every crate in each feature combination, warnings denied.
    Clippy,
    /// Builds the docs of the workspace, rustdoc warnings denied.
    Doc,
    /// Runs the tests of the workspace (and of each feature combination where they differ).
    Test,
    /// Runs the demo (`cargo xtask demo`) over mTLS and over plain HTTP/2, and with the 9.1
    /// wire revision over mTLS.
    Demo,
}

impl Step {
    /// Every step, in the order `cargo xtask ci` runs them.
    const ALL: [Self; 5] = [Self::Fmt, Self::Clippy, Self::Doc, Self::Test, Self::Demo];

    fn name(self) -> &'static str {
        match self {
            Self::Fmt => "fmt",
            Self::Clippy => "clippy",
            Self::Doc => "doc",
            Self::Test => "test",
            Self::Demo => "demo",
        }
    }

    /// Runs the step's commands in turn, stopping at the first that fails.
    fn run(self, root: &Path) -> anyhow::Result<()> {
        match self {
            Self::Fmt => command(Cmd::cargo(root).args(["fmt", "--all", "--", "--check"])),
            Self::Clippy => {
                ensure_cargo_hack(root)?;
                command(Cmd::cargo(root).args([
                    "hack",
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--each-feature",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }
            Self::Doc => {
                let rustdocflags = with_warnings_denied(std::env::var("RUSTDOCFLAGS").ok());
                command(Cmd::cargo(root).env("RUSTDOCFLAGS", &rustdocflags).args([
                    "doc",
                    "--workspace",
                    "--no-deps",
                    "--all-features",
                ]))?;
                let featured = crates_with_features(root)?;
                if featured.is_empty() {
                    return Ok(());
                }
                ensure_cargo_hack(root)?;
                command(
                    Cmd::cargo(root)
                        .env("RUSTDOCFLAGS", &rustdocflags)
                        .args(["hack", "doc", "--no-deps"])
                        .args(package_args(&featured))
                        .args(["--each-feature", "--exclude-all-features"]),
                )
            }
            Self::Test => {
                ensure_softhsm()?;
                command(Cmd::cargo(root).args(["test", "--workspace", "--all-features"]))?;
                let featured = crates_with_features(root)?;
                if featured.is_empty() {
                    return Ok(());
                }
                ensure_cargo_hack(root)?;
                command(
                    Cmd::cargo(root)
                        .args(["hack", "test"])
                        .args(package_args(&featured))
                        .args(["--each-feature", "--exclude-all-features"]),
                )
            }
            Self::Demo => {
                command(crate::demo_build(root))?;
                command(crate::demo_run::<&str>(root, &[]))?;
                command(crate::demo_run(root, &["--insecure"]))?;
                command(crate::demo_run(root, &["--sm-protocol", "9.1"]))
            }
        }
    }
}

/// Runs `step`, or every step when it is `None`; prints a header for each and a summary at the
/// end. Fails at the first step that fails, naming the command.
pub(crate) fn run(root: &Path, step: Option<Step>) -> anyhow::Result<ExitCode> {
    let steps = match step {
        Some(step) => vec![step],
        None => Step::ALL.to_vec(),
    };
    let started = Instant::now();
    let mut times = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        println!();
        println!("==== ci [{}/{}] {} ====", i + 1, steps.len(), step.name());
        let step_started = Instant::now();
        if let Err(e) = step.run(root) {
            println!();
            println!(
                "ci: FAILED at step {} after {}: {e:#}",
                step.name(),
                human(started.elapsed())
            );
            return Ok(ExitCode::FAILURE);
        }
        let took = step_started.elapsed();
        println!("==== ci {} ok in {} ====", step.name(), human(took));
        times.push(format!("{} {}", step.name(), human(took)));
    }
    println!();
    println!(
        "ci: ok: {} of {} step(s) succeeded in {} ({})",
        steps.len(),
        steps.len(),
        human(started.elapsed()),
        times.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Shows `cmd`, then runs it.
fn command(cmd: Cmd) -> anyhow::Result<()> {
    println!("---> {cmd}");
    cmd.run()
}

/// Makes sure `cargo hack` can be run, installing the pinned release when it is missing.
fn ensure_cargo_hack(root: &Path) -> anyhow::Result<()> {
    match Cmd::cargo(root).args(["hack", "--version"]).probe() {
        Some(version) => {
            let version = version.trim();
            if !version.ends_with(CARGO_HACK_VERSION) {
                println!("note: using the installed {version}; CI installs {CARGO_HACK_VERSION}");
            }
            Ok(())
        }
        None => {
            println!(
                "note: cargo-hack (runs cargo over each feature combination) is not installed; \
                 installing cargo-hack {CARGO_HACK_VERSION} from crates.io, once per machine \
                 (a minute or two)"
            );
            command(Cmd::cargo(root).args([
                "install",
                "cargo-hack",
                "--locked",
                "--version",
                CARGO_HACK_VERSION,
            ]))
            .context("could not install cargo-hack: install it with the command above and rerun")
        }
    }
}

/// Makes sure SoftHSM2, the token of the PKCS#11 tests (and of the bench's
/// `handshakes-pkcs11` scenario), is installed: with `apt-get` when it is missing and this runs
/// as root, else an error saying how to install it.
pub(crate) fn ensure_softhsm() -> anyhow::Result<()> {
    if let Ok(module) = softhsm::module_path() {
        println!("note: SoftHSM2 for the PKCS#11 tests: {}", module.display());
        return Ok(());
    }
    let package = softhsm::SOFTHSM_PACKAGE;
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0");
    let has_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !(is_root && has_apt) {
        bail!(
            "the PKCS#11 tests need SoftHSM2: install the Debian package {package} \
             (`sudo apt-get install {package}`) and rerun"
        );
    }
    println!("note: SoftHSM2 (the token of the PKCS#11 tests) is missing; installing {package}");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "--no-install-recommends", package][..],
    ] {
        println!("---> apt-get {}", args.join(" "));
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("`apt-get {}` failed ({status})", args.join(" "));
        }
    }
    let module = softhsm::module_path().context("SoftHSM2 still not found after installing it")?;
    println!("note: SoftHSM2 installed: {}", module.display());
    Ok(())
}

/// The workspace members that declare features (optional dependencies count), by name.
fn crates_with_features(root: &Path) -> anyhow::Result<Vec<String>> {
    let json = Cmd::cargo(root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .read()?;
    let metadata: serde_json::Value =
        serde_json::from_str(&json).context("`cargo metadata` printed something not JSON")?;
    let packages = metadata["packages"]
        .as_array()
        .context("`cargo metadata` printed no `packages`")?;
    let mut featured = Vec::new();
    for package in packages {
        let name = package["name"]
            .as_str()
            .context("a package in `cargo metadata` has no name")?;
        let has_features = package["features"]
            .as_object()
            .is_some_and(|features| features.keys().any(|feature| feature != "default"));
        if has_features {
            featured.push(name.to_owned());
        }
    }
    featured.sort();
    Ok(featured)
}

/// `--package NAME` for each of `packages`.
fn package_args(packages: &[String]) -> Vec<String> {
    packages
        .iter()
        .flat_map(|name| ["--package".to_owned(), name.clone()])
        .collect()
}

/// `flags` (the caller's RUSTDOCFLAGS, if any) with `-D warnings` added.
fn with_warnings_denied(flags: Option<String>) -> String {
    match flags {
        Some(flags) if !flags.trim().is_empty() => format!("{} -D warnings", flags.trim()),
        _ => "-D warnings".to_owned(),
    }
}

/// A duration as people read it: `42.1s`, `3m07s`.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustdocflags_keep_the_callers_flags() {
        assert_eq!(with_warnings_denied(None), "-D warnings");
        assert_eq!(with_warnings_denied(Some(" ".into())), "-D warnings");
        assert_eq!(
            with_warnings_denied(Some("--cfg docsrs".into())),
            "--cfg docsrs -D warnings"
        );
    }

    #[test]
    fn durations_read_as_seconds_then_minutes() {
        assert_eq!(human(Duration::from_millis(4_300)), "4.3s");
        assert_eq!(human(Duration::from_secs(187)), "3m07s");
    }

    #[test]
    fn each_package_is_named_with_its_flag() {
        let packages = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            package_args(&packages),
            ["--package", "a", "--package", "b"]
        );
    }
}
