//! `moge-ctl balance` as an operator runs it: address forms, `--watch`
//! validation and a closed stdout, against an embedded gateway on loopback.

use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moge_tests::{binary, start_embedded_gateway};

fn ctl(args: &[&str]) -> Output {
    Command::new(binary("moge-ctl"))
        .args(args)
        .output()
        .expect("moge-ctl starts")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn watch_rejects_invalid_intervals() {
    for value in ["NaN", "inf", "1e30", "0", "0.05", "-1", "86401", "soon"] {
        let output = ctl(&["balance", "--gateway", "127.0.0.1:9", "--watch", value]);

        assert_eq!(output.status.code(), Some(2), "--watch {value}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains("--watch"), "--watch {value}: {message}");
        assert!(message.contains("from 0.1 to 86400"), "--watch {value}: {message}");
        assert!(!message.contains("panicked"), "--watch {value}: {message}");
    }
}

#[test]
fn gateway_rejects_other_schemes() {
    for value in ["ftp://127.0.0.1:8000", "127.0.0.1", "grpc://localhost:8001"] {
        let output = ctl(&["balance", "--gateway", value]);

        assert_eq!(output.status.code(), Some(2), "--gateway {value}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains("--gateway"), "{message}");
        assert!(message.contains("expected HOST:PORT"), "{message}");
    }
}

#[test]
fn balance_accepts_host_port() {
    let cache = tempfile::tempdir().unwrap();
    let mut gateway = start_embedded_gateway(&["--cache-dir", cache.path().to_str().unwrap()]);
    let http = gateway.http_address().to_string();

    let output = ctl(&["balance", "--gateway", &http]);

    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("default routing mode: moge"), "{stdout}");
}

#[test]
fn watch_stops_when_stdout_closes() {
    let cache = tempfile::tempdir().unwrap();
    let mut gateway = start_embedded_gateway(&["--cache-dir", cache.path().to_str().unwrap()]);
    let http = gateway.http_address().to_string();
    let mut child = Command::new(binary("moge-ctl"))
        .args(["balance", "--gateway", &http, "--watch", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moge-ctl starts");

    // Read two lines, as `head -2` does, then close the pipe.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "moge-ctl ended before two lines");
    }
    drop(stdout);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moge-ctl kept running for 20 s after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut message = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut message).unwrap();
    assert_eq!(status.code(), Some(0), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    assert!(!message.contains("Broken pipe"), "{message}");
}
