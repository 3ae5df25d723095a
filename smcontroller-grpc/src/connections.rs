//! The SM connections a server holds: counted while open, and closed for good when a stop's
//! grace runs out, so that no connection task outlives the server (R-STOP-1).
//!
//! tonic serves each accepted connection on a task of its own and, on shutdown, only asks
//! each connection to close (HTTP/2 GOAWAY) and waits. A peer that keeps its connection open,
//! or stops reading, would keep that task alive. Every accepted socket is therefore wrapped in
//! a [`Tracked`] that fails its reads and writes once [`Connections::close_all`] is called,
//! which ends the connection task at its next poll; the wrapper wakes that task itself.

use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// The open connections of one server. Cheap to clone; clones are one set.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    kill: CancellationToken,
    /// Per epoch (the credentials generation a TLS connection was accepted with), a child of
    /// `kill`: closing an epoch closes only its connections.
    epochs: Mutex<Epochs>,
    live: AtomicUsize,
    gone: Notify,
}

#[derive(Debug, Default)]
struct Epochs {
    /// Epochs below this one are closed, also for connections that come late.
    floor: u64,
    tokens: BTreeMap<u64, CancellationToken>,
}

impl Connections {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many connections are open.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Closes every connection now, and every one accepted from now on: reads and writes fail
    /// with `ConnectionAborted`.
    pub fn close_all(&self) {
        self.shared.kill.cancel();
    }

    /// Resolves once no connection is open.
    pub async fn closed(&self) {
        loop {
            let gone = self.shared.gone.notified();
            if self.live() == 0 {
                return;
            }
            gone.await;
        }
    }

    /// Closes the connections of every epoch before `epoch` (those accepted with older
    /// credentials), and only those.
    pub fn close_before(&self, epoch: u64) {
        let mut epochs = self
            .shared
            .epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        epochs.floor = epochs.floor.max(epoch);
        let newer = epochs.tokens.split_off(&epoch);
        for token in std::mem::replace(&mut epochs.tokens, newer).into_values() {
            token.cancel();
        }
    }

    /// Wraps an accepted socket so that it counts and can be closed.
    pub fn track<IO>(&self, io: IO) -> Tracked<IO> {
        self.track_in(io, 0)
    }

    /// Wraps an accepted socket of `epoch` (see [`close_before`](Self::close_before)).
    pub fn track_in<IO>(&self, io: IO, epoch: u64) -> Tracked<IO> {
        let token = {
            let mut epochs = self
                .shared
                .epochs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if epoch < epochs.floor {
                // Accepted with credentials already replaced: closed at once.
                let token = CancellationToken::new();
                token.cancel();
                token
            } else {
                epochs
                    .tokens
                    .entry(epoch)
                    .or_insert_with(|| self.shared.kill.child_token())
                    .clone()
            }
        };
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        Tracked {
            io,
            killed: Box::pin(token.cancelled_owned()),
            shared: self.shared.clone(),
        }
    }
}

/// An accepted socket of a [`Connections`] set.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    shared: Arc<Shared>,
}

impl<IO> Tracked<IO> {
    /// `Err` once the set was closed; registers the task to be woken when it is.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the SM controller's server has stopped",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        if self.shared.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.gone.notify_waiters();
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn r_stop_1_close_all_wakes_a_parked_reader_and_the_count_returns_to_zero() {
        let connections = Connections::new();
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut tracked = connections.track(ours);
        assert_eq!(connections.live(), 1);
        let reader = tokio::spawn(async move {
            let mut buf = [0_u8; 8];
            let result = tracked.read(&mut buf).await;
            drop(tracked);
            result
        });
        // The peer stays and sends nothing: the reader is parked until the close wakes it.
        tokio::task::yield_now().await;
        connections.close_all();
        let wait = Duration::from_secs(5);
        let read = tokio::time::timeout(wait, reader).await.unwrap().unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        tokio::time::timeout(wait, connections.closed())
            .await
            .expect("every connection dropped");
        assert_eq!(connections.live(), 0);
    }

    #[tokio::test]
    async fn r_tls_3_closing_an_epoch_closes_only_the_older_connections() {
        let connections = Connections::new();
        let (old, _a) = tokio::io::duplex(64);
        let (new, _b) = tokio::io::duplex(64);
        let mut old = connections.track_in(old, 0);
        let mut new = connections.track_in(new, 1);
        connections.close_before(1);
        let error = old.write_all(b"x").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        new.write_all(b"x")
            .await
            .expect("a newer connection stays open");
    }

    #[tokio::test]
    async fn a_closed_set_refuses_io_on_new_connections() {
        let connections = Connections::new();
        connections.close_all();
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut tracked = connections.track(ours);
        let error = tracked.write_all(b"x").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    }
}
