//! `moge-gateway`: the KServe v2 gRPC front of a moge-serve deployment.
//! It validates requests and gets each batch's routing from the router. Then it sends
//! every expert group its rows and the shared expert all rows, and sums.
//!
//! With no upstream addresses it starts the router, every group and the
//! shared expert in its own process (the embedded default).
//!
//! The same protocol is served over HTTP/JSON on `--http-port`.

mod auth;
mod batcher;
mod embedded;
mod frontend;
mod http;
mod https;
mod kserve;
mod metrics;
mod pipeline;
mod security;
mod upstream;
mod upstream_tls;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use moge_shared::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use moge_shared::proto::moge::v1::DescribeRequest;
use moge_shared::proto::moge::v1::host_client::HostClient;
use moge_shared::service::serve_grpc_with_readiness;
use moge_shared::settings::at_least;
use moge_telemetry::{RpcLayer, Telemetry, TelemetryArgs};
use opentelemetry::KeyValue;
use std::path::PathBuf;

use crate::batcher::{BatchLimits, Batcher};
use crate::embedded::Embedded;
use crate::frontend::{Frontend, ModelSpec};
use crate::kserve::KServe;
use crate::metrics::GatewayMetrics;
use crate::pipeline::Shape;
use crate::security::Security;
use crate::upstream::{Identity, Pool, Upstreams};
use moge_shared::proto::moge::v1::Role;

#[derive(Parser)]
#[command(version, about = "KServe v2 front of a moge-serve deployment")]
struct Args {
    /// TOML file of settings: each key is a flag's name (`grpc_port = 9001`).
    /// Flags and MOGE_ environment variables override it.
    #[arg(long, env = "MOGE_CONFIG")]
    config: Option<PathBuf>,
    /// Router address, `http://HOST:PORT`, `https://HOST:PORT` or
    /// `HOST:PORT` (the scheme then follows the upstream TLS settings);
    /// comma-separated for replicas. Without it the gateway starts the
    /// router, every expert group and the shared expert in its own process
    /// (the embedded default).
    #[arg(long, env = "MOGE_ROUTER", value_delimiter = ',', requires_all = ["groups", "shared_expert"])]
    router: Vec<String>,
    /// Addresses of one expert group's replicas, written as for --router and
    /// comma-separated; repeat the flag once per group, in group order. It
    /// has no environment variable; a configuration file may list it.
    #[arg(long = "group", requires = "router")]
    groups: Vec<String>,
    /// Shared expert address, written as for --router; comma-separated for
    /// replicas.
    #[arg(long, env = "MOGE_SHARED_EXPERT", value_delimiter = ',', requires = "router")]
    shared_expert: Vec<String>,
    /// Embedded mode: checkpoint to serve. Default: the `small` checkpoint,
    /// generated on first start into the cache folder (see --cache-dir).
    #[arg(long, env = "MOGE_CHECKPOINT", conflicts_with = "router")]
    checkpoint: Option<std::path::PathBuf>,
    /// Embedded mode: cache folder for the generated checkpoint. Default:
    /// $XDG_CACHE_HOME/moge-serve, else ~/.cache/moge-serve.
    #[arg(long, env = "MOGE_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Embedded mode: routing mode of the embedded router.
    #[arg(long, env = "MOGE_ROUTING", default_value = "moge")]
    routing: moge_shared::RoutingMode,
    /// Model name clients use.
    #[arg(long, env = "MOGE_MODEL_NAME", default_value = "moge")]
    model_name: String,
    /// Largest number of tokens in one request, and in one batch of requests; at least 1.
    #[arg(long, env = "MOGE_MAX_BATCH_TOKENS", default_value_t = 8192, value_parser = at_least(1_usize))]
    max_batch_tokens: usize,
    /// Microseconds the first request of a batch waits for others to join;
    /// 0 joins only requests already queued, as Triton's default does.
    #[arg(long, env = "MOGE_MAX_QUEUE_DELAY_US", default_value_t = 0)]
    max_queue_delay_us: u64,
    /// Batches that run at once, at least 1; while one is in the experts,
    /// the next gathers requests.
    #[arg(long, env = "MOGE_MAX_INFLIGHT_BATCHES", default_value_t = 2, value_parser = at_least(1_usize))]
    max_inflight_batches: usize,
    /// Most tokens admitted but not yet in a running batch, over all
    /// layers; a request beyond it gets RESOURCE_EXHAUSTED (HTTP 429) at
    /// once. At least --max-batch-tokens.
    #[arg(long, env = "MOGE_MAX_QUEUED_TOKENS", default_value_t = 65536)]
    max_queued_tokens: usize,
    /// Milliseconds a request may take when its client sets no deadline,
    /// and the most it may take when the client sets a longer one; 0 for
    /// no limit. A request past its deadline gets DEADLINE_EXCEEDED.
    #[arg(long, env = "MOGE_REQUEST_TIMEOUT_MS", default_value_t = 0)]
    request_timeout_ms: u64,
    /// Address to listen on.
    #[arg(long, env = "MOGE_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// gRPC port; 0 picks a free port, which the "listening" log line reports.
    #[arg(long, env = "MOGE_GRPC_PORT", default_value_t = 8001)]
    grpc_port: u16,
    /// HTTP/JSON port of the KServe v2 protocol; 0 picks a free port.
    #[arg(long, env = "MOGE_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    /// Largest gRPC message or HTTP body accepted or sent, in bytes; at
    /// least 65536.
    #[arg(long, env = "MOGE_MAX_MESSAGE_BYTES", default_value_t = 256 << 20, value_parser = at_least(65536_usize))]
    max_message_bytes: usize,
    /// Seconds that in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "MOGE_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    drain_timeout_seconds: u64,
    /// Seconds to wait at start for the router to respond.
    #[arg(long, env = "MOGE_STARTUP_TIMEOUT_SECONDS", default_value_t = 60)]
    startup_timeout_seconds: u64,
    /// Milliseconds between health probes of every upstream replica; at least 10.
    #[arg(long, env = "MOGE_PROBE_INTERVAL_MS", default_value_t = 500, value_parser = at_least(10_u64))]
    probe_interval_ms: u64,
    /// Replica name of this gateway in telemetry, for example the pod name;
    /// default: HOST:GRPC_PORT.
    #[arg(long, env = "MOGE_REPLICA", default_value = "")]
    replica: String,
    #[command(flatten)]
    tls: moge_shared::tls::TlsArgs,
    #[command(flatten)]
    upstream_tls: crate::upstream_tls::UpstreamTlsArgs,
    /// File with the bearer token that every KServe request must carry
    /// (`authorization: Bearer <token>`), except the liveness and readiness
    /// checks. Line breaks at the end of the file are ignored.
    #[arg(long, env = "MOGE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    moge_telemetry::exit::exit_status(run().await)
}

async fn run() -> anyhow::Result<()> {
    let mut args = moge_shared::settings::parse::<Args>();
    if args.max_queued_tokens < args.max_batch_tokens {
        bail!(
            "--max-queued-tokens {} is less than --max-batch-tokens {}, so the largest request could never \
             be queued; expected at least {}",
            args.max_queued_tokens,
            args.max_batch_tokens,
            args.max_batch_tokens
        );
    }
    if args.replica.is_empty() {
        args.replica = SocketAddr::new(args.host, args.grpc_port).to_string();
    }
    let telemetry = Telemetry::start(
        "moge-gateway",
        &args.telemetry,
        args.host,
        vec![KeyValue::new("service.instance.id", args.replica.clone())],
    )
    .await?;
    let security = Security::load(&args.tls, &args.upstream_tls, args.auth_token_file.as_deref())?;
    let grpc_listener = moge_shared::service::bind(SocketAddr::new(args.host, args.grpc_port), "--grpc-port").await?;
    let http_listener = moge_shared::service::bind(SocketAddr::new(args.host, args.http_port), "--http-port").await?;
    let drain_timeout = Duration::from_secs(args.drain_timeout_seconds);
    let embedded = if args.router.is_empty() {
        let dir = match &args.checkpoint {
            Some(dir) => dir.clone(),
            None => {
                let dir = embedded::default_checkpoint_dir(args.cache_dir.clone());
                embedded::ensure_checkpoint(&dir)?;
                dir
            }
        };
        let stack = Embedded::start(&dir, args.routing, args.max_message_bytes, drain_timeout).await?;
        args.router = vec![stack.router.clone()];
        args.groups = stack.groups.clone();
        args.shared_expert = vec![stack.shared_expert.clone()];
        Some(stack)
    } else {
        None
    };

    let split = |list: &String| list.split(',').map(str::to_owned).collect::<Vec<_>>();
    let identity = |role, group| Identity { role, group };
    let router = Pool::new(
        "router".to_owned(),
        moge_router::SERVICE_NAME,
        identity(Role::Router, None),
        &args.router,
        &security.upstream,
    )?;
    let groups = args
        .groups
        .iter()
        .enumerate()
        .map(|(group, list)| {
            Pool::new(
                format!("group {group}"),
                moge_expert::SERVICE_NAME,
                identity(Role::ExpertGroup, Some(group as u32)),
                &split(list),
                &security.upstream,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let shared_expert = Pool::new(
        "shared expert".to_owned(),
        moge_expert::SERVICE_NAME,
        identity(Role::SharedExpert, None),
        &args.shared_expert,
        &security.upstream,
    )?;
    let upstreams = Arc::new(Upstreams {
        router,
        groups,
        shared_expert,
    });

    // The router describes the model; retry while it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.startup_timeout_seconds);
    let mut attempts = 0_u32;
    let mut last_logged: Option<tokio::time::Instant> = None;
    let (description, _) = loop {
        attempts += 1;
        upstreams.router.probe().await;
        let attempt = upstreams
            .router
            .call(None, |attempt| async move {
                let mut client = HostClient::new(attempt.channel);
                client
                    .describe(DescribeRequest {})
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await;
        match attempt {
            Ok(description) => break description,
            Err(error) if tokio::time::Instant::now() < deadline => {
                // Retries come every 250 ms; log the first and then one every 5 s.
                let now = tokio::time::Instant::now();
                if last_logged.is_none_or(|logged| now - logged >= Duration::from_secs(5)) {
                    let seconds_left = (deadline - now).as_secs();
                    tracing::info!(%error, attempts, seconds_left, "router not reachable yet; will retry");
                    last_logged = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => {
                return Err(error).context("failed to describe the model through the router");
            }
        }
    };
    if description.layers.is_empty() {
        bail!("the router hosts no layer, expected at least one");
    }
    let num_groups = description.num_groups as usize;
    if num_groups != upstreams.groups.len() {
        bail!(
            "the model has {num_groups} expert groups but --group was given {} time(s); \
             give one --group per group, in group order",
            upstreams.groups.len()
        );
    }
    let shape = Shape {
        hidden_size: description.hidden_size as usize,
        top_k: description.top_k as usize,
        num_groups,
        experts_per_group: description.num_experts as usize / num_groups,
    };
    tracing::info!(
        model = %args.model_name,
        layers = ?description.layers,
        hidden_size = shape.hidden_size,
        groups = num_groups,
        top_k = shape.top_k,
        max_batch_tokens = args.max_batch_tokens,
        "model described by the router"
    );
    for pool in upstreams.pools() {
        pool.probe().await;
    }
    // gRPC health of the inference service follows readiness, for probes.
    let (ready, readiness) = tokio::sync::watch::channel(upstreams.is_ready());
    let probe = upstreams.spawn_probe(Duration::from_millis(args.probe_interval_ms), ready);

    let routing_mode = match moge_shared::proto::moge::v1::RoutingMode::try_from(description.default_mode) {
        Ok(moge_shared::proto::moge::v1::RoutingMode::TopK) => "top-k",
        Ok(moge_shared::proto::moge::v1::RoutingMode::GroupLimited) => "group-limited",
        _ => "moge",
    };
    let metrics = Arc::new(GatewayMetrics::new(&upstreams, routing_mode.to_owned()));
    let limits = BatchLimits {
        max_batch_tokens: args.max_batch_tokens,
        max_queue_delay: Duration::from_micros(args.max_queue_delay_us),
        max_inflight: args.max_inflight_batches,
        max_queued_tokens: args.max_queued_tokens,
    };
    let frontend = Frontend {
        spec: ModelSpec {
            model_name: args.model_name.clone(),
            layers: description.layers.clone(),
            shape,
            max_batch_tokens: args.max_batch_tokens,
        },
        request_timeout: (args.request_timeout_ms > 0).then(|| Duration::from_millis(args.request_timeout_ms)),
        batcher: Batcher::new(
            Arc::clone(&upstreams),
            shape,
            args.max_message_bytes,
            limits,
            Arc::clone(&metrics),
        ),
        upstreams,
        metrics,
    };
    let frontend = Arc::new(frontend);
    let http_routes = security.http_routes(http::router(Arc::clone(&frontend), args.max_message_bytes));
    let http_server = tokio::spawn(https::serve(http_listener, http_routes, security.http_tls.clone()));
    let service = GrpcInferenceServiceServer::new(KServe::new(frontend))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let rpc = RpcLayer::new(vec![KeyValue::new("replica", args.replica.clone())]);
    let served = serve_grpc_with_readiness(
        grpc_listener,
        drain_timeout,
        security.grpc_routes(service),
        "inference.GRPCInferenceService",
        rpc,
        security.grpc_tls.clone(),
        readiness,
    )
    .await;
    if tokio::time::timeout(drain_timeout, http_server).await.is_err() {
        tracing::warn!("HTTP drain overran its timeout");
    }
    // Nothing is served any more: stop probing before the embedded
    // services stop, so that their shutdown is not logged as failures.
    probe.abort();
    if let Some(stack) = embedded {
        stack.stop().await;
    }
    telemetry.shutdown();
    served?;
    Ok(())
}
