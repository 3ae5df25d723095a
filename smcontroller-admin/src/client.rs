//! Connecting to the admin API: a tonic channel over the daemon's Unix socket or to its
//! loopback TCP port.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{proto::v1::admin_service_client::AdminServiceClient, server::AdminEndpoint};

/// The admin client.
pub type AdminClient = AdminServiceClient<Channel>;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin endpoint cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the admin API at {endpoint}: {source}{hint}")]
pub struct ConnectError {
    /// Where it was looked for.
    pub endpoint: AdminEndpoint,
    /// What failed.
    #[source]
    pub source: tonic::transport::Error,
    hint: &'static str,
}

/// Connects to the admin API at `endpoint`.
pub async fn connect(endpoint: &AdminEndpoint) -> Result<AdminClient, ConnectError> {
    let fail = |source, hint| ConnectError {
        endpoint: endpoint.clone(),
        source,
        hint,
    };
    let channel = match endpoint {
        AdminEndpoint::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| fail(e, ""))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| fail(e, " (is smcontrollerd running with adminListen set?)"))?,
        AdminEndpoint::Unix(path) => {
            let path = path.clone();
            // The URI is not used: the connector ignores it and dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| {
                    fail(
                        e,
                        " (is smcontrollerd running? give its socket with --admin or SMCTL_ADMIN)",
                    )
                })?
        }
    };
    Ok(AdminServiceClient::new(channel))
}
