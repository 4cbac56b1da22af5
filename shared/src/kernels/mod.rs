//! Batch-invariant matrix products for the router and the experts.
//!
//! Every product here has the form `out[t][o] = sum_k W[o][k] * x[t][k]`,
//! with `W` a row-major `[rows, cols]` weight matrix (bf16, f16 or f32) and
//! `x` a row-major `[tokens, cols]` f32 activation block.
//!
//! # Batch invariance
//!
//! Each output element is computed by one fixed sequence of f32 operations
//! that depends only on `W[o]` and `x[t]`, never on the other tokens in the
//! batch, their number or their order ([`dot_portable`] is that sequence):
//!
//! 1. Eight lanes: lane `l` accumulates `W[o][k] * x[t][k]` for
//!    `k = l, l + 8, l + 16, ...` in increasing `k`, each step one fused
//!    multiply-add.
//! 2. The lanes are summed as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
//! 3. The `cols % 8` tail elements are fused-multiply-added in order.
//!
//! Tiling over rows and tokens and the split among threads change only which
//! elements are computed together, never the sequence for one element, and
//! widening bf16 or f16 weights to f32 is exact. So a token's output row is
//! bitwise the same in any batch.
//!
//! General GEMM crates pick blocking and code paths by matrix shape, which
//! changes the summation order with the batch size. That is why the experts
//! use these kernels instead.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::weights::{WeightData, WeightMatrix};

pub use portable::dot_portable;

/// Rows of `W` one task computes for batches; tasks are what threads share.
const BLOCK_ROWS: usize = 16;

/// Rows per task below [`FEW_TOKENS`] tokens, where a task streams weights at
/// memory bandwidth and larger tasks amortize the scheduling cost.
const BLOCK_ROWS_FEW_TOKENS: usize = 64;

/// Token count below which tasks take [`BLOCK_ROWS_FEW_TOKENS`] rows.
const FEW_TOKENS: usize = 4;

/// Multiply-adds below which a call runs on the calling thread alone.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Element types a weight matrix may hold.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// Widens one element to f32; exact for every supported type.
    fn widen(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Element for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Instruction set used by the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust; the definition of the result.
    Portable,
    /// x86-64 AVX2 with FMA and F16C; bitwise equal to [`Kernel::Portable`].
    Avx2,
}

impl Kernel {
    /// Detects the fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

impl Kernel {
    /// Names the instruction set the kernel runs on this CPU: `avx512vl`
    /// (the AVX2 kernel with 32 vector registers), `avx2` or `portable`.
    pub fn instruction_set(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if x86::avx512_supported() => "avx512vl",
            Kernel::Avx2 => "avx2",
        }
    }
}

/// One product `out_t[o][t] = sum_k W[o][k] * x[t][k]`, written transposed
/// (`[rows, tokens]`) so that each block of rows is a contiguous slice.
pub struct MatmulJob<'a> {
    /// Activations, `[tokens, weight.cols()]` row-major.
    pub x: &'a [f32],
    /// Number of token rows in `x`.
    pub tokens: usize,
    /// Weight matrix `[rows, cols]`.
    pub weight: &'a WeightMatrix,
    /// Output, `[weight.rows(), tokens]` row-major.
    pub out_t: &'a mut [f32],
}

struct Task<'a> {
    x: &'a [f32],
    tokens: usize,
    weight: &'a WeightMatrix,
    rows: Range<usize>,
    out: &'a mut [f32],
}

/// Runs every job, sharing the row blocks of all of them among the threads
/// of the current rayon pool.
///
/// # Panics
///
/// Panics if a job's `x` or `out_t` length does not match its shape; callers
/// size both from the same token count.
pub fn matmul_transposed(kernel: Kernel, jobs: &mut [MatmulJob<'_>]) {
    let mut tasks = Vec::new();
    let mut work = 0usize;
    for job in jobs.iter_mut() {
        let (rows, cols) = (job.weight.rows(), job.weight.cols());
        assert_eq!(job.x.len(), job.tokens * cols, "x must be [tokens, cols]");
        assert_eq!(job.out_t.len(), rows * job.tokens, "out_t must be [rows, tokens]");
        if job.tokens == 0 {
            continue;
        }
        work += rows * cols * job.tokens;
        let block_rows = if job.tokens < FEW_TOKENS {
            BLOCK_ROWS_FEW_TOKENS
        } else {
            BLOCK_ROWS
        };
        for (block, out) in job.out_t.chunks_mut(block_rows * job.tokens).enumerate() {
            let start = block * block_rows;
            tasks.push(Task {
                x: job.x,
                tokens: job.tokens,
                weight: job.weight,
                rows: start..start + out.len() / job.tokens,
                out,
            });
        }
    }
    if work < PARALLEL_MIN_WORK {
        tasks.into_iter().for_each(|task| run_task(kernel, task));
    } else {
        tasks.into_par_iter().for_each(|task| run_task(kernel, task));
    }
}

/// Computes `out[t][o] = sum_k W[o][k] * x[t][k]` as a `[tokens, rows]` vector.
pub fn matmul(kernel: Kernel, x: &[f32], tokens: usize, weight: &WeightMatrix) -> Vec<f32> {
    let rows = weight.rows();
    let mut out_t = vec![0.0; rows * tokens];
    matmul_transposed(
        kernel,
        &mut [MatmulJob {
            x,
            tokens,
            weight,
            out_t: &mut out_t,
        }],
    );
    let mut out = vec![0.0; tokens * rows];
    for (row, values) in out_t.chunks_exact(tokens.max(1)).enumerate().take(rows) {
        for (token, &value) in values.iter().enumerate() {
            out[token * rows + row] = value;
        }
    }
    out
}

fn run_task(kernel: Kernel, task: Task<'_>) {
    match task.weight.data() {
        WeightData::F32(buffer) => run_block(kernel, buffer.as_slice(), task),
        WeightData::BF16(buffer) => run_block(kernel, buffer.as_slice(), task),
        WeightData::F16(buffer) => run_block(kernel, buffer.as_slice(), task),
    }
}

fn run_block<E: Element>(kernel: Kernel, weights: &[E], task: Task<'_>) {
    let cols = task.weight.cols();
    let block = &weights[task.rows.start * cols..task.rows.end * cols];
    match kernel {
        Kernel::Portable => portable::block(block, cols, task.x, task.tokens, task.out),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => x86::block(block, cols, task.x, task.tokens, task.out),
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx2 => portable::block(block, cols, task.x, task.tokens, task.out),
    }
}
