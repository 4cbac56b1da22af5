//! The model the gateway serves, independent of transport: request
//! validation, inference through the batcher, metadata, and the mapping of
//! pipeline failures to statuses. The gRPC and HTTP fronts translate their
//! wire formats to and from these types.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use moge_shared::DType;
use moge_shared::proto::moge::v1::RoutingMode as WireMode;
use tonic::Status;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batcher::Batcher;
use crate::metrics::GatewayMetrics;
use crate::pipeline::{LayerResult, PipelineError, Shape};
use crate::upstream::{CallError, Upstreams};

/// Name of the one input tensor.
pub const INPUT: &str = "hidden_states";
/// Names of the outputs, in the order model metadata lists them.
pub const OUTPUTS: [&str; 3] = ["output", "expert_ids", "expert_weights"];
/// Request parameters that Triton clients may send and the gateway ignores;
/// Triton's perf_analyzer sends `triton_enable_empty_final_response`.
const IGNORED_PARAMETERS: [&str; 6] = [
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "triton_enable_empty_final_response",
];

/// The served model and the machinery behind it.
pub struct Frontend {
    /// Served model name.
    pub model_name: String,
    /// Layers the deployment hosts, ascending.
    pub layers: Vec<u32>,
    /// Sizes of the model.
    pub shape: Shape,
    /// Largest request in tokens.
    pub max_batch_tokens: usize,
    /// The upstream services.
    pub upstreams: Arc<Upstreams>,
    /// Joins concurrent requests into batches.
    pub batcher: Arc<Batcher>,
    /// Instruments and the balance tracker.
    pub metrics: Arc<GatewayMetrics>,
}

/// A request parameter value, as either transport carries it.
pub enum Parameter {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// Any other type.
    Other,
}

/// Data of an input tensor as the request carried it.
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
        PipelineError::Protocol { .. } => Status::internal(error.to_string()),
    }
}

fn parse_datatype(text: &str) -> Result<DType, Status> {
    match text {
        "BF16" => Ok(DType::BF16),
        "FP16" => Ok(DType::F16),
        "FP32" => Ok(DType::F32),
        other => Err(Status::invalid_argument(format!(
            "input {INPUT}: datatype {other:?} is not supported, expected BF16, FP16 or FP32"
        ))),
    }
}

impl Frontend {
    /// Checks a model name and version against the served model.
    pub fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        if name != self.model_name {
            return Err(Status::not_found(format!(
                "model {name:?} is not served, expected {:?}",
                self.model_name
            )));
        }
        if !(version.is_empty() || version == "1") {
            return Err(Status::not_found(format!(
                "model {name:?} has no version {version:?}, expected \"1\" or empty"
            )));
        }
        Ok(())
    }

    /// Returns whether every upstream has a ready replica.
    pub fn is_ready(&self) -> bool {
        self.upstreams.is_ready()
    }

    /// Describes the input and the outputs. Inputs may be BF16, FP16 or
    /// FP32; `output` follows the input's datatype.
    pub fn metadata(&self) -> (Vec<TensorInfo>, Vec<TensorInfo>) {
        let (h, k) = (self.shape.hidden_size as i64, self.shape.top_k as i64);
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
        self.check_model(&request.model_name, &request.model_version)?;

        // Parameters.
        let mut layer = None;
        let mut mode = WireMode::Unspecified;
        for (key, value) in request.parameters {
            match (key.as_str(), value) {
                ("layer", Parameter::Int(value)) => layer = Some(value),
                ("layer", _) => return Err(Status::invalid_argument("parameter layer: expected an int64 value")),
                ("routing", Parameter::Str(value)) => {
                    mode = match value.as_str() {
                        "moge" => WireMode::Moge,
                        "top-k" => WireMode::TopK,
                        "group-limited" => WireMode::GroupLimited,
                        other => {
                            return Err(Status::invalid_argument(format!(
                                "parameter routing: {other:?} is not a routing mode, expected moge, top-k or group-limited"
                            )));
                        }
                    }
                }
                ("routing", _) => return Err(Status::invalid_argument("parameter routing: expected a string value")),
                (key, _) if IGNORED_PARAMETERS.contains(&key) => {}
                (key, _) => {
                    return Err(Status::invalid_argument(format!(
                        "parameter {key:?} is not supported, expected layer or routing"
                    )));
                }
            }
        }
        let layer = match layer {
            None => self.layers[0],
            Some(value) => u32::try_from(value)
                .ok()
                .filter(|layer| self.layers.contains(layer))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "parameter layer: {value} is not hosted, expected one of {:?}",
                        self.layers
                    ))
                })?,
        };

        // The one input: name, datatype, shape, then its bytes.
        let [input] = &request.inputs[..] else {
            return Err(Status::invalid_argument(format!(
                "inputs: {} given, expected exactly one, {INPUT}",
                request.inputs.len()
            )));
        };
        if input.name != INPUT {
            return Err(Status::invalid_argument(format!(
                "input {:?} is not known, expected {INPUT}",
                input.name
            )));
        }
        let dtype = parse_datatype(&input.datatype)?;
        let h = self.shape.hidden_size;
        let tokens = match input.shape[..] {
            [tokens, width] if tokens >= 0 && width == h as i64 => tokens as usize,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: shape {:?} is invalid, expected [T, {h}] with T >= 0",
                    input.shape
                )));
            }
        };
        if tokens > self.max_batch_tokens {
            return Err(Status::invalid_argument(format!(
                "input {INPUT}: {tokens} tokens exceed the limit of {}",
                self.max_batch_tokens
            )));
        }
        let raw: Bytes = match &input.data {
            InputData::Raw(raw) => raw.clone(),
            InputData::Fp32(values) => DType::F32.encode(values).into(),
            InputData::TypedNotFp32 => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: typed contents carry only FP32, send {} as raw bytes",
                    input.datatype
                )));
            }
            InputData::Ambiguous => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: expected its data in exactly one of raw_input_contents or contents"
                )));
            }
        };
        let expected_bytes = tokens * h * dtype.size();
        if raw.len() != expected_bytes {
            return Err(Status::invalid_argument(format!(
                "input {INPUT}: {} bytes do not match shape [{tokens}, {h}] of {} ({expected_bytes} bytes)",
                raw.len(),
                input.datatype
            )));
        }
        let values = dtype
            .decode(&raw)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            return Err(Status::invalid_argument(format!(
                "input {INPUT}: element [{}, {}] is {}, expected finite values",
                index / h,
                index % h,
                values[index]
            )));
        }

        // Requested outputs: `output` when none are named.
        let mut requested: Vec<String> = request.outputs;
        if requested.is_empty() {
            requested.push("output".to_owned());
        }
        let mut seen = BTreeSet::new();
        for name in &requested {
            if !OUTPUTS.contains(&name.as_str()) || !seen.insert(name.clone()) {
                return Err(Status::invalid_argument(format!(
                    "output {name:?} is unknown or repeated, expected each of {OUTPUTS:?} at most once"
                )));
            }
        }

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
            self.batcher
                .submit(layer, mode as i32, dtype, tokens, raw)
                .await
                .inspect_err(|status| {
                    tracing::debug!(layer, tokens, code = ?status.code(), message = status.message(), "inference failed");
                })?
        };

        let k = self.shape.top_k as i64;
        let outputs = requested
            .into_iter()
            .map(|name| {
                let (datatype, shape, data, element) = match name.as_str() {
                    "output" => (
                        input.datatype.clone(),
                        vec![tokens as i64, h as i64],
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
