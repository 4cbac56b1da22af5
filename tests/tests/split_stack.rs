//! The whole deployment as separate processes on loopback: router, eight
//! expert groups (group 0 with two replicas), the shared expert and the
//! gateway, called through the KServe v2 gRPC API.

use std::time::Duration;

use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::weights::WeightFormat;
use moge_shared::{DType, RoutingOptions};
use moge_tests::{
    START_TIMEOUT, ServiceProcess, generate_small, hidden_states, infer_request, start_stack, wait_ready,
};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
use moge_shared::proto::inference::{ModelInferRequest, ServerReadyRequest};

#[tokio::test(flavor = "multi_thread")]
async fn split_stack_matches_in_process_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let mut stack = start_stack(dir.path().to_str().unwrap(), &[]);
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", stack.gateway.address))
        .await
        .unwrap();
    wait_ready(&mut client, true, READY_TIMEOUT).await;

    let layer = Checkpoint::open(dir.path())
        .unwrap()
        .load_layer(1, WeightFormat::Stored)
        .unwrap();
    for dtype in DType::ALL {
        for tokens in [1, 300] {
            let values = dtype.decode(&dtype.encode(&hidden_states(tokens, 1))).unwrap();
            let request = infer_request(&values, tokens, dtype, 1, &["output", "expert_ids"]);
            let reply = client.model_infer(request).await.unwrap().into_inner();
            assert_eq!(reply.id, format!("request-{tokens}"));
            assert_eq!(reply.outputs[0].datatype, dtype.kserve_name());
            assert_eq!(reply.outputs[0].shape, [tokens as i64, 512]);
            let expected = layer
                .forward(Kernel::detect(), &values, tokens, RoutingOptions::default())
                .unwrap();
            // Same per-row sums in the same order as the in-process layer:
            // equal after encoding to the request's dtype.
            assert_eq!(
                reply.raw_output_contents[0].as_ref(),
                dtype.encode(&expected.hidden).as_slice(),
                "{dtype} T={tokens}"
            );
            let ids: Vec<u32> = reply.raw_output_contents[1]
                .chunks_exact(4)
                .map(|chunk| u32::from_le_bytes(chunk.try_into().unwrap()))
                .collect();
            assert_eq!(ids, expected.routing.expert_ids);
        }
    }

    // Concurrent requests are batched together; each must still get exactly
    // its own rows, bitwise equal to running it alone in process.
    let mut calls = tokio::task::JoinSet::new();
    for request_index in 0..16usize {
        let mut client = client.clone();
        let tokens = 1 + request_index * 3;
        let values = hidden_states(tokens, 100 + request_index);
        calls.spawn(async move {
            let reply = client
                .model_infer(infer_request(&values, tokens, DType::F32, 1, &["output"]))
                .await
                .unwrap()
                .into_inner();
            (values, tokens, reply.raw_output_contents[0].clone())
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (values, tokens, output) = joined.unwrap();
        let expected = layer
            .forward(Kernel::detect(), &values, tokens, RoutingOptions::default())
            .unwrap();
        assert_eq!(
            output.as_ref(),
            DType::F32.encode(&expected.hidden).as_slice(),
            "T={tokens}"
        );
    }

    // Killing one of group 0's two replicas: requests go on.
    drop(stack.groups[0].remove(0));
    for attempt in 0..4 {
        let values = hidden_states(5, attempt);
        let reply = client.model_infer(infer_request(&values, 5, DType::F32, 0, &[])).await;
        assert!(
            reply.is_ok(),
            "attempt {attempt} failed after losing one replica: {reply:?}"
        );
    }

    // Killing group 3's only replica: UNAVAILABLE, and the gateway turns not ready.
    let group_3_port = stack.groups[3][0].address.port().to_string();
    drop(stack.groups[3].remove(0));
    let error = client
        .model_infer(infer_request(&hidden_states(4, 9), 4, DType::F32, 0, &[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("group 3"), "{}", error.message());
    wait_ready(&mut client, false, READY_TIMEOUT).await;

    // A replica back on the same address: ready again, and requests succeed.
    let ckpt = dir.path().to_str().unwrap();
    stack.groups[3].push(ServiceProcess::start(
        "moge-expert",
        &["--checkpoint", ckpt, "--group", "3", "--grpc-port", &group_3_port],
        START_TIMEOUT,
    ));
    wait_ready(&mut client, true, READY_TIMEOUT).await;
    let values = hidden_states(4, 9);
    let reply = client.model_infer(infer_request(&values, 4, DType::F32, 0, &[])).await;
    assert!(reply.is_ok(), "request after group 3 came back: {reply:?}");

    let status = stack.gateway.terminate(Duration::from_secs(10));
    assert!(status.success(), "gateway exit status {status}");
    drop(stack.router);
    drop(stack.shared);
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_rejects_bad_requests_by_field() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let stack = start_stack(dir.path().to_str().unwrap(), &[]);
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", stack.gateway.address))
        .await
        .unwrap();
    wait_ready(&mut client, true, READY_TIMEOUT).await;
    let values = hidden_states(2, 0);
    let good = || infer_request(&values, 2, DType::F32, 0, &[]);

    let mut nan = values.clone();
    nan[512 + 5] = f32::INFINITY;
    let mut cases: Vec<(ModelInferRequest, tonic::Code, &str)> = Vec::new();
    let mut request = good();
    request.model_name = "other".to_owned();
    cases.push((request, tonic::Code::NotFound, "model \"other\" is not served"));
    let mut request = good();
    request.model_version = "7".to_owned();
    cases.push((request, tonic::Code::NotFound, "no version \"7\""));
    cases.push((
        infer_request(&values, 2, DType::F32, 5, &[]),
        tonic::Code::InvalidArgument,
        "layer: 5 is not hosted",
    ));
    let mut request = good();
    request.inputs[0].shape = vec![2, 256];
    cases.push((request, tonic::Code::InvalidArgument, "expected [T, 512]"));
    let mut request = good();
    request.inputs[0].shape = vec![1024];
    cases.push((request, tonic::Code::InvalidArgument, "expected [T, 512]"));
    let mut request = good();
    request.raw_input_contents[0] = request.raw_input_contents[0].slice(..4000);
    cases.push((request, tonic::Code::InvalidArgument, "4000 bytes do not match"));
    let mut request = good();
    request.inputs[0].datatype = "INT8".to_owned();
    cases.push((
        request,
        tonic::Code::InvalidArgument,
        "datatype \"INT8\" is not supported",
    ));
    cases.push((
        infer_request(&nan, 2, DType::F32, 0, &[]),
        tonic::Code::InvalidArgument,
        "element [1, 5] is inf",
    ));
    cases.push((
        infer_request(&values, 2, DType::F32, 0, &["logits"]),
        tonic::Code::InvalidArgument,
        "output \"logits\" is unknown",
    ));
    let mut request = good();
    request.inputs.push(request.inputs[0].clone());
    cases.push((
        request,
        tonic::Code::InvalidArgument,
        "raw_input_contents: 1 entries for 2 inputs",
    ));
    let many = hidden_states(8193, 0);
    cases.push((
        infer_request(&many, 8193, DType::BF16, 0, &[]),
        tonic::Code::InvalidArgument,
        "exceed the limit of 8192",
    ));
    for (request, code, message) in cases {
        let error = client.model_infer(request).await.unwrap_err();
        assert_eq!(error.code(), code, "{message}: {error:?}");
        assert!(
            error.message().contains(message),
            "{:?} lacks {message:?}",
            error.message()
        );
    }

    // Zero tokens are valid: a data-parallel rank may have none.
    let reply = client
        .model_infer(infer_request(&[], 0, DType::BF16, 0, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outputs[0].shape, [0, 512]);
    assert!(reply.raw_output_contents[0].is_empty());
    assert!(
        client.model_infer(good()).await.is_ok(),
        "a good request after the bad ones"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_never_calls_a_replica_of_another_group() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap();
    let start = |extra: &[&str]| {
        let mut args = vec!["--checkpoint", ckpt, "--grpc-port", "0"];
        args.extend_from_slice(extra);
        ServiceProcess::start("moge-expert", &args, START_TIMEOUT)
    };
    let router = ServiceProcess::start(
        "moge-router",
        &["--checkpoint", ckpt, "--grpc-port", "0"],
        START_TIMEOUT,
    );
    let groups: Vec<ServiceProcess> = (0..8).map(|group| start(&["--group", &group.to_string()])).collect();
    let shared = start(&["--shared-expert"]);
    let url = |process: &ServiceProcess| format!("http://{}", process.address);

    // Groups 2 and 3 swapped: their replicas must be refused, not called.
    let mut args = vec![
        "--grpc-port".to_owned(),
        "0".to_owned(),
        "--http-port".to_owned(),
        "0".to_owned(),
        "--probe-interval-ms".to_owned(),
        "100".to_owned(),
        "--router".to_owned(),
        url(&router),
        "--shared-expert".to_owned(),
        url(&shared),
    ];
    for group in [0, 1, 3, 2, 4, 5, 6, 7] {
        args.push("--group".to_owned());
        args.push(url(&groups[group]));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gateway =
        ServiceProcess::start_serving("moge-gateway", &args, START_TIMEOUT, "inference.GRPCInferenceService");
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", gateway.address))
        .await
        .unwrap();

    let ready = client
        .server_ready(ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert!(!ready, "a gateway with swapped groups must not report ready");
    let error = client
        .model_infer(infer_request(&hidden_states(2, 0), 2, DType::F32, 0, &[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    gateway.terminate(Duration::from_secs(10));
    assert!(
        gateway
            .log
            .iter()
            .any(|line| line.contains("hosts something else than configured")),
        "no error logged for the swapped groups:\n{}",
        gateway.log.join("\n")
    );
}
