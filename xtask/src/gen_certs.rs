//! `cargo xtask gen-certs DIR`: a development PKI for running the controller and its simulated
//! SMs over mTLS, made with the same code the tests use (`smcontroller_certs::test_util`).
//!
//! With `--pkcs11`, the server's key is made in a SoftHSM2 token instead (`DIR/softhsm/`), its
//! certificate issued for it, and `DIR/smcontrollerd-pkcs11.json` names it with a `pkcs11:` key
//! URL: the daemon started with that config signs its handshakes in the token.

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use smcontroller_certs::test_util::{
    LeafSpec, TestPki,
    softhsm::{self, SoftHsm, TokenKeyKind},
};

/// The token `--pkcs11` makes, and its user PIN (a development token: the PIN is in a file
/// beside it).
const TOKEN_LABEL: &str = "aos";
const TOKEN_PIN: &str = "1234";

/// Writes the development PKI into `dir`: a CA, the server's certificate and key, one client
/// certificate per node (`node-1` .. `node-N` as CN and DNS SAN), and the bad clients the tests
/// refuse (expired, from a foreign CA, server-only). Prints what it wrote.
pub(crate) fn run(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    let pki = TestPki::new().context("cannot make the certificates")?;
    write_pki(&pki, dir, nodes)
}

/// Writes `pki`'s development PKI into `dir` and lists the files.
fn write_pki(pki: &TestPki, dir: &Path, nodes: usize) -> anyhow::Result<()> {
    let written = pki
        .write_dev_pki(dir, nodes)
        .with_context(|| format!("cannot write the PKI into {}", dir.display()))?;
    println!(
        "xtask: wrote a development PKI (ECDSA P-256, unencrypted keys: not for production) \
         into {}:",
        dir.display()
    );
    for path in &written {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        println!("  {name:<26} {}", describe(&name));
    }
    Ok(())
}

/// `gen-certs --pkcs11 DIR`: the development PKI of [`run`], with the server key in a SoftHSM2
/// token in `DIR/softhsm/` rather than in `server.key`.
///
/// SoftHSM2 reads its config from `SOFTHSM2_CONF` once per process, so this writes the config,
/// then runs this command again with the variable set, and that run makes the token.
pub(crate) fn run_pkcs11(dir: &Path, nodes: usize) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    let hsm_dir = dir.join("softhsm");
    let conf = hsm_dir.join("softhsm2.conf");
    if std::env::var_os(softhsm::CONF_ENV).is_some_and(|set| Path::new(&set) == conf) {
        make_token(&dir, &hsm_dir, nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    softhsm::module_path()?;
    let tokens = hsm_dir.join("tokens");
    if tokens.exists() {
        std::fs::remove_dir_all(&tokens)
            .with_context(|| format!("cannot empty {}", tokens.display()))?;
    }
    let hsm = SoftHsm::create(&hsm_dir)?;
    let exe = std::env::current_exe().context("this xtask's executable")?;
    let status = Command::new(exe)
        .args(["gen-certs", "--pkcs11", "--nodes", &nodes.to_string()])
        .arg(&dir)
        .env(softhsm::CONF_ENV, hsm.conf())
        .status()
        .context("cannot run gen-certs again with SOFTHSM2_CONF set")?;
    if !status.success() {
        bail!("making the token failed ({status})");
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the PKI, makes the token with the server key, certifies it, writes the daemon's
/// config; says how to run it.
fn make_token(dir: &Path, hsm_dir: &Path, nodes: usize) -> anyhow::Result<()> {
    let pki = TestPki::new().context("cannot make the certificates")?;
    write_pki(&pki, dir, nodes)?;
    let hsm = SoftHsm::from_env()?;
    let token = hsm
        .init_token(TOKEN_LABEL, TOKEN_PIN)
        .context("cannot make the SoftHSM2 token")?;
    let key = token
        .generate_key(TokenKeyKind::EcP256, "sm", &[1])
        .context("cannot make the server key in the token")?;
    let cert = pki.issue_for(&LeafSpec::server(), &key.public_key)?;
    let cert_path = dir.join("server.pem");
    cert.write(&cert_path)?;
    let key_file = dir.join("server.key");
    std::fs::remove_file(&key_file)
        .with_context(|| format!("cannot remove {}", key_file.display()))?;
    let pin_file = hsm_dir.join("pin");
    std::fs::write(&pin_file, format!("{TOKEN_PIN}\n"))?;
    let key_url = format!(
        "pkcs11:token={TOKEN_LABEL};object=sm;id=%01?module-path={}&pin-source={}",
        hsm.module().display(),
        pin_file.display()
    );
    let file_url = |path: &Path| format!("file://{}", path.display());
    let config = serde_json::json!({
        "certStorage": "sm",
        "certUrl": file_url(&cert_path),
        "keyUrl": key_url,
        "caCert": file_url(&dir.join("ca.pem")),
    });
    let config_path = dir.join("smcontrollerd-pkcs11.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")?;
    println!(
        "xtask: the server key is in SoftHSM2 token {TOKEN_LABEL:?} (object sm, id 01; PIN in \
         {}), not in a file: server.key removed, server.pem certifies the token key",
        pin_file.display()
    );
    println!("  smcontrollerd-pkcs11.json  the daemon's config: keyUrl {key_url}");
    println!();
    println!("Run the daemon on the token key, and SMs against it:");
    println!(
        "  SOFTHSM2_CONF={} cargo run -p smcontroller-daemon --bin smcontrollerd -- \\\n      \
         --config {} --listen 127.0.0.1:8093",
        hsm.conf().display(),
        config_path.display()
    );
    println!(
        "  cargo run -p smcontroller-sim --bin sm-sim -- --pki {} --url https://127.0.0.1:8093 --nodes {nodes}",
        dir.display()
    );
    Ok(())
}

/// What a file of the development PKI is for.
fn describe(name: &str) -> &'static str {
    match name {
        "ca.pem" => "CA: the server verifies SMs with it, SMs verify the server",
        "server.pem" | "server.key" => "server (SAN localhost, 127.0.0.1, ::1; EKU serverAuth)",
        "client-expired.pem" | "client-expired.key" => "node-1, expired: refused",
        "foreign-ca.pem" => "another CA, which the server does not trust",
        "client-foreign.pem" | "client-foreign.key" => "node-1 from the foreign CA: refused",
        "client-server-only.pem" | "client-server-only.key" => {
            "node-1 with EKU serverAuth only: refused as a client"
        }
        _ if name.starts_with("client-node-") => "an SM (CN and DNS SAN = node id; EKU clientAuth)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_files_the_demo_and_the_tests_expect() {
        let dir = std::env::temp_dir().join(format!("xtask-gen-certs-{}", std::process::id()));
        run(&dir, 2).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            names,
            [
                "ca.pem",
                "client-expired.key",
                "client-expired.pem",
                "client-foreign.key",
                "client-foreign.pem",
                "client-node-1.key",
                "client-node-1.pem",
                "client-node-2.key",
                "client-node-2.pem",
                "client-server-only.key",
                "client-server-only.pem",
                "foreign-ca.pem",
                "server.key",
                "server.pem",
            ]
        );
    }
}
