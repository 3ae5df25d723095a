//! The reloader on Tokio's paused clock: a renewal is built before it replaces anything, a
//! failed one keeps the old credentials and is retried every `retry`, notices coalesce, and
//! each success is a new generation.

mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use smcontroller_certs::{
    CredentialsReloader, FileCertProvider, ReloadSettings, test_util::LeafSpec,
};
use support::{CountingLoader, Logs, PAUSED_DEADLINE, Pki, within_for};
use tokio::time::Instant;

const RETRY: Duration = Duration::from_secs(10);

/// Puts a key that does not match the certificate in place, as a renewal gone wrong.
fn break_the_key(pki: &Pki) {
    let other = pki.pki.server().unwrap();
    pki.replace("server.key", other.key_pem());
}

/// Puts a renewed, matching pair in place, valid for 100 days rather than the first one's 365;
/// returns the new certificate's expiry.
fn renew(pki: &Pki) -> SystemTime {
    let renewed = pki.pki.issue(&LeafSpec::server().valid_days(100)).unwrap();
    pki.replace("server.key", renewed.key_pem());
    pki.replace("server.pem", renewed.cert_pem());
    let info = FileCertProvider::builder()
        .storage("x", pki.url("server.pem"), pki.url("server.key"))
        .spawn()
        .unwrap()
        .cert_info("x")
        .unwrap();
    info.not_after.expect("expiry of the renewed certificate")
}

#[tokio::test(start_paused = true)]
async fn a_renewal_is_built_then_published_as_the_next_generation() {
    let pki = Pki::new();
    let loader = CountingLoader::new();
    let (builder, provider) = pki.builder(loader.clone());
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let mut credentials = reloader.subscribe();
    let first = credentials.borrow_and_update().clone();
    assert_eq!(first.generation, 0);
    assert_eq!(loader.builds(), 1);

    renew(&pki);
    provider.notify();
    within_for(PAUSED_DEADLINE, "generation 1", credentials.changed())
        .await
        .unwrap();
    let second = credentials.borrow_and_update().clone();
    assert_eq!(second.generation, 1);
    assert!(!Arc::ptr_eq(&first.config, &second.config));
    assert_eq!(reloader.current().generation, 1);
    assert_eq!(loader.builds(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_broken_renewal_keeps_the_old_credentials_and_is_retried_until_fixed() {
    let logs = Logs::capture();
    let pki = Pki::new();
    let loader = CountingLoader::new();
    let (builder, provider) = pki.builder(loader.clone());
    let settings = ReloadSettings::default().with_retry(RETRY);
    let reloader = CredentialsReloader::start(builder, settings).await.unwrap();
    let mut credentials = reloader.subscribe();
    let first = credentials.borrow_and_update().clone();

    break_the_key(&pki);
    provider.notify();
    loader.wait_builds(2).await;
    let failed_at = Instant::now();
    let warning = logs
        .wait_for("the failed rebuild", |e| e.field("attempt") == Some("1"))
        .await;
    assert_eq!(warning.level, tracing::Level::WARN);
    assert_eq!(warning.field("storage"), Some("sm"));
    assert!(
        warning
            .field("error")
            .is_some_and(|e| e.contains("key does not match certificate")),
        "{warning:?}"
    );
    assert!(Arc::ptr_eq(&reloader.current().config, &first.config));
    assert_eq!(reloader.current().generation, 0);

    // Still broken: retried after `retry`, not before, and still serving the old credentials.
    loader.wait_builds(3).await;
    assert_eq!(failed_at.elapsed(), RETRY);
    logs.wait_for("the second failure", |e| e.field("attempt") == Some("2"))
        .await;
    assert!(!credentials.has_changed().unwrap());

    // Fixed without a new notice: the next retry succeeds.
    let retried_at = Instant::now();
    let renewed = renew(&pki);
    within_for(PAUSED_DEADLINE, "generation 1", credentials.changed())
        .await
        .unwrap();
    assert_eq!(retried_at.elapsed(), RETRY);
    let now = credentials.borrow_and_update().clone();
    assert_eq!(now.generation, 1);
    assert_eq!(loader.builds(), 4);
    assert!(!Arc::ptr_eq(&now.config, &first.config));
    assert_eq!(
        now.cert.not_after,
        Some(renewed),
        "built from the renewed certificate"
    );
}

#[tokio::test(start_paused = true)]
async fn a_notice_during_the_retry_wait_rebuilds_at_once() {
    let pki = Pki::new();
    let loader = CountingLoader::new();
    let (builder, provider) = pki.builder(loader.clone());
    let settings = ReloadSettings::default().with_retry(RETRY);
    let reloader = CredentialsReloader::start(builder, settings).await.unwrap();
    let mut credentials = reloader.subscribe();
    credentials.borrow_and_update();

    break_the_key(&pki);
    provider.notify();
    loader.wait_builds(2).await;
    let failed_at = Instant::now();

    renew(&pki);
    provider.notify();
    within_for(PAUSED_DEADLINE, "generation 1", credentials.changed())
        .await
        .unwrap();
    assert!(failed_at.elapsed() < RETRY, "{:?}", failed_at.elapsed());
    assert_eq!(credentials.borrow().generation, 1);
    assert_eq!(loader.builds(), 3);
}

#[tokio::test(start_paused = true)]
async fn notices_during_a_build_coalesce_into_one_more_build() {
    let pki = Pki::new();
    let loader = CountingLoader::gated();
    let (builder, provider) = pki.builder(loader.clone());
    loader.open(1);
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let mut credentials = reloader.subscribe();
    credentials.borrow_and_update();

    renew(&pki);
    provider.notify();
    loader.wait_builds(2).await; // held at the gate
    // The files stay as they are, so the held build succeeds.
    for _ in 0..5 {
        provider.notify();
        tokio::task::yield_now().await;
    }
    loader.open(100);
    within_for(
        PAUSED_DEADLINE,
        "generation 2",
        credentials.wait_for(|c| c.generation == 2),
    )
    .await
    .unwrap();
    // Every task is idle now; on the paused clock this hour passes at once, and any build
    // still to come would have started.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(loader.builds(), 3, "one build for the five notices");
    assert_eq!(reloader.current().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn the_first_build_must_succeed() {
    let pki = Pki::new();
    break_the_key(&pki);
    let (builder, _provider) = pki.builder(CountingLoader::new());
    let error = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap_err();
    assert!(
        error
            .report()
            .to_string()
            .contains("key does not match certificate"),
        "{error}"
    );
}
