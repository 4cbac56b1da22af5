//! The KServe v2 HTTP/JSON front: health, metadata and inference for curl
//! and REST clients. JSON carries FP32 and FP16 numbers; BF16 has no JSON
//! form in the protocol, so BF16 requests must use gRPC raw contents.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use half::f16;
use moge_shared::DType;
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::frontend::{Element, Frontend, InferRequest, InputData, InputTensor, OutputTensor, Parameter, TensorInfo};

/// Builds the HTTP routes over a shared [`Frontend`].
pub fn router(frontend: Arc<Frontend>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .route("/v1/balance", get(balance))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(frontend)
}

/// An error response: the status mapped from the gRPC code, and
/// `{"error": message}` as the protocol specifies.
struct HttpError(Status);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": self.0.message() }))).into_response()
    }
}

impl From<Status> for HttpError {
    fn from(status: Status) -> Self {
        HttpError(status)
    }
}

fn invalid(message: impl Into<String>) -> HttpError {
    HttpError(Status::invalid_argument(message.into()))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({ "name": "moge-serve", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }))
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// Readiness: 200 when ready; the protocol uses a 4xx status for not ready.
fn readiness(ready: bool) -> Response {
    let status = if ready { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(json!({ "ready": ready }))).into_response()
}

async fn ready(State(frontend): State<Arc<Frontend>>) -> Response {
    readiness(frontend.is_ready())
}

async fn model_ready(State(frontend): State<Arc<Frontend>>, Path(model): Path<String>) -> Result<Response, HttpError> {
    frontend.check_model(&model, "")?;
    Ok(readiness(frontend.is_ready()))
}

fn tensor_json(info: TensorInfo) -> Value {
    json!({ "name": info.name, "datatype": info.datatype, "shape": info.shape })
}

fn metadata(frontend: &Frontend, model: &str, version: &str) -> Result<Json<Value>, HttpError> {
    frontend.check_model(model, version)?;
    let (inputs, outputs) = frontend.metadata();
    Ok(Json(json!({
        "name": frontend.spec.model_name,
        "versions": ["1"],
        "platform": "moge",
        "inputs": inputs.into_iter().map(tensor_json).collect::<Vec<_>>(),
        "outputs": outputs.into_iter().map(tensor_json).collect::<Vec<_>>(),
    })))
}

async fn model_metadata(
    State(frontend): State<Arc<Frontend>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, HttpError> {
    metadata(&frontend, &model, "")
}

async fn model_metadata_version(
    State(frontend): State<Arc<Frontend>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, HttpError> {
    metadata(&frontend, &model, &version)
}

/// Builds the response to a request body that could not be read, such as
/// one over `--max-message-bytes`: the rejection's status and a JSON error.
fn body_error(rejection: BytesRejection) -> Response {
    let message = format!(
        "request body rejected: {}; the limit is set by --max-message-bytes",
        rejection.body_text()
    );
    (rejection.status(), Json(json!({ "error": message }))).into_response()
}

async fn infer(
    State(frontend): State<Arc<Frontend>>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body {
        Ok(body) => observe_infer(&frontend, model, String::new(), &headers, &body)
            .await
            .into_response(),
        Err(rejection) => body_error(rejection),
    }
}

async fn infer_version(
    State(frontend): State<Arc<Frontend>>,
    Path((model, version)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body {
        Ok(body) => observe_infer(&frontend, model, version, &headers, &body)
            .await
            .into_response(),
        Err(rejection) => body_error(rejection),
    }
}

/// Per device, the assignments over the last minute and in total, with
/// the imbalance score and straggler gap of recent batches.
async fn balance(State(frontend): State<Arc<Frontend>>) -> Json<moge_telemetry::balance::BalanceReport> {
    Json(frontend.metrics.balance.report())
}

async fn observe_infer(
    frontend: &Frontend,
    model: String,
    version: String,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<Json<InferResponseJson>, HttpError> {
    let parent = moge_telemetry::propagation::extract(headers);
    let work = async { run_infer(frontend, model, version, body).await.map_err(|error| error.0) };
    Ok(frontend.observe("http", Some(parent), work).await?)
}

/// Appends the numbers of a nested JSON array to `out`, row-major.
fn flatten(value: &Value, out: &mut Vec<f64>) -> Result<(), HttpError> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|item| flatten(item, out)),
        Value::Number(number) => {
            out.push(number.as_f64().unwrap_or(f64::NAN));
            Ok(())
        }
        other => Err(invalid(format!("input data: {other} is not a number"))),
    }
}

fn parse_input(value: &Value) -> Result<InputTensor, HttpError> {
    let name = value["name"]
        .as_str()
        .ok_or_else(|| invalid("inputs[].name: missing, expected a string"))?;
    let datatype = value["datatype"]
        .as_str()
        .ok_or_else(|| invalid("inputs[].datatype: missing, expected a string"))?;
    let shape = value["shape"]
        .as_array()
        .and_then(|dims| dims.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
        .ok_or_else(|| invalid("inputs[].shape: missing, expected an array of integers"))?;
    let mut numbers = Vec::new();
    flatten(&value["data"], &mut numbers)?;
    let data = match datatype {
        "FP32" => InputData::Fp32(numbers.iter().map(|&v| v as f32).collect()),
        "FP16" => {
            let values: Vec<f32> = numbers.iter().map(|&v| f16::from_f64(v).to_f32()).collect();
            InputData::Raw(DType::F16.encode(&values).into())
        }
        "BF16" => {
            return Err(invalid(
                "input hidden_states: BF16 has no JSON representation in the KServe v2 HTTP protocol; \
                 send BF16 over gRPC in raw_input_contents, or send FP32 or FP16 here",
            ));
        }
        // Let the frontend report the unsupported datatype by name.
        _ => InputData::Fp32(Vec::new()),
    };
    Ok(InputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape,
        data,
    })
}

/// Body of a successful inference response.
#[derive(serde::Serialize)]
struct InferResponseJson {
    model_name: String,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Value>,
    outputs: Vec<OutputJson>,
}

/// One output tensor of [`InferResponseJson`].
#[derive(serde::Serialize)]
struct OutputJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    data: OutputData,
}

/// Output elements. Floats stay `f32` up to the serializer, so each is
/// printed as the shortest decimal that reads back to the same `f32`
/// (`0.1`, not `0.10000000149011612`). NaN and infinities become `null`.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum OutputData {
    Float(Vec<f32>),
    Int32(Vec<i32>),
}

fn output_json(output: OutputTensor) -> OutputJson {
    let data = match output.element {
        Element::Float(dtype) => OutputData::Float(dtype.decode(&output.data).unwrap_or_default()),
        Element::Int32 => OutputData::Int32(
            output
                .data
                .chunks_exact(4)
                .map(|chunk| i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect(),
        ),
    };
    OutputJson {
        name: output.name,
        datatype: output.datatype,
        shape: output.shape,
        data,
    }
}

async fn run_infer(
    frontend: &Frontend,
    model: String,
    version: String,
    body: &[u8],
) -> Result<Json<InferResponseJson>, HttpError> {
    let request: Value =
        serde_json::from_slice(body).map_err(|error| invalid(format!("request body is not valid JSON: {error}")))?;
    let inputs = request["inputs"]
        .as_array()
        .ok_or_else(|| invalid("inputs: missing, expected an array"))?
        .iter()
        .map(parse_input)
        .collect::<Result<Vec<_>, _>>()?;
    let parameters = request["parameters"]
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(key, value)| {
                    let parameter = match value {
                        Value::Number(number) if number.is_i64() => Parameter::Int(number.as_i64().unwrap_or(0)),
                        Value::String(text) => Parameter::Str(text.clone()),
                        _ => Parameter::Other,
                    };
                    (key.clone(), parameter)
                })
                .collect()
        })
        .unwrap_or_default();
    let outputs = request["outputs"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|item| item["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let neutral = InferRequest {
        model_name: model,
        model_version: version,
        parameters,
        inputs,
        outputs,
        timeout: None,
    };
    let outputs = frontend.infer(neutral).await?;
    Ok(Json(InferResponseJson {
        model_name: frontend.spec.model_name.clone(),
        model_version: "1",
        id: request.get("id").cloned(),
        outputs: outputs.into_iter().map(output_json).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(element: Element, datatype: &str, data: Vec<u8>, count: i64) -> OutputTensor {
        OutputTensor {
            name: "output".to_owned(),
            datatype: datatype.to_owned(),
            shape: vec![1, count],
            data: Bytes::from(data),
            element,
        }
    }

    #[test]
    fn float_outputs_print_shortest_f32() {
        let values = [0.1_f32, -1.0e-8, 3.4028235e38, f32::NAN, f32::INFINITY];
        let tensor = output(Element::Float(DType::F32), "FP32", DType::F32.encode(&values), 5);
        let text = serde_json::to_string(&output_json(tensor)).unwrap();
        assert_eq!(
            text,
            r#"{"name":"output","datatype":"FP32","shape":[1,5],"data":[0.1,-1e-8,3.4028235e+38,null,null]}"#
        );
    }

    #[test]
    fn printed_floats_read_back_exactly() {
        let values: Vec<f32> = (0..2000_u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) % 0x7f00_0000))
            .collect();
        let tensor = output(Element::Float(DType::F32), "FP32", DType::F32.encode(&values), 2000);
        let text = serde_json::to_string(&output_json(tensor)).unwrap();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let read: Vec<f32> = parsed["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|number| number.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(read, values);
    }

    #[test]
    fn int32_outputs_print_as_integers() {
        let data: Vec<u8> = [7_i32, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = output(Element::Int32, "INT32", data, 2);
        let text = serde_json::to_string(&output_json(tensor)).unwrap();
        assert!(text.ends_with(r#""data":[7,-3]}"#), "{text}");
    }
}
