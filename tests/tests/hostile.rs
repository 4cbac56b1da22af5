//! Hostile and malformed requests against the real gateway, over gRPC and
//! HTTP: each gets the right status and a message that names the problem,
//! and the gateway stays healthy and serves a good request afterwards.

use std::time::{Duration, Instant};

use moge_shared::DType;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::proto::inference::infer_parameter::ParameterChoice;
use moge_shared::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use moge_shared::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use moge_tests::{generate_small, http_request, start_stack_with_gateway_args};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Message limit of every service in this test: small, so that an
/// oversized message costs little.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

fn hidden_states(tokens: usize) -> Vec<f32> {
    (0..tokens * 512)
        .map(|i| ((i * 7901) % 983) as f32 / 983.0 - 0.5)
        .collect()
}

fn int_parameter(value: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(value)),
    }
}

fn string_parameter(value: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
    }
}

fn good_request() -> ModelInferRequest {
    ModelInferRequest {
        model_name: "moge".to_owned(),
        id: "good".to_owned(),
        inputs: vec![InferInputTensor {
            name: "hidden_states".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![2, 512],
            ..Default::default()
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "output".to_owned(),
            ..Default::default()
        }],
        raw_input_contents: vec![DType::F32.encode(&hidden_states(2)).into()],
        ..Default::default()
    }
}

/// Returns the good request changed by `change`.
fn with(change: impl FnOnce(&mut ModelInferRequest)) -> ModelInferRequest {
    let mut request = good_request();
    change(&mut request);
    request
}

/// Returns the gRPC table: request, expected code, and a substring of the
/// message.
fn grpc_cases() -> Vec<(&'static str, ModelInferRequest, Code, &'static str)> {
    let mut nan = hidden_states(2);
    nan[7] = f32::NAN;
    let mut inf = hidden_states(2);
    inf[512 + 3] = f32::NEG_INFINITY;
    vec![
        (
            "truncated raw bytes",
            with(|r| r.raw_input_contents[0] = r.raw_input_contents[0].slice(..4001)),
            Code::InvalidArgument,
            "4001 bytes do not match shape [2, 512]",
        ),
        (
            "shape product overflows",
            with(|r| r.inputs[0].shape = vec![i64::MAX, i64::MAX]),
            Code::InvalidArgument,
            "expected [T, 512]",
        ),
        (
            "huge token count",
            with(|r| r.inputs[0].shape = vec![i64::MAX, 512]),
            Code::InvalidArgument,
            "tokens exceed the limit of 1024",
        ),
        (
            "token count just over the limit",
            with(|r| r.inputs[0].shape = vec![1025, 512]),
            Code::InvalidArgument,
            "1025 tokens exceed the limit of 1024 (--max-batch-tokens)",
        ),
        (
            "negative token count",
            with(|r| r.inputs[0].shape = vec![-1, 512]),
            Code::InvalidArgument,
            "negative dimension",
        ),
        (
            "most negative width",
            with(|r| r.inputs[0].shape = vec![2, i64::MIN]),
            Code::InvalidArgument,
            "negative dimension",
        ),
        (
            "rank 1",
            with(|r| r.inputs[0].shape = vec![1024]),
            Code::InvalidArgument,
            "has rank 1, expected [T, 512] (rank 2)",
        ),
        (
            "rank 0",
            with(|r| r.inputs[0].shape = vec![]),
            Code::InvalidArgument,
            "has rank 0, expected [T, 512] (rank 2)",
        ),
        (
            "rank 3",
            with(|r| r.inputs[0].shape = vec![1, 2, 512]),
            Code::InvalidArgument,
            "has rank 3, expected [T, 512] (rank 2)",
        ),
        (
            "wrong hidden size",
            with(|r| r.inputs[0].shape = vec![4, 256]),
            Code::InvalidArgument,
            "shape [4, 256] is invalid, expected [T, 512]",
        ),
        (
            "no input",
            with(|r| {
                r.inputs.clear();
                r.raw_input_contents.clear();
            }),
            Code::InvalidArgument,
            "inputs: 0 given",
        ),
        (
            "duplicate input names",
            with(|r| {
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
            }),
            Code::InvalidArgument,
            "input \"hidden_states\" is repeated",
        ),
        (
            "more raw contents than inputs",
            with(|r| r.raw_input_contents.push(r.raw_input_contents[0].clone())),
            Code::InvalidArgument,
            "raw_input_contents: 2 entries for 1 inputs",
        ),
        (
            "unknown input name",
            with(|r| r.inputs[0].name = "input_ids".to_owned()),
            Code::InvalidArgument,
            "input \"input_ids\" is not known",
        ),
        (
            "unknown datatype string",
            with(|r| r.inputs[0].datatype = "FLOAT128".to_owned()),
            Code::InvalidArgument,
            "datatype \"FLOAT128\" is not supported",
        ),
        (
            "BYTES tensor",
            with(|r| {
                r.inputs[0].datatype = "BYTES".to_owned();
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    bytes_contents: vec![b"hello".to_vec().into()],
                    ..Default::default()
                });
            }),
            Code::InvalidArgument,
            "datatype \"BYTES\" is not supported",
        ),
        (
            "INT32 tensor",
            with(|r| {
                r.inputs[0].datatype = "INT32".to_owned();
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    int_contents: vec![1; 1024],
                    ..Default::default()
                });
            }),
            Code::InvalidArgument,
            "datatype \"INT32\" is not supported",
        ),
        (
            "FP16 in typed contents",
            with(|r| {
                r.inputs[0].datatype = "FP16".to_owned();
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    fp32_contents: vec![0.5; 1024],
                    ..Default::default()
                });
            }),
            Code::InvalidArgument,
            "typed contents carry only FP32",
        ),
        (
            "FP32 contents of the wrong count",
            with(|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    fp32_contents: vec![0.5; 1000],
                    ..Default::default()
                });
            }),
            Code::InvalidArgument,
            "1000 values do not match shape [2, 512]",
        ),
        (
            "no data",
            with(|r| r.raw_input_contents.clear()),
            Code::InvalidArgument,
            "exactly one of raw_input_contents or contents",
        ),
        (
            "NaN",
            with(|r| r.raw_input_contents[0] = DType::F32.encode(&nan).into()),
            Code::InvalidArgument,
            "element [0, 7] is NaN",
        ),
        (
            "negative infinity",
            with(|r| r.raw_input_contents[0] = DType::F32.encode(&inf).into()),
            Code::InvalidArgument,
            "element [1, 3] is -inf",
        ),
        (
            "BF16 NaN bit pattern",
            with(|r| {
                r.inputs[0].datatype = "BF16".to_owned();
                let mut raw = DType::BF16.encode(&hidden_states(2));
                raw[2..4].copy_from_slice(&[0xc1, 0x7f]);
                r.raw_input_contents[0] = raw.into();
            }),
            Code::InvalidArgument,
            "element [0, 1] is NaN",
        ),
        (
            "unknown parameter",
            with(|r| {
                r.parameters.insert("temperature".to_owned(), int_parameter(1));
            }),
            Code::InvalidArgument,
            "parameter \"temperature\" is not supported",
        ),
        (
            "layer as a string",
            with(|r| {
                r.parameters.insert("layer".to_owned(), string_parameter("0"));
            }),
            Code::InvalidArgument,
            "parameter layer: expected an int64 value",
        ),
        (
            "layer not hosted",
            with(|r| {
                r.parameters.insert("layer".to_owned(), int_parameter(5));
            }),
            Code::InvalidArgument,
            "parameter layer: 5 is not hosted",
        ),
        (
            "negative layer",
            with(|r| {
                r.parameters.insert("layer".to_owned(), int_parameter(-1));
            }),
            Code::InvalidArgument,
            "parameter layer: -1 is not hosted",
        ),
        (
            "unknown routing mode",
            with(|r| {
                r.parameters.insert("routing".to_owned(), string_parameter("random"));
            }),
            Code::InvalidArgument,
            "\"random\" is not a routing mode",
        ),
        (
            "negative timeout parameter",
            with(|r| {
                r.parameters.insert("timeout".to_owned(), int_parameter(-5));
            }),
            Code::InvalidArgument,
            "parameter timeout",
        ),
        (
            "unknown output",
            with(|r| r.outputs[0].name = "logits".to_owned()),
            Code::InvalidArgument,
            "output \"logits\" is unknown or repeated",
        ),
        (
            "repeated output",
            with(|r| r.outputs.push(r.outputs[0].clone())),
            Code::InvalidArgument,
            "output \"output\" is unknown or repeated",
        ),
        (
            "unknown model",
            with(|r| r.model_name = "llama".to_owned()),
            Code::NotFound,
            "model \"llama\" is not served",
        ),
        (
            "unknown model version",
            with(|r| r.model_version = "2".to_owned()),
            Code::NotFound,
            "has no version \"2\"",
        ),
        (
            "huge model name",
            with(|r| r.model_name = "m".repeat(200_000)),
            Code::NotFound,
            "is not served",
        ),
        (
            "oversized message",
            with(|r| r.raw_input_contents[0] = vec![0u8; MAX_MESSAGE_BYTES + 1].into()),
            Code::OutOfRange,
            "message length too large",
        ),
        (
            "request timeout parameter of 1 microsecond",
            with(|r| {
                r.parameters.insert("timeout".to_owned(), int_parameter(1));
            }),
            Code::DeadlineExceeded,
            "request timeout",
        ),
    ]
}

async fn health(channel: Channel, service: &str) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("the health service answers")
        .into_inner()
        .status
}

/// Sends one HTTP/1.1 request and returns the status code and the body's
/// `error` field, or the whole body when it has none.
fn http(address: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, body) = http_request(address, method, path, body);
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value["error"].as_str().map(str::to_owned));
    (status, error.unwrap_or(body))
}

fn json_request(shape: &str, datatype: &str, data: &str) -> Vec<u8> {
    format!(
        r#"{{"inputs": [{{"name": "hidden_states", "shape": {shape}, "datatype": "{datatype}", "data": {data}}}]}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_rejects_hostile_requests_and_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let max_message = MAX_MESSAGE_BYTES.to_string();
    let mut stack = start_stack_with_gateway_args(
        dir.path().to_str().unwrap(),
        &["--max-message-bytes", &max_message],
        &["--max-batch-tokens", "1024"],
    );
    let channel = Channel::from_shared(format!("http://{}", stack.gateway.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GrpcInferenceServiceClient::new(channel.clone()).max_encoding_message_size(64 << 20);
    moge_tests::wait_ready(&mut client, true, Duration::from_secs(10)).await;

    let cases = grpc_cases();
    assert!(cases.len() >= 25, "the table has {} cases", cases.len());
    for (name, request, code, message) in cases {
        let error = tokio::time::timeout(Duration::from_secs(10), client.model_infer(request))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer within 10 s"))
            .expect_err(name);
        assert_eq!(error.code(), code, "{name}: {error:?}");
        assert!(
            error.message().contains(message),
            "{name}: {:?} lacks {message:?}",
            error.message()
        );
        assert!(
            error.message().len() < 1000,
            "{name}: message of {} bytes",
            error.message().len()
        );
    }

    // A client deadline shorter than any layer run: DEADLINE_EXCEEDED.
    let mut request = tonic::Request::new(good_request());
    request.set_timeout(Duration::from_millis(1));
    let error = client.model_infer(request).await.expect_err("1 ms deadline");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");

    // HTTP: status code and a substring of the JSON error.
    let http_address = stack.gateway.http_address();
    let infer = "/v2/models/moge/infer";
    let good_json = json_request("[1, 512]", "FP32", &format!("{:?}", hidden_states(1)));
    let oversized = vec![b' '; MAX_MESSAGE_BYTES + 1];
    let http_cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", infer, b"{\"inputs\": [".to_vec(), 400, "not valid JSON"),
        ("no inputs", infer, b"{}".to_vec(), 400, "inputs: missing"),
        (
            "shape of strings",
            infer,
            json_request(r#"["1", "512"]"#, "FP32", "[]"),
            400,
            "expected an array of integers",
        ),
        (
            "string in data",
            infer,
            json_request("[1, 512]", "FP32", r#"["x"]"#),
            400,
            "is not a number",
        ),
        (
            "BF16 over JSON",
            infer,
            json_request("[1, 512]", "BF16", "[]"),
            400,
            "BF16 has no JSON representation",
        ),
        (
            "FP32 overflow to infinity",
            infer,
            json_request("[1, 512]", "FP32", &format!("[1e39{}]", ", 0.0".repeat(511))),
            400,
            "is inf",
        ),
        (
            "negative dimension",
            infer,
            json_request("[-3, 512]", "FP32", "[]"),
            400,
            "negative dimension",
        ),
        (
            "unknown datatype",
            infer,
            json_request("[1, 512]", "UINT8", "[1]"),
            400,
            "datatype \"UINT8\" is not supported",
        ),
        (
            "unknown model",
            "/v2/models/llama/infer",
            good_json.clone(),
            404,
            "is not served",
        ),
        (
            "unknown model version",
            "/v2/models/moge/versions/9/infer",
            good_json.clone(),
            404,
            "has no version \"9\"",
        ),
        ("oversized body", infer, oversized, 413, "--max-message-bytes"),
    ];
    for (name, path, body, status, message) in http_cases {
        let (got, text) = tokio::task::spawn_blocking(move || http(http_address, "POST", path, &body))
            .await
            .unwrap();
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(message), "{name}: {text:?} lacks {message:?}");
    }

    // Still healthy and serving good requests over both transports.
    let reply = client
        .model_infer(good_request())
        .await
        .expect("a good request after the bad ones");
    assert_eq!(reply.into_inner().raw_output_contents[0].len(), 2 * 512 * 4);
    let (status, text) = tokio::task::spawn_blocking(move || http(http_address, "POST", infer, &good_json))
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        health(channel.clone(), "inference.GRPCInferenceService").await,
        ServingStatus::Serving as i32
    );
    assert_eq!(health(channel, "").await, ServingStatus::Serving as i32);
    let exit = stack.gateway.terminate(Duration::from_secs(10));
    assert!(exit.success(), "gateway exit status {exit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_follows_upstream_readiness() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let mut stack = start_stack_with_gateway_args(dir.path().to_str().unwrap(), &[], &[]);
    let channel = Channel::from_shared(format!("http://{}", stack.gateway.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wait_for = async |expected: ServingStatus| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = health(channel.clone(), "inference.GRPCInferenceService").await;
            if status == expected as i32 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "inference health did not turn {expected:?} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(ServingStatus::Serving).await;

    // Group 5's only replica gone: the inference service turns NOT_SERVING,
    // while the overall service stays SERVING for liveness probes.
    drop(stack.groups[5].remove(0));
    wait_for(ServingStatus::NotServing).await;
    assert_eq!(health(channel.clone(), "").await, ServingStatus::Serving as i32);
    let _ = stack.gateway.terminate(Duration::from_secs(10));
}
