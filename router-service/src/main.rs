//! `moge-router`: serves the routing of batches of one or more layers over
//! gRPC (`moge.v1.Router`), with health checking and server reflection.

mod service;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moge_shared::RoutingMode;
use moge_shared::checkpoint::Checkpoint;
use moge_shared::proto::moge::v1::host_server::HostServer;
use moge_shared::proto::moge::v1::router_server::RouterServer;
use moge_shared::service::{init_tracing, shutdown_signal};
use tokio_stream::wrappers::TcpListenerStream;

use crate::service::RouterService;

#[derive(Parser)]
#[command(version, about = "Route batches of hidden states to MoGE expert groups over gRPC")]
struct Args {
    /// Checkpoint directory (Hugging Face layout); only router tensors are read.
    #[arg(long, env = "MOGE_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Layers to serve, comma-separated; default: every layer in the checkpoint.
    #[arg(long, env = "MOGE_LAYERS", value_delimiter = ',')]
    layers: Vec<usize>,
    /// Routing mode for requests that do not choose one: moge, top-k or group-limited.
    #[arg(long, env = "MOGE_ROUTING", default_value = "moge")]
    routing: RoutingMode,
    /// Address to listen on.
    #[arg(long, env = "MOGE_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// gRPC port; 0 picks a free port, which the "listening" log line reports.
    #[arg(long, env = "MOGE_GRPC_PORT", default_value_t = 8001)]
    grpc_port: u16,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "MOGE_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    max_message_bytes: usize,
    /// Replica name reported by `moge.v1.Host/Describe`, for example the pod name.
    #[arg(long, env = "MOGE_REPLICA", default_value = "")]
    replica: String,
    /// Seconds that in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "MOGE_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    drain_timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let checkpoint = Checkpoint::open(&args.checkpoint)
        .with_context(|| format!("failed to open checkpoint {}", args.checkpoint.display()))?;
    let layers = if args.layers.is_empty() {
        checkpoint.layers()
    } else {
        args.layers.clone()
    };
    let service = RouterService::load(&checkpoint, &layers, args.routing, args.replica.clone())?;
    tracing::info!(
        checkpoint = %args.checkpoint.display(),
        layers = ?layers,
        routing = %args.routing,
        experts = checkpoint.config().num_experts,
        groups = checkpoint.config().num_groups(),
        top_k = checkpoint.config().num_experts_per_tok,
        max_message_bytes = args.max_message_bytes,
        "router weights loaded"
    );

    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.grpc_port))
        .await
        .with_context(|| format!("failed to listen on {}:{}", args.host, args.grpc_port))?;
    let address = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RouterServer<RouterService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moge_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("failed to build the reflection service")?;
    let router = RouterServer::new(service.clone())
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(HostServer::new(service))
            .add_service(router)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    tracing::info!(%address, "listening");

    let signal = shutdown_signal().await;
    tracing::info!(
        signal,
        "shutting down: health is NOT_SERVING, draining in-flight requests"
    );
    health.set_not_serving::<RouterServer<RouterService>>().await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(args.drain_timeout_seconds), server).await {
        Ok(result) => result.context("server task failed")?.context("server failed")?,
        Err(_) => tracing::warn!(
            drain_timeout_seconds = args.drain_timeout_seconds,
            "drain overran its timeout; exiting with requests in flight"
        ),
    }
    tracing::info!("stopped");
    Ok(())
}
