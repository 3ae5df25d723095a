//! The daemon's settings: the JSON config file, the command line, and their validation.
//!
//! Start reading at [`Settings`]: one field per key of the config file, with its default, its
//! meaning and the reader that checks its value. [`load`] reads the file named by `--config`
//! (if any) into it, applies the command-line overrides and checks the rules that span keys.
//! For operators, `docs/configuration.md` describes every key and
//! `smcontroller-daemon/config.sample.json` has them all; tests keep both complete.
//!
//! # The config file
//!
//! A JSON object whose keys are the fields of [`Settings`] in camelCase (`responseTimeout`),
//! except `cmServerUrl`, the CM's name for the listen address. The CM's own config file can be
//! given as it is: its keys that the SM controller does not know are ignored and listed in
//! [`Settings::unknown_keys`] so that the daemon can warn about them. A key set to `null` counts
//! as not set. Durations are strings, Go or humantime style (`"5s"`, `"500ms"`, `"1m30s"`,
//! `"1.5h"`) or ISO 8601 (`"PT5S"`, `"PT0.5S"`); see [`parse_duration`]. Every duration must be
//! greater than zero.
//!
//! Unless `insecure` is set (in the file or with `--insecure`), `caCert`, `certStorage`,
//! `certUrl` and `keyUrl` are required: the server speaks mTLS only.
//!
//! # Command line
//!
//! The flags override the file. `--pki DIR` is a development shortcut for a PKI written by
//! `cargo xtask gen-certs DIR` (see [`Settings::use_dev_pki`]); it turns `insecure` off.
//!
//! # Exit code
//!
//! A bad configuration (unreadable file, bad JSON, a bad value, missing TLS settings) is a usage
//! error: the daemon prints the [`ConfigError`] and exits with [`EXIT_BAD_CONFIG`] (64,
//! `EX_USAGE` of `sysexits.h`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;
use smcontroller_api::{SmProtocol, types::iso8601};
use smcontroller_certs::IdentityField;

use smcontroller_network::NetworkPool;

/// Exit code of the daemon when its configuration is bad: 64, `EX_USAGE` of `sysexits.h`.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// The certificate storage `--pki` sets when the config file names none.
pub const PKI_CERT_STORAGE: &str = "sm";

/// Where the default network provider keeps its state unless `networkStateFile` says otherwise.
pub const DEFAULT_NETWORK_STATE_FILE: &str = "/var/lib/smcontroller/networks.json";

/// The origin named in errors about command-line values.
const CLI_ORIGIN: &str = "command line";

/// The command line of `smcontrollerd`. Flags override the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser)]
#[command(
    name = "smcontrollerd",
    version,
    about = "The Aos SM controller: the gRPC server every node's Service Manager dials"
)]
pub struct Cli {
    /// JSON config file (the CM's config file works: keys the SM controller does not know are
    /// ignored).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Listen address, overriding `cmServerUrl`: `:8093`, `0.0.0.0:8093`, `[::1]:8093`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Serve plain HTTP/2 without TLS. For development only.
    #[arg(long)]
    pub insecure: bool,

    /// Serve mTLS with the development PKI in DIR (`cargo xtask gen-certs DIR`): caCert
    /// DIR/ca.pem, certUrl DIR/server.pem, keyUrl DIR/server.key, certStorage "sm" unless set.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure")]
    pub pki: Option<PathBuf>,

    /// The admin API's Unix socket, overriding `adminSocket`: an absolute path, or "off".
    #[arg(long, value_name = "PATH|off")]
    pub admin_socket: Option<String>,

    /// Log filter in `tracing_subscriber::EnvFilter` syntax, e.g. "info" or
    /// "smcontroller_routing=debug,info". Without it the daemon uses its environment variable.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,

    /// The wire revision of the unit's SMs, overriding `smProtocol`: "9.0" or "9.1".
    #[arg(long, value_name = "9.0|9.1")]
    pub sm_protocol: Option<String>,

    /// The default network provider's state file (9.1), overriding `networkStateFile`: an
    /// absolute path, or "off" to keep the state in memory only.
    #[arg(long, value_name = "PATH|off")]
    pub network_state: Option<String>,

    /// Once every listener is up (when systemd hears `READY=1`), write where the daemon serves
    /// to PATH as JSON (pid, smListen, mtls, admin, metrics), atomically; removed at the stop.
    /// For programs that start the daemon and must know when it serves.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

/// The daemon's settings: one field per key of the config file (its name in camelCase), read
/// and checked by the function its `deserialize_with` names; a key that is missing or `null`
/// keeps the field's value in [`Settings::default`]. The daemon maps them onto the router's and
/// the server's settings.
///
/// To add a setting: a field with a doc comment (what it is, its unit), its default in
/// `Default`, a reader in `de` if the type needs checking, a row in `docs/configuration.md`
/// and the key in `config.sample.json` (tests fail without them).
///
/// [`Settings::default`] holds no TLS settings, so by itself it would not pass validation
/// unless `insecure` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Settings {
    /// Address the gRPC server listens on (`cmServerUrl`, `--listen`); see [`parse_listen`].
    #[serde(rename = "cmServerUrl", deserialize_with = "de::listen")]
    pub listen: SocketAddr,
    /// Serve plain HTTP/2 without TLS (`insecure`, `--insecure`). The daemon warns when set.
    #[serde(deserialize_with = "de::boolean")]
    pub insecure: bool,
    /// Certificate storage the server's credentials come from (`certStorage`), e.g. `"sm"`.
    /// Always set unless `insecure`.
    #[serde(deserialize_with = "de::name")]
    pub cert_storage: Option<String>,
    /// CA certificate that verifies SM client certificates (`caCert`): a `file://` URL or an
    /// absolute path. Always set unless `insecure`.
    #[serde(deserialize_with = "de::file_url")]
    pub ca_cert: Option<String>,
    /// The server's certificate chain in the storage `cert_storage` (`certUrl`): a `file://`
    /// URL or an absolute path, watched for renewal. Always set unless `insecure`.
    #[serde(deserialize_with = "de::file_url")]
    pub cert_url: Option<String>,
    /// The server's private key in the storage `cert_storage` (`keyUrl`): a `file://` URL or
    /// an absolute path, watched for renewal, or a `pkcs11:` URL of a key in a token. Always set
    /// unless `insecure`.
    #[serde(deserialize_with = "de::file_url")]
    pub key_url: Option<String>,
    /// Node identity binding (`identityBinding`, R-TLS-4): `Some(field)` requires
    /// `sm_info.node_id` to match those names of the client certificate. Off (`None`) by
    /// default.
    #[serde(deserialize_with = "de::identity_binding")]
    pub identity_binding: Option<IdentityField>,
    /// How long a TLS handshake may take (`handshakeTimeout`).
    #[serde(deserialize_with = "de::duration")]
    pub handshake_timeout: Duration,
    /// How long a sync call waits for the node's reply (`responseTimeout`).
    #[serde(deserialize_with = "de::duration")]
    pub response_timeout: Duration,
    /// How long a sync command left unanswered keeps its place in the reply matching
    /// (`replyExpiry`): its late reply is absorbed within that time (R-SYNC-3). `None`: twice
    /// the response timeout. The router never uses less than the response timeout.
    #[serde(deserialize_with = "de::some_duration")]
    pub reply_expiry: Option<Duration>,
    /// How long a new stream may take to send its first `sm_info` (`registrationTimeout`).
    #[serde(deserialize_with = "de::duration")]
    pub registration_timeout: Duration,
    /// Bound of each node's inbound queue, messages (`queueBound`); at least 1.
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub queue_bound: usize,
    /// Largest message accepted from an SM, bytes (`maxMessageSize`); at least 1 KiB.
    #[serde(deserialize_with = "de::at_least::<1024, _>")]
    pub max_message_size: usize,
    /// HTTP/2 flow-control window of each stream, bytes (`flowWindow`): 65,535
    /// (HTTP/2's initial window) to 2^31 - 1. It bounds what an SM whose stream is paused (full
    /// queue) can have buffered in the server.
    #[serde(deserialize_with = "de::flow_window")]
    pub flow_window: u32,
    /// Interval of the server's HTTP/2 keepalive pings (`keepaliveInterval`).
    #[serde(deserialize_with = "de::duration")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped
    /// (`keepaliveTimeout`).
    #[serde(deserialize_with = "de::duration")]
    pub keepalive_timeout: Duration,
    /// Retry period of a renewal whose new credentials failed to load (`certReloadRetry`):
    /// meanwhile the server keeps serving with the previous ones.
    #[serde(deserialize_with = "de::duration")]
    pub cert_reload_retry: Duration,
    /// Where SMs download blobs from (`blobUrlTemplate`): `GetBlobsInfos` answers each digest
    /// with this URL, `{digest}` replaced by the digest, e.g.
    /// `"https://cloud.example/blobs/{digest}"`. `None`: no blob store, every digest is answered
    /// `NOT_FOUND`.
    #[serde(deserialize_with = "de::blob_url_template")]
    pub blob_url_template: Option<BlobUrlTemplate>,
    /// Budgets against hostile or broken peers (R-BAD-2, R-BAD-3): each is reached with a
    /// clear status or error and counted (`smcontroller_budget_refusals_total{budget}`).
    ///
    /// Nodes registered at once (`maxNodes`): an `sm_info` for a new node id beyond it ends
    /// that stream with `RESOURCE_EXHAUSTED`.
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub max_nodes: usize,
    /// Streams that have not sent `sm_info` yet (`maxPendingStreams`): a new `RegisterSM`
    /// beyond it is refused with `RESOURCE_EXHAUSTED`.
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub max_pending_streams: usize,
    /// Bytes each node's inbound queue holds (`inboundQueueBytes`), as sent on the wire; when
    /// full the stream is paused (backpressure, nothing is dropped).
    #[serde(deserialize_with = "de::at_least::<1024, _>")]
    pub inbound_queue_bytes: usize,
    /// Commands waiting to be written to one node (`outboundBacklog`): a call beyond it fails
    /// at once (the node does not read its stream).
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub outbound_backlog: usize,
    /// Bytes of commands waiting to be written to one node (`outboundBacklogBytes`).
    #[serde(deserialize_with = "de::at_least::<1024, _>")]
    pub outbound_backlog_bytes: usize,
    /// HTTP/2 flow-control window of each connection, bytes (`connectionWindow`): at least
    /// `flowWindow`, so one paused stream does not stop the connection's others.
    #[serde(deserialize_with = "de::flow_window")]
    pub connection_window: u32,
    /// Streams one HTTP/2 connection may have open (`maxStreamsPerConnection`), advertised in
    /// SETTINGS.
    #[serde(deserialize_with = "de::small_count")]
    pub max_streams_per_connection: u32,
    /// Longest id or name an SM may send, bytes (`maxIdLength`): node id, runtime ids, item and
    /// subject ids, log correlation ids, digests.
    #[serde(deserialize_with = "de::at_least::<16, _>")]
    pub max_id_length: usize,
    /// Digests of one `GetBlobsInfos` looked up at once (`blobLookups`).
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub blob_lookups: usize,
    /// HTTP/2 PING and SETTINGS frames a connection may send per second on average
    /// (`controlFramesPerSecond`); more (a flood) closes it.
    #[serde(deserialize_with = "de::small_count")]
    pub control_frames_per_second: u32,
    /// Streams a connection may open per second on average (`newStreamsPerSecond`); more (a
    /// flood of new streams) closes it.
    #[serde(deserialize_with = "de::small_count")]
    pub new_streams_per_second: u32,
    /// Messages one connection may have refused (empty, undecodable, ids over the limit, decode
    /// bombs) before it is closed (`maxRefusedMessages`); 0 is no limit.
    #[serde(deserialize_with = "de::count_or_off")]
    pub max_refused_messages: u32,
    /// Connections open at once (`maxConnections`); one beyond it is closed when accepted.
    #[serde(deserialize_with = "de::at_least::<1, _>")]
    pub max_connections: usize,
    /// Connections the kernel may hold handshaken but not accepted yet (`listenBacklog`), the
    /// SM port's listen backlog; Linux caps it at `net.core.somaxconn` (the value in effect is
    /// logged at start).
    #[serde(deserialize_with = "de::small_count")]
    pub listen_backlog: u32,
    /// How long streams must have stood still (none attached, none ended), after some have
    /// ended, before the heap they freed is given back to the OS (`memoryReturnDelay`,
    /// N-LEAK-2; see [`memory`](crate::memory)). `None` (`"off"`): never.
    #[serde(deserialize_with = "de::duration_or_off")]
    pub memory_return_delay: Option<Duration>,
    /// The admin API's Unix socket (`adminSocket`), for `smctl`: an absolute path, or `"off"`.
    /// Default: `/run/smcontroller/admin.sock` for root, else a path in the user's runtime
    /// directory (the one `smctl` looks at by default). Mode 0660.
    #[serde(deserialize_with = "de::admin_socket")]
    pub admin_socket: AdminSocket,
    /// A loopback TCP address to serve the admin API on as well (`adminListen`), e.g.
    /// `"127.0.0.1:9465"`; a non-loopback address is refused at load. Off by default.
    #[serde(deserialize_with = "de::loopback")]
    pub admin_listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics on `/metrics` over HTTP (`metricsListen`), e.g.
    /// `"127.0.0.1:9464"`. Off by default.
    #[serde(deserialize_with = "de::optional_listen")]
    pub metrics_listen: Option<SocketAddr>,
    /// The wire revision of `servicemanager.v5` the unit's SMs speak (`smProtocol`, R-REV-1):
    /// `"9.0"` (default) or `"9.1"` (every Aos release since 9.1), whose nodes also call
    /// `NetworkService` on the SM port.
    #[serde(deserialize_with = "de::sm_protocol")]
    pub sm_protocol: SmProtocol,
    /// The address pool of the daemon's default network provider (`networkPool`, 9.1 only):
    /// an IPv4 CIDR block cut into /24 subnets, one per network id.
    #[serde(deserialize_with = "de::network_pool")]
    pub network_pool: NetworkPool,
    /// Where the default network provider keeps its allocations across restarts
    /// (`networkStateFile`, 9.1 only): an absolute path, or `"off"` (memory only).
    #[serde(deserialize_with = "de::optional_path")]
    pub network_state_file: Option<PathBuf>,
    /// Keys of the config file that the SM controller does not know, sorted; the daemon warns
    /// about them.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
}

impl Default for Settings {
    /// The libraries' defaults, which are the contract's.
    fn default() -> Self {
        let router = smcontroller_routing::Settings::default();
        let server = smcontroller_grpc::server::ServerSettings::default();
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8093),
            insecure: false,
            cert_storage: None,
            ca_cert: None,
            cert_url: None,
            key_url: None,
            identity_binding: None,
            handshake_timeout: smcontroller_certs::DEFAULT_HANDSHAKE_TIMEOUT,
            response_timeout: Duration::from_secs(5),
            reply_expiry: None,
            registration_timeout: Duration::from_secs(10),
            queue_bound: 256,
            max_message_size: server.max_message_size,
            flow_window: 256 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            cert_reload_retry: Duration::from_secs(10),
            blob_url_template: None,
            max_nodes: router.max_nodes,
            max_pending_streams: router.max_pending_streams,
            inbound_queue_bytes: router.inbound_queue_bytes,
            outbound_backlog: router.outbound_backlog,
            outbound_backlog_bytes: router.outbound_backlog_bytes,
            connection_window: server.connection_window,
            max_streams_per_connection: server.max_streams_per_connection,
            max_id_length: server.max_id_len,
            blob_lookups: server.blob_lookups,
            control_frames_per_second: server.control_frames_per_sec,
            new_streams_per_second: server.new_streams_per_sec,
            max_refused_messages: server.max_refused_messages,
            max_connections: server.accept.max_connections,
            listen_backlog: smcontroller_grpc::server::DEFAULT_LISTEN_BACKLOG,
            memory_return_delay: Some(crate::memory::DEFAULT_MEMORY_RETURN_DELAY),
            admin_socket: AdminSocket::Default,
            admin_listen: None,
            metrics_listen: None,
            sm_protocol: router.sm_protocol,
            network_pool: NetworkPool::default(),
            network_state_file: Some(PathBuf::from(DEFAULT_NETWORK_STATE_FILE)),
            unknown_keys: Vec::new(),
        }
    }
}

/// Where the admin API's Unix socket is (`adminSocket`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AdminSocket {
    /// The default path (`smcontroller_admin::server::default_socket_path`).
    #[default]
    Default,
    /// No admin socket.
    Off,
    /// This absolute path.
    Path(PathBuf),
}

impl AdminSocket {
    /// The socket's path, `None` when off.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Self::Default => Some(smcontroller_admin::server::default_socket_path()),
            Self::Off => None,
            Self::Path(path) => Some(path.clone()),
        }
    }
}

/// Why the configuration is bad. Each message names where the value came from (the config
/// file's path, or "command line"), the key and the bad value. Every variant maps to
/// [`EXIT_BAD_CONFIG`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: cannot read the config file: {reason}")]
    Read {
        /// The file, as given.
        path: String,
        /// The I/O error, in words.
        reason: String,
    },

    /// The config file is not valid JSON.
    #[error("{origin}:{line}:{column}: not valid JSON: {reason}")]
    Json {
        /// The file, as given.
        origin: String,
        /// Line of the error, 1-based.
        line: usize,
        /// Column of the error, 1-based.
        column: usize,
        /// What is wrong there.
        reason: String,
    },

    /// The config file is valid JSON but not an object.
    #[error("{origin}: the config must be a JSON object, found {found}")]
    NotAnObject {
        /// The file, as given.
        origin: String,
        /// What it holds instead: "an array", "a string", ...
        found: &'static str,
    },

    /// A key (or flag) has a bad value: of the wrong kind, out of range, malformed.
    #[error("{origin}: {key}: {message}")]
    InvalidValue {
        /// The file, as given, or "command line".
        origin: String,
        /// The key (or flag).
        key: String,
        /// The value and what is wrong with it, e.g. `"5 sek" is not a duration (expected e.g.
        /// "5s" or "PT5S")`.
        message: String,
    },

    /// TLS is on (no `insecure`) but some of `caCert`, `certStorage`, `certUrl` and `keyUrl`
    /// are not set.
    #[error(
        "{origin}: mTLS needs caCert, certStorage, certUrl and keyUrl (not set: {missing}); \
         for development pass --pki DIR with a PKI from `cargo xtask gen-certs DIR`, or \
         --insecure for plain HTTP/2"
    )]
    MissingTls {
        /// The file, as given, or "command line" when there is none.
        origin: String,
        /// The keys not set, e.g. "caCert, certStorage".
        missing: String,
    },
}

impl ConfigError {
    /// The process exit code for this error: always [`EXIT_BAD_CONFIG`].
    pub fn exit_code(&self) -> i32 {
        EXIT_BAD_CONFIG
    }
}

/// Why a string is not a listen address (see [`parse_listen`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenAddrError {
    /// The address is empty.
    #[error("it is empty")]
    Empty,
    /// There is no `:port`.
    #[error("it has no port")]
    MissingPort,
    /// The port is not a decimal number.
    #[error("port {0:?} is not a number")]
    BadPort(String),
    /// The port is a number above 65535.
    #[error("port {0} is out of range (0-65535)")]
    PortOutOfRange(String),
    /// An IPv6 address without brackets (`::1:8093` is ambiguous).
    #[error("an IPv6 address needs brackets, e.g. \"[::1]:8093\"")]
    UnbracketedIpv6,
    /// `[` without `]`.
    #[error("'[' has no matching ']'")]
    UnclosedBracket,
    /// Between the brackets there is no IPv6 address.
    #[error("{0:?} is not an IPv6 address")]
    BadIpv6(String),
    /// The host is neither an IP address nor a valid host name.
    #[error("{0:?} is not an IP address or host name")]
    BadHost(String),
    /// The address has a scheme such as `http://`.
    #[error("give host:port without a scheme")]
    Scheme,
    /// The host name did not resolve.
    #[error("host {host:?} does not resolve: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error, in words.
        reason: String,
    },
}

/// A URL template of the blobs SMs download (`blobUrlTemplate`): `{digest}` stands for the
/// digest. It starts with a scheme (`https://`, `http://`, `file://`, ...), has `{digest}` at
/// least once and no other `{`/`}`, and no spaces or control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobUrlTemplate(String);

/// The longest digest [`BlobUrlTemplate::url`] takes, bytes: room for any algorithm's name and
/// a SHA-512 in hex.
pub const MAX_DIGEST_LEN: usize = 256;

/// A digest that [`BlobUrlTemplate::url`] refuses to put into a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a blob digest (expected <algorithm>:<encoded>, e.g. \"sha256:\" and 64 hex digits, \
     at most {MAX_DIGEST_LEN} bytes)"
)]
pub struct NotADigest;

impl BlobUrlTemplate {
    /// The placeholder of the digest.
    pub const DIGEST: &str = "{digest}";

    /// Checks `template`; the error says what is wrong with it.
    pub fn parse(template: &str) -> Result<Self, String> {
        let scheme_end = template.find("://").unwrap_or(0);
        let scheme = &template[..scheme_end];
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok {
            return Err("has no URL scheme such as https://".to_owned());
        }
        if !template.contains(Self::DIGEST) {
            return Err(format!("has no {}", Self::DIGEST));
        }
        if template.replace(Self::DIGEST, "").contains(['{', '}']) {
            return Err(format!(
                "has a '{{' or '}}' that is not part of {}",
                Self::DIGEST
            ));
        }
        if template.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("has spaces or control characters".to_owned());
        }
        Ok(Self(template.to_owned()))
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL of the blob `digest`. The digest is checked first, so that nothing but a digest
    /// lands in the URL: `<algorithm>:<encoded>` as OCI image digests are written (algorithm:
    /// lowercase letters and digits, joined by `+`, `.`, `_` or `-`; encoded: letters, digits,
    /// `=`, `_`, `-`), at most [`MAX_DIGEST_LEN`] bytes.
    pub fn url(&self, digest: &str) -> Result<String, NotADigest> {
        let (algorithm, encoded) = digest.split_once(':').ok_or(NotADigest)?;
        let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        let encoded_ok = !encoded.is_empty()
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
        if digest.len() > MAX_DIGEST_LEN || !algorithm_ok || !encoded_ok {
            return Err(NotADigest);
        }
        Ok(self.0.replace(Self::DIGEST, digest))
    }
}

impl Settings {
    /// Serves mTLS with the development PKI in `dir`, as `cargo xtask gen-certs` writes it (the
    /// `--pki` flag): `caCert` `dir/ca.pem`, `certUrl` `dir/server.pem`, `keyUrl`
    /// `dir/server.key`, `certStorage` [`PKI_CERT_STORAGE`] unless already set; `insecure` off.
    /// A relative `dir` is taken from the current directory. Fails when the directory's
    /// absolute path cannot be found or is not UTF-8; whether the files are there is found out
    /// when the credentials are loaded.
    pub fn use_dev_pki(&mut self, dir: &Path) -> io::Result<()> {
        let dir = std::path::absolute(dir)?;
        let file = |name: &str| {
            let path = dir.join(name);
            path.to_str().map(str::to_owned).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not UTF-8", path.display()),
                )
            })
        };
        self.ca_cert = Some(file("ca.pem")?);
        self.cert_url = Some(file("server.pem")?);
        self.key_url = Some(file("server.key")?);
        if self.cert_storage.is_none() {
            self.cert_storage = Some(PKI_CERT_STORAGE.to_owned());
        }
        self.insecure = false;
        Ok(())
    }
}

/// Reads the config file named by `cli.config` (if any), applies the command-line overrides and
/// validates the result.
pub fn load(cli: &Cli) -> Result<Settings, ConfigError> {
    match &cli.config {
        Some(path) => {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: origin.clone(),
                reason: e.to_string(),
            })?;
            load_str(&origin, &text, cli)
        }
        None => finish(Settings::default(), CLI_ORIGIN, cli),
    }
}

/// Like [`load`], with the config file's text given: `origin` names it in errors. The
/// `cli.config` path is not read.
pub fn load_str(origin: &str, json: &str, cli: &Cli) -> Result<Settings, ConfigError> {
    let value: Value = serde_json::from_str(json).map_err(|e| json_error(origin, &e))?;
    let Value::Object(mut map) = value else {
        return Err(ConfigError::NotAnObject {
            origin: origin.to_owned(),
            found: kind_of(&value),
        });
    };
    // A key set to null counts as not set: its field keeps its default.
    map.retain(|_, value| !value.is_null());
    let mut unknown_keys = Vec::new();
    let mut unknown = |path: serde_ignored::Path<'_>| unknown_keys.push(path.to_string());
    let file = serde_ignored::Deserializer::new(Value::Object(map), &mut unknown);
    let mut settings: Settings =
        serde_path_to_error::deserialize(file).map_err(|e| ConfigError::InvalidValue {
            origin: origin.to_owned(),
            key: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    unknown_keys.sort();
    settings.unknown_keys = unknown_keys;
    finish(settings, origin, cli)
}

/// Applies the command-line overrides to `settings` and checks the rules that span keys.
fn finish(mut settings: Settings, origin: &str, cli: &Cli) -> Result<Settings, ConfigError> {
    let flag_error = |flag: &str, message: String| ConfigError::InvalidValue {
        origin: CLI_ORIGIN.to_owned(),
        key: flag.to_owned(),
        message,
    };
    if let Some(listen) = &cli.listen {
        settings.listen = parse_listen(listen).map_err(|e| {
            flag_error("--listen", format!("{listen:?} {}", de::listen_problem(&e)))
        })?;
    }
    if cli.insecure {
        settings.insecure = true;
    }
    if let Some(socket) = &cli.admin_socket {
        settings.admin_socket = match socket.as_str() {
            "off" => AdminSocket::Off,
            path if Path::new(path).is_absolute() => AdminSocket::Path(PathBuf::from(path)),
            _ => {
                return Err(flag_error(
                    "--admin-socket",
                    format!(r#"{socket:?} is not an absolute path or "off""#),
                ));
            }
        };
    }
    if let Some(protocol) = &cli.sm_protocol {
        settings.sm_protocol = protocol
            .parse()
            .map_err(|e| flag_error("--sm-protocol", e))?;
    }
    if let Some(path) = &cli.network_state {
        settings.network_state_file = de::path_or_off(path)
            .map_err(|e| flag_error("--network-state", format!("{path:?} {e}")))?;
    }
    if let Some(dir) = &cli.pki {
        settings.use_dev_pki(dir).map_err(|e| {
            let dir = dir.display().to_string();
            flag_error("--pki", format!("{dir:?} cannot be used: {e}"))
        })?;
    }
    if !settings.insecure {
        let missing: Vec<&str> = [
            ("caCert", settings.ca_cert.is_none()),
            ("certStorage", settings.cert_storage.is_none()),
            ("certUrl", settings.cert_url.is_none()),
            ("keyUrl", settings.key_url.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, unset)| unset.then_some(key))
        .collect();
        if !missing.is_empty() {
            return Err(ConfigError::MissingTls {
                origin: origin.to_owned(),
                missing: missing.join(", "),
            });
        }
    }
    Ok(settings)
}

/// The readers of [`Settings`]' values (`deserialize_with`). Each takes the key's value as JSON
/// and, when it is bad, fails with the value (as JSON text) and what is wrong with it; the
/// caller adds the file and the key.
mod de {
    use serde::{Deserialize, Deserializer, de::Error as _};

    use super::*;

    /// The value, read by `check`; its error is the problem, shown after the value.
    fn read<'de, D: Deserializer<'de>, T>(
        deserializer: D,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Result<T, D::Error> {
        let value = Value::deserialize(deserializer)?;
        check(&value).map_err(|problem| D::Error::custom(format_args!("{value} {problem}")))
    }

    fn string(value: &Value) -> Result<&str, String> {
        value.as_str().ok_or_else(|| "is not a string".to_owned())
    }

    /// A string; the empty string counts as not set.
    fn optional_string(value: &Value) -> Result<Option<&str>, String> {
        string(value).map(|s| Some(s).filter(|s| !s.is_empty()))
    }

    pub(super) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        read(d, |v| {
            v.as_bool()
                .ok_or_else(|| "is not a boolean (expected true or false)".to_owned())
        })
    }

    /// A name; the empty string counts as not set.
    pub(super) fn name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        read(d, |v| Ok(optional_string(v)?.map(str::to_owned)))
    }

    /// A `file://` URL or an absolute path, as the certificate loader takes them, or a `pkcs11:`
    /// URL of an object in a token; the empty string counts as not set. A refused `pkcs11:`
    /// URL is shown with its PIN masked.
    pub(super) fn file_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let value = Value::deserialize(d)?;
        let url = match optional_string(&value) {
            Ok(Some(url)) => url,
            Ok(None) => return Ok(None),
            Err(problem) => return Err(D::Error::custom(format_args!("{value} {problem}"))),
        };
        let problem = match smcontroller_certs::check_url(url) {
            Ok(()) => return Ok(Some(url.to_owned())),
            Err(smcontroller_certs::Error::UnsupportedUrl { reason, .. }) => reason,
            Err(e) => e.report().to_string(),
        };
        let shown = Value::from(smcontroller_certs::mask_pin(url).into_owned());
        Err(D::Error::custom(format_args!(
            "{shown} cannot be used: {problem}"
        )))
    }

    pub(super) fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        read(d, |v| {
            parse_listen(string(v)?).map_err(|reason| listen_problem(&reason))
        })
    }

    /// Why a value is not a listen address, to follow the value.
    pub(super) fn listen_problem(reason: &ListenAddrError) -> String {
        format!(
            "is not a listen address: {reason} \
             (expected e.g. \":8093\", \"0.0.0.0:8093\" or \"[::1]:8093\")"
        )
    }

    /// `"off"` (`None`), `"cn"`, `"dnsSan"` or `"any"`.
    pub(super) fn identity_binding<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<IdentityField>, D::Error> {
        read(d, |v| match v.as_str() {
            Some("off") => Ok(None),
            Some("cn") => Ok(Some(IdentityField::CommonName)),
            Some("dnsSan") => Ok(Some(IdentityField::DnsSan)),
            Some("any") => Ok(Some(IdentityField::Any)),
            _ => Err(r#"is not one of "off", "cn", "dnsSan" or "any""#.to_owned()),
        })
    }

    /// A duration string greater than zero (see [`parse_duration`]).
    pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        read(d, |v| positive_duration(v, false))
    }

    /// A duration string greater than zero, or `"off"` (`None`).
    pub(super) fn duration_or_off<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        read(d, |v| match v.as_str() {
            Some("off") => Ok(None),
            _ => positive_duration(v, true).map(Some),
        })
    }

    /// A duration string greater than zero; the errors mention `"off"` where it is allowed.
    fn positive_duration(v: &Value, or_off: bool) -> Result<Duration, String> {
        let (or, zero) = if or_off {
            (r#" or "off""#, r#" (or "off")"#)
        } else {
            ("", "")
        };
        let duration = v
            .as_str()
            .and_then(parse_duration)
            .ok_or_else(|| format!(r#"is not a duration (expected e.g. "5s" or "PT5S"){or}"#))?;
        if duration.is_zero() {
            return Err(format!("must be greater than zero{zero}"));
        }
        Ok(duration)
    }

    pub(super) fn some_duration<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    /// A whole number of at least `MIN`.
    pub(super) fn at_least<'de, const MIN: u64, D: Deserializer<'de>>(
        d: D,
    ) -> Result<usize, D::Error> {
        read(d, whole_number::<MIN>)
    }

    fn whole_number<const MIN: u64>(v: &Value) -> Result<usize, String> {
        v.as_u64()
            .filter(|&n| n >= MIN)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("is not a whole number of at least {MIN}"))
    }

    /// A count from 1 to 2^32 - 1.
    pub(super) fn small_count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        read(d, |v| {
            let n = whole_number::<1>(v)?;
            u32::try_from(n).map_err(|_| format!("is larger than {}", u32::MAX))
        })
    }

    /// A count from 0 (no limit) to 2^32 - 1.
    pub(super) fn count_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        read(d, |v| {
            let n = whole_number::<0>(v)?;
            u32::try_from(n).map_err(|_| format!("is larger than {}", u32::MAX))
        })
    }

    /// An HTTP/2 window size: 65,535 to 2^31 - 1 bytes.
    pub(super) fn flow_window<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        const MAX: u32 = (1 << 31) - 1;
        read(d, |v| {
            let n = whole_number::<65_535>(v)?;
            u32::try_from(n)
                .ok()
                .filter(|&n| n <= MAX)
                .ok_or_else(|| format!("is larger than HTTP/2 allows ({MAX})"))
        })
    }

    /// `"9.0"` or `"9.1"`.
    pub(super) fn sm_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<SmProtocol, D::Error> {
        read(d, |v| {
            string(v)?
                .parse()
                .map_err(|_| r#"is not an SM protocol revision: give "9.0" or "9.1""#.to_owned())
        })
    }

    /// An IPv4 CIDR block (see [`NetworkPool`]).
    pub(super) fn network_pool<'de, D: Deserializer<'de>>(d: D) -> Result<NetworkPool, D::Error> {
        read(d, |v| {
            string(v)?
                .parse::<NetworkPool>()
                .map_err(|e| format!("is not usable: {e}"))
        })
    }

    /// An absolute path, or `"off"` (`None`).
    pub(super) fn optional_path<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        read(d, |v| path_or_off(string(v)?))
    }

    /// `"off"` (`None`) or an absolute path.
    pub(super) fn path_or_off(value: &str) -> Result<Option<PathBuf>, String> {
        match value {
            "off" => Ok(None),
            path if Path::new(path).is_absolute() => Ok(Some(PathBuf::from(path))),
            _ => Err(r#"is not an absolute path or "off""#.to_owned()),
        }
    }

    /// `"off"` or an absolute path.
    pub(super) fn admin_socket<'de, D: Deserializer<'de>>(d: D) -> Result<AdminSocket, D::Error> {
        read(d, |v| match string(v)? {
            "off" => Ok(AdminSocket::Off),
            path if Path::new(path).is_absolute() => Ok(AdminSocket::Path(PathBuf::from(path))),
            _ => Err(r#"is not an absolute path or "off""#.to_owned()),
        })
    }

    /// A listen address (see [`parse_listen`]); the empty string counts as not set.
    pub(super) fn optional_listen<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        read(d, |v| {
            optional_string(v)?
                .map(|a| parse_listen(a).map_err(|reason| listen_problem(&reason)))
                .transpose()
        })
    }

    /// A loopback listen address; the empty string counts as not set.
    pub(super) fn loopback<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        read(d, |v| {
            let addr = optional_string(v)?
                .map(|a| parse_listen(a).map_err(|reason| listen_problem(&reason)))
                .transpose()?;
            match addr {
                Some(addr) if !addr.ip().is_loopback() => Err(
                    "is not a loopback address: the admin API has no authentication of its own, \
                     so it serves on loopback only (e.g. \"127.0.0.1:9465\")"
                        .to_owned(),
                ),
                addr => Ok(addr),
            }
        })
    }

    /// A blob URL template; the empty string counts as not set.
    pub(super) fn blob_url_template<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BlobUrlTemplate>, D::Error> {
        read(d, |v| {
            optional_string(v)?
                .map(|t| {
                    BlobUrlTemplate::parse(t).map_err(|problem| {
                        format!(
                            "is not a blob URL template: it {problem} (expected e.g. \
                             \"https://cloud.example/blobs/{{digest}}\")"
                        )
                    })
                })
                .transpose()
        })
    }
}

/// Parses a listen address (contract R-LISTEN-1).
///
/// - `:8093` is `0.0.0.0:8093` (every IPv4 interface);
/// - `127.0.0.1:8093`, `[::1]:8093`, `[::]:8093` are IP literals;
/// - `localhost:8093` is `127.0.0.1:8093`;
/// - any other `host:port` with a valid host name is resolved now, synchronously, with the
///   system resolver (its first address is taken);
/// - empty, portless, out-of-range ports, unbracketed IPv6 and garbage are errors.
///
/// Port 0 is accepted (the system picks a free port; useful in tests).
pub fn parse_listen(value: &str) -> Result<SocketAddr, ListenAddrError> {
    if value.is_empty() {
        return Err(ListenAddrError::Empty);
    }
    if value.contains("://") {
        return Err(ListenAddrError::Scheme);
    }
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or(ListenAddrError::UnclosedBracket)?;
        let port = parse_port(
            after
                .strip_prefix(':')
                .ok_or(ListenAddrError::MissingPort)?,
        )?;
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| ListenAddrError::BadIpv6(host.to_owned()))?;
        return Ok(SocketAddr::new(IpAddr::V6(ip), port));
    }
    let (host, port) = value.rsplit_once(':').ok_or(ListenAddrError::MissingPort)?;
    if host.contains(':') {
        return Err(ListenAddrError::UnbracketedIpv6);
    }
    let port = parse_port(port)?;
    if host.is_empty() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddr::new(IpAddr::V4(ip), port));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if !is_host_name(host) {
        return Err(ListenAddrError::BadHost(host.to_owned()));
    }
    let resolve_error = |reason: String| ListenAddrError::Resolve {
        host: host.to_owned(),
        reason,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| resolve_error(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no addresses".to_owned()))
}

/// A port: decimal digits only, at most 65535.
fn parse_port(port: &str) -> Result<u16, ListenAddrError> {
    if port.is_empty() {
        return Err(ListenAddrError::MissingPort);
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ListenAddrError::BadPort(port.to_owned()));
    }
    port.parse()
        .map_err(|_| ListenAddrError::PortOutOfRange(port.to_owned()))
}

/// An RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, 1 to 63
/// characters each, 253 in all; not all-numeric (that would be a broken IPv4 address).
fn is_host_name(host: &str) -> bool {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    host.len() <= 253
        && host.split('.').all(label_ok)
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Parses a duration: ISO 8601 when it starts with `P` (`PT5S`, `PT0.5S`, `P1DT2H`; weeks to
/// seconds, the same parser as node configurations use: years and months have no fixed length
/// and are refused); otherwise Go or humantime style, by the `humantime` crate: numbers with a
/// unit each (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, and humantime's longer spellings such as
/// `sec`, `min`, `days`), e.g. `5s`, `500ms`, `1m30s`, `1.5h`. `None` if it is neither.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text.starts_with('P') {
        iso8601::parse(text).ok()
    } else {
        humantime::parse_duration(text).ok()
    }
}

/// A JSON syntax error with its position, without serde_json's "at line L column C" suffix.
fn json_error(origin: &str, e: &serde_json::Error) -> ConfigError {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let reason = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
    ConfigError::Json {
        origin: origin.to_owned(),
        line: e.line(),
        column: e.column(),
        reason,
    }
}

/// "an array", "a string", ... for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "config.json";

    fn cli() -> Cli {
        Cli::default()
    }

    fn insecure() -> Cli {
        Cli {
            insecure: true,
            ..Cli::default()
        }
    }

    /// The four TLS keys, and a key set to null.
    const TLS_KEYS_WITH_NULL: &str = r#"{
        "certStorage": "sm",
        "caCert": "/pki/ca.pem",
        "certUrl": "/pki/sm.pem",
        "keyUrl": "/pki/sm.key",
        "responseTimeout": null
    }"#;

    fn pki(dir: &str) -> Cli {
        Cli {
            pki: Some(dir.into()),
            ..Cli::default()
        }
    }

    fn err(json: &str) -> String {
        load_str(ORIGIN, json, &insecure()).unwrap_err().to_string()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_valid_file() {
        let json = r#"{
            "cmServerUrl": "127.0.0.1:9000",
            "certStorage": "sm",
            "caCert": "/etc/ssl/certs/Aos_Root_CA.pem",
            "certUrl": "file:///var/aos/crypt/sm/sm.pem",
            "keyUrl": "/var/aos/crypt/sm/sm.key",
            "identityBinding": "dnsSan",
            "handshakeTimeout": "3s",
            "responseTimeout": "PT2S",
            "replyExpiry": "PT7S",
            "registrationTimeout": "3s",
            "queueBound": 1024,
            "maxMessageSize": 2048,
            "flowWindow": 131072,
            "keepaliveInterval": "1m",
            "keepaliveTimeout": "500ms",
            "certReloadRetry": "PT0.5S",
            "blobUrlTemplate": "https://cloud.example/blobs/{digest}",
            "maxNodes": 64,
            "maxPendingStreams": 16,
            "inboundQueueBytes": 1048576,
            "outboundBacklog": 8,
            "outboundBacklogBytes": 65536,
            "connectionWindow": 524288,
            "maxStreamsPerConnection": 4,
            "maxIdLength": 128,
            "blobLookups": 2,
            "controlFramesPerSecond": 5,
            "newStreamsPerSecond": 50,
            "maxRefusedMessages": 0,
            "maxConnections": 128,
            "listenBacklog": 512,
            "memoryReturnDelay": "off",
            "adminSocket": "/run/admin.sock",
            "adminListen": "[::1]:9465",
            "metricsListen": "127.0.0.1:9464",
            "smProtocol": "9.1",
            "networkPool": "10.200.0.0/16",
            "networkStateFile": "off",
            "insecure": false
        }"#;
        let s = load_str(ORIGIN, json, &cli()).unwrap();
        assert_eq!(
            s,
            Settings {
                listen: addr("127.0.0.1:9000"),
                insecure: false,
                cert_storage: Some("sm".into()),
                ca_cert: Some("/etc/ssl/certs/Aos_Root_CA.pem".into()),
                cert_url: Some("file:///var/aos/crypt/sm/sm.pem".into()),
                key_url: Some("/var/aos/crypt/sm/sm.key".into()),
                identity_binding: Some(IdentityField::DnsSan),
                handshake_timeout: Duration::from_secs(3),
                response_timeout: Duration::from_secs(2),
                reply_expiry: Some(Duration::from_secs(7)),
                registration_timeout: Duration::from_secs(3),
                queue_bound: 1024,
                max_message_size: 2048,
                flow_window: 131_072,
                keepalive_interval: Duration::from_secs(60),
                keepalive_timeout: Duration::from_millis(500),
                cert_reload_retry: Duration::from_millis(500),
                blob_url_template: Some(
                    BlobUrlTemplate::parse("https://cloud.example/blobs/{digest}").unwrap()
                ),
                max_nodes: 64,
                max_pending_streams: 16,
                inbound_queue_bytes: 1 << 20,
                outbound_backlog: 8,
                outbound_backlog_bytes: 65_536,
                connection_window: 524_288,
                max_streams_per_connection: 4,
                max_id_length: 128,
                blob_lookups: 2,
                control_frames_per_second: 5,
                new_streams_per_second: 50,
                max_refused_messages: 0,
                max_connections: 128,
                listen_backlog: 512,
                memory_return_delay: None,
                admin_socket: AdminSocket::Path("/run/admin.sock".into()),
                admin_listen: Some(addr("[::1]:9465")),
                metrics_listen: Some(addr("127.0.0.1:9464")),
                sm_protocol: SmProtocol::V9_1,
                network_pool: "10.200.0.0/16".parse().unwrap(),
                network_state_file: None,
                unknown_keys: vec![],
            }
        );
    }

    #[test]
    fn r_bad_2_budgets_default_to_the_contract_and_refuse_zero() {
        let s = Settings::default();
        assert_eq!(s.max_message_size, 4 << 20);
        assert_eq!((s.max_nodes, s.max_connections), (4096, 4096));
        assert_eq!(s.listen_backlog, 4096);
        assert_eq!(s.max_id_length, 256);
        for key in [
            "maxNodes",
            "maxPendingStreams",
            "outboundBacklog",
            "blobLookups",
            "maxStreamsPerConnection",
            "controlFramesPerSecond",
            "newStreamsPerSecond",
            "maxConnections",
            "listenBacklog",
        ] {
            let json = format!(r#"{{"insecure": true, "{key}": 0}}"#);
            let e = load_str(ORIGIN, &json, &cli()).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("at least 1"), "{key}: {e}");
        }
    }

    #[test]
    fn defaults_apply_to_missing_and_null_keys() {
        let s = load_str(ORIGIN, TLS_KEYS_WITH_NULL, &cli()).unwrap();
        let expected = Settings {
            cert_storage: Some("sm".into()),
            ca_cert: Some("/pki/ca.pem".into()),
            cert_url: Some("/pki/sm.pem".into()),
            key_url: Some("/pki/sm.key".into()),
            ..Settings::default()
        };
        assert_eq!(s, expected);
        assert_eq!(s.listen, addr("0.0.0.0:8093"));
        assert_eq!(s.response_timeout, Duration::from_secs(5));
        assert_eq!(s.registration_timeout, Duration::from_secs(10));
        assert_eq!(s.queue_bound, 256);
        assert_eq!(s.max_message_size, 4 << 20);
        assert_eq!(s.keepalive_interval, Duration::from_secs(10));
        assert_eq!(s.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(s.cert_reload_retry, Duration::from_secs(10));
        assert_eq!(s.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.identity_binding, None);
        assert_eq!(s.memory_return_delay, Some(Duration::from_secs(2)));
        assert!(!s.insecure);
    }

    #[test]
    fn no_file_insecure_gives_defaults() {
        let s = load(&insecure()).unwrap();
        assert_eq!(
            s,
            Settings {
                insecure: true,
                ..Settings::default()
            }
        );
    }

    #[test]
    fn reads_the_file_from_disk() {
        let path = std::env::temp_dir().join(format!("smcontrollerd-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"cmServerUrl": ":7000", "insecure": true}"#).unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            ..Cli::default()
        };
        let s = load(&cli);
        std::fs::remove_file(&path).unwrap();
        let s = s.unwrap();
        assert_eq!(s.listen, addr("0.0.0.0:7000"));
        assert!(s.insecure);
    }

    #[test]
    fn missing_file_names_the_path() {
        let cli = Cli {
            config: Some("/nonexistent/smcontrollerd.json".into()),
            ..insecure()
        };
        let e = load(&cli).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("/nonexistent/smcontrollerd.json: cannot read the config file: "),
            "{msg}"
        );
        assert_eq!(e.exit_code(), EXIT_BAD_CONFIG);
        assert_eq!(EXIT_BAD_CONFIG, 64);
    }

    #[test]
    fn flags_override_the_file() {
        let json = r#"{"cmServerUrl": ":8093", "certStorage": "sm", "caCert": "/pki/ca.pem"}"#;
        let cli = Cli {
            listen: Some("[::1]:9001".into()),
            insecure: true,
            ..Cli::default()
        };
        let s = load_str(ORIGIN, json, &cli).unwrap();
        assert_eq!(s.listen, addr("[::1]:9001"));
        assert!(s.insecure);
        // TLS settings of the file stay available.
        assert_eq!(s.cert_storage.as_deref(), Some("sm"));
    }

    #[test]
    fn bad_listen_flag_names_the_flag() {
        let cli = Cli {
            listen: Some("nope".into()),
            ..insecure()
        };
        let e = load_str(ORIGIN, "{}", &cli).unwrap_err().to_string();
        assert!(
            e.starts_with(
                r#"command line: --listen: "nope" is not a listen address: it has no port"#
            ),
            "{e}"
        );
    }

    #[test]
    fn cli_parses_its_flags() {
        let cli = Cli::try_parse_from([
            "smcontrollerd",
            "--config",
            "/etc/aos/aos_cm.cfg",
            "--listen",
            ":9000",
            "--insecure",
            "--admin-socket",
            "off",
            "--log",
            "debug",
            "--ready-file",
            "/tmp/ready.json",
        ])
        .unwrap();
        assert_eq!(
            cli,
            Cli {
                config: Some("/etc/aos/aos_cm.cfg".into()),
                listen: Some(":9000".into()),
                insecure: true,
                pki: None,
                admin_socket: Some("off".into()),
                log: Some("debug".into()),
                sm_protocol: None,
                network_state: None,
                ready_file: Some("/tmp/ready.json".into()),
            }
        );
        let s = load_str(
            ORIGIN,
            r#"{"insecure": true, "adminSocket": "/tmp/a.sock"}"#,
            &cli,
        )
        .unwrap();
        assert_eq!(
            s.admin_socket,
            AdminSocket::Off,
            "the flag overrides the file"
        );
        let relative = Cli {
            admin_socket: Some("admin.sock".into()),
            ..cli.clone()
        };
        let e = load_str(ORIGIN, r#"{"insecure": true}"#, &relative).unwrap_err();
        assert!(e.to_string().contains("--admin-socket"), "{e}");
        let cli = Cli::try_parse_from(["smcontrollerd", "--pki", "/tmp/pki"]).unwrap();
        assert_eq!(cli.pki, Some("/tmp/pki".into()));
        assert!(
            Cli::try_parse_from(["smcontrollerd", "--pki", "/tmp/pki", "--insecure"]).is_err(),
            "--pki and --insecure contradict each other"
        );
        assert_eq!(
            Cli::try_parse_from(["smcontrollerd"]).unwrap(),
            Cli::default()
        );
        assert!(Cli::try_parse_from(["smcontrollerd", "--bogus"]).is_err());
    }

    #[test]
    fn unknown_keys_are_kept_not_fatal() {
        let json = r#"{
            "fcrypt": {"CACert": "x"},
            "workingDir": "/var/aos",
            "cmServerUrl": ":8093",
            "umController": {"fileServerUrl": ":8092"},
            "insecure": true
        }"#;
        let s = load_str(ORIGIN, json, &cli()).unwrap();
        assert_eq!(s.unknown_keys, ["fcrypt", "umController", "workingDir"]);
    }

    #[test]
    fn tls_settings_are_required_unless_insecure() {
        let e = load_str(ORIGIN, "{}", &cli()).unwrap_err();
        assert!(matches!(e, ConfigError::MissingTls { .. }));
        assert_eq!(e.exit_code(), EXIT_BAD_CONFIG);
        assert_eq!(
            e.to_string(),
            "config.json: mTLS needs caCert, certStorage, certUrl and keyUrl (not set: caCert, \
             certStorage, certUrl, keyUrl); for development pass --pki DIR with a PKI from \
             `cargo xtask gen-certs DIR`, or --insecure for plain HTTP/2"
        );
        let e = load_str(
            ORIGIN,
            r#"{"caCert": "/pki/ca.pem", "certStorage": "", "certUrl": "/pki/sm.pem"}"#,
            &cli(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("(not set: certStorage, keyUrl)"), "{e}");
        let e = load(&cli()).unwrap_err().to_string();
        assert!(
            e.starts_with("command line: mTLS needs caCert, certStorage, certUrl and keyUrl"),
            "{e}"
        );
        // All four are enough; so is insecure, in the file or on the command line.
        load_str(ORIGIN, TLS_KEYS_WITH_NULL, &cli()).unwrap();
        load_str(ORIGIN, r#"{"insecure": true}"#, &cli()).unwrap();
        load_str(ORIGIN, "{}", &insecure()).unwrap();
    }

    #[test]
    fn pki_flag_sets_the_files_of_a_dev_pki() {
        let s = load_str(ORIGIN, "{}", &pki("/tmp/pki")).unwrap();
        assert_eq!(s.ca_cert.as_deref(), Some("/tmp/pki/ca.pem"));
        assert_eq!(s.cert_url.as_deref(), Some("/tmp/pki/server.pem"));
        assert_eq!(s.key_url.as_deref(), Some("/tmp/pki/server.key"));
        assert_eq!(s.cert_storage.as_deref(), Some(PKI_CERT_STORAGE));
        assert!(!s.insecure);

        // The file's storage name stays; its files are replaced; insecure is turned off.
        let json = r#"{"certStorage": "cm", "caCert": "/etc/ca.pem", "insecure": true}"#;
        let s = load_str(ORIGIN, json, &pki("/tmp/pki")).unwrap();
        assert_eq!(s.cert_storage.as_deref(), Some("cm"));
        assert_eq!(s.ca_cert.as_deref(), Some("/tmp/pki/ca.pem"));
        assert!(!s.insecure);

        // A relative directory is taken from the current one.
        let s = load(&pki("dev-pki")).unwrap();
        let expected = std::env::current_dir().unwrap().join("dev-pki/ca.pem");
        assert_eq!(s.ca_cert.as_deref(), expected.to_str());
    }

    #[test]
    fn certificate_urls_must_be_files_the_loader_can_read() {
        assert_eq!(
            err(r#"{"caCert": "ca.pem"}"#),
            r#"config.json: caCert: "ca.pem" cannot be used: not a file:// URL nor an absolute path (relative paths are not accepted)"#
        );
        // A key in a token (R-TLS-5): a well-formed pkcs11: URL is taken, its PIN never shown.
        let e = err(r#"{"keyUrl": "pkcs11:token=aos;object=sm?pin-value=1234"}"#);
        assert_eq!(
            e,
            r#"config.json: keyUrl: "pkcs11:token=aos;object=sm?pin-value=***" cannot be used: module-path is missing (the PKCS#11 module to load, e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so)"#
        );
        let key =
            "pkcs11:token=aos;object=sm?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234";
        let s = load_str(
            ORIGIN,
            &format!(r#"{{"keyUrl": "{key}", "insecure": true}}"#),
            &cli(),
        )
        .unwrap();
        assert_eq!(s.key_url.as_deref(), Some(key));
        let e = err(r#"{"certUrl": "https://example.com/sm.pem"}"#);
        assert!(
            e.starts_with(r#"config.json: certUrl: "https://example.com/sm.pem" cannot be used: the URL scheme"#),
            "{e}"
        );
        assert_eq!(
            err(r#"{"certUrl": 1}"#),
            "config.json: certUrl: 1 is not a string"
        );
        let s = load_str(
            ORIGIN,
            r#"{"caCert": "file:///pki/ca.pem", "certUrl": "", "insecure": true}"#,
            &cli(),
        )
        .unwrap();
        assert_eq!(s.ca_cert.as_deref(), Some("file:///pki/ca.pem"));
        assert_eq!(s.cert_url, None, "the empty string counts as not set");
    }

    #[test]
    fn identity_binding_values() {
        let binding = |value: &str| {
            load_str(
                ORIGIN,
                &format!(r#"{{"identityBinding": {value}, "insecure": true}}"#),
                &cli(),
            )
            .map(|s| s.identity_binding)
        };
        assert_eq!(binding(r#""off""#).unwrap(), None);
        assert_eq!(binding("null").unwrap(), None);
        assert_eq!(binding(r#""cn""#).unwrap(), Some(IdentityField::CommonName));
        assert_eq!(binding(r#""dnsSan""#).unwrap(), Some(IdentityField::DnsSan));
        assert_eq!(binding(r#""any""#).unwrap(), Some(IdentityField::Any));
        for bad in [r#""CN""#, r#""san""#, "true", r#""""#] {
            assert_eq!(
                binding(bad).unwrap_err().to_string(),
                format!(
                    r#"config.json: identityBinding: {bad} is not one of "off", "cn", "dnsSan" or "any""#
                )
            );
        }
    }

    #[test]
    fn bad_duration_names_file_key_and_value() {
        assert_eq!(
            err(r#"{"responseTimeout": "5 sek"}"#),
            r#"config.json: responseTimeout: "5 sek" is not a duration (expected e.g. "5s" or "PT5S")"#
        );
        assert_eq!(
            err(r#"{"registrationTimeout": 5}"#),
            r#"config.json: registrationTimeout: 5 is not a duration (expected e.g. "5s" or "PT5S")"#
        );
        assert_eq!(
            err(r#"{"keepaliveInterval": "PT1Y"}"#),
            r#"config.json: keepaliveInterval: "PT1Y" is not a duration (expected e.g. "5s" or "PT5S")"#
        );
        for key in [
            "responseTimeout",
            "replyExpiry",
            "registrationTimeout",
            "keepaliveInterval",
            "keepaliveTimeout",
            "certReloadRetry",
            "handshakeTimeout",
        ] {
            for zero in ["0s", "PT0S", "0"] {
                assert_eq!(
                    err(&format!(r#"{{"{key}": "{zero}"}}"#)),
                    format!(r#"config.json: {key}: "{zero}" must be greater than zero"#)
                );
            }
        }
    }

    #[test]
    fn memory_return_delay_is_a_duration_or_off() {
        let delay = |json: &str| load_str(ORIGIN, json, &insecure()).map(|s| s.memory_return_delay);
        assert_eq!(
            delay(r#"{"memoryReturnDelay": "500ms"}"#).unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(delay(r#"{"memoryReturnDelay": "off"}"#).unwrap(), None);
        assert_eq!(
            err(r#"{"memoryReturnDelay": "0s"}"#),
            r#"config.json: memoryReturnDelay: "0s" must be greater than zero (or "off")"#
        );
        assert_eq!(
            err(r#"{"memoryReturnDelay": 2}"#),
            r#"config.json: memoryReturnDelay: 2 is not a duration (expected e.g. "5s" or "PT5S") or "off""#
        );
    }

    #[test]
    fn bad_sizes_and_types() {
        assert_eq!(
            err(r#"{"queueBound": 0}"#),
            "config.json: queueBound: 0 is not a whole number of at least 1"
        );
        assert_eq!(
            err(r#"{"queueBound": -3}"#),
            "config.json: queueBound: -3 is not a whole number of at least 1"
        );
        assert_eq!(
            err(r#"{"queueBound": "10"}"#),
            r#"config.json: queueBound: "10" is not a whole number of at least 1"#
        );
        assert_eq!(
            err(r#"{"maxMessageSize": 1023}"#),
            "config.json: maxMessageSize: 1023 is not a whole number of at least 1024"
        );
        assert_eq!(
            err(r#"{"maxMessageSize": 1.5e6}"#),
            "config.json: maxMessageSize: 1500000.0 is not a whole number of at least 1024"
        );
        assert_eq!(
            err(r#"{"insecure": "yes"}"#),
            r#"config.json: insecure: "yes" is not a boolean (expected true or false)"#
        );
        assert_eq!(
            err(r#"{"caCert": 7}"#),
            "config.json: caCert: 7 is not a string"
        );
        assert_eq!(
            err(r#"{"cmServerUrl": 8093}"#),
            "config.json: cmServerUrl: 8093 is not a string"
        );
        let s = load_str(
            ORIGIN,
            r#"{"queueBound": 1, "maxMessageSize": 1024}"#,
            &insecure(),
        )
        .unwrap();
        assert_eq!((s.queue_bound, s.max_message_size), (1, 1024));
    }

    #[test]
    fn flow_window_is_bounded_by_what_http2_allows() {
        let s = load_str(
            "config.json",
            r#"{"flowWindow": 65535, "insecure": true}"#,
            &Cli::default(),
        )
        .unwrap();
        assert_eq!(s.flow_window, 65_535);
        for (bad, why) in [
            ("65534", "is not a whole number of at least 65535"),
            ("2147483648", "is larger than HTTP/2 allows (2147483647)"),
            ("\"1MiB\"", "is not a whole number of at least 65535"),
        ] {
            let json = format!(r#"{{"flowWindow": {bad}, "insecure": true}}"#);
            let e = load_str("config.json", &json, &Cli::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("flowWindow") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let e = err("{\n  \"cmServerUrl\": \":8093\",\n  \"queueBound\": ,\n}");
        assert!(e.starts_with("config.json:3:17: not valid JSON: "), "{e}");
        assert!(!e.contains("at line"), "{e}");
        assert_eq!(
            err("[1, 2]"),
            "config.json: the config must be a JSON object, found an array"
        );
        assert!(err("").starts_with("config.json:1:0: not valid JSON: "));
    }

    #[test]
    fn bad_listen_in_file_names_the_key() {
        assert_eq!(
            err(r#"{"cmServerUrl": ""}"#),
            r#"config.json: cmServerUrl: "" is not a listen address: it is empty (expected e.g. ":8093", "0.0.0.0:8093" or "[::1]:8093")"#
        );
        assert!(
            err(r#"{"cmServerUrl": ":99999"}"#)
                .contains(r#"":99999" is not a listen address: port 99999 is out of range"#)
        );
    }

    #[test]
    fn listen_port_only_binds_every_ipv4_interface() {
        assert_eq!(parse_listen(":8093"), Ok(addr("0.0.0.0:8093")));
        assert_eq!(parse_listen(":0"), Ok(addr("0.0.0.0:0")));
        assert_eq!(parse_listen(":65535"), Ok(addr("0.0.0.0:65535")));
    }

    #[test]
    fn listen_ip_literals_and_localhost() {
        assert_eq!(parse_listen("127.0.0.1:8093"), Ok(addr("127.0.0.1:8093")));
        assert_eq!(parse_listen("0.0.0.0:1"), Ok(addr("0.0.0.0:1")));
        assert_eq!(parse_listen("localhost:8093"), Ok(addr("127.0.0.1:8093")));
        assert_eq!(parse_listen("LocalHost:80"), Ok(addr("127.0.0.1:80")));
    }

    #[test]
    fn listen_ipv6() {
        assert_eq!(parse_listen("[::1]:8093"), Ok(addr("[::1]:8093")));
        assert_eq!(parse_listen("[::]:8093"), Ok(addr("[::]:8093")));
        assert_eq!(parse_listen("[fe80::1:2]:443"), Ok(addr("[fe80::1:2]:443")));
        assert_eq!(
            parse_listen("::1:8093"),
            Err(ListenAddrError::UnbracketedIpv6)
        );
        assert_eq!(parse_listen("[::1]"), Err(ListenAddrError::MissingPort));
        assert_eq!(parse_listen("[::1]8093"), Err(ListenAddrError::MissingPort));
        assert_eq!(
            parse_listen("[::1:8093"),
            Err(ListenAddrError::UnclosedBracket)
        );
        assert_eq!(
            parse_listen("[127.0.0.1]:80"),
            Err(ListenAddrError::BadIpv6("127.0.0.1".into()))
        );
        assert_eq!(
            parse_listen("[]:80"),
            Err(ListenAddrError::BadIpv6("".into()))
        );
    }

    #[test]
    fn listen_malformed() {
        use ListenAddrError::*;
        assert_eq!(parse_listen(""), Err(Empty));
        assert_eq!(parse_listen("8093"), Err(MissingPort));
        assert_eq!(parse_listen("garbage"), Err(MissingPort));
        assert_eq!(parse_listen("127.0.0.1"), Err(MissingPort));
        assert_eq!(parse_listen("127.0.0.1:"), Err(MissingPort));
        assert_eq!(parse_listen(":"), Err(MissingPort));
        assert_eq!(parse_listen(":65536"), Err(PortOutOfRange("65536".into())));
        assert_eq!(
            parse_listen(":123456789012345678901234567890"),
            Err(PortOutOfRange("123456789012345678901234567890".into()))
        );
        assert_eq!(parse_listen(":http"), Err(BadPort("http".into())));
        assert_eq!(parse_listen(":+80"), Err(BadPort("+80".into())));
        assert_eq!(parse_listen(":-1"), Err(BadPort("-1".into())));
        assert_eq!(parse_listen(" :8093"), Err(BadHost(" ".into())));
        assert_eq!(
            parse_listen("bad_host!:80"),
            Err(BadHost("bad_host!".into()))
        );
        assert_eq!(
            parse_listen("999.1.1.1:80"),
            Err(BadHost("999.1.1.1".into()))
        );
        assert_eq!(parse_listen("-host:80"), Err(BadHost("-host".into())));
        assert_eq!(parse_listen("a..b:80"), Err(BadHost("a..b".into())));
        assert_eq!(parse_listen("http://0.0.0.0:8093"), Err(Scheme));
    }

    #[test]
    fn host_names() {
        assert!(is_host_name("aoscm"));
        assert!(is_host_name("node-1.example.com"));
        assert!(!is_host_name("node_1"));
        assert!(!is_host_name("node-"));
        assert!(!is_host_name(&"a".repeat(64)));
        assert!(!is_host_name("1.2.3"));
    }

    #[test]
    fn go_style_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("5s"), Some(ms(5_000)));
        assert_eq!(parse_duration("500ms"), Some(ms(500)));
        assert_eq!(parse_duration("1m"), Some(ms(60_000)));
        assert_eq!(parse_duration("1h"), Some(ms(3_600_000)));
        assert_eq!(parse_duration("1m30s"), Some(ms(90_000)));
        assert_eq!(parse_duration("1.5s"), Some(ms(1_500)));
        assert_eq!(parse_duration("1.5h"), Some(ms(5_400_000)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        // humantime's own spellings are accepted too.
        assert_eq!(parse_duration("2 min"), Some(ms(120_000)));
        for bad in [
            "", "5", "s", "5 sek", ".5s", "1.2.3s", "-5s", "+5s", "1e3s", "soon",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration("99999999999999999999999h"), None);
    }

    #[test]
    fn iso_durations() {
        assert_eq!(parse_duration("PT5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("PT0.5S"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("PT1M30S"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("P1D"), Some(Duration::from_secs(86_400)));
        for bad in ["P1M", "PT", "PT5Sjunk", "PT-5S", "PT1Y"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_are_case_sensitive() {
        let s = load_str(
            ORIGIN,
            r#"{"ResponseTimeout": "1s", "insecure": true}"#,
            &cli(),
        )
        .unwrap();
        assert_eq!(s.unknown_keys, ["ResponseTimeout"]);
        assert_eq!(s.response_timeout, Duration::from_secs(5));
    }

    #[test]
    fn blob_url_template_is_checked_at_load() {
        let json =
            r#"{"blobUrlTemplate": "https://cloud.example/blobs/{digest}", "insecure": true}"#;
        let template = load_str(ORIGIN, json, &cli())
            .unwrap()
            .blob_url_template
            .expect("set");
        assert_eq!(template.as_str(), "https://cloud.example/blobs/{digest}");
        let s = load_str(
            ORIGIN,
            r#"{"blobUrlTemplate": "", "insecure": true}"#,
            &cli(),
        );
        assert_eq!(
            s.unwrap().blob_url_template,
            None,
            "empty counts as not set"
        );
        assert_eq!(Settings::default().blob_url_template, None);

        for (bad, problem) in [
            (
                r#""cloud.example/blobs/{digest}""#,
                "has no URL scheme such as https://",
            ),
            (
                r#""://cloud.example/{digest}""#,
                "has no URL scheme such as https://",
            ),
            (r#""https://cloud.example/blobs/""#, "has no {digest}"),
            (
                r#""https://cloud.example/{dgst}/{digest}""#,
                "has a '{' or '}' that is not part of {digest}",
            ),
            (
                r#""https://cloud.example/my blobs/{digest}""#,
                "has spaces or control characters",
            ),
        ] {
            assert_eq!(
                err(&format!(r#"{{"blobUrlTemplate": {bad}}}"#)),
                format!(
                    r#"config.json: blobUrlTemplate: {bad} is not a blob URL template: it {problem} (expected e.g. "https://cloud.example/blobs/{{digest}}")"#
                )
            );
        }
        assert_eq!(
            err(r#"{"blobUrlTemplate": 42}"#),
            "config.json: blobUrlTemplate: 42 is not a string"
        );
    }

    #[test]
    fn blob_urls_take_digests_only() {
        let template = BlobUrlTemplate::parse("file:///var/aos/blobs/{digest}/{digest}.json")
            .expect("a template");
        let sha256 = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            template.url(&sha256),
            Ok(format!("file:///var/aos/blobs/{sha256}/{sha256}.json"))
        );
        for good in [
            "sha512:0f1e",
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "sha256:YWJj=",
        ] {
            assert!(template.url(good).is_ok(), "{good}");
        }
        let too_long = format!("sha256:{}", "a".repeat(MAX_DIGEST_LEN));
        for bad in [
            "",
            "sha256",
            ":abab",
            "sha256:",
            "SHA256:abab",
            "sha256:ab/../../etc/passwd",
            "sha256:ab?x=1",
            "sha256:ab#frag",
            "sha256:a b",
            "sha256:%2e%2e",
            "sha256:{digest}",
            "sha256:ab:cd",
            "sha+:abab",
            too_long.as_str(),
        ] {
            assert_eq!(template.url(bad), Err(NotADigest), "{bad:?}");
        }
    }

    /// The keys [`Settings`] reads, as serde's derive names them: a deserializer that only
    /// records the field list the derived code asks for.
    fn settings_keys() -> &'static [&'static str] {
        use serde::de::{self, Visitor};

        struct Keys<'a>(&'a mut &'static [&'static str]);

        impl<'de> serde::Deserializer<'de> for Keys<'_> {
            type Error = de::value::Error;

            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("only a struct has keys"))
            }

            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(de::Error::custom("keys recorded"))
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }

        let mut keys: &'static [&'static str] = &[];
        let _ = Settings::deserialize(Keys(&mut keys));
        keys
    }

    const SAMPLE: &str = include_str!("../config.sample.json");
    const DOC: &str = include_str!("../../docs/configuration.md");

    #[test]
    fn the_sample_config_has_every_key_and_loads() {
        let keys = settings_keys();
        assert!(keys.contains(&"cmServerUrl") && keys.contains(&"blobUrlTemplate"));
        assert!(!keys.contains(&"unknownKeys"), "not a key of the file");
        let sample: serde_json::Map<String, Value> = serde_json::from_str(SAMPLE).unwrap();
        for key in keys {
            assert!(
                sample.contains_key(*key),
                "config.sample.json has no {key:?}"
            );
        }
        let s = load_str("config.sample.json", SAMPLE, &cli()).expect("the sample loads");
        assert_eq!(s.unknown_keys, Vec::<String>::new());
        assert!(!s.insecure, "the sample serves mTLS");
        // The sample shows the defaults, where there is one.
        let expected = Settings {
            cert_storage: s.cert_storage.clone(),
            ca_cert: s.ca_cert.clone(),
            cert_url: s.cert_url.clone(),
            key_url: s.key_url.clone(),
            reply_expiry: Some(2 * Settings::default().response_timeout),
            blob_url_template: s.blob_url_template.clone(),
            admin_socket: s.admin_socket.clone(),
            ..Settings::default()
        };
        assert_eq!(s, expected);
    }

    #[test]
    fn admin_and_metrics_keys_are_checked_at_load() {
        let load = |json: &str| load_str("c.json", json, &cli());
        let s = load(r#"{"insecure": true}"#).unwrap();
        assert_eq!(s.admin_socket, AdminSocket::Default);
        assert!(s.admin_socket.path().is_some());
        assert_eq!((s.admin_listen, s.metrics_listen), (None, None));
        let s = load(
            r#"{"insecure": true, "adminSocket": "/tmp/a.sock", "adminListen": "127.0.0.1:9465",
                "metricsListen": ":9464"}"#,
        )
        .unwrap();
        assert_eq!(s.admin_socket, AdminSocket::Path("/tmp/a.sock".into()));
        assert_eq!(s.admin_listen, Some(addr("127.0.0.1:9465")));
        assert_eq!(s.metrics_listen, Some(addr("0.0.0.0:9464")));
        let s = load(r#"{"insecure": true, "adminSocket": "off"}"#).unwrap();
        assert_eq!(s.admin_socket.path(), None);
        for (json, key) in [
            (
                r#"{"insecure": true, "adminListen": "0.0.0.0:9465"}"#,
                "adminListen",
            ),
            (
                r#"{"insecure": true, "adminListen": ":9465"}"#,
                "adminListen",
            ),
            (
                r#"{"insecure": true, "adminSocket": "admin.sock"}"#,
                "adminSocket",
            ),
            (
                r#"{"insecure": true, "metricsListen": "nope"}"#,
                "metricsListen",
            ),
        ] {
            let err = load(json).unwrap_err().to_string();
            assert!(err.contains(key), "{json}: {err}");
        }
        let err = load(r#"{"insecure": true, "adminListen": "192.0.2.1:9465"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn the_configuration_doc_describes_every_key() {
        for key in settings_keys() {
            assert!(
                DOC.contains(&format!("\n| `{key}` |")),
                "docs/configuration.md has no row for `{key}`"
            );
        }
    }
}
