//! [`FileCertLoader`]: certificates and keys from PEM files named by `file://` URLs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    pem::{PemObject, SectionKind},
};
use smcontroller_api::CertLoader;

use crate::Error;

/// A [`CertLoader`] for PEM files: `file:///abs/path.pem` URLs, or plain absolute paths.
///
/// - A certificate chain is every `CERTIFICATE` section of the file, in order (leaf first).
/// - A private key is the first `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC1) or
///   `RSA PRIVATE KEY` (PKCS#1) section of the file.
///
/// Every error names the file and what was wrong with it (see [`Error`]). `pkcs11:` URLs are
/// refused with [`Error::UnsupportedUrl`]: the [`CredentialsBuilder`](crate::CredentialsBuilder)
/// loads those from the token itself (feature `pkcs11`).
///
/// The files are read with blocking calls: they are a few kilobytes on a local disk, read once
/// per (re)build of the credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileCertLoader;

impl FileCertLoader {
    /// A loader.
    pub fn new() -> Self {
        Self
    }

    /// The certificate chain in the file at `url`, leaf first, as rustls takes it.
    pub fn read_cert_chain(&self, url: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
        let path = path_of_url(url)?;
        let sections = read_pem(&path)?;
        let chain: Vec<_> = sections
            .iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der.clone()))
            .collect();
        if chain.is_empty() {
            return Err(Error::NoCertificate {
                found: labels(&sections),
                path,
            });
        }
        Ok(chain)
    }

    /// The private key in the file at `url`, as rustls takes it.
    pub fn read_private_key(&self, url: &str) -> Result<PrivateKeyDer<'static>, Error> {
        let path = path_of_url(url)?;
        let bytes = read(&path)?;
        let sections = parse_pem(&path, &bytes)?;
        let key = sections.iter().find_map(|(kind, der)| {
            let der = der.clone();
            match kind {
                SectionKind::PrivateKey => {
                    Some(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
                }
                SectionKind::EcPrivateKey => {
                    Some(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)))
                }
                SectionKind::RsaPrivateKey => {
                    Some(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)))
                }
                _ => None,
            }
        });
        match key {
            Some(key) => Ok(key),
            None if contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") => {
                Err(Error::EncryptedPrivateKey { path })
            }
            None => Err(Error::NoPrivateKey {
                found: labels(&sections),
                path,
            }),
        }
    }
}

#[async_trait]
impl CertLoader for FileCertLoader {
    async fn load_cert_chain(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<Vec<smcontroller_api::CertificateDer>> {
        let chain = self.read_cert_chain(url)?;
        Ok(chain
            .into_iter()
            .map(|der| smcontroller_api::CertificateDer(der.to_vec()))
            .collect())
    }

    async fn load_private_key(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<smcontroller_api::PrivateKeyDer> {
        let key = self.read_private_key(url)?;
        Ok(smcontroller_api::PrivateKeyDer(key.secret_der().to_vec()))
    }
}

/// The file a certificate URL names: `file:///abs/path` (`file://localhost/abs/path` too, with
/// `%XX` escapes decoded) or a plain absolute path.
///
/// Anything else is an [`Error::UnsupportedUrl`]: a relative path, another host, another scheme,
/// and `pkcs11:` URLs, which name an object in a token (see [`Pkcs11Url`](crate::Pkcs11Url)).
pub fn path_of_url(url: &str) -> Result<PathBuf, Error> {
    let unsupported = |reason: &str| Error::UnsupportedUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some(rest) = strip_prefix_ignore_case(url, "file://") {
        let (host, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => return Err(unsupported("a file:// URL needs an absolute path")),
        };
        if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
            return Err(unsupported(
                "file:// URLs on another host are not supported",
            ));
        }
        if path.contains(['?', '#']) {
            return Err(unsupported(
                "a file:// URL with a query or fragment is not supported",
            ));
        }
        let decoded = percent_decode(path).ok_or_else(|| {
            unsupported("bad %-escape in the file:// URL (or not UTF-8 once decoded)")
        })?;
        return Ok(PathBuf::from(decoded));
    }
    if crate::is_pkcs11_url(url) {
        return Err(Error::UnsupportedUrl {
            url: crate::mask_pin(url).into_owned(),
            reason: "a pkcs11: URL names an object in a token, not a file".to_owned(),
        });
    }
    if let Some(scheme) = scheme_of(url) {
        return Err(unsupported(&format!(
            "the URL scheme {scheme:?} is not supported; use a file:// URL or an absolute path"
        )));
    }
    let path = Path::new(url);
    if url.is_empty() || !path.is_absolute() {
        return Err(unsupported(
            "not a file:// URL nor an absolute path (relative paths are not accepted)",
        ));
    }
    Ok(path.to_path_buf())
}

/// The file's bytes; a missing or unreadable file is an [`Error::Read`] naming it.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The PEM sections of the file that rustls knows, in order.
pub(crate) fn read_pem(path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, Error> {
    parse_pem(path, &read(path)?)
}

/// The PEM sections of `bytes` (read from `path`) that rustls knows, in order; sections with
/// other labels are skipped. Bytes with no `-----BEGIN` line at all are [`Error::NotPem`].
fn parse_pem(path: &Path, bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, Error> {
    if !contains(bytes, b"-----BEGIN ") {
        return Err(Error::NotPem {
            path: path.to_path_buf(),
        });
    }
    <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::BadPem {
            path: path.to_path_buf(),
            source,
        })
}

/// The PEM labels of `sections`, for an error message: `PRIVATE KEY, CERTIFICATE`, or `none`
/// (when the sections there are ones rustls does not know).
fn labels(sections: &[(SectionKind, Vec<u8>)]) -> String {
    if sections.is_empty() {
        return "none that rustls knows".to_owned();
    }
    sections
        .iter()
        .map(|(kind, _)| label(*kind))
        .collect::<Vec<_>>()
        .join(", ")
}

fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        _ => "another kind",
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The scheme of `url` if it starts with one (`http:`, `pkcs11:`): RFC 3986's
/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"`, at least two characters long so that a
/// Windows drive letter is not taken for one.
fn scheme_of(url: &str) -> Option<&str> {
    let colon = url.find(':')?;
    let scheme = &url[..colon];
    let mut chars = scheme.chars();
    let first_is_alpha = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    (first_is_alpha && rest_ok && scheme.len() >= 2).then_some(scheme)
}

/// `s` with its `%XX` escapes decoded; `None` for a bad escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_and_absolute_paths_name_files() {
        let ok = |url: &str| path_of_url(url).unwrap();
        assert_eq!(
            ok("file:///var/aos/crypt/sm.pem"),
            Path::new("/var/aos/crypt/sm.pem")
        );
        assert_eq!(ok("FILE:///a.pem"), Path::new("/a.pem"));
        assert_eq!(ok("file://localhost/a.pem"), Path::new("/a.pem"));
        assert_eq!(ok("file:///dir%20x/a%2Bb.pem"), Path::new("/dir x/a+b.pem"));
        assert_eq!(ok("/etc/aos/ca.pem"), Path::new("/etc/aos/ca.pem"));
    }

    #[test]
    fn other_urls_are_refused_with_the_reason() {
        let reason = |url: &str| match path_of_url(url) {
            Err(Error::UnsupportedUrl { url: u, reason }) => {
                assert_eq!(u, url);
                reason
            }
            other => panic!("{url}: {other:?}"),
        };
        assert!(reason("pkcs11:token=aos;object=sm?module-path=/x.so").contains("not a file"));
        assert!(reason("https://example.invalid/a.pem").contains("\"https\" is not supported"));
        assert!(reason("relative/a.pem").contains("relative paths"));
        assert!(reason("").contains("relative paths"));
        assert!(reason("file://other-host/a.pem").contains("another host"));
        assert!(reason("file://").contains("absolute path"));
        assert!(reason("file:///a%zz.pem").contains("%-escape"));
        assert!(reason("file:///a.pem?x=1").contains("query"));
    }

    #[test]
    fn pem_labels_are_listed_for_errors() {
        assert_eq!(labels(&[]), "none that rustls knows");
        assert_eq!(
            labels(&[
                (SectionKind::PrivateKey, vec![]),
                (SectionKind::Crl, vec![])
            ]),
            "PRIVATE KEY, X509 CRL"
        );
    }
}
