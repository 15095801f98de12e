//! Q5_0, Q5_1 and the K-quants: every implementation against the scalar reference on
//! random blocks, and the quantised dots against the f32 dot of the dequantised weights with
//! the *unquantised* activations, within a bound derived from the activation quantisation
//! step.

use half::f16;
use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::arch::portable::{SCALAR, kquants};
use crate::dispatch::available;
use crate::formats::{
    BlockQ2K, BlockQ4K, BlockQ5_1, BlockQ5K, BlockQ8_0, BlockQ8_1, BlockQ8K, QK, QK_K,
};
use crate::table::{DotFn, Kernels, QuantizeFn};
use crate::types::WeightType;

const TYPES: [WeightType; 7] = [
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q2_K,
    WeightType::Q3_K,
    WeightType::Q4_K,
    WeightType::Q5_K,
    WeightType::Q6_K,
];

fn config() -> Config {
    super::config(32, 0x5eed_4b51)
}

/// Activation-like data; sometimes an all-zero super-block.
fn rand_acts(rng: &mut StdRng, n: usize) -> Vec<f32> {
    super::rand_acts(rng, n, QK_K)
}

fn f16_bytes(rng: &mut StdRng, lo: f32, hi: f32) -> [u8; 2] {
    super::f16_bytes(rng, lo, hi)
}

/// A random weight row of `n` elements of `ty`: random quant and sub-scale bytes (every bit
/// pattern is a valid block), finite f16 super-block scales of weight-like size.
fn rand_row(rng: &mut StdRng, ty: WeightType, n: usize) -> Vec<u8> {
    let nb = n / ty.block_len();
    let mut row: Vec<u8> = (0..nb * ty.block_bytes())
        .map(|_| rng.r#gen::<u8>())
        .collect();
    for b in row.chunks_exact_mut(ty.block_bytes()) {
        let fields: &[(usize, f32, f32)] = match ty {
            WeightType::Q5_0 => &[(0, -0.1, 0.1)],
            WeightType::Q5_1 => &[(0, 0.0, 0.05), (2, -0.8, 0.8)],
            WeightType::Q2_K => &[(80, 0.0, 0.02), (82, 0.0, 0.02)],
            WeightType::Q3_K => &[(108, -0.01, 0.01)],
            WeightType::Q4_K | WeightType::Q5_K => &[(0, 0.0, 0.005), (2, 0.0, 0.005)],
            WeightType::Q6_K => &[(208, -0.002, 0.002)],
            _ => &[],
        };
        for &(at, lo, hi) in fields {
            b[at..at + 2].copy_from_slice(&f16_bytes(rng, lo, hi));
        }
    }
    row
}

/// Dequantised weights (the public entry point, scalar for these formats).
fn dequant(ty: WeightType, row: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    crate::dequantize_row(ty, row, &mut out).unwrap();
    out
}

/// Per element, the magnitude of the minimum subtracted from `scale·q` (0 for the symmetric
/// formats): the dots compute the scaled part and the minimum part separately, so f32
/// rounding scales with both, not with their difference.
fn min_terms(ty: WeightType, row: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let bb = ty.block_bytes();
    for (b, o) in row
        .chunks_exact(bb)
        .zip(out.chunks_exact_mut(ty.block_len()))
    {
        match ty {
            WeightType::Q5_1 => {
                let b = BlockQ5_1::from_bytes(b.try_into().unwrap());
                o.fill(b.m.to_f32().abs());
            }
            WeightType::Q2_K => {
                let b = BlockQ2K::from_bytes(b.try_into().unwrap());
                for (s, o) in o.chunks_exact_mut(16).enumerate() {
                    o.fill((b.dmin.to_f32() * f32::from(b.scales[s] >> 4)).abs());
                }
            }
            WeightType::Q4_K | WeightType::Q5_K => {
                let sm = if ty == WeightType::Q4_K {
                    let b = BlockQ4K::from_bytes(b.try_into().unwrap());
                    (b.dmin, b.unpacked_scales())
                } else {
                    let b = BlockQ5K::from_bytes(b.try_into().unwrap());
                    (b.dmin, b.unpacked_scales())
                };
                for (s, o) in o.chunks_exact_mut(32).enumerate() {
                    o.fill((sm.0.to_f32() * f32::from(sm.1[s].1)).abs());
                }
            }
            _ => {}
        }
    }
    out
}

/// Quantises `x` with `quantize` into blocks of `B` (`BYTES` each, 32 elements) and
/// dequantises them with `values`.
fn quantize_q8<B, const BYTES: usize>(
    quantize: QuantizeFn,
    parse: fn(&[u8; BYTES]) -> B,
    values: fn(&B) -> [f32; QK],
    x: &[f32],
) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; x.len() / QK * BYTES];
    quantize(x, &mut q);
    let mut deq = vec![0f32; x.len()];
    for (b, o) in q
        .as_chunks::<BYTES>()
        .0
        .iter()
        .zip(deq.chunks_exact_mut(QK))
    {
        o.copy_from_slice(&values(&parse(b)));
    }
    (q, deq)
}

/// Activations in `ty`'s vec_dot format, quantised by `k`; and their dequantised values.
fn quantize_acts(k: &Kernels, ty: WeightType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    match ty {
        WeightType::Q5_0 => quantize_q8(
            k.quantize_q8_0,
            BlockQ8_0::from_bytes,
            |b| b.qs.map(|v| f32::from(v) * b.d.to_f32()),
            x,
        ),
        WeightType::Q5_1 => quantize_q8(
            k.quantize_q8_1,
            BlockQ8_1::from_bytes,
            |b| b.qs.map(|v| f32::from(v) * b.d.to_f32()),
            x,
        ),
        _ => {
            let mut q = vec![0u8; x.len() / QK_K * BlockQ8K::BYTES];
            (k.quantize_q8_k)(x, &mut q);
            let mut deq = vec![0f32; x.len()];
            kquants::dequantize_q8_k(&q, &mut deq);
            (q, deq)
        }
    }
}

fn dot_of(k: &Kernels, ty: WeightType) -> DotFn {
    match ty {
        WeightType::Q5_0 => k.dot_q5_0_q8_0,
        WeightType::Q5_1 => k.dot_q5_1_q8_1,
        _ => k.dot_q8_k(ty).unwrap(),
    }
}

/// Row length: `blocks` super-blocks of 256 (any multiple of 32 would do for Q5_0/Q5_1).
fn row_len(blocks: usize) -> usize {
    blocks * QK_K
}

proptest! {
    #![proptest_config(config())]

    /// Q8_K activation quantisation is one function (ggml's x86 build uses the reference),
    /// so every table must produce the same bytes; and the bsums must match the quants.
    #[test]
    fn q8_k_quantisation_is_consistent(blocks in 1usize..6, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = rand_acts(&mut rng, row_len(blocks));
        let (want, _) = quantize_acts(&SCALAR, WeightType::Q4_K, &x);
        for k in available() {
            let (got, _) = quantize_acts(k, WeightType::Q4_K, &x);
            prop_assert_eq!(&got, &want, "{}", k.name);
        }
        for b in want.as_chunks::<{ BlockQ8K::BYTES }>().0 {
            let b = BlockQ8K::from_bytes(b);
            for (g, s) in b.bsums.iter().enumerate() {
                let sum: i16 = b.qs[16 * g..16 * g + 16].iter().map(|&q| i16::from(q)).sum();
                prop_assert_eq!(*s, sum);
            }
            prop_assert!(b.qs.iter().all(|&q| q >= -127));
        }
    }

    /// Halfway products (`iscale = 1`, values `n + 0.5`) round half to even in every table,
    /// and a block with a NaN or an infinity, or of values too small for a finite inverse
    /// scale, gives every table the same bytes.
    #[test]
    fn q8_k_quantisation_ties_and_non_finite(seed: u64, bad in 0usize..3) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x: Vec<f32> = (0..2 * QK_K)
            .map(|_| rng.gen_range(-126i32..126) as f32 + 0.5)
            .collect();
        x[rng.gen_range(0..QK_K)] = -127.0;
        x[QK_K + rng.gen_range(0..QK_K)] = [f32::NAN, f32::INFINITY, -127.0][bad];
        x[QK_K + 7] = -127.0;
        // A block so small that -127 / max overflows to infinity.
        x.extend((0..QK_K).map(|i| if i % 3 == 0 { 1e-38f32 } else { -2e-39 }));
        let (want, _) = quantize_acts(&SCALAR, WeightType::Q4_K, &x);
        for k in available() {
            let (got, _) = quantize_acts(k, WeightType::Q4_K, &x);
            prop_assert_eq!(&got, &want, "{}", k.name);
        }
    }

    /// SIMD dots against the scalar reference. The integer super-block sums are exact in
    /// both; they differ only in the order of the f32 accumulation (8 lanes, separate
    /// minimum accumulators, a horizontal sum) and in converting partial vs whole integer
    /// sums to f32, so they agree within a few f32 ulps of Σ(|w|+2|min|)·|x| per block.
    #[test]
    fn dots_match_scalar(blocks in 1usize..9, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = row_len(blocks);
        for ty in TYPES {
            let row = rand_row(&mut rng, ty, n);
            let x = rand_acts(&mut rng, n);
            let (xq, xd) = quantize_acts(&SCALAR, ty, &x);
            let w = dequant(ty, &row, n);
            let m = min_terms(ty, &row, n);
            let abs: f32 = w.iter().zip(&m).zip(&xd).map(|((w, m), x)| (w.abs() + 2.0 * m) * x.abs()).sum();
            let nb = n / ty.block_len();
            let tol = 8.0 * (nb as f32 + 16.0) * f32::EPSILON * abs + f32::MIN_POSITIVE;
            let want = dot_of(&SCALAR, ty)(&row, &xq);
            for k in available() {
                let got = dot_of(k, ty)(&row, &xq);
                prop_assert!((got - want).abs() <= tol,
                    "{} {:?}: {} vs {} (tol {})", k.name, ty, got, want, tol);
            }
        }
    }

    /// The quantised path against the exact f64 dot of the dequantised weights with the
    /// unquantised activations.
    ///
    /// Q8_K (K-quants): `d = -max/127` in f32 and `q = round(x/d)`, so each activation is
    /// off by at most |d|/2 (plus 127·|d|·2⁻²³ for rounding `d`); the error of a super-block
    /// is at most 0.5001·|d|·Σ|w|. Q8_0/Q8_1 (Q5_0/Q5_1): as the 32-block formats'
    /// test: 0.5625·d per activation (the f16 scale adds 127·d·2⁻¹¹), times Σ|w − m|, plus
    /// for Q5_1 the minimum term |m|·(16·d + Σ|x|·2⁻¹⁰) from `s = f16(d·Σq)`. On top,
    /// 2e-5·Σ(|w|+2|min|)·|x| covers f32 rounding of the scales and the accumulation.
    #[test]
    fn dots_within_bound_of_f32_reference(blocks in 1usize..5, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = row_len(blocks);
        for ty in TYPES {
            let row = rand_row(&mut rng, ty, n);
            let x = rand_acts(&mut rng, n);
            let w = dequant(ty, &row, n);
            let m = min_terms(ty, &row, n);
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let mut bound = 1e-6 + 2e-5 * w.iter().zip(&m).zip(&x)
                .map(|((w, m), x)| (w.abs() + 2.0 * m) * x.abs()).sum::<f32>();
            let bl = if ty.block_len() == QK_K { QK_K } else { QK };
            for ((xs, ws), ms) in x.chunks(bl).zip(w.chunks(bl)).zip(m.chunks(bl)) {
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                if ty.block_len() == QK_K {
                    bound += 0.5001 * d * ws.iter().map(|v| v.abs()).sum::<f32>();
                } else {
                    let mm = if ty == WeightType::Q5_1 { ms[0] } else { 0.0 };
                    let sum_n: f32 = ws.iter().map(|v| v.abs() + mm).sum();
                    let sum_x: f32 = xs.iter().map(|v| v.abs()).sum();
                    bound += 0.5625 * d * sum_n + mm * (16.0 * d + sum_x * 2f32.powi(-10));
                }
            }
            for k in available() {
                let (xq, _) = quantize_acts(k, ty, &x);
                let got = dot_of(k, ty)(&row, &xq);
                prop_assert!((f64::from(got) - exact).abs() <= f64::from(bound),
                    "{} {:?}: {} vs {} (bound {})", k.name, ty, got, exact, bound);
            }
        }
    }
}

/// The kernels take the largest whole prefix both slices hold and never read past it:
/// trailing partial blocks are ignored, and a short activation row limits the block count.
#[test]
fn dots_ignore_partial_blocks() {
    let mut rng = StdRng::seed_from_u64(11);
    for ty in TYPES {
        let n = 2 * QK_K;
        let row = rand_row(&mut rng, ty, n);
        let x = rand_acts(&mut rng, n);
        for k in available() {
            let (xq, _) = quantize_acts(k, ty, &x);
            let full = dot_of(k, ty)(&row, &xq);
            let mut padded = row.clone();
            padded.extend([0xFFu8; 7]);
            assert_eq!(
                dot_of(k, ty)(&padded, &xq).to_bits(),
                full.to_bits(),
                "{} {ty:?}",
                k.name
            );
            let half_row = &row[..row.len() / 2];
            let half_x = &xq[..xq.len() / 2];
            assert_eq!(
                dot_of(k, ty)(half_row, &xq).to_bits(),
                dot_of(k, ty)(half_row, half_x).to_bits(),
                "{} {ty:?}",
                k.name
            );
            assert_eq!(dot_of(k, ty)(&[], &xq), 0.0);
        }
    }
}

/// Extreme blocks: every quant at its largest level with the largest sub-scales, against
/// activations at ±127. Checks the i16 intermediate sums of the SIMD paths cannot saturate
/// (`maddubs` of 63·127 pairs, Q8_K `bsums` of 16·127) by comparing with the scalar i32 sums.
#[test]
fn dots_survive_extreme_blocks() {
    for ty in TYPES {
        let n = QK_K;
        let mut row = vec![0xFFu8; n / ty.block_len() * ty.block_bytes()];
        for b in row.chunks_exact_mut(ty.block_bytes()) {
            let at: &[usize] = match ty {
                WeightType::Q5_0 => &[0],
                WeightType::Q5_1 => &[0, 2],
                WeightType::Q2_K => &[80, 82],
                WeightType::Q3_K => &[108],
                WeightType::Q4_K | WeightType::Q5_K => &[0, 2],
                _ => &[208],
            };
            for &a in at {
                b[a..a + 2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
            }
            if ty == WeightType::Q6_K {
                // Scales of -128 and 127 alternate.
                for (s, v) in b[192..208].iter_mut().enumerate() {
                    *v = if s % 2 == 0 { 0x80 } else { 0x7F };
                }
            }
        }
        for sign in [1.0f32, -1.0] {
            let x: Vec<f32> = (0..n)
                .map(|i| if i % 3 == 0 { -sign } else { sign })
                .collect();
            let (xq, _) = quantize_acts(&SCALAR, ty, &x);
            let want = dot_of(&SCALAR, ty)(&row, &xq);
            for k in available() {
                let got = dot_of(k, ty)(&row, &xq);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{} {ty:?} sign {sign}: {got} vs {want}",
                    k.name
                );
            }
        }
    }
}
