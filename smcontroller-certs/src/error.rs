//! The one error type of this crate.

use std::{fmt, io, path::PathBuf};

/// What went wrong while loading or building the server's TLS credentials.
///
/// Each variant names the file or URL it is about. The `Display` text is the error's own part;
/// the cause, where there is one, is its [`source`](std::error::Error::source). Use
/// [`Error::report`] to show both in one line, as the logs of this crate do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not one this crate loads from: not `file://` nor an absolute path nor
    /// `pkcs11:`, a malformed URL, or a `pkcs11:` URL where this build has no token support.
    /// A `pkcs11:` URL is shown with its PIN masked.
    #[error("{url}: {reason}")]
    UnsupportedUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The file could not be read (missing, unreadable, a directory, ...).
    #[error("{}: cannot read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file has no PEM section in it at all (no `-----BEGIN` line).
    #[error("{}: not PEM (no \"-----BEGIN\" line in it)", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
    },
    /// The file has a PEM section that cannot be decoded.
    #[error("{}: not valid PEM", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The file is PEM but holds no `CERTIFICATE` section.
    #[error("{}: no certificate in it (PEM sections found: {found})", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// The labels of the PEM sections that are there, or `none`.
        found: String,
    },
    /// The file is PEM but holds no private key (`PRIVATE KEY`, `EC PRIVATE KEY` or
    /// `RSA PRIVATE KEY`).
    #[error("{}: no private key in it (PEM sections found: {found})", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
        /// The labels of the PEM sections that are there, or `none`.
        found: String,
    },
    /// The file holds an encrypted private key (`ENCRYPTED PRIVATE KEY`), which this crate
    /// cannot decrypt.
    #[error("{}: the private key is encrypted, which is not supported", path.display())]
    EncryptedPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate could not be parsed as X.509.
    #[error("{url}: certificate cannot be parsed")]
    BadCertificate {
        /// Where the certificate came from.
        url: String,
        /// What the X.509 parser found.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// The certificate provider could not say where the storage's certificate is.
    #[error("certificate storage {storage:?}: the certificate provider failed")]
    Provider {
        /// The storage asked for.
        storage: String,
        /// The provider's error.
        #[source]
        source: smcontroller_api::Error,
    },
    /// The certificate loader could not load something.
    #[error("{url}: cannot load the {what}")]
    Load {
        /// What was being loaded: `certificate chain`, `private key` or `CA certificates`.
        what: &'static str,
        /// Its URL.
        url: String,
        /// The loader's error.
        #[source]
        source: smcontroller_api::Error,
    },
    /// The loader returned an empty certificate chain.
    #[error("{url}: the certificate chain is empty")]
    EmptyChain {
        /// The chain's URL.
        url: String,
    },
    /// The private key's DER is not PKCS#8, SEC1 or PKCS#1.
    #[error("{url}: not a PKCS#8, SEC1 or PKCS#1 private key ({reason})")]
    KeyFormat {
        /// The key's URL.
        url: String,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The private key cannot be used for TLS (unsupported algorithm or curve, or broken).
    #[error("{url}: the private key cannot be used for TLS")]
    UnusableKey {
        /// The key's URL.
        url: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The server certificate cannot be used for TLS.
    #[error("{url}: the certificate cannot be used for TLS")]
    UnusableCertificate {
        /// The certificate's URL.
        url: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the one of the certificate.
    #[error("{key_url}: key does not match certificate {cert_url}")]
    KeyMismatch {
        /// The certificate's URL.
        cert_url: String,
        /// The key's URL.
        key_url: String,
    },
    /// The server certificate has expired.
    #[error("{url}: certificate expired at {not_after}")]
    Expired {
        /// The certificate's URL.
        url: String,
        /// When it expired, as written in the certificate (e.g. `Jan  2 03:04:05 2025 +00:00`).
        not_after: String,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("{url}: CA certificate cannot be used as a trust anchor")]
    BadCaCertificate {
        /// The CA file's URL.
        url: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The verifier of client certificates could not be built from the CA certificates.
    #[error("{url}: cannot verify client certificates with these CA certificates")]
    ClientVerifier {
        /// The CA file's URL.
        url: String,
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the TLS settings (a bug here rather than a bad file).
    #[error("TLS settings refused by rustls")]
    Tls(#[source] rustls::Error),
    /// The PKCS#11 module a `pkcs11:` URL names (`module-path`) cannot be loaded or
    /// initialised.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: cannot load the PKCS#11 module {}", module.display())]
    Pkcs11Module {
        /// The URL, PIN masked.
        url: String,
        /// The module's path.
        module: PathBuf,
        /// What loading it said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// No token present matches a `pkcs11:` URL.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: no such token (tokens present: {present})")]
    NoToken {
        /// The URL, PIN masked.
        url: String,
        /// The tokens there are, with their labels, serials and slots, or `none`.
        present: String,
    },
    /// The token refused the PIN of a `pkcs11:` URL.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: wrong PIN: token {token:?} refused it")]
    WrongPin {
        /// The URL, PIN masked.
        url: String,
        /// The token's label.
        token: String,
        /// What the token said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// The `pin-source` file of a `pkcs11:` URL cannot be read.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: cannot read the PIN file {}", path.display())]
    PinFile {
        /// The URL, PIN masked.
        url: String,
        /// The PIN file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The token holds no object of the kind, label and id a `pkcs11:` URL asks for.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: no {what} with {searched} in token {token:?}")]
    NoTokenObject {
        /// The URL, PIN masked.
        url: String,
        /// `private key` or `certificate`.
        what: &'static str,
        /// The label and id looked for.
        searched: String,
        /// The token's label.
        token: String,
    },
    /// The token key (or the certificate's key) cannot make a TLS signature: a kind of key
    /// TLS cannot use here, a key that may not sign, or no mechanism for it that the token
    /// offers and the key allows.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: the key cannot sign TLS handshakes: {reason}")]
    UnsupportedTokenKey {
        /// The URL, PIN masked.
        url: String,
        /// Why, naming the mechanisms needed and those there are.
        reason: String,
    },
    /// A call to the token failed.
    #[cfg(feature = "pkcs11")]
    #[error("{url}: the token failed to {what}")]
    Token {
        /// The URL, PIN masked.
        url: String,
        /// What was asked of it: `open a session`, `sign a TLS handshake`, ...
        what: &'static str,
        /// What the token said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// The storage name is not one the [`FileCertProvider`](crate::FileCertProvider) knows.
    #[error("unknown certificate storage {storage:?}")]
    UnknownStorage {
        /// The storage asked for.
        storage: String,
    },
}

impl Error {
    /// The error and its causes on one line, `outer: cause: cause`, for logs and messages.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// An error with its chain of causes, shown on one line (see [`Error::report`]).
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// The Aos error kind "failed", which [`smcontroller_api::Error::Failed`] carries for a file that
/// cannot be loaded.
const AOS_CODE_FAILED: i32 = 1;

impl From<Error> for smcontroller_api::Error {
    /// A URL this crate cannot handle is an invalid argument; anything else is a failure whose
    /// message is the whole [`report`](Error::report).
    fn from(error: Error) -> Self {
        let message = error.report().to_string();
        match error {
            Error::UnsupportedUrl { .. } | Error::UnknownStorage { .. } => {
                Self::InvalidArgument(message)
            }
            _ => Self::Failed {
                aos_code: AOS_CODE_FAILED,
                exit_code: 0,
                message,
            },
        }
    }
}
