//! `moge-load`: replays an LLM inference trace, or a synthetic load, against
//! a moge-serve gateway over the KServe v2 gRPC API and reports throughput,
//! latency percentiles of prefill and decode calls, errors by status code
//! and the gateway's balance report.

mod report;
mod run;
mod trace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use moge_shared::DType;
use moge_shared::proto::inference::ModelMetadataRequest;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokio::sync::mpsc;

use crate::report::{Latency, Percentiles, Report, Throughput};
use crate::run::{CallKind, RunOptions};
use crate::trace::TraceOptions;

#[derive(Parser)]
#[command(version, about = "Replay an LLM inference trace against a moge-serve gateway")]
struct Args {
    /// Gateway gRPC address, HOST:PORT or http://HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8001")]
    target: String,
    /// Trace in the Azure LLM inference format (TIMESTAMP,ContextTokens,GeneratedTokens).
    /// Without it, a synthetic load of --requests requests of --tokens tokens.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Trace window in trace seconds from its first request, START..END.
    #[arg(long, default_value = "0..60", value_parser = parse_window)]
    window: (f64, f64),
    /// Arrival times are multiplied by this (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Token counts are multiplied by this (context at least 1).
    #[arg(long, default_value_t = 1.0)]
    token_scale: f64,
    /// Largest number of decode calls per request.
    #[arg(long, default_value_t = usize::MAX)]
    max_decodes: usize,
    /// Largest number of requests taken from the trace.
    #[arg(long, default_value_t = usize::MAX)]
    max_requests: usize,
    /// Synthetic load: number of requests.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Synthetic load: tokens of each request's prefill call.
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Synthetic load: decode calls per request.
    #[arg(long, default_value_t = 0)]
    decodes: usize,
    /// Closed loop with this many requests in flight, ignoring arrival times.
    /// Default: open loop for a trace, 64 for a synthetic load.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Datatype of the hidden states: BF16, FP16 or FP32.
    #[arg(long, default_value = "FP32")]
    datatype: DType,
    /// Layers each call runs through, comma-separated; each layer's output
    /// is the next one's input.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    layers: Vec<u32>,
    /// Routing mode per request (moge, top-k or group-limited); default: the deployment's.
    #[arg(long)]
    routing: Option<String>,
    /// Model name.
    #[arg(long, default_value = "moge")]
    model: String,
    /// gRPC connections to spread the calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Gateway HTTP address, to read its balance report after the run.
    #[arg(long)]
    gateway_http: Option<String>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the random hidden states.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest gRPC message, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_message_bytes: usize,
}

fn parse_window(text: &str) -> Result<(f64, f64), String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?} is not a window, expected START..END in seconds"))?;
    let parse = |part: &str| {
        part.trim()
            .parse::<f64>()
            .map_err(|_| format!("{part:?} is not a number of seconds"))
    };
    let (start, end) = (parse(start)?, parse(end)?);
    if !(start >= 0.0 && end > start) {
        return Err(format!("window {text:?} is empty, expected 0 <= START < END"));
    }
    Ok((start, end))
}

fn fetch_balance(gateway: &str) -> anyhow::Result<moge_telemetry::balance::BalanceReport> {
    let url = format!("{}/v1/balance", gateway.trim_end_matches('/'));
    let mut response = ureq::get(&url)
        .call()
        .with_context(|| format!("failed to fetch {url}"))?;
    Ok(response.body_mut().read_json()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    moge_telemetry::init_logging();
    let args = Args::parse();
    let target = if args.target.contains("://") {
        args.target.clone()
    } else {
        format!("http://{}", args.target)
    };
    let plan = match &args.trace {
        Some(path) => trace::read_trace(
            path,
            &TraceOptions {
                window: args.window,
                time_scale: args.time_scale,
                token_scale: args.token_scale,
                max_decode_steps: args.max_decodes,
                max_requests: args.max_requests,
            },
        )?,
        None => trace::synthetic(args.requests, args.tokens, args.decodes),
    };
    if plan.is_empty() {
        bail!("the plan has no request; widen --window or raise --requests");
    }
    let concurrency = match (&args.trace, args.concurrency) {
        (_, Some(concurrency)) => Some(concurrency),
        (None, None) => Some(64),
        (Some(_), None) => None,
    };

    let endpoint = tonic::transport::Endpoint::from_shared(target.clone())
        .with_context(|| format!("--target {target:?} is not a valid address"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(moge_shared::service::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(moge_shared::service::HTTP2_CONNECTION_WINDOW_BYTES)
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("failed to connect to {target}"))?,
        );
    }
    let metadata = GrpcInferenceServiceClient::new(channels[0].clone())
        .model_metadata(ModelMetadataRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await
        .with_context(|| format!("failed to read the metadata of model {:?}", args.model))?
        .into_inner();
    let hidden_size = metadata
        .inputs
        .first()
        .and_then(|input| input.shape.get(1))
        .copied()
        .filter(|&width| width > 0)
        .context("the model metadata has no [-1, H] input")? as usize;

    let calls: usize = plan.iter().map(|request| 1 + request.decode_steps).sum();
    let requests = plan.len();
    tracing::info!(
        target = %target,
        requests,
        calls,
        concurrency = ?concurrency,
        datatype = args.datatype.kserve_name(),
        layers = ?args.layers,
        "starting load"
    );
    let options = RunOptions {
        model: args.model.clone(),
        layers: args.layers.clone(),
        routing: args.routing.clone(),
        dtype: args.datatype,
        hidden_size,
        concurrency,
        max_message_bytes: args.max_message_bytes,
        seed: args.seed,
    };
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let runner = tokio::spawn(run::run(plan, channels, options, sender));

    let progress = indicatif::ProgressBar::new(calls as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} calls, {per_sec}, {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut ok_calls, mut tokens) = (0, 0);
    while let Some(record) = receiver.recv().await {
        progress.inc(1);
        match record.failure {
            None => {
                ok_calls += 1;
                tokens += record.tokens;
                match record.kind {
                    CallKind::Prefill => prefill.push(record.seconds),
                    CallKind::Decode => decode.push(record.seconds),
                }
            }
            Some(code) => {
                *errors.entry(moge_telemetry::status_name(code).to_owned()).or_default() += 1;
                progress.set_message(format!("{} errors", errors.values().sum::<usize>()));
            }
        }
    }
    let duration = runner.await.context("the load task failed")?.as_secs_f64();
    progress.finish_and_clear();

    // A request completed when its prefill and all its decodes succeeded;
    // a failed call ends its request, so count the planned requests minus
    // those with a failure.
    let failed_calls: usize = errors.values().sum();
    let balance = match &args.gateway_http {
        Some(gateway) => Some(
            tokio::task::spawn_blocking({
                let gateway = gateway.clone();
                move || fetch_balance(&gateway)
            })
            .await??,
        ),
        None => None,
    };
    let report = Report {
        target,
        loop_mode: if concurrency.is_some() { "closed" } else { "open" }.to_owned(),
        concurrency,
        datatype: args.datatype.kserve_name().to_owned(),
        layers: args.layers,
        routing: args.routing,
        duration_seconds: duration,
        requests,
        requests_completed: requests - failed_calls,
        calls: ok_calls,
        tokens,
        throughput: Throughput {
            requests_per_second: (requests - failed_calls) as f64 / duration,
            tokens_per_second: tokens as f64 / duration,
            calls_per_second: ok_calls as f64 / duration,
        },
        latency_seconds: Latency {
            prefill: Percentiles::of(prefill),
            decode: Percentiles::of(decode),
        },
        errors: failed_calls,
        errors_by_status: errors,
        balance,
    };
    println!("{}", report.summary());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}
