//! `moge-router` as a separate process on loopback, called over real gRPC.

use std::time::Duration;

use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::moge::v1::host_client::HostClient;
use moge_shared::proto::moge::v1::router_client::RouterClient;
use moge_shared::proto::moge::v1::{DescribeRequest, Role, RouteRequest, RoutingMode as WireMode};
use moge_shared::wire::{decode_f32s, decode_u32s, encode_matrix};
use moge_shared::{DType, RoutingMode, RoutingOptions};
use moge_tests::{ServiceProcess, generate_small};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const START_TIMEOUT: Duration = Duration::from_secs(30);

fn hidden_states(tokens: usize) -> Vec<f32> {
    (0..tokens * 512)
        .map(|i| (((i * 7919) % 997) as f32 / 997.0 - 0.5) * 4.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn router_serves_routes_equal_to_in_process() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap();
    let mut process = ServiceProcess::start(
        "moge-router",
        &["--checkpoint", ckpt, "--grpc-port", "0"],
        START_TIMEOUT,
    );
    let endpoint = format!("http://{}", process.address);

    let channel = tonic::transport::Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "moge.v1.Router".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut host = HostClient::connect(endpoint.clone()).await.unwrap();
    let description = host.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(description.role, Role::Router as i32);
    assert_eq!(description.layers, [0, 1]);
    assert_eq!(
        (description.num_groups, description.top_k, description.hidden_size),
        (8, 8, 512)
    );

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let router = checkpoint.load_router(1).unwrap();
    let mut client = RouterClient::connect(endpoint).await.unwrap();
    for (mode, wire_mode) in [(RoutingMode::Moge, WireMode::Moge), (RoutingMode::TopK, WireMode::TopK)] {
        for dtype in DType::ALL {
            let tokens = 37;
            // The router computes on what the wire carries, so quantize first.
            let values = dtype.decode(&dtype.encode(&hidden_states(tokens))).unwrap();
            let reply = client
                .route(RouteRequest {
                    layer: 1,
                    hidden_states: Some(encode_matrix(&values, tokens, 512, dtype)),
                    mode: wire_mode as i32,
                    renormalize: None,
                })
                .await
                .unwrap()
                .into_inner();
            let options = RoutingOptions {
                mode,
                renormalize: false,
            };
            let expected = router.route(Kernel::detect(), &values, tokens, options).unwrap();
            assert_eq!(reply.tokens as usize, tokens);
            assert_eq!(
                decode_u32s("expert_ids", &reply.expert_ids).unwrap(),
                expected.expert_ids,
                "{mode} {dtype}"
            );
            assert_eq!(
                decode_f32s("expert_weights", &reply.expert_weights).unwrap(),
                expected.expert_weights
            );
            assert_eq!(reply.group_assignments, expected.group_assignments);
            assert_eq!(reply.imbalance_score, expected.imbalance_score_per_group());
        }
    }

    let status = process.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        process.log.join("\n")
    );
    assert!(
        process.log.iter().any(|line| line.contains("SIGTERM")),
        "{}",
        process.log.join("\n")
    );
    assert!(
        process.log.iter().any(|line| line.contains("stopped")),
        "{}",
        process.log.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn router_rejects_bad_requests_by_field() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap();
    let process = ServiceProcess::start(
        "moge-router",
        &["--checkpoint", ckpt, "--grpc-port", "0", "--layers", "0"],
        START_TIMEOUT,
    );
    let mut client = RouterClient::connect(format!("http://{}", process.address))
        .await
        .unwrap();
    let good = encode_matrix(&hidden_states(2), 2, 512, DType::F32);

    let mut nan = hidden_states(2);
    nan[512 + 9] = f32::NAN;
    let mut truncated = good.clone();
    truncated.data = truncated.data.slice(..100);
    let cases = [
        (
            1,
            Some(good.clone()),
            0,
            tonic::Code::NotFound,
            "layer: 1 is not hosted, expected one of [0]",
        ),
        (0, None, 0, tonic::Code::InvalidArgument, "hidden_states: missing"),
        (
            0,
            Some(encode_matrix(&[0.0; 8], 2, 4, DType::F32)),
            0,
            tonic::Code::InvalidArgument,
            "expected [T, 512]",
        ),
        (
            0,
            Some(truncated),
            0,
            tonic::Code::InvalidArgument,
            "100 bytes do not match",
        ),
        (
            0,
            Some(encode_matrix(&nan, 2, 512, DType::F32)),
            0,
            tonic::Code::InvalidArgument,
            "token 1",
        ),
        (
            0,
            Some(good.clone()),
            9,
            tonic::Code::InvalidArgument,
            "mode: 9 is not a routing mode",
        ),
    ];
    for (layer, hidden_states, mode, code, message) in cases {
        let error = client
            .route(RouteRequest {
                layer,
                hidden_states,
                mode,
                renormalize: None,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), code, "{message}: {error:?}");
        assert!(
            error.message().contains(message),
            "{:?} lacks {message:?}",
            error.message()
        );
    }

    // The service still serves a good request after the bad ones.
    let reply = client
        .route(RouteRequest {
            layer: 0,
            hidden_states: Some(good),
            mode: 0,
            renormalize: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.mode, WireMode::Moge as i32);
    assert_eq!(reply.group_assignments, [2; 8]);
}
