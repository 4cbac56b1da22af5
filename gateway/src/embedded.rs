//! The embedded default: the router, every expert group and the shared
//! expert served from the gateway's own process on loopback ports, over the
//! same gRPC path as a split deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moge_expert::{ExpertOptions, ExpertService, Hosted};
use moge_router::RouterService;
use moge_shared::RoutingMode;
use moge_shared::checkpoint::{self, Checkpoint, GenerateOptions, Preset};
use moge_shared::service::{bind, serve_grpc_until};
use moge_shared::weights::WeightFormat;
use moge_telemetry::RpcLayer;
use opentelemetry::KeyValue;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Addresses of the embedded services, and the handle that stops them.
pub struct Embedded {
    /// Router URL.
    pub router: String,
    /// One URL per group, in group order.
    pub groups: Vec<String>,
    /// Shared expert URL.
    pub shared_expert: String,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Directory of the generated default checkpoint: `$MOGE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/moge-serve`, else `$HOME/.cache/moge-serve`, plus
/// `checkpoints/small`.
pub fn default_checkpoint_dir(cache_dir: Option<PathBuf>) -> PathBuf {
    let base = cache_dir
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|dir| PathBuf::from(dir).join("moge-serve")))
        .or_else(|| std::env::var_os("HOME").map(|dir| PathBuf::from(dir).join(".cache/moge-serve")))
        .unwrap_or_else(|| PathBuf::from(".cache/moge-serve"));
    base.join("checkpoints").join("small")
}

/// Generates the `small` checkpoint into `dir` unless it is complete there.
pub fn ensure_checkpoint(dir: &Path) -> anyhow::Result<()> {
    if dir.join(checkpoint::CONFIG_FILE).exists() {
        return Ok(());
    }
    tracing::info!(dir = %dir.display(), "generating the small checkpoint on first start");
    let summary = checkpoint::generate(dir, &GenerateOptions::new(Preset::Small), &|_, _| {})
        .with_context(|| format!("failed to generate the default checkpoint in {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), tensors = summary.tensors, bytes = summary.bytes, "checkpoint generated");
    Ok(())
}

impl Embedded {
    /// Loads every part of `checkpoint` and serves each on a free loopback port.
    pub async fn start(
        checkpoint_dir: &Path,
        routing: RoutingMode,
        max_message_bytes: usize,
        drain_timeout: Duration,
    ) -> anyhow::Result<Embedded> {
        let checkpoint = Checkpoint::open(checkpoint_dir).with_context(|| {
            format!(
                "--checkpoint {}: failed to open the checkpoint",
                checkpoint_dir.display()
            )
        })?;
        let layers = checkpoint.layers();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));

        // Each part is named after its role, as the label `replica` shows it.
        let mut serve = async |routes: tonic::service::Routes,
                               name: &'static str,
                               attributes: Vec<KeyValue>|
               -> anyhow::Result<String> {
            let listener = bind(loopback, "an embedded service's loopback port").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let rpc = RpcLayer::new(attributes);
            let mut stopped = stopped.clone();
            tasks.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                    "gateway stopped"
                };
                if let Err(error) = serve_grpc_until(listener, drain_timeout, routes, name, rpc, None, shutdown).await {
                    tracing::error!(%error, service = name, "embedded service failed");
                }
            });
            Ok(url)
        };

        let router_replica = "embedded-router";
        let router = RouterService::load(&checkpoint, &layers, routing, router_replica.to_owned())?;
        let router = serve(
            moge_router::routes(router, max_message_bytes),
            moge_router::SERVICE_NAME,
            vec![KeyValue::new("replica", router_replica)],
        )
        .await?;
        // One compute pool for every group: the groups share this machine's cores.
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .thread_name(|index| format!("moge-compute-{index}"))
                .build()
                .context("failed to start the compute thread pool")?,
        );
        let hosted = (0..checkpoint.config().num_groups())
            .map(Hosted::Group)
            .chain(std::iter::once(Hosted::SharedExpert));
        let mut urls = Vec::new();
        for part in hosted {
            let replica = match part {
                Hosted::Group(group) => format!("embedded-group-{group}"),
                Hosted::SharedExpert => "embedded-shared-expert".to_owned(),
            };
            let options = ExpertOptions {
                format: WeightFormat::Stored,
                replica: replica.clone(),
                per_expert_metrics: false,
            };
            let service = ExpertService::load(&checkpoint, &layers, part, Arc::clone(&pool), options)?;
            let attributes = vec![
                KeyValue::new("group", part.group_label()),
                KeyValue::new("replica", replica),
            ];
            let url = serve(
                moge_expert::routes(service, max_message_bytes),
                moge_expert::SERVICE_NAME,
                attributes,
            )
            .await?;
            urls.push(url);
        }
        let shared_expert = urls.pop().unwrap_or_default();
        let groups = urls;
        tracing::info!(
            checkpoint = %checkpoint_dir.display(),
            layers = ?layers,
            router = %router,
            groups = ?groups,
            shared_expert = %shared_expert,
            "embedded router, expert groups and shared expert serving on loopback"
        );
        Ok(Embedded {
            router,
            groups,
            shared_expert,
            stop,
            tasks,
        })
    }

    /// Stops every embedded service and waits for their drains.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
