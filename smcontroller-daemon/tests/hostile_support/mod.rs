//! What the hostile-peer tests share (R-BAD-1..3): a controller served on 127.0.0.1 with five
//! well-behaved simulated SMs connected first, the checks that they still work and that a new
//! SM can register, and hostile clients that write HTTP/2 frames by hand. Every wait has a
//! deadline; every attack loop is bounded in count and in time.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use smcontroller_api::{ItemInfoProvider, NodeConfigHandler, NodeId};
use smcontroller_grpc::{
    connections::Connections,
    proto::servicemanager::v5::{
        SmIncomingMessages, SmOutgoingMessages, sm_outgoing_messages::SmOutgoingMessage,
        sm_service_client::SmServiceClient,
    },
    server::{self, ServerSettings},
};
use smcontroller_routing::{Controller, Receivers, Settings};
use smcontroller_sim::{SimConfig, Simulator};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::support::{Blobs, DEADLINE, Event, EventLog};

/// The well-behaved SMs every hostile test connects before its attack.
pub const GOOD: usize = 5;

/// Id of the `i`-th well-behaved SM (0-based).
pub fn good(i: usize) -> NodeId {
    NodeId::new(format!("good-{}", i + 1))
}

/// Waits until `cond` holds, looking every 5 ms, for at most `within`; panics naming `what`.
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `fut` within [`DEADLINE`], or a panic naming `what`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

/// Resident memory of this process, bytes, from `/proc/self/statm` (pages of 4 KiB).
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// A controller on a loopback port with [`GOOD`] simulated SMs registered.
pub struct Hostile {
    pub addr: SocketAddr,
    pub controller: Controller,
    pub log: Arc<EventLog>,
    pub connections: Connections,
    pub sim: Simulator,
    newcomers: AtomicU64,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Hostile {
    pub async fn start(settings: Settings, server_settings: ServerSettings) -> Self {
        Self::start_with(settings, server_settings, Arc::new(Blobs)).await
    }

    pub async fn start_with(
        settings: Settings,
        server_settings: ServerSettings,
        items: Arc<dyn ItemInfoProvider>,
    ) -> Self {
        let log = Arc::new(EventLog::default());
        let controller = Controller::new(settings, Receivers::all(log.clone()));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new();
        let (stop, mut stopped) = watch::channel(false);
        let server = tokio::spawn({
            let controller = controller.clone();
            let connections = connections.clone();
            async move {
                server::serve_insecure_with(
                    listener,
                    controller,
                    items,
                    server_settings,
                    connections,
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await
                .unwrap();
            }
        });
        let mut config = SimConfig::new(format!("http://{addr}"), GOOD);
        config.node_prefix = "good".into();
        config.instances = 1;
        config.reconnect_delay = Duration::from_millis(100);
        let sim = Simulator::start(config).unwrap();
        let hostile = Self {
            addr,
            controller,
            log,
            connections,
            sim,
            newcomers: AtomicU64::new(0),
            stop,
            server,
        };
        eventually("the well-behaved SMs registered", DEADLINE, || {
            (0..GOOD).all(|i| hostile.controller.node_status(&good(i)).is_some())
        })
        .await;
        hostile
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The five well-behaved SMs are registered and each answers a sync call.
    pub async fn good_ones_answer(&self, when: &str) {
        for i in 0..GOOD {
            let node = good(i);
            let status = within(
                &format!("{node} answering {when}"),
                self.controller.get_node_config_status(&node),
            )
            .await;
            assert!(status.is_ok(), "{node} {when}: {status:?}");
        }
    }

    /// A new SM (a fresh connection and id) registers, then leaves again.
    pub async fn newcomer_registers(&self, when: &str) {
        let n = self.newcomers.fetch_add(1, Ordering::Relaxed);
        let id = format!("newcomer-{n}");
        let sm = within(
            &format!("{id} opening RegisterSM {when}"),
            crate::support::TestSm::open(&self.url()),
        )
        .await;
        sm.register(&id).await;
        let is_info = |e: &Event| matches!(e, Event::SmInfo(node, _) if *node == id);
        within(
            &format!("{id} registering {when}"),
            self.log.wait_count(&id, 1, is_info),
        )
        .await;
        drop(sm);
        eventually(&format!("{id} gone"), DEADLINE, || {
            self.controller.node_status(&NodeId::new(&id)).is_none()
        })
        .await;
    }

    /// Both checks: the well-behaved SMs answer and a new SM registers.
    pub async fn healthy(&self, when: &str) {
        self.good_ones_answer(when).await;
        self.newcomer_registers(when).await;
        self.good_ones_answer(&format!("{when}, after a newcomer"))
            .await;
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.sim.stop().await;
        self.controller.shutdown().await;
        self.connections.close_all();
        let _ = tokio::time::timeout(DEADLINE, self.server).await;
    }
}

/// The status a `RegisterSM` response stream ends with (panics on a clean end or no end).
pub async fn end_status(rx: &mut Streaming<SmIncomingMessages>) -> Status {
    within("the stream's end", async {
        loop {
            match rx.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
}

/// Opens `RegisterSM` on a fresh connection with a request stream the test feeds.
pub async fn open_stream(
    url: &str,
) -> Result<
    (
        mpsc::Sender<SmOutgoingMessages>,
        Streaming<SmIncomingMessages>,
    ),
    Status,
> {
    let mut client = SmServiceClient::connect(url.to_owned()).await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    let response = client.register_sm(ReceiverStream::new(rx)).await?;
    Ok((tx, response.into_inner()))
}

pub fn outgoing(message: SmOutgoingMessage) -> SmOutgoingMessages {
    SmOutgoingMessages {
        sm_outgoing_message: Some(message),
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC framing and hand-written protobuf
// ---------------------------------------------------------------------------------------------

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

pub fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited protobuf field.
pub fn len_field(field: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 6);
    varint(u64::from(field << 3 | 2), &mut out);
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// `SMOutgoingMessages { node_instances_status { instances: [{}; n] } }`, hand-encoded: two
/// bytes per empty instance on the wire, a whole `InstanceStatus` each once decoded.
pub fn empty_instances_bomb(n: usize) -> Vec<u8> {
    let inner: Vec<u8> = std::iter::repeat_n([0x0a_u8, 0x00], n).flatten().collect();
    len_field(4, &inner)
}

/// The largest [`empty_instances_bomb`] under `limit` bytes.
pub fn bomb_under(limit: usize) -> Vec<u8> {
    empty_instances_bomb((limit - 16) / 2)
}

// ---------------------------------------------------------------------------------------------
// A hand-written HTTP/2 client: frames exactly as the test says, nothing more
// ---------------------------------------------------------------------------------------------

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK of a gRPC request for `path`: literals without indexing and without Huffman.
pub fn grpc_headers(path: &str) -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, name_index: Option<u8>, name: &str, value: &str) {
        match name_index {
            Some(index) => out.push(index),
            None => {
                out.push(0);
                out.push(u8::try_from(name.len()).unwrap());
                out.extend_from_slice(name.as_bytes());
            }
        }
        out.push(u8::try_from(value.len()).unwrap());
        out.extend_from_slice(value.as_bytes());
    }
    let mut out = vec![0x83, 0x86]; // :method POST, :scheme http (static table 3, 6)
    literal(&mut out, Some(4), ":path", path);
    literal(&mut out, Some(1), ":authority", "127.0.0.1");
    literal(&mut out, None, "content-type", "application/grpc");
    literal(&mut out, None, "te", "trailers");
    out
}

pub const REGISTER_SM: &str = "/servicemanager.v5.SMService/RegisterSM";
pub const GET_BLOBS_INFOS: &str = "/servicemanager.v5.SMService/GetBlobsInfos";

/// What the server sent on a raw connection.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The server's first non-ACK SETTINGS, as (id, value) pairs.
    pub settings: Option<Vec<(u16, u32)>>,
    /// GOAWAY error codes.
    pub goaways: Vec<u32>,
    /// RST_STREAM frames: (stream, error code).
    pub resets: Vec<(u32, u32)>,
    /// HEADERS frames, by stream.
    pub headers: Vec<u32>,
    pub pings: u64,
    pub settings_acks: u64,
    /// The server closed the connection (EOF or error).
    pub closed: bool,
}

/// A raw HTTP/2 connection: the writer half is the test's; a reader task records what the
/// server sends, answering nothing unless told to ([`RawH2::ack_settings`]).
pub struct RawH2 {
    pub writer: OwnedWriteHalf,
    pub seen: watch::Receiver<Seen>,
    reader: JoinHandle<()>,
}

impl RawH2 {
    /// TCP only: no preface.
    pub async fn tcp(addr: SocketAddr) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let (read, writer) = tcp.into_split();
        let (tx, seen) = watch::channel(Seen::default());
        let reader = tokio::spawn(read_frames(read, tx));
        Ok(Self {
            writer,
            seen,
            reader,
        })
    }

    /// TCP, the client preface and an empty SETTINGS.
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut raw = Self::tcp(addr).await.expect("TCP connect");
        raw.send(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
            .await
            .expect("preface written");
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// Waits for the server's SETTINGS and acknowledges them.
    pub async fn ack_settings(&mut self) -> Vec<(u16, u32)> {
        let settings = self
            .wait("the server's SETTINGS", |s| s.settings.is_some())
            .await
            .settings
            .unwrap();
        self.send(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("SETTINGS ACK written");
        settings
    }

    /// Waits until `pred` holds of what was seen, within [`DEADLINE`].
    pub async fn wait(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let mut seen = self.seen.clone();
        within(what, seen.wait_for(|s| pred(s)))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| self.seen.borrow().clone())
    }

    /// Whether the server closed the connection or sent GOAWAY, within `wait`.
    pub async fn ended_within(&self, wait: Duration) -> bool {
        let mut seen = self.seen.clone();
        tokio::time::timeout(wait, seen.wait_for(|s| s.closed || !s.goaways.is_empty()))
            .await
            .is_ok()
    }

    pub fn snapshot(&self) -> Seen {
        self.seen.borrow().clone()
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_frames(mut read: impl AsyncRead + Unpin, tx: watch::Sender<Seen>) {
    let mut header = [0_u8; 9];
    loop {
        if read.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0_u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            break;
        }
        tx.send_modify(|seen| match kind {
            SETTINGS if flags & ACK != 0 => seen.settings_acks += 1,
            SETTINGS if seen.settings.is_none() => {
                seen.settings = Some(
                    payload
                        .chunks_exact(6)
                        .map(|c| {
                            (
                                u16::from_be_bytes([c[0], c[1]]),
                                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                            )
                        })
                        .collect(),
                );
            }
            GOAWAY if payload.len() >= 8 => seen.goaways.push(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ])),
            RST_STREAM if payload.len() >= 4 => seen.resets.push((
                stream,
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            )),
            HEADERS => seen.headers.push(stream),
            PING => seen.pings += 1,
            _ => {}
        });
    }
    tx.send_modify(|seen| seen.closed = true);
}

/// Whether the peer of `tcp` closes it (EOF or reset) within `wait`; what it wrote before is
/// read and dropped.
pub async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0_u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

// ---------------------------------------------------------------------------------------------
// An IO wrapper that counts what is written through it
// ---------------------------------------------------------------------------------------------

/// Counts the bytes written through it (for a client to see when flow control stops it).
pub struct CountingIo<IO> {
    pub io: IO,
    pub written: Arc<AtomicU64>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountingIo<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountingIo<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            this.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Waits until `counter` has not moved for `quiet`, within [`DEADLINE`]: the writer has sent
/// all that flow control lets it send.
pub async fn settled(counter: &AtomicU64, quiet: Duration) -> u64 {
    within("the writer settling", async {
        let mut last = counter.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = counter.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return now;
            }
        }
    })
    .await
}

/// An h2 client connection on a fresh TCP socket, its driver spawned; returns the written-byte
/// counter of the socket too.
pub async fn h2_client(
    addr: SocketAddr,
    window: u32,
) -> (h2::client::SendRequest<bytes::Bytes>, Arc<AtomicU64>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let io = CountingIo {
        io: tcp,
        written: written.clone(),
    };
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, written)
}

pub fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Collected lines of a shared log buffer.
pub type Lines = Arc<Mutex<Vec<u8>>>;
