//! The embedded default: `moge-gateway` with no upstreams generates the
//! small checkpoint and serves every part from its own process.

use std::time::Duration;

use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::proto::inference::model_infer_request::InferInputTensor;
use moge_shared::proto::inference::{ModelInferRequest, ModelMetadataRequest};
use moge_shared::weights::WeightFormat;
use moge_shared::{DType, RoutingOptions};
use moge_tests::start_embedded_gateway;

#[tokio::test(flavor = "multi_thread")]
async fn embedded_gateway_generates_checkpoint_and_serves() {
    let cache = tempfile::tempdir().unwrap();
    let mut gateway = start_embedded_gateway(&["--cache-dir", cache.path().to_str().unwrap()]);
    let checkpoint_dir = cache.path().join("checkpoints/small");
    assert!(
        checkpoint_dir.join("config.json").exists(),
        "no checkpoint generated in {}",
        checkpoint_dir.display()
    );

    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", gateway.address))
        .await
        .unwrap();
    moge_tests::wait_ready(&mut client, true, Duration::from_secs(10)).await;
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "moge".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.inputs[0].shape, [-1, 512]);

    let tokens = 6;
    let values: Vec<f32> = (0..tokens * 512).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let request = ModelInferRequest {
        model_name: "moge".to_owned(),
        inputs: vec![InferInputTensor {
            name: "hidden_states".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![tokens as i64, 512],
            ..Default::default()
        }],
        raw_input_contents: vec![DType::F32.encode(&values).into()],
        ..Default::default()
    };
    let reply = client.model_infer(request).await.unwrap().into_inner();
    let layer = Checkpoint::open(&checkpoint_dir)
        .unwrap()
        .load_layer(0, WeightFormat::Stored)
        .unwrap();
    let expected = layer
        .forward(Kernel::detect(), &values, tokens, RoutingOptions::default())
        .unwrap();
    assert_eq!(
        reply.raw_output_contents[0].as_ref(),
        DType::F32.encode(&expected.hidden).as_slice()
    );

    let status = gateway.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        gateway.log.join("\n")
    );
    let stopped = gateway
        .log
        .iter()
        .filter(|line| line.contains("service: stopped"))
        .count();
    assert_eq!(
        stopped,
        11,
        "gateway, router, 8 groups and the shared expert log \"stopped\":\n{}",
        gateway.log.join("\n")
    );
}
