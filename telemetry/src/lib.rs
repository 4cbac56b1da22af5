//! Telemetry of the moge-serve services. Logs go through `tracing`. Metrics
//! go through the OpenTelemetry SDK to a Prometheus text endpoint on every
//! service, and over OTLP when a collector is configured. Traces go over
//! OTLP, with W3C trace context between services. The crate also defines
//! the balance report's JSON form.
//!
//! Metric names follow Prometheus conventions once exported: instrument
//! `moge_device_assignments` becomes `moge_device_assignments_total`, and a
//! histogram with unit `s` gets the suffix `_seconds`.
#![warn(missing_docs)]

pub mod balance;
pub mod exit;
pub mod propagation;
mod rpc;
pub mod window;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use rpc::{LATENCY_BUCKETS, RpcLayer, RpcService, status_name};

/// Name of the OpenTelemetry meter and tracer of every moge-serve service.
pub const SCOPE: &str = "moge-serve";

/// Telemetry settings every binary shares; flatten into its arguments with
/// `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Port of the Prometheus text endpoint (`/metrics`) on --host; 0 picks a
    /// free port, which the "metrics endpoint ready" log line reports.
    #[arg(long, env = "MOGE_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,
    /// Turn metrics off: no endpoint, no OTLP metrics, and instruments
    /// record nothing. The gateway's balance report keeps working.
    #[arg(long, env = "MOGE_DISABLE_METRICS")]
    pub disable_metrics: bool,
    /// OTLP/gRPC collector that receives traces and metrics, for example
    /// `http://127.0.0.1:4317`. Unset: no OTLP export.
    #[arg(long, env = "MOGE_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Seconds between two OTLP metric exports.
    #[arg(long, env = "MOGE_OTLP_METRICS_INTERVAL_SECONDS", default_value_t = 10)]
    pub otlp_metrics_interval_seconds: u64,
}

/// Checks an `--otlp-endpoint` value: an `http://` URL with a host. The
/// exporter is built without TLS, so an `https://` collector is rejected
/// here rather than failing at the first export.
fn otlp_endpoint(text: &str) -> Result<String, String> {
    match text.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() => Ok(text.to_owned()),
        _ if text.starts_with("https://") => Err(
            "https is not supported, because the OTLP exporter is built without TLS; expected an http:// \
             collector address such as http://127.0.0.1:4317"
                .to_owned(),
        ),
        _ => Err("expected an http:// collector address such as http://127.0.0.1:4317".to_owned()),
    }
}

/// A failure to set up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An exporter could not be built, for example from a bad OTLP endpoint.
    #[error("failed to build the {what} exporter: {message}")]
    Exporter {
        /// Which exporter.
        what: &'static str,
        /// The SDK's message.
        message: String,
    },
    /// The metrics port could not be bound.
    #[error(
        "--metrics-port: failed to listen for metrics on {address}: {source}; choose another port, \
         0 for any free one, or --disable-metrics"
    )]
    Bind {
        /// Address requested.
        address: SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Returns the meter every instrument of the services comes from. Before
/// [`Telemetry::start`], or with metrics disabled, it records nothing.
pub fn meter() -> opentelemetry::metrics::Meter {
    opentelemetry::global::meter(SCOPE)
}

/// Installs the `tracing` subscriber alone: human-readable lines on standard
/// error, filtered by `RUST_LOG` (default `info`), coloured only on a
/// terminal. For command-line tools; services call [`Telemetry::start`].
pub fn init_logging() {
    let _ = tracing_subscriber::registry()
        .with(log_lines().with_filter(log_filter()))
        .try_init();
}

/// Returns the filter of what traces record: the services' request spans,
/// which are at `debug` so that they cost nothing while traces are off, and
/// `info` elsewhere.
fn trace_filter() -> tracing_subscriber::filter::Targets {
    let ours = [
        "moge_telemetry",
        "moge_gateway",
        "moge_router",
        "moge_expert",
        "moge_shared",
    ];
    ours.iter().fold(
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
        |filter, target| filter.with_target(*target, tracing::Level::DEBUG),
    )
}

/// `RUST_LOG`, else `info` with the OpenTelemetry SDK's own notices at `warn`.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn"))
}

fn log_lines<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
}

/// The running telemetry of one process: providers to flush at exit and the
/// metrics endpoint.
pub struct Telemetry {
    meter_provider: Option<SdkMeterProvider>,
    tracer_provider: Option<SdkTracerProvider>,
    /// Address of the Prometheus endpoint, when metrics are on.
    pub metrics_address: Option<SocketAddr>,
}

impl Telemetry {
    /// Sets up logs, metrics and traces for `service` (such as
    /// `moge-router`) and starts the metrics endpoint on `host`.
    /// `attributes` describe the process (such as `service.instance.id`).
    pub async fn start(
        service: &'static str,
        args: &TelemetryArgs,
        host: IpAddr,
        attributes: Vec<KeyValue>,
    ) -> Result<Telemetry, TelemetryError> {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attributes(attributes)
            .build();
        let exporter_error = |what| {
            move |error: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter {
                what,
                message: error.to_string(),
            }
        };

        let tracer_provider = match &args.otlp_endpoint {
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(exporter_error("OTLP span"))?;
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource.clone())
                        .with_batch_exporter(exporter)
                        .build(),
                )
            }
            None => None,
        };
        let traces = tracer_provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(SCOPE))
                .with_tracked_inactivity(false)
                .with_filter(trace_filter())
        });
        let _ = tracing_subscriber::registry()
            .with(log_lines().with_filter(log_filter()))
            .with(traces)
            .try_init();

        let mut telemetry = Telemetry {
            meter_provider: None,
            tracer_provider,
            metrics_address: None,
        };
        if args.disable_metrics {
            tracing::info!(service, otlp_endpoint = ?args.otlp_endpoint, "metrics disabled");
            return Ok(telemetry);
        }
        let registry = prometheus::Registry::new();
        let prometheus_reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|error| TelemetryError::Exporter {
                what: "Prometheus",
                message: error.to_string(),
            })?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(prometheus_reader);
        if let Some(endpoint) = &args.otlp_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(exporter_error("OTLP metric"))?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(Duration::from_secs(args.otlp_metrics_interval_seconds.max(1)))
                .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        telemetry.meter_provider = Some(provider);

        let address = SocketAddr::new(host, args.metrics_port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| TelemetryError::Bind { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind { address, source })?;
        telemetry.metrics_address = Some(address);
        let routes = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { render(&registry) }
            }),
        );
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, routes).await {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
        tracing::info!(
            service,
            %address,
            otlp_endpoint = ?args.otlp_endpoint,
            "metrics endpoint ready at /metrics"
        );
        Ok(telemetry)
    }

    /// Flushes pending spans and metric points to the OTLP collector.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "failed to flush traces at exit");
        }
        if let Some(provider) = self.meter_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "failed to flush metrics at exit");
        }
    }
}

/// Encodes the registry in the Prometheus text format, version 0.0.4.
fn render(registry: &prometheus::Registry) -> axum::response::Response {
    use axum::response::IntoResponse;
    use prometheus::Encoder;

    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            http::StatusCode::OK,
            [(http::header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "failed to encode metrics");
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                [(http::header::CONTENT_TYPE, "text/plain".to_owned())],
                format!("failed to encode metrics: {error}").into_bytes(),
            )
                .into_response()
        }
    }
}
