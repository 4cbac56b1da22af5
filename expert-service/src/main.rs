//! `moge-expert`: hosts one expert group, or the shared expert, of one or
//! more layers and serves `moge.v1.ExpertGroup` over gRPC.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use moge_shared::checkpoint::Checkpoint;
use moge_shared::service::{ServeOptions, init_tracing, serve_grpc};
use moge_shared::weights::WeightFormat;

use moge_expert::{ExpertService, Hosted, routes};

#[derive(Parser)]
#[command(version, about = "Host one MoGE expert group, or the shared expert, over gRPC")]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
    /// Checkpoint directory (Hugging Face layout); only this process's experts are read.
    #[arg(long, env = "MOGE_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Layers to host, comma-separated; default: every layer in the checkpoint.
    #[arg(long, env = "MOGE_LAYERS", value_delimiter = ',')]
    layers: Vec<usize>,
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
    if layers.is_empty() {
        bail!("checkpoint {} contains no layer tensors", args.checkpoint.display());
    }
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
    let service = ExpertService::load(&checkpoint, &layers, hosted, args.weights, pool, args.replica.clone())?;
    tracing::info!(
        checkpoint = %args.checkpoint.display(),
        layers = ?layers,
        hosted = %hosted,
        weights = ?args.weights,
        weight_bytes = service.weight_bytes(),
        compute_threads = service.compute_threads(),
        seconds = started.elapsed().as_secs_f64(),
        peak_rss_bytes = moge_shared::memory::peak_rss_bytes(),
        "expert weights loaded"
    );

    let routes = routes(service, args.max_message_bytes);
    let options = ServeOptions {
        address: SocketAddr::new(args.host, args.grpc_port),
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
    };
    serve_grpc(options, routes, moge_expert::SERVICE_NAME).await?;
    Ok(())
}
