//! The plain-Rust kernel. [`dot_portable`] defines the exact sequence of f32
//! operations for one output element; the SIMD kernels reproduce it bitwise.

use super::Element;

/// Dot product of a weight row and an activation row in the kernels' fixed
/// order: eight strided lanes of fused multiply-adds, a fixed pairwise lane
/// sum, then the tail in order.
pub fn dot_portable<E: Element>(w: &[E], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let body = w.len() / 8 * 8;
    let mut lanes = [0.0f32; 8];
    for (w8, x8) in w[..body].chunks_exact(8).zip(x[..body].chunks_exact(8)) {
        for lane in 0..8 {
            lanes[lane] = w8[lane].widen().mul_add(x8[lane], lanes[lane]);
        }
    }
    let mut sum = sum_lanes(lanes);
    for (w, &x) in w[body..].iter().zip(&x[body..]) {
        sum = w.widen().mul_add(x, sum);
    }
    sum
}

/// Sums eight lanes as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`,
/// the order of the AVX2 horizontal sum.
#[inline(always)]
pub(super) fn sum_lanes(lanes: [f32; 8]) -> f32 {
    let s = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// Computes `out[r][t] = dot(w[r], x[t])` for a block of weight rows.
pub(super) fn block<E: Element>(w: &[E], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    for (w_row, out_row) in w.chunks_exact(cols).zip(out.chunks_exact_mut(tokens)) {
        for (x_row, value) in x.chunks_exact(cols).zip(out_row.iter_mut()) {
            *value = dot_portable(w_row, x_row);
        }
    }
}
