//! `moge-load` against a running embedded gateway: a trace replay and a
//! closed loop, checked against the plan and the gateway's balance report.

use std::path::Path;
use std::process::Command;

use moge_tests::{ServiceProcess, binary, start_embedded_gateway};

fn run_load(args: &[&str]) -> serde_json::Value {
    let report = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(binary("moge-load"))
        .args(args)
        .args(["--json", report.path().to_str().unwrap()])
        .output()
        .expect("moge-load starts");
    assert!(
        output.status.success(),
        "moge-load failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(report.path()).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Starts the embedded gateway; returns it with its gRPC and HTTP addresses.
fn start_gateway(cache: &Path) -> (ServiceProcess, String, String) {
    let mut gateway = start_embedded_gateway(&["--cache-dir", cache.to_str().unwrap()]);
    let grpc = gateway.address.to_string();
    let http = format!("http://{}", gateway.http_address());
    (gateway, grpc, http)
}

#[test]
fn trace_replay_runs_every_planned_call() {
    let cache = tempfile::tempdir().unwrap();
    let (_gateway, grpc, http) = start_gateway(cache.path());
    let trace = cache.path().join("trace.csv");
    // Arrivals at 0, 0.5, 1.0 and 30 s; the window 0..10 keeps the first three.
    std::fs::write(
        &trace,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n\
         2023-11-16 18:15:46.0000000,320,5\n\
         2023-11-16 18:15:46.5000000,64,40\n\
         2023-11-16 18:15:47.0000000,16,0\n\
         2023-11-16 18:16:16.0000000,999,9\n",
    )
    .unwrap();

    let report = run_load(&[
        "--target",
        &grpc,
        "--trace",
        trace.to_str().unwrap(),
        "--window",
        "0..10",
        "--time-scale",
        "0.5",
        "--token-scale",
        "0.25",
        "--max-decodes",
        "3",
        "--layers",
        "0,1",
        "--datatype",
        "BF16",
        "--gateway-http",
        &http,
    ]);

    // Prefills of 80, 16 and 4 tokens; decodes min(round(5/4), 3) = 1,
    // min(10, 3) = 3 and 0.
    assert_eq!(report["loop_mode"], "open");
    assert_eq!(report["requests"], 3);
    assert_eq!(report["requests_completed"], 3);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["calls"], 3 + 4);
    assert_eq!(report["tokens"], 80 + 16 + 4 + 4);
    assert_eq!(report["latency_seconds"]["prefill"]["count"], 3);
    assert_eq!(report["latency_seconds"]["decode"]["count"], 4);
    assert_eq!(report["layers"], serde_json::json!([0, 1]));

    // Every call ran both layers; MoGE gives each group one assignment per token.
    let groups = report["balance"]["groups"].as_array().unwrap();
    for group in groups {
        assert_eq!(group["assignments_total"], 2 * 104, "group {}", group["group"]);
    }
    assert_eq!(report["balance"]["imbalance_score_max"], 0.0);
}

#[test]
fn closed_loop_reports_throughput_and_latency() {
    let cache = tempfile::tempdir().unwrap();
    let (_gateway, grpc, _) = start_gateway(cache.path());

    let report = run_load(&[
        "--target",
        &grpc,
        "--requests",
        "300",
        "--tokens",
        "2",
        "--concurrency",
        "16",
        "--routing",
        "top-k",
    ]);

    assert_eq!(report["loop_mode"], "closed");
    assert_eq!(report["concurrency"], 16);
    assert_eq!(report["calls"], 300);
    assert_eq!(report["tokens"], 600);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["routing"], "top-k");
    let latency = &report["latency_seconds"]["prefill"];
    assert!(latency["p50"].as_f64().unwrap() > 0.0);
    assert!(latency["p50"].as_f64() <= latency["p99"].as_f64());
    assert!(report["throughput"]["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn errors_are_counted_by_status() {
    let cache = tempfile::tempdir().unwrap();
    let (_gateway, grpc, _) = start_gateway(cache.path());

    // Layer 7 is not hosted: every call fails with INVALID_ARGUMENT.
    let report = run_load(&[
        "--target",
        &grpc,
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--layers",
        "7",
    ]);

    assert_eq!(report["errors"], 5);
    assert_eq!(report["errors_by_status"]["INVALID_ARGUMENT"], 5);
    assert_eq!(report["requests_completed"], 0);
}
