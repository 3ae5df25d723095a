//! TLS for the SM controller: builds the server's mTLS credentials and rebuilds them when the
//! certificate is renewed.
//!
//! This crate will hold: loading the server chain and key through `CertProvider` and
//! `CertLoader` (from `smcontroller-api`), a client verifier that requires SM certificates
//! signed by the unit's CA, and a reloader that publishes each new `Arc<rustls::ServerConfig>`
//! over a `tokio::sync::watch` so the server restarts with new credentials only once they are
//! built (contract R-TLS-1, R-TLS-3). It depends on the api and rustls, never on tonic.
//!
//! Until then the controller serves plain HTTP/2 in explicit insecure mode only (R-TLS-2).
