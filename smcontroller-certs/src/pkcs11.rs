//! Keys and certificates in a PKCS#11 token (feature `pkcs11`, contract R-TLS-5).
//!
//! A `pkcs11:` key URL ([`Pkcs11Url`]) is resolved in the token it names: the module is loaded
//! (once per process and path, and never unloaded), the token found by its label, serial, ...,
//! the user logged in with the URL's PIN, and the private keys with the URL's label and id
//! looked up. The key whose signature the server certificate's public key verifies is the one
//! used: so during a renewal, when the token holds the old key and the new one under the same
//! label, the certificate picks its own. The private key is never read: [`TokenSigningKey`]
//! hands rustls a signer that asks the token for each TLS signature.
//!
//! Certificates (`type=cert` URLs) are read from the token as DER, every certificate with the
//! URL's label and id, ordered leaf first.
//!
//! Everything here blocks on the module: the [`CredentialsBuilder`](crate::CredentialsBuilder)
//! runs it on Tokio's blocking pool; the signer runs inside the TLS handshake, as rustls signs.

use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{Mechanism, MechanismType, rsa::PkcsMgfType, rsa::PkcsPssParams},
    object::{Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::{Slot, TokenInfo},
    types::{AuthPin, Ulong},
};
use rustls::{
    SignatureAlgorithm, SignatureScheme,
    pki_types::{CertificateDer, SubjectPublicKeyInfoDer},
    sign::{Signer, SigningKey},
};
use tracing::warn;
use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};

use crate::{Error, ObjectType, PinSource, Pkcs11Url};

/// How many sessions a token key signs on at most at the same time.
const MAX_SESSIONS: usize = 4;

/// What the token signs when the builder checks that a key is the certificate's.
const CHALLENGE: &[u8] = b"smcontroller-certs: is this token key the certificate's key?";

/// The certificates at the `pkcs11:` URL `url`, leaf first.
pub(crate) fn load_cert_chain(url: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let url = Pkcs11Url::parse(url)?;
    if let Some(kind) = url.object_type.filter(|kind| *kind != ObjectType::Cert) {
        return Err(Error::UnsupportedUrl {
            url: url.to_string(),
            reason: format!(
                "type={} names no certificate (type=cert does)",
                kind.as_str()
            ),
        });
    }
    let ctx = module(&url)?;
    let token = Token::open(&ctx, &url)?;
    if url.pin.is_some() {
        token.login(&url, &read_pin(&url)?)?;
    }
    let mut template = vec![
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
    ];
    template.extend(object_attributes(&url));
    let handles = token
        .session
        .find_objects(&template)
        .map_err(token_error(&url, "look up certificates"))?;
    let mut certs = Vec::with_capacity(handles.len());
    for handle in handles {
        let attributes = token
            .session
            .get_attributes(handle, &[AttributeType::Value])
            .map_err(token_error(&url, "read a certificate"))?;
        if let Some(Attribute::Value(der)) = attributes.into_iter().next() {
            certs.push(der);
        }
    }
    if certs.is_empty() {
        return Err(Error::NoTokenObject {
            url: url.to_string(),
            what: "certificate",
            searched: url.describe_object(),
            token: token.label,
        });
    }
    Ok(leaf_first(certs)
        .into_iter()
        .map(CertificateDer::from)
        .collect())
}

/// The key at the `pkcs11:` URL `url` that `leaf` certifies, as a rustls signing key backed by
/// the token.
pub(crate) fn load_signing_key(
    url: &str,
    leaf: &CertificateDer<'_>,
    cert_url: &str,
) -> Result<Arc<dyn SigningKey>, Error> {
    let url = Pkcs11Url::parse(url)?;
    if let Some(kind) = url.object_type.filter(|kind| *kind != ObjectType::Private) {
        return Err(Error::UnsupportedUrl {
            url: url.to_string(),
            reason: format!(
                "type={} names no private key (type=private does)",
                kind.as_str()
            ),
        });
    }
    let public = CertPublicKey::of(leaf, cert_url)?;
    let ctx = module(&url)?;
    let pin = read_pin(&url)?;
    let mut key = TokenKey {
        masked: url.to_string(),
        cert_url: crate::mask_pin(cert_url).into_owned(),
        url,
        ctx,
        pin,
        public,
        schemes: Vec::new(),
        located: Mutex::new(None),
        pool: (0..MAX_SESSIONS).map(|_| Mutex::new(None)).collect(),
        next: AtomicUsize::new(0),
    };
    let (connection, schemes) = key.locate()?;
    key.schemes = schemes;
    *lock(&key.pool[0]) = Some(connection);
    Ok(Arc::new(TokenSigningKey(Arc::new(key))))
}

/// The modules loaded so far, by path: each is loaded and initialised once per process, and
/// stays (a module may not be initialised twice, and unloading one that others still use
/// would pull it from under them).
fn module(url: &Pkcs11Url) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = lock(MODULES.get_or_init(Mutex::default));
    if let Some(ctx) = modules.get(&url.module_path) {
        return Ok(ctx.clone());
    }
    let failed = |source| Error::Pkcs11Module {
        url: url.to_string(),
        module: url.module_path.clone(),
        source,
    };
    let ctx = Pkcs11::new(&url.module_path).map_err(failed)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Initialised by someone else in this process (a test, another library): shared.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(failed(e)),
    }
    modules.insert(url.module_path.clone(), ctx.clone());
    Ok(ctx)
}

/// The PIN of the URL, read from its `pin-source` file if that is where it is.
fn read_pin(url: &Pkcs11Url) -> Result<Option<AuthPin>, Error> {
    Ok(match &url.pin {
        None => None,
        Some(PinSource::Value(pin)) => Some(AuthPin::from(pin.as_str())),
        Some(PinSource::File(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::PinFile {
                url: url.to_string(),
                path: path.clone(),
                source,
            })?;
            let pin = text.lines().next().unwrap_or_default();
            Some(AuthPin::from(pin))
        }
    })
}

/// An [`Error::Token`] for a failure of `what` on `url`'s token.
fn token_error<'a>(url: &'a Pkcs11Url, what: &'static str) -> impl FnOnce(CkError) -> Error + 'a {
    move |source| Error::Token {
        url: url.to_string(),
        what,
        source,
    }
}

/// The label and id the URL gives, as a search template.
fn object_attributes(url: &Pkcs11Url) -> Vec<Attribute> {
    let mut template = Vec::new();
    if let Some(label) = &url.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &url.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

/// A session on the token a URL names.
struct Token {
    slot: Slot,
    label: String,
    session: Session,
}

impl Token {
    /// Finds the first token that matches the URL and opens a read-only session on it.
    fn open(ctx: &Pkcs11, url: &Pkcs11Url) -> Result<Self, Error> {
        let (slot, label) = find_token(ctx, url)?;
        let session = ctx
            .open_ro_session(slot)
            .map_err(token_error(url, "open a session"))?;
        Ok(Self {
            slot,
            label,
            session,
        })
    }

    /// Logs the user in (a user already logged in, by another session of this process, is
    /// fine).
    fn login(&self, url: &Pkcs11Url, pin: &Option<AuthPin>) -> Result<(), Error> {
        let Some(pin) = pin else {
            return Ok(());
        };
        match self.session.login(UserType::User, Some(pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(
                source @ CkError::Pkcs11(
                    RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                    _,
                ),
            ) => Err(Error::WrongPin {
                url: url.to_string(),
                token: self.label.clone(),
                source,
            }),
            Err(source) => Err(Error::Token {
                url: url.to_string(),
                what: "log in",
                source,
            }),
        }
    }
}

/// The slot of the first token matching the URL, and the token's label.
fn find_token(ctx: &Pkcs11, url: &Pkcs11Url) -> Result<(Slot, String), Error> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(token_error(url, "list its slots"))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(token_error(url, "describe a token"))?;
        if token_matches(url, slot, &info) {
            return Ok((slot, info.label().to_owned()));
        }
        present.push(format!(
            "{:?} (serial {:?}, slot {})",
            info.label(),
            info.serial_number(),
            slot.id()
        ));
    }
    Err(Error::NoToken {
        url: url.to_string(),
        present: if present.is_empty() {
            "none".to_owned()
        } else {
            present.join(", ")
        },
    })
}

fn token_matches(url: &Pkcs11Url, slot: Slot, info: &TokenInfo) -> bool {
    let same = |wanted: &Option<String>, have: &str| {
        wanted
            .as_deref()
            .is_none_or(|wanted| wanted.trim_end() == have.trim_end())
    };
    same(&url.token, info.label())
        && same(&url.manufacturer, info.manufacturer_id())
        && same(&url.model, info.model())
        && same(&url.serial, info.serial_number())
        && url.slot_id.is_none_or(|id| id == slot.id())
}

/// The server certificate's public key: what a token key must match.
#[derive(Debug)]
struct CertPublicKey {
    /// The certificate's SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    /// Its subjectPublicKey (an EC point, or an RSAPublicKey), as signatures are verified with.
    key: Vec<u8>,
    kind: KeyKind,
}

/// The kinds of key a TLS server signature can be made with here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    EcP256,
    EcP384,
    Rsa,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EcP256 => "ECDSA P-256",
            Self::EcP384 => "ECDSA P-384",
            Self::Rsa => "RSA",
        })
    }
}

/// DER of the OID of id-ecPublicKey's named curves, as `CKA_EC_PARAMS` holds them.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl CertPublicKey {
    fn of(leaf: &CertificateDer<'_>, cert_url: &str) -> Result<Self, Error> {
        let bad = |source| Error::BadCertificate {
            url: crate::mask_pin(cert_url).into_owned(),
            source,
        };
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| bad(e.into()))?;
        let spki = cert.public_key();
        let algorithm = spki.algorithm.algorithm.to_id_string();
        let kind = match algorithm.as_str() {
            "1.2.840.10045.2.1" => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|oid| oid.to_id_string());
                match curve.as_deref() {
                    Some("1.2.840.10045.3.1.7") => Some(KeyKind::EcP256),
                    Some("1.3.132.0.34") => Some(KeyKind::EcP384),
                    _ => None,
                }
            }
            "1.2.840.113549.1.1.1" => Some(KeyKind::Rsa),
            _ => None,
        };
        let kind = kind.ok_or_else(|| Error::UnsupportedTokenKey {
            url: crate::mask_pin(cert_url).into_owned(),
            reason: format!(
                "the certificate's key (algorithm {algorithm}) is not ECDSA P-256, ECDSA P-384 \
                 or RSA"
            ),
        })?;
        Ok(Self {
            spki: spki.raw.to_vec(),
            key: spki.subject_public_key.data.to_vec(),
            kind,
        })
    }

    /// Whether `signature` over `message` with `scheme` is this key's.
    fn verifies(&self, scheme: SignatureScheme, message: &[u8], signature: &[u8]) -> bool {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        algorithms
            .mapping
            .iter()
            .filter(|(s, _)| *s == scheme)
            .flat_map(|(_, algs)| algs.iter())
            .any(|alg| alg.verify_signature(&self.key, message, signature).is_ok())
    }
}

/// A hash the token's raw mechanisms need done here (the TLS message is hashed before it goes
/// to `CKM_ECDSA`, `CKM_RSA_PKCS_PSS` or `CKM_RSA_PKCS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn mechanism(self) -> MechanismType {
        match self {
            Self::Sha256 => MechanismType::SHA256,
            Self::Sha384 => MechanismType::SHA384,
            Self::Sha512 => MechanismType::SHA512,
        }
    }

    fn mgf(self) -> PkcsMgfType {
        match self {
            Self::Sha256 => PkcsMgfType::MGF1_SHA256,
            Self::Sha384 => PkcsMgfType::MGF1_SHA384,
            Self::Sha512 => PkcsMgfType::MGF1_SHA512,
        }
    }

    fn len(self) -> u64 {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// The digest of `data`, by *ring* through rustls' hash providers; SHA-512 is not among
    /// them, so schemes with SHA-512 use the token's own hashing mechanisms only.
    fn digest(self, data: &[u8]) -> Option<Vec<u8>> {
        use rustls::crypto::ring::cipher_suite;
        let suite = match self {
            Self::Sha256 => cipher_suite::TLS13_AES_128_GCM_SHA256,
            Self::Sha384 => cipher_suite::TLS13_AES_256_GCM_SHA384,
            Self::Sha512 => return None,
        };
        let hash = suite.tls13()?.common.hash_provider;
        Some(hash.hash(data).as_ref().to_vec())
    }

    /// The DER DigestInfo prefix that `CKM_RSA_PKCS` signs before the digest.
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Self::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Self::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Self::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// How one TLS signature scheme is made with the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `CKM_ECDSA_SHA*`: the token hashes.
    EcdsaHashing(Hash),
    /// `CKM_ECDSA` over a hash made here.
    EcdsaRaw(Hash),
    /// `CKM_SHA*_RSA_PKCS_PSS`.
    PssHashing(Hash),
    /// `CKM_RSA_PKCS_PSS` over a hash made here.
    PssRaw(Hash),
    /// `CKM_SHA*_RSA_PKCS`.
    Pkcs1Hashing(Hash),
    /// `CKM_RSA_PKCS` over a DigestInfo made here.
    Pkcs1Raw(Hash),
}

impl Method {
    fn mechanism_type(self) -> MechanismType {
        match self {
            Self::EcdsaHashing(Hash::Sha256) => MechanismType::ECDSA_SHA256,
            Self::EcdsaHashing(Hash::Sha384) => MechanismType::ECDSA_SHA384,
            Self::EcdsaHashing(Hash::Sha512) => MechanismType::ECDSA_SHA512,
            Self::EcdsaRaw(_) => MechanismType::ECDSA,
            Self::PssHashing(Hash::Sha256) => MechanismType::SHA256_RSA_PKCS_PSS,
            Self::PssHashing(Hash::Sha384) => MechanismType::SHA384_RSA_PKCS_PSS,
            Self::PssHashing(Hash::Sha512) => MechanismType::SHA512_RSA_PKCS_PSS,
            Self::PssRaw(_) => MechanismType::RSA_PKCS_PSS,
            Self::Pkcs1Hashing(Hash::Sha256) => MechanismType::SHA256_RSA_PKCS,
            Self::Pkcs1Hashing(Hash::Sha384) => MechanismType::SHA384_RSA_PKCS,
            Self::Pkcs1Hashing(Hash::Sha512) => MechanismType::SHA512_RSA_PKCS,
            Self::Pkcs1Raw(_) => MechanismType::RSA_PKCS,
        }
    }

    /// Whether this method can be used here at all (raw mechanisms need the hash made here).
    fn available(self) -> bool {
        match self {
            Self::EcdsaRaw(hash) | Self::PssRaw(hash) | Self::Pkcs1Raw(hash) => {
                hash.digest(b"").is_some()
            }
            _ => true,
        }
    }

    fn mechanism(self) -> Mechanism<'static> {
        let pss = |hash: Hash| PkcsPssParams {
            hash_alg: hash.mechanism(),
            mgf: hash.mgf(),
            s_len: Ulong::from(hash.len()),
        };
        match self {
            Self::EcdsaHashing(Hash::Sha256) => Mechanism::EcdsaSha256,
            Self::EcdsaHashing(Hash::Sha384) => Mechanism::EcdsaSha384,
            Self::EcdsaHashing(Hash::Sha512) => Mechanism::EcdsaSha512,
            Self::EcdsaRaw(_) => Mechanism::Ecdsa,
            Self::PssHashing(hash @ Hash::Sha256) => Mechanism::Sha256RsaPkcsPss(pss(hash)),
            Self::PssHashing(hash @ Hash::Sha384) => Mechanism::Sha384RsaPkcsPss(pss(hash)),
            Self::PssHashing(hash @ Hash::Sha512) => Mechanism::Sha512RsaPkcsPss(pss(hash)),
            Self::PssRaw(hash) => Mechanism::RsaPkcsPss(pss(hash)),
            Self::Pkcs1Hashing(Hash::Sha256) => Mechanism::Sha256RsaPkcs,
            Self::Pkcs1Hashing(Hash::Sha384) => Mechanism::Sha384RsaPkcs,
            Self::Pkcs1Hashing(Hash::Sha512) => Mechanism::Sha512RsaPkcs,
            Self::Pkcs1Raw(_) => Mechanism::RsaPkcs,
        }
    }

    /// What goes to the token for `message`.
    fn input(self, message: &[u8]) -> Vec<u8> {
        let digest = |hash: Hash| {
            hash.digest(message)
                .expect("only available methods are used")
        };
        match self {
            Self::EcdsaHashing(_) | Self::PssHashing(_) | Self::Pkcs1Hashing(_) => message.to_vec(),
            Self::EcdsaRaw(hash) | Self::PssRaw(hash) => digest(hash),
            Self::Pkcs1Raw(hash) => [hash.digest_info_prefix(), &digest(hash)].concat(),
        }
    }

    /// The token's signature as TLS carries it (ECDSA: `r || s` becomes a DER
    /// `ECDSA-Sig-Value`).
    fn output(self, signature: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Self::EcdsaHashing(_) | Self::EcdsaRaw(_) => ecdsa_der(&signature),
            _ => Some(signature),
        }
    }
}

/// The TLS signature schemes a key of `kind` can make, best first, each with the ways the
/// token may make it, best first.
fn candidates(kind: KeyKind) -> Vec<(SignatureScheme, Vec<Method>)> {
    use Hash::{Sha256, Sha384, Sha512};
    match kind {
        KeyKind::EcP256 => vec![(
            SignatureScheme::ECDSA_NISTP256_SHA256,
            vec![Method::EcdsaHashing(Sha256), Method::EcdsaRaw(Sha256)],
        )],
        KeyKind::EcP384 => vec![(
            SignatureScheme::ECDSA_NISTP384_SHA384,
            vec![Method::EcdsaHashing(Sha384), Method::EcdsaRaw(Sha384)],
        )],
        KeyKind::Rsa => {
            let pss = [
                (SignatureScheme::RSA_PSS_SHA256, Sha256),
                (SignatureScheme::RSA_PSS_SHA384, Sha384),
                (SignatureScheme::RSA_PSS_SHA512, Sha512),
            ]
            .map(|(scheme, hash)| (scheme, vec![Method::PssHashing(hash), Method::PssRaw(hash)]));
            let pkcs1 = [
                (SignatureScheme::RSA_PKCS1_SHA256, Sha256),
                (SignatureScheme::RSA_PKCS1_SHA384, Sha384),
                (SignatureScheme::RSA_PKCS1_SHA512, Sha512),
            ]
            .map(|(scheme, hash)| {
                (
                    scheme,
                    vec![Method::Pkcs1Hashing(hash), Method::Pkcs1Raw(hash)],
                )
            });
            pss.into_iter().chain(pkcs1).collect()
        }
    }
}

/// `r || s` (two big-endian halves of equal length) as DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let integer = |value: &[u8]| {
        let start = value
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(value.len() - 1);
        let value = &value[start..];
        let mut out = vec![0x02];
        let pad = value[0] & 0x80 != 0;
        der_length(&mut out, value.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(value);
        out
    };
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30];
    der_length(&mut out, body.len());
    out.extend(body);
    Some(out)
}

fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// `certs` (DER) ordered leaf first, each followed by its issuer when that is among them;
/// certificates that cannot be parsed keep their place at the end.
fn leaf_first(certs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let names: Vec<Option<(Vec<u8>, Vec<u8>)>> = certs
        .iter()
        .map(|der| {
            X509Certificate::from_der(der).ok().map(|(_, cert)| {
                (
                    cert.subject().as_raw().to_vec(),
                    cert.issuer().as_raw().to_vec(),
                )
            })
        })
        .collect();
    let issues_another = |i: usize| {
        names[i].as_ref().is_some_and(|(subject, _)| {
            names.iter().enumerate().any(|(j, other)| {
                j != i && other.as_ref().is_some_and(|(_, issuer)| issuer == subject)
            })
        })
    };
    let mut order = Vec::with_capacity(certs.len());
    let mut next = (0..certs.len()).find(|&i| names[i].is_some() && !issues_another(i));
    while let Some(i) = next {
        order.push(i);
        let issuer = names[i].as_ref().map(|(_, issuer)| issuer);
        next = (0..certs.len()).find(|&j| {
            !order.contains(&j)
                && names[j]
                    .as_ref()
                    .is_some_and(|(subject, _)| Some(subject) == issuer)
        });
    }
    let rest: Vec<usize> = (0..certs.len()).filter(|i| !order.contains(i)).collect();
    order.extend(rest);
    let mut certs: Vec<Option<Vec<u8>>> = certs.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| certs[i].take()).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A private key in a token and the sessions it signs on.
struct TokenKey {
    /// The key's URL with the PIN masked.
    masked: String,
    /// The certificate's URL with the PIN masked.
    cert_url: String,
    url: Pkcs11Url,
    ctx: Pkcs11,
    pin: Option<AuthPin>,
    public: CertPublicKey,
    /// The schemes the key can make, best first, each with the method the token supports.
    schemes: Vec<(SignatureScheme, Method)>,
    /// Where the key is (its slot and handle) while that is known to be good; `None` after a
    /// failure, so that the next signature finds it anew.
    located: Mutex<Option<(Slot, ObjectHandle)>>,
    /// Sessions to sign on, opened when needed.
    pool: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
}

/// A session on the token and the key's handle.
struct Connection {
    session: Session,
    key: ObjectHandle,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("url", &self.masked)
            .field("kind", &self.public.kind)
            .field("schemes", &self.schemes)
            .finish_non_exhaustive()
    }
}

/// Why a private key object is not the one to use.
enum Unfit {
    /// A key of another kind or another key: not the certificate's.
    NotTheCertificates,
    /// The certificate's kind of key, but it cannot make any TLS signature: why.
    CannotSign(String),
}

impl TokenKey {
    /// Finds the token and, among the private keys with the URL's label and id, the one the
    /// certificate certifies; a session on it and the schemes it can make.
    fn locate(&self) -> Result<(Connection, Vec<(SignatureScheme, Method)>), Error> {
        let token = Token::open(&self.ctx, &self.url)?;
        token.login(&self.url, &self.pin)?;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        template.extend(object_attributes(&self.url));
        let handles = token
            .session
            .find_objects(&template)
            .map_err(token_error(&self.url, "look up private keys"))?;
        if handles.is_empty() {
            let login = if self.pin.is_none() {
                " (no PIN given: a private key is usually seen only after logging in)"
            } else {
                ""
            };
            return Err(Error::NoTokenObject {
                url: self.masked.clone(),
                what: "private key",
                searched: format!("{}{login}", self.url.describe_object()),
                token: token.label,
            });
        }
        let mechanisms = self.token_mechanisms(token.slot)?;
        let mut cannot_sign = None;
        let mut mismatched = 0;
        for handle in handles {
            match self.fit(&token.session, handle, &mechanisms)? {
                Ok(schemes) => {
                    *lock(&self.located) = Some((token.slot, handle));
                    let connection = Connection {
                        session: token.session,
                        key: handle,
                    };
                    return Ok((connection, schemes));
                }
                Err(Unfit::NotTheCertificates) => mismatched += 1,
                Err(Unfit::CannotSign(reason)) => cannot_sign = Some(reason),
            }
        }
        match cannot_sign {
            Some(reason) if mismatched == 0 => Err(Error::UnsupportedTokenKey {
                url: self.masked.clone(),
                reason,
            }),
            _ => Err(Error::KeyMismatch {
                cert_url: self.cert_url.clone(),
                key_url: self.masked.clone(),
            }),
        }
    }

    /// The signing mechanisms the token offers.
    fn token_mechanisms(&self, slot: Slot) -> Result<Vec<MechanismType>, Error> {
        let all = self
            .ctx
            .get_mechanism_list(slot)
            .map_err(token_error(&self.url, "list its mechanisms"))?;
        Ok(all
            .into_iter()
            .filter(|mechanism| {
                self.ctx
                    .get_mechanism_info(slot, *mechanism)
                    .is_ok_and(|info| info.sign())
            })
            .collect())
    }

    /// Whether the key `handle` is the certificate's and can sign: the schemes it can make
    /// (checked by making the best one and verifying it with the certificate's key).
    fn fit(
        &self,
        session: &Session,
        handle: ObjectHandle,
        token_mechanisms: &[MechanismType],
    ) -> Result<Result<Vec<(SignatureScheme, Method)>, Unfit>, Error> {
        let attributes = session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::Sign,
                    AttributeType::AllowedMechanisms,
                ],
            )
            .map_err(token_error(&self.url, "read a private key's attributes"))?;
        let mut key_type = None;
        let mut ec_params = None;
        let mut may_sign = true;
        let mut allowed = None;
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(kind) => key_type = Some(kind),
                Attribute::EcParams(params) => ec_params = Some(params),
                Attribute::Sign(sign) => may_sign = sign,
                Attribute::AllowedMechanisms(list) if !list.is_empty() => allowed = Some(list),
                _ => {}
            }
        }
        let kind = match (key_type, ec_params.as_deref()) {
            (Some(KeyType::EC), Some(P256_PARAMS)) => Some(KeyKind::EcP256),
            (Some(KeyType::EC), Some(P384_PARAMS)) => Some(KeyKind::EcP384),
            (Some(KeyType::RSA), _) => Some(KeyKind::Rsa),
            _ => None,
        };
        if kind != Some(self.public.kind) {
            return Ok(Err(Unfit::NotTheCertificates));
        }
        if !may_sign {
            return Ok(Err(Unfit::CannotSign(format!(
                "the {} key may not sign (CKA_SIGN is false)",
                self.public.kind
            ))));
        }
        let usable = |mechanism: &MechanismType| {
            token_mechanisms.contains(mechanism)
                && allowed
                    .as_ref()
                    .is_none_or(|allowed: &Vec<MechanismType>| allowed.contains(mechanism))
        };
        let schemes: Vec<(SignatureScheme, Method)> = candidates(self.public.kind)
            .into_iter()
            .filter_map(|(scheme, methods)| {
                methods
                    .into_iter()
                    .find(|method| method.available() && usable(&method.mechanism_type()))
                    .map(|method| (scheme, method))
            })
            .collect();
        let Some(&(scheme, method)) = schemes.first() else {
            let wanted: Vec<String> = candidates(self.public.kind)
                .into_iter()
                .flat_map(|(_, methods)| methods)
                .filter(|method| method.available())
                .map(|method| method.mechanism_type().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let offered = match &allowed {
                Some(allowed) => format!(
                    "the key allows only {}",
                    allowed
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "the token offers none of them for signing".to_owned(),
            };
            return Ok(Err(Unfit::CannotSign(format!(
                "the {} key supports no mechanism a TLS signature can be made with (one of {} \
                 is needed; {offered})",
                self.public.kind,
                wanted.join(", ")
            ))));
        };
        let signature = match session.sign(&method.mechanism(), handle, &method.input(CHALLENGE)) {
            Ok(signature) => signature,
            Err(
                e @ CkError::Pkcs11(
                    RvError::MechanismInvalid
                    | RvError::MechanismParamInvalid
                    | RvError::KeyFunctionNotPermitted
                    | RvError::KeyTypeInconsistent,
                    _,
                ),
            ) => {
                return Ok(Err(Unfit::CannotSign(format!(
                    "the token refused to sign with {} ({e})",
                    method.mechanism_type()
                ))));
            }
            Err(source) => {
                return Err(Error::Token {
                    url: self.masked.clone(),
                    what: "sign (checking the key against the certificate)",
                    source,
                });
            }
        };
        let verified = method
            .output(signature)
            .is_some_and(|signature| self.public.verifies(scheme, CHALLENGE, &signature));
        Ok(if verified {
            Ok(schemes)
        } else {
            Err(Unfit::NotTheCertificates)
        })
    }

    /// A session to sign on: a new one on the slot and key known to be good, or, after a
    /// failure, the key found anew.
    fn connect(&self) -> Result<Connection, Error> {
        let located = *lock(&self.located);
        match located {
            Some((slot, key)) => {
                let session = self
                    .ctx
                    .open_ro_session(slot)
                    .map_err(token_error(&self.url, "open a session"))?;
                let token = Token {
                    slot,
                    label: String::new(),
                    session,
                };
                token.login(&self.url, &self.pin)?;
                Ok(Connection {
                    session: token.session,
                    key,
                })
            }
            None => self.locate().map(|(connection, _)| connection),
        }
    }

    /// Forgets every idle session and where the key is, after a failure: the token may have
    /// gone away or been reset, and the next signature starts afresh.
    fn forget(&self) {
        *lock(&self.located) = None;
        for slot in &self.pool {
            if let Ok(mut idle) = slot.try_lock() {
                *idle = None;
            }
        }
    }

    /// A session slot of the pool: an idle one if there is, else the next in turn (waiting for
    /// it).
    fn pooled(&self) -> MutexGuard<'_, Option<Connection>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        for i in 0..self.pool.len() {
            if let Ok(guard) = self.pool[(start + i) % self.pool.len()].try_lock() {
                return guard;
            }
        }
        lock(&self.pool[start])
    }

    /// Signs `message` with `method` on the session in `slot`, connecting first if it has none;
    /// the signature as TLS carries it, or what went wrong.
    fn sign_on(
        &self,
        slot: &mut Option<Connection>,
        method: Method,
        message: &[u8],
    ) -> Result<Vec<u8>, String> {
        let connection = match slot {
            Some(connection) => connection,
            None => slot.insert(self.connect().map_err(|e| e.report().to_string())?),
        };
        let signature = connection
            .session
            .sign(&method.mechanism(), connection.key, &method.input(message))
            .map_err(|source| {
                Error::Token {
                    url: self.masked.clone(),
                    what: "sign a TLS handshake",
                    source,
                }
                .report()
                .to_string()
            })?;
        method
            .output(signature)
            .ok_or_else(|| format!("{}: the token's signature is malformed", self.masked))
    }

    /// Signs `message` with `method` on a pooled session. On failure the handshake fails, the
    /// failure is logged, and the sessions are dropped so that the next signature reconnects.
    fn sign(
        &self,
        scheme: SignatureScheme,
        method: Method,
        message: &[u8],
    ) -> Result<Vec<u8>, rustls::Error> {
        let mut slot = self.pooled();
        let failure = match self.sign_on(&mut slot, method, message) {
            Ok(signature) => return Ok(signature),
            Err(e) => e,
        };
        *slot = None;
        drop(slot);
        self.forget();
        warn!(key = %self.masked, ?scheme, error = %failure,
            "the token could not sign; this TLS handshake fails, the next one reconnects to the token");
        Err(rustls::Error::General(failure))
    }
}

/// A rustls [`SigningKey`] whose signatures the token makes: what the server's certified key
/// holds for a `pkcs11:` key URL. Its public key is the certificate's, checked at build.
#[derive(Debug, Clone)]
pub(crate) struct TokenSigningKey(Arc<TokenKey>);

impl SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.0
            .schemes
            .iter()
            .find(|(scheme, _)| offered.contains(scheme))
            .map(|&(scheme, method)| {
                Box::new(TokenSigner {
                    key: Arc::clone(&self.0),
                    scheme,
                    method,
                }) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.public.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.public.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa => SignatureAlgorithm::RSA,
        }
    }
}

/// One handshake's signer: the scheme chosen and how the token makes it.
#[derive(Debug)]
struct TokenSigner {
    key: Arc<TokenKey>,
    scheme: SignatureScheme,
    method: Method,
}

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key.sign(self.scheme, self.method, message)
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs11_ecdsa_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[31] = 1;
        raw[63] = 5; // s is 5
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..4], &[0x30, 35 + 3, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 5]);
        assert_eq!(ecdsa_der(&[1, 2, 3]), None);
        let mut long = Vec::new();
        der_length(&mut long, 300);
        assert_eq!(long, [0x82, 0x01, 0x2c]);
    }

    #[test]
    fn pkcs11_digest_info_prefixes_announce_their_digest_length() {
        for hash in [Hash::Sha256, Hash::Sha384, Hash::Sha512] {
            let prefix = hash.digest_info_prefix();
            assert_eq!(u64::from(prefix[prefix.len() - 1]), hash.len());
            assert_eq!(
                usize::from(prefix[1]),
                prefix.len() - 2 + hash.len() as usize
            );
        }
        assert_eq!(Hash::Sha256.digest(b"abc").unwrap().len(), 32);
        assert_eq!(Hash::Sha384.digest(b"abc").unwrap().len(), 48);
    }
}
