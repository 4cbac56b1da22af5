//! `moge-bench`: this machine's ceilings and the MoGE layer, measured in one
//! run so that the layer's figures can be stated as ratios of the ceilings.
//!
//! - GEMM ceiling: `matrixmultiply::sgemm` on square f32 matrices, threaded.
//! - Read bandwidth: a threaded sum over a buffer far larger than the caches.
//! - The layer: [`MoeLayer::forward`] at each batch size, with the weights
//!   generated in memory exactly as `moge-ckpt generate` writes them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use moge_shared::checkpoint::{Checkpoint, Preset, generate_layer};
use moge_shared::kernels::Kernel;
use moge_shared::layer::MoeLayer;
use moge_shared::weights::WeightFormat;
use moge_shared::{ModelConfig, RoutingMode, RoutingOptions};
use rayon::prelude::*;

#[derive(Parser)]
#[command(about = "Measure the machine's ceilings and the MoGE layer side by side")]
struct Args {
    /// Model shape when no checkpoint is given: pangu-pro-moe or small.
    #[arg(long, default_value = "pangu-pro-moe")]
    preset: String,
    /// Load layer 0 from this checkpoint instead of generating it in memory.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    /// Batch sizes T, comma-separated.
    #[arg(long, default_value = "1,8,64,256,1024", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Storage format of expert weights: stored (bf16) or f32.
    #[arg(long, default_value = "stored")]
    weights: WeightFormat,
    /// Routing mode.
    #[arg(long, default_value = "moge")]
    routing: RoutingMode,
    /// Minimum seconds of timed runs per batch size.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Skip the ceiling probes. Run them in a separate process when the peak
    /// RSS of the layer matters, because the bandwidth probe touches 1 GiB.
    #[arg(long)]
    no_ceilings: bool,
    /// Run only the ceiling probes.
    #[arg(long, conflicts_with = "no_ceilings")]
    ceilings_only: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = rayon::current_num_threads();
    let mut report = serde_json::json!({
        "threads": threads,
        "kernel": Kernel::detect().instruction_set(),
        "weights": format!("{:?}", args.weights),
        "routing": args.routing.as_str(),
    });
    if !args.no_ceilings {
        let gemm = gemm_ceiling();
        let bandwidth = read_bandwidth();
        eprintln!("ceiling: sgemm {gemm:.1} GFLOP/s, read bandwidth {bandwidth:.1} GB/s ({threads} threads)");
        report["gemm_gflops"] = gemm.into();
        report["read_gb_per_s"] = bandwidth.into();
    }
    if args.ceilings_only {
        return write_report(&report, args.json.as_deref());
    }

    let started = Instant::now();
    let (config, layer) = match &args.checkpoint {
        Some(dir) => {
            let checkpoint = Checkpoint::open(dir)?;
            let layer_index = *checkpoint
                .layers()
                .first()
                .context("the checkpoint contains no layer tensors")?;
            let layer = checkpoint.load_layer(layer_index, args.weights)?;
            (checkpoint.config().clone(), layer)
        }
        None => {
            let preset =
                Preset::from_name(&args.preset).with_context(|| format!("unknown preset {:?}", args.preset))?;
            let config = preset.config();
            let layer = generate_layer(&config, 0, 0, 0.0);
            let layer = convert(layer, args.weights);
            (config, layer)
        }
    };
    eprintln!(
        "layer ready in {:.1} s: {} bytes of expert weights",
        started.elapsed().as_secs_f64(),
        layer.expert_bytes()
    );
    report["expert_weight_bytes"] = layer.expert_bytes().into();
    report["hidden_size"] = config.hidden_size.into();

    let mut rows = Vec::new();
    for &tokens in &args.tokens {
        let row = measure(&layer, &config, tokens, &args)?;
        eprintln!(
            "T={tokens:5}: {:10.1} tokens/s  {:7.1} GFLOP/s  {:6.1} GB/s of weights  route {:.3} ms  layer {:.3} ms",
            row["tokens_per_s"].as_f64().unwrap_or(0.0),
            row["gflops"].as_f64().unwrap_or(0.0),
            row["weight_gb_per_s"].as_f64().unwrap_or(0.0),
            row["route_ms"].as_f64().unwrap_or(0.0),
            row["layer_ms"].as_f64().unwrap_or(0.0),
        );
        rows.push(row);
    }
    report["layer"] = rows.into();
    report["peak_rss_bytes"] = moge_shared::memory::peak_rss_bytes().into();
    write_report(&report, args.json.as_deref())
}

fn write_report(report: &serde_json::Value, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    match path {
        Some(path) => {
            std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn convert(layer: MoeLayer, format: WeightFormat) -> MoeLayer {
    MoeLayer {
        groups: layer
            .groups
            .into_iter()
            .map(|mut group| {
                group.experts = group.experts.into_iter().map(|e| e.into_format(format)).collect();
                group
            })
            .collect(),
        shared_expert: layer.shared_expert.into_format(format),
        ..layer
    }
}

/// Times the routing alone and the whole layer at one batch size.
fn measure(layer: &MoeLayer, config: &ModelConfig, tokens: usize, args: &Args) -> anyhow::Result<serde_json::Value> {
    let h = config.hidden_size;
    let hidden: Vec<f32> = (0..tokens * h)
        .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect();
    let options = RoutingOptions {
        mode: args.routing,
        renormalize: false,
    };
    let kernel = Kernel::detect();
    let output = layer.forward(kernel, &hidden, tokens, options)?;
    let mut touched = std::collections::BTreeSet::new();
    for &expert in &output.routing.expert_ids {
        touched.insert(expert);
    }
    let expert_bytes = layer.groups[0].experts[0].bytes();
    let weight_bytes = touched.len() * expert_bytes + layer.shared_expert.bytes() + layer.router.gate().bytes();
    let flops_per_token = 2.0
        * (config.num_experts_per_tok as f64 * 3.0 * (config.moe_intermediate_size * h) as f64
            + 3.0 * (config.shared_expert_intermediate_size * h) as f64
            + (config.num_experts * h) as f64);

    let route = time(args.seconds / 4.0, || {
        layer.router.route(kernel, &hidden, tokens, options).map(drop)
    })?;
    let whole = time(args.seconds, || {
        layer.forward(kernel, &hidden, tokens, options).map(drop)
    })?;
    let seconds = whole.as_secs_f64();
    if seconds <= 0.0 {
        bail!("timer resolution too coarse");
    }
    Ok(serde_json::json!({
        "tokens": tokens,
        "layer_ms": seconds * 1e3,
        "route_ms": route.as_secs_f64() * 1e3,
        "tokens_per_s": tokens as f64 / seconds,
        "gflops": flops_per_token * tokens as f64 / seconds / 1e9,
        "weight_bytes": weight_bytes,
        "experts_touched": touched.len(),
        "weight_gb_per_s": weight_bytes as f64 / seconds / 1e9,
    }))
}

/// Median time of `run` over repetitions filling at least `seconds`.
fn time<E>(seconds: f64, mut run: impl FnMut() -> Result<(), E>) -> Result<Duration, E> {
    run()?;
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < 3 || started.elapsed().as_secs_f64() < seconds {
        let start = Instant::now();
        run()?;
        samples.push(start.elapsed());
        if samples.len() >= 1000 {
            break;
        }
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// Best f32 GEMM rate of `matrixmultiply` on 2048 x 2048 matrices, GFLOP/s.
fn gemm_ceiling() -> f64 {
    let n = 2048;
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        // SAFETY: a, b and c are n x n row-major buffers that outlive the call.
        #[allow(unsafe_code)]
        unsafe {
            matrixmultiply::sgemm(
                n,
                n,
                n,
                1.0,
                a.as_ptr(),
                n as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Best read bandwidth over a 1 GiB buffer with all threads, GB/s.
fn read_bandwidth() -> f64 {
    let len = (1usize << 30) / 4;
    let data: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|chunk| {
                let mut lanes = [0.0f32; 16];
                for block in chunk.chunks_exact(16) {
                    for (lane, value) in lanes.iter_mut().zip(block) {
                        *lane += value;
                    }
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (len * 4) as f64 / best / 1e9
}
