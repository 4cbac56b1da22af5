//! A tower layer for every gRPC server: a server span per call, continued
//! from the caller's trace context, and the `rpc.server.call.duration`
//! histogram of the OpenTelemetry RPC semantic conventions.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Bucket bounds of latency histograms, in seconds: 100 µs to 30 s.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The gRPC status code of a call to a method that a service does not
/// implement. Such a call's path is reported as `_OTHER`, so that clients
/// cannot create label values.
const UNIMPLEMENTED: &str = "12";

/// Names of the gRPC status codes, by code, as the RPC conventions report them.
const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Returns the conventional name of a gRPC status code, such as
/// `UNAVAILABLE` for 14.
pub fn status_name(code: tonic::Code) -> &'static str {
    STATUS_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// Spans and call metrics for one gRPC server; `attributes` (such as the
/// hosted group and replica) go on every span and metric point.
#[derive(Clone)]
pub struct RpcLayer {
    inner: Arc<LayerState>,
}

struct LayerState {
    duration: Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl RpcLayer {
    /// Creates the layer; the histogram comes from the global meter provider.
    pub fn new(attributes: Vec<KeyValue>) -> RpcLayer {
        let duration = crate::meter()
            .f64_histogram("rpc.server.call.duration")
            .with_unit("s")
            .with_description("Duration of gRPC calls this server handled, by method and status")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        RpcLayer {
            inner: Arc::new(LayerState { duration, attributes }),
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RpcLayer`] wraps around a gRPC server's routes.
#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

/// Returns whether calls to `path` (without its leading `/`) get a span:
/// every call but health checks and reflection, which probes repeat every
/// few hundred milliseconds.
fn is_traced(path: &str) -> bool {
    !(path.starts_with("grpc.health.") || path.starts_with("grpc.reflection."))
}

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for RpcService<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RequestBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = Arc::clone(&self.layer.inner);
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let span = if is_traced(&method) {
            let span = tracing::debug_span!(
                "grpc.server",
                otel.name = %method,
                otel.kind = "server",
                rpc.system.name = "grpc",
                rpc.method = %method,
                rpc.response.status_code = tracing::field::Empty,
                moge.layer = tracing::field::Empty,
                moge.tokens = tracing::field::Empty,
            );
            // Without a trace context this span starts a trace. With traces
            // off the span is disabled and nothing is parsed.
            if !span.is_disabled() {
                let _ = span.set_parent(crate::propagation::extract(request.headers()));
                for attribute in &layer.attributes {
                    span.set_attribute(attribute.key.clone(), attribute.value.clone());
                }
            }
            span
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        Box::pin(
            async move {
                let result = inner.call(request).await;
                // A unary error arrives as headers only; a success puts
                // `grpc-status: 0` in the trailers, past this point.
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("0")
                        .to_owned(),
                    Err(_) => "2".to_owned(),
                };
                let status = code
                    .parse::<i32>()
                    .map(|code| status_name(tonic::Code::from_i32(code)))
                    .unwrap_or("UNKNOWN");
                tracing::Span::current().record("rpc.response.status_code", status);
                let method = if code == UNIMPLEMENTED {
                    "_OTHER".to_owned()
                } else {
                    method
                };
                let mut attributes = layer.attributes.clone();
                attributes.push(KeyValue::new("rpc.system.name", "grpc"));
                attributes.push(KeyValue::new("rpc.method", method));
                attributes.push(KeyValue::new("rpc.response.status_code", status));
                layer.duration.record(started.elapsed().as_secs_f64(), &attributes);
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_follow_codes() {
        assert_eq!(status_name(tonic::Code::Ok), "OK");
        assert_eq!(status_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(status_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(status_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(status_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn health_and_reflection_are_not_traced() {
        assert!(!is_traced("grpc.health.v1.Health/Check"));
        assert!(!is_traced("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(is_traced("moge.v1.Router/Route"));
    }
}
