//! Process plumbing every service binary shares: logging set-up and the
//! shutdown signal.

use std::io::IsTerminal;

/// Installs the `tracing` subscriber: human-readable lines on standard
/// error, filtered by `RUST_LOG` (default `info`), coloured only on a
/// terminal.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call, as in tests that start several services, keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

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

/// Listening address and drain timeout of a gRPC service.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to bind; port 0 picks a free port.
    pub address: std::net::SocketAddr,
    /// Time in-flight requests get to finish after the shutdown signal.
    pub drain_timeout: std::time::Duration,
}

/// A failure to start or run a gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("failed to listen on {address}: {source}")]
    Bind {
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

/// Binds a TCP listener for a gRPC service.
pub async fn bind(address: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Bind { address, source })
}

/// Serves `routes` plus `grpc.health.v1` and server reflection until
/// SIGTERM or SIGINT; see [`serve_grpc_until`].
pub async fn serve_grpc(
    options: ServeOptions,
    routes: tonic::service::Routes,
    service_name: &str,
) -> Result<(), ServeError> {
    let listener = bind(options.address).await?;
    serve_grpc_until(listener, options.drain_timeout, routes, service_name, shutdown_signal()).await
}

/// Serves `routes` plus `grpc.health.v1` and server reflection on
/// `listener` until `shutdown` completes, then marks `service_name`
/// NOT_SERVING, stops accepting connections and waits up to `drain_timeout`
/// for in-flight requests.
///
/// Logs "listening" with the bound `address` once serving starts.
pub async fn serve_grpc_until(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), ServeError> {
    use tonic_health::ServingStatus;

    let address = listener.local_addr().map_err(|source| ServeError::Bind {
        address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(service_name, ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health_service).add_service(reflection);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    tracing::info!(%address, service = service_name, "listening");

    let signal = shutdown.await;
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
