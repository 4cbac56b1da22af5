//! `moge-load`: replays an LLM inference trace, or a synthetic load, against
//! a moge-serve gateway over the KServe v2 gRPC API and reports throughput,
//! latency percentiles of prefill and decode calls, errors by status code
//! and the gateway's balance report.

mod connect;
mod report;
mod run;
mod trace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use moge_ctl::client::{BalanceClient, ClientArgs, ClientSecurity, parse_address};
use moge_shared::proto::inference::ModelMetadataRequest;
use moge_shared::{DType, RoutingMode};
use tokio::sync::mpsc;

use crate::connect::AddAuthorization;
use crate::report::{Latency, Percentiles, Report, Throughput};
use crate::run::{CallKind, RunOptions};
use crate::trace::TraceOptions;

/// Exit status of a run that finished with at least one failed call.
const EXIT_CALLS_FAILED: u8 = 3;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  every call succeeded
  1  the run could not start or finish: for example the gateway is
     unreachable, rejects the token or the TLS handshake, a file cannot
     be read, or the balance report of --gateway-http cannot be read
     after the run (the report is then printed without it)
  2  invalid arguments
  3  the run finished but at least one call failed; the report, with the
     first error message of each status code, is still printed and
     written to --json";

#[derive(Parser)]
#[command(
    version,
    about = "Replay an LLM inference trace against a moge-serve gateway",
    after_help = EXIT_STATUS_HELP
)]
struct Args {
    /// Gateway gRPC address: HOST:PORT, http://HOST:PORT or
    /// https://HOST:PORT. HOST:PORT uses https:// when --tls-ca-file is set
    /// and http:// otherwise.
    #[arg(long, default_value = "127.0.0.1:8001", value_parser = parse_address)]
    target: String,
    /// Trace in the Azure LLM inference format (TIMESTAMP,ContextTokens,GeneratedTokens).
    /// Without it, a synthetic load of --requests requests of --tokens tokens.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Trace window in trace seconds from its first request, START..END.
    #[arg(long, default_value = "0..60", value_parser = parse_window)]
    window: (f64, f64),
    /// Arrival times are multiplied by this (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0, value_parser = parse_scale)]
    time_scale: f64,
    /// Token counts are multiplied by this (context at least 1).
    #[arg(long, default_value_t = 1.0, value_parser = parse_scale)]
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
    /// Synthetic load: tokens of each request's prefill call, at least 1.
    #[arg(long, default_value_t = 1, value_parser = parse_at_least_one)]
    tokens: usize,
    /// Synthetic load: decode calls per request.
    #[arg(long, default_value_t = 0)]
    decodes: usize,
    /// Closed loop with this many requests in flight (at least 1), ignoring
    /// arrival times. Default: open loop for a trace, 64 for a synthetic load.
    #[arg(long, value_parser = parse_at_least_one)]
    concurrency: Option<usize>,
    /// Datatype of the hidden states: BF16, FP16 or FP32.
    #[arg(long, default_value = "FP32")]
    datatype: DType,
    /// Layers each call runs through, comma-separated; each layer's output
    /// is the next one's input.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    layers: Vec<u32>,
    /// Routing mode per request: moge, top-k or group-limited. Default: the
    /// deployment's.
    #[arg(long)]
    routing: Option<RoutingMode>,
    /// Model name.
    #[arg(long, default_value = "moge")]
    model: String,
    /// gRPC connections to spread the calls over, at least 1.
    #[arg(long, default_value_t = 4, value_parser = parse_at_least_one)]
    connections: usize,
    /// Gateway HTTP address, to read its balance report after the run:
    /// HOST:PORT, http://HOST:PORT or https://HOST:PORT. It uses the same
    /// token and TLS settings as --target.
    #[arg(long, value_parser = parse_address)]
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
    #[command(flatten)]
    client: ClientArgs,
}

/// Parses a count that must be at least 1. clap adds the flag's name.
fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("0 is out of range, expected an integer of at least 1".to_owned()),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("{text:?} is not an integer, expected an integer of at least 1")),
    }
}

/// Parses a scale factor: a finite number of at least 0.
fn parse_scale(text: &str) -> Result<f64, String> {
    let scale: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number, expected a finite number of at least 0"))?;
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(format!(
            "{text} is out of range, expected a finite number of at least 0"
        ));
    }
    Ok(scale)
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

/// Describes a failed `ModelMetadata` call, with a hint for a token problem.
fn metadata_error(model: &str, target: &str, status: &tonic::Status, has_token: bool) -> anyhow::Error {
    let hint = match (status.code(), has_token) {
        (tonic::Code::Unauthenticated, false) => "; set --auth-token-file to the gateway's token file",
        (tonic::Code::Unauthenticated, true) => "; check that --auth-token-file contains the gateway's token",
        _ => "",
    };
    let mut message = format!(
        "failed to read the metadata of model {model:?} from {target}: {}: {}{hint}",
        moge_telemetry::status_name(status.code()),
        status.message()
    );
    // A transport failure, such as a TLS handshake the gateway refused,
    // keeps its cause in the status's source chain, not in its message.
    for cause in moge_telemetry::exit::distinct_causes(status.message(), std::error::Error::source(status)) {
        message.push_str(": ");
        message.push_str(&cause);
    }
    anyhow::anyhow!(message)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(error) => moge_telemetry::exit::exit_status(Err::<(), _>(error)),
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    moge_telemetry::init_logging();
    let args = Args::parse();
    let security = ClientSecurity::load(&args.client)?;
    let target = security.url("--target", &args.target)?;
    // Checked before the run, so that a bad address stops the tool before any call.
    let balance_client = match &args.gateway_http {
        Some(address) => Some(BalanceClient::new(
            &security,
            "--gateway-http",
            address,
            Duration::from_secs(10),
        )?),
        None => None,
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

    let endpoint = connect::endpoint(&security, &target)?;
    let authorization = AddAuthorization::new(&security)?;
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("failed to connect to {target}"))?;
        clients.push(connect::client(channel, authorization.clone(), args.max_message_bytes));
    }
    let metadata = clients[0]
        .clone()
        .model_metadata(ModelMetadataRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await
        .map_err(|status| metadata_error(&args.model, &target, &status, security.authorization().is_some()))?
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
        routing: args.routing,
        dtype: args.datatype,
        hidden_size,
        concurrency,
        seed: args.seed,
    };
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let runner = tokio::spawn(run::run(plan, clients, options, sender));

    let progress = indicatif::ProgressBar::new(calls as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} calls, {per_sec}, {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut error_examples: BTreeMap<String, String> = BTreeMap::new();
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
            Some(failure) => {
                let status = moge_telemetry::status_name(failure.code);
                *errors.entry(status.to_owned()).or_default() += 1;
                if !error_examples.contains_key(status) {
                    // Logged once per status code, because the report counts the rest.
                    progress.suspend(|| {
                        tracing::warn!(
                            status,
                            error = %failure.message,
                            "call failed; further failures with this status are only counted"
                        )
                    });
                    error_examples.insert(status.to_owned(), failure.message);
                }
                progress.set_message(format!("{} errors", errors.values().sum::<usize>()));
            }
        }
    }
    let duration = runner.await.context("the load task failed")?.as_secs_f64();
    progress.finish_and_clear();

    // A request completed when its prefill and all its decodes succeeded.
    // A failed call ends its request, so the completed requests are the
    // planned ones minus those with a failure.
    let failed_calls: usize = errors.values().sum();
    let (balance, balance_error) = match balance_client {
        Some(client) => match tokio::task::spawn_blocking(move || client.fetch()).await? {
            Ok(balance) => (Some(balance), None),
            Err(error) => (None, Some(error)),
        },
        None => (None, None),
    };
    let report = Report {
        target: target.clone(),
        loop_mode: if concurrency.is_some() { "closed" } else { "open" }.to_owned(),
        concurrency,
        datatype: args.datatype.kserve_name().to_owned(),
        layers: args.layers,
        routing: args.routing.map(|mode| mode.as_str().to_owned()),
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
        error_examples,
        balance,
    };
    println!("{}", report.summary());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(error) = balance_error {
        return Err(error.context("failed to read the balance report after the run; the report above has none"));
    }
    if failed_calls > 0 {
        eprintln!(
            "error: {failed_calls} of {} calls failed against {target}; the first error of each status code is listed above",
            failed_calls + ok_calls
        );
        return Ok(ExitCode::from(EXIT_CALLS_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}
