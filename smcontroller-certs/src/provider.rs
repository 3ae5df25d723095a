//! [`FileCertProvider`]: certificate storages backed by files, watched for replacement.

use std::{
    collections::HashMap,
    fs::Metadata,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use rustls::pki_types::pem::SectionKind;
use smcontroller_api::{CertInfo, CertProvider};
use tokio::{sync::watch, task::JoinHandle, time::MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::{Error, identity, loader, mask_pin};

/// How often [`FileCertProvider`] looks at its files unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A [`CertProvider`] whose storages are certificate and key files given at start (from the
/// daemon's config); it notices when those files are replaced and publishes the storage's new
/// [`CertInfo`] to its subscribers. This is how renewals reach the controller when no IAM
/// client is wired in.
///
/// A background task looks at the files every poll interval (default
/// [`DEFAULT_POLL_INTERVAL`]): a file's size, modification time and, on Unix, inode, device and
/// change time, which is one `stat` per file and catches a replacement by rename as well as a
/// rewrite in place. While either file of a storage is missing nothing is published; when both
/// are there again and differ from the last seen, the change is published. A renewal that writes
/// the certificate and the key one after the other may be seen in between: the credentials
/// built then fail (key does not match), and the next look publishes the second change, which the
/// [`CredentialsReloader`](crate::CredentialsReloader) rebuilds at once.
///
/// A `pkcs11:` URL (a key, or a certificate, in a token) names no file: only the storage's
/// files are watched, so with a key in a token, replacing the certificate file announces the
/// renewal (the new key is put in the token first; the builder picks, among the keys with the
/// URL's label and id, the one the new certificate certifies). URLs are logged with their PIN
/// masked.
///
/// The task stops when the provider is dropped; subscribers then see their channel closed.
#[derive(Debug)]
pub struct FileCertProvider {
    storages: Arc<HashMap<String, Storage>>,
    poller: JoinHandle<()>,
}

/// Builds a [`FileCertProvider`]: its storages and poll interval.
#[derive(Debug)]
#[must_use]
pub struct FileCertProviderBuilder {
    storages: Vec<(String, String, String)>,
    poll_interval: Duration,
}

#[derive(Debug)]
struct Storage {
    cert_url: String,
    key_url: String,
    /// The files watched: the certificate's and the key's, unless they are in a token.
    cert_path: Option<PathBuf>,
    key_path: Option<PathBuf>,
    renewals: watch::Sender<CertInfo>,
}

impl FileCertProvider {
    /// A builder with no storage and the default poll interval.
    pub fn builder() -> FileCertProviderBuilder {
        FileCertProviderBuilder {
            storages: Vec::new(),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// The current [`CertInfo`] of `storage`, or [`Error::UnknownStorage`].
    pub fn cert_info(&self, storage: &str) -> Result<CertInfo, Error> {
        let entry = self
            .storages
            .get(storage)
            .ok_or_else(|| Error::UnknownStorage {
                storage: storage.to_owned(),
            })?;
        Ok(entry.cert_info())
    }
}

impl FileCertProviderBuilder {
    /// Adds the storage `name` (e.g. `"sm"`), whose certificate chain and key are at these URLs
    /// (`file://` or absolute paths). A second call with the same name replaces the first.
    pub fn storage(
        mut self,
        name: impl Into<String>,
        cert_url: impl Into<String>,
        key_url: impl Into<String>,
    ) -> Self {
        self.storages
            .push((name.into(), cert_url.into(), key_url.into()));
        self
    }

    /// How often the files are looked at (default [`DEFAULT_POLL_INTERVAL`]; at least 1 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Starts the provider: checks that every URL names a file (see
    /// [`path_of_url`](crate::path_of_url)) or is a well-formed `pkcs11:` URL (see
    /// [`check_url`](crate::check_url)), notes the files as they are now, and spawns the task
    /// that watches them. Must be called within a Tokio runtime.
    pub fn spawn(self) -> Result<FileCertProvider, Error> {
        let mut storages = HashMap::new();
        for (name, cert_url, key_url) in self.storages {
            let cert_path = watched_file(&cert_url)?;
            let key_path = watched_file(&key_url)?;
            let renewals = watch::Sender::new(CertInfo {
                not_after: cert_path
                    .as_deref()
                    .and_then(|path| leaf_not_after(path, &cert_url)),
                cert_url: cert_url.clone(),
                key_url: key_url.clone(),
            });
            let storage = Storage {
                cert_url,
                key_url,
                cert_path,
                key_path,
                renewals,
            };
            storages.insert(name, storage);
        }
        let storages = Arc::new(storages);
        let stamps = storages
            .iter()
            .map(|(name, storage)| (name.clone(), storage.stamp()))
            .collect();
        let poller = tokio::spawn(poll(Arc::clone(&storages), stamps, self.poll_interval));
        Ok(FileCertProvider { storages, poller })
    }
}

impl Drop for FileCertProvider {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

#[async_trait]
impl CertProvider for FileCertProvider {
    /// The storage's URLs, and the expiry of the certificate now in the file (`None` if it
    /// cannot be read: loading it will say why).
    async fn get_cert(&self, storage: &str) -> smcontroller_api::Result<CertInfo> {
        Ok(self.cert_info(storage)?)
    }

    /// The storage's renewals. For a storage this provider does not know, a receiver whose
    /// sender is already gone (its `changed()` fails at once), and a warning.
    fn subscribe_renewals(&self, storage: &str) -> watch::Receiver<CertInfo> {
        match self.storages.get(storage) {
            Some(entry) => entry.renewals.subscribe(),
            None => {
                warn!(storage, "renewals asked for an unknown certificate storage");
                watch::channel(CertInfo {
                    cert_url: String::new(),
                    key_url: String::new(),
                    not_after: None,
                })
                .1
            }
        }
    }
}

impl Storage {
    fn cert_info(&self) -> CertInfo {
        CertInfo {
            cert_url: self.cert_url.clone(),
            key_url: self.key_url.clone(),
            not_after: self
                .cert_path
                .as_deref()
                .and_then(|path| leaf_not_after(path, &self.cert_url)),
        }
    }

    /// The watched files as they are now (`None` for a URL in a token); `None` if a file is
    /// missing.
    fn stamp(&self) -> Option<Stamp> {
        let of = |path: &Option<PathBuf>| match path {
            Some(path) => FileStamp::of(path).map(Some),
            None => Some(None),
        };
        Some((of(&self.cert_path)?, of(&self.key_path)?))
    }
}

/// What one look at a storage's files found: the certificate's and the key's stamps.
type Stamp = (Option<FileStamp>, Option<FileStamp>);

/// The file `url` names, or `None` for a `pkcs11:` URL (an object in a token, checked here).
fn watched_file(url: &str) -> Result<Option<PathBuf>, Error> {
    if crate::is_pkcs11_url(url) {
        crate::check_url(url)?;
        Ok(None)
    } else {
        loader::path_of_url(url).map(Some)
    }
}

/// The expiry of the first certificate in the file, or `None` if it cannot be read.
fn leaf_not_after(path: &Path, url: &str) -> Option<SystemTime> {
    let sections = loader::read_pem(path).ok()?;
    let (_, leaf) = sections
        .iter()
        .find(|(kind, _)| *kind == SectionKind::Certificate)?;
    identity::not_after(leaf, url).ok().map(|(time, _)| time)
}

/// What one `stat` says about a file, enough to see that it was replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    unix: (u64, u64, i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self::from_metadata(&metadata))
    }

    fn from_metadata(metadata: &Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            unix: (
                metadata.dev(),
                metadata.ino(),
                metadata.ctime(),
                metadata.ctime_nsec(),
            ),
        }
    }
}

/// Every `interval`, compares each storage's files with `last` and publishes the changed ones.
async fn poll(
    storages: Arc<HashMap<String, Storage>>,
    mut last: HashMap<String, Option<Stamp>>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (name, storage) in storages.iter() {
            let now = storage.stamp();
            let Some(stamp) = now else {
                debug!(storage = %name, cert = %mask_pin(&storage.cert_url),
                    key = %mask_pin(&storage.key_url),
                    "certificate or key file missing; waiting for both");
                continue;
            };
            let seen = last.entry(name.clone()).or_insert(None);
            if *seen == Some(stamp) {
                continue;
            }
            *seen = Some(stamp);
            let info = storage.cert_info();
            info!(storage = %name, cert = %mask_pin(&info.cert_url), key = %mask_pin(&info.key_url),
                not_after = ?info.not_after, "certificate files changed; publishing the renewal");
            storage.renewals.send_replace(info);
        }
    }
}
