//! The model the gateway serves, independent of transport: request
//! validation, inference through the batcher, metadata, and the mapping of
//! pipeline failures to statuses. The gRPC and HTTP fronts translate their
//! wire formats to and from these types.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moge_shared::DType;
use moge_shared::proto::moge::v1::RoutingMode as WireMode;
use tonic::Status;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batcher::{BatchRequest, Batcher};
use crate::metrics::GatewayMetrics;
use crate::pipeline::{LayerResult, PipelineError, Shape};
use crate::upstream::{CallError, Upstreams};

/// Name of the one input tensor.
pub const INPUT: &str = "hidden_states";
/// Names of the outputs, in the order model metadata lists them.
pub const OUTPUTS: [&str; 3] = ["output", "expert_ids", "expert_weights"];

/// The served model as requests are validated against it.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Served model name.
    pub model_name: String,
    /// Layers the deployment hosts, ascending; never empty.
    pub layers: Vec<u32>,
    /// Sizes of the model.
    pub shape: Shape,
    /// Largest request in tokens (`--max-batch-tokens`).
    pub max_batch_tokens: usize,
}

/// The served model and the machinery behind it.
pub struct Frontend {
    /// Model and limits that requests are validated against.
    pub spec: ModelSpec,
    /// Timeout of requests that set none, or a cap on the ones they set
    /// (`--request-timeout-ms`); None for no limit.
    pub request_timeout: Option<Duration>,
    /// The upstream services.
    pub upstreams: Arc<Upstreams>,
    /// Joins concurrent requests into batches.
    pub batcher: Arc<Batcher>,
    /// Instruments and the balance tracker.
    pub metrics: Arc<GatewayMetrics>,
}

/// A request parameter value, as either transport carries it.
#[derive(Clone, Debug)]
pub enum Parameter {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// Any other type.
    Other,
}

/// Data of an input tensor as the request carried it.
#[derive(Clone, Debug)]
pub enum InputData {
    /// Little-endian, row-major bytes.
    Raw(Bytes),
    /// FP32 values.
    Fp32(Vec<f32>),
    /// Typed values of a datatype that must travel as raw bytes.
    TypedNotFp32,
    /// No data, or data in both forms.
    Ambiguous,
}

/// One input tensor of a request.
#[derive(Clone, Debug)]
pub struct InputTensor {
    /// Tensor name.
    pub name: String,
    /// KServe datatype name.
    pub datatype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Data.
    pub data: InputData,
}

/// An inference request in transport-neutral form.
#[derive(Clone, Debug)]
pub struct InferRequest {
    /// Model name.
    pub model_name: String,
    /// Model version; empty for the default.
    pub model_version: String,
    /// Parameters by name.
    pub parameters: Vec<(String, Parameter)>,
    /// Input tensors.
    pub inputs: Vec<InputTensor>,
    /// Requested output names; empty requests `output` only.
    pub outputs: Vec<String>,
    /// Time the client allows, from the transport (`grpc-timeout`); None
    /// for no limit.
    pub timeout: Option<Duration>,
}

/// A request that passed validation, ready for the batcher.
#[derive(Debug)]
pub struct ValidRequest {
    /// Layer index, one the deployment hosts.
    pub layer: u32,
    /// Routing mode; `Unspecified` for the router's default.
    pub mode: WireMode,
    /// Element type of the input.
    pub dtype: DType,
    /// KServe datatype name of the input, which `output` gets too.
    pub datatype: String,
    /// Tokens T, at most `max_batch_tokens`.
    pub tokens: usize,
    /// `[T, H]` little-endian bytes of finite values.
    pub hidden: Bytes,
    /// Requested outputs, each known and named once.
    pub outputs: Vec<String>,
    /// The shorter of the transport's timeout and the `timeout` parameter.
    pub timeout: Option<Duration>,
}

/// One output tensor of a response.
pub struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// KServe datatype name.
    pub datatype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Little-endian, row-major bytes.
    pub data: Bytes,
    /// Element type of `data`, for transports that decode it.
    pub element: Element,
}

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Element {
    /// A floating-point dtype.
    Float(DType),
    /// 32-bit signed integers.
    Int32,
}

/// Metadata of one tensor.
pub struct TensorInfo {
    /// Tensor name.
    pub name: &'static str,
    /// KServe datatype name.
    pub datatype: &'static str,
    /// Shape, -1 for a variable dimension.
    pub shape: Vec<i64>,
}

/// Maps a pipeline failure to the status a client gets.
pub fn status_of(error: PipelineError) -> Status {
    match &error {
        PipelineError::Call(CallError::Unavailable { .. }) => Status::unavailable(error.to_string()),
        PipelineError::Call(CallError::Rejected { status, .. }) => Status::new(status.code(), error.to_string()),
        PipelineError::Call(CallError::DeadlineExceeded { .. }) => Status::deadline_exceeded(error.to_string()),
        PipelineError::Protocol { .. } => Status::internal(error.to_string()),
    }
}

/// Returns the shorter of two optional timeouts.
pub fn shorter(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Returns at most the first 64 characters of a client-supplied name, so
/// that an error message never echoes a huge string back.
pub(crate) fn clip(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

impl ModelSpec {
    /// Checks a model name and version against the served model.
    pub fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        if name != self.model_name {
            return Err(Status::not_found(format!(
                "model {:?} is not served, expected {:?}",
                clip(name),
                self.model_name
            )));
        }
        if !(version.is_empty() || version == "1") {
            return Err(Status::not_found(format!(
                "model {:?} has no version {:?}, expected \"1\" or empty",
                clip(name),
                clip(version)
            )));
        }
        Ok(())
    }
}

impl Frontend {
    /// Checks a model name and version against the served model.
    pub fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        self.spec.check_model(name, version)
    }

    /// Returns whether every upstream has a ready replica.
    pub fn is_ready(&self) -> bool {
        self.upstreams.is_ready()
    }

    /// Describes the input and the outputs. Inputs may be BF16, FP16 or
    /// FP32; `output` follows the input's datatype.
    pub fn metadata(&self) -> (Vec<TensorInfo>, Vec<TensorInfo>) {
        let (h, k) = (self.spec.shape.hidden_size as i64, self.spec.shape.top_k as i64);
        let info = |name, datatype, shape| TensorInfo { name, datatype, shape };
        (
            vec![info(INPUT, "FP32", vec![-1, h])],
            vec![
                info("output", "FP32", vec![-1, h]),
                info("expert_ids", "INT32", vec![-1, k]),
                info("expert_weights", "FP32", vec![-1, k]),
            ],
        )
    }

    /// Runs `work`, one inference request over `protocol` (`grpc` or
    /// `http`), in a request span and records its status and duration.
    /// `parent` is the caller's trace context where the transport has not
    /// applied it already.
    pub async fn observe<T>(
        &self,
        protocol: &'static str,
        parent: Option<opentelemetry::Context>,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!(
            "infer",
            otel.name = "moge.infer",
            moge.protocol = protocol,
            moge.layer = tracing::field::Empty,
            moge.tokens = tracing::field::Empty,
        );
        if let Some(parent) = parent {
            let _ = span.set_parent(parent);
        }
        let result = work.instrument(span).await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics
            .record_request(protocol, code, started.elapsed().as_secs_f64());
        result
    }

    /// Validates a request, runs it through the batcher and returns the
    /// requested outputs in the requested order.
    pub async fn infer(&self, request: InferRequest) -> Result<Vec<OutputTensor>, Status> {
        let request = self.spec.validate(request)?;
        let (layer, tokens, dtype) = (request.layer, request.tokens, request.dtype);
        let span = tracing::Span::current();
        span.record("moge.layer", layer);
        span.record("moge.tokens", tokens);
        let result = if tokens == 0 {
            LayerResult {
                output: Vec::new(),
                expert_ids: Vec::new(),
                expert_weights: Vec::new(),
            }
        } else {
            let submitted = BatchRequest {
                layer,
                mode: request.mode as i32,
                dtype,
                tokens,
                hidden: request.hidden,
                timeout: shorter(request.timeout, self.request_timeout),
            };
            self.batcher.submit(submitted).await.inspect_err(|status| {
                tracing::debug!(layer, tokens, code = ?status.code(), message = status.message(), "inference failed");
            })?
        };

        let (h, k) = (self.spec.shape.hidden_size as i64, self.spec.shape.top_k as i64);
        let outputs = request
            .outputs
            .into_iter()
            .map(|name| {
                let (datatype, shape, data, element) = match name.as_str() {
                    "output" => (
                        request.datatype.clone(),
                        vec![tokens as i64, h],
                        dtype.encode(&result.output),
                        Element::Float(dtype),
                    ),
                    "expert_ids" => (
                        "INT32".to_owned(),
                        vec![tokens as i64, k],
                        result
                            .expert_ids
                            .iter()
                            .flat_map(|id| (*id as i32).to_le_bytes())
                            .collect(),
                        Element::Int32,
                    ),
                    _ => (
                        "FP32".to_owned(),
                        vec![tokens as i64, k],
                        DType::F32.encode(&result.expert_weights),
                        Element::Float(DType::F32),
                    ),
                };
                OutputTensor {
                    name,
                    datatype,
                    shape,
                    data: data.into(),
                    element,
                }
            })
            .collect();
        Ok(outputs)
    }
}
