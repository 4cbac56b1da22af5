//! Serving of the HTTP/JSON front, over plain TCP or over TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use moge_shared::tls::TlsIncoming;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// TLS connections for `axum::serve`, handshaken in the background.
struct HttpsListener(TlsIncoming);

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.accept().await {
            Some(connection) => connection,
            // The accept task stops only once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

/// Serves `routes` on `listener`, over TLS when `tls` is given, until
/// SIGTERM or SIGINT; then lets open requests finish.
pub async fn serve(listener: TcpListener, routes: axum::Router, tls: Option<Arc<ServerConfig>>) {
    let address = match listener.local_addr() {
        Ok(address) => address,
        Err(error) => {
            tracing::error!(%error, "HTTP listener has no local address; HTTP is not served");
            return;
        }
    };
    let shutdown = async {
        moge_shared::service::shutdown_signal().await;
    };
    tracing::info!(%address, service = "kserve-http", tls = tls.is_some(), "listening");
    let served = match tls {
        None => {
            use axum::serve::ListenerExt;
            // Without TCP_NODELAY, small responses wait for the peer's delayed acknowledgement.
            let listener = listener.tap_io(|stream| {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::warn!(%error, "failed to set TCP_NODELAY on an HTTP connection");
                }
            });
            axum::serve(listener, routes).with_graceful_shutdown(shutdown).await
        }
        Some(config) => match TlsIncoming::new(listener, config) {
            Ok(incoming) => {
                axum::serve(HttpsListener(incoming), routes)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Err(error) => Err(error),
        },
    };
    if let Err(error) = served {
        tracing::error!(%error, "HTTP server failed");
    }
    tracing::info!(service = "kserve-http", "stopped");
}
