//! `moge-router`: serves the routing of batches of one or more layers over
//! gRPC (`moge.v1.Router`), with health checking and server reflection.

use std::path::PathBuf;

use clap::Parser;
use moge_shared::RoutingMode;
use moge_shared::service::{init_tracing, serve_grpc};
use moge_shared::settings::{ModelArgs, ServerArgs};

use moge_router::{RouterService, routes};

#[derive(Parser)]
#[command(version, about = "Route batches of hidden states to MoGE expert groups over gRPC")]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Routing mode for requests that do not choose one: moge, top-k or group-limited.
    #[arg(long, env = "MOGE_ROUTING", default_value = "moge")]
    routing: RoutingMode,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = moge_shared::settings::parse::<Args>();
    let (checkpoint, layers) = args.model.open()?;
    let service = RouterService::load(&checkpoint, &layers, args.routing, args.server.replica.clone())?;
    tracing::info!(
        checkpoint = %args.model.checkpoint.display(),
        layers = ?layers,
        routing = %args.routing,
        experts = checkpoint.config().num_experts,
        groups = checkpoint.config().num_groups(),
        top_k = checkpoint.config().num_experts_per_tok,
        max_message_bytes = args.server.max_message_bytes,
        "router weights loaded"
    );

    let routes = routes(service, args.server.max_message_bytes);
    let options = args.server.serve_options();
    serve_grpc(options, routes, moge_router::SERVICE_NAME).await?;
    Ok(())
}
