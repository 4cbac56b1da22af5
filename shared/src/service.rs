//! Process plumbing every service binary shares: the shutdown signal and
//! gRPC serving with health checking, reflection, call telemetry and a
//! bounded drain.

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

/// Serves `routes` on `listener` until SIGTERM or SIGINT; see
/// [`serve_grpc_until`].
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
) -> Result<(), ServeError> {
    serve_grpc_until(listener, drain_timeout, routes, service_name, rpc, shutdown_signal()).await
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
    ready: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServeError> {
    serve(
        listener,
        drain_timeout,
        routes,
        service_name,
        rpc,
        shutdown_signal(),
        Some(ready),
    )
    .await
}

/// Serves `routes` plus `grpc.health.v1` and server reflection on
/// `listener` until `shutdown` completes, then marks `service_name`
/// NOT_SERVING, stops accepting connections and waits up to `drain_timeout`
/// for in-flight requests. `rpc` adds a span and a duration point per call.
///
/// Logs "listening" with the bound `address` once serving starts.
pub async fn serve_grpc_until(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), ServeError> {
    serve(listener, drain_timeout, routes, service_name, rpc, shutdown, None).await
}

/// Serves as [`serve_grpc_until`] does; with `ready`, the health of
/// `service_name` follows it until shutdown.
async fn serve(
    listener: tokio::net::TcpListener,
    drain_timeout: std::time::Duration,
    routes: tonic::service::Routes,
    service_name: &str,
    rpc: moge_telemetry::RpcLayer,
    shutdown: impl std::future::Future<Output = &'static str>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<(), ServeError> {
    use tonic_health::ServingStatus;

    let address = listener.local_addr().map_err(|source| ServeError::Bind {
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
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(rpc)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    tracing::info!(%address, service = service_name, "listening");

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
