//! The KServe v2 gRPC front, `inference.GRPCInferenceService`: translates
//! protocol messages to and from [`Frontend`].

use std::sync::Arc;

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
            name: self.frontend.model_name.clone(),
            versions: vec!["1".to_owned()],
            platform: "moge".to_owned(),
            inputs: inputs.into_iter().map(tensor_metadata).collect(),
            outputs: outputs.into_iter().map(tensor_metadata).collect(),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        // The server span of the call already carries the caller's trace context.
        self.frontend
            .observe("grpc", None, model_infer(&self.frontend, request.into_inner()))
            .await
            .map(Response::new)
    }
}

async fn model_infer(frontend: &Frontend, request: ModelInferRequest) -> Result<ModelInferResponse, Status> {
    {
        let inputs = request
            .inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let data = match (request.raw_input_contents.get(index), &input.contents) {
                    (Some(raw), None) => InputData::Raw(raw.clone()),
                    (None, Some(contents)) if input.datatype == "FP32" => {
                        InputData::Fp32(contents.fp32_contents.clone())
                    }
                    (None, Some(_)) => InputData::TypedNotFp32,
                    _ => InputData::Ambiguous,
                };
                InputTensor {
                    name: input.name.clone(),
                    datatype: input.datatype.clone(),
                    shape: input.shape.clone(),
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
        };
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
            model_name: frontend.model_name.clone(),
            model_version: "1".to_owned(),
            id: request.id,
            parameters: Default::default(),
            outputs: tensors,
            raw_output_contents: raw,
        })
    }
}
