//! Process plumbing every service binary shares: the shutdown signal and
//! gRPC serving with health checking, reflection, call telemetry and a
//! bounded drain.

use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;

/// Completes on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C) and
/// returns the signal's name.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("failed to install signal handlers; the service stops only when killed");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// HTTP/2 flow-control window of one gRPC call, in bytes. The protocol's
/// default of 64 KiB makes a megabyte-sized tensor wait for several window
/// updates, one round trip each.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 flow-control window of one connection, shared by its calls.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// A failure to start or run a gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("{setting}: failed to listen on {address}: {source}; choose another port, or 0 for any free one")]
    Bind {
        /// The flag that set the port, or what chose it.
        setting: &'static str,
        /// Address requested.
        address: std::net::SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptors.
    #[error("failed to build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server stopped with an error.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds a TCP listener for a service on the port that `setting` (a flag
/// such as `--grpc-port`) chose; errors name the setting.
pub async fn bind(address: std::net::SocketAddr, setting: &'static str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Bind {
            setting,
            address,
            source,
        })
}

/// Serves `routes` on `listener` until SIGTERM or SIGINT; see
/// [`serve_grpc_until`].
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
    tls: Option<Arc<ServerConfig>>,
) -> Result<(), ServeError> {
    serve_grpc_until(
        listener,
        drain_timeout,
        routes,
        service_name,
        rpc,
        tls,
        shutdown_signal(),
    )
    .await
}

/// Like [`serve_grpc`], but the health of `service_name` follows `ready`:
/// SERVING while it is true, NOT_SERVING while false, and NOT_SERVING from
/// SIGTERM on. The overall service `""` stays SERVING until shutdown, so a
/// liveness probe does not restart a process that waits for its upstreams.
pub async fn serve_grpc_with_readiness(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
    tls: Option<Arc<ServerConfig>>,
    ready: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let options = Options {
        drain_timeout,
        service_name,
        rpc,
        tls,
        ready: Some(ready),
    };
    serve(listener, routes, options, shutdown_signal()).await
}

/// Serves `routes` plus `grpc.health.v1` and server reflection on
/// `listener` until `shutdown` completes, then marks `service_name`
/// NOT_SERVING, stops accepting connections and waits up to `drain_timeout`
/// for in-flight requests. `rpc` adds a span and a duration point per call.
/// With `tls` (see [`crate::tls::TlsArgs::server_config`]) every
/// connection must complete a TLS handshake first.
///
/// Logs "listening" with the bound `address` once serving starts.
pub async fn serve_grpc_until(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), ServeError> {
    let options = Options {
        drain_timeout,
        service_name,
        rpc,
        tls,
        ready: None,
    };
    serve(listener, routes, options, shutdown).await
}

/// Settings of [`serve`] besides the routes.
struct Options<'a> {
    drain_timeout: std::time::Duration,
    service_name: &'a str,
    rpc: moge_telemetry::RpcLayer,
    tls: Option<Arc<ServerConfig>>,
    /// When set, the health of `service_name` follows it until shutdown.
    ready: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Serves as [`serve_grpc_until`] describes.
async fn serve(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    options: Options<'_>,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), ServeError> {
    let Options {
        drain_timeout,
        service_name,
        rpc,
        tls,
        ready,
    } = options;
    use tonic_health::ServingStatus;

    let address = listener.local_addr().map_err(|source| ServeError::Bind {
        setting: "--grpc-port",
        address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let status_of = |ready: bool| {
        if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let follower = match ready {
        None => {
            health.set_service_status(service_name, ServingStatus::Serving).await;
            None
        }
        Some(mut ready) => {
            let initial = *ready.borrow_and_update();
            health.set_service_status(service_name, status_of(initial)).await;
            let health = health.clone();
            let name = service_name.to_owned();
            Some(tokio::spawn(async move {
                while ready.changed().await.is_ok() {
                    let now = *ready.borrow_and_update();
                    tracing::info!(service = %name, ready = now, "health status follows readiness");
                    health.set_service_status(&name, status_of(now)).await;
                }
            }))
        }
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health_service).add_service(reflection);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async {
        let _ = stopped.await;
    };
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .layer(rpc)
        .add_routes(routes);
    let tls_enabled = tls.is_some();
    let server = match tls {
        None => {
            // Without TCP_NODELAY, small responses wait for the peer's delayed
            // acknowledgement: about 40 ms per call on Linux.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped))
        }
        Some(config) => {
            let incoming = crate::tls::TlsIncoming::new(listener, config).map_err(|source| ServeError::Bind {
                setting: "--grpc-port",
                address,
                source,
            })?;
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    tracing::info!(%address, service = service_name, tls = tls_enabled, "listening");

    let signal = shutdown.await;
    if let Some(follower) = follower {
        follower.abort();
    }
    tracing::info!(
        signal,
        service = service_name,
        "shutting down: health is NOT_SERVING, draining in-flight requests"
    );
    health.set_service_status(service_name, ServingStatus::NotServing).await;
    let _ = stop.send(());
    match tokio::time::timeout(drain_timeout, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(error)) => tracing::error!(%error, "server task panicked"),
        Err(_) => tracing::warn!(
            drain_timeout_seconds = drain_timeout.as_secs_f64(),
            service = service_name,
            "drain overran its timeout; exiting with requests in flight"
        ),
    }
    tracing::info!(service = service_name, "stopped");
    Ok(())
}
