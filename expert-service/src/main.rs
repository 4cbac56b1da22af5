//! `moge-expert`: hosts one expert group, or the shared expert, of one or
//! more layers and serves `moge.v1.ExpertGroup` over gRPC.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use moge_shared::service::serve_grpc;
use moge_shared::settings::{ModelArgs, ServerArgs};
use moge_shared::weights::WeightFormat;
use moge_telemetry::{RpcLayer, Telemetry, TelemetryArgs};
use opentelemetry::KeyValue;

use moge_expert::{ExpertOptions, ExpertService, Hosted, routes};

#[derive(Parser)]
#[command(version, about = "Host one MoGE expert group, or the shared expert, over gRPC")]
#[command(group(clap::ArgGroup::new("hosted").required(true).args(["group", "shared_expert"])))]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Expert group to host, 0 to M - 1; either this or --shared-expert.
    #[arg(long, env = "MOGE_GROUP")]
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
    /// Export one assignment counter per expert
    /// (`moge_expert_assignments_total`), besides the per-device total.
    #[arg(long, env = "MOGE_METRICS_PER_EXPERT")]
    metrics_per_expert: bool,
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
    let telemetry = Telemetry::start("moge-expert", &args.telemetry, args.server.host, args.server.instance()).await?;
    let tls = args.server.grpc_tls("moge-expert")?;
    let listener = args.server.bind().await?;
    let replica = args.server.replica_name(listener.local_addr()?);
    let (checkpoint, layers) = args.model.open()?;
    let hosted = match args.group {
        Some(group) => {
            let groups = checkpoint.config().num_groups();
            if group >= groups {
                bail!(
                    "--group {group} is out of range: checkpoint {} has {groups} groups, expected 0 to {}",
                    args.model.checkpoint.display(),
                    groups - 1
                );
            }
            Hosted::Group(group)
        }
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
    let options = ExpertOptions {
        format: args.weights,
        replica: replica.clone(),
        per_expert_metrics: args.metrics_per_expert,
    };
    let service = ExpertService::load(&checkpoint, &layers, hosted, pool, options)?;
    tracing::info!(
        checkpoint = %args.model.checkpoint.display(),
        layers = ?layers,
        hosted = %hosted,
        weights = ?args.weights,
        weight_bytes = service.weight_bytes(),
        compute_threads = service.compute_threads(),
        seconds = started.elapsed().as_secs_f64(),
        peak_rss_bytes = moge_shared::memory::peak_rss_bytes(),
        replica = %replica,
        "expert weights loaded"
    );

    let routes = routes(service, args.server.max_message_bytes);
    let rpc = RpcLayer::new(vec![
        KeyValue::new("group", hosted.group_label()),
        KeyValue::new("replica", replica),
    ]);
    let served = serve_grpc(
        listener,
        args.server.drain_timeout(),
        routes,
        moge_expert::SERVICE_NAME,
        rpc,
        tls,
    )
    .await;
    telemetry.shutdown();
    served?;
    Ok(())
}
