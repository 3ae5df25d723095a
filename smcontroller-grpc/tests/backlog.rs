//! The SM port's listen backlog (issue 18): connections that arrive at once while the server is
//! not accepting wait in the kernel's accept queue, all of them, none refused, dropped or reset.
//!
//! With tokio's `TcpListener::bind` (a backlog of 128) this fails: beyond 128 queued
//! connections the kernel drops the handshakes' SYNs and final ACKs (`TcpExtListenOverflows`),
//! the queue never holds them all, and clients whose half-open connection the kernel gives up
//! on are reset.

#![cfg(target_os = "linux")]

use std::{collections::HashSet, io, net::SocketAddr, time::Duration};

use smcontroller_grpc::server;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
    time::{Instant, timeout_at},
};

/// Clients that connect at once: four times tokio's default backlog, the bench's number of
/// connection attempts in flight.
const CONNECTIONS: usize = 512;

/// The longest the whole test may take.
const WAIT: Duration = Duration::from_secs(20);

/// The length of `port`'s accept queue on 127.0.0.1, as `/proc/net/tcp` shows it (the
/// `rx_queue` of a listening socket is the count of connections waiting to be accepted).
fn accept_queue(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue.
        if fields.get(1) != Some(&local.as_str()) || fields.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        usize::from_str_radix(rx, 16).ok()
    })
}

/// One client: connects, sends its index, and waits for the server's answer (one byte).
async fn client(
    addr: SocketAddr,
    index: u32,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&index.to_be_bytes()).await?;
    let _ = go.wait_for(|go| *go).await;
    let mut answer = [0_u8; 1];
    stream.read_exact(&mut answer).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_arriving_at_once_all_wait_in_the_accept_queue() {
    let effective = server::effective_backlog(server::DEFAULT_LISTEN_BACKLOG);
    if (effective as usize) < CONNECTIONS {
        eprintln!("skipped: net.core.somaxconn caps the backlog at {effective} < {CONNECTIONS}");
        return;
    }
    let deadline = Instant::now() + WAIT;
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, ready) = tokio::sync::watch::channel(false);

    // Every client connects and sends its index while nothing accepts.
    let mut clients = JoinSet::new();
    for index in 0..CONNECTIONS as u32 {
        clients.spawn(client(addr, index, ready.clone()));
    }
    // The accept queue holds them all at once.
    loop {
        let queued = accept_queue(addr.port()).expect("the listener in /proc/net/tcp");
        if queued == CONNECTIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{queued} of {CONNECTIONS} connections in the accept queue after {WAIT:?}"
        );
        // The queue is kernel state with nothing to wait on: polled, under the deadline above.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Accepted now, each one has its client's index and answers it.
    let _ = go.send(true);
    let mut seen = HashSet::new();
    let mut accepted = Vec::new();
    while seen.len() < CONNECTIONS {
        let (mut stream, _) = timeout_at(deadline, listener.accept())
            .await
            .expect("every connection accepted in time")
            .unwrap();
        let mut index = [0_u8; 4];
        timeout_at(deadline, stream.read_exact(&mut index))
            .await
            .expect("its index in time")
            .expect("its index");
        assert!(
            seen.insert(u32::from_be_bytes(index)),
            "one connection per client"
        );
        stream.write_all(b"k").await.unwrap();
        accepted.push(stream);
    }
    // No client was refused or reset.
    while let Some(done) = timeout_at(deadline, clients.join_next())
        .await
        .expect("every client done in time")
    {
        done.unwrap().expect("a client neither refused nor reset");
    }
    assert_eq!(accept_queue(addr.port()), Some(0));
}
