//! TLS for the SM controller: the server's mTLS credentials, loaded from a certificate storage,
//! published, and rebuilt when the certificate is renewed (contract R-TLS-1, R-TLS-3).
//!
//! This crate depends on `smcontroller-api` and rustls (with tokio and tokio-rustls to accept
//! connections), **never on tonic**: the gRPC crate adapts what it hands out (a stream of
//! [`TlsConn`]s, byte streams with the peer's certificate) to tonic's `serve_with_incoming`.
//!
//! Start reading at [`CredentialsReloader`]: it holds the current [`ServerCredentials`]
//! (an `Arc<rustls::ServerConfig>` and a generation number) and publishes each new build over a
//! `tokio::sync::watch`. The pieces, in the order a server wires them:
//!
//! 1. [`FileCertProvider`] (a [`CertProvider`](smcontroller_api::CertProvider)): a storage name
//!    such as `"sm"` maps to a certificate file and a key file; it notices when they are
//!    replaced and publishes a renewal.
//! 2. [`FileCertLoader`] (a [`CertLoader`](smcontroller_api::CertLoader)): PEM chains and
//!    PKCS#8, SEC1 or PKCS#1 keys from `file://` URLs.
//! 3. [`CredentialsBuilder`]: from a provider, a loader and the CA file, one
//!    [`ServerCredentials`]: key checked against the certificate, certificate not expired,
//!    client certificates required and verified against the CA, TLS 1.2 and 1.3, ALPN `h2`.
//! 4. [`CredentialsReloader`]: builds at start, rebuilds on each renewal notice, keeps the old
//!    credentials and retries while a rebuild fails.
//! 5. [`TlsIncoming`]: accepts TCP connections and runs each handshake with the credentials
//!    current at that moment, under a timeout; refused handshakes are logged once with the peer
//!    and the [`HandshakeRefusal`]; the [`TlsConn`]s that pass carry the client's certificate
//!    and its names ([`PeerIdentity`]) for node identity binding (R-TLS-4).
//!
//! ```no_run
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use smcontroller_certs::{
//!     AcceptSettings, CredentialsBuilder, CredentialsReloader, FileCertLoader,
//!     FileCertProvider, ReloadSettings, TlsIncoming,
//! };
//!
//! let provider = FileCertProvider::builder()
//!     .storage("sm", "file:///var/aos/crypt/sm.pem", "file:///var/aos/crypt/sm.key")
//!     .spawn()?;
//! let builder = CredentialsBuilder::new(
//!     Arc::new(provider),
//!     Arc::new(FileCertLoader::new()),
//!     "sm",
//!     "file:///var/aos/crypt/ca.pem",
//! );
//! let reloader = CredentialsReloader::start(builder, ReloadSettings::default()).await?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8093").await?;
//! let mut incoming = TlsIncoming::new(listener, reloader.subscribe(), AcceptSettings::default());
//! while let Some(conn) = incoming.accept().await {
//!     println!("{} connected as {:?}", conn.info().peer_addr(), conn.info().peer_identity());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! With the `pkcs11` feature, the server's key may be in a PKCS#11 token (contract R-TLS-5):
//! for a `pkcs11:` key URL ([`Pkcs11Url`], RFC 7512) the [`CredentialsBuilder`] loads the
//! module the URL names, logs in, finds the key the certificate certifies and hands rustls a
//! signing key whose signatures the token makes; the key is never read. Certificates may come
//! from the token too (`type=cert`). Errors and logs show such URLs with `pin-value=***`.
//!
//! With the `test-util` feature, `test_util::TestPki` makes a throwaway CA and certificates
//! with rcgen, for tests and for `cargo xtask gen-certs` (with `pkcs11` too,
//! `test_util::softhsm` makes SoftHSM2 tokens with keys in them).

mod accept;
mod credentials;
mod error;
mod identity;
mod loader;
#[cfg(feature = "pkcs11")]
mod pkcs11;
mod pkcs11_url;
mod provider;
mod reload;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use accept::{
    AcceptSettings, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, Establishing,
    HandshakeRefusal, PlainConn, PlainIncoming, TlsConn, TlsConnInfo, TlsIncoming,
};
pub use credentials::{ALPN_H2, CredentialsBuilder, ServerCredentials, crypto_provider};
pub use error::{Error, Report};
pub use identity::{IdentityField, PeerIdentity};
pub use loader::{FileCertLoader, path_of_url};
pub use pkcs11_url::{ObjectType, PinSource, Pkcs11Url, check_url, is_pkcs11_url, mask_pin};
pub use provider::{DEFAULT_POLL_INTERVAL, FileCertProvider, FileCertProviderBuilder};
pub use reload::{CredentialsReloader, DEFAULT_RETRY, ReloadSettings};
