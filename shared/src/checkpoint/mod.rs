//! Hugging Face checkpoints of the Pangu Pro MoE layout: `config.json` plus
//! one `model.safetensors` or shards listed in `model.safetensors.index.json`.
//!
//! Shards are memory-mapped, and only when a requested tensor lives in them,
//! so a process that loads one group's experts reads only those bytes.
//! Per MoE layer `L` the tensors are:
//!
//! | tensor | shape |
//! | --- | --- |
//! | `model.layers.L.mlp.gate.weight` | `[N, H]` |
//! | `model.layers.L.mlp.router_scale` | `[1, N]` |
//! | `model.layers.L.mlp.experts.E.{gate,up}_proj.weight` | `[I, H]` |
//! | `model.layers.L.mlp.experts.E.down_proj.weight` | `[H, I]` |
//! | `model.layers.L.mlp.shared_expert.{gate,up}_proj.weight` | `[I_shared, H]` |
//! | `model.layers.L.mlp.shared_expert.down_proj.weight` | `[H, I_shared]` |

mod generate;
mod shard;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::config::{ConfigError, ModelConfig};
use crate::dtype::DType;
use crate::expert::{Expert, ExpertError, ExpertGroup};
use crate::layer::MoeLayer;
use crate::routing::{Router, RoutingError, RoutingShape};
use crate::weights::{WeightFormat, WeightMatrix};

pub use generate::{GenerateOptions, GenerateSummary, Preset, generate, generate_layer};
use shard::Shard;

/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensor names of the Pangu Pro MoE layout.
pub mod names {
    /// Router gate weight of a layer, `[N, H]`.
    pub fn gate(layer: usize) -> String {
        format!("model.layers.{layer}.mlp.gate.weight")
    }

    /// Router scale of a layer, `[1, N]`.
    pub fn router_scale(layer: usize) -> String {
        format!("model.layers.{layer}.mlp.router_scale")
    }

    /// Projection `proj` (`gate_proj`, `up_proj` or `down_proj`) of a routed expert.
    pub fn expert(layer: usize, expert: usize, proj: &str) -> String {
        format!("model.layers.{layer}.mlp.experts.{expert}.{proj}.weight")
    }

    /// Projection `proj` of the shared expert.
    pub fn shared_expert(layer: usize, proj: &str) -> String {
        format!("model.layers.{layer}.mlp.shared_expert.{proj}.weight")
    }

    /// Layer index of a tensor name, if it belongs to a layer.
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
    }
}

/// A checkpoint that cannot be read or does not match the layout.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be opened, mapped or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// Action that failed, such as "failed to open".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// `config.json` is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The shard index or a safetensors header is malformed.
    #[error("invalid {path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Description of the problem.
        message: String,
    },
    /// A tensor the request needs is not in the checkpoint.
    #[error("tensor `{name}` not found in checkpoint {dir}")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor has a dtype the kernels do not read.
    #[error("tensor `{name}` has dtype {dtype}, expected BF16, F16 or F32")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Dtype in the file.
        dtype: String,
    },
    /// A layer or group index outside the model.
    #[error("{what} {index} is out of range, expected below {limit}")]
    OutOfRange {
        /// `layer` or `group`.
        what: &'static str,
        /// Index requested.
        index: usize,
        /// Number of layers or groups.
        limit: usize,
    },
    /// Loaded expert weights do not fit together.
    #[error(transparent)]
    Expert(#[from] ExpertError),
    /// Loaded router weights do not fit the configuration.
    #[error(transparent)]
    Router(#[from] RoutingError),
}

/// A tensor's entry in a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Dtype as the header spells it.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub bytes: usize,
    /// Shard file holding it.
    pub file: String,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// An opened checkpoint directory. Shards are mapped on first use and kept.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    weight_map: BTreeMap<String, String>,
    shards: Mutex<HashMap<String, Arc<Shard>>>,
}

impl Checkpoint {
    /// Opens `dir`, reading `config.json` and the shard index (or the header
    /// of the single file) but no tensor data.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        Self::open_with_config(dir, config)
    }

    /// Opens `dir` with a configuration given by the caller, for example one
    /// with an explicit group count.
    pub fn open_with_config(dir: &Path, config: ModelConfig) -> Result<Self, CheckpointError> {
        config.validate()?;
        let index_path = dir.join(INDEX_FILE);
        let mut shards = HashMap::new();
        let weight_map = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| CheckpointError::Io {
                action: "failed to read",
                path: index_path.clone(),
                source,
            })?;
            let index: IndexFile = serde_json::from_str(&text).map_err(|error| CheckpointError::Format {
                path: index_path.clone(),
                message: error.to_string(),
            })?;
            index.weight_map
        } else {
            let shard = Arc::new(Shard::open(&dir.join(SINGLE_FILE))?);
            let map = shard
                .names()
                .into_iter()
                .map(|name| (name, SINGLE_FILE.to_owned()))
                .collect();
            shards.insert(SINGLE_FILE.to_owned(), shard);
            map
        };
        for file in weight_map.values() {
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(CheckpointError::Format {
                    path: index_path,
                    message: format!("shard name {file:?} must be a file name inside the checkpoint"),
                });
            }
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            config,
            weight_map,
            shards: Mutex::new(shards),
        })
    }

    /// Returns the checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the validated model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Layers that have at least one tensor in the checkpoint, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let layers: BTreeSet<usize> = self
            .weight_map
            .keys()
            .filter_map(|name| names::layer_of(name))
            .collect();
        layers.into_iter().collect()
    }

    /// Shard files, ascending.
    pub fn files(&self) -> Vec<String> {
        let files: BTreeSet<&String> = self.weight_map.values().collect();
        files.into_iter().cloned().collect()
    }

    /// Shard files mapped so far, ascending; a process that loaded one layer
    /// has mapped only that layer's shards.
    pub fn mapped_files(&self) -> Vec<String> {
        let shards = self.shards.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut files: Vec<String> = shards.keys().cloned().collect();
        files.sort();
        files
    }

    /// Lists every tensor's header entry, mapping every shard.
    pub fn tensors(&self) -> Result<Vec<TensorEntry>, CheckpointError> {
        let mut entries = Vec::with_capacity(self.weight_map.len());
        for (name, file) in &self.weight_map {
            let shard = self.shard(file)?;
            let info = shard.info(name).ok_or_else(|| self.missing(name))?;
            entries.push(TensorEntry {
                name: name.clone(),
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                bytes: info.data_offsets.1 - info.data_offsets.0,
                file: file.clone(),
            });
        }
        Ok(entries)
    }

    /// Routing sizes of this model.
    pub fn routing_shape(&self) -> RoutingShape {
        RoutingShape::from_config(&self.config)
    }

    /// Loads only the router tensors of `layer`.
    pub fn load_router(&self, layer: usize) -> Result<Router, CheckpointError> {
        self.check_layer(layer)?;
        let (n, h) = (self.config.num_experts, self.config.hidden_size);
        let gate = self.matrix(&names::gate(layer), n, h)?.to_f32();
        let scale_name = names::router_scale(layer);
        let scale = self.vector(&scale_name, n)?;
        Ok(Router::new(self.routing_shape(), gate, scale)?)
    }

    /// Loads one routed expert (global index `expert`) of `layer`.
    pub fn load_expert(&self, layer: usize, expert: usize, format: WeightFormat) -> Result<Expert, CheckpointError> {
        self.check_layer(layer)?;
        if expert >= self.config.num_experts {
            return Err(CheckpointError::OutOfRange {
                what: "expert",
                index: expert,
                limit: self.config.num_experts,
            });
        }
        let name = |proj: &str| names::expert(layer, expert, proj);
        self.load_mlp(expert, self.config.moe_intermediate_size, name, format)
    }

    /// Loads the experts of one group of `layer`.
    pub fn load_group(&self, layer: usize, group: usize, format: WeightFormat) -> Result<ExpertGroup, CheckpointError> {
        let groups = self.config.num_groups();
        if group >= groups {
            return Err(CheckpointError::OutOfRange {
                what: "group",
                index: group,
                limit: groups,
            });
        }
        let per_group = self.config.experts_per_group();
        let first_expert = group * per_group;
        let experts = (first_expert..first_expert + per_group)
            .map(|expert| self.load_expert(layer, expert, format))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ExpertGroup {
            group,
            first_expert,
            experts,
        })
    }

    /// Loads the shared expert of `layer`.
    pub fn load_shared_expert(&self, layer: usize, format: WeightFormat) -> Result<Expert, CheckpointError> {
        self.check_layer(layer)?;
        let name = |proj: &str| names::shared_expert(layer, proj);
        self.load_mlp(0, self.config.shared_expert_intermediate_size, name, format)
    }

    /// Loads every tensor of `layer`.
    pub fn load_layer(&self, layer: usize, format: WeightFormat) -> Result<MoeLayer, CheckpointError> {
        let router = self.load_router(layer)?;
        let groups = (0..self.config.num_groups())
            .map(|group| self.load_group(layer, group, format))
            .collect::<Result<Vec<_>, _>>()?;
        let shared_expert = self.load_shared_expert(layer, format)?;
        Ok(MoeLayer {
            layer,
            router,
            groups,
            shared_expert,
        })
    }

    fn load_mlp(
        &self,
        index: usize,
        intermediate: usize,
        name: impl Fn(&str) -> String,
        format: WeightFormat,
    ) -> Result<Expert, CheckpointError> {
        let h = self.config.hidden_size;
        let gate = self.matrix(&name("gate_proj"), intermediate, h)?.into_format(format);
        let up = self.matrix(&name("up_proj"), intermediate, h)?.into_format(format);
        let down = self.matrix(&name("down_proj"), h, intermediate)?.into_format(format);
        Ok(Expert::new(index, gate, up, down)?)
    }

    fn check_layer(&self, layer: usize) -> Result<(), CheckpointError> {
        if layer >= self.config.num_hidden_layers {
            return Err(CheckpointError::OutOfRange {
                what: "layer",
                index: layer,
                limit: self.config.num_hidden_layers,
            });
        }
        Ok(())
    }

    fn missing(&self, name: &str) -> CheckpointError {
        CheckpointError::MissingTensor {
            name: name.to_owned(),
            dir: self.dir.clone(),
        }
    }

    fn shard(&self, file: &str) -> Result<Arc<Shard>, CheckpointError> {
        let mut shards = self.shards.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shard) = shards.get(file) {
            return Ok(Arc::clone(shard));
        }
        let shard = Arc::new(Shard::open(&self.dir.join(file))?);
        shards.insert(file.to_owned(), Arc::clone(&shard));
        Ok(shard)
    }

    fn locate(&self, name: &str) -> Result<Arc<Shard>, CheckpointError> {
        let file = self.weight_map.get(name).ok_or_else(|| self.missing(name))?;
        let shard = self.shard(file)?;
        if shard.info(name).is_none() {
            return Err(self.missing(name));
        }
        Ok(shard)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, CheckpointError> {
        self.locate(name)?.matrix(name, rows, cols)
    }

    /// Loads a vector of `len` values stored as `[len]` or `[1, len]`.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, CheckpointError> {
        let shard = self.locate(name)?;
        let rank = shard.info(name).map_or(2, |info| info.shape.len());
        let expected: &[usize] = if rank == 1 { &[len] } else { &[1, len] };
        let matrix = shard.matrix_with_shape(name, 1, len, expected)?;
        Ok((0..len).map(|col| matrix.get(0, col)).collect())
    }
}

/// Maps a safetensors dtype to a kernel dtype or reports the tensor by name.
fn supported_dtype(name: &str, dtype: safetensors::Dtype) -> Result<DType, CheckpointError> {
    DType::from_safetensors(dtype).ok_or_else(|| CheckpointError::Dtype {
        name: name.to_owned(),
        dtype: dtype.to_string(),
    })
}
