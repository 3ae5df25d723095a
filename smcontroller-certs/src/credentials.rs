//! [`CredentialsBuilder`]: the server's rustls configuration from a certificate storage and the
//! unit's CA.

use std::{sync::Arc, time::SystemTime};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    sign::{CertifiedKey, SingleCertAndKey},
};
use smcontroller_api::{CertInfo, CertLoader, CertProvider};
use tokio::sync::watch;
use tracing::warn;

use crate::{Error, identity};

/// The ALPN protocol the server offers: HTTP/2, which gRPC runs on.
pub const ALPN_H2: &[u8] = b"h2";

/// One build of the server's TLS credentials: what the acceptor hands to rustls.
#[derive(Debug, Clone)]
pub struct ServerCredentials {
    /// The rustls configuration: the server's chain and key, client certificates required and
    /// verified against the CA, TLS 1.2 and 1.3, ALPN `h2`.
    pub config: Arc<ServerConfig>,
    /// Where the chain and key came from, with the leaf's expiry as read from it. A `pkcs11:`
    /// URL is kept with its PIN masked (`pin-value=***`), so that this can be logged.
    pub cert: CertInfo,
    /// 0 for the credentials built at start; each successful rebuild by the
    /// [`CredentialsReloader`](crate::CredentialsReloader) adds one. The server closes every SM
    /// stream when it changes (contract R-TLS-3).
    pub generation: u64,
}

/// Builds [`ServerCredentials`] for one certificate storage (contract R-TLS-1).
///
/// Each [`build`](Self::build) asks the [`CertProvider`] where the storage's certificate and
/// key are, loads them and the CA certificates with the [`CertLoader`], checks them and makes a
/// rustls [`ServerConfig`]:
///
/// - the key must match the leaf certificate ([`Error::KeyMismatch`]), and the leaf must not have
///   expired ([`Error::Expired`]);
/// - client certificates are required and verified against the CA certificates (a rustls
///   `WebPkiClientVerifier`: chain to the CA, validity dates, `clientAuth` extended key usage
///   when the certificate lists usages);
/// - TLS 1.2 and 1.3; ALPN `h2` only;
/// - cryptography from *ring* (see [`crypto_provider`]).
///
/// Everything is loaded anew at each build, the CA file included, so a rebuild takes up a
/// renewed CA file too.
#[derive(Clone)]
pub struct CredentialsBuilder {
    provider: Arc<dyn CertProvider>,
    loader: Arc<dyn CertLoader>,
    storage: String,
    ca_url: String,
    crypto: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CredentialsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsBuilder")
            .field("storage", &self.storage)
            .field("ca_url", &self.ca_url)
            .finish_non_exhaustive()
    }
}

/// The rustls cryptography this crate uses: *ring*'s, with its default cipher suites and key
/// exchange groups.
///
/// It is named explicitly rather than taken from rustls' process-wide default, so it works
/// whichever rustls backends other crates of the build turn on.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl CredentialsBuilder {
    /// Credentials of `storage` (e.g. `"sm"`) from `provider` and `loader`, verifying clients
    /// against the CA certificates at `ca_url` (a `file://` URL or an absolute path for the
    /// [`FileCertLoader`](crate::FileCertLoader)).
    pub fn new(
        provider: Arc<dyn CertProvider>,
        loader: Arc<dyn CertLoader>,
        storage: impl Into<String>,
        ca_url: impl Into<String>,
    ) -> Self {
        Self {
            provider,
            loader,
            storage: storage.into(),
            ca_url: ca_url.into(),
            crypto: crypto_provider(),
        }
    }

    /// The certificate storage the credentials come from.
    pub fn storage(&self) -> &str {
        &self.storage
    }

    /// The provider's renewals of the storage (see [`CertProvider::subscribe_renewals`]).
    pub fn subscribe_renewals(&self) -> watch::Receiver<CertInfo> {
        self.provider.subscribe_renewals(&self.storage)
    }

    /// Loads and checks the storage's certificate and key and the CA certificates, and builds
    /// the server configuration from them (generation 0). Every error names the file or URL and
    /// what was wrong.
    pub async fn build(&self) -> Result<ServerCredentials, Error> {
        let mut cert = self
            .provider
            .get_cert(&self.storage)
            .await
            .map_err(|source| Error::Provider {
                storage: self.storage.clone(),
                source,
            })?;
        let chain = self.load_chain(&cert.cert_url, "certificate chain").await?;
        let (not_after, written) = identity::not_after(&chain[0], &shown(&cert.cert_url))?;
        if not_after <= SystemTime::now() {
            return Err(Error::Expired {
                url: shown(&cert.cert_url),
                not_after: written,
            });
        }
        let certified = if crate::is_pkcs11_url(&cert.key_url) {
            self.token_certified_key(chain, &cert).await?
        } else {
            let key = self.load_key(&cert.key_url).await?;
            self.certified_key(chain, key, &cert)?
        };
        cert.not_after = Some(not_after);
        cert.cert_url = shown(&cert.cert_url);
        cert.key_url = shown(&cert.key_url);
        let verifier = self.client_verifier().await?;

        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.crypto))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(Error::Tls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ServerCredentials {
            config: Arc::new(config),
            cert,
            generation: 0,
        })
    }

    /// The certificates at `url`: from the token for a `pkcs11:` URL, else from the loader.
    async fn load_chain(
        &self,
        url: &str,
        what: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let chain = if crate::is_pkcs11_url(url) {
            token_chain(url).await?
        } else {
            self.loader
                .load_cert_chain(url)
                .await
                .map_err(|source| Error::Load {
                    what,
                    url: shown(url),
                    source,
                })?
                .into_iter()
                .map(|der| CertificateDer::from(der.0))
                .collect()
        };
        if chain.is_empty() {
            return Err(Error::EmptyChain { url: shown(url) });
        }
        Ok(chain)
    }

    /// The chain with the token key its leaf certifies (`pkcs11:` key URLs): the key is found
    /// in the token and stays there; rustls gets a signing key that asks the token to sign.
    #[cfg(feature = "pkcs11")]
    async fn token_certified_key(
        &self,
        chain: Vec<CertificateDer<'static>>,
        cert: &CertInfo,
    ) -> Result<CertifiedKey, Error> {
        let (key_url, cert_url) = (cert.key_url.clone(), cert.cert_url.clone());
        let leaf = chain[0].clone();
        let key = tokio::task::spawn_blocking(move || {
            crate::pkcs11::load_signing_key(&key_url, &leaf, &cert_url)
        })
        .await
        .map_err(|e| blocking_failed(&cert.key_url, e))??;
        // The token checked the key against the leaf with a signature: they match.
        Ok(CertifiedKey::new(chain, key))
    }

    #[cfg(not(feature = "pkcs11"))]
    async fn token_certified_key(
        &self,
        _chain: Vec<CertificateDer<'static>>,
        cert: &CertInfo,
    ) -> Result<CertifiedKey, Error> {
        Err(no_token_support(&cert.key_url))
    }

    async fn load_key(&self, url: &str) -> Result<PrivateKeyDer<'static>, Error> {
        let key = self
            .loader
            .load_private_key(url)
            .await
            .map_err(|source| Error::Load {
                what: "private key",
                url: shown(url),
                source,
            })?;
        // The api carries the key's DER without its format; the DER itself tells PKCS#8, SEC1
        // and PKCS#1 apart.
        PrivateKeyDer::try_from(key.0).map_err(|reason| Error::KeyFormat {
            url: url.to_owned(),
            reason,
        })
    }

    /// The chain and key as rustls signs with them, once the key is known to match the leaf.
    fn certified_key(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert: &CertInfo,
    ) -> Result<CertifiedKey, Error> {
        let signing_key = self
            .crypto
            .key_provider
            .load_private_key(key)
            .map_err(|source| Error::UnusableKey {
                url: shown(&cert.key_url),
                source,
            })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => Ok(certified),
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                warn!(cert = %shown(&cert.cert_url), key = %shown(&cert.key_url),
                    "cannot tell whether the key matches the certificate; using them as they are");
                Ok(certified)
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(Error::KeyMismatch {
                    cert_url: shown(&cert.cert_url),
                    key_url: shown(&cert.key_url),
                })
            }
            Err(source) => Err(Error::UnusableCertificate {
                url: shown(&cert.cert_url),
                source,
            }),
        }
    }

    async fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Error> {
        let cas = self.load_chain(&self.ca_url, "CA certificates").await?;
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|source| Error::BadCaCertificate {
                url: shown(&self.ca_url),
                source,
            })?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.crypto))
            .build()
            .map_err(|source| Error::ClientVerifier {
                url: shown(&self.ca_url),
                source,
            })
    }
}

/// `url` as errors and logs show it: a `pkcs11:` URL with its PIN masked.
fn shown(url: &str) -> String {
    crate::mask_pin(url).into_owned()
}

/// The certificates at a `pkcs11:` URL, read from the token on the blocking pool.
#[cfg(feature = "pkcs11")]
async fn token_chain(url: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let owned = url.to_owned();
    tokio::task::spawn_blocking(move || crate::pkcs11::load_cert_chain(&owned))
        .await
        .map_err(|e| blocking_failed(url, e))?
}

#[cfg(not(feature = "pkcs11"))]
async fn token_chain(url: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    Err(no_token_support(url))
}

/// A token call on the blocking pool that panicked or was cancelled (the runtime shutting
/// down).
#[cfg(feature = "pkcs11")]
fn blocking_failed(url: &str, e: tokio::task::JoinError) -> Error {
    Error::UnsupportedUrl {
        url: shown(url),
        reason: format!("the token call did not complete: {e}"),
    }
}

#[cfg(not(feature = "pkcs11"))]
fn no_token_support(url: &str) -> Error {
    Error::UnsupportedUrl {
        url: shown(url),
        reason: "this build cannot load from a token (pkcs11: URLs need the `pkcs11` feature of \
                 smcontroller-certs)"
            .to_owned(),
    }
}
