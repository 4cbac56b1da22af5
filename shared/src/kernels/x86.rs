//! AVX2 + FMA + F16C kernel, bitwise equal to the portable one.
//!
//! A tile computes `R` weight rows against `C` tokens at once, holding
//! `R * C` eight-lane accumulators in registers. The tile is `4 x 3` with
//! AVX2's 16 registers and `4 x 6` where AVX-512VL gives 32. A single token
//! uses `8 x 1`, where eight independent FMA chains hide the FMA latency, so
//! the loop streams the weights at memory bandwidth.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::Element;
use super::portable;

/// Element types with an eight-wide widening load.
trait Load8: Element {
    /// Loads eight consecutive elements widened to f32.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reading eight elements, and the CPU must
    /// support AVX2, FMA and F16C.
    unsafe fn load8(ptr: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(ptr: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable elements.
        unsafe { _mm256_loadu_ps(ptr) }
    }
}

impl Load8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(ptr: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees eight readable elements (16 bytes).
        let raw = unsafe { _mm_loadu_si128(ptr.cast()) };
        // bf16 is the upper half of an f32: zero-extend and shift, exactly.
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }
}

impl Load8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(ptr: *const f16) -> __m256 {
        // SAFETY: the caller guarantees eight readable elements (16 bytes).
        let raw = unsafe { _mm_loadu_si128(ptr.cast()) };
        _mm256_cvtph_ps(raw)
    }
}

fn supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Computes `out[r][t] = dot(w[r], x[t])` for a block of weight rows.
pub(super) fn block<E: Element>(w: &[E], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    let rows = w.len() / cols;
    assert_eq!(rows * cols, w.len());
    assert_eq!(x.len(), tokens * cols);
    assert_eq!(out.len(), rows * tokens);
    if !supported() {
        portable::block(w, cols, x, tokens, out);
        return;
    }
    // Dispatch on the concrete element type; `Load8` is private to this module.
    // bf16 and f16 are widened in registers at every load. Widening a block
    // into an f32 scratch buffer once, for reuse by every token tile,
    // measured slower at every batch size from 4 to 256 tokens on Zen 4.
    // The extra store and reload cost more than two widening instructions.
    if let Some(w) = cast::<E, f32>(w) {
        run(w, cols, x, tokens, out);
    } else if let Some(w) = cast::<E, bf16>(w) {
        run(w, cols, x, tokens, out);
    } else if let Some(w) = cast::<E, f16>(w) {
        run(w, cols, x, tokens, out);
    } else {
        portable::block(w, cols, x, tokens, out);
    }
}

fn cast<E: Element, T: Element>(w: &[E]) -> Option<&[T]> {
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<T>() {
        Some(bytemuck::cast_slice(w))
    } else {
        None
    }
}

fn run<E: Load8>(w: &[E], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    if avx512_supported() {
        // SAFETY: AVX-512F/VL were detected, and `block` checked the lengths.
        unsafe { avx512::tiles(w, cols, x, tokens, out) }
    } else {
        // SAFETY: `block` checked the CPU features and the three slice lengths.
        unsafe { avx2::tiles(w, cols, x, tokens, out) }
    }
}

pub(super) fn avx512_supported() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
}

#[derive(Clone, Copy)]
struct Shape {
    cols: usize,
    tokens: usize,
}

/// Defines `tiles` for one set of target features and token tile width.
///
/// Both instances run the same eight-lane sequence per output element. With
/// AVX-512VL the compiler has 32 vector registers instead of 16, so a tile
/// can hold 4 x 6 accumulators (10 loads per 24 FMAs instead of 7 per 12).
macro_rules! tile_kernel {
    ($module:ident, $features:literal, $width:literal) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::{Load8, Shape};

            /// # Safety
            ///
            /// The CPU must support the module's features; `w` is
            /// `[rows, cols]`, `x` is `[tokens, cols]` and `out` is
            /// `[rows, tokens]`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn tiles<E: Load8>(w: &[E], cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
                let rows = w.len() / cols;
                let shape = Shape { cols, tokens };
                let mut t = 0;
                while t < tokens {
                    let width = (tokens - t).min($width);
                    // SAFETY: t + width <= tokens and every row is in bounds.
                    unsafe {
                        match width {
                            6 => row_tiles::<E, 4, 6>(w, x, out, shape, rows, t),
                            5 => row_tiles::<E, 4, 5>(w, x, out, shape, rows, t),
                            4 => row_tiles::<E, 4, 4>(w, x, out, shape, rows, t),
                            3 => row_tiles::<E, 4, 3>(w, x, out, shape, rows, t),
                            2 => row_tiles::<E, 4, 2>(w, x, out, shape, rows, t),
                            _ if tokens == 1 => row_tiles::<E, 8, 1>(w, x, out, shape, rows, t),
                            _ => row_tiles::<E, 4, 1>(w, x, out, shape, rows, t),
                        }
                    }
                    t += width;
                }
            }

            /// # Safety
            ///
            /// As [`tiles`], and `t0 + C <= tokens`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn row_tiles<E: Load8, const R: usize, const C: usize>(
                w: &[E],
                x: &[f32],
                out: &mut [f32],
                shape: Shape,
                rows: usize,
                t0: usize,
            ) {
                let mut r = 0;
                while r + R <= rows {
                    // SAFETY: rows r..r + R and tokens t0..t0 + C are in bounds.
                    unsafe { tile::<E, R, C>(w, x, out, shape, r, t0) };
                    r += R;
                }
                while r < rows {
                    // SAFETY: row r and tokens t0..t0 + C are in bounds.
                    unsafe { tile::<E, 1, C>(w, x, out, shape, r, t0) };
                    r += 1;
                }
            }

            /// Computes the `R x C` outputs for rows `r0..r0 + R` and tokens
            /// `t0..t0 + C`.
            ///
            /// # Safety
            ///
            /// As [`tiles`], with `r0 + R <= rows` and `t0 + C <= tokens`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<E: Load8, const R: usize, const C: usize>(
                w: &[E],
                x: &[f32],
                out: &mut [f32],
                shape: Shape,
                r0: usize,
                t0: usize,
            ) {
                let cols = shape.cols;
                let body = cols / 8 * 8;
                let w_ptr = w[r0 * cols..(r0 + R) * cols].as_ptr();
                let x_ptr = x[t0 * cols..(t0 + C) * cols].as_ptr();
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                let mut k = 0;
                while k < body {
                    let mut xs = [_mm256_setzero_ps(); C];
                    for (c, xv) in xs.iter_mut().enumerate() {
                        // SAFETY: token t0 + c has `cols` elements and k + 8 <= cols.
                        *xv = unsafe { _mm256_loadu_ps(x_ptr.add(c * cols + k)) };
                    }
                    for (r, acc_row) in acc.iter_mut().enumerate() {
                        // SAFETY: row r0 + r has `cols` elements and k + 8 <= cols.
                        let wv = unsafe { E::load8(w_ptr.add(r * cols + k)) };
                        for (a, xv) in acc_row.iter_mut().zip(xs.iter()) {
                            *a = _mm256_fmadd_ps(wv, *xv, *a);
                        }
                    }
                    k += 8;
                }
                for (r, acc_row) in acc.iter().enumerate() {
                    let w_row = &w[(r0 + r) * cols..(r0 + r + 1) * cols];
                    for (c, a) in acc_row.iter().enumerate() {
                        let x_row = &x[(t0 + c) * cols..(t0 + c + 1) * cols];
                        let mut sum = sum_lanes(*a);
                        for k in body..cols {
                            sum = w_row[k].widen().mul_add(x_row[k], sum);
                        }
                        out[(r0 + r) * shape.tokens + t0 + c] = sum;
                    }
                }
            }

            /// Horizontal sum in the order of `portable::sum_lanes`.
            #[inline]
            #[target_feature(enable = $features)]
            fn sum_lanes(v: __m256) -> f32 {
                let low = _mm256_castps256_ps128(v);
                let high = _mm256_extractf128_ps::<1>(v);
                // [l0 + l4, l1 + l5, l2 + l6, l3 + l7]
                let pairs = _mm_add_ps(low, high);
                // [(l0 + l4) + (l2 + l6), (l1 + l5) + (l3 + l7), ..]
                let quads = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
                let total = _mm_add_ss(quads, _mm_shuffle_ps::<0b01>(quads, quads));
                _mm_cvtss_f32(total)
            }
        }
    };
}

tile_kernel!(avx2, "avx2,fma,f16c", 3);
tile_kernel!(avx512, "avx2,fma,f16c,avx512f,avx512vl", 6);

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn assert_same<E: Load8>(w: &[E], cols: usize, x: &[f32], tokens: usize) {
        let rows = w.len() / cols;
        let mut expected = vec![0.0; rows * tokens];
        portable::block(w, cols, x, tokens, &mut expected);
        let expected: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
        let mut out = vec![0.0; rows * tokens];
        block(w, cols, x, tokens, &mut out);
        let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, expected, "dispatched: rows {rows} cols {cols} tokens {tokens}");
        // SAFETY: the features were checked by the caller; lengths match.
        unsafe { avx2::tiles(w, cols, x, tokens, &mut out) };
        let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, expected, "avx2: rows {rows} cols {cols} tokens {tokens}");
        if avx512_supported() {
            // SAFETY: AVX-512F/VL were detected; lengths match.
            unsafe { avx512::tiles(w, cols, x, tokens, &mut out) };
            let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, expected, "avx512: rows {rows} cols {cols} tokens {tokens}");
        }
    }

    #[test]
    fn simd_tiles_match_portable_bitwise() {
        if !supported() {
            return;
        }
        let shapes = [
            (13, 37, 1),
            (16, 64, 5),
            (9, 8, 7),
            (21, 100, 2),
            (4, 3, 3),
            (17, 72, 13),
            (8, 16, 6),
        ];
        for (rows, cols, tokens) in shapes {
            let w = random(rows * cols, 1);
            let x = random(tokens * cols, 2);
            assert_same(&w, cols, &x, tokens);
            let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_same(&w16, cols, &x, tokens);
            let h16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            assert_same(&h16, cols, &x, tokens);
        }
    }
}
