//! A watch on what a peer sends before and around its gRPC calls (contract R-BAD-3), as a
//! wrapper of the connection's byte stream (after TLS, so it sees HTTP/2 frames).
//!
//! - **Preface deadline.** The HTTP/2 client preface (the 24-byte magic and the first SETTINGS
//!   frame) must arrive before the connection's deadline (the handshake timeout, counted from
//!   the accept, so the TLS handshake and the preface share it). Keepalive only starts after
//!   the preface; without this, a socket that sends nothing would be held for ever.
//! - **Control frame flood.** PING and SETTINGS frames (not their acknowledgements) draw from a
//!   token bucket of `control_frames_per_sec` per second, the HEADERS frames that open a stream
//!   from one of `new_streams_per_sec`, with bursts of ten and two seconds' worth. hyper answers
//!   each PING and SETTINGS and offers no limit of its own, and refuses streams beyond the
//!   concurrency limit one by one; a peer that floods them makes the server work for nothing (a
//!   real SM opens one `RegisterSM`, a `GetBlobsInfos` now and then and, under 9.1, a
//!   `NetworkService` call per instance it starts). When a bucket is empty the connection ends,
//!   like a struck-out one (below): it is not read any more and is closed [`STRUCK_OUT_CLOSE`]
//!   later, so a peer that reconnects as soon as it is closed floods at most once per that.
//!
//! - **Refused messages** (N-BAD-1). The connection's [`Strikes`] count the messages its streams
//!   had refused (see [`GuardSettings::max_refused_messages`]); once they are used up the
//!   wrapper stops reading (the peer's flood stays in its own socket buffers, so it costs
//!   nothing more) and closes the connection [`STRUCK_OUT_CLOSE`] later, after its streams have
//!   ended with their status.
//! - **Eviction.** Until its preface is in, the connection is one of the acceptor's not
//!   established ones ([`Establishing`]); when the connection cap or the file descriptors run
//!   out, the oldest of those is evicted to make room for a new one, and this wrapper ends it.
//!
//! The wrapper only reads frame headers as the bytes go by (nine bytes per frame); it never
//! buffers, delays or changes them.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::task::AtomicWaker;

use smcontroller_certs::Establishing;
use smcontroller_limits::{Budget, Refusals};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface magic (RFC 9113, section 3.4).
const MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// How long a burst of control frames may be, in seconds' worth of the rate.
const BURST_SECS: u32 = 10;
/// How long a burst of new streams may be, in seconds' worth of the rate: shorter, as each
/// stream HTTP/2 refuses costs the server more than a PING.
const STREAM_BURST_SECS: u32 = 2;

/// How long a struck-out stream waits before it ends with its status (the peer's reconnect
/// loop, if it waits for the end, turns at most once per this), see [`Strikes`].
pub const STRUCK_OUT_GRACE: Duration = Duration::from_secs(1);
/// How long after its strikes ran out a connection is closed: after [`STRUCK_OUT_GRACE`], with
/// time for the streams' statuses to be written.
pub const STRUCK_OUT_CLOSE: Duration = Duration::from_millis(1500);

/// What a [`Guarded`] connection is held to.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// When the preface must have arrived.
    pub preface_deadline: Instant,
    /// PING and SETTINGS frames per second, on average.
    pub control_frames_per_sec: u32,
    /// Streams the peer may open per second, on average.
    pub new_streams_per_sec: u32,
    /// Messages the connection's streams may have refused before it is closed; 0 is no limit.
    pub max_refused_messages: u32,
    /// Where the refusals are counted.
    pub refusals: Refusals,
}

/// The refused messages of one connection, shared by its streams (they reach it through
/// [`GuardedInfo`]) and its [`Guarded`] wrapper.
///
/// Each refusal is a strike; the strike that uses up the budget makes the connection *struck
/// out*: its streams end with `RESOURCE_EXHAUSTED` after [`STRUCK_OUT_GRACE`], the wrapper stops
/// reading at once and closes the connection after [`STRUCK_OUT_CLOSE`].
#[derive(Clone)]
pub struct Strikes(Arc<StrikeState>);

struct StrikeState {
    count: AtomicU32,
    max: u32,
    /// The connection's reading task, woken when the budget runs out.
    reader: AtomicWaker,
}

impl std::fmt::Debug for Strikes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Strikes")
            .field("count", &self.count())
            .field("max", &self.0.max)
            .finish()
    }
}

impl Strikes {
    /// A connection's strikes with a budget of `max` (0: no limit).
    pub fn new(max: u32) -> Self {
        Self(Arc::new(StrikeState {
            count: AtomicU32::new(0),
            max,
            reader: AtomicWaker::new(),
        }))
    }

    /// Counts one refused message; `true` for the one that uses up the budget (once per
    /// connection).
    pub fn strike(&self) -> bool {
        let count = self
            .0
            .count
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let out = self.0.max > 0 && count == self.0.max;
        if out {
            self.0.reader.wake();
        }
        out
    }

    /// Whether the budget is used up.
    pub fn is_out(&self) -> bool {
        self.0.max > 0 && self.count() >= self.0.max
    }

    /// Refusals so far.
    pub fn count(&self) -> u32 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// The budget (0: no limit).
    pub fn max(&self) -> u32 {
        self.0.max
    }
}

/// What every request of a guarded connection carries in its extensions: the connection's own
/// info (the peer's address, its certificate) and its [`Strikes`].
#[derive(Debug, Clone)]
pub struct GuardedInfo<C> {
    /// The info of the connection inside.
    pub conn: C,
    /// The connection's refused messages.
    pub strikes: Strikes,
}

/// A connection under the guard.
pub struct Guarded<IO> {
    io: IO,
    /// Until the preface is complete: the deadline.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Until the preface is complete: the place among the connections not established yet,
    /// and its eviction.
    establishing: Option<(Establishing, Pin<Box<WaitForCancellationFutureOwned>>)>,
    /// Bytes of the magic seen so far (24 when done).
    magic_seen: usize,
    /// The header of the frame being read, and how much of it is in.
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    /// Frames complete so far (the first one completes the preface).
    frames: u64,
    control_frames: Bucket,
    new_streams: Bucket,
    refusals: Refusals,
    strikes: Strikes,
    /// The highest stream id the peer has opened.
    last_stream: u32,
    /// Why the connection is ending, once it is (a flood, the strikes out).
    ending: Option<Ending>,
    /// Once ending: when the connection is closed.
    closing: Option<Pin<Box<Sleep>>>,
}

/// Why a guarded connection is ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// Control frames or new streams (what) over the rate (per second).
    Flood(&'static str, f64),
    /// The budget of refused messages is used up.
    StruckOut,
}

impl<IO> std::fmt::Debug for Guarded<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("preface_done", &self.deadline.is_none())
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl<IO> Guarded<IO> {
    /// Puts `io` under the guard.
    pub fn new(io: IO, settings: GuardSettings) -> Self {
        Self::establishing(io, settings, None)
    }

    /// Puts `io` under the guard, holding its place among the connections not established yet
    /// until its preface is in (ended if it is evicted first).
    pub fn establishing(
        io: IO,
        settings: GuardSettings,
        establishing: Option<Establishing>,
    ) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(
                settings.preface_deadline,
            ))),
            establishing: establishing.map(|e| {
                let evicted = Box::pin(e.evicted());
                (e, evicted)
            }),
            magic_seen: 0,
            header: [0; FRAME_HEADER],
            header_len: 0,
            skip: 0,
            frames: 0,
            control_frames: Bucket::new(settings.control_frames_per_sec, BURST_SECS),
            new_streams: Bucket::new(settings.new_streams_per_sec, STREAM_BURST_SECS),
            refusals: settings.refusals,
            strikes: Strikes::new(settings.max_refused_messages),
            last_stream: 0,
            ending: None,
            closing: None,
        }
    }

    /// The connection's refused messages.
    pub fn strikes(&self) -> &Strikes {
        &self.strikes
    }

    /// Whether the connection is ending: flooded or struck out.
    fn is_ending(&mut self) -> bool {
        if self.ending.is_none() && self.strikes.is_out() {
            self.ending = Some(Ending::StruckOut);
        }
        self.ending.is_some()
    }

    /// Reading once the connection is ending: nothing more is read; it is closed at
    /// [`STRUCK_OUT_CLOSE`].
    fn poll_ending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let closing = self
            .closing
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(STRUCK_OUT_CLOSE)));
        match closing.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(match self.ending {
                Some(Ending::Flood(what, rate)) => io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("{what} flood: more than {rate} per second; connection closed"),
                ),
                _ => io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!(
                        "{} messages refused (budget refused_messages); connection closed",
                        self.strikes.count()
                    ),
                ),
            })),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Looks at `bytes`, just read; `Err` ends the connection.
    fn inspect(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.magic_seen < MAGIC.len() {
            let take = bytes.len().min(MAGIC.len() - self.magic_seen);
            if bytes[..take] != MAGIC[self.magic_seen..self.magic_seen + take] {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not an HTTP/2 client: the connection preface is wrong",
                ));
            }
            self.magic_seen += take;
            bytes = &bytes[take..];
        }
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                if self.skip == 0 {
                    self.frame_done();
                }
                continue;
            }
            let n = (FRAME_HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < FRAME_HEADER {
                break;
            }
            self.header_len = 0;
            let length = usize::from(self.header[0]) << 16
                | usize::from(self.header[1]) << 8
                | usize::from(self.header[2]);
            let (kind, flags) = (self.header[3], self.header[4]);
            let stream = u32::from_be_bytes([
                self.header[5],
                self.header[6],
                self.header[7],
                self.header[8],
            ]) & 0x7fff_ffff;
            let opens = kind == HEADERS && stream > self.last_stream;
            if opens {
                self.last_stream = stream;
            }
            if (kind == PING || kind == SETTINGS) && flags & ACK == 0 {
                self.take_token(false);
            } else if opens {
                self.take_token(true);
            }
            self.skip = length;
            if length == 0 {
                self.frame_done();
            }
        }
        Ok(())
    }

    fn frame_done(&mut self) {
        self.frames += 1;
        // The client's first frame is its SETTINGS: the preface is complete.
        self.deadline = None;
        self.establishing = None;
    }

    /// Draws a token for a control frame or a new stream; the bucket empty, the connection is
    /// ending.
    fn take_token(&mut self, new_stream: bool) {
        if self.ending.is_some() {
            return;
        }
        let (bucket, what) = if new_stream {
            (&mut self.new_streams, "new stream")
        } else {
            (&mut self.control_frames, "PING/SETTINGS")
        };
        if !bucket.take() {
            self.refusals.count(Budget::ControlFrames);
            self.ending = Some(Ending::Flood(what, bucket.rate));
        }
    }
}

/// A token bucket of `rate` per second with a burst of `burst` tokens.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    /// `rate` tokens per second, a burst of `burst_secs` seconds' worth.
    fn new(rate: u32, burst_secs: u32) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = rate * f64::from(burst_secs);
        Self {
            tokens: burst,
            refilled: Instant::now(),
            rate,
            burst,
        }
    }

    /// Takes a token; `false` when there is none.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_ending() {
            return this.poll_ending(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.inspect(read)?;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.strikes.max() > 0 {
                    this.strikes.0.reader.register(cx.waker());
                    if this.is_ending() {
                        return this.poll_ending(cx);
                    }
                }
                if let Some((_, evicted)) = this.establishing.as_mut()
                    && evicted.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "no HTTP/2 preface yet, and its place was needed for a new connection",
                    )));
                }
                if let Some(deadline) = this.deadline.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    this.refusals.count(Budget::Handshake);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout; connection closed",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = GuardedInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GuardedInfo {
            conn: self.io.connect_info(),
            strikes: self.strikes.clone(),
        }
    }
}

/// The deadline of a connection accepted at `accepted` with `timeout` for its handshake and
/// preface.
pub fn preface_deadline(accepted: Instant, timeout: Duration) -> Instant {
    accepted + timeout
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        out.extend_from_slice(payload);
        out
    }

    fn guard(
        io: tokio::io::DuplexStream,
        rate: u32,
        timeout: Duration,
    ) -> Guarded<tokio::io::DuplexStream> {
        Guarded::new(
            io,
            GuardSettings {
                preface_deadline: Instant::now() + timeout,
                control_frames_per_sec: rate,
                new_streams_per_sec: rate,
                max_refused_messages: 3,
                refusals: Refusals::new(),
            },
        )
    }

    async fn drain(guarded: &mut Guarded<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0_u8; 4096];
        let mut total = 0;
        loop {
            match guarded.read(&mut buf).await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn r_bad_3_a_connection_without_a_preface_ends_at_the_deadline() {
        let (ours, _peer) = duplex(1024);
        let mut guarded = guard(ours, 20, Duration::from_secs(10));
        let error = drain(&mut guarded).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(guarded.refusals.get(Budget::Handshake), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_preface_in_time_lifts_the_deadline_even_in_small_pieces() {
        let (ours, mut peer) = duplex(1024);
        let mut guarded = guard(ours, 20, Duration::from_secs(10));
        let mut preface = MAGIC.to_vec();
        preface.extend(frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]));
        let writer = tokio::spawn(async move {
            for byte in preface {
                peer.write_all(&[byte]).await.unwrap();
            }
            peer
        });
        let mut buf = [0_u8; 64];
        let mut got = 0;
        while got < 24 + 9 + 6 {
            got += guarded.read(&mut buf).await.unwrap();
        }
        let _peer = writer.await.unwrap();
        assert_eq!(guarded.frames, 1);
        // Long after the deadline, an idle connection is the keepalive's business, not ours.
        tokio::time::advance(Duration::from_secs(60)).await;
        let read = tokio::time::timeout(Duration::from_secs(1), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "the read waits: {read:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn r_bad_3_a_ping_flood_ends_the_connection_but_acks_and_data_do_not_count() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut guarded = guard(ours, 5, Duration::from_secs(10));
        let mut bytes = MAGIC.to_vec();
        bytes.extend(frame(SETTINGS, 0, &[]));
        for _ in 0..1000 {
            bytes.extend(frame(PING, ACK, &[0; 8]));
            bytes.extend(frame(0x0, 0, &[1; 100]));
        }
        peer.write_all(&bytes).await.unwrap();
        let mut buf = vec![0_u8; bytes.len()];
        guarded
            .read_exact(&mut buf)
            .await
            .expect("acks and data pass");

        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.extend(frame(PING, 0, &[0; 8]));
        }
        peer.write_all(&flood).await.unwrap();
        drop(peer);
        let error = drain(&mut guarded).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(error.to_string().contains("flood"), "{error}");
        assert_eq!(guarded.refusals.get(Budget::ControlFrames), 1);
    }

    /// A guarded connection past its preface, with a budget of 3 refused messages.
    async fn established() -> (Guarded<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (ours, mut peer) = duplex(1 << 16);
        let mut guarded = guard(ours, 20, Duration::from_secs(10));
        let mut hello = MAGIC.to_vec();
        hello.extend(frame(SETTINGS, 0, &[]));
        peer.write_all(&hello).await.unwrap();
        let mut buf = vec![0_u8; hello.len()];
        guarded.read_exact(&mut buf).await.unwrap();
        (guarded, peer)
    }

    #[tokio::test(start_paused = true)]
    async fn n_bad_1_the_strike_that_uses_the_budget_wakes_a_waiting_read() {
        let (mut guarded, _peer) = established().await;
        let strikes = guarded.strikes().clone();
        // The read waits for bytes that never come; strikes from elsewhere (a stream's task)
        // wake it once the budget is out, and the connection ends after the grace.
        let reader = tokio::spawn(async move {
            let mut buf = [0_u8; 64];
            let result = guarded.read(&mut buf).await;
            (result, Instant::now())
        });
        tokio::task::yield_now().await;
        assert!(!strikes.strike());
        assert!(!strikes.strike());
        let struck = Instant::now();
        assert!(strikes.strike(), "the third strike uses the budget up");
        assert!(!strikes.strike(), "only once");
        let (result, at) = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("the read was woken")
            .unwrap();
        let error = result.expect_err("the connection ends");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(error.to_string().contains("refused_messages"), "{error}");
        assert_eq!(at - struck, STRUCK_OUT_CLOSE);
    }

    #[tokio::test(start_paused = true)]
    async fn n_bad_1_a_struck_out_connection_reads_nothing_more() {
        let (mut guarded, mut peer) = established().await;
        for _ in 0..3 {
            guarded.strikes().strike();
        }
        peer.write_all(&frame(0x0, 0, &[1; 100])).await.unwrap();
        let mut buf = [0_u8; 256];
        let error = guarded.read(&mut buf).await.expect_err("nothing is read");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(guarded.frames, 1, "the data frame was not read");
    }

    #[test]
    fn a_budget_of_zero_is_no_limit() {
        let strikes = Strikes::new(0);
        for _ in 0..1000 {
            assert!(!strikes.strike());
        }
        assert!(!strikes.is_out());
        assert_eq!(strikes.count(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn n_bad_1_a_flood_of_new_streams_ends_the_connection_but_frames_of_open_ones_do_not() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut guarded = guard(ours, 5, Duration::from_secs(10));
        let mut bytes = MAGIC.to_vec();
        bytes.extend(frame(SETTINGS, 0, &[]));
        // One stream opened, then many HEADERS on it (as trailers would be): one token.
        let on = |kind: u8, stream: u8, payload: &[u8]| {
            let mut f = frame(kind, 0, payload);
            f[8] = stream;
            f
        };
        for _ in 0..500 {
            bytes.extend(on(HEADERS, 1, &[0; 10]));
        }
        peer.write_all(&bytes).await.unwrap();
        let mut buf = vec![0_u8; bytes.len()];
        guarded
            .read_exact(&mut buf)
            .await
            .expect("one stream's frames pass");
        assert_eq!(guarded.refusals.get(Budget::ControlFrames), 0);

        // New streams, one after the other: the burst (10) passes, then the connection ends.
        let mut flood = Vec::new();
        for stream in (3..=201_u8).step_by(2) {
            flood.extend(on(HEADERS, stream, &[0; 10]));
        }
        peer.write_all(&flood).await.unwrap();
        let error = drain(&mut guarded).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(error.to_string().contains("new stream flood"), "{error}");
        assert_eq!(guarded.refusals.get(Budget::ControlFrames), 1);
    }

    #[tokio::test]
    async fn a_wrong_preface_is_refused() {
        let (ours, mut peer) = duplex(1024);
        let mut guarded = guard(ours, 5, Duration::from_secs(10));
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let error = drain(&mut guarded).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
