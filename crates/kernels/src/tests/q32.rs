//! The float kernels and the 32-element formats (Q4_0, Q4_1, Q8_0).

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::arch::portable::SCALAR;
use crate::dispatch::available;
use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use crate::table::{Kernels, QuantizeFn, TileFn};
use crate::types::WeightType;

fn config() -> Config {
    super::config(48, 0x5eed_cafe)
}

/// Activation-like data; sometimes an all-zero 32-element block.
fn rand_acts(rng: &mut StdRng, n: usize) -> Vec<f32> {
    super::rand_acts(rng, n, QK)
}

fn rand_f16_bits(rng: &mut StdRng, lo: f32, hi: f32) -> [u8; 2] {
    super::f16_bytes(rng, lo, hi)
}

/// A random weight row of `nb` blocks of `ty` (quantised types only). Q8_0 quants stay in
/// -127..=127, the range ggml's quantiser produces.
fn rand_row(rng: &mut StdRng, ty: WeightType, nb: usize) -> Vec<u8> {
    let mut row = Vec::with_capacity(nb * ty.block_bytes());
    for _ in 0..nb {
        match ty {
            WeightType::Q4_0 => {
                row.extend(rand_f16_bits(rng, -0.1, 0.1));
                row.extend((0..16).map(|_| rng.r#gen::<u8>()));
            }
            WeightType::Q4_1 => {
                row.extend(rand_f16_bits(rng, 0.0, 0.1));
                row.extend(rand_f16_bits(rng, -0.8, 0.8));
                row.extend((0..16).map(|_| rng.r#gen::<u8>()));
            }
            WeightType::Q8_0 => {
                row.extend(rand_f16_bits(rng, -0.01, 0.01));
                row.extend((0..32).map(|_| rng.gen_range(-127i8..=127) as u8));
            }
            _ => unreachable!("float types are not block-quantised"),
        }
    }
    row
}

fn act_format(ty: WeightType) -> (fn(&Kernels) -> QuantizeFn, usize) {
    match ty {
        WeightType::Q4_1 => (|k| k.quantize_q8_1, BlockQ8_1::BYTES),
        _ => (|k| k.quantize_q8_0, BlockQ8_0::BYTES),
    }
}

fn quant_dot(k: &Kernels, ty: WeightType) -> fn(&[u8], &[u8]) -> f32 {
    match ty {
        WeightType::Q4_0 => k.dot_q4_0_q8_0,
        WeightType::Q4_1 => k.dot_q4_1_q8_1,
        WeightType::Q8_0 => k.dot_q8_0_q8_0,
        _ => unreachable!(),
    }
}

fn quant_tile(k: &Kernels, ty: WeightType) -> TileFn {
    match ty {
        WeightType::Q4_0 => k.tile_q4_0_q8_0,
        WeightType::Q4_1 => k.tile_q4_1_q8_1,
        WeightType::Q8_0 => k.tile_q8_0_q8_0,
        _ => unreachable!(),
    }
}

fn quantize_with(k: &Kernels, ty: WeightType, x: &[f32]) -> Vec<u8> {
    let (q, bytes) = act_format(ty);
    let mut out = vec![0u8; x.len() / QK * bytes];
    q(k)(x, &mut out);
    out
}

/// Dequantised weights via the scalar table.
fn dequant(ty: WeightType, row: &[u8]) -> Vec<f32> {
    let n = row.len() / ty.block_bytes() * QK;
    let mut out = vec![0f32; n];
    let f = match ty {
        WeightType::Q4_0 => SCALAR.dequantize_q4_0,
        WeightType::Q4_1 => SCALAR.dequantize_q4_1,
        WeightType::Q8_0 => SCALAR.dequantize_q8_0,
        _ => unreachable!(),
    };
    f(row, &mut out);
    out
}

/// Σ |terms| of the integer-then-scaled quantised dot: the scale for its f32 rounding error.
fn quant_abs_sum(ty: WeightType, row: &[u8], xq: &[u8]) -> f32 {
    let w = dequant(ty, row);
    let x: Vec<f32> = match ty {
        WeightType::Q4_1 => xq
            .as_chunks::<{ BlockQ8_1::BYTES }>()
            .0
            .iter()
            .flat_map(|b| {
                let b = BlockQ8_1::from_bytes(b);
                b.qs.map(|q| f32::from(q) * b.d.to_f32())
            })
            .collect(),
        _ => xq
            .as_chunks::<{ BlockQ8_0::BYTES }>()
            .0
            .iter()
            .flat_map(|b| {
                let b = BlockQ8_0::from_bytes(b);
                b.qs.map(|q| f32::from(q) * b.d.to_f32())
            })
            .collect(),
    };
    w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum()
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

const QTYPES: [WeightType; 3] = [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0];

proptest! {
    #![proptest_config(config())]

    /// Activation quantisation is bit-identical across implementations (same amax, same
    /// `127/amax`, same round-half-even, same f16 rounding of `d` and `s`).
    #[test]
    fn quantize_matches_scalar(nb in 1usize..40, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = rand_acts(&mut rng, nb * QK);
        for ty in [WeightType::Q4_0, WeightType::Q4_1] {
            let want = quantize_with(&SCALAR, ty, &x);
            for k in available() {
                prop_assert_eq!(&quantize_with(k, ty, &x), &want, "{} {:?}", k.name, ty);
            }
        }
    }

    /// Dequantisation is bit-identical (one rounding per element, or one FMA for Q4_1).
    #[test]
    fn dequantize_matches_scalar(nb in 1usize..40, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for ty in QTYPES {
            let row = rand_row(&mut rng, ty, nb);
            let want = dequant(ty, &row);
            for k in available() {
                let mut got = vec![0f32; nb * QK];
                let f = match ty {
                    WeightType::Q4_0 => k.dequantize_q4_0,
                    WeightType::Q4_1 => k.dequantize_q4_1,
                    _ => k.dequantize_q8_0,
                };
                f(&row, &mut got);
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                prop_assert!(same, "{} {:?}", k.name, ty);
            }
        }
    }

    /// Quantised dots: the integer block sums are exact in every implementation; only the
    /// order of the f32 accumulation over blocks differs (8 lanes + a horizontal sum vs a
    /// running scalar sum), so the results agree within a few f32 ulps of Σ|terms|.
    #[test]
    fn quant_dots_match_scalar(nb in 1usize..40, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for ty in QTYPES {
            let row = rand_row(&mut rng, ty, nb);
            let x = rand_acts(&mut rng, nb * QK);
            let xq = quantize_with(&SCALAR, ty, &x);
            let want = quant_dot(&SCALAR, ty)(&row, &xq);
            let tol = 4.0 * (nb as f32 + 8.0) * f32::EPSILON * quant_abs_sum(ty, &row, &xq)
                + f32::MIN_POSITIVE;
            for k in available() {
                let got = quant_dot(k, ty)(&row, &xq);
                prop_assert!(close(got, want, tol), "{} {:?}: {} vs {} (tol {})", k.name, ty, got, want, tol);
            }
        }
    }

    /// Tiles (several rows × several tokens per call, the matmul inner loop): in every
    /// implementation each (row, token) value is bit-identical to that implementation's own
    /// single dot product, whatever the tile shape (edges included), and within the
    /// accumulation-order bound of the scalar reference.
    #[test]
    fn quant_tiles_match_dots(nb in 1usize..20, nr in 1usize..10, nt in 1usize..10, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for ty in QTYPES {
            let rows: Vec<Vec<u8>> = (0..nr).map(|_| rand_row(&mut rng, ty, nb)).collect();
            let xs: Vec<Vec<u8>> = (0..nt)
                .map(|_| quantize_with(&SCALAR, ty, &rand_acts(&mut rng, nb * QK)))
                .collect();
            let w: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
            let x: Vec<&[u8]> = xs.iter().map(Vec::as_slice).collect();
            for k in available() {
                let mut out = vec![f32::NAN; nr * nt];
                quant_tile(k, ty)(&w, &x, &mut out);
                for t in 0..nt {
                    for r in 0..nr {
                        let own = quant_dot(k, ty)(w[r], x[t]);
                        let got = out[t * nr + r];
                        prop_assert_eq!(got.to_bits(), own.to_bits(), "{} {:?} r{} t{}", k.name, ty, r, t);
                        let want = quant_dot(&SCALAR, ty)(w[r], x[t]);
                        let tol = 4.0 * (nb as f32 + 8.0) * f32::EPSILON
                            * quant_abs_sum(ty, w[r], x[t]) + f32::MIN_POSITIVE;
                        prop_assert!(close(got, want, tol), "{} {:?}: {} vs {}", k.name, ty, got, want);
                    }
                }
                // A short output buffer limits the tokens computed to those whose whole row
                // of outputs fits; nothing is written past them.
                if nr > 1 {
                    let mut short = vec![f32::NAN; nr * (nt - 1) + 1];
                    quant_tile(k, ty)(&w, &x, &mut short);
                    prop_assert!(short[..nr * (nt - 1)].iter().all(|v| !v.is_nan()));
                    prop_assert!(short[nr * (nt - 1)].is_nan());
                }
            }
        }
    }

    /// The quantised path against the exact f32 dot of the dequantised weights with the
    /// *unquantised* activations. Per 32-block with scale d = amax/127, each activation is
    /// off by at most d/2 (rounding to an integer step) plus |q|·|d − f16(d)| ≤
    /// 127·d·2⁻¹¹ (the f16 scale), i.e. ≤ 0.5621·d; the error of the block is at most that
    /// times Σ|w|. Q4_1 also uses s = f16(d·Σq) for the Σx of the minimum term: that adds
    /// |m|·(32·0.5·d + |d·Σq|·2⁻¹¹). A further 1e-5·Σ|w·x| covers f32 accumulation.
    #[test]
    fn quant_dots_within_bound_of_f32_reference(nb in 1usize..33, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for ty in QTYPES {
            let row = rand_row(&mut rng, ty, nb);
            let x = rand_acts(&mut rng, nb * QK);
            let w = dequant(ty, &row);
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let mut bound = 1e-5 * w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-6;
            for b in 0..nb {
                let xs = &x[b * QK..(b + 1) * QK];
                let ws = &w[b * QK..(b + 1) * QK];
                let d = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                if ty == WeightType::Q4_1 {
                    let blk = BlockQ4_1::from_bytes(row[b * 20..(b + 1) * 20].try_into().unwrap());
                    let (dw, m) = (blk.d.to_f32().abs(), blk.m.to_f32().abs());
                    let sum_n: f32 = ws.iter().map(|v| ((v - blk.m.to_f32()) / blk.d.to_f32()).abs() * dw).sum();
                    let sum_x: f32 = xs.iter().map(|v| v.abs()).sum();
                    bound += 0.5625 * d * sum_n + m * (16.0 * d + sum_x * 2f32.powi(-10));
                } else {
                    bound += 0.5625 * d * ws.iter().map(|v| v.abs()).sum::<f32>();
                }
            }
            for k in available() {
                let got = quant_dot(k, ty)(&row, &quantize_with(k, ty, &x));
                prop_assert!((f64::from(got) - exact).abs() <= f64::from(bound),
                    "{} {:?}: {} vs {} (bound {})", k.name, ty, got, exact, bound);
            }
        }
    }

    /// Float dots over arbitrary lengths (tails included).
    #[test]
    fn float_dots_match_scalar(n in 0usize..300, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let a = rand_acts(&mut rng, n);
        let b = rand_acts(&mut rng, n);
        let abs: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        let tol = 1e-5 * abs + f32::MIN_POSITIVE;
        let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let bh: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
        let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let a_bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ah_bytes: Vec<u8> = ah.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ab_bytes: Vec<u8> = a.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let s = &SCALAR;
        for k in available() {
            prop_assert!(close((k.dot_f32)(&a, &b), (s.dot_f32)(&a, &b), tol), "{} dot_f32", k.name);
            prop_assert!(close((k.dot_f16)(&ah, &bh), (s.dot_f16)(&ah, &bh), tol), "{} dot_f16", k.name);
            prop_assert!(close((k.dot_f32_bytes)(&a_bytes, &b), (s.dot_f32_bytes)(&a_bytes, &b), tol), "{} dot_f32_bytes", k.name);
            prop_assert!(close((k.dot_f16_bytes)(&ah_bytes, &bh), (s.dot_f16_bytes)(&ah_bytes, &bh), tol), "{} dot_f16_bytes", k.name);
            prop_assert!(close((k.dot_bf16_bytes)(&ab_bytes, &bb), (s.dot_bf16_bytes)(&ab_bytes, &bb), tol), "{} dot_bf16_bytes", k.name);
        }
        // The byte-slice entry points read the same values as the typed ones.
        prop_assert_eq!((s.dot_f32_bytes)(&a_bytes, &b).to_bits(), (s.dot_f32)(&a, &b).to_bits());
        prop_assert_eq!((s.dot_f16_bytes)(&ah_bytes, &bh).to_bits(), (s.dot_f16)(&ah, &bh).to_bits());
    }

    /// The F16 tokens kernel gives each token exactly its table's one-token dot (so a
    /// token's output does not depend on the tokens beside it: verified drafts match
    /// decoding), and the scalar twin's within rounding, for any length and token count.
    #[test]
    fn f16_tokens_kernel_equals_one_token_dots(n in 0usize..300, nt in 1usize..8, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<f16> = rand_acts(&mut rng, n).iter().map(|&v| f16::from_f32(v)).collect();
        let w_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let xh: Vec<f16> = rand_acts(&mut rng, n * nt).iter().map(|&v| f16::from_f32(v)).collect();
        let xw: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let s = &SCALAR;
        for k in available() {
            let mut out = vec![f32::NAN; nt];
            (k.dot_f16_bytes_tokens)(&w_bytes, &xw, n, &mut out);
            for (t, &got) in out.iter().enumerate() {
                let xt = &xh[t * n..(t + 1) * n];
                prop_assert_eq!(got.to_bits(), (k.dot_f16_bytes)(&w_bytes, xt).to_bits(),
                    "{} token {} of {}", k.name, t, nt);
                let abs: f32 = w.iter().zip(xt).map(|(a, b)| (a.to_f32() * b.to_f32()).abs()).sum();
                let tol = 1e-5 * abs + f32::MIN_POSITIVE;
                prop_assert!(close(got, (s.dot_f16_bytes)(&w_bytes, xt), tol), "{} vs scalar", k.name);
            }
        }
    }

    /// axpy: SIMD uses one fused multiply-add per element, scalar a multiply then an add;
    /// they differ by at most one rounding of the product.
    #[test]
    fn axpy_f16_matches_scalar(n in 0usize..200, seed: u64, alpha in -4.0f32..4.0) {
        let mut rng = StdRng::seed_from_u64(seed);
        let y0 = rand_acts(&mut rng, n);
        let x: Vec<f16> = rand_acts(&mut rng, n).iter().map(|&v| f16::from_f32(v)).collect();
        let mut want = y0.clone();
        (SCALAR.axpy_f16)(&mut want, alpha, &x);
        for k in available() {
            let mut got = y0.clone();
            (k.axpy_f16)(&mut got, alpha, &x);
            for i in 0..n {
                let tol = 2.0 * f32::EPSILON * (y0[i].abs() + (alpha * x[i].to_f32()).abs());
                prop_assert!(close(got[i], want[i], tol), "{} axpy at {}", k.name, i);
            }
        }
    }

    /// Attention scores over a strided run of keys (head sizes with and without a SIMD
    /// tail, gaps between rows, runs of any length) match the scalar twin, which is one
    /// `dot_f16` per key.
    #[test]
    fn dot_f16_rows_matches_scalar(hd in 0usize..200, gap in 0usize..40, rows in 0usize..24, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let stride = hd + gap;
        let len = (rows * stride).saturating_sub(gap);
        let q: Vec<f16> = rand_acts(&mut rng, hd).iter().map(|&v| f16::from_f32(v)).collect();
        let k: Vec<f16> = rand_acts(&mut rng, len).iter().map(|&v| f16::from_f32(v)).collect();
        let mut want = vec![f32::NAN; rows];
        (SCALAR.dot_f16_rows)(&q, &k, stride, &mut want);
        for j in 0..rows {
            let row = &k[j * stride..j * stride + hd];
            prop_assert_eq!(want[j].to_bits(), (SCALAR.dot_f16)(&q, row).to_bits());
        }
        for kt in available() {
            let mut got = vec![f32::NAN; rows];
            (kt.dot_f16_rows)(&q, &k, stride, &mut got);
            for j in 0..rows {
                let row = &k[j * stride..j * stride + hd];
                let abs: f32 = q.iter().zip(row).map(|(a, b)| (a.to_f32() * b.to_f32()).abs()).sum();
                let tol = 1e-5 * abs + f32::MIN_POSITIVE;
                prop_assert!(close(got[j], want[j], tol), "{} dot_f16_rows row {}: {} vs {}", kt.name, j, got[j], want[j]);
            }
        }
    }

    /// A KV head's queries scored together: on every table, each query's scores are the
    /// bits of that table's one-query kernel, written `out_stride` apart, and nothing else
    /// of `out` is touched; the same for values weighted into several rows at once.
    #[test]
    fn group_kernels_equal_one_query_at_a_time(
        hd in 1usize..150,
        gap in 0usize..20,
        rows in 0usize..20,
        group in 1usize..10,
        spare in 0usize..5,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let stride = hd + gap;
        let len = (rows * stride).saturating_sub(gap);
        let q: Vec<f16> = rand_acts(&mut rng, group * hd).iter().map(|&v| f16::from_f32(v)).collect();
        let k: Vec<f16> = rand_acts(&mut rng, len).iter().map(|&v| f16::from_f32(v)).collect();
        let out_stride = rows + spare;
        let w_all: Vec<f32> = (0..group * out_stride).map(|_| rng.gen_range(0.0f32..1.0)).collect();
        let y0 = rand_acts(&mut rng, group * hd);
        for kt in available() {
            let mut got = vec![f32::NAN; group * out_stride];
            (kt.dot_f16_rows_group)(&q, hd, &k, stride, rows, &mut got, out_stride);
            for g in 0..group {
                let mut want = vec![f32::NAN; rows];
                (kt.dot_f16_rows)(&q[g * hd..(g + 1) * hd], &k, stride, &mut want);
                let o = &got[g * out_stride..(g + 1) * out_stride];
                for j in 0..rows {
                    prop_assert_eq!(o[j].to_bits(), want[j].to_bits(), "{} query {} key {}", kt.name, g, j);
                }
                prop_assert!(o[rows..].iter().all(|v| v.is_nan()), "{} wrote past the scores", kt.name);
            }
            let mut got = y0.clone();
            (kt.axpy_f16_rows_group)(&mut got, hd, &w_all, out_stride, rows, &k, stride);
            for g in 0..group {
                let mut want = y0[g * hd..(g + 1) * hd].to_vec();
                (kt.axpy_f16_rows)(&mut want, &w_all[g * out_stride..][..rows], &k, stride);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&got[g * hd..(g + 1) * hd]), bits(&want), "{} row {}", kt.name, g);
            }
        }
    }

    /// Scores over a strided run of Q8_0 keys (head sizes of 1-6 blocks, gaps of whole
    /// blocks) match the f64 dot of the dequantised keys on every level, within f32
    /// rounding of the products; Q8_0 values weighted into a row are bit-identical on every
    /// level (each lane does the scalar twin's `fma(w·d, v, y)`).
    #[test]
    fn q8_0_rows_match_scalar_and_f64(blocks in 1usize..7, gap in 0usize..3, rows in 0usize..20, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let hd = blocks * QK;
        let stride = hd + gap * QK;
        let len = rows * stride;
        let q = rand_acts(&mut rng, hd);
        let v: Vec<i8> = (0..len).map(|_| rng.gen_range(-127i32..=127) as i8).collect();
        let d: Vec<f16> = (0..len / QK).map(|_| f16::from_f32(rng.gen_range(0.0f32..0.05))).collect();
        let deq = |j: usize, i: usize| {
            let e = j * stride + i;
            f64::from(d[e / QK].to_f32()) * f64::from(v[e])
        };
        // The query as the dot quantises it.
        let mut query = crate::Q8Query::default();
        query.set(&q);
        let qq = query.values();
        let (qs, dq): (Vec<i8>, Vec<f32>) = {
            let mut block = [0u8; BlockQ8_0::BYTES];
            let mut qs = Vec::new();
            let mut dq = Vec::new();
            for xb in q.chunks_exact(QK) {
                (SCALAR.quantize_q8_0)(xb, &mut block);
                dq.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
                qs.extend(block[2..].iter().map(|&b| b as i8));
            }
            (qs, dq)
        };
        let mut scalar = vec![f32::NAN; rows];
        (SCALAR.dot_q8_0_rows)(&qs, &dq, &v, &d, stride, &mut scalar);
        for (j, &g) in scalar.iter().enumerate() {
            let want: f64 = (0..hd).map(|i| f64::from(qq[i]) * deq(j, i)).sum();
            let abs: f64 = (0..hd).map(|i| (f64::from(qq[i]) * deq(j, i)).abs()).sum();
            let tol = 4.0 * (hd as f64) * f64::from(f32::EPSILON) * abs + 1e-30;
            prop_assert!((f64::from(g) - want).abs() <= tol, "dot row {}: {} vs {}", j, g, want);
        }
        for kt in available() {
            let mut got = vec![f32::NAN; rows];
            (kt.dot_q8_0_rows)(&qs, &dq, &v, &d, stride, &mut got);
            prop_assert_eq!(&got, &scalar, "{}", kt.name);
        }
        let y0 = rand_acts(&mut rng, hd);
        let w: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.0f32..1.0)).collect();
        let mut want = y0.clone();
        (SCALAR.axpy_q8_0_rows)(&mut want, &w, &v, &d, stride);
        for i in 0..hd {
            let exact = f64::from(y0[i]) + (0..rows).map(|j| f64::from(w[j]) * deq(j, i)).sum::<f64>();
            let abs = f64::from(y0[i].abs()) + (0..rows).map(|j| (f64::from(w[j]) * deq(j, i)).abs()).sum::<f64>();
            prop_assert!((f64::from(want[i]) - exact).abs() <= 4.0 * (rows as f64 + 1.0) * f64::from(f32::EPSILON) * abs + 1e-30);
        }
        for kt in available() {
            let mut got = y0.clone();
            (kt.axpy_q8_0_rows)(&mut got, &w, &v, &d, stride);
            prop_assert_eq!(&got, &want, "{}", kt.name);
        }
    }

    /// A strided run of values weighted into an output row matches the scalar twin (one
    /// `axpy_f16` per row, in order) within one rounding of each product.
    #[test]
    fn axpy_f16_rows_matches_scalar(hd in 0usize..200, gap in 0usize..40, rows in 0usize..24, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let stride = hd + gap;
        let len = (rows * stride).saturating_sub(gap);
        let y0 = rand_acts(&mut rng, hd);
        let w: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.0f32..1.0)).collect();
        let v: Vec<f16> = rand_acts(&mut rng, len).iter().map(|&x| f16::from_f32(x)).collect();
        let mut want = y0.clone();
        (SCALAR.axpy_f16_rows)(&mut want, &w, &v, stride);
        let mut one_by_one = y0.clone();
        for (j, &a) in w.iter().enumerate() {
            (SCALAR.axpy_f16)(&mut one_by_one, a, &v[j * stride..j * stride + hd]);
        }
        prop_assert_eq!(&want, &one_by_one);
        for kt in available() {
            let mut got = y0.clone();
            (kt.axpy_f16_rows)(&mut got, &w, &v, stride);
            for i in 0..hd {
                let abs: f32 = y0[i].abs()
                    + (0..rows).map(|j| (w[j] * v[j * stride + i].to_f32()).abs()).sum::<f32>();
                let tol = 2.0 * (rows as f32 + 1.0) * f32::EPSILON * abs;
                prop_assert!(close(got[i], want[i], tol), "{} axpy_f16_rows lane {}: {} vs {}", kt.name, i, got[i], want[i]);
            }
        }
    }

    /// The softmax's exponentials: every table's values equal the scalar twin's bit for bit
    /// (the same operations lane by lane), each within 4 ulps of the exact exponential, 0
    /// below the cut-off, for -inf and for NaN, finite above; the sums agree to rounding.
    #[test]
    fn exp_sum_matches_scalar(n in 0usize..300, seed: u64, sub in -10.0f32..10.0) {
        use crate::arch::portable::{EXP_HI, EXP_LO};
        let mut rng = StdRng::seed_from_u64(seed);
        let x0: Vec<f32> = (0..n)
            .map(|i| match i % 23 {
                0 => -200.0,
                1 => f32::NEG_INFINITY,
                2 => f32::NAN,
                3 => rng.gen_range(80.0f32..120.0),
                4 => EXP_LO + sub,
                _ => rng.gen_range(-100.0f32..10.0),
            })
            .collect();
        let mut want = x0.clone();
        let want_sum = (SCALAR.exp_sum)(&mut want, sub);
        let mut exact_sum = 0f64;
        for (&x, &e) in x0.iter().zip(&want) {
            let d = x - sub;
            if d.is_nan() || d < EXP_LO {
                prop_assert_eq!(e.to_bits(), 0, "exp({}) = {}", d, e);
            } else {
                let exact = f64::from(d.min(EXP_HI)).exp();
                let rel = ((f64::from(e) - exact) / exact).abs();
                prop_assert!(rel <= 4.0 * f64::from(f32::EPSILON), "exp({}) = {} vs {}", d, e, exact);
            }
            exact_sum += f64::from(e);
        }
        // Sums are compared where they fit in f32 (a few exp(88) overflow it).
        let finite = exact_sum < 1e38;
        let tol = 1e-6 * exact_sum as f32 + f32::MIN_POSITIVE;
        prop_assert!(!finite || close(want_sum, exact_sum as f32, tol), "scalar sum {} vs {}", want_sum, exact_sum);
        for k in available() {
            let mut got = x0.clone();
            let sum = (k.exp_sum)(&mut got, sub);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&want), "{} exp_sum values", k.name);
            prop_assert!(!finite || close(sum, want_sum, tol), "{} exp_sum sum {} vs {}", k.name, sum, want_sum);
        }
    }

    /// f16 conversions are exact/round-to-nearest-even in every implementation, across the
    /// whole range (subnormals and overflow to infinity included).
    #[test]
    fn f16_conversions_match_scalar(n in 0usize..100, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let src: Vec<f32> = (0..n)
            .map(|_| {
                let sign = if rng.r#gen::<bool>() { 1.0 } else { -1.0 };
                sign * 2f32.powf(rng.gen_range(-30.0..20.0))
            })
            .collect();
        let mut want = vec![f16::ZERO; n];
        (SCALAR.f32_to_f16)(&src, &mut want);
        let mut back_want = vec![0f32; n];
        (SCALAR.f16_to_f32)(&want, &mut back_want);
        for k in available() {
            let mut got = vec![f16::ZERO; n];
            (k.f32_to_f16)(&src, &mut got);
            prop_assert_eq!(&got, &want, "{} f32_to_f16", k.name);
            let mut back = vec![0f32; n];
            (k.f16_to_f32)(&got, &mut back);
            prop_assert_eq!(&back, &back_want, "{} f16_to_f32", k.name);
        }
    }
}

#[test]
fn q4_0_known_block() {
    // d = 0.5; byte j = (lo = j, hi = 15 - j): element j = (j - 8)/2, element j+16 = (7 - j)/2.
    let block = BlockQ4_0 {
        d: f16::from_f32(0.5),
        qs: std::array::from_fn(|j| (j as u8) | ((15 - j as u8) << 4)),
    };
    let bytes = block.to_bytes();
    for k in available() {
        let mut out = [0f32; 32];
        (k.dequantize_q4_0)(&bytes, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5, "{}", k.name);
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5, "{}", k.name);
        }
    }
}

#[test]
fn q8_quantisation_known_block() {
    // amax 127 → d = 1, so the quants are the inputs rounded half to even.
    let mut x = [0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.5;
    x[4] = -126.6;
    for k in available() {
        let mut out = [0u8; BlockQ8_1::BYTES];
        (k.quantize_q8_1)(&x, &mut out);
        let b = BlockQ8_1::from_bytes(&out);
        assert_eq!(b.d.to_f32(), 1.0, "{}", k.name);
        assert_eq!(&b.qs[..5], &[127, 2, -4, 0, -127], "{}", k.name);
        assert_eq!(b.s.to_f32(), (127 + 2 - 4 - 127) as f32, "{}", k.name);
    }
}

#[test]
fn q8_0_block_with_all_zeros_has_zero_scale() {
    let x = [0f32; 64];
    for k in available() {
        let mut out = vec![0xAAu8; 2 * BlockQ8_0::BYTES];
        (k.quantize_q8_0)(&x, &mut out);
        assert!(out.iter().all(|&b| b == 0), "{}", k.name);
    }
}

#[test]
fn dispatch_picks_best_available() {
    let all = available();
    assert_eq!(all[0].name, "scalar");
    assert_eq!(crate::simd_level(), all[all.len() - 1].name);
}

#[test]
fn matmul_matches_reference_within_bound_for_every_type() {
    // One end-to-end check through the public API: float and quantised weight types against
    // the dequantise-then-f32 reference. Tolerances: relative rounding of the activation
    // conversion (f16: 2^-11, bf16: 2^-8) or the Q8 step bound as in the property test
    // (here loosely 0.6·amax/127·Σ|w| per block plus the Q4_1 minimum term).
    use crate::{Matrix, ThreadPool, matmul, vec_dot_f32_reference};
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols, n_tokens) = (13usize, 96usize, 3usize);
    let pool = ThreadPool::new(2);
    let x = rand_acts(&mut rng, n_tokens * cols);
    for ty in [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q8_0,
    ] {
        let data: Vec<u8> = match ty {
            WeightType::F32 => (0..rows * cols)
                .flat_map(|_| rng.gen_range(-1f32..1.0).to_le_bytes())
                .collect(),
            WeightType::F16 => (0..rows * cols)
                .flat_map(|_| f16::from_f32(rng.gen_range(-1f32..1.0)).to_le_bytes())
                .collect(),
            WeightType::BF16 => (0..rows * cols)
                .flat_map(|_| bf16::from_f32(rng.gen_range(-1f32..1.0)).to_le_bytes())
                .collect(),
            _ => rand_row(&mut rng, ty, rows * cols / QK),
        };
        let w = Matrix::new(ty, &data, rows, cols).unwrap();
        let mut y = vec![0f32; n_tokens * rows];
        matmul(&pool, &w, &x, n_tokens, &mut y).unwrap();
        for t in 0..n_tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let mut wr = vec![0f32; cols];
                crate::dequantize_row(ty, w.row(r), &mut wr).unwrap();
                let abs: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                let want = vec_dot_f32_reference(ty, w.row(r), xt).unwrap();
                let bound = match ty {
                    WeightType::F32 => 1e-5 * abs,
                    WeightType::F16 => (2f32.powi(-11) + 1e-5) * abs,
                    WeightType::BF16 => (2f32.powi(-8) + 1e-5) * abs,
                    _ => {
                        let mut b = 1e-5 * abs + 1e-6;
                        for (wb, xb) in wr.chunks(QK).zip(xt.chunks(QK)) {
                            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                            let m = if ty == WeightType::Q4_1 { 0.8 } else { 0.0 };
                            let sw: f32 = wb.iter().map(|v| v.abs() + m).sum();
                            let sx: f32 = xb.iter().map(|v| v.abs()).sum();
                            b += 0.6 * d * sw + m * (16.0 * d + sx * 2f32.powi(-10));
                        }
                        b
                    }
                };
                let got = y[t * rows + r];
                assert!(
                    (got - want).abs() <= bound,
                    "{ty:?} t{t} r{r}: {got} vs {want} (bound {bound})"
                );
            }
        }
    }
}
