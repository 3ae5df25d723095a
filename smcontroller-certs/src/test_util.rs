//! [`TestPki`]: a throwaway PKI made with rcgen, for tests and `cargo xtask gen-certs`
//! (feature `test-util`). Nothing here is fit for production: keys are written unencrypted.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

#[cfg(feature = "pkcs11")]
pub mod softhsm;

/// A test PKI: the unit's CA and a foreign CA (one the server does not trust), both ECDSA P-256,
/// and the leaf certificates they issue ([`TestPki::issue`]).
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
    foreign_ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

/// What a leaf certificate is for: its extended key usage (EKU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// `serverAuth` only.
    Server,
    /// `clientAuth` only.
    Client,
}

/// Which CA signs a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The unit's CA, the one the server trusts.
    Ca,
    /// The foreign CA, which the server does not trust.
    ForeignCa,
}

/// What to put in a leaf certificate: [`LeafSpec::server`] or [`LeafSpec::client`], then
/// changed with the other methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct LeafSpec {
    common_name: String,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
    usage: Usage,
    signer: Signer,
    expired: bool,
    valid_days: i64,
}

impl LeafSpec {
    /// The server's certificate: CN `localhost`, SANs `localhost`, `127.0.0.1` and `::1`, EKU
    /// `serverAuth`, valid from yesterday for a year, signed by the CA.
    pub fn server() -> Self {
        Self {
            common_name: "localhost".to_owned(),
            dns_names: vec!["localhost".to_owned()],
            ip_addresses: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            usage: Usage::Server,
            signer: Signer::Ca,
            expired: false,
            valid_days: 365,
        }
    }

    /// An SM's client certificate: `node_id` as CN and as the one DNS SAN, EKU `clientAuth`,
    /// valid from yesterday for a year, signed by the CA.
    pub fn client(node_id: &str) -> Self {
        Self {
            common_name: node_id.to_owned(),
            dns_names: vec![node_id.to_owned()],
            ip_addresses: Vec::new(),
            usage: Usage::Client,
            signer: Signer::Ca,
            expired: false,
            valid_days: 365,
        }
    }

    /// With `usage` as the extended key usage (e.g. a server-only certificate used as a client).
    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Signed by `signer`.
    pub fn signed_by(mut self, signer: Signer) -> Self {
        self.signer = signer;
        self
    }

    /// Expired: valid from 30 days ago until yesterday.
    pub fn expired(mut self) -> Self {
        self.expired = true;
        self
    }

    /// Valid from yesterday for `days` days.
    pub fn valid_days(mut self, days: u32) -> Self {
        self.valid_days = i64::from(days);
        self
    }

    /// With `names` as the DNS SANs instead.
    pub fn dns_names(mut self, names: &[&str]) -> Self {
        self.dns_names = names.iter().map(|&name| name.to_owned()).collect();
        self
    }
}

/// A certificate and its private key (ECDSA P-256), in PEM and DER.
#[derive(Clone)]
pub struct TestCert {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pkcs8_der: Vec<u8>,
    key_pem: String,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert").finish_non_exhaustive()
    }
}

/// A test PKI could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make the test PKI")]
pub struct TestPkiError(#[source] rcgen::Error);

impl From<rcgen::Error> for TestPkiError {
    fn from(error: rcgen::Error) -> Self {
        Self(error)
    }
}

impl TestPki {
    /// A new CA and foreign CA, each with a fresh key, valid from yesterday for ten years.
    pub fn new() -> Result<Self, TestPkiError> {
        Ok(Self {
            ca: ca("Aos test unit CA")?,
            foreign_ca: ca("Aos test foreign CA")?,
        })
    }

    /// The CA certificate, PEM: the file the server verifies clients with, and that clients
    /// verify the server with.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// The foreign CA's certificate, PEM.
    pub fn foreign_ca_pem(&self) -> String {
        self.foreign_ca.pem()
    }

    /// A new leaf certificate with a fresh key, as `spec` says.
    pub fn issue(&self, spec: &LeafSpec) -> Result<TestCert, TestPkiError> {
        let key = KeyPair::generate()?;
        let cert = self.sign(spec, &key)?;
        Ok(TestCert {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pkcs8_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A leaf certificate as `spec` says for a key kept elsewhere (in a token): only its public
    /// key is needed.
    pub fn issue_for(
        &self,
        spec: &LeafSpec,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedCert, TestPkiError> {
        let cert = self.sign(spec, public_key)?;
        Ok(IssuedCert {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
        })
    }

    /// The certificate `spec` describes for `key`, signed by the CA it names.
    fn sign(
        &self,
        spec: &LeafSpec,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        params.subject_alt_names = spec
            .dns_names
            .iter()
            .map(|dns| Ok(SanType::DnsName(dns.clone().try_into()?)))
            .chain(
                spec.ip_addresses
                    .iter()
                    .map(|ip| Ok(SanType::IpAddress(*ip))),
            )
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        if spec.expired {
            params.not_before = now - Duration::days(30);
            params.not_after = now - Duration::days(1);
        } else {
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(spec.valid_days);
        }
        let issuer = match spec.signer {
            Signer::Ca => &self.ca,
            Signer::ForeignCa => &self.foreign_ca,
        };
        params.signed_by(key, issuer)
    }

    /// [`LeafSpec::server`], issued.
    pub fn server(&self) -> Result<TestCert, TestPkiError> {
        self.issue(&LeafSpec::server())
    }

    /// [`LeafSpec::client`] for `node_id`, issued.
    pub fn client(&self, node_id: &str) -> Result<TestCert, TestPkiError> {
        self.issue(&LeafSpec::client(node_id))
    }

    /// Writes a development PKI into `dir` (created if needed) and returns the files written:
    ///
    /// - `ca.pem`: the CA that the server verifies clients with (and clients the server);
    /// - `server.pem`, `server.key`: [`LeafSpec::server`];
    /// - `client-node-1.pem`, `client-node-1.key`, ... up to `nodes`: [`LeafSpec::client`];
    /// - `client-expired.pem`, `.key`: an expired client of node `node-1`;
    /// - `foreign-ca.pem`, and `client-foreign.pem`, `.key`: a client of node `node-1` signed by
    ///   that CA, which the server does not trust;
    /// - `client-server-only.pem`, `.key`: a certificate for `node-1` with the `serverAuth` EKU
    ///   only, which the server refuses as a client certificate.
    ///
    /// Keys are PKCS#8 PEM, readable by the owner only (on Unix).
    pub fn write_dev_pki(&self, dir: &Path, nodes: usize) -> Result<Vec<PathBuf>, WriteError> {
        fs::create_dir_all(dir).map_err(|source| WriteError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut written = Vec::new();
        let mut put = |file: &str, contents: &str, secret: bool| {
            let path = dir.join(file);
            write_file(&path, contents, secret)?;
            written.push(path);
            Ok::<_, WriteError>(())
        };
        put("ca.pem", &self.ca_pem(), false)?;
        let mut leaf = |stem: &str, spec: LeafSpec| {
            let cert = self.issue(&spec)?;
            put(&format!("{stem}.pem"), cert.cert_pem(), false)?;
            put(&format!("{stem}.key"), cert.key_pem(), true)?;
            Ok::<_, WriteError>(())
        };
        leaf("server", LeafSpec::server())?;
        for n in 1..=nodes {
            let node = format!("node-{n}");
            leaf(&format!("client-{node}"), LeafSpec::client(&node))?;
        }
        leaf("client-expired", LeafSpec::client("node-1").expired())?;
        leaf(
            "client-foreign",
            LeafSpec::client("node-1").signed_by(Signer::ForeignCa),
        )?;
        leaf(
            "client-server-only",
            LeafSpec::client("node-1").usage(Usage::Server),
        )?;
        put("foreign-ca.pem", &self.foreign_ca_pem(), false)?;
        Ok(written)
    }
}

/// A certificate whose key is kept elsewhere (see [`TestPki::issue_for`]).
#[derive(Debug, Clone)]
pub struct IssuedCert {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl IssuedCert {
    /// The certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the certificate (PEM) to `path`, replacing it by a rename.
    pub fn write(&self, path: &Path) -> Result<(), WriteError> {
        write_file(path, &self.cert_pem, false)
    }
}

/// A development PKI could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A certificate could not be made.
    #[error(transparent)]
    Pki(#[from] TestPkiError),
    /// A file or directory could not be written.
    #[error("{}: cannot write", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

impl TestCert {
    /// The certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, DER (PKCS#8), as rustls takes it.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }

    /// The private key, PEM (PKCS#8, `PRIVATE KEY`).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key, PEM (SEC1, `EC PRIVATE KEY`, as `openssl ec` writes it).
    pub fn key_sec1_pem(&self) -> String {
        pem("EC PRIVATE KEY", &sec1_of_pkcs8(&self.key_pkcs8_der))
    }

    /// Writes `DIR/STEM.pem` (the certificate) and `DIR/STEM.key` (the PKCS#8 key) and returns
    /// their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), WriteError> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, false)?;
        write_file(&key, &self.key_pem, true)?;
        Ok((cert, key))
    }
}

/// A self-signed CA certificate named `common_name`, with a fresh key.
fn ca(common_name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Aos test PKI");
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes `contents` to `path` (replacing it by a rename, so a watcher never sees half a file);
/// `secret` files are made readable by the owner only (on Unix).
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), WriteError> {
    let io_error = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, contents).map_err(io_error)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    fs::rename(&tmp, path).map_err(io_error)
}

/// `der` as a PEM section labelled `label`.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 `PrivateKeyInfo`: its `privateKey` OCTET STRING.
fn sec1_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    // PrivateKeyInfo ::= SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey OCTET STRING, .. }
    let (_, info, _) = tlv(pkcs8);
    let (_, _, rest) = tlv(info); // version
    let (_, _, rest) = tlv(rest); // algorithm
    let (tag, key, _) = tlv(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
    key.to_vec()
}

/// The tag, contents and what follows of the DER element at the start of `der`.
fn tlv(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = der[0];
    let (len, header) = match der[1] {
        short if short < 0x80 => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7f);
            let len = der[2..2 + count]
                .iter()
                .fold(0, |len, &byte| (len << 8) | usize::from(byte));
            (len, 2 + count)
        }
    };
    (tag, &der[header..header + len], &der[header + len..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_like_the_rfc() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn the_sec1_key_is_the_one_inside_the_pkcs8_key() {
        let pki = TestPki::new().unwrap();
        let cert = pki.client("node-1").unwrap();
        let sec1 = sec1_of_pkcs8(&cert.key_pkcs8_der);
        // ECPrivateKey ::= SEQUENCE { version INTEGER (1), privateKey OCTET STRING, .. }
        assert_eq!(&sec1[2..5], &[0x02, 0x01, 0x01]);
        assert!(
            cert.key_sec1_pem()
                .starts_with("-----BEGIN EC PRIVATE KEY-----\n")
        );
    }
}
