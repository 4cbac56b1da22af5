//! Faults under load, with every service a separate process: replicas
//! killed and restarted, overload past the queue limit, and SIGTERM.
//! Every output is checked bitwise against the in-process layer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moge_shared::DType;
use moge_shared::RoutingOptions;
use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::inference::ModelInferRequest;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::proto::inference::model_infer_request::InferInputTensor;
use moge_shared::weights::WeightFormat;
use moge_tests::{
    START_TIMEOUT, ServiceProcess, generate_small, http_request, metric_sum, start_stack, start_stack_with_gateway_args,
};
use tonic::Code;
use tonic::transport::Channel;

/// Inputs of a load run, each with its expected F32 output bytes.
struct Reference {
    cases: Vec<(usize, Vec<f32>, Vec<u8>)>,
}

impl Reference {
    /// Computes layer 0 in process for inputs of the given token counts.
    fn new(ckpt: &std::path::Path, token_counts: &[usize]) -> Reference {
        let layer = Checkpoint::open(ckpt)
            .unwrap()
            .load_layer(0, WeightFormat::Stored)
            .unwrap();
        let cases = token_counts
            .iter()
            .enumerate()
            .map(|(seed, &tokens)| {
                let values: Vec<f32> = (0..tokens * 512)
                    .map(|i| ((((i + seed * 131) * 7901) % 983) as f32 / 983.0 - 0.5) * 4.0)
                    .collect();
                let expected = layer
                    .forward(Kernel::detect(), &values, tokens, RoutingOptions::default())
                    .unwrap();
                (tokens, values, DType::F32.encode(&expected.hidden))
            })
            .collect();
        Reference { cases }
    }

    fn request(&self, case: usize, id: String) -> ModelInferRequest {
        let (tokens, values, _) = &self.cases[case];
        ModelInferRequest {
            model_name: "moge".to_owned(),
            id,
            inputs: vec![InferInputTensor {
                name: "hidden_states".to_owned(),
                datatype: "FP32".to_owned(),
                shape: vec![*tokens as i64, 512],
                ..Default::default()
            }],
            raw_input_contents: vec![DType::F32.encode(values).into()],
            ..Default::default()
        }
    }
}

/// What one request got back.
struct Outcome {
    sent: Instant,
    result: Result<(), Code>,
}

/// Runs `clients` loops of requests until `stop` turns true; each call is
/// bounded by 20 s. Panics on wrong data, a wrong id or a call that never
/// returns; returns every outcome.
async fn run_load(
    channel: Channel,
    reference: Arc<Reference>,
    clients: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..clients {
        let mut client = GrpcInferenceServiceClient::new(channel.clone());
        let reference = Arc::clone(&reference);
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            let mut n = 0;
            while !*stop.borrow() {
                let case = (client_index + n) % reference.cases.len();
                let id = format!("client-{client_index}-{n}");
                n += 1;
                let sent = Instant::now();
                let call = client.model_infer(reference.request(case, id.clone()));
                let reply = tokio::time::timeout(Duration::from_secs(20), call)
                    .await
                    .unwrap_or_else(|_| panic!("request {id} got no answer within 20 s"));
                let result = match reply {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        assert_eq!(reply.id, id, "a reply carries another request's id");
                        assert!(
                            reply.raw_output_contents[0].as_ref() == reference.cases[case].2.as_slice(),
                            "request {id}: output differs from the in-process layer"
                        );
                        Ok(())
                    }
                    Err(status) => Err(status.code()),
                };
                let failed = result.is_err();
                outcomes.push(Outcome { sent, result });
                if failed {
                    // Back off a little, as clients do, instead of spinning on errors.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            outcomes
        });
    }
    let mut all = Vec::new();
    while let Some(outcomes) = tasks.join_next().await {
        all.extend(outcomes.expect("a load task panicked"));
    }
    all
}

async fn connect_ready(address: std::net::SocketAddr) -> Channel {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GrpcInferenceServiceClient::new(channel.clone());
    moge_tests::wait_ready(&mut client, true, Duration::from_secs(10)).await;
    channel
}

fn count(outcomes: &[Outcome], code: Option<Code>) -> usize {
    outcomes.iter().filter(|outcome| outcome.result.err() == code).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_with_replicas_killed_in_turns() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let ckpt = dir.path().to_str().unwrap().to_owned();
    let reference = Arc::new(Reference::new(dir.path(), &[1, 3, 7, 16, 2, 33, 5, 64]));
    let mut stack = start_stack(&ckpt, &[]);
    let channel = connect_ready(stack.gateway.address).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(run_load(channel, Arc::clone(&reference), 6, stopped));

    // Group 0 has two replicas: kill one, restart it on its port, wait
    // until the gateway probed it ready, then the other, twice each.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let index = round % 2;
        let address = stack.groups[0][index].address;
        drop(stack.groups[0].remove(index));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let log_start = stack.gateway.log.len();
        let port = address.port().to_string();
        let replica = ServiceProcess::start(
            "moge-expert",
            &["--checkpoint", &ckpt, "--group", "0", "--grpc-port", &port],
            START_TIMEOUT,
        );
        stack.groups[0].insert(index, replica);
        let replica_field = format!("replica=http://{address}");
        stack.gateway.wait_for_log_after(
            log_start,
            &["replica readiness changed", &replica_field, "ready=true"],
            Duration::from_secs(20),
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.send(true).unwrap();
    let outcomes = load.await.unwrap();

    let ok = count(&outcomes, None);
    let unavailable = count(&outcomes, Some(Code::Unavailable));
    println!(
        "soak: {} requests, {ok} correct, {unavailable} UNAVAILABLE, {} other errors",
        outcomes.len(),
        outcomes.len() - ok - unavailable
    );
    let others: Vec<Code> = outcomes.iter().filter_map(|outcome| outcome.result.err()).collect();
    assert!(
        others.iter().all(|code| *code == Code::Unavailable),
        "errors other than UNAVAILABLE: {others:?}"
    );
    // One replica of group 0 was always up, so failover should keep nearly every request.
    assert!(
        ok * 10 >= outcomes.len() * 9,
        "only {ok} of {} requests succeeded",
        outcomes.len()
    );
    assert!(
        stack.gateway.log.iter().any(|line| line.contains("ejected")),
        "no ejection was logged"
    );

    // The ejections and the retries they caused are counted in the metrics.
    let metrics = stack.gateway.metrics_address();
    let (status, exposition) = tokio::task::spawn_blocking(move || http_request(metrics, "GET", "/metrics", b""))
        .await
        .unwrap();
    assert_eq!(status, 200, "GET /metrics: {exposition}");
    let group_zero = ["role=\"expert_group\"", "group=\"0\""];
    let ejections = metric_sum(&exposition, "moge_gateway_replica_ejections_total", &group_zero);
    assert!(ejections >= 1.0, "group 0 ejections: {ejections}");
    let retries = metric_sum(&exposition, "moge_gateway_upstream_retries_total", &group_zero);
    assert!(retries >= 1.0, "group 0 retries: {retries}");
    let other_groups = metric_sum(&exposition, "moge_gateway_replica_ejections_total", &["group=\"1\""]);
    assert_eq!(other_groups, 0.0, "group 1 was never killed");
}

/// Peak resident memory of a process, from `VmHWM` in /proc, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status is readable");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM is in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_rejected_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let reference = Arc::new(Reference::new(dir.path(), &[512, 256]));
    let stack = start_stack_with_gateway_args(
        dir.path().to_str().unwrap(),
        &[],
        &[
            "--max-batch-tokens",
            "1024",
            "--max-queued-tokens",
            "2048",
            "--max-inflight-batches",
            "1",
        ],
    );
    let channel = connect_ready(stack.gateway.address).await;
    let before = peak_rss_kib(stack.gateway.pid());

    // 48 clients, each with up to 2 MiB of request in flight, against a
    // queue of at most four 512-token requests.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(run_load(channel.clone(), Arc::clone(&reference), 48, stopped));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.send(true).unwrap();
    let outcomes = load.await.unwrap();

    let ok = count(&outcomes, None);
    let exhausted = count(&outcomes, Some(Code::ResourceExhausted));
    let peak = peak_rss_kib(stack.gateway.pid());
    println!(
        "overload: {} requests, {ok} correct, {exhausted} RESOURCE_EXHAUSTED; gateway peak RSS {} MiB \
         (before the load {} MiB)",
        outcomes.len(),
        peak / 1024,
        before / 1024
    );
    assert!(ok > 0, "no request succeeded under overload");
    assert!(exhausted > 0, "no request was rejected with RESOURCE_EXHAUSTED");
    assert_eq!(ok + exhausted, outcomes.len(), "other errors under overload");
    assert!(
        peak < 512 * 1024,
        "gateway peak RSS {} MiB, expected under 512 MiB",
        peak / 1024
    );

    // The message names the limit and the flag.
    let mut client = GrpcInferenceServiceClient::new(channel);
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..32 {
        let mut client = client.clone();
        let request = reference.request(0, format!("burst-{n}"));
        calls.spawn(async move { client.model_infer(request).await });
    }
    let mut message = None;
    while let Some(result) = calls.join_next().await {
        if let Err(status) = result.unwrap()
            && status.code() == Code::ResourceExhausted
        {
            message = Some(status.message().to_owned());
        }
    }
    let message = message.expect("a burst of 32 requests is partly rejected");
    assert!(message.contains("--max-queued-tokens 2048"), "{message}");
    assert!(
        client
            .model_infer(reference.request(1, "after".to_owned()))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_accepted_requests() {
    let dir = tempfile::tempdir().unwrap();
    generate_small(dir.path());
    let reference = Arc::new(Reference::new(dir.path(), &[4, 64, 128, 9]));
    let mut stack = start_stack(dir.path().to_str().unwrap(), &[]);
    let channel = connect_ready(stack.gateway.address).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(run_load(channel, Arc::clone(&reference), 8, stopped));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let signalled = Instant::now();
    stack.gateway.send_sigterm();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    let outcomes = load.await.unwrap();
    let exit = stack.gateway.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "gateway exit status {exit}");

    // Requests sent well before the signal were accepted and must get a
    // correct response. Later ones may find the port closed.
    let margin = Duration::from_millis(50);
    let accepted: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| outcome.sent + margin < signalled)
        .collect();
    let failed: Vec<Code> = accepted.iter().filter_map(|outcome| outcome.result.err()).collect();
    println!(
        "drain: {} requests sent before SIGTERM, {} failed; {} sent after",
        accepted.len(),
        failed.len(),
        outcomes.len() - accepted.len()
    );
    assert!(!accepted.is_empty());
    assert!(failed.is_empty(), "accepted requests failed: {failed:?}");
    let late: Vec<Code> = outcomes
        .iter()
        .filter(|outcome| outcome.sent + margin >= signalled)
        .filter_map(|outcome| outcome.result.err())
        .collect();
    assert!(
        late.iter()
            .all(|code| matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)),
        "requests after SIGTERM failed with {late:?}"
    );
}
