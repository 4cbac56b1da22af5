//! `moge-router`: serves the routing of batches of one or more layers over
//! gRPC (`moge.v1.Router`), with health checking and server reflection.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moge_shared::RoutingMode;
use moge_shared::checkpoint::Checkpoint;
use moge_shared::service::{ServeOptions, init_tracing, serve_grpc};

use moge_router::{RouterService, routes};

#[derive(Parser)]
#[command(version, about = "Route batches of hidden states to MoGE expert groups over gRPC")]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
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
    let args = moge_shared::settings::parse::<Args>();
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

    let routes = routes(service, args.max_message_bytes);
    let options = ServeOptions {
        address: SocketAddr::new(args.host, args.grpc_port),
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
    };
    serve_grpc(options, routes, moge_router::SERVICE_NAME).await?;
    Ok(())
}
