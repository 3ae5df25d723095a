//! [`CredentialsReloader`]: the current server credentials, published, rebuilt on renewal.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use smcontroller_api::CertInfo;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{CredentialsBuilder, Error, ServerCredentials};

/// How long a failed rebuild waits before it is tried again, unless told otherwise.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(10);

/// Settings of the [`CredentialsReloader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadSettings {
    /// How long a failed rebuild waits before it is tried again (contract R-TLS-3; default
    /// [`DEFAULT_RETRY`]). A renewal notice during the wait ends it at once.
    pub retry: Duration,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        Self {
            retry: DEFAULT_RETRY,
        }
    }
}

impl ReloadSettings {
    /// The settings with `retry` as the wait between failed rebuilds.
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }
}

/// The server's current credentials, published over a [`watch`], and the task that rebuilds
/// them when the certificate provider announces a renewal (contract R-TLS-3).
///
/// The credentials are built before they replace anything:
///
/// - [`start`](Self::start) builds the first ones (generation 0) and fails if they cannot be
///   built;
/// - on a renewal notice the task builds new ones; on success it publishes them with the next
///   generation. On failure the previous credentials stay published (the server keeps serving
///   on them), a warning says why, and the build is tried again every
///   [`retry`](ReloadSettings::retry) until it succeeds;
/// - notices are coalesced: any number of them arriving while a build is running lead to one
///   more build after it; a notice arriving while a failed build waits for its retry starts the
///   retry at once (the files have changed again, likely completing the renewal).
///
/// A subscriber sees each new generation once ([`watch::Receiver::changed`]); the acceptor takes
/// the current configuration for every new handshake, and the server closes its SM streams when
/// the generation changes so that SMs reconnect on the new certificate.
///
/// Dropping the reloader stops the task; the last credentials stay readable by subscribers.
#[derive(Debug)]
#[must_use = "the credentials are rebuilt on renewal only while the reloader is alive"]
pub struct CredentialsReloader {
    credentials: watch::Receiver<ServerCredentials>,
    failures: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CredentialsReloader {
    /// Builds the first credentials and spawns the task that rebuilds them on renewal. Fails with
    /// the first build's error. Must be called within a Tokio runtime.
    pub async fn start(
        builder: CredentialsBuilder,
        settings: ReloadSettings,
    ) -> Result<Self, Error> {
        // Subscribe first: a renewal landing while the first build runs leads to a rebuild.
        let mut renewals = builder.subscribe_renewals();
        renewals.borrow_and_update();
        let first = builder.build().await?;
        info!(storage = builder.storage(), cert = %first.cert.cert_url,
            not_after = ?first.cert.not_after, "server credentials built");
        record_expiry(&first);
        let (publish, credentials) = watch::channel(first);
        let failures = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(builder, settings, renewals, publish, failures.clone()));
        Ok(Self {
            credentials,
            failures,
            task,
        })
    }

    /// A receiver of the credentials: the current ones now, each new generation as it is built.
    pub fn subscribe(&self) -> watch::Receiver<ServerCredentials> {
        self.credentials.clone()
    }

    /// The credentials now.
    pub fn current(&self) -> ServerCredentials {
        self.credentials.borrow().clone()
    }

    /// How many rebuilds after a renewal notice have failed so far (each retry counts).
    pub fn failed_builds(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl Drop for CredentialsReloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The served certificate's expiry as `smcontroller_cert_expiry_timestamp_seconds` (Unix
/// time), for whatever metrics exporter the binary installs.
fn record_expiry(credentials: &ServerCredentials) {
    if let Some(secs) = credentials
        .cert
        .not_after
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    {
        metrics::gauge!("smcontroller_cert_expiry_timestamp_seconds").set(secs.as_secs_f64());
    }
}

/// Waits for renewal notices and rebuilds, until every subscriber is gone.
async fn run(
    builder: CredentialsBuilder,
    settings: ReloadSettings,
    mut renewals: watch::Receiver<CertInfo>,
    publish: watch::Sender<ServerCredentials>,
    failures: Arc<AtomicU64>,
) {
    let storage = builder.storage().to_owned();
    let mut generation = 0;
    let mut provider_open = true;
    loop {
        if !next_notice(&mut renewals, &mut provider_open, &publish).await {
            return;
        }
        let mut attempt: u32 = 1;
        loop {
            // This build covers every notice up to now; later ones lead to another.
            renewals.borrow_and_update();
            match builder.build().await {
                Ok(mut credentials) => {
                    generation += 1;
                    credentials.generation = generation;
                    info!(storage = %storage, generation, attempt, cert = %credentials.cert.cert_url,
                        not_after = ?credentials.cert.not_after,
                        "renewed server credentials built; serving with them");
                    record_expiry(&credentials);
                    publish.send_replace(credentials);
                    break;
                }
                Err(e) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    warn!(storage = %storage, attempt, retry_in = ?settings.retry,
                        error = %e.report(),
                        "renewed server credentials cannot be built; still serving the previous ones");
                    tokio::select! {
                        () = tokio::time::sleep(settings.retry) => {}
                        open = next_notice(&mut renewals, &mut provider_open, &publish) => {
                            if !open {
                                return;
                            }
                        }
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

/// Waits for the next renewal notice: `true` when one came, `false` when every subscriber of
/// the credentials is gone (time to stop). Once the provider has closed its channel, only the
/// subscribers' departure ends the wait.
async fn next_notice(
    renewals: &mut watch::Receiver<CertInfo>,
    provider_open: &mut bool,
    publish: &watch::Sender<ServerCredentials>,
) -> bool {
    loop {
        if *provider_open {
            tokio::select! {
                changed = renewals.changed() => match changed {
                    Ok(()) => return true,
                    Err(_) => {
                        warn!("the certificate provider stopped publishing renewals; \
                            keeping the current server credentials");
                        *provider_open = false;
                    }
                },
                () = publish.closed() => return false,
            }
        } else {
            publish.closed().await;
            return false;
        }
    }
}
