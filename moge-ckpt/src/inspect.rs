//! `moge-ckpt inspect`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use moge_shared::checkpoint::{Checkpoint, names};

pub fn inspect(dir: &Path, list_tensors: bool) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(dir).with_context(|| format!("failed to open checkpoint {}", dir.display()))?;
    let config = checkpoint.config();
    let tensors = checkpoint.tensors()?;
    println!("checkpoint {}", dir.display());
    println!(
        "  hidden_size {}  num_experts {}  num_experts_per_tok {}  moe_intermediate_size {}  shared_expert_intermediate_size {}",
        config.hidden_size,
        config.num_experts,
        config.num_experts_per_tok,
        config.moe_intermediate_size,
        config.shared_expert_intermediate_size
    );
    println!(
        "  groups {} ({} experts each, {} per token per group)  topk_group {}  norm_topk_prob {}  torch_dtype {}",
        config.num_groups(),
        config.experts_per_group(),
        config.experts_per_tok_per_group(),
        config.topk_group(),
        config.norm_topk_prob,
        config.torch_dtype
    );
    let layers = checkpoint.layers();
    println!(
        "  layers present: {} of num_hidden_layers {} ({})",
        layers.len(),
        config.num_hidden_layers,
        describe_ranges(&layers)
    );
    println!("  files: {}", checkpoint.files().join(", "));

    let mut per_layer: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut per_group: BTreeMap<String, usize> = BTreeMap::new();
    let per_group_experts = config.experts_per_group();
    for tensor in &tensors {
        if let Some(layer) = names::layer_of(&tensor.name) {
            let entry = per_layer.entry(layer).or_default();
            entry.0 += 1;
            entry.1 += tensor.bytes;
        }
        let part = if tensor.name.contains(".mlp.experts.") {
            let expert: usize = tensor
                .name
                .split(".mlp.experts.")
                .nth(1)
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse().ok())
                .unwrap_or(0);
            format!("group {:>3}", expert / per_group_experts)
        } else if tensor.name.contains(".shared_expert.") {
            "shared expert".to_owned()
        } else {
            "router".to_owned()
        };
        *per_group.entry(part).or_default() += tensor.bytes;
    }
    println!("  {:<14} {:>8} {:>16}", "layer", "tensors", "bytes");
    for (layer, (count, bytes)) in &per_layer {
        println!("  {layer:<14} {count:>8} {bytes:>16}");
    }
    println!("  {:<14} {:>25}", "part", "bytes (all layers)");
    for (part, bytes) in &per_group {
        println!("  {part:<14} {bytes:>25}");
    }
    let total: usize = tensors.iter().map(|tensor| tensor.bytes).sum();
    println!("  total: {} tensors, {} bytes", tensors.len(), total);
    if list_tensors {
        for tensor in &tensors {
            println!(
                "  {:<60} {:<5} {:<14} {:>12}  {}",
                tensor.name,
                tensor.dtype,
                format!("{:?}", tensor.shape),
                tensor.bytes,
                tensor.file
            );
        }
    }
    Ok(())
}

/// Formats sorted layer indices as ranges: `0..4, 7`.
fn describe_ranges(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut index = 0;
    while index < layers.len() {
        let start = layers[index];
        let mut end = start;
        while index + 1 < layers.len() && layers[index + 1] == end + 1 {
            index += 1;
            end += 1;
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..{}", end + 1)
        });
        index += 1;
    }
    parts.join(", ")
}
