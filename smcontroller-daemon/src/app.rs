//! Wiring: the router and the gRPC server from [`Settings`], started and stopped as one.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use smcontroller_api::{Error, ItemInfoProvider};
use smcontroller_grpc::{
    connections::Connections,
    server::{self, ServeError, ServerSettings},
};
use smcontroller_routing::{Controller, Receivers};
use tokio::{sync::watch, task::JoinHandle};
use tracing::warn;

use crate::{config::Settings, receivers::Recorder};

/// How long [`Running::stop`] lets the server finish its connections after the router has
/// closed every stream.
const SERVER_STOP_GRACE: Duration = Duration::from_millis(300);

/// The Aos error kind "not found" (`eNotFound`).
const AOS_NOT_FOUND: i32 = 5;

/// The router's settings from the daemon's.
pub fn router_settings(settings: &Settings) -> smcontroller_routing::Settings {
    smcontroller_routing::Settings {
        response_timeout: settings.response_timeout,
        reply_expiry: settings.reply_expiry,
        registration_timeout: settings.registration_timeout,
        queue_bound: settings.queue_bound,
        ..smcontroller_routing::Settings::default()
    }
}

/// The gRPC server's settings from the daemon's.
pub fn server_settings(settings: &Settings) -> ServerSettings {
    ServerSettings {
        max_message_size: settings.max_message_size,
        keepalive_interval: settings.keepalive_interval,
        keepalive_timeout: settings.keepalive_timeout,
        flow_window: settings.flow_window,
    }
}

/// The daemon's blob resolver while no CM item store is wired in: every digest is unknown,
/// so `GetBlobsInfos` answers `NOT_FOUND` naming it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBlobStore;

#[async_trait]
impl ItemInfoProvider for NoBlobStore {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        Err(Error::Failed {
            aos_code: AOS_NOT_FOUND,
            exit_code: 0,
            message: format!("no blob store is configured in this daemon; cannot resolve {digest}"),
        })
    }
}

/// A serving controller.
#[derive(Debug)]
pub struct Running {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The router: call the provided traits on it.
    pub controller: Controller,
    /// What the receivers recorded.
    pub recorder: Recorder,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServeError>>,
    connections: Connections,
}

/// Binds `settings.listen` and serves. Insecure (plain HTTP/2) only, for now: mTLS arrives
/// with `smcontroller-certs`.
pub async fn start(
    settings: &Settings,
    recorder: Recorder,
    items: Arc<dyn ItemInfoProvider>,
) -> Result<Running, ServeError> {
    let controller = Controller::new(
        router_settings(settings),
        Receivers::all(Arc::new(recorder.clone())),
    );
    let listener = server::bind(settings.listen).await?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.listen,
        source,
    })?;
    let (stop, mut stopped) = watch::channel(false);
    let connections = Connections::new();
    let server = tokio::spawn(server::serve_insecure_with(
        listener,
        controller.clone(),
        items,
        server_settings(settings),
        connections.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    Ok(Running {
        addr,
        controller,
        recorder,
        stop,
        server,
        connections,
    })
}

impl Running {
    /// Stops listening, closes every SM stream (each disconnect is reported) and returns once
    /// everything has ended: about half a second at most (R-STOP-1).
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        let mut server = self.server;
        let result = match tokio::time::timeout(SERVER_STOP_GRACE, &mut server).await {
            Ok(result) => result,
            Err(_) => {
                // Peers that keep their connections open: close them for good, so that no
                // connection task outlives the stop (R-STOP-1).
                warn!(
                    connections = self.connections.live(),
                    "connections still open after the stop grace; closing them"
                );
                self.connections.close_all();
                match tokio::time::timeout(SERVER_STOP_GRACE, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        if tokio::time::timeout(SERVER_STOP_GRACE, self.connections.closed())
            .await
            .is_err()
        {
            warn!(
                connections = self.connections.live(),
                "connections still open after the stop"
            );
        }
        match result {
            Ok(result) => result,
            Err(join) => {
                warn!(error = %join, "server task failed");
                Ok(())
            }
        }
    }
}
