//! Measures the kernels' single-token rate on one large bf16 matrix, to
//! separate kernel bandwidth from layer scheduling.
use std::time::Instant;

use half::bf16;
use moge_shared::kernels::{Kernel, matmul};
use moge_shared::weights::WeightMatrix;

fn main() {
    let (rows, cols) = (4096, 5120);
    let values: Vec<bf16> = (0..rows * cols)
        .map(|i| bf16::from_f32((i % 13) as f32 * 0.01))
        .collect();
    let w = WeightMatrix::from_bf16(rows, cols, values).unwrap();
    for tokens in [64usize, 128, 256] {
        let x = vec![0.5f32; cols * tokens];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = Instant::now();
            std::hint::black_box(matmul(Kernel::detect(), &x, tokens, &w));
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!("tokens {tokens}: {:.1} GB/s", w.bytes() as f64 / best / 1e9);
    }
}
