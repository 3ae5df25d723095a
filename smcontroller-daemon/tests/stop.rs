//! Stopping the daemon's server leaves no connection behind (R-STOP-1), also for peers that
//! keep their connections open and send nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use smcontroller_daemon::{
    app::{self, NoBlobStore},
    config::Settings,
    receivers::Recorder,
};
use tokio::{io::AsyncReadExt, net::TcpStream};

#[tokio::test]
async fn r_stop_1_stop_closes_connections_whose_peers_keep_them_open() {
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        insecure: true,
        ..Settings::default()
    };
    let running = app::start(&settings, Recorder::default(), Arc::new(NoBlobStore))
        .await
        .expect("the server starts");
    // Three peers that connect and then say nothing, not even the HTTP/2 preface.
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(TcpStream::connect(running.addr).await.unwrap());
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), running.stop())
        .await
        .expect("stop returns")
        .expect("stop succeeds");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    // Each peer sees its connection closed: the server holds nothing for it any more.
    for mut peer in peers {
        let mut buf = [0_u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match peer.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // what the server wrote before closing (settings, GOAWAY)
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection was left open after the stop");
    }
}
