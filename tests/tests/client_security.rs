//! `moge-load` and `moge-ctl balance` against an embedded gateway that
//! requires a bearer token, TLS or client certificates (mTLS), on loopback.
//! Certificates are generated per test run.

use std::path::Path;
use std::process::{Command, Output};

use moge_tests::pki::{Pki, TOKEN};
use moge_tests::{ServiceProcess, binary, start_embedded_gateway};

/// Writes the test certificates and token files. The gateway accepts only
/// line breaks after the token; the clients' copy also has leading
/// whitespace, which they trim.
fn pki() -> Pki {
    let pki = Pki::generate();
    pki.write("client-token", &format!("  {TOKEN} \t\n\n"));
    pki.write("wrong-token", "not-the-token\n");
    pki
}

/// Starts the embedded gateway with `args` and returns it with its gRPC and
/// HTTP addresses as HOST:PORT.
fn start_gateway(cache: &Path, args: &[String]) -> (ServiceProcess, String, String) {
    let mut all = vec!["--cache-dir".to_owned(), cache.display().to_string()];
    all.extend_from_slice(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut gateway = start_embedded_gateway(&all);
    let grpc = gateway.address.to_string();
    let http = gateway.http_address().to_string();
    (gateway, grpc, http)
}

fn run(tool: &str, args: &[String]) -> Output {
    Command::new(binary(tool)).args(args).output().expect("the tool starts")
}

/// Runs `moge-load` with `args` and a JSON report, and returns its output and
/// the report, when it wrote one.
fn run_load(args: &[String]) -> (Output, Option<serde_json::Value>) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut all = args.to_vec();
    all.extend(["--json".to_owned(), report.path().display().to_string()]);
    let output = run("moge-load", &all);
    let text = std::fs::read_to_string(report.path()).unwrap();
    let json = (!text.is_empty()).then(|| serde_json::from_str(&text).unwrap());
    (output, json)
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn load_sends_bearer_token() {
    let pki = pki();
    let cache = tempfile::tempdir().unwrap();
    let (_gateway, grpc, http) = start_gateway(cache.path(), &owned(&["--auth-token-file", &pki.arg("token")]));
    let load = |extra: &[&str]| {
        let mut args = owned(&[
            "--target",
            &grpc,
            "--requests",
            "20",
            "--tokens",
            "2",
            "--concurrency",
            "4",
        ]);
        args.extend(owned(extra));
        run_load(&args)
    };

    let (output, report) = load(&["--auth-token-file", &pki.arg("client-token"), "--gateway-http", &http]);

    assert!(output.status.success(), "{}", text(&output));
    let report = report.expect("a report");
    assert_eq!(report["errors"], 0);
    assert_eq!(report["calls"], 20);
    assert!(report["balance"]["groups"].is_array(), "{report}");
    assert!(!text(&output).contains(TOKEN), "the token was printed");

    // Without the token the metadata call fails, before any load.
    let (output, report) = load(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(report.is_none(), "a run that never started wrote a report");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert!(stderr.contains("missing authorization"), "{stderr}");
    assert!(stderr.contains("set --auth-token-file"), "{stderr}");

    let (output, _) = load(&["--auth-token-file", &pki.arg("wrong-token")]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert!(stderr.contains("invalid bearer token"), "{stderr}");
    assert!(
        !stderr.contains("not-the-token"),
        "the wrong token was printed: {stderr}"
    );
}

#[test]
fn load_rejects_empty_token_file() {
    let pki = pki();
    std::fs::write(pki.path("empty"), " \n").unwrap();

    let output = run("moge-load", &owned(&["--auth-token-file", &pki.arg("empty")]));

    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--auth-token-file"), "{stderr}");
    assert!(stderr.contains("the file is empty"), "{stderr}");
}

#[test]
fn load_over_tls_with_ca_file() {
    let pki = pki();
    let cache = tempfile::tempdir().unwrap();
    let tls = owned(&[
        "--tls-cert-file",
        &pki.arg("server.pem"),
        "--tls-key-file",
        &pki.arg("server-key.pem"),
    ]);
    let (_gateway, grpc, http) = start_gateway(cache.path(), &tls);
    let base = owned(&["--requests", "10", "--tokens", "3", "--concurrency", "2"]);

    // HOST:PORT turns into https:// because --tls-ca-file is set.
    let mut args = base.clone();
    args.extend(owned(&[
        "--target",
        &grpc,
        "--gateway-http",
        &http,
        "--tls-ca-file",
        &pki.arg("ca.pem"),
    ]));
    let (output, report) = run_load(&args);
    assert!(output.status.success(), "{}", text(&output));
    let report = report.expect("a report");
    assert_eq!(report["target"], format!("https://{grpc}"));
    assert_eq!(report["calls"], 10);
    assert!(report["balance"]["groups"].is_array(), "{report}");

    // https:// without the CA is rejected before connecting.
    let mut args = base.clone();
    args.extend(owned(&["--target", &format!("https://{grpc}")]));
    let (output, _) = run_load(&args);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-ca-file is not set"), "{stderr}");

    // Plaintext against the TLS port fails to connect.
    let mut args = base;
    args.extend(owned(&["--target", &format!("http://{grpc}")]));
    let (output, _) = run_load(&args);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
}

#[test]
fn both_tools_over_mtls_with_token() {
    let pki = pki();
    let cache = tempfile::tempdir().unwrap();
    let server = owned(&[
        "--tls-cert-file",
        &pki.arg("server.pem"),
        "--tls-key-file",
        &pki.arg("server-key.pem"),
        "--tls-client-ca-file",
        &pki.arg("ca.pem"),
        "--auth-token-file",
        &pki.arg("token"),
    ]);
    let (_gateway, grpc, http) = start_gateway(cache.path(), &server);
    let client = owned(&[
        "--tls-ca-file",
        &pki.arg("ca.pem"),
        "--tls-cert-file",
        &pki.arg("client.pem"),
        "--tls-key-file",
        &pki.arg("client-key.pem"),
        "--auth-token-file",
        &pki.arg("client-token"),
    ]);

    let mut args = owned(&[
        "--target",
        &format!("https://{grpc}"),
        "--gateway-http",
        &http,
        "--requests",
        "8",
    ]);
    args.extend(client.clone());
    let (output, report) = run_load(&args);
    assert!(output.status.success(), "{}", text(&output));
    let report = report.expect("a report");
    assert_eq!(report["calls"], 8);
    assert!(report["balance"]["groups"].is_array(), "{report}");

    let mut args = owned(&["balance", "--gateway", &http]);
    args.extend(client.clone());
    let output = run("moge-ctl", &args);
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("default routing mode: moge"), "{stdout}");

    // Without the client certificate the gateway rejects the handshake.
    let without_certificate: Vec<String> = client[..2].iter().chain(&client[6..]).cloned().collect();
    let mut args = owned(&["balance", "--gateway", &format!("https://{http}")]);
    args.extend(without_certificate.clone());
    let output = run("moge-ctl", &args);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(!text(&output).contains("panicked"), "{}", text(&output));

    // moge-load gives the transport error's cause, not only "transport
    // error". Under TLS 1.3 the client sees the server's alert, a broken
    // pipe or a closed connection, depending on timing.
    let mut args = owned(&["--target", &format!("https://{grpc}"), "--requests", "1"]);
    args.extend(without_certificate);
    let (output, _) = run_load(&args);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("transport error: "), "{stderr}");
}

#[test]
fn ctl_balance_sends_bearer_token() {
    let pki = pki();
    let cache = tempfile::tempdir().unwrap();
    let (_gateway, _, http) = start_gateway(cache.path(), &owned(&["--auth-token-file", &pki.arg("token")]));

    // HOST:PORT without a scheme, and the token.
    let output = run(
        "moge-ctl",
        &owned(&[
            "balance",
            "--gateway",
            &http,
            "--auth-token-file",
            &pki.arg("client-token"),
            "--json",
        ]),
    );
    assert!(output.status.success(), "{}", text(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["routing_mode"], "moge");
    assert!(!text(&output).contains(TOKEN), "the token was printed");

    let output = run("moge-ctl", &owned(&["balance", "--gateway", &format!("http://{http}")]));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stderr.contains("missing authorization"), "{stderr}");
    assert!(stderr.contains("set --auth-token-file"), "{stderr}");

    let output = run(
        "moge-ctl",
        &owned(&[
            "balance",
            "--gateway",
            &http,
            "--auth-token-file",
            &pki.arg("wrong-token"),
        ]),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid bearer token"), "{stderr}");
    assert!(
        !stderr.contains("not-the-token"),
        "the wrong token was printed: {stderr}"
    );
}
