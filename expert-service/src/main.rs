//! `moge-expert`: hosts one expert group, or the shared expert, of one or
//! more layers and serves `moge.v1.ExpertGroup` over gRPC.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use moge_shared::service::{init_tracing, serve_grpc};
use moge_shared::settings::{ModelArgs, ServerArgs};
use moge_shared::weights::WeightFormat;

use moge_expert::{ExpertService, Hosted, routes};

#[derive(Parser)]
#[command(version, about = "Host one MoGE expert group, or the shared expert, over gRPC")]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Expert group to host, 0..M.
    #[arg(
        long,
        env = "MOGE_GROUP",
        conflicts_with = "shared_expert",
        required_unless_present = "shared_expert"
    )]
    group: Option<usize>,
    /// Host the shared expert instead of a group.
    #[arg(long, env = "MOGE_SHARED_EXPERT")]
    shared_expert: bool,
    /// Storage of expert weights: stored (checkpoint dtype, mapped) or f32.
    #[arg(long, env = "MOGE_WEIGHTS", default_value = "stored")]
    weights: WeightFormat,
    /// Compute threads; 0 uses every core.
    #[arg(long, env = "MOGE_COMPUTE_THREADS", default_value_t = 0)]
    compute_threads: usize,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = moge_shared::settings::parse::<Args>();
    let (checkpoint, layers) = args.model.open()?;
    let hosted = match args.group {
        Some(group) => Hosted::Group(group),
        None => Hosted::SharedExpert,
    };
    let pool = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.compute_threads)
            .thread_name(|index| format!("moge-compute-{index}"))
            .build()
            .context("failed to start the compute thread pool")?,
    );
    let started = std::time::Instant::now();
    let service = ExpertService::load(
        &checkpoint,
        &layers,
        hosted,
        args.weights,
        pool,
        args.server.replica.clone(),
    )?;
    tracing::info!(
        checkpoint = %args.model.checkpoint.display(),
        layers = ?layers,
        hosted = %hosted,
        weights = ?args.weights,
        weight_bytes = service.weight_bytes(),
        compute_threads = service.compute_threads(),
        seconds = started.elapsed().as_secs_f64(),
        peak_rss_bytes = moge_shared::memory::peak_rss_bytes(),
        "expert weights loaded"
    );

    let routes = routes(service, args.server.max_message_bytes);
    let options = args.server.serve_options();
    serve_grpc(options, routes, moge_expert::SERVICE_NAME).await?;
    Ok(())
}
