//! Criterion benchmarks of routing and the whole layer.
//!
//! `cargo bench -p moge-shared --bench layer` runs the `small` preset at
//! T = 1, 8, 64, 256 and 1024. Set `MOGE_BENCH_PANGU=1` to add one layer of
//! the full Pangu Pro MoE shape (2.8 GB of bf16 weights generated in memory,
//! several minutes on 2 cores). `moge-bench` reports the same layer as
//! ratios of the machine's ceilings; see docs/benchmarks.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moge_shared::checkpoint::{Preset, generate_layer};
use moge_shared::kernels::Kernel;
use moge_shared::{RoutingMode, RoutingOptions};

const TOKENS: [usize; 5] = [1, 8, 64, 256, 1024];

fn hidden_states(tokens: usize, hidden: usize) -> Vec<f32> {
    (0..tokens * hidden)
        .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect()
}

fn bench_preset(c: &mut Criterion, preset: Preset) {
    let config = preset.config();
    let layer = generate_layer(&config, 0, 0, 0.0);
    let kernel = Kernel::detect();
    let mut routing = c.benchmark_group(format!("route/{}", preset.name()));
    for mode in RoutingMode::ALL {
        for tokens in TOKENS {
            let hidden = hidden_states(tokens, config.hidden_size);
            let options = RoutingOptions {
                mode,
                renormalize: false,
            };
            routing.throughput(Throughput::Elements(tokens as u64));
            routing.bench_with_input(BenchmarkId::new(mode.as_str(), tokens), &hidden, |b, hidden| {
                b.iter(|| layer.router.route(kernel, black_box(hidden), tokens, options).unwrap())
            });
        }
    }
    routing.finish();

    let mut whole = c.benchmark_group(format!("layer/{}", preset.name()));
    if preset == Preset::PanguProMoe {
        whole.sample_size(10).measurement_time(Duration::from_secs(20));
    }
    for tokens in TOKENS {
        let hidden = hidden_states(tokens, config.hidden_size);
        whole.throughput(Throughput::Elements(tokens as u64));
        whole.bench_with_input(BenchmarkId::new("moge", tokens), &hidden, |b, hidden| {
            b.iter(|| {
                layer
                    .forward(kernel, black_box(hidden), tokens, RoutingOptions::default())
                    .unwrap()
            })
        });
    }
    whole.finish();
}

fn benches(c: &mut Criterion) {
    bench_preset(c, Preset::Small);
    if std::env::var_os("MOGE_BENCH_PANGU").is_some() {
        bench_preset(c, Preset::PanguProMoe);
    }
}

criterion_group!(layer, benches);
criterion_main!(layer);
