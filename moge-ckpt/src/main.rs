//! `moge-ckpt`: generate, inspect and run MoGE checkpoints.

mod inspect;
mod run;

use std::ops::Range;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moge_shared::checkpoint::{self, GenerateOptions, Preset};

#[derive(Parser)]
#[command(
    version,
    about = "Generate, inspect and run MoGE checkpoints in the Hugging Face layout"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic synthetic checkpoint (config.json, safetensors shards, index).
    Generate(GenerateArgs),
    /// Print a checkpoint's configuration, layers, groups, tensors and bytes.
    Inspect {
        /// Checkpoint directory.
        dir: PathBuf,
        /// List every tensor, not only the totals per layer.
        #[arg(long)]
        tensors: bool,
    },
    /// Run one layer in process on hidden states read from a safetensors file.
    Run(run::RunArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model shape: `pangu-pro-moe` (the full Pangu Pro MoE layer) or `small`.
    #[arg(long, value_parser = parse_preset)]
    preset: Preset,
    /// Output directory; created if missing, existing files are overwritten.
    #[arg(long)]
    out: PathBuf,
    /// Layers to write as `A..B` (end exclusive) or a single `A`. Default: 0..1
    /// for pangu-pro-moe, every layer for small.
    #[arg(long, value_parser = parse_layers)]
    layers: Option<Range<usize>>,
    /// Seed of the weight generator; equal seeds give identical tensors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Router skew X >= 0: favoured experts' gate rows are scaled by 1 + X.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    router_skew: f32,
    /// Explicit group count M (written as `n_group`), at least 1 and a
    /// divisor of the expert count; default K, as Pangu Pro MoE.
    #[arg(long, value_parser = moge_shared::settings::at_least(1_usize))]
    groups: Option<usize>,
    /// Write a single model.safetensors instead of one shard per layer.
    #[arg(long)]
    single_file: bool,
}

fn parse_preset(name: &str) -> Result<Preset, String> {
    Preset::from_name(name)
        .ok_or_else(|| format!("unknown preset {name:?}, expected one of: {}", Preset::NAMES.join(", ")))
}

fn parse_layers(text: &str) -> Result<Range<usize>, String> {
    let parse = |part: &str| {
        part.trim()
            .parse::<usize>()
            .map_err(|_| format!("invalid layer range {text:?}, expected A..B or A"))
    };
    match text.split_once("..") {
        Some((start, end)) => {
            let range = parse(start)?..parse(end)?;
            if range.is_empty() {
                return Err(format!("layer range {text:?} is empty, expected A..B with A < B"));
            }
            Ok(range)
        }
        None => {
            let layer = parse(text)?;
            Ok(layer..layer + 1)
        }
    }
}

fn main() -> std::process::ExitCode {
    moge_telemetry::exit::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    moge_telemetry::init_logging();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Inspect { dir, tensors } => inspect::inspect(&dir, tensors),
        Command::Run(args) => run::run(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.router_skew.is_finite() && args.router_skew >= 0.0) {
        bail!("--router-skew is {}, expected a finite value >= 0", args.router_skew);
    }
    let options = GenerateOptions {
        preset: args.preset,
        layers: args.layers,
        seed: args.seed,
        router_skew: args.router_skew,
        num_groups: args.groups,
        single_file: args.single_file,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors, {elapsed}")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(format!("generating {}", args.preset.name()));
    let started = std::time::Instant::now();
    let summary = checkpoint::generate(&args.out, &options, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("failed to generate a checkpoint in {}", args.out.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        out = %args.out.display(),
        preset = args.preset.name(),
        seed = args.seed,
        router_skew = args.router_skew,
        tensors = summary.tensors,
        bytes = summary.bytes,
        shards = summary.files.iter().filter(|path| path.extension().is_some_and(|ext| ext == "safetensors")).count(),
        seconds = started.elapsed().as_secs_f64(),
        "checkpoint written"
    );
    Ok(())
}
