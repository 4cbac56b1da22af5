//! Model configuration read from a Hugging Face `config.json`.
//!
//! Field names equal the JSON keys of the Pangu Pro MoE family, so a released
//! checkpoint's `config.json` deserializes unchanged. Keys this crate does not
//! use are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The MoE part of a Pangu Pro MoE style `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Hidden size H: the length of each token's hidden state.
    pub hidden_size: usize,
    /// Number of routed experts N.
    pub num_experts: usize,
    /// Experts each token activates, K, summed over all groups.
    pub num_experts_per_tok: usize,
    /// Intermediate size I of each routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate size of the shared expert.
    pub shared_expert_intermediate_size: usize,
    /// Number of decoder layers of the model (every layer is an MoE layer).
    pub num_hidden_layers: usize,
    /// Activation of the expert MLPs; only `silu` (SwiGLU) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Storage dtype of the released weights, as PyTorch names it.
    #[serde(default = "default_torch_dtype")]
    pub torch_dtype: String,
    /// Number of expert groups M. Pangu Pro MoE has no such key and uses one
    /// expert per group, so `None` means M = `num_experts_per_tok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_group: Option<usize>,
    /// Groups kept by group-limited top-K routing. `None` means half of the
    /// groups, at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_group: Option<usize>,
    /// Whether the chosen softmax scores are renormalized to sum to one before
    /// `router_scale` is applied. Pangu Pro MoE does not renormalize.
    #[serde(default)]
    pub norm_topk_prob: bool,
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}

fn default_torch_dtype() -> String {
    "bfloat16".to_owned()
}

/// An invalid or unreadable model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read model config {path}: {source}")]
    Read {
        /// Path of the file.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON or lacks a required key.
    #[error("invalid model config {path}: {source}")]
    Parse {
        /// Path of the file.
        path: String,
        /// Underlying JSON error.
        source: serde_json::Error,
    },
    /// A field has a value the model cannot use.
    #[error("invalid model config: `{field}` is {value}, expected {expected}")]
    InvalidField {
        /// JSON key of the field.
        field: &'static str,
        /// The value found.
        value: String,
        /// Constraint the field must satisfy.
        expected: String,
    },
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|error| match error {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates a `config.json` document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: ModelConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<string>".to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Returns a copy with the group count M set explicitly.
    pub fn with_num_groups(mut self, num_groups: usize) -> Result<Self, ConfigError> {
        self.n_group = Some(num_groups);
        self.validate()?;
        Ok(self)
    }

    /// Number of expert groups M.
    pub fn num_groups(&self) -> usize {
        self.n_group.unwrap_or(self.num_experts_per_tok)
    }

    /// Experts in each group, N / M.
    pub fn experts_per_group(&self) -> usize {
        self.num_experts / self.num_groups()
    }

    /// Experts each token activates inside every group under MoGE, K' = K / M.
    pub fn experts_per_tok_per_group(&self) -> usize {
        self.num_experts_per_tok / self.num_groups()
    }

    /// Groups kept by group-limited top-K routing.
    pub fn topk_group(&self) -> usize {
        self.topk_group.unwrap_or((self.num_groups() / 2).max(1))
    }

    /// Checks every constraint and reports the first violated one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, value, "a positive integer"));
            }
        }

        if self.hidden_act != "silu" {
            return Err(ConfigError::InvalidField {
                field: "hidden_act",
                value: format!("{:?}", self.hidden_act),
                expected: "\"silu\" (the experts are SwiGLU MLPs)".to_owned(),
            });
        }

        let groups = self.num_groups();
        if groups == 0 {
            return Err(invalid("n_group", groups, "a positive integer"));
        }
        if !self.num_experts.is_multiple_of(groups) {
            return Err(invalid(
                "num_experts",
                self.num_experts,
                &format!("a multiple of the group count {groups}"),
            ));
        }
        if !self.num_experts_per_tok.is_multiple_of(groups) {
            return Err(invalid(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                &format!("a multiple of the group count {groups}"),
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return Err(invalid(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                &format!("at most num_experts ({})", self.num_experts),
            ));
        }

        let topk_group = self.topk_group();
        if topk_group == 0 || topk_group > groups {
            return Err(invalid(
                "topk_group",
                topk_group,
                &format!("between 1 and the group count {groups}"),
            ));
        }
        if topk_group * self.experts_per_group() < self.num_experts_per_tok {
            return Err(invalid(
                "topk_group",
                topk_group,
                &format!(
                    "large enough that the kept groups hold num_experts_per_tok ({}) experts",
                    self.num_experts_per_tok
                ),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, value: usize, expected: &str) -> ConfigError {
    ConfigError::InvalidField {
        field,
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PANGU: &str = r#"{
        "architectures": ["PanguProMoEForCausalLM"],
        "hidden_size": 5120,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1344,
        "shared_expert_intermediate_size": 5376,
        "num_hidden_layers": 48,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "vocab_size": 153376
    }"#;

    #[test]
    fn pangu_config_defaults_to_one_expert_per_group() {
        let config = ModelConfig::from_json(PANGU).unwrap();
        assert_eq!(config.num_groups(), 8);
        assert_eq!(config.experts_per_group(), 8);
        assert_eq!(config.experts_per_tok_per_group(), 1);
        assert!(!config.norm_topk_prob);
    }

    #[test]
    fn explicit_group_count_is_used() {
        let config = ModelConfig::from_json(PANGU).unwrap().with_num_groups(4).unwrap();
        assert_eq!(config.experts_per_group(), 16);
        assert_eq!(config.experts_per_tok_per_group(), 2);
    }

    #[test]
    fn indivisible_experts_name_the_field() {
        let error = ModelConfig::from_json(PANGU)
            .unwrap()
            .with_num_groups(3)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`num_experts` is 64"), "{error}");
        assert!(error.contains("multiple of the group count 3"), "{error}");
    }

    #[test]
    fn indivisible_top_k_names_the_field() {
        let text = PANGU.replace("\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 6");
        let text = text.replace("\"num_hidden_layers\": 48", "\"num_hidden_layers\": 48, \"n_group\": 4");
        let error = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(error.contains("`num_experts_per_tok` is 6"), "{error}");
    }

    #[test]
    fn zero_size_is_rejected() {
        let text = PANGU.replace("\"moe_intermediate_size\": 1344", "\"moe_intermediate_size\": 0");
        let error = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(error.contains("`moe_intermediate_size` is 0"), "{error}");
    }

    #[test]
    fn other_activation_is_rejected() {
        let text = PANGU.replace("\"silu\"", "\"gelu\"");
        let error = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(error.contains("`hidden_act` is \"gelu\""), "{error}");
    }

    #[test]
    fn missing_key_is_a_parse_error() {
        let text = PANGU.replace("\"hidden_size\": 5120,", "");
        let error = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(error.contains("hidden_size"), "{error}");
    }
}
