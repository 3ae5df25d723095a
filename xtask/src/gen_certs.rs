//! `cargo xtask gen-certs DIR`: a development PKI for running the controller and its simulated
//! SMs over mTLS, made with the same code the tests use (`smcontroller_certs::test_util`).

use std::path::Path;

use anyhow::Context;
use smcontroller_certs::test_util::TestPki;

/// Writes the development PKI into `dir`: a CA, the server's certificate and key, one client
/// certificate per node (`node-1` .. `node-N` as CN and DNS SAN), and the bad clients the tests
/// refuse (expired, from a foreign CA, server-only). Prints what it wrote.
pub(crate) fn run(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    let pki = TestPki::new().context("cannot make the certificates")?;
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
