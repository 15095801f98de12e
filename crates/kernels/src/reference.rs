//! Reference weight quantisers: f32 → every block format, following llama.cpp's
//! non-imatrix `quantize_row_*_ref` functions (the ones `llama-quantize` uses without an
//! importance matrix). They are for tests and the synthetic-model writer, not a hot path.
//!
//! The K-quant scale searches (`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`) are
//! re-derived from ggml's description: quantise with a trial scale, fit the least-squares
//! scale (and minimum) for the levels chosen, keep the trial with the smallest weighted
//! error. Results are close to llama.cpp's but not promised bit-identical (the compiled C may
//! contract multiply-adds differently).

use half::f16;

use crate::formats::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, QK, QK_K,
};
use crate::types::{KernelError, WeightType, check_row_bytes};

/// Quantises `src` into `dst` as weights of type `ty`, with llama.cpp's reference
/// (non-imatrix) quantisers — what `llama-quantize` does without an importance matrix. For
/// tests and synthetic models; float types are converted (F16 and BF16 round to nearest
/// even).
///
/// # Errors
///
/// [`KernelError::NotBlockMultiple`] if `src.len()` is not a whole number of blocks;
/// [`KernelError::DataSize`] if `dst` is not exactly the bytes of `src.len()` elements.
pub fn quantize_row(ty: WeightType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    check_row_bytes("quantize_row destination", ty, src.len(), dst.len())?;
    match ty {
        WeightType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        WeightType::F16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(*s).to_le_bytes());
            }
        }
        WeightType::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(*s).to_le_bytes());
            }
        }
        WeightType::Q4_0 => quantize_q4_0(src, dst),
        WeightType::Q4_1 => quantize_q4_1(src, dst),
        WeightType::Q8_0 => quantize_q8_0(src, dst),
        WeightType::Q5_0 => quantize_q5_0(src, dst),
        WeightType::Q5_1 => quantize_q5_1(src, dst),
        WeightType::Q2_K => quantize_q2_k(src, dst),
        WeightType::Q3_K => quantize_q3_k(src, dst),
        WeightType::Q4_K => quantize_q4_k(src, dst),
        WeightType::Q5_K => quantize_q5_k(src, dst),
        WeightType::Q6_K => quantize_q6_k(src, dst),
    }
    Ok(())
}

/// ggml `GROUP_MAX_EPS`: groups whose largest magnitude is below this are all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml `nearest_int`: round half to even (exact for the |v| < 2²² ggml asserts).
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Element of largest magnitude (first on ties), and that magnitude.
fn signed_max(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Calls `f` on each (input block, output block) pair.
fn per_block<const N: usize>(
    x: &[f32],
    out: &mut [u8],
    elems: usize,
    mut f: impl FnMut(&[f32]) -> [u8; N],
) {
    for (xb, ob) in x.chunks_exact(elems).zip(out.as_chunks_mut::<N>().0) {
        *ob = f(xb);
    }
}

/// Q4_0: `d = max/-8`, `q = min(15, trunc(x/d + 8.5))`.
fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK, |xb| {
        let (max, _) = signed_max(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
        let qs = std::array::from_fn(|j| q(xb[j]) | (q(xb[j + QK / 2]) << 4));
        BlockQ4_0 {
            d: f16::from_f32(d),
            qs,
        }
        .to_bytes()
    });
}

/// Q4_1: `d = (max - min)/15`, `m = min`, `q = min(15, trunc((x - min)/d + 0.5))`.
fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK, |xb| {
        let min = xb.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
        let max = xb.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
        let qs = std::array::from_fn(|j| q(xb[j]) | (q(xb[j + QK / 2]) << 4));
        BlockQ4_1 {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qs,
        }
        .to_bytes()
    });
}

/// Q8_0: `d = amax/127`, `q = round_half_away(x/d)` (C `roundf`).
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK, |xb| {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        BlockQ8_0 {
            d: f16::from_f32(d),
            qs: std::array::from_fn(|j| (xb[j] * id).round() as i8),
        }
        .to_bytes()
    });
}

/// Packs 32 five-bit levels: low nibbles as Q4_0, fifth bits into a little-endian `u32`.
fn pack_q5(levels: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    for (j, &l) in levels.iter().enumerate() {
        qh |= u32::from((l >> 4) & 1) << j;
    }
    let qs = std::array::from_fn(|j| (levels[j] & 0x0F) | ((levels[j + QK / 2] & 0x0F) << 4));
    (qh.to_le_bytes(), qs)
}

/// Q5_0: `d = max/-16`, `q = min(31, trunc(x/d + 16.5))`.
fn quantize_q5_0(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK, |xb| {
        let (max, _) = signed_max(xb);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let levels = std::array::from_fn(|j| ((xb[j] * id + 16.5) as i8).clamp(0, 31) as u8);
        let (qh, qs) = pack_q5(&levels);
        BlockQ5_0 {
            d: f16::from_f32(d),
            qh,
            qs,
        }
        .to_bytes()
    });
}

/// Q5_1: `d = (max - min)/31`, `m = min`, `q = trunc((x - min)/d + 0.5)`.
fn quantize_q5_1(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK, |xb| {
        let min = xb.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
        let max = xb.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let levels = std::array::from_fn(|j| (((xb[j] - min) * id + 0.5) as i8).clamp(0, 31) as u8);
        let (qh, qs) = pack_q5(&levels);
        BlockQ5_1 {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qh,
            qs,
        }
        .to_bytes()
    });
}

/// ggml `make_qx_quants` with `rmse_type = 1` and no importance weights (weights `x²`):
/// symmetric levels in `-nmax..nmax`, stored in `l` offset by `nmax`; returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (li, &v) in l.iter_mut().zip(x) {
        *li = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml `make_q3_quants` with `do_rmse = true`: start from `-nmax/max`, then up to five
/// rounds of moving single levels where that raises the weighted (`x²`) fit; levels in
/// `-nmax..nmax` stored offset by `nmax`; returns the scale.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *li = q as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * (q * q) as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let cur = f32::from(*li);
            let mut slx = sumlx - w * v * cur;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * cur * cur;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(*li) {
                    slx += w * v * new_l as f32;
                    sl2 += w * (new_l * new_l) as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    sumlx / suml2
}

/// ggml `make_qkx2_quants`: asymmetric levels `0..=nmax` for `x ≈ scale·l − min`, searching
/// `nstep + 1` trial inverse scales `(rmin + rdelta·is + nmax)/(max − min)` and keeping the
/// least-squares (scale, min) fit with the smallest weighted error (absolute error when
/// `use_mad`). Returns `(scale, min)` with `min ≥ 0` meaning an offset of `-min`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        best_error += weights[i] * err(scale * q as f32 + min - x[i]);
    }
    let mut laux = vec![0u8; n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error: f32 = (0..n)
                .map(|i| weights[i] * err(this_scale * f32::from(laux[i]) + this_min - x[i]))
                .sum();
            if cur_error < best_error {
                l.copy_from_slice(&laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Runs a symmetric fit (`make_q3_quants`, `make_qx_quants`) on each 16-element sub-block
/// of a super-block: the levels of all 256 elements and the 16 sub-block scales.
fn fit_sub_blocks(xb: &[f32], fit: impl Fn(&[f32], &mut [i8]) -> f32) -> ([i8; QK_K], [f32; 16]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for (s, scale) in scales.iter_mut().enumerate() {
        *scale = fit(&xb[16 * s..16 * s + 16], &mut l[16 * s..16 * s + 16]);
    }
    (l, scales)
}

/// Packs 256 two-bit levels in the Q2_K/Q3_K `qs` layout.
fn pack_k2(levels: &[u8; QK_K]) -> [u8; QK_K / 4] {
    std::array::from_fn(|i| {
        let (n, l) = (i / 32, i % 32);
        (0..4).fold(0u8, |acc, j| {
            acc | ((levels[128 * n + 32 * j + l] & 3) << (2 * j))
        })
    })
}

/// Q2_K (`quantize_row_q2_K_ref`): per 16-element sub-block a `make_qkx2_quants` fit with
/// |x| weights, the 16 scales and 16 minimums quantised to 4 bits against their maxima,
/// then the elements re-quantised with the rounded scales.
fn quantize_q2_k(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK_K, |xb| {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        for s in 0..16 {
            let xs = &xb[16 * s..16 * s + 16];
            let weights: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
            (scales[s], mins[s]) = make_qkx2_quants(
                3,
                xs,
                &weights,
                &mut levels[16 * s..16 * s + 16],
                -0.5,
                0.1,
                15,
                true,
            );
        }
        let max_scale = scales.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let max_min = mins.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let mut b = BlockQ2K::zeroed();
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for (o, &s) in b.scales.iter_mut().zip(&scales) {
                *o = nearest_int(iscale * s).clamp(0, 15) as u8;
            }
            b.d = f16::from_f32(max_scale / 15.0);
        }
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for (o, &m) in b.scales.iter_mut().zip(&mins) {
                *o |= (nearest_int(iscale * m).clamp(0, 15) as u8) << 4;
            }
            b.dmin = f16::from_f32(max_min / 15.0);
        }
        for s in 0..16 {
            let d = b.d.to_f32() * f32::from(b.scales[s] & 0x0F);
            if d == 0.0 {
                continue;
            }
            let dm = b.dmin.to_f32() * f32::from(b.scales[s] >> 4);
            for i in 16 * s..16 * s + 16 {
                levels[i] = nearest_int((xb[i] + dm) / d).clamp(0, 3) as u8;
            }
        }
        b.qs = pack_k2(&levels);
        b.to_bytes()
    });
}

/// Q3_K (`quantize_row_q3_K_ref`): per 16-element sub-block a `make_q3_quants` fit, the
/// 16 signed scales quantised to 6 bits against the one of largest magnitude, then the
/// elements re-quantised to -4..4 with the rounded scales.
fn quantize_q3_k(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK_K, |xb| {
        let (mut l, scales) = fit_sub_blocks(xb, |x, l| make_q3_quants(4, x, l));
        let (max_scale, _) = signed_max(&scales);
        let mut b = BlockQ3K::zeroed();
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (s, &sc) in scales.iter().enumerate() {
                let q = (nearest_int(iscale * sc).clamp(-32, 31) + 32) as u8;
                if s < 8 {
                    b.scales[s] = q & 0x0F;
                } else {
                    b.scales[s - 8] |= (q & 0x0F) << 4;
                }
                b.scales[8 + s % 4] |= (q >> 4) << (2 * (s / 4));
            }
            b.d = f16::from_f32(1.0 / iscale);
        }
        for (s, sc) in b.unpacked_scales().into_iter().enumerate() {
            let d = b.d.to_f32() * f32::from(sc);
            if d == 0.0 {
                continue;
            }
            for i in 16 * s..16 * s + 16 {
                l[i] = (nearest_int(xb[i] / d).clamp(-4, 3) + 4) as i8;
            }
        }
        // Levels 4..8 have the high bit: stored in hmask, bit g of byte e % 32 for e = 32g + ..
        let mut low = [0u8; QK_K];
        for (e, &v) in l.iter().enumerate() {
            let v = v as u8;
            if v > 3 {
                b.hmask[e % 32] |= 1 << (e / 32);
            }
            low[e] = v & 3;
        }
        b.qs = pack_k2(&low);
        b.to_bytes()
    });
}

/// Packs eight 6-bit (scale, min) pairs the way `get_scale_min_k4` reads them.
pub(crate) fn pack_k4_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
    q
}

/// The Q4_K/Q5_K recipe: per 32-element sub-block a `make_qkx2_quants` fit (weights
/// `rms(x) + |x|`), scales and mins quantised to 6 bits against their maxima (f16 super-block
/// scales `max/63`), then elements re-quantised to `0..=nmax` with the rounded values.
/// Returns (d, dmin, packed scales, levels).
fn k4_fit(xb: &[f32], nmax: i32, rmin: f32, nstep: i32) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for s in 0..8 {
        let xs = &xb[32 * s..32 * s + 32];
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        (scales[s], mins[s]) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * s..32 * s + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let max_min = mins.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls: [u8; 8] =
        std::array::from_fn(|s| nearest_int(inv_scale * scales[s]).clamp(0, 63) as u8);
    let lm: [u8; 8] = std::array::from_fn(|s| nearest_int(inv_min * mins[s]).clamp(0, 63) as u8);
    let packed = pack_k4_scales(&ls, &lm);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for s in 0..8 {
        let dl = d.to_f32() * f32::from(ls[s]);
        if dl == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(lm[s]);
        for i in 32 * s..32 * s + 32 {
            levels[i] = nearest_int((xb[i] + dm) / dl).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

/// Packs 256 four-bit levels in the Q4_K/Q5_K `qs` layout (low 4 bits of each level).
fn pack_k4(levels: &[u8; QK_K]) -> [u8; QK_K / 2] {
    std::array::from_fn(|i| {
        let (n, l) = (i / 32, i % 32);
        (levels[64 * n + l] & 0x0F) | ((levels[64 * n + 32 + l] & 0x0F) << 4)
    })
}

/// Q4_K (`quantize_row_q4_K_ref`).
fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK_K, |xb| {
        let (d, dmin, scales, levels) = k4_fit(xb, 15, -1.0, 20);
        BlockQ4K {
            d,
            dmin,
            scales,
            qs: pack_k4(&levels),
        }
        .to_bytes()
    });
}

/// Q5_K (`quantize_row_q5_K_ref`).
fn quantize_q5_k(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK_K, |xb| {
        let (d, dmin, scales, levels) = k4_fit(xb, 31, -0.5, 15);
        let mut qh = [0u8; QK_K / 8];
        for (e, &l) in levels.iter().enumerate() {
            qh[e % 32] |= ((l >> 4) & 1) << (e / 32);
        }
        BlockQ5K {
            d,
            dmin,
            scales,
            qh,
            qs: pack_k4(&levels),
        }
        .to_bytes()
    });
}

/// Q6_K (`quantize_row_q6_K_ref`): per 16-element sub-block a `make_qx_quants` fit, the 16
/// scales quantised to signed 8 bits against the one of largest magnitude (`-128/max`), then
/// the elements re-quantised to -32..32.
fn quantize_q6_k(x: &[f32], out: &mut [u8]) {
    per_block(x, out, QK_K, |xb| {
        let (mut l, scales) = fit_sub_blocks(xb, |x, l| make_qx_quants(32, x, l));
        let (max_scale, max_abs) = signed_max(&scales);
        let mut b = BlockQ6K::zeroed();
        if max_abs < GROUP_MAX_EPS {
            return b.to_bytes();
        }
        let iscale = -128.0 / max_scale;
        b.d = f16::from_f32(1.0 / iscale);
        for (o, &s) in b.scales.iter_mut().zip(&scales) {
            *o = nearest_int(iscale * s).clamp(-128, 127) as i8;
        }
        for s in 0..16 {
            let d = b.d.to_f32() * f32::from(b.scales[s]);
            if d == 0.0 {
                continue;
            }
            for i in 16 * s..16 * s + 16 {
                l[i] = (nearest_int(xb[i] / d).clamp(-32, 31) + 32) as i8;
            }
        }
        for (e, &v) in l.iter().enumerate() {
            let v = v as u8;
            let (n, k, i) = (e / 128, (e / 32) % 4, e % 32);
            let at = 64 * n + i + 32 * (k & 1);
            b.ql[at] |= if k < 2 { v & 0x0F } else { (v & 0x0F) << 4 };
            b.qh[32 * n + i] |= (v >> 4) << (2 * k);
        }
        b.to_bytes()
    });
}
