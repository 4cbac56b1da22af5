//! The KServe v2 `inference.GRPCInferenceService`: validation, metadata and
//! the mapping of pipeline results and errors to the protocol.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use moge_shared::DType;
use moge_shared::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use moge_shared::proto::inference::infer_parameter::ParameterChoice;
use moge_shared::proto::inference::model_infer_response::InferOutputTensor;
use moge_shared::proto::inference::model_metadata_response::TensorMetadata;
use moge_shared::proto::inference::*;
use moge_shared::proto::moge::v1::RoutingMode as WireMode;
use tonic::{Request, Response, Status};

use crate::batcher::Batcher;
use crate::pipeline::{self, PipelineError, Shape};
use crate::upstream::{CallError, Upstreams};

/// Name of the one input tensor.
pub const INPUT: &str = "hidden_states";
/// Names of the outputs, in the order ModelMetadata lists them.
pub const OUTPUTS: [&str; 3] = ["output", "expert_ids", "expert_weights"];
/// Request parameters that Triton clients may send and the gateway ignores.
const IGNORED_PARAMETERS: [&str; 5] = ["priority", "timeout", "sequence_id", "sequence_start", "sequence_end"];

/// Gateway configuration the protocol layer needs.
pub struct Frontend {
    /// Served model name.
    pub model_name: String,
    /// Layers the deployment hosts, ascending.
    pub layers: Vec<u32>,
    /// Sizes of the model.
    pub shape: Shape,
    /// Largest batch in tokens.
    pub max_batch_tokens: usize,
    /// The upstream services.
    pub upstreams: Arc<Upstreams>,
    /// Joins concurrent requests into batches.
    pub batcher: Arc<Batcher>,
}

#[derive(Clone)]
pub struct KServe {
    frontend: Arc<Frontend>,
}

impl KServe {
    pub fn new(frontend: Frontend) -> Self {
        KServe {
            frontend: Arc::new(frontend),
        }
    }

    fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        if name != self.frontend.model_name {
            return Err(Status::not_found(format!(
                "model {name:?} is not served, expected {:?}",
                self.frontend.model_name
            )));
        }
        if !(version.is_empty() || version == "1") {
            return Err(Status::not_found(format!(
                "model {name:?} has no version {version:?}, expected \"1\" or empty"
            )));
        }
        Ok(())
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

/// The request's parameters that the gateway acts on.
struct Parameters {
    layer: Option<i64>,
    mode: WireMode,
}

fn parameters(request: &ModelInferRequest) -> Result<Parameters, Status> {
    let mut parsed = Parameters {
        layer: None,
        mode: WireMode::Unspecified,
    };
    for (key, value) in &request.parameters {
        match (key.as_str(), &value.parameter_choice) {
            ("layer", Some(ParameterChoice::Int64Param(layer))) => parsed.layer = Some(*layer),
            ("layer", _) => return Err(Status::invalid_argument("parameter layer: expected an int64 value")),
            ("routing", Some(ParameterChoice::StringParam(mode))) => {
                parsed.mode = match mode.as_str() {
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
    Ok(parsed)
}

/// Maps a pipeline failure to the status a client gets.
pub fn status_of(error: PipelineError) -> Status {
    match &error {
        PipelineError::Call(CallError::Unavailable { .. }) => Status::unavailable(error.to_string()),
        PipelineError::Call(CallError::Rejected { status, .. }) => Status::new(status.code(), error.to_string()),
        PipelineError::Protocol { .. } => Status::internal(error.to_string()),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.frontend.upstreams.is_ready(),
        }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        self.check_model(&request.name, &request.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.frontend.upstreams.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "moge-serve".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        self.check_model(&request.name, &request.version)?;
        let shape = self.frontend.shape;
        let (h, k) = (shape.hidden_size as i64, shape.top_k as i64);
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape,
        };
        Ok(Response::new(ModelMetadataResponse {
            name: self.frontend.model_name.clone(),
            versions: vec!["1".to_owned()],
            platform: "moge".to_owned(),
            // BF16, FP16 and FP32 are all accepted; outputs follow the input's datatype.
            inputs: vec![tensor(INPUT, "FP32", vec![-1, h])],
            outputs: vec![
                tensor("output", "FP32", vec![-1, h]),
                tensor("expert_ids", "INT32", vec![-1, k]),
                tensor("expert_weights", "FP32", vec![-1, k]),
            ],
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let request = request.into_inner();
        let frontend = &self.frontend;
        self.check_model(&request.model_name, &request.model_version)?;
        let params = parameters(&request)?;
        let layer = match params.layer {
            None => frontend.layers[0],
            Some(layer) => u32::try_from(layer)
                .ok()
                .filter(|layer| frontend.layers.contains(layer))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "parameter layer: {layer} is not hosted, expected one of {:?}",
                        frontend.layers
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
        let h = frontend.shape.hidden_size;
        let tokens = match input.shape[..] {
            [tokens, width] if tokens >= 0 && width == h as i64 => tokens as usize,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: shape {:?} is invalid, expected [T, {h}] with T >= 0",
                    input.shape
                )));
            }
        };
        if tokens > frontend.max_batch_tokens {
            return Err(Status::invalid_argument(format!(
                "input {INPUT}: {tokens} tokens exceed the limit of {}",
                frontend.max_batch_tokens
            )));
        }
        let expected_bytes = tokens * h * dtype.size();
        let raw: Bytes = match (&request.raw_input_contents[..], &input.contents) {
            ([raw], None) => raw.clone(),
            ([], Some(contents)) if dtype == DType::F32 => DType::F32.encode(&contents.fp32_contents).into(),
            ([], Some(_)) => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: typed contents carry only FP32, send {} in raw_input_contents",
                    input.datatype
                )));
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "input {INPUT}: expected its data in exactly one of raw_input_contents or contents"
                )));
            }
        };
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
        let mut requested: Vec<&str> = request.outputs.iter().map(|output| output.name.as_str()).collect();
        if requested.is_empty() {
            requested.push("output");
        }
        let mut seen = BTreeSet::new();
        for name in &requested {
            if !OUTPUTS.contains(name) || !seen.insert(*name) {
                return Err(Status::invalid_argument(format!(
                    "output {name:?} is unknown or repeated, expected each of {OUTPUTS:?} at most once"
                )));
            }
        }

        let result = if tokens == 0 {
            pipeline::LayerResult {
                output: Vec::new(),
                expert_ids: Vec::new(),
                expert_weights: Vec::new(),
            }
        } else {
            frontend
                .batcher
                .submit(layer, params.mode as i32, dtype, tokens, raw)
                .await
                .inspect_err(|status| {
                    tracing::debug!(layer, tokens, code = ?status.code(), message = status.message(), "inference failed");
                })?
        };

        let k = frontend.shape.top_k as i64;
        let mut outputs = Vec::new();
        let mut raw_outputs = Vec::new();
        for name in requested {
            let (datatype, shape, bytes) = match name {
                "output" => (
                    input.datatype.clone(),
                    vec![tokens as i64, h as i64],
                    dtype.encode(&result.output),
                ),
                "expert_ids" => (
                    "INT32".to_owned(),
                    vec![tokens as i64, k],
                    result
                        .expert_ids
                        .iter()
                        .flat_map(|id| (*id as i32).to_le_bytes())
                        .collect(),
                ),
                _ => (
                    "FP32".to_owned(),
                    vec![tokens as i64, k],
                    DType::F32.encode(&result.expert_weights),
                ),
            };
            outputs.push(InferOutputTensor {
                name: name.to_owned(),
                datatype,
                shape,
                ..Default::default()
            });
            raw_outputs.push(Bytes::from(bytes));
        }
        Ok(Response::new(ModelInferResponse {
            model_name: frontend.model_name.clone(),
            model_version: "1".to_owned(),
            id: request.id,
            parameters: Default::default(),
            outputs,
            raw_output_contents: raw_outputs,
        }))
    }
}
