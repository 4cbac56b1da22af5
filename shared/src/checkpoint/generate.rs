//! Deterministic synthetic checkpoints in the Pangu Pro MoE layout.
//!
//! No trained MoGE weights are available offline, so tests and benchmarks
//! run on generated ones. Every tensor's values depend only on the seed and
//! the tensor's name, so a layer is the same whichever layers are written
//! with it, and [`generate_layer`] builds in memory exactly what
//! [`generate`] writes.
//!
//! Initialisation follows Hugging Face `_init_weights` for linear layers:
//! normal with mean 0 and std `initializer_range` (0.02), stored as bf16.
//! `router_scale` is drawn around 1 (normal, std 0.1, clamped to
//! `[0.5, 1.5]`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use safetensors::tensor::TensorView;

use super::{CONFIG_FILE, CheckpointError, INDEX_FILE, SINGLE_FILE, names};
use crate::config::ModelConfig;
use crate::expert::{Expert, ExpertGroup};
use crate::layer::MoeLayer;
use crate::routing::{Router, RoutingShape};
use crate::weights::WeightMatrix;

/// Standard deviation of generated linear weights (`initializer_range`).
pub const INITIALIZER_RANGE: f32 = 0.02;

/// A named model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The full Pangu Pro MoE layer shape: H 5120, 64 experts in 8 groups,
    /// K 8, I 1344, shared I 5376, 48 layers (about 2.8 GB of bf16 per layer).
    PanguProMoe,
    /// 64 experts in 8 groups with K 8, H 512, I 128, shared I 512 and two
    /// layers (about 27 MB of bf16 per layer), for tests and the embedded stack.
    Small,
}

impl Preset {
    /// Preset names accepted on the command line.
    pub const NAMES: [&'static str; 2] = ["pangu-pro-moe", "small"];

    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::PanguProMoe => "pangu-pro-moe",
            Preset::Small => "small",
        }
    }

    /// Parses a preset name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pangu-pro-moe" => Some(Preset::PanguProMoe),
            "small" => Some(Preset::Small),
            _ => None,
        }
    }

    /// Returns the preset's configuration.
    pub fn config(self) -> ModelConfig {
        let (hidden, intermediate, shared, layers) = match self {
            Preset::PanguProMoe => (5120, 1344, 5376, 48),
            Preset::Small => (512, 128, 512, 2),
        };
        ModelConfig {
            hidden_size: hidden,
            num_experts: 64,
            num_experts_per_tok: 8,
            moe_intermediate_size: intermediate,
            shared_expert_intermediate_size: shared,
            num_hidden_layers: layers,
            hidden_act: "silu".to_owned(),
            torch_dtype: "bfloat16".to_owned(),
            n_group: None,
            topk_group: None,
            norm_topk_prob: false,
        }
    }

    /// Layers written when none are named: one for the full shape, all for `small`.
    pub fn default_layers(self) -> Range<usize> {
        match self {
            Preset::PanguProMoe => 0..1,
            Preset::Small => 0..2,
        }
    }
}

/// Options of [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Model shape.
    pub preset: Preset,
    /// Layers to write; `None` means the preset's default.
    pub layers: Option<Range<usize>>,
    /// Seed of every tensor's generator.
    pub seed: u64,
    /// Router skew X: the gate rows of the favoured experts are multiplied by
    /// `1 + X`, so their logits spread wider and they win top-K more often,
    /// as a few experts do in trained routers. 0 leaves the router unskewed.
    pub router_skew: f32,
    /// Explicit group count M, written to `config.json` as `n_group`.
    pub num_groups: Option<usize>,
    /// Write one `model.safetensors` instead of one shard per layer.
    pub single_file: bool,
}

impl GenerateOptions {
    /// Options for `preset` with seed 0, no skew, default layers, sharded.
    pub fn new(preset: Preset) -> Self {
        GenerateOptions {
            preset,
            layers: None,
            seed: 0,
            router_skew: 0.0,
            num_groups: None,
            single_file: false,
        }
    }

    /// Returns the configuration written to `config.json`.
    pub fn config(&self) -> Result<ModelConfig, CheckpointError> {
        let mut config = self.preset.config();
        if let Some(groups) = self.num_groups {
            config = config.with_num_groups(groups)?;
        }
        Ok(config)
    }

    fn layer_range(&self) -> Range<usize> {
        self.layers.clone().unwrap_or_else(|| self.preset.default_layers())
    }
}

/// Summary of what [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct GenerateSummary {
    /// Files written, config and index included.
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Experts favoured by a skewed router: the first two experts of each group
/// in the first quarter of the groups (at least one group).
pub fn favoured_experts(config: &ModelConfig) -> Vec<usize> {
    let per_group = config.experts_per_group();
    let groups = (config.num_groups() / 4).max(1);
    (0..groups)
        .flat_map(|group| (0..per_group.min(2)).map(move |offset| group * per_group + offset))
        .collect()
}

/// One tensor to generate.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

#[derive(Clone, Copy)]
enum Init {
    Linear,
    Gate { skew: f32 },
    RouterScale,
}

fn layer_specs(config: &ModelConfig, layer: usize, skew: f32) -> Vec<TensorSpec> {
    let (n, h) = (config.num_experts, config.hidden_size);
    let (i, s) = (config.moe_intermediate_size, config.shared_expert_intermediate_size);
    let mut specs = vec![
        TensorSpec {
            name: names::gate(layer),
            shape: vec![n, h],
            init: Init::Gate { skew },
        },
        TensorSpec {
            name: names::router_scale(layer),
            shape: vec![1, n],
            init: Init::RouterScale,
        },
    ];
    let mut mlp = |name: &dyn Fn(&str) -> String, intermediate: usize| {
        for (proj, shape) in [
            ("gate_proj", vec![intermediate, h]),
            ("up_proj", vec![intermediate, h]),
            ("down_proj", vec![h, intermediate]),
        ] {
            specs.push(TensorSpec {
                name: name(proj),
                shape,
                init: Init::Linear,
            });
        }
    };
    for expert in 0..n {
        mlp(&|proj| names::expert(layer, expert, proj), i);
    }
    mlp(&|proj| names::shared_expert(layer, proj), s);
    specs
}

/// FNV-1a hash of a tensor name, mixed into the seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn tensor_values(spec: &TensorSpec, config: &ModelConfig, seed: u64) -> Vec<bf16> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ name_hash(&spec.name));
    let len: usize = spec.shape.iter().product();
    match spec.init {
        Init::Linear => sample_normal(&mut rng, len, INITIALIZER_RANGE),
        Init::Gate { skew } => {
            let mut values = sample_normal(&mut rng, len, INITIALIZER_RANGE);
            if skew != 0.0 {
                let h = config.hidden_size;
                for expert in favoured_experts(config) {
                    for value in &mut values[expert * h..(expert + 1) * h] {
                        *value = bf16::from_f32(value.to_f32() * (1.0 + skew));
                    }
                }
            }
            values
        }
        Init::RouterScale => (0..len)
            .map(|_| {
                let normal: f32 = rng.sample(rand_distr::StandardNormal);
                bf16::from_f32((1.0 + 0.1 * normal).clamp(0.5, 1.5))
            })
            .collect(),
    }
}

fn sample_normal(rng: &mut Xoshiro256PlusPlus, len: usize, std: f32) -> Vec<bf16> {
    let normal = Normal::new(0.0f32, std).expect("a positive std is a valid normal distribution");
    (0..len).map(|_| bf16::from_f32(normal.sample(rng))).collect()
}

/// Builds layer `layer` of `config` in memory, with exactly the values
/// [`generate`] writes for the same seed and skew.
pub fn generate_layer(config: &ModelConfig, layer: usize, seed: u64, router_skew: f32) -> MoeLayer {
    let specs = layer_specs(config, layer, router_skew);
    let values: Vec<Vec<bf16>> = specs.par_iter().map(|spec| tensor_values(spec, config, seed)).collect();
    let matrix = |index: usize| {
        let shape = &specs[index].shape;
        WeightMatrix::from_bf16(shape[0], shape[1], values[index].clone())
            .expect("generated tensors match their shapes")
    };
    let gate = matrix(0).to_f32();
    let scale: Vec<f32> = values[1].iter().map(|v| v.to_f32()).collect();
    let router =
        Router::new(RoutingShape::from_config(config), gate, scale).expect("generated router matches the config");
    let expert = |first_tensor: usize, index: usize| {
        Expert::new(
            index,
            matrix(first_tensor),
            matrix(first_tensor + 1),
            matrix(first_tensor + 2),
        )
        .expect("generated experts match their shapes")
    };
    let per_group = config.experts_per_group();
    let groups = (0..config.num_groups())
        .map(|group| ExpertGroup {
            group,
            first_expert: group * per_group,
            experts: (group * per_group..(group + 1) * per_group)
                .map(|e| expert(2 + 3 * e, e))
                .collect(),
        })
        .collect();
    let shared_expert = expert(2 + 3 * config.num_experts, 0);
    MoeLayer {
        layer,
        router,
        groups,
        shared_expert,
    }
}

/// Writes a checkpoint into `out`: shards (one per layer, or a single file),
/// the index, and `config.json` last, so a directory with `config.json` is
/// complete. `progress(done, total)` is called after each tensor.
pub fn generate(
    out: &Path,
    options: &GenerateOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<GenerateSummary, CheckpointError> {
    let config = options.config()?;
    let layers = options.layer_range();
    if layers.is_empty() || layers.end > config.num_hidden_layers {
        return Err(CheckpointError::OutOfRange {
            what: "layer",
            index: layers.end.saturating_sub(1).max(layers.start),
            limit: config.num_hidden_layers,
        });
    }
    std::fs::create_dir_all(out).map_err(|source| CheckpointError::Io {
        action: "failed to create",
        path: out.to_owned(),
        source,
    })?;
    let config_path = out.join(CONFIG_FILE);
    if config_path.exists() {
        std::fs::remove_file(&config_path).map_err(|source| CheckpointError::Io {
            action: "failed to remove",
            path: config_path.clone(),
            source,
        })?;
    }

    let shards: Vec<(String, Vec<usize>)> = if options.single_file {
        vec![(SINGLE_FILE.to_owned(), layers.clone().collect())]
    } else {
        let count = layers.len();
        layers
            .clone()
            .enumerate()
            .map(|(i, layer)| (format!("model-{:05}-of-{count:05}.safetensors", i + 1), vec![layer]))
            .collect()
    };
    let total: usize = layers.len() * layer_specs(&config, 0, 0.0).len();
    let done = AtomicUsize::new(0);
    let mut summary = GenerateSummary {
        files: Vec::new(),
        tensors: 0,
        bytes: 0,
    };
    let mut weight_map = BTreeMap::new();
    for (file, shard_layers) in &shards {
        let specs: Vec<TensorSpec> = shard_layers
            .iter()
            .flat_map(|&layer| layer_specs(&config, layer, options.router_skew))
            .collect();
        let values: Vec<Vec<bf16>> = specs
            .par_iter()
            .map(|spec| {
                let values = tensor_values(spec, &config, options.seed);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                values
            })
            .collect();
        let views = specs
            .iter()
            .zip(&values)
            .map(|(spec, values)| {
                let view = TensorView::new(
                    safetensors::Dtype::BF16,
                    spec.shape.clone(),
                    bytemuck::cast_slice(values),
                )
                .map_err(|error| format_error(out, &error))?;
                Ok((spec.name.clone(), view))
            })
            .collect::<Result<Vec<_>, CheckpointError>>()?;
        let path = out.join(file);
        let metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize_to_file(views, Some(metadata.into_iter().collect()), &path)
            .map_err(|error| format_error(&path, &error))?;
        make_readable(&path)?;
        for (spec, values) in specs.iter().zip(&values) {
            weight_map.insert(spec.name.clone(), file.clone());
            summary.bytes += (values.len() * 2) as u64;
        }
        summary.tensors += specs.len();
        summary.files.push(path);
    }

    if !options.single_file {
        let index = serde_json::json!({
            "metadata": { "total_size": summary.bytes },
            "weight_map": weight_map,
        });
        let path = out.join(INDEX_FILE);
        write_json(&path, &index)?;
        summary.files.push(path);
    }
    let mut document = serde_json::to_value(&config).expect("a config serializes to JSON");
    let extra = serde_json::json!({
        "architectures": ["PanguProMoEForCausalLM"],
        "model_type": "PanguProMoE",
        "initializer_range": INITIALIZER_RANGE,
        "moge_generator": {
            "preset": options.preset.name(),
            "seed": options.seed,
            "router_skew": options.router_skew,
            "layers": [layers.start, layers.end],
        },
    });
    if let (Some(object), Some(extra)) = (document.as_object_mut(), extra.as_object()) {
        object.extend(extra.clone());
    }
    write_json(&config_path, &document)?;
    summary.files.push(config_path);
    Ok(summary)
}

/// Gives a shard the permissions of the other files (the safetensors writer
/// creates it readable by its owner only), so a serving account can read it.
fn make_readable(path: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|source| {
            CheckpointError::Io {
                action: "failed to set permissions of",
                path: path.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

fn format_error(path: &Path, error: &dyn std::fmt::Display) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|source| CheckpointError::Io {
        action: "failed to write",
        path: path.to_owned(),
        source,
    })
}
