//! Loading generated and hand-made checkpoints, and the errors of bad ones.

use std::collections::BTreeMap;
use std::path::Path;

use moge_shared::checkpoint::{self, Checkpoint, GenerateOptions, Preset, generate_layer, names};
use moge_shared::weights::WeightFormat;
use safetensors::tensor::TensorView;

fn write(dir: &Path, options: &GenerateOptions) {
    checkpoint::generate(dir, options, &|_, _| {}).unwrap();
}

fn small(layers: std::ops::Range<usize>, single_file: bool) -> GenerateOptions {
    GenerateOptions {
        layers: Some(layers),
        single_file,
        seed: 3,
        ..GenerateOptions::new(Preset::Small)
    }
}

#[test]
fn loaded_layer_equals_generated_layer() {
    for single_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &small(0..2, single_file));
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.layers(), [0, 1]);
        let loaded = checkpoint.load_layer(1, WeightFormat::Stored).unwrap();
        let expected = generate_layer(checkpoint.config(), 1, 3, 0.0);
        assert_eq!(loaded.router.router_scale(), expected.router.router_scale());
        for (a, b) in loaded.groups.iter().zip(&expected.groups) {
            for (x, y) in a.experts.iter().zip(&b.experts) {
                for (m, n) in [
                    (&x.gate_proj, &y.gate_proj),
                    (&x.up_proj, &y.up_proj),
                    (&x.down_proj, &y.down_proj),
                ] {
                    assert_eq!((m.rows(), m.cols()), (n.rows(), n.cols()));
                    for (row, col) in [(0, 0), (m.rows() - 1, m.cols() - 1), (m.rows() / 2, 3)] {
                        assert_eq!(m.get(row, col).to_bits(), n.get(row, col).to_bits());
                    }
                }
            }
        }
        let gate = loaded.router.gate();
        let expected_gate = expected.router.gate();
        for row in 0..gate.rows() {
            for col in 0..gate.cols() {
                assert_eq!(gate.get(row, col).to_bits(), expected_gate.get(row, col).to_bits());
            }
        }
    }
}

#[test]
fn stored_weights_are_mapped_without_copy() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &small(0..1, false));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let expert = checkpoint.load_expert(0, 5, WeightFormat::Stored).unwrap();
    assert!(expert.gate_proj.is_mapped());
    let converted = checkpoint.load_expert(0, 5, WeightFormat::F32).unwrap();
    assert!(!converted.gate_proj.is_mapped());
    assert_eq!(converted.gate_proj.bytes(), 2 * expert.gate_proj.bytes());
}

#[test]
fn group_load_maps_only_its_layer_shard() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &small(0..2, false));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert!(checkpoint.mapped_files().is_empty());
    let group = checkpoint.load_group(1, 3, WeightFormat::Stored).unwrap();
    assert_eq!(group.first_expert, 24);
    assert_eq!(group.experts.len(), 8);
    assert_eq!(checkpoint.mapped_files(), ["model-00002-of-00002.safetensors"]);
}

#[test]
fn out_of_range_indices_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &small(0..1, false));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let error = checkpoint
        .load_group(0, 8, WeightFormat::Stored)
        .unwrap_err()
        .to_string();
    assert_eq!(error, "group 8 is out of range, expected below 8");
    let error = checkpoint.load_router(2).unwrap_err().to_string();
    assert_eq!(error, "layer 2 is out of range, expected below 2");
    // Layer 1 is inside the model but was not written.
    let error = checkpoint.load_router(1).unwrap_err().to_string();
    assert!(
        error.starts_with("tensor `model.layers.1.mlp.gate.weight` not found"),
        "{error}"
    );
}

#[test]
fn explicit_group_count_changes_the_split() {
    let dir = tempfile::tempdir().unwrap();
    let options = GenerateOptions {
        num_groups: Some(4),
        ..small(0..1, true)
    };
    write(dir.path(), &options);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.config().num_groups(), 4);
    let group = checkpoint.load_group(0, 3, WeightFormat::Stored).unwrap();
    assert_eq!((group.first_expert, group.experts.len()), (48, 16));
}

/// Writes a one-layer checkpoint of the tiny shape below from raw tensors.
fn hand_made(dir: &Path, tensors: Vec<(String, safetensors::Dtype, Vec<usize>)>) {
    let config = serde_json::json!({
        "hidden_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8,
        "num_hidden_layers": 1, "hidden_act": "silu", "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8])
        .collect();
    let views: BTreeMap<String, TensorView<'_>> = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn tiny_tensors() -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
    let bf16 = safetensors::Dtype::BF16;
    let mut tensors = vec![
        (names::gate(0), bf16, vec![4, 8]),
        (names::router_scale(0), bf16, vec![1, 4]),
    ];
    for expert in 0..4 {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            tensors.push((names::expert(0, expert, proj), bf16, vec![8, 8]));
        }
    }
    for proj in ["gate_proj", "up_proj", "down_proj"] {
        tensors.push((names::shared_expert(0, proj), bf16, vec![8, 8]));
    }
    tensors
}

#[test]
fn hand_made_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(dir.path(), tiny_tensors());
    let layer = Checkpoint::open(dir.path())
        .unwrap()
        .load_layer(0, WeightFormat::Stored)
        .unwrap();
    assert_eq!(layer.groups.len(), 2);
}

#[test]
fn wrong_shape_names_tensor_and_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = tiny_tensors();
    tensors[0].2 = vec![4, 9];
    hand_made(dir.path(), tensors);
    let error = Checkpoint::open(dir.path())
        .unwrap()
        .load_router(0)
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "tensor `model.layers.0.mlp.gate.weight` has shape [4, 9], expected [4, 8]"
    );
}

#[test]
fn unsupported_dtype_names_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = tiny_tensors();
    let index = tensors
        .iter()
        .position(|(name, ..)| name.contains("experts.1.up_proj"))
        .unwrap();
    tensors[index].1 = safetensors::Dtype::I8;
    hand_made(dir.path(), tensors);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let error = checkpoint
        .load_group(0, 0, WeightFormat::Stored)
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "tensor `model.layers.0.mlp.experts.1.up_proj.weight` has dtype I8, expected BF16, F16 or F32"
    );
    // The other group does not read that tensor and loads.
    assert!(checkpoint.load_group(0, 1, WeightFormat::Stored).is_ok());
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = tiny_tensors()
        .into_iter()
        .filter(|(name, ..)| !name.contains("shared_expert.down_proj"))
        .collect();
    hand_made(dir.path(), tensors);
    let error = Checkpoint::open(dir.path())
        .unwrap()
        .load_shared_expert(0, WeightFormat::Stored)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("tensor `model.layers.0.mlp.shared_expert.down_proj.weight` not found"),
        "{error}"
    );
}

#[test]
fn truncated_shard_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(dir.path(), tiny_tensors());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let error = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(error.contains("model.safetensors: bad safetensors header"), "{error}");
}

#[test]
fn missing_directory_names_config_path() {
    let error = Checkpoint::open(Path::new("/nonexistent/moge"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("/nonexistent/moge/config.json"), "{error}");
}
