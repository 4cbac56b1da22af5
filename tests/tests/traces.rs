//! Traces and metrics over OTLP, sent to an OTLP/gRPC receiver that this
//! test runs on loopback. One request through the split deployment gives
//! one trace with spans of the gateway, the router and every expert group.
//! Every service exports its metrics.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::proto::inference::infer_parameter::ParameterChoice;
use moge_shared::proto::inference::model_infer_request::InferInputTensor;
use moge_shared::proto::inference::{InferParameter, ModelInferRequest, ServerReadyRequest};
use moge_tests::{generate_small, start_stack};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A received span: the service that sent it, its name, ids and attributes.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

fn text(attribute: &KeyValue) -> String {
    match attribute.value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        _ => String::new(),
    }
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
    /// (service, metric name) of every metric received.
    metrics: Arc<Mutex<BTreeSet<(String, String)>>>,
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|resource| &resource.attributes)
        .find(|attribute| attribute.key == "service.name")
        .map(text)
        .unwrap_or_default()
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for metric in resource_metrics
                .scope_metrics
                .into_iter()
                .flat_map(|scope| scope.metrics)
            {
                metrics.insert((service.clone(), metric.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|attribute| (attribute.key.clone(), text(attribute)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_and_metrics_arrive() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let mut stack = start_stack(dir.path().to_str().unwrap(), &["--otlp-endpoint", &endpoint]);
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", stack.gateway.address))
        .await
        .unwrap();
    for _ in 0..200 {
        if client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The caller's W3C trace context: the whole request must join this trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let tokens = 24;
    let values: Vec<f32> = (0..tokens * 512)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: "moge".to_owned(),
        parameters: [(
            "layer".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(1)),
            },
        )]
        .into(),
        inputs: vec![InferInputTensor {
            name: "hidden_states".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![tokens as i64, 512],
            ..Default::default()
        }],
        raw_input_contents: vec![
            values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    client.model_infer(request).await.unwrap();

    // SIGTERM makes every service flush its pending spans before it exits.
    let timeout = Duration::from_secs(20);
    assert!(stack.gateway.terminate(timeout).success());
    assert!(stack.router.terminate(timeout).success());
    assert!(stack.shared.terminate(timeout).success());
    for replicas in &mut stack.groups {
        for replica in replicas {
            assert!(replica.terminate(timeout).success());
        }
    }
    server.abort();

    check_metrics(&receiver);
    let spans = receiver.spans.lock().unwrap().clone();
    let trace_id = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let ours: Vec<&Received> = spans.iter().filter(|span| span.trace_id == trace_id).collect();
    let find = |service: &str, name: &str| {
        ours.iter()
            .filter(|span| span.service == service && span.name == name)
            .copied()
            .collect::<Vec<&Received>>()
    };

    let server_span = find("moge-gateway", "inference.GRPCInferenceService/ModelInfer");
    assert_eq!(
        server_span.len(),
        1,
        "gateway server span; spans of the trace: {ours:#?}"
    );
    assert_eq!(
        hex(&server_span[0].parent_span_id),
        caller_span,
        "the gateway continues the caller's span"
    );
    let infer = find("moge-gateway", "moge.infer");
    assert_eq!(infer.len(), 1);
    assert_eq!(infer[0].attribute("moge.layer"), Some("1"));
    assert_eq!(infer[0].attribute("moge.tokens"), Some("24"));
    assert_eq!(find("moge-gateway", "moge.batch").len(), 1);

    let route_client = find("moge-gateway", "moge.v1.Router/Route");
    let route_server = find("moge-router", "moge.v1.Router/Route");
    assert_eq!(route_client.len(), 1);
    assert_eq!(route_server.len(), 1, "router server span");
    assert_eq!(
        route_server[0].parent_span_id, route_client[0].span_id,
        "the router's span is a child of the gateway's call"
    );
    assert_eq!(route_server[0].attribute("moge.tokens"), Some("24"));

    let compute_clients = find("moge-gateway", "moge.v1.ExpertGroup/Compute");
    let compute_servers = find("moge-expert", "moge.v1.ExpertGroup/Compute");
    let groups: BTreeSet<&str> = compute_servers
        .iter()
        .filter_map(|span| span.attribute("group"))
        .collect();
    let expected: BTreeSet<&str> = ["0", "1", "2", "3", "4", "5", "6", "7", "shared"].into();
    assert_eq!(groups, expected, "every group and the shared expert joined the trace");
    assert_eq!(
        compute_servers.len(),
        9,
        "one call per group and one to the shared expert"
    );
    for server in &compute_servers {
        assert!(
            compute_clients
                .iter()
                .any(|client| client.span_id == server.parent_span_id),
            "expert span of group {:?} has no parent among the gateway's calls",
            server.attribute("group")
        );
        assert!(server.attribute("replica").is_some_and(|replica| !replica.is_empty()));
    }
}

fn check_metrics(receiver: &Receiver) {
    let metrics = receiver.metrics.lock().unwrap();
    for (service, name) in [
        ("moge-gateway", "moge_gateway_requests"),
        ("moge-gateway", "moge_gateway_straggler_gap"),
        ("moge-router", "moge_router_imbalance_score"),
        ("moge-expert", "moge_device_assignments"),
        ("moge-expert", "rpc.server.call.duration"),
    ] {
        assert!(
            metrics.contains(&(service.to_owned(), name.to_owned())),
            "{service} exported no {name} over OTLP; received: {metrics:?}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
