//! The KServe v2 gRPC front, `inference.GRPCInferenceService`: translates
//! protocol messages to and from [`Frontend`].

use std::sync::Arc;
use std::time::Duration;

use moge_shared::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use moge_shared::proto::inference::infer_parameter::ParameterChoice;
use moge_shared::proto::inference::model_infer_response::InferOutputTensor;
use moge_shared::proto::inference::model_metadata_response::TensorMetadata;
use moge_shared::proto::inference::*;
use tonic::{Request, Response, Status};

use crate::frontend::{Frontend, InferRequest, InputData, InputTensor, Parameter, TensorInfo};

/// The gRPC service over a shared [`Frontend`].
#[derive(Clone)]
pub struct KServe {
    frontend: Arc<Frontend>,
}

impl KServe {
    /// Serves `frontend` over gRPC.
    pub fn new(frontend: Arc<Frontend>) -> Self {
        KServe { frontend }
    }
}

fn parameter(value: &InferParameter) -> Parameter {
    match &value.parameter_choice {
        Some(ParameterChoice::Int64Param(value)) => Parameter::Int(*value),
        Some(ParameterChoice::StringParam(value)) => Parameter::Str(value.clone()),
        _ => Parameter::Other,
    }
}

fn tensor_metadata(info: TensorInfo) -> TensorMetadata {
    TensorMetadata {
        name: info.name.to_owned(),
        datatype: info.datatype.to_owned(),
        shape: info.shape,
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.frontend.is_ready(),
        }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        self.frontend.check_model(&request.name, &request.version)?;
        Ok(Response::new(ModelReadyResponse {
            ready: self.frontend.is_ready(),
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
        self.frontend.check_model(&request.name, &request.version)?;
        let (inputs, outputs) = self.frontend.metadata();
        Ok(Response::new(ModelMetadataResponse {
            name: self.frontend.spec.model_name.clone(),
            versions: vec!["1".to_owned()],
            platform: "moge".to_owned(),
            inputs: inputs.into_iter().map(tensor_metadata).collect(),
            outputs: outputs.into_iter().map(tensor_metadata).collect(),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        // The server span of the call already carries the caller's trace context.
        self.frontend
            .observe("grpc", None, model_infer(&self.frontend, request.into_inner(), timeout))
            .await
            .map(Response::new)
    }
}

/// Reads the client's deadline from the `grpc-timeout` header: up to 8
/// digits and a unit (H, M, S, m, u or n). A malformed header counts as
/// none, as tonic's server treats it.
///
/// NOTE: tonic's server starts its own timer for the same header just
/// before the handler runs and returns CANCELLED when it fires. The
/// returned timeout is 1 ms shorter, so that the gateway's timer fires
/// first and the client gets DEADLINE_EXCEEDED with a message.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    };
    Some(timeout.saturating_sub(Duration::from_millis(1)))
}

/// Translates a protocol request into the transport-neutral form and
/// returns it with the request's id.
pub fn neutral_request(
    request: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<(String, InferRequest), Status> {
    let raw_count = request.raw_input_contents.len();
    if raw_count != 0 && raw_count != request.inputs.len() {
        return Err(Status::invalid_argument(format!(
            "raw_input_contents: {raw_count} entries for {} inputs, expected one per input or none",
            request.inputs.len()
        )));
    }
    let mut raw_contents = request.raw_input_contents.into_iter();
    let inputs = request
        .inputs
        .into_iter()
        .map(|input| {
            let data = match (raw_contents.next(), input.contents) {
                (Some(raw), None) => InputData::Raw(raw),
                (None, Some(contents)) if input.datatype == "FP32" => InputData::Fp32(contents.fp32_contents),
                (None, Some(_)) => InputData::TypedNotFp32,
                _ => InputData::Ambiguous,
            };
            InputTensor {
                name: input.name,
                datatype: input.datatype,
                shape: input.shape,
                data,
            }
        })
        .collect();
    let neutral = InferRequest {
        model_name: request.model_name,
        model_version: request.model_version,
        parameters: request
            .parameters
            .iter()
            .map(|(key, value)| (key.clone(), parameter(value)))
            .collect(),
        inputs,
        outputs: request.outputs.into_iter().map(|output| output.name).collect(),
        timeout,
    };
    Ok((request.id, neutral))
}

async fn model_infer(
    frontend: &Frontend,
    request: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<ModelInferResponse, Status> {
    let (id, neutral) = neutral_request(request, timeout)?;
    let outputs = frontend.infer(neutral).await?;
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for output in outputs {
        tensors.push(InferOutputTensor {
            name: output.name,
            datatype: output.datatype,
            shape: output.shape,
            ..Default::default()
        });
        raw.push(output.data);
    }
    Ok(ModelInferResponse {
        model_name: frontend.spec.model_name.clone(),
        model_version: "1".to_owned(),
        id,
        parameters: Default::default(),
        outputs: tensors,
        raw_output_contents: raw,
    })
}

#[cfg(test)]
mod tests {
    use moge_shared::proto::inference::model_infer_request::InferInputTensor;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::frontend::ModelSpec;
    use crate::pipeline::Shape;

    #[test]
    fn grpc_timeout_units() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (text, expected) in [
            ("5S", Some(Duration::from_millis(4999))),
            ("250m", Some(Duration::from_millis(249))),
            ("2M", Some(Duration::from_millis(119_999))),
            ("900u", Some(Duration::ZERO)),
            ("123456789S", None),
            ("S", None),
            ("5x", None),
            ("-5S", None),
        ] {
            metadata.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), expected, "{text}");
        }
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            model_name: "moge".to_owned(),
            layers: vec![0],
            shape: Shape {
                hidden_size: 4,
                top_k: 2,
                num_groups: 2,
                experts_per_group: 2,
            },
            max_batch_tokens: 8,
        }
    }

    fn encoded_request() -> Vec<u8> {
        ModelInferRequest {
            model_name: "moge".to_owned(),
            id: "fuzz".to_owned(),
            inputs: vec![InferInputTensor {
                name: "hidden_states".to_owned(),
                datatype: "FP32".to_owned(),
                shape: vec![2, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 32].into()],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn mismatched_raw_input_count_is_rejected() {
        let mut request = ModelInferRequest::decode(encoded_request().as_slice()).unwrap();
        request.raw_input_contents.push(vec![0u8; 4].into());
        let error = neutral_request(request, None).unwrap_err();
        assert!(
            error.message().contains("2 entries for 1 inputs"),
            "{}",
            error.message()
        );
    }

    proptest! {
        // A bounded fuzz run of protobuf decoding, translation and
        // validation on damaged messages; PROPTEST_CASES raises it.
        #![proptest_config(ProptestConfig::with_cases(10000))]

        #[test]
        fn damaged_messages_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            truncate in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = encoded_request();
            for (index, value) in edits {
                let at = index.index(bytes.len());
                bytes[at] = value;
            }
            if let Some(index) = truncate {
                bytes.truncate(index.index(bytes.len()));
            }
            if let Ok(request) = ModelInferRequest::decode(bytes.as_slice())
                && let Ok((_, neutral)) = neutral_request(request, None)
            {
                match spec().validate(neutral) {
                    Ok(valid) => prop_assert_eq!(valid.hidden.len(), valid.tokens * 4 * valid.dtype.size()),
                    Err(status) => prop_assert!(
                        matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound),
                        "{:?}",
                        status
                    ),
                }
            }
        }
    }
}
