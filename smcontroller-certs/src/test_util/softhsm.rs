//! SoftHSM2 tokens for tests, the bench and `cargo xtask gen-certs --pkcs11` (features
//! `test-util` and `pkcs11`).
//!
//! SoftHSM2 (the Debian package `softhsm2`) is a PKCS#11 module that keeps its tokens in a
//! directory named by its config file, which it reads from `SOFTHSM2_CONF` when a process first
//! initialises it. So a token directory of its own means a process of its own:
//! [`isolated`] runs the calling test again in a child process with `SOFTHSM2_CONF` pointing at
//! a fresh directory, and [`SoftHsm::init_token`] then makes tokens there, in which
//! [`TestToken`] creates keys (in the token, through cryptoki) and certificates.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime},
};

pub use cryptoki;
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{Mechanism, MechanismType},
    object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::{AuthPin, Ulong},
};

/// The Debian package that has SoftHSM2.
pub const SOFTHSM_PACKAGE: &str = "softhsm2";

/// The variable SoftHSM2 reads its config file's path from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";

/// Set in the child process [`isolated`] starts, to the name of the test it runs.
const CHILD_ENV: &str = "SMCONTROLLER_SOFTHSM_TEST";

/// How long a test in its own process may take.
const CHILD_DEADLINE: Duration = Duration::from_secs(300);

/// Where distributions put SoftHSM2's module.
const MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
];

/// A SoftHSM2 token could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum SoftHsmError {
    /// SoftHSM2 is not installed.
    #[error(
        "SoftHSM2 is not installed (no libsofthsm2.so in {searched}): install the Debian package \
         {SOFTHSM_PACKAGE} (apt-get install {SOFTHSM_PACKAGE}); .ci/run does this in CI"
    )]
    NotInstalled {
        /// The paths looked at.
        searched: String,
    },
    /// This process was not started with `SOFTHSM2_CONF` naming the directory's config.
    #[error(
        "{CONF_ENV} must be {} in this process's environment before SoftHSM2 is loaded \
         (it reads it once); found {found:?}",
        expected.display()
    )]
    WrongConf {
        /// The config file the token directory has.
        expected: PathBuf,
        /// What the environment says.
        found: Option<String>,
    },
    /// A file or directory could not be written.
    #[error("{}: cannot write", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A PKCS#11 call failed.
    #[error("SoftHSM2: cannot {what}")]
    Pkcs11 {
        /// What was being done.
        what: String,
        /// What the module said.
        #[source]
        source: CkError,
    },
}

fn ck(what: impl Into<String>) -> impl FnOnce(CkError) -> SoftHsmError {
    let what = what.into();
    move |source| SoftHsmError::Pkcs11 { what, source }
}

/// The SoftHSM2 module on this machine: `SOFTHSM2_MODULE` if set, else the first of the
/// usual paths that exists.
pub fn module_path() -> Result<PathBuf, SoftHsmError> {
    if let Some(path) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(path));
    }
    MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .ok_or_else(|| SoftHsmError::NotInstalled {
            searched: MODULE_PATHS.join(", "),
        })
}

/// Runs the test named `test` in a process of its own with a SoftHSM2 token directory of its
/// own, and tells the caller which side it is on:
///
/// - in the test's own run (the parent), it makes a temporary token directory, runs this test
///   binary again with `--exact test` and `SOFTHSM2_CONF` pointing there, shows the child's
///   output, and returns `None` once the child has passed (exactly one test passed);
/// - in that child, it returns the directory: the test does its work.
///
/// ```ignore
/// #[test]
/// fn pkcs11_something() {
///     let Some(hsm) = softhsm::isolated("pkcs11_something") else { return };
///     let token = hsm.init_token("aos", "1234").unwrap();
///     // ...
/// }
/// ```
///
/// # Panics
///
/// When SoftHSM2 is not installed (the message names the package, [`SOFTHSM_PACKAGE`]), when
/// the child cannot be run, fails, runs no test or takes longer than five minutes.
pub fn isolated(test: &str) -> Option<SoftHsm> {
    if std::env::var(CHILD_ENV).is_ok_and(|name| name == test) {
        return Some(SoftHsm::from_env().unwrap_or_else(|e| panic!("{e}")));
    }
    let module = module_path().unwrap_or_else(|e| panic!("{test} needs a PKCS#11 token: {e}"));
    let dir = TempDir::new().unwrap_or_else(|e| panic!("{e}"));
    let hsm = SoftHsm::create_with(dir.path(), module).unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().expect("the test executable");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CONF_ENV, hsm.conf())
        .env(CHILD_ENV, test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {test} in a process of its own: {e}"));
    let (done, finished) = mpsc::channel();
    let mut readers = Vec::new();
    for mut pipe in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let done = done.clone();
        readers.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = done.send(());
            text
        }));
    }
    let deadline = std::time::Instant::now() + CHILD_DEADLINE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if finished.recv_timeout(left).is_err() {
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().expect("the child's exit status");
    let mut output = readers
        .into_iter()
        .map(|reader| reader.join().unwrap_or_default());
    let (stdout, stderr) = (
        output.next().unwrap_or_default(),
        output.next().unwrap_or_default(),
    );
    // Through the test harness's capture: shown when the test fails, or with --nocapture.
    print!(
        "---- {test} in its own process ({CONF_ENV}={}) ----\n{stdout}",
        hsm.conf().display()
    );
    eprint!("{stderr}");
    assert!(
        status.success(),
        "{test} failed in its own process ({status}); its output is above"
    );
    assert!(
        stdout.contains("1 passed"),
        "{test} ran no test in its own process (is the name right?); its output is above"
    );
    None
}

/// A temporary directory, removed when dropped (tempfile is not a dependency of this crate).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, SoftHsmError> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "smcontroller-softhsm-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).map_err(|source| SoftHsmError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A SoftHSM2 token directory: `DIR/softhsm2.conf` and the tokens in `DIR/tokens/`.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    conf: PathBuf,
    module: PathBuf,
}

impl SoftHsm {
    /// Writes the config and the token directory into `dir` (created if needed). For the
    /// tokens to be made there, the process that makes them must have `SOFTHSM2_CONF` set to
    /// [`conf`](Self::conf) from its start.
    pub fn create(dir: &Path) -> Result<Self, SoftHsmError> {
        Self::create_with(dir, module_path()?)
    }

    fn create_with(dir: &Path, module: PathBuf) -> Result<Self, SoftHsmError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SoftHsmError::Io { path, source }
        };
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(io(&tokens))?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "# SoftHSM2 config of a development token (smcontroller)\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        );
        std::fs::write(&conf, text).map_err(io(&conf))?;
        Ok(Self { conf, module })
    }

    /// The directory this process's `SOFTHSM2_CONF` names.
    pub fn from_env() -> Result<Self, SoftHsmError> {
        let conf = std::env::var(CONF_ENV).map_err(|_| SoftHsmError::WrongConf {
            expected: PathBuf::from("a softhsm2.conf"),
            found: None,
        })?;
        Ok(Self {
            conf: PathBuf::from(conf),
            module: module_path()?,
        })
    }

    /// The config file, for `SOFTHSM2_CONF`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The SoftHSM2 module, for a URL's `module-path`.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Initialises a new token labelled `label` whose user PIN (and security officer PIN) is
    /// `pin`. This process's `SOFTHSM2_CONF` must be [`conf`](Self::conf).
    pub fn init_token(&self, label: &str, pin: &str) -> Result<TestToken, SoftHsmError> {
        let found = std::env::var(CONF_ENV).ok();
        if found.as_deref().map(Path::new) != Some(self.conf.as_path()) {
            return Err(SoftHsmError::WrongConf {
                expected: self.conf.clone(),
                found,
            });
        }
        let ctx = Pkcs11::new(&self.module)
            .map_err(ck(format!("load the module {}", self.module.display())))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck("initialise the module")(e)),
        }
        let slots = ctx.get_all_slots().map_err(ck("list the slots"))?;
        let mut free = None;
        for slot in slots {
            let info = ctx.get_token_info(slot).map_err(ck("describe a token"))?;
            if !info.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let free = free.ok_or_else(|| SoftHsmError::Pkcs11 {
            what: "find a free slot".to_owned(),
            source: CkError::NotSupported,
        })?;
        let pin_secret = AuthPin::from(pin);
        ctx.init_token(free, &pin_secret, label)
            .map_err(ck(format!("initialise token {label:?}")))?;
        // SoftHSM2 gives an initialised token a slot id of its own.
        let slot = ctx
            .get_slots_with_initialized_token()
            .map_err(ck("list the slots"))?
            .into_iter()
            .find(|slot| {
                ctx.get_token_info(*slot)
                    .is_ok_and(|info| info.label() == label)
            })
            .ok_or_else(|| SoftHsmError::Pkcs11 {
                what: format!("find token {label:?} once initialised"),
                source: CkError::NotSupported,
            })?;
        {
            let session = ctx.open_rw_session(slot).map_err(ck("open a session"))?;
            session
                .login(UserType::So, Some(&pin_secret))
                .map_err(ck("log in as security officer"))?;
            session
                .init_pin(&pin_secret)
                .map_err(ck("set the user PIN"))?;
            session.logout().map_err(ck("log out"))?;
        }
        Ok(TestToken {
            ctx,
            slot,
            label: label.to_owned(),
            pin: pin.to_owned(),
            module: self.module.clone(),
        })
    }
}

/// The kinds of key [`TestToken::generate_key`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA, 2048 bits.
    Rsa2048,
}

/// A key pair generated in a token: its handles and its public key, which
/// [`TestPki::issue_for`](super::TestPki::issue_for) certifies.
#[derive(Debug, Clone)]
pub struct TokenKeyPair {
    /// The private key's handle (a handle of a private object may change when the token logs
    /// its users out).
    pub private: ObjectHandle,
    /// The public key's handle.
    pub public: ObjectHandle,
    /// The public key.
    pub public_key: TokenPublicKey,
    /// The pair's label when it was made (`CKA_LABEL`).
    pub object: String,
    /// The pair's id (`CKA_ID`).
    pub id: Vec<u8>,
}

/// A public key read from a token, as rcgen puts it in a certificate.
#[derive(Debug, Clone)]
pub struct TokenPublicKey {
    algorithm: &'static rcgen::SignatureAlgorithm,
    /// subjectPublicKey: the EC point, or the DER RSAPublicKey.
    key: Vec<u8>,
}

impl rcgen::PublicKeyData for TokenPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// A SoftHSM2 token made by [`SoftHsm::init_token`], logged in as its user.
#[derive(Debug)]
pub struct TestToken {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    pin: String,
    module: PathBuf,
}

impl TestToken {
    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The PKCS#11 context the token is reached through (shared with any other user of the
    /// module in this process).
    pub fn context(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// A `pkcs11:` URL of the object labelled `object` with id `id` in this token, with the
    /// module's path and the PIN (`pin-value`).
    pub fn url(&self, object: &str, id: &[u8]) -> String {
        let id: String = id.iter().map(|byte| format!("%{byte:02X}")).collect();
        format!(
            "pkcs11:token={};object={};id={id}?module-path={}&pin-value={}",
            escape(&self.label),
            escape(object),
            escape(&self.module.display().to_string()),
            escape(&self.pin)
        )
    }

    /// A read-write session logged in as the user.
    pub fn session(&self) -> Result<Session, SoftHsmError> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(ck("open a session"))?;
        match session.login(UserType::User, Some(&AuthPin::from(self.pin.as_str()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(ck("log in")(e)),
        }
    }

    /// Generates a key pair of `kind` in the token, labelled `object` with id `id`; the private
    /// key may sign, is sensitive and cannot be extracted.
    pub fn generate_key(
        &self,
        kind: TokenKeyKind,
        object: &str,
        id: &[u8],
    ) -> Result<TokenKeyPair, SoftHsmError> {
        self.generate_key_with(kind, object, id, &[])
    }

    /// [`generate_key`](Self::generate_key) with more attributes on the private key (for
    /// example `CKA_ALLOWED_MECHANISMS`).
    pub fn generate_key_with(
        &self,
        kind: TokenKeyKind,
        object: &str,
        id: &[u8],
        private_extra: &[Attribute],
    ) -> Result<TokenKeyPair, SoftHsmError> {
        let session = self.session()?;
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Label(object.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
                Attribute::Private(private),
            ]
        };
        let mut public_template = common(false);
        public_template.push(Attribute::Verify(true));
        let mut private_template = common(true);
        private_template.extend([
            Attribute::Sign(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ]);
        private_template.extend_from_slice(private_extra);
        let mechanism = match kind {
            TokenKeyKind::EcP256 | TokenKeyKind::EcP384 => {
                public_template.push(Attribute::EcParams(
                    match kind {
                        TokenKeyKind::EcP256 => {
                            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07][..]
                        }
                        _ => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22][..],
                    }
                    .to_vec(),
                ));
                Mechanism::EccKeyPairGen
            }
            TokenKeyKind::Rsa2048 => {
                public_template.extend([
                    Attribute::ModulusBits(Ulong::from(2048u64)),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ]);
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let (public, private) = session
            .generate_key_pair(&mechanism, &public_template, &private_template)
            .map_err(ck(format!("generate a {kind:?} key {object:?}")))?;
        let public_key = self.public_key(&session, public, kind)?;
        Ok(TokenKeyPair {
            private,
            public,
            public_key,
            object: object.to_owned(),
            id: id.to_vec(),
        })
    }

    fn public_key(
        &self,
        session: &Session,
        public: ObjectHandle,
        kind: TokenKeyKind,
    ) -> Result<TokenPublicKey, SoftHsmError> {
        let read = |types: &[AttributeType]| {
            session
                .get_attributes(public, types)
                .map_err(ck("read the public key"))
        };
        Ok(match kind {
            TokenKeyKind::EcP256 | TokenKeyKind::EcP384 => {
                let point = read(&[AttributeType::EcPoint])?
                    .into_iter()
                    .find_map(|attribute| match attribute {
                        Attribute::EcPoint(point) => Some(point),
                        _ => None,
                    })
                    .unwrap_or_default();
                TokenPublicKey {
                    algorithm: if kind == TokenKeyKind::EcP256 {
                        &rcgen::PKCS_ECDSA_P256_SHA256
                    } else {
                        &rcgen::PKCS_ECDSA_P384_SHA384
                    },
                    // CKA_EC_POINT is the point in a DER OCTET STRING.
                    key: der_contents(&point).unwrap_or(&point).to_vec(),
                }
            }
            TokenKeyKind::Rsa2048 => {
                let mut modulus = Vec::new();
                let mut exponent = Vec::new();
                for attribute in read(&[AttributeType::Modulus, AttributeType::PublicExponent])? {
                    match attribute {
                        Attribute::Modulus(m) => modulus = m,
                        Attribute::PublicExponent(e) => exponent = e,
                        _ => {}
                    }
                }
                let body = [der_integer(&modulus), der_integer(&exponent)].concat();
                TokenPublicKey {
                    algorithm: &rcgen::PKCS_RSA_SHA256,
                    key: der_tlv(0x30, &body),
                }
            }
        })
    }

    /// Imports the certificate `der` into the token, labelled `object` with id `id`.
    pub fn import_cert(&self, object: &str, id: &[u8], der: &[u8]) -> Result<(), SoftHsmError> {
        let session = self.session()?;
        let subject = x509_parser::parse_x509_certificate(der)
            .map(|(_, cert)| cert.subject().as_raw().to_vec())
            .unwrap_or_default();
        session
            .create_object(&[
                Attribute::Subject(subject),
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Label(object.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
                Attribute::Value(der.to_vec()),
            ])
            .map_err(ck(format!("import certificate {object:?}")))?;
        Ok(())
    }

    /// Gives the key pair a new label (as a renewal that made the key under a staging name
    /// puts it in place).
    pub fn relabel(&self, pair: &TokenKeyPair, object: &str) -> Result<(), SoftHsmError> {
        let session = self.session()?;
        for handle in self.find(&session, pair)? {
            session
                .update_attributes(handle, &[Attribute::Label(object.as_bytes().to_vec())])
                .map_err(ck(format!("relabel a key as {object:?}")))?;
        }
        Ok(())
    }

    /// Deletes the key pair from the token.
    pub fn destroy(&self, pair: &TokenKeyPair) -> Result<(), SoftHsmError> {
        let session = self.session()?;
        for handle in self.find(&session, pair)? {
            session.destroy_object(handle).map_err(ck("delete a key"))?;
        }
        Ok(())
    }

    /// The objects with the pair's label and id.
    fn find(
        &self,
        session: &Session,
        pair: &TokenKeyPair,
    ) -> Result<Vec<ObjectHandle>, SoftHsmError> {
        session
            .find_objects(&[
                Attribute::Label(pair.object.as_bytes().to_vec()),
                Attribute::Id(pair.id.clone()),
            ])
            .map_err(ck(format!("find key {:?}", pair.object)))
    }

    /// Logs every session of this process out of the token, as a token that is reset or pulled
    /// and put back does: its users must log in again.
    pub fn log_everyone_out(&self) -> Result<(), SoftHsmError> {
        self.session()?.logout().map_err(ck("log out"))
    }

    /// Whether the token offers `mechanism` for signing.
    pub fn signs_with(&self, mechanism: MechanismType) -> bool {
        self.ctx
            .get_mechanism_info(self.slot, mechanism)
            .is_ok_and(|info| info.sign())
    }
}

/// `s` %-escaped for a `pkcs11:` URL attribute value (RFC 7512's unreserved characters and
/// `/` stay).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The contents of the DER element `der` (one element, short or long length).
fn der_contents(der: &[u8]) -> Option<&[u8]> {
    let first = *der.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        let len = der
            .get(2..2 + count)?
            .iter()
            .fold(0, |len, &byte| (len << 8) | usize::from(byte));
        (len, 2 + count)
    };
    der.get(header..header + len)
}

/// A DER INTEGER of the unsigned big-endian `value`.
fn der_integer(value: &[u8]) -> Vec<u8> {
    let start = value
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(value.len().saturating_sub(1));
    let value = &value[start.min(value.len())..];
    let mut body = Vec::with_capacity(value.len() + 1);
    if value.first().is_none_or(|&b| b & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(value);
    der_tlv(0x02, &body)
}

fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    if body.len() < 0x80 {
        out.push(body.len() as u8);
    } else {
        let bytes: Vec<u8> = body
            .len()
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs11_urls_of_test_tokens_are_escaped() {
        assert_eq!(escape("aos token/1"), "aos%20token/1");
        assert_eq!(escape("a;b?c&d=e"), "a%3Bb%3Fc%26d%3De");
    }

    #[test]
    fn pkcs11_der_helpers_encode_integers_and_read_octet_strings() {
        assert_eq!(der_integer(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(
            der_integer(&[0x01, 0x00, 0x01]),
            [0x02, 0x03, 0x01, 0x00, 0x01]
        );
        assert_eq!(
            der_contents(&[0x04, 0x02, 0xaa, 0xbb]),
            Some(&[0xaa, 0xbb][..])
        );
        let long = der_tlv(0x04, &[7; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        assert_eq!(der_contents(&long).map(<[u8]>::len), Some(200));
    }
}
