//! `moge-router`: serves the routing of batches of one or more layers over
//! gRPC (`moge.v1.Router`), with health checking and server reflection.

use std::path::PathBuf;

use clap::Parser;
use moge_shared::RoutingMode;
use moge_shared::service::serve_grpc;
use moge_shared::settings::{ModelArgs, ServerArgs};
use moge_telemetry::{RpcLayer, Telemetry, TelemetryArgs};
use opentelemetry::KeyValue;

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
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    moge_telemetry::exit::exit_status(run().await)
}

async fn run() -> anyhow::Result<()> {
    let args = moge_shared::settings::parse::<Args>();
    let telemetry = Telemetry::start("moge-router", &args.telemetry, args.server.host, args.server.instance()).await?;
    let tls = args.server.grpc_tls("moge-router")?;
    let listener = args.server.bind().await?;
    let replica = args.server.replica_name(listener.local_addr()?);
    let (checkpoint, layers) = args.model.open()?;
    let service = RouterService::load(&checkpoint, &layers, args.routing, replica.clone())?;
    tracing::info!(
        checkpoint = %args.model.checkpoint.display(),
        layers = ?layers,
        routing = %args.routing,
        experts = checkpoint.config().num_experts,
        groups = checkpoint.config().num_groups(),
        top_k = checkpoint.config().num_experts_per_tok,
        max_message_bytes = args.server.max_message_bytes,
        replica = %replica,
        weight_bytes = service.weight_bytes(),
        peak_rss_bytes = moge_shared::memory::peak_rss_bytes(),
        "router weights loaded"
    );

    let routes = routes(service, args.server.max_message_bytes);
    let rpc = RpcLayer::new(vec![KeyValue::new("replica", replica)]);
    let served = serve_grpc(
        listener,
        args.server.drain_timeout(),
        routes,
        moge_router::SERVICE_NAME,
        rpc,
        tls,
    )
    .await;
    telemetry.shutdown();
    served?;
    Ok(())
}
