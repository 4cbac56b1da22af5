//! `moge-ckpt` as a user runs it: generate, inspect, run, and bad arguments.

use std::path::Path;
use std::process::{Command, Output};

use moge_tests::binary;

fn moge_ckpt(args: &[&str]) -> Output {
    let path = binary("moge-ckpt");
    assert!(
        path.exists(),
        "{} is missing; build the binaries first (cargo build --release)",
        path.display()
    );
    Command::new(path).args(args).output().expect("moge-ckpt starts")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes a safetensors file with one F32 tensor `name` of `shape`.
fn write_f32(path: &Path, name: &str, shape: &[usize], values: &[f32]) {
    let header = serde_json::json!({
        name: { "dtype": "F32", "shape": shape, "data_offsets": [0, values.len() * 4] }
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn generated_small(dir: &Path) {
    let out = dir.to_str().unwrap();
    let output = moge_ckpt(&["generate", "--preset", "small", "--out", out, "--layers", "1"]);
    assert!(output.status.success(), "generate failed: {}", stderr(&output));
}

#[test]
fn generate_inspect_run_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("ckpt");
    generated_small(&checkpoint);

    let inspect = moge_ckpt(&["inspect", checkpoint.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("groups 8 (8 experts each, 1 per token per group)"),
        "{text}"
    );
    assert!(text.contains("layers present: 1 of num_hidden_layers 2 (1)"), "{text}");

    let input = dir.path().join("in.safetensors");
    let values: Vec<f32> = (0..3 * 512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    write_f32(&input, "hidden_states", &[3, 512], &values);
    let output_path = dir.path().join("out.safetensors");
    let run = moge_ckpt(&[
        "run",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output_path.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["layer"], 1, "the first layer present is the default");
    assert_eq!(summary["tokens"], 3);
    assert_eq!(summary["imbalance_score"], 0.0);
    assert_eq!(
        summary["group_assignments"],
        serde_json::json!([3, 3, 3, 3, 3, 3, 3, 3])
    );
    assert!(output_path.exists());
}

#[test]
fn bad_arguments_fail_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("ckpt");
    generated_small(&checkpoint);
    let ckpt = checkpoint.to_str().unwrap();
    let out = dir.path().join("x").to_str().unwrap().to_owned();
    let wide = dir.path().join("wide.safetensors");
    write_f32(&wide, "hidden_states", &[2, 256], &[0.5; 512]);
    let wide = wide.to_str().unwrap();
    let output = dir.path().join("out.safetensors");
    let output = output.to_str().unwrap();

    let nan = dir.path().join("nan.safetensors");
    let mut values = vec![0.5f32; 2 * 512];
    values[512 + 3] = f32::NAN;
    write_f32(&nan, "hidden_states", &[2, 512], &values);
    let nan = nan.to_str().unwrap();

    let cases: [(&[&str], &str); 9] = [
        (
            &["generate", "--preset", "bogus", "--out", &out],
            "unknown preset \"bogus\"",
        ),
        (
            &["generate", "--preset", "small", "--out", &out, "--layers", "5..3"],
            "is empty",
        ),
        (
            &["generate", "--preset", "small", "--out", &out, "--layers", "0..9"],
            "layer 8 is out of range",
        ),
        (
            &["generate", "--preset", "small", "--out", &out, "--router-skew", "-1"],
            "--router-skew is -1",
        ),
        (&["inspect", "/nonexistent/moge"], "/nonexistent/moge/config.json"),
        (
            &["run", "--checkpoint", ckpt, "--input", wide, "--output", output],
            "expected [T, 512]",
        ),
        (
            &[
                "run",
                "--checkpoint",
                ckpt,
                "--layer",
                "9",
                "--input",
                wide,
                "--output",
                output,
            ],
            "layer 9 is out of range",
        ),
        (
            &[
                "run",
                "--checkpoint",
                ckpt,
                "--layer",
                "0",
                "--input",
                wide,
                "--output",
                output,
            ],
            "contains layers [1]",
        ),
        (
            &["run", "--checkpoint", ckpt, "--input", nan, "--output", output],
            "hidden_states[1][3] is NaN",
        ),
    ];
    for (args, expected) in cases {
        let result = moge_ckpt(args);
        let message = stderr(&result);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert_ne!(result.status.code(), Some(101), "{args:?} panicked: {message}");
        assert!(
            message.contains(expected),
            "{args:?}: stderr lacks {expected:?}:\n{message}"
        );
    }
}
