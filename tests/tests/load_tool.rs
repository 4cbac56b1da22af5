//! `moge-load` against a running embedded gateway: a trace replay and a
//! closed loop, checked against the plan and the gateway's balance report,
//! a run with failed calls and arguments rejected at parse time.

use std::path::Path;
use std::process::{Command, Output};

use moge_tests::{ServiceProcess, binary, start_embedded_gateway};

/// Runs `moge-load` with a JSON report and returns its output and the report.
fn run_load_output(args: &[&str]) -> (Output, serde_json::Value) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(binary("moge-load"))
        .args(args)
        .args(["--json", report.path().to_str().unwrap()])
        .output()
        .expect("moge-load starts");
    let text = std::fs::read_to_string(report.path()).unwrap();
    let report = serde_json::from_str(&text).unwrap_or_else(|error| {
        panic!(
            "no JSON report ({error}); moge-load stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

fn run_load(args: &[&str]) -> serde_json::Value {
    let (output, report) = run_load_output(args);
    assert!(
        output.status.success(),
        "moge-load failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
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
    let (output, report) = run_load_output(&[
        "--target",
        &grpc,
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--layers",
        "7",
    ]);

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(report["errors"], 5);
    assert_eq!(report["errors_by_status"]["INVALID_ARGUMENT"], 5);
    assert_eq!(report["requests_completed"], 0);
    let example = report["error_examples"]["INVALID_ARGUMENT"].as_str().unwrap();
    assert!(example.contains('7'), "the example does not name layer 7: {example}");
    assert!(
        stdout.contains(&format!("INVALID_ARGUMENT (5 calls), first error: {example}")),
        "{stdout}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("5 of 5 calls failed"), "{stderr}");
}

#[test]
fn invalid_arguments_name_the_flag() {
    let cases = [
        (["--concurrency", "0"], "expected an integer of at least 1"),
        (["--connections", "0"], "expected an integer of at least 1"),
        (["--tokens", "0"], "expected an integer of at least 1"),
        (
            ["--routing", "group-limited-top-k"],
            "expected moge, top-k or group-limited",
        ),
        (["--time-scale", "NaN"], "expected a finite number of at least 0"),
        (["--gateway-http", "ftp://127.0.0.1:8000"], "expected HOST:PORT"),
    ];
    for (args, expected) in cases {
        // No gateway listens on port 9: a run that got past parsing fails differently.
        let output = Command::new(binary("moge-load"))
            .args(["--target", "127.0.0.1:9"])
            .args(args)
            .output()
            .expect("moge-load starts");

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
