//! TLS, mTLS and the bearer token with real processes on loopback. The tests
//! run a split deployment with mTLS on every internal hop and TLS on the
//! gateway's gRPC and HTTP ports. They check that wrong clients are rejected
//! and that bad flag combinations stop a service at start. Certificates are
//! generated per test run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use moge_shared::proto::inference::{ModelMetadataRequest, ServerLiveRequest};
use moge_shared::weights::WeightFormat;
use moge_shared::{DType, RoutingOptions};
use moge_tests::pki::{Pki, TOKEN};
use moge_tests::{
    START_TIMEOUT, ServiceProcess, StackArgs, binary, generate_small, hidden_states, infer_request,
    start_embedded_gateway, start_stack_with, wait_ready,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Bound of every single call a test makes.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of the test clients, from the files of a [`Pki`].
trait ClientTls {
    /// Returns tonic client TLS trusting the test CA, presenting `identity`
    /// (certificate and key file names) when given.
    fn grpc_tls(&self, identity: Option<(&str, &str)>) -> ClientTlsConfig;
    /// Returns a rustls client configuration for HTTPS, trusting the test CA.
    fn https_config(&self, identity: Option<(&str, &str)>) -> Arc<ClientConfig>;
}

impl ClientTls for Pki {
    fn grpc_tls(&self, identity: Option<(&str, &str)>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.pem")));
        match identity {
            Some((cert, key)) => config.identity(Identity::from_pem(self.read(cert), self.read(key))),
            None => config,
        }
    }

    fn https_config(&self, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(moge_shared::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(self.path(cert))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(self.path(key)).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Connects and calls `grpc.health.v1.Health/Check` on the whole server;
/// an error from either step comes back as text.
async fn health_check(url: String, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let call = async {
        let mut endpoint = Endpoint::from_shared(url).map_err(|error| error.to_string())?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|error| error.to_string())?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| format!("connect: {error:?}"))?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(drop)
            .map_err(|status| format!("call: {status:?}"))
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

async fn kserve_client(address: SocketAddr, tls: ClientTlsConfig) -> GrpcInferenceServiceClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = tokio::time::timeout(CALL_TIMEOUT, endpoint.connect())
        .await
        .expect("the TLS connection to the gateway should open within 10 s")
        .expect("the gateway should accept a client that trusts its CA");
    GrpcInferenceServiceClient::new(channel)
}

fn with_token<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    request
}

/// Sends one HTTP/1.1 request over `stream` and returns the raw response,
/// read until the server closes the connection.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> std::io::Result<String> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(value) = authorization {
        request.push_str(&format!("authorization: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// An HTTPS request; returns the status code and the body.
async fn https(
    address: SocketAddr,
    config: Arc<ClientConfig>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> Result<(u16, String), String> {
    let call = async {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|error| error.to_string())?;
        let server_name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|error| format!("handshake: {error}"))?;
        let response = exchange(tls, method, path, authorization, body)
            .await
            .map_err(|error| format!("exchange: {error}"))?;
        parse_response(&response)
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

fn parse_response(response: &str) -> Result<(u16, String), String> {
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// Starts the embedded gateway on `ckpt` with `args` after the port flags.
fn start_gateway_on(ckpt: &Path, args: &[String]) -> ServiceProcess {
    let mut all = vec!["--checkpoint".to_owned(), ckpt.display().to_string()];
    all.extend_from_slice(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    start_embedded_gateway(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn split_stack_over_mtls_matches_in_process() {
    let pki = Pki::generate();
    let ckpt = tempfile::tempdir().unwrap();
    generate_small(ckpt.path());
    let services = pki.server_args(true);
    let mut gateway = pki.server_args(false);
    gateway.extend([
        "--upstream-tls-ca-file".to_owned(),
        pki.arg("ca.pem"),
        "--upstream-tls-cert-file".to_owned(),
        pki.arg("client.pem"),
        "--upstream-tls-key-file".to_owned(),
        pki.arg("client-key.pem"),
    ]);
    let services: Vec<&str> = services.iter().map(String::as_str).collect();
    let gateway: Vec<&str> = gateway.iter().map(String::as_str).collect();
    let args = StackArgs {
        scheme: "https",
        services: &services,
        gateway: &gateway,
    };
    let mut stack = start_stack_with(ckpt.path().to_str().unwrap(), &args);
    let mut client = kserve_client(stack.gateway.address, pki.grpc_tls(None)).await;
    wait_ready(&mut client, true, Duration::from_secs(20)).await;

    // gRPC over TLS: bitwise equal to the in-process layer, so every hop
    // behind the gateway carried the exact bytes.
    let layer = Checkpoint::open(ckpt.path())
        .unwrap()
        .load_layer(1, WeightFormat::Stored)
        .unwrap();
    let tokens = 37;
    let values = hidden_states(tokens, 0);
    let expected = layer
        .forward(Kernel::detect(), &values, tokens, RoutingOptions::default())
        .unwrap();
    let reply = client
        .model_infer(infer_request(&values, tokens, DType::F32, 1, &[]))
        .await
        .expect("inference over TLS with mTLS upstreams should succeed")
        .into_inner();
    assert_eq!(
        reply.raw_output_contents[0].as_ref(),
        DType::F32.encode(&expected.hidden).as_slice()
    );

    // HTTPS on the HTTP port: the same numbers as JSON.
    let body = serde_json::json!({
        "parameters": { "layer": 1 },
        "inputs": [{ "name": "hidden_states", "shape": [tokens, 512], "datatype": "FP32", "data": values }],
    })
    .to_string();
    let config = pki.https_config(None);
    let (status, response) = https(
        stack.gateway.http_address(),
        config,
        "POST",
        "/v2/models/moge/infer",
        None,
        &body,
    )
    .await
    .expect("HTTPS inference should get a response");
    assert_eq!(status, 200, "{response}");
    let response: serde_json::Value = serde_json::from_str(&response).unwrap();
    let output: Vec<f32> = response["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(output, expected.hidden);

    // Every internal server requires a client certificate: the test client
    // has none, and the gateway's own certificate is what opened the hops.
    let router = format!("https://{}", stack.router.address);
    let rejected = health_check(router.clone(), Some(pki.grpc_tls(None))).await;
    assert!(rejected.is_err(), "the router accepted a client without a certificate");
    let accepted = health_check(router, Some(pki.grpc_tls(Some(("client.pem", "client-key.pem"))))).await;
    assert_eq!(accepted, Ok(()));
}

#[tokio::test(flavor = "multi_thread")]
async fn router_rejects_plaintext_and_foreign_clients() {
    let pki = Pki::generate();
    let ckpt = tempfile::tempdir().unwrap();
    generate_small(ckpt.path());
    let mut args = vec![
        "--checkpoint".to_owned(),
        ckpt.path().display().to_string(),
        "--grpc-port".to_owned(),
        "0".to_owned(),
    ];
    args.extend(pki.server_args(true));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = ServiceProcess::start("moge-router", &args, START_TIMEOUT);
    let https_url = format!("https://{}", router.address);

    let plaintext = health_check(format!("http://{}", router.address), None).await;
    assert!(plaintext.is_err(), "the TLS router accepted a plaintext client");

    let no_certificate = health_check(https_url.clone(), Some(pki.grpc_tls(None))).await;
    assert!(
        no_certificate.is_err(),
        "the mTLS router accepted a client without a certificate"
    );

    let foreign = health_check(
        https_url.clone(),
        Some(pki.grpc_tls(Some(("other-client.pem", "other-client-key.pem")))),
    )
    .await;
    assert!(foreign.is_err(), "the mTLS router accepted a certificate of another CA");

    let trusted = health_check(https_url, Some(pki.grpc_tls(Some(("client.pem", "client-key.pem"))))).await;
    assert_eq!(
        trusted,
        Ok(()),
        "the mTLS router rejected a client certificate of its CA"
    );

    // A client that does not trust the server's CA must not talk to it either.
    let untrusting = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.read("other-ca.pem")));
    let unverified = health_check(format!("https://{}", router.address), Some(untrusting)).await;
    assert!(
        unverified.is_err(),
        "a client accepted a server certificate of an unknown CA"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_token_guards_all_but_health() {
    let pki = Pki::generate();
    let ckpt = tempfile::tempdir().unwrap();
    generate_small(ckpt.path());
    let mut args = pki.server_args(false);
    args.extend(["--auth-token-file".to_owned(), pki.arg("token")]);
    let mut gateway = start_gateway_on(ckpt.path(), &args);
    let mut client = kserve_client(gateway.address, pki.grpc_tls(None)).await;
    let right = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");

    // gRPC: liveness, readiness and grpc.health.v1 are open.
    client
        .server_live(ServerLiveRequest {})
        .await
        .expect("ServerLive should be open without a token");
    wait_ready(&mut client, true, Duration::from_secs(20)).await;
    let health = health_check(format!("https://{}", gateway.address), Some(pki.grpc_tls(None))).await;
    assert_eq!(health, Ok(()), "grpc.health.v1 should be open without a token");

    // gRPC: every other call needs the token.
    let metadata = || ModelMetadataRequest {
        name: "moge".to_owned(),
        version: String::new(),
    };
    for authorization in [None, Some(wrong.as_str()), Some("Basic abc")] {
        let status = client
            .model_metadata(with_token(metadata(), authorization))
            .await
            .expect_err("ModelMetadata without the right token should fail");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{authorization:?}: {status:?}"
        );
        let values = hidden_states(2, 0);
        let status = client
            .model_infer(with_token(infer_request(&values, 2, DType::F32, 0, &[]), authorization))
            .await
            .expect_err("ModelInfer without the right token should fail");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{authorization:?}: {status:?}"
        );
    }
    client
        .model_metadata(with_token(metadata(), Some(&right)))
        .await
        .expect("ModelMetadata with the right token should succeed");
    let values = hidden_states(2, 0);
    let reply = client
        .model_infer(with_token(infer_request(&values, 2, DType::F32, 0, &[]), Some(&right)))
        .await
        .expect("ModelInfer with the right token should succeed")
        .into_inner();
    assert_eq!(reply.outputs[0].shape, [2, 512]);

    // HTTP: the same rule, with 401 and a KServe error body.
    let address = gateway.http_address();
    let config = pki.https_config(None);
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let (status, body) = https(address, Arc::clone(&config), "GET", path, None, "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{path} should be open without a token: {body}");
    }
    for path in ["/v2/models/moge", "/v1/balance", "/v2"] {
        for authorization in [None, Some(wrong.as_str())] {
            let (status, body) = https(address, Arc::clone(&config), "GET", path, authorization, "")
                .await
                .unwrap();
            assert_eq!(status, 401, "{path} with {authorization:?}: {body}");
            let error: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(error["error"].is_string(), "{body}");
        }
        let (status, body) = https(address, Arc::clone(&config), "GET", path, Some(&right), "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{path} with the right token: {body}");
    }
    let body = serde_json::json!({
        "inputs": [{ "name": "hidden_states", "shape": [1, 512], "datatype": "FP32", "data": hidden_states(1, 0) }],
    })
    .to_string();
    let (status, _) = https(
        address,
        Arc::clone(&config),
        "POST",
        "/v2/models/moge/infer",
        None,
        &body,
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, response) = https(address, config, "POST", "/v2/models/moge/infer", Some(&right), &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{response}");

    // Neither the token nor the key reaches the log; the paths do.
    gateway.terminate(Duration::from_secs(30));
    let log = gateway.log.join("\n");
    assert!(!log.contains(TOKEN), "the token was logged");
    let key_line = pki.read("server-key.pem").lines().nth(1).unwrap().to_owned();
    assert!(!log.contains(&key_line), "the private key was logged");
    assert!(log.contains("security settings"), "{log}");
    assert!(log.contains(&pki.arg("token")), "the token file path is not logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_mtls_rejects_foreign_and_plaintext_clients() {
    let pki = Pki::generate();
    let ckpt = tempfile::tempdir().unwrap();
    generate_small(ckpt.path());
    let mut gateway = start_gateway_on(ckpt.path(), &pki.server_args(true));
    let grpc = format!("https://{}", gateway.address);
    let http = gateway.http_address();

    // gRPC port.
    let plaintext = health_check(format!("http://{}", gateway.address), None).await;
    assert!(plaintext.is_err(), "the TLS gateway accepted a plaintext gRPC client");
    let no_certificate = health_check(grpc.clone(), Some(pki.grpc_tls(None))).await;
    assert!(
        no_certificate.is_err(),
        "the mTLS gateway accepted a client without a certificate"
    );
    let foreign = health_check(
        grpc.clone(),
        Some(pki.grpc_tls(Some(("other-client.pem", "other-client-key.pem")))),
    )
    .await;
    assert!(
        foreign.is_err(),
        "the mTLS gateway accepted a certificate of another CA"
    );
    let trusted = health_check(grpc, Some(pki.grpc_tls(Some(("client.pem", "client-key.pem"))))).await;
    assert_eq!(trusted, Ok(()));

    // HTTP port.
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let plaintext = tokio::time::timeout(CALL_TIMEOUT, exchange(tcp, "GET", "/v2/health/live", None, ""))
        .await
        .expect("the server should close a plaintext connection within 10 s");
    assert!(
        !matches!(&plaintext, Ok(response) if response.starts_with("HTTP/")),
        "the HTTPS port answered plaintext HTTP: {plaintext:?}"
    );
    let no_certificate = https(http, pki.https_config(None), "GET", "/v2/health/live", None, "").await;
    assert!(no_certificate.is_err(), "{no_certificate:?}");
    let foreign = pki.https_config(Some(("other-client.pem", "other-client-key.pem")));
    let foreign = https(http, foreign, "GET", "/v2/health/live", None, "").await;
    assert!(foreign.is_err(), "{foreign:?}");
    let trusted = pki.https_config(Some(("client.pem", "client-key.pem")));
    let (status, body) = https(http, trusted, "GET", "/v2/health/live", None, "")
        .await
        .expect("a client certificate of the CA should be accepted");
    assert_eq!(status, 200, "{body}");
}

/// Runs `binary` with `args`, expecting it to exit within 20 s; returns the
/// exit code and standard error.
fn run_to_exit(binary_name: &str, args: &[String]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(binary(binary_name))
        .args(args)
        .env("MOGE_METRICS_PORT", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary_name} {args:?} kept running; expected it to exit on bad TLS settings");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_tls_settings_stop_services_at_start() {
    let pki = Pki::generate();
    let ckpt = "/nonexistent/checkpoint";
    let missing_key = pki.arg("absent-key.pem");
    let ports = ["--grpc-port", "0", "--http-port", "0"];
    let upstreams = |scheme: &str| {
        [
            "--router".to_owned(),
            format!("{scheme}://127.0.0.1:1"),
            "--shared-expert".to_owned(),
            format!("{scheme}://127.0.0.1:2"),
            "--group".to_owned(),
            format!("{scheme}://127.0.0.1:3"),
        ]
    };
    let owned = |items: &[&str]| items.iter().map(|item| (*item).to_owned()).collect::<Vec<_>>();
    let join = |parts: &[Vec<String>]| parts.concat();
    // (binary, arguments, expected exit code, texts stderr must contain)
    let cases: Vec<(&str, Vec<String>, i32, Vec<String>)> = vec![
        (
            "moge-router",
            join(&[
                owned(&["--checkpoint", ckpt, "--tls-cert-file"]),
                vec![pki.arg("server.pem")],
            ]),
            2,
            vec!["--tls-key-file".to_owned()],
        ),
        (
            "moge-expert",
            join(&[
                owned(&["--checkpoint", ckpt, "--group", "0", "--tls-key-file"]),
                vec![pki.arg("server-key.pem")],
            ]),
            2,
            vec!["--tls-cert-file".to_owned()],
        ),
        (
            "moge-router",
            join(&[
                owned(&["--checkpoint", ckpt, "--tls-client-ca-file"]),
                vec![pki.arg("ca.pem")],
            ]),
            2,
            vec!["--tls-cert-file".to_owned()],
        ),
        (
            "moge-router",
            join(&[
                owned(&["--checkpoint", ckpt, "--tls-cert-file"]),
                vec![pki.arg("server.pem"), "--tls-key-file".to_owned(), missing_key.clone()],
            ]),
            1,
            vec![
                "--tls-key-file".to_owned(),
                missing_key.clone(),
                "failed to read".to_owned(),
            ],
        ),
        (
            "moge-expert",
            join(&[
                owned(&["--checkpoint", ckpt, "--shared-expert", "--tls-cert-file"]),
                vec![
                    pki.arg("server-key.pem"),
                    "--tls-key-file".to_owned(),
                    pki.arg("server-key.pem"),
                ],
            ]),
            1,
            vec!["--tls-cert-file".to_owned(), "no certificate found".to_owned()],
        ),
        (
            "moge-router",
            join(&[
                owned(&["--checkpoint", ckpt, "--tls-cert-file"]),
                vec![
                    pki.arg("server.pem"),
                    "--tls-key-file".to_owned(),
                    pki.arg("client-key.pem"),
                ],
            ]),
            1,
            vec!["does not match".to_owned()],
        ),
        (
            "moge-gateway",
            join(&[
                owned(&ports),
                vec!["--upstream-tls-ca-file".to_owned(), pki.arg("ca.pem")],
            ]),
            2,
            vec!["--router".to_owned()],
        ),
        (
            "moge-gateway",
            join(&[owned(&ports), upstreams("https").to_vec()]),
            1,
            vec![
                "uses https://".to_owned(),
                "--upstream-tls-ca-file is not set".to_owned(),
            ],
        ),
        (
            "moge-gateway",
            join(&[
                owned(&ports),
                upstreams("http").to_vec(),
                vec!["--upstream-tls-ca-file".to_owned(), pki.arg("ca.pem")],
            ]),
            1,
            vec!["must use https://".to_owned()],
        ),
        (
            "moge-gateway",
            join(&[
                owned(&ports),
                upstreams("https").to_vec(),
                vec![
                    "--upstream-tls-ca-file".to_owned(),
                    pki.arg("ca.pem"),
                    "--upstream-tls-cert-file".to_owned(),
                    pki.arg("client.pem"),
                ],
            ]),
            2,
            vec!["--upstream-tls-key-file".to_owned()],
        ),
        (
            "moge-gateway",
            join(&[
                owned(&ports),
                owned(&["--checkpoint", ckpt, "--auth-token-file", "/nonexistent/token"]),
            ]),
            1,
            vec![
                "--auth-token-file /nonexistent/token".to_owned(),
                "failed to read".to_owned(),
            ],
        ),
    ];
    for (binary_name, args, code, expected) in cases {
        let (exit, stderr) = run_to_exit(binary_name, &args);
        assert_eq!(exit, Some(code), "{binary_name} {args:?}: {stderr}");
        for text in expected {
            assert!(
                stderr.contains(&text),
                "{binary_name} {args:?}: expected {text:?} in:\n{stderr}"
            );
        }
    }
}
