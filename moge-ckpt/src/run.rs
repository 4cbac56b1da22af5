//! `moge-ckpt run`: one layer in process, on hidden states from a file.
//!
//! The input is a safetensors file with a `hidden_states` tensor `[T, H]` in
//! BF16, F16 or F32. The output file contains `output` (`[T, H]`, the input's
//! dtype), `expert_ids` (`[T, K]`, I32), `expert_weights` (`[T, K]`, F32) and
//! `group_assignments` (`[M]`, I64). A JSON summary goes to standard output.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use moge_shared::checkpoint::Checkpoint;
use moge_shared::kernels::Kernel;
use moge_shared::weights::WeightFormat;
use moge_shared::{DType, RoutingMode, RoutingOptions};
use safetensors::tensor::TensorView;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Layer to run; default: the first layer in the checkpoint.
    #[arg(long)]
    layer: Option<usize>,
    /// Routing mode: moge, top-k or group-limited.
    #[arg(long, default_value = "moge")]
    routing: RoutingMode,
    /// Renormalize the chosen scores before router_scale (default: the
    /// config's norm_topk_prob).
    #[arg(long)]
    renormalize: Option<bool>,
    /// Storage format of expert weights: `stored` (checkpoint dtype) or `f32`.
    #[arg(long, default_value = "stored")]
    weights: WeightFormat,
    /// Use the portable kernel instead of the fastest one this CPU supports.
    #[arg(long)]
    portable: bool,
    /// Input safetensors file with `hidden_states` [T, H].
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.checkpoint)
        .with_context(|| format!("failed to open checkpoint {}", args.checkpoint.display()))?;
    let present = checkpoint.layers();
    let layer = match args.layer {
        Some(layer) => layer,
        None => *present.first().context("the checkpoint contains no layer tensors")?,
    };
    let layers = checkpoint.config().num_hidden_layers;
    if layer < layers && !present.contains(&layer) {
        bail!(
            "layer {layer} is not in checkpoint {}, which contains layers {present:?}",
            args.checkpoint.display()
        );
    }
    let started = Instant::now();
    let moe = checkpoint.load_layer(layer, args.weights)?;
    let load_seconds = started.elapsed().as_secs_f64();

    let bytes = std::fs::read(&args.input).with_context(|| format!("failed to read {}", args.input.display()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("invalid safetensors file {}", args.input.display()))?;
    let hidden = tensors
        .tensor("hidden_states")
        .with_context(|| format!("{} has no tensor `hidden_states`", args.input.display()))?;
    let dtype = DType::from_safetensors(hidden.dtype())
        .with_context(|| format!("hidden_states has dtype {}, expected BF16, F16 or F32", hidden.dtype()))?;
    let h = moe.hidden_size();
    let [tokens, width] = hidden.shape() else {
        bail!("hidden_states has shape {:?}, expected [T, {h}]", hidden.shape());
    };
    if *width != h {
        bail!("hidden_states has shape {:?}, expected [T, {h}]", hidden.shape());
    }
    let values = dtype.decode(hidden.data())?;
    if let Some(index) = values.iter().position(|value| !value.is_finite()) {
        bail!(
            "hidden_states[{}][{}] is {}, expected finite values",
            index / h,
            index % h,
            values[index]
        );
    }

    let kernel = if args.portable {
        Kernel::Portable
    } else {
        Kernel::detect()
    };
    let options = RoutingOptions {
        mode: args.routing,
        renormalize: args.renormalize.unwrap_or(checkpoint.config().norm_topk_prob),
    };
    let started = Instant::now();
    let output = moe.forward(kernel, &values, *tokens, options)?;
    let forward_seconds = started.elapsed().as_secs_f64();

    let k = output.routing.top_k;
    let out_bytes = dtype.encode(&output.hidden);
    let ids: Vec<i32> = output.routing.expert_ids.iter().map(|&id| id as i32).collect();
    let groups: Vec<i64> = output
        .routing
        .group_assignments
        .iter()
        .map(|&count| count as i64)
        .collect();
    let views = vec![
        ("output", TensorView::new(hidden.dtype(), vec![*tokens, h], &out_bytes)?),
        (
            "expert_ids",
            TensorView::new(safetensors::Dtype::I32, vec![*tokens, k], bytemuck::cast_slice(&ids))?,
        ),
        (
            "expert_weights",
            TensorView::new(
                safetensors::Dtype::F32,
                vec![*tokens, k],
                bytemuck::cast_slice(&output.routing.expert_weights),
            )?,
        ),
        (
            "group_assignments",
            TensorView::new(
                safetensors::Dtype::I64,
                vec![groups.len()],
                bytemuck::cast_slice(&groups),
            )?,
        ),
    ];
    safetensors::serialize_to_file(views, None, &args.output)
        .with_context(|| format!("failed to write {}", args.output.display()))?;
    let summary = serde_json::json!({
        "layer": layer,
        "tokens": tokens,
        "dtype": dtype.safetensors_name(),
        "routing": args.routing.as_str(),
        "kernel": kernel.instruction_set(),
        "group_assignments": output.routing.group_assignments,
        "imbalance_score": output.routing.imbalance_score_per_group(),
        "load_seconds": load_seconds,
        "forward_seconds": forward_seconds,
        "expert_weight_bytes": moe.expert_bytes(),
        "peak_rss_bytes": moge_shared::memory::peak_rss_bytes(),
    });
    println!("{summary}");
    Ok(())
}
