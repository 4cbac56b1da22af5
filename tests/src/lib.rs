//! Helpers for the end-to-end tests: paths of the workspace's binaries,
//! service processes, the split deployment and KServe requests.

pub mod pki;

use std::path::PathBuf;

/// Path of a binary built by this workspace in the same profile as the tests.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("the test binary has a path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// A service binary started by a test, killed when dropped.
pub struct ServiceProcess {
    child: std::process::Child,
    /// Address from the service's "listening" log line.
    pub address: std::net::SocketAddr,
    /// Log lines read so far.
    pub log: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ServiceProcess {
    /// Starts `binary` with `args` and waits, at most `timeout`, for its
    /// "listening" log line, which carries `address=IP:PORT`.
    pub fn start(binary: &str, args: &[&str], timeout: std::time::Duration) -> ServiceProcess {
        Self::start_serving(binary, args, timeout, "")
    }

    /// Like [`ServiceProcess::start`], but waits for the "listening" line
    /// that also contains `service`, for a process that serves several.
    pub fn start_serving(binary: &str, args: &[&str], timeout: std::time::Duration, service: &str) -> ServiceProcess {
        use std::io::BufRead;

        let path = self::binary(binary);
        assert!(
            path.exists(),
            "{} is missing; build the binaries first (cargo build --release)",
            path.display()
        );
        let mut child = std::process::Command::new(path)
            .args(args)
            .env("RUST_LOG", "info")
            // Every service would take the default metrics port 8002 otherwise.
            .env("MOGE_METRICS_PORT", "0")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the service starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + timeout;
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{binary} did not log \"listening\" within {timeout:?}; log so far:\n{}",
                        log.join("\n")
                    );
                }
            };
            log.push(line.clone());
            if line.contains("listening") && line.contains(service) {
                let address = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("address="))
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_else(|| panic!("no address= field in {line:?}"));
                return ServiceProcess {
                    child,
                    address,
                    log,
                    lines,
                };
            }
        }
    }

    /// Process id of the service.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the first log line, read so far or arriving within
    /// `timeout`, that contains every string of `patterns`.
    pub fn wait_for_log(&mut self, patterns: &[&str], timeout: std::time::Duration) -> String {
        self.wait_for_log_after(0, patterns, timeout)
    }

    /// Like [`ServiceProcess::wait_for_log`], but skips the first `start`
    /// lines of [`ServiceProcess::log`].
    pub fn wait_for_log_after(&mut self, start: usize, patterns: &[&str], timeout: std::time::Duration) -> String {
        let matches = |line: &String| patterns.iter().all(|pattern| line.contains(pattern));
        if let Some(line) = self.log.iter().skip(start).find(|line| matches(line)) {
            return line.clone();
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no log line with {patterns:?} within {timeout:?}; log so far:\n{}",
                    self.log.join("\n")
                )
            });
            self.log.push(line.clone());
            if matches(&line) {
                return line;
            }
        }
    }

    /// Returns the address of a gateway's KServe HTTP port, read from its
    /// "listening" log line. The HTTP server logs from its own task, so the
    /// line may come after the gRPC one.
    pub fn http_address(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for_log(&["listening", "kserve-http"], std::time::Duration::from_secs(10));
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("address="))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no address= field in {line:?}"))
    }

    /// Returns the address of the service's Prometheus endpoint, read from
    /// its "metrics endpoint ready" log line.
    pub fn metrics_address(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for_log(&["metrics endpoint ready"], std::time::Duration::from_secs(10));
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("address="))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no address= field in {line:?}"))
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn send_sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Sends SIGTERM and waits, at most `timeout`, for the exit status;
    /// collects the log lines written meanwhile.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit(timeout)
    }

    /// Waits, at most `timeout`, for the exit status after a signal;
    /// collects the log lines written meanwhile.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited on") {
                while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not exit within {timeout:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the `small` checkpoint (both layers) into `dir` with `moge-ckpt`.
pub fn generate_small(dir: &std::path::Path) {
    let output = std::process::Command::new(binary("moge-ckpt"))
        .args(["generate", "--preset", "small", "--out"])
        .arg(dir)
        .output()
        .expect("moge-ckpt starts");
    assert!(
        output.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sends one HTTP/1.1 request with a JSON `body` and returns the status
/// code and the response body. The connection closes after the response.
pub fn http_request(address: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};

    let mut stream = std::net::TcpStream::connect(address).expect("the HTTP port accepts");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may respond to an oversized body before reading all of it.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {response:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Sums the values of the samples of `metric` in a Prometheus text
/// exposition whose labels include every one of `labels`.
pub fn metric_sum(exposition: &str, metric: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} ")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts the embedded gateway (router, groups and shared expert in one
/// process) on free ports, with `args` after the port flags.
pub fn start_embedded_gateway(args: &[&str]) -> ServiceProcess {
    let all = [&["--grpc-port", "0", "--http-port", "0"], args].concat();
    ServiceProcess::start_serving(
        "moge-gateway",
        &all,
        std::time::Duration::from_secs(60),
        "inference.GRPCInferenceService",
    )
}

/// Time a service of [`start_stack`] gets to log "listening".
pub const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The deployment as separate processes, each killed when dropped.
pub struct Stack {
    /// The router.
    pub router: ServiceProcess,
    /// Replicas of each expert group, in group order.
    pub groups: Vec<Vec<ServiceProcess>>,
    /// The shared expert.
    pub shared: ServiceProcess,
    /// The gateway; its `address` is the KServe gRPC port.
    pub gateway: ServiceProcess,
}

/// Starts the router, eight expert groups (group 0 with two replicas), the
/// shared expert and a gateway in front of them, on the checkpoint `ckpt`,
/// all on free loopback ports. `extra` is appended to every command line.
pub fn start_stack(ckpt: &str, extra: &[&str]) -> Stack {
    let args = StackArgs {
        scheme: "http",
        services: extra,
        gateway: extra,
    };
    start_stack_with(ckpt, &args)
}

/// Like [`start_stack`], with `gateway_extra` appended to the gateway's
/// command line only.
pub fn start_stack_with_gateway_args(ckpt: &str, extra: &[&str], gateway_extra: &[&str]) -> Stack {
    let gateway: Vec<&str> = extra.iter().chain(gateway_extra).copied().collect();
    let args = StackArgs {
        scheme: "http",
        services: extra,
        gateway: &gateway,
    };
    start_stack_with(ckpt, &args)
}

/// Extra command-line arguments of a [`start_stack_with`] deployment.
pub struct StackArgs<'a> {
    /// Scheme of the upstream addresses the gateway gets: `http` or `https`.
    pub scheme: &'a str,
    /// Appended to the command line of the router and of every expert service.
    pub services: &'a [&'a str],
    /// Appended to the gateway's command line.
    pub gateway: &'a [&'a str],
}

/// [`start_stack`] with separate arguments for the services and the gateway.
pub fn start_stack_with(ckpt: &str, extra: &StackArgs) -> Stack {
    let expert = |args: &[&str]| {
        let mut all = vec!["--checkpoint", ckpt, "--grpc-port", "0", "--compute-threads", "1"];
        all.extend_from_slice(args);
        all.extend_from_slice(extra.services);
        ServiceProcess::start("moge-expert", &all, START_TIMEOUT)
    };
    let mut router_args = vec!["--checkpoint", ckpt, "--grpc-port", "0"];
    router_args.extend_from_slice(extra.services);
    let router = ServiceProcess::start("moge-router", &router_args, START_TIMEOUT);
    let groups: Vec<Vec<ServiceProcess>> = (0..8)
        .map(|group| {
            let replicas = if group == 0 { 2 } else { 1 };
            (0..replicas)
                .map(|_| expert(&["--group", &group.to_string()]))
                .collect()
        })
        .collect();
    let shared = expert(&["--shared-expert"]);
    let url = |process: &ServiceProcess| format!("{}://{}", extra.scheme, process.address);
    let mut args: Vec<String> = [
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--probe-interval-ms",
        "100",
        "--max-queue-delay-us",
        "2000",
    ]
    .into_iter()
    .chain(extra.gateway.iter().copied())
    .map(str::to_owned)
    .collect();
    args.extend([
        "--router".to_owned(),
        url(&router),
        "--shared-expert".to_owned(),
        url(&shared),
    ]);
    for replicas in &groups {
        args.push("--group".to_owned());
        args.push(replicas.iter().map(url).collect::<Vec<_>>().join(","));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = ServiceProcess::start_serving("moge-gateway", &args, START_TIMEOUT, "inference.GRPCInferenceService");
    Stack {
        router,
        groups,
        shared,
        gateway,
    }
}

/// Deterministic hidden states `[tokens, 512]` in [-2, 2), different for each `seed`.
pub fn hidden_states(tokens: usize, seed: usize) -> Vec<f32> {
    (0..tokens * 512)
        .map(|i| ((((i + seed) * 7901) % 983) as f32 / 983.0 - 0.5) * 4.0)
        .collect()
}

/// Builds a KServe request for model `moge`: `values` as `[tokens, 512]`
/// raw `dtype` bytes, parameter `layer`, and the named `outputs` (none: the
/// gateway's default, `output`).
pub fn infer_request(
    values: &[f32],
    tokens: usize,
    dtype: moge_shared::DType,
    layer: i64,
    outputs: &[&str],
) -> moge_shared::proto::inference::ModelInferRequest {
    use moge_shared::proto::inference::infer_parameter::ParameterChoice;
    use moge_shared::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use moge_shared::proto::inference::{InferParameter, ModelInferRequest};

    ModelInferRequest {
        model_name: "moge".to_owned(),
        id: format!("request-{tokens}"),
        parameters: [(
            "layer".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(layer)),
            },
        )]
        .into(),
        inputs: vec![InferInputTensor {
            name: "hidden_states".to_owned(),
            datatype: dtype.kserve_name().to_owned(),
            shape: vec![tokens as i64, 512],
            ..Default::default()
        }],
        outputs: outputs
            .iter()
            .map(|name| InferRequestedOutputTensor {
                name: (*name).to_owned(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: vec![dtype.encode(values).into()],
        model_version: String::new(),
    }
}

/// Polls `ServerReady` until it returns `ready`; fails the test after `timeout`.
pub async fn wait_ready(
    client: &mut moge_shared::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    ready: bool,
    timeout: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let state = client
            .server_ready(moge_shared::proto::inference::ServerReadyRequest {})
            .await
            .expect("ServerReady answers")
            .into_inner()
            .ready;
        if state == ready {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not turn ready={ready} within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
