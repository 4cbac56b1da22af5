//! A service started with bad settings exits at once with one clear
//! message that names the flag, and prints each cause once.

use std::process::Command;

use moge_tests::{binary, generate_small};

/// Runs `name` with `args` and returns its exit code and stderr.
fn run(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(binary(name))
        .args(args)
        .env("MOGE_METRICS_PORT", "0")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary starts");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_stop_services_with_named_flag() {
    let ckpt = tempfile::tempdir().unwrap();
    generate_small(ckpt.path());
    let ckpt = ckpt.path().to_str().unwrap().to_owned();
    // Ports that are in use while the cases run.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let upstreams = [
        "--router",
        "grpc://127.0.0.1:1",
        "--shared-expert",
        "127.0.0.1:2",
        "--group",
        "127.0.0.1:3",
    ];

    // (binary, arguments, exit code, texts stderr must contain)
    let cases: Vec<(&str, Vec<&str>, i32, Vec<&str>)> = vec![
        (
            "moge-router",
            vec!["--checkpoint", &ckpt, "--grpc-port", "0", "--layers", "5"],
            1,
            vec!["--layers: layer 5 is not in checkpoint", "which has layers [0, 1]"],
        ),
        (
            "moge-expert",
            vec![
                "--checkpoint",
                &ckpt,
                "--group",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                &busy_port,
            ],
            1,
            vec!["--metrics-port: failed to listen for metrics", "--disable-metrics"],
        ),
        (
            "moge-expert",
            vec!["--checkpoint", &ckpt, "--group", "0", "--grpc-port", &busy_port],
            1,
            vec!["--grpc-port: failed to listen", "choose another port"],
        ),
        (
            "moge-router",
            vec!["--checkpoint", &ckpt, "--otlp-endpoint", "https://127.0.0.1:4317"],
            2,
            vec!["--otlp-endpoint", "https is not supported"],
        ),
        (
            "moge-router",
            vec!["--checkpoint", &ckpt, "--otlp-endpoint", "collector:4317"],
            2,
            vec!["--otlp-endpoint", "expected an http:// collector address"],
        ),
        (
            "moge-gateway",
            vec!["--max-batch-tokens", "0"],
            2,
            vec!["--max-batch-tokens", "at least 1"],
        ),
        (
            "moge-gateway",
            vec!["--max-message-bytes", "100"],
            2,
            vec!["--max-message-bytes", "at least 65536"],
        ),
        (
            "moge-gateway",
            [&["--grpc-port", "0", "--http-port", "0"], &upstreams[..]].concat(),
            1,
            vec!["--router (router): upstream address \"grpc://127.0.0.1:1\" has an unsupported scheme"],
        ),
        (
            "moge-gateway",
            [&["--grpc-port", "0", "--http-port", &busy_port], &upstreams[..]].concat(),
            1,
            vec!["--http-port: failed to listen"],
        ),
        (
            "moge-expert",
            vec!["--checkpoint", &ckpt, "--grpc-port", "0", "--group", "9"],
            1,
            vec!["--group 9 is out of range", "has 8 groups, expected 0 to 7"],
        ),
        (
            "moge-expert",
            vec!["--checkpoint", &ckpt, "--grpc-port", "0"],
            2,
            vec!["--group <GROUP>|--shared-expert"],
        ),
        (
            "moge-router",
            vec!["--config", "/nonexistent/router.toml"],
            2,
            vec!["--config /nonexistent/router.toml: failed to read the configuration file"],
        ),
        (
            "moge-ckpt",
            vec![
                "generate",
                "--preset",
                "small",
                "--out",
                "/tmp/never-written",
                "--groups",
                "0",
            ],
            2,
            vec!["--groups", "at least 1"],
        ),
    ];
    for (name, args, code, texts) in &cases {
        let (exit, stderr) = run(name, args);
        assert_eq!(exit, Some(*code), "{name} {args:?}: {stderr}");
        for text in texts {
            assert!(stderr.contains(text), "{name} {args:?}: no {text:?} in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{name} {args:?}: {stderr}");
        assert!(!stderr.contains("Stack backtrace"), "{name} {args:?}: {stderr}");
    }
}

#[test]
fn missing_checkpoint_cause_is_printed_once() {
    let (exit, stderr) = run(
        "moge-router",
        &["--checkpoint", "/nonexistent/checkpoint", "--grpc-port", "0"],
    );
    assert_eq!(exit, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: --checkpoint /nonexistent/checkpoint: failed to open the checkpoint"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

#[test]
fn bad_value_names_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "routing = \"fast\"\n").unwrap();
    let (exit, stderr) = run("moge-router", &["--config", config.to_str().unwrap()]);
    assert_eq!(exit, Some(2), "{stderr}");
    assert!(stderr.contains("--routing"), "{stderr}");
    assert!(stderr.contains("key `routing` of the configuration file"), "{stderr}");

    let output = Command::new(binary("moge-gateway"))
        .env("MOGE_MAX_BATCH_TOKENS", "0")
        .output()
        .expect("the binary starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable MOGE_MAX_BATCH_TOKENS"),
        "{stderr}"
    );
}
