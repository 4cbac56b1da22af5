//! `moge-expert` as separate processes on loopback, called over real gRPC.

use std::time::Duration;

use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::moge::v1::expert_group_client::ExpertGroupClient;
use moge_shared::proto::moge::v1::host_client::HostClient;
use moge_shared::proto::moge::v1::{ComputeRequest, DescribeRequest, Role};
use moge_shared::routing::Assignment;
use moge_shared::weights::WeightFormat;
use moge_shared::wire::{decode_matrix, encode_f32s, encode_matrix, encode_u32s};
use moge_shared::{DType, RoutingOptions};
use moge_tests::{ServiceProcess, generate_small};

const START_TIMEOUT: Duration = Duration::from_secs(30);

fn hidden_states(tokens: usize) -> Vec<f32> {
    (0..tokens * 512)
        .map(|i| (((i * 7907) % 991) as f32 / 991.0 - 0.5) * 4.0)
        .collect()
}

fn request(layer: u32, hidden: &[f32], tokens: usize, assignments: &[Assignment]) -> ComputeRequest {
    let rows: Vec<u32> = assignments.iter().map(|a| a.row).collect();
    let experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
    let weights: Vec<f32> = assignments.iter().map(|a| a.weight).collect();
    ComputeRequest {
        layer,
        hidden_states: Some(encode_matrix(hidden, tokens, 512, DType::F32)),
        rows: encode_u32s(&rows),
        experts: encode_u32s(&experts),
        weights: encode_f32s(&weights),
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn group_and_shared_expert_match_in_process_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap();
    let mut group = ServiceProcess::start(
        "moge-expert",
        &[
            "--checkpoint",
            ckpt,
            "--group",
            "3",
            "--grpc-port",
            "0",
            "--replica",
            "g3-a",
        ],
        START_TIMEOUT,
    );
    let mut shared = ServiceProcess::start(
        "moge-expert",
        &[
            "--checkpoint",
            ckpt,
            "--shared-expert",
            "--grpc-port",
            "0",
            "--layers",
            "1",
        ],
        START_TIMEOUT,
    );

    let mut host = HostClient::connect(format!("http://{}", group.address)).await.unwrap();
    let description = host.describe(DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(description.role, Role::ExpertGroup as i32);
    assert_eq!(description.group, Some(3));
    assert_eq!((description.first_expert, description.num_experts), (24, 8));
    assert_eq!(description.layers, [0, 1]);
    assert_eq!(description.replica, "g3-a");

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let kernel = Kernel::detect();
    let tokens = 29;
    let hidden = hidden_states(tokens);
    let layer = checkpoint.load_layer(1, WeightFormat::Stored).unwrap();
    let routing = layer
        .router
        .route(kernel, &hidden, tokens, RoutingOptions::default())
        .unwrap();
    let assignments = routing.group_assignments(layer.shape(), 3);
    assert_eq!(
        assignments.len(),
        tokens,
        "MoGE gives every token one expert of group 3"
    );

    let mut client = ExpertGroupClient::connect(format!("http://{}", group.address))
        .await
        .unwrap();
    let reply = client
        .compute(request(1, &hidden, tokens, &assignments))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.assignments, tokens as u64);
    let (rows, output) = decode_matrix("output", reply.output.as_ref().unwrap(), 512).unwrap();
    assert_eq!(rows, tokens);
    let expected = layer.groups[3].forward(kernel, &hidden, tokens, &assignments).unwrap();
    assert_eq!(bits(&output), bits(&expected));

    let mut client = ExpertGroupClient::connect(format!("http://{}", shared.address))
        .await
        .unwrap();
    let reply = client
        .compute(request(1, &hidden, tokens, &[]))
        .await
        .unwrap()
        .into_inner();
    let (_, output) = decode_matrix("output", reply.output.as_ref().unwrap(), 512).unwrap();
    let expected = layer.shared_expert.forward_dense(kernel, &hidden, tokens).unwrap();
    assert_eq!(bits(&output), bits(&expected));

    for process in [&mut group, &mut shared] {
        let status = process.terminate(Duration::from_secs(10));
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            process.log.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expert_rejects_bad_requests_by_field() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap();
    let process = ServiceProcess::start(
        "moge-expert",
        &[
            "--checkpoint",
            ckpt,
            "--group",
            "0",
            "--grpc-port",
            "0",
            "--layers",
            "0",
        ],
        START_TIMEOUT,
    );
    let mut client = ExpertGroupClient::connect(format!("http://{}", process.address))
        .await
        .unwrap();
    let hidden = hidden_states(2);
    let one = |row, expert, weight| Assignment { row, expert, weight };

    let mut uneven = request(0, &hidden, 2, &[one(0, 1, 0.5)]);
    uneven.weights = encode_f32s(&[0.5, 0.25]);
    let cases = [
        (
            request(4, &hidden, 2, &[one(0, 1, 0.5)]),
            tonic::Code::NotFound,
            "layer: 4 is not hosted",
        ),
        (uneven, tonic::Code::InvalidArgument, "expected equal lengths"),
        (
            request(0, &hidden, 2, &[one(0, 8, 0.5)]),
            tonic::Code::InvalidArgument,
            "expert 8 is out of range",
        ),
        (
            request(0, &hidden, 2, &[one(2, 1, 0.5)]),
            tonic::Code::InvalidArgument,
            "row 2 is out of range",
        ),
        (
            request(0, &hidden, 2, &[one(0, 1, f32::NAN)]),
            tonic::Code::InvalidArgument,
            "weight is NaN",
        ),
        (
            request(0, &hidden, 2, &[one(1, 1, 0.5), one(1, 1, 0.5)]),
            tonic::Code::InvalidArgument,
            "already assigned",
        ),
    ];
    for (request, code, message) in cases {
        let error = client.compute(request).await.unwrap_err();
        assert_eq!(error.code(), code, "{message}: {error:?}");
        assert!(
            error.message().contains(message),
            "{:?} lacks {message:?}",
            error.message()
        );
    }

    let reply = client
        .compute(request(0, &hidden, 2, &[one(1, 7, 0.5)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.assignments, 1);
}
