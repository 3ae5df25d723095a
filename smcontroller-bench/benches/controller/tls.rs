//! The mTLS side of the bench (N-TLS-1): the server's credential files, new handshakes per
//! second (and, `handshakes-pkcs11`, with the server key in a SoftHSM2 token beside a file key:
//! R-TLS-5's cost), and the renewal storm.
//!
//! The PKI is made at run time (`smcontroller_certs::test_util::TestPki`, rcgen: ECDSA P-256
//! keys) in a temporary directory: `ca.pem`, `server.pem`/`server.key` (read by a
//! `FileCertProvider` that looks at them every [`PROVIDER_POLL`]), and one client certificate
//! that every simulated SM presents (`client.pem`/`client.key`, and DER copies for the raw
//! handshake client). Identity binding is off, as in the daemon's default configuration.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use rustls::{
    ClientConfig, RootCertStore,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use smcontroller_certs::{
    CredentialsBuilder, CredentialsReloader, FileCertLoader, FileCertProvider, ReloadSettings,
    test_util::{
        LeafSpec, TestPki,
        softhsm::{self, SoftHsm, TestToken, TokenKeyKind},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use super::{
    Cmp, CpuMeter, Figure, Options, PROVIDER_POLL, ServerKind, mib, proc_status_field, rss, setup,
    summary,
};

/// The PKI of an mTLS scenario and the files the server's credentials are read from.
pub(crate) struct ServerFiles {
    pki: TestPki,
    pub(crate) dir: tempfile::TempDir,
    _provider: Arc<FileCertProvider>,
    pub(crate) reloader: CredentialsReloader,
    /// The SoftHSM2 token holding the server key, when [`TOKEN_KEY`] is set.
    _token: Option<TestToken>,
}

/// Set by `handshakes-pkcs11` before it starts a harness: the next [`ServerFiles`] put the
/// server's key in a SoftHSM2 token (this scenario process's, `SOFTHSM2_CONF`) rather than in
/// `server.key`.
static TOKEN_KEY: AtomicBool = AtomicBool::new(false);

impl ServerFiles {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        let pki = TestPki::new()?;
        let dir = tempfile::tempdir()?;
        let path = dir.path();
        std::fs::write(path.join("ca.pem"), pki.ca_pem())?;
        std::fs::write(path.join("ca.der"), pki.ca_der().as_ref())?;
        pki.server()?.write(path, "server")?;
        let (key_url, token) = if TOKEN_KEY.load(Ordering::Relaxed) {
            let token = SoftHsm::from_env()?.init_token("bench", "1234")?;
            let key = token.generate_key(TokenKeyKind::EcP256, "sm", &[1])?;
            pki.issue_for(&LeafSpec::server(), &key.public_key)?
                .write(&path.join("server.pem"))?;
            std::fs::remove_file(path.join("server.key"))?;
            (token.url("sm", &[1]), Some(token))
        } else {
            (
                format!("file://{}", path.join("server.key").display()),
                None,
            )
        };
        let client = pki.client("bench-sm")?;
        client.write(path, "client")?;
        std::fs::write(path.join("client.der"), client.cert_der().as_ref())?;
        std::fs::write(path.join("client.key.der"), client.key_der().secret_der())?;
        let url = |file: &str| format!("file://{}", path.join(file).display());
        let provider = Arc::new(
            FileCertProvider::builder()
                .storage("sm", url("server.pem"), key_url)
                .poll_interval(PROVIDER_POLL)
                .spawn()?,
        );
        let builder = CredentialsBuilder::new(
            provider.clone(),
            Arc::new(FileCertLoader::new()),
            "sm",
            url("ca.pem"),
        );
        let reloader = CredentialsReloader::start(
            builder,
            ReloadSettings::default().with_retry(Duration::from_millis(100)),
        )
        .await?;
        Ok(Self {
            pki,
            dir,
            _provider: provider,
            reloader,
            _token: token,
        })
    }

    /// Replaces the server's certificate and key by renames, as a renewal does (both new files
    /// are written first, then renamed one right after the other); the new certificate, DER.
    pub(crate) fn renew(&self) -> anyhow::Result<Vec<u8>> {
        let cert = self.pki.server()?;
        let path = self.dir.path();
        let staging = path.join("staging");
        std::fs::create_dir_all(&staging)?;
        cert.write(&staging, "server")?;
        std::fs::rename(staging.join("server.key"), path.join("server.key"))?;
        std::fs::rename(staging.join("server.pem"), path.join("server.pem"))?;
        Ok(cert.cert_der().to_vec())
    }
}

/// The raw client of the handshake figures: TLS 1.3 only, no session resumption (every
/// handshake is a full one), the bench's client certificate, ALPN `h2`.
fn client_config(dir: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let read =
        |file: &str| std::fs::read(dir.join(file)).with_context(|| format!("reading {file}"));
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(read("ca.der")?))?;
    let mut config = ClientConfig::builder_with_provider(smcontroller_certs::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(read("client.der")?)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read("client.key.der")?)),
        )?;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// One new connection: TCP, a full TLS 1.3 handshake with the client certificate, then the
/// HTTP/2 preface, until the server's first frame (its SETTINGS) arrives, which it sends only
/// once it has verified the client's certificate and handed the connection to HTTP/2. The
/// server's certificate, DER.
async fn handshake(addr: &str, connector: &tokio_rustls::TlsConnector) -> anyhow::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = connector.connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    ensure!(
        session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
        "negotiated {:?}",
        session.protocol_version()
    );
    let served = session
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .to_vec();
    tls.write_all(H2_PREFACE).await?;
    tls.flush().await?;
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await?;
    ensure!(
        head[3] == 4,
        "the server's first frame is of type {}",
        head[3]
    );
    Ok(served)
}

/// SM process side of `handshakes`: `count` new connections by `concurrency` tasks, bounded by
/// `limit`; the reply line.
pub(crate) async fn handshake_burst(
    url: &str,
    dir: &Path,
    count: usize,
    concurrency: usize,
    limit: Duration,
) -> anyhow::Result<String> {
    let addr: Arc<str> = url.trim_start_matches("https://").into();
    let connector = tokio_rustls::TlsConnector::from(client_config(dir)?);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Vec<u64>>> = (0..concurrency.max(1))
        .map(|_| {
            let (addr, connector, next, errors) = (
                addr.clone(),
                connector.clone(),
                next.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let mut ns = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count && started.elapsed() < limit {
                    let t = Instant::now();
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        handshake(&addr, &connector),
                    )
                    .await
                    {
                        Ok(Ok(_)) => ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(0)),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                ns
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await?);
    }
    let wall = started.elapsed();
    all.sort_unstable();
    let quantile = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |ns| *ns as f64 / 1e3)
    };
    Ok(format!(
        "done {} errors {} wall_ms {:.1} p50_us {:.0} p99_us {:.0}",
        all.len(),
        errors.load(Ordering::Relaxed),
        wall.as_secs_f64() * 1e3,
        quantile(0.5),
        quantile(0.99)
    ))
}

/// The value after `key` in a reply line.
fn field(reply: &[String], key: &str) -> anyhow::Result<f64> {
    reply
        .iter()
        .position(|w| w == key)
        .and_then(|i| reply.get(i + 1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {reply:?}"))
}

/// Concurrent clients of the handshake figure.
const HANDSHAKE_CONCURRENCY: usize = 32;
/// Longest the handshake burst may run.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// What one handshake burst measured.
struct HandshakeRun {
    done: f64,
    errors: f64,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    controller_cpu_us: f64,
}

/// A burst of `--handshakes` new connections against a fresh controller over mTLS (its key in
/// a file, or in a token when [`TOKEN_KEY`] is set); prints what it measured.
async fn measure_handshakes(options: &Options, key: &str) -> anyhow::Result<HandshakeRun> {
    let (harness, mut sm) = setup(ServerKind::Tls, "hs", 1).await?;
    let cpu = CpuMeter::start(sm.pid);
    let reply = sm
        .request(
            &format!(
                "handshakes {} {HANDSHAKE_CONCURRENCY} {}",
                options.handshakes,
                HANDSHAKE_LIMIT.as_millis()
            ),
            HANDSHAKE_LIMIT + Duration::from_secs(30),
        )
        .await?;
    let cpu_line = cpu.describe();
    let (_, controller_cpu, _) = cpu.read();
    let done = field(&reply, "done")?;
    let errors = field(&reply, "errors")?;
    let wall_s = field(&reply, "wall_ms")? / 1e3;
    let run = HandshakeRun {
        done,
        errors,
        rate: done / wall_s.max(1e-9),
        p50_us: field(&reply, "p50_us")?,
        p99_us: field(&reply, "p99_us")?,
        controller_cpu_us: controller_cpu.as_secs_f64() * 1e6 / done.max(1.0),
    };
    println!(
        "{done:.0} new mTLS connections (full TLS 1.3 handshake, ECDSA P-256 {key}, client \
         certificate, then the HTTP/2 preface until the server's SETTINGS) by \
         {HANDSHAKE_CONCURRENCY} clients in {wall_s:.2} s: {:.0}/s; {errors:.0} errors; \
         latency p50 {:.0} µs, p99 {:.0} µs",
        run.rate, run.p50_us, run.p99_us
    );
    println!("  {cpu_line}");
    println!(
        "  controller CPU per handshake {:.0} µs",
        run.controller_cpu_us
    );
    sm.quit().await;
    harness.stop().await;
    Ok(run)
}

/// N-TLS-1: new client handshakes per second against the controller's mTLS server.
pub(crate) async fn handshakes(options: &Options) -> anyhow::Result<()> {
    let run = measure_handshakes(options, "key in a file").await?;
    summary(
        "N-TLS-1",
        "new mTLS handshakes per second",
        ">= 1,000/s",
        format!("{:.0}/s", run.rate),
        Some(run.rate >= 1_000.0),
    );
    Figure::new("N-TLS-1", "handshakes_per_s", run.rate, "handshakes/s")
        .target(Cmp::AtLeast, 1_000.0)
        .with("handshakes", run.done)
        .with("errors", run.errors)
        .with("concurrency", HANDSHAKE_CONCURRENCY)
        .with("tls", "1.3, ECDSA P-256, client certificate, no resumption")
        .with("controller_cpu_us_per_handshake", run.controller_cpu_us)
        .emit();
    ensure!(run.errors == 0.0, "{} handshakes failed", run.errors);
    Ok(())
}

/// Set in the scenario process `handshakes-pkcs11` runs again with a token directory of its own.
const TOKEN_RUN_ENV: &str = "SMCONTROLLER_BENCH_TOKEN_RUN";

/// R-TLS-5's cost: new handshakes per second with the server key in a PKCS#11 token (SoftHSM2,
/// every signature made by the token) beside the same burst with the key in a file, measured
/// one after the other in one process; their ratio.
///
/// SoftHSM2 reads its config once per process: the scenario process runs itself again with
/// `SOFTHSM2_CONF` pointing at a fresh token directory.
pub(crate) async fn handshakes_pkcs11(options: &Options) -> anyhow::Result<()> {
    if std::env::var_os(TOKEN_RUN_ENV).is_none() {
        let dir = tempfile::tempdir()?;
        let hsm = SoftHsm::create(dir.path())?;
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(softhsm::CONF_ENV, hsm.conf())
            .env(TOKEN_RUN_ENV, "1")
            .status()?;
        ensure!(status.success(), "the token run failed ({status})");
        return Ok(());
    }
    let file = measure_handshakes(options, "key in a file").await?;
    TOKEN_KEY.store(true, Ordering::Relaxed);
    let token = measure_handshakes(options, "key in a SoftHSM2 token").await?;
    let ratio = token.rate / file.rate.max(1e-9);
    println!(
        "token key: {:.0} handshakes/s, file key: {:.0}/s: the token key serves {:.2}x the \
         file key's rate (controller CPU per handshake {:.0} µs against {:.0} µs)",
        token.rate, file.rate, ratio, token.controller_cpu_us, file.controller_cpu_us
    );
    summary(
        "R-TLS-5",
        "new mTLS handshakes per second, key in a token (SoftHSM2)",
        "(cost)",
        format!(
            "{:.0}/s, {ratio:.2}x the file key's {:.0}/s",
            token.rate, file.rate
        ),
        None,
    );
    Figure::new(
        "R-TLS-5",
        "token_key_handshakes_per_s",
        token.rate,
        "handshakes/s",
    )
    .with("file_key_handshakes_per_s", file.rate)
    .with("ratio_token_to_file", ratio)
    .with("handshakes", token.done)
    .with("errors", token.errors + file.errors)
    .with("concurrency", HANDSHAKE_CONCURRENCY)
    .with("p50_us", token.p50_us)
    .with("p99_us", token.p99_us)
    .with("file_key_p50_us", file.p50_us)
    .with("controller_cpu_us_per_handshake", token.controller_cpu_us)
    .with(
        "file_key_controller_cpu_us_per_handshake",
        file.controller_cpu_us,
    )
    .with(
        "tls",
        "1.3, ECDSA P-256 key in SoftHSM2 (CKM_ECDSA_SHA256), client certificate, no resumption",
    )
    .emit();
    ensure!(
        token.errors + file.errors == 0.0,
        "{} handshakes failed",
        token.errors + file.errors
    );
    Ok(())
}

/// Samples the controller process's VmRSS every 2 ms on a thread of its own until stopped; the
/// highest value seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let started = Instant::now();
                let mut peak = 0;
                // Bounded: at most two minutes.
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120)
                {
                    peak = peak.max(rss(None));
                    std::thread::sleep(Duration::from_millis(2));
                }
                peak
            }
        });
        Self { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// N-TLS-1: the renewal storm.
pub(crate) async fn renewal_storm(options: &Options) -> anyhow::Result<()> {
    let nodes = options.storm_nodes;
    let (harness, mut sm) = setup(ServerKind::Tls, "storm", nodes).await?;
    let files = harness.tls.as_ref().context("mTLS files")?;
    sm.request("reconnect 1", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connected_before = harness.counts.connected.load(Ordering::Relaxed);
    let disconnected_before = harness.counts.disconnected.load(Ordering::Relaxed);
    let mut renewals = files.reloader.subscribe();
    renewals.borrow_and_update();
    let generation_before = renewals.borrow().generation;
    // Reset VmHWM to the current VmRSS (clear_refs(5)), so that the HWM read after is the storm's.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_start = rss(None);
    let sampler = RssSampler::start();

    let replaced = Instant::now();
    let new_cert = files.renew()?;
    tokio::time::timeout(Duration::from_secs(10), renewals.changed())
        .await
        .context("no renewal notice within 10 s of the replacement")??;
    let notice = replaced.elapsed();
    let registered = harness
        .wait_count(
            "nodes registered again",
            |c| c.connected.load(Ordering::Relaxed),
            connected_before + nodes as u64,
            Duration::from_secs(60),
        )
        .await;
    let all = replaced.elapsed();
    let peak_sampled = sampler.finish();
    let hwm = proc_status_field(None, "VmHWM:") * 1024;
    registered?;
    let disconnects = harness.counts.disconnected.load(Ordering::Relaxed) - disconnected_before;
    let generation = files.reloader.current().generation;
    let failed_builds = files.reloader.failed_builds();
    let reply = sm.request("reconnects", Duration::from_secs(10)).await?;
    // A new handshake sees the new certificate.
    let connector = tokio_rustls::TlsConnector::from(client_config(files.dir.path())?);
    let served = handshake(harness.url.trim_start_matches("https://"), &connector).await?;
    let peak = if hwm_reset {
        hwm.max(peak_sampled)
    } else {
        peak_sampled
    };
    println!(
        "renewal storm, {nodes} SMs over mTLS: server files replaced; renewal notice (provider \
         poll {PROVIDER_POLL:?}, credentials rebuilt, generation {generation_before} -> \
         {generation}) after {:.1} ms; {disconnects} disconnects heard; all {nodes} registered \
         again after {:.1} ms ({:.1} ms after the notice); SM process: {}; failed credential \
         builds {failed_builds}; a new handshake serves the new certificate: {}",
        notice.as_secs_f64() * 1e3,
        all.as_secs_f64() * 1e3,
        (all - notice).as_secs_f64() * 1e3,
        reply.join(" "),
        served == new_cert
    );
    println!(
        "  controller VmRSS {:.1} MiB before the storm, peak {:.1} MiB (sampled every 2 ms: \
         {:.1} MiB; VmHWM{}: {:.1} MiB), {:.1} MiB after; {} nodes in the registry",
        mib(rss_start),
        mib(peak),
        mib(peak_sampled),
        if hwm_reset {
            " since reset"
        } else {
            " (not reset)"
        },
        mib(hwm),
        mib(rss(None)),
        harness.controller().node_count()
    );
    summary(
        "N-TLS-1",
        &format!("renewal storm: all {nodes} registered again (from the file replacement)"),
        "<= 5 s",
        format!(
            "{:.2} s (notice after {:.0} ms)",
            all.as_secs_f64(),
            notice.as_secs_f64() * 1e3
        ),
        Some(all <= Duration::from_secs(5)),
    );
    summary(
        "N-TLS-1",
        "controller peak VmRSS during the storm (info)",
        "-",
        format!("{:.1} MiB (before {:.1} MiB)", mib(peak), mib(rss_start)),
        None,
    );
    Figure::new("N-TLS-1", "renewal_storm_s", all.as_secs_f64(), "s")
        .target(Cmp::AtMost, 5.0)
        .with("nodes", nodes)
        .with("from", "replacement of the server's files")
        .with("notice_ms", notice.as_secs_f64() * 1e3)
        .with("after_notice_s", (all - notice).as_secs_f64())
        .with("provider_poll_ms", PROVIDER_POLL.as_millis() as u64)
        .with("new_certificate_served", served == new_cert)
        .emit();
    Figure::new("N-TLS-1", "renewal_storm_peak_rss_mib", mib(peak), "MiB")
        .with("before_mib", mib(rss_start))
        .with("sampled_peak_mib", mib(peak_sampled))
        .with("vmhwm_mib", mib(hwm))
        .emit();
    ensure!(
        served == new_cert,
        "a new handshake still sees the old certificate"
    );
    ensure!(
        disconnects == nodes as u64,
        "{disconnects} disconnects heard, not {nodes}"
    );
    // The SM process exits without closing its reconnected streams.
    sm.quit().await;
    harness.stop().await;
    Ok(())
}
