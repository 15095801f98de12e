//! Portable reference kernels for Q5_0, Q5_1 and the K-quants: dequantisation, activation
//! quantisation to Q8_K, and the integer dot products.
//!
//! Dequantisation evaluates ggml's generic C expressions in the same order and without
//! fused multiply-adds (`(d·sc)·q − dmin·m`), which is also what the `gguf` Python package
//! computes, so the golden test can compare bits. The dots sum exact integers per super-block
//! (the sub-block scales folded in as integers) and accumulate `d · sumi` in f32; SIMD twins
//! only differ in the order of those f32 additions.

use half::f16;

use crate::formats::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, QK, QK_K, blocks, dequant_blocks,
};

// ----------------------------------------------------------------------------------------
// Quant levels, unpacked into element order
// ----------------------------------------------------------------------------------------

/// The 32 five-bit levels (0..32) of a Q5_0/Q5_1 block.
pub(crate) fn q5_levels(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    std::array::from_fn(|j| {
        let nib = if j < QK / 2 {
            qs[j] & 0x0F
        } else {
            qs[j - QK / 2] >> 4
        };
        nib | ((((qh >> j) & 1) as u8) << 4)
    })
}

/// The 256 two-bit levels (0..4) of a Q2_K/Q3_K `qs` array.
fn k2_levels(qs: &[u8; QK_K / 4]) -> [u8; QK_K] {
    std::array::from_fn(|e| {
        let (n, j, l) = (e / 128, (e / 32) % 4, e % 32);
        (qs[32 * n + l] >> (2 * j)) & 3
    })
}

/// The 256 signed Q3_K levels (-4..4).
fn q3k_levels(b: &BlockQ3K) -> [i8; QK_K] {
    let low = k2_levels(&b.qs);
    std::array::from_fn(|e| {
        let high_set = (b.hmask[e % 32] >> (e / 32)) & 1 == 1;
        low[e] as i8 - if high_set { 0 } else { 4 }
    })
}

/// The 256 four-bit levels of a Q4_K/Q5_K `qs` array.
pub(crate) fn k4_levels(qs: &[u8; QK_K / 2]) -> [u8; QK_K] {
    std::array::from_fn(|e| {
        let (n, h, l) = (e / 64, (e / 32) % 2, e % 32);
        (qs[32 * n + l] >> (4 * h)) & 0x0F
    })
}

/// The 256 five-bit Q5_K levels (0..32).
pub(crate) fn q5k_levels(b: &BlockQ5K) -> [u8; QK_K] {
    let low = k4_levels(&b.qs);
    std::array::from_fn(|e| low[e] | (((b.qh[e % 32] >> (e / 32)) & 1) << 4))
}

/// The 256 signed Q6_K levels (-32..32).
pub(crate) fn q6k_levels(b: &BlockQ6K) -> [i8; QK_K] {
    std::array::from_fn(|e| {
        let (n, k, l) = (e / 128, (e / 32) % 4, e % 32);
        let byte = b.ql[64 * n + l + 32 * (k & 1)];
        let low = if k < 2 { byte & 0x0F } else { byte >> 4 };
        let high = (b.qh[32 * n + l] >> (2 * k)) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

// ----------------------------------------------------------------------------------------
// Dequantisation
// ----------------------------------------------------------------------------------------

/// Q5_0 blocks → f32: `(q - 16) · d`.
pub(crate) fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK, BlockQ5_0::from_bytes) {
        let d = b.d.to_f32();
        for (o, q) in out.iter_mut().zip(q5_levels(b.qh, &b.qs)) {
            *o = (i32::from(q) - 16) as f32 * d;
        }
    }
}

/// Q5_1 blocks → f32: `d · q + m` (a multiply, then an add).
pub(crate) fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK, BlockQ5_1::from_bytes) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for (o, q) in out.iter_mut().zip(q5_levels(b.qh, &b.qs)) {
            *o = d * f32::from(q) + m;
        }
    }
}

/// Q2_K blocks → f32: `(d·sc)·q − dmin·m` per 16-element sub-block.
pub(crate) fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ2K::from_bytes) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let q = k2_levels(&b.qs);
        for (s, (o, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(b.scales[s] & 0x0F);
            let ml = dmin * f32::from(b.scales[s] >> 4);
            for (o, &q) in o.iter_mut().zip(qs) {
                *o = dl * f32::from(q) - ml;
            }
        }
    }
}

/// Q3_K blocks → f32: `(d·(sc − 32))·q` per 16-element sub-block.
pub(crate) fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ3K::from_bytes) {
        let d = b.d.to_f32();
        let sc = b.unpacked_scales();
        let q = q3k_levels(&b);
        for (s, (o, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(sc[s]);
            for (o, &q) in o.iter_mut().zip(qs) {
                *o = dl * f32::from(q);
            }
        }
    }
}

/// Shared Q4_K/Q5_K dequantisation: `(d·sc)·q − dmin·m` per 32-element sub-block.
fn dequantize_k4(d: f32, dmin: f32, sm: &[(u8, u8); 8], q: &[u8; QK_K], out: &mut [f32]) {
    for (s, (o, qs)) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
        let dl = d * f32::from(sm[s].0);
        let ml = dmin * f32::from(sm[s].1);
        for (o, &q) in o.iter_mut().zip(qs) {
            *o = dl * f32::from(q) - ml;
        }
    }
}

/// Q4_K blocks → f32.
pub(crate) fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ4K::from_bytes) {
        let q = k4_levels(&b.qs);
        dequantize_k4(b.d.to_f32(), b.dmin.to_f32(), &b.unpacked_scales(), &q, out);
    }
}

/// Q5_K blocks → f32.
pub(crate) fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ5K::from_bytes) {
        let q = q5k_levels(&b);
        dequantize_k4(b.d.to_f32(), b.dmin.to_f32(), &b.unpacked_scales(), &q, out);
    }
}

/// Q6_K blocks → f32: `(d·sc)·(q − 32)` per 16-element sub-block.
pub(crate) fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ6K::from_bytes) {
        let d = b.d.to_f32();
        let q = q6k_levels(&b);
        for (s, (o, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(b.scales[s]);
            for (o, &q) in o.iter_mut().zip(qs) {
                *o = dl * f32::from(q);
            }
        }
    }
}

/// Q8_K blocks → f32 (tests).
#[cfg(test)]
pub(crate) fn dequantize_q8_k(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK_K, BlockQ8K::from_bytes) {
        for (o, q) in out.iter_mut().zip(b.qs) {
            *o = b.d * f32::from(q);
        }
    }
}

// ----------------------------------------------------------------------------------------
// Activation quantisation
// ----------------------------------------------------------------------------------------

/// ggml `quantize_row_q8_K` (the reference, which ggml's x86 build also uses): the element
/// of largest magnitude `max` (first one on ties) maps to -127 through `iscale = -127/max`,
/// every element to `min(127, round_half_even(iscale·x))`, `d = 1/iscale`; an all-zero block
/// is all zeros. `bsums` are the sums of groups of 16 quants.
pub(crate) fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .chunks_exact(QK_K)
        .zip(out.as_chunks_mut::<{ BlockQ8K::BYTES }>().0)
    {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut block = BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
        if amax != 0.0 {
            let iscale = -127.0 / max;
            for (q, &v) in block.qs.iter_mut().zip(xb) {
                // |iscale·v| ≤ 127 (plus rounding) for finite input; the cast saturates.
                *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            for (s, g) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| i16::from(q)).sum();
            }
            block.d = 1.0 / iscale;
        }
        *ob = block.to_bytes();
    }
}

// ----------------------------------------------------------------------------------------
// Dot products
// ----------------------------------------------------------------------------------------

/// Q5_0 weight row · Q8_0 activations, ggml `ggml_vec_dot_q5_0_q8_0` (generic).
pub(crate) fn dot_q5_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ5_0::from_bytes, BlockQ8_0::from_bytes) {
        let sumi: i32 = q5_levels(bw.qh, &bw.qs)
            .iter()
            .zip(bx.qs)
            .map(|(&q, y)| (i32::from(q) - 16) * i32::from(y))
            .sum();
        sumf += sumi as f32 * (bw.d.to_f32() * bx.d.to_f32());
    }
    sumf
}

/// Q5_1 weight row · Q8_1 activations: `Σ d_w d_x · Σq·y + m_w · s_x`.
pub(crate) fn dot_q5_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ5_1::from_bytes, BlockQ8_1::from_bytes) {
        let sumi: i32 = q5_levels(bw.qh, &bw.qs)
            .iter()
            .zip(bx.qs)
            .map(|(&q, y)| i32::from(q) * i32::from(y))
            .sum();
        sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32 + bw.m.to_f32() * bx.s.to_f32();
    }
    sumf
}

/// `Σ_s scale_s · Σ_{e in s} q_e · y_e` over sub-blocks of `sub` elements (exact in i32:
/// at most 256 · 63 · 64 · 127 < 2³¹).
fn scaled_isum<Q: Copy + Into<i32>, S: Copy + Into<i32>>(
    q: &[Q; QK_K],
    y: &[i8; QK_K],
    scales: &[S],
    sub: usize,
) -> i32 {
    q.chunks_exact(sub)
        .zip(y.chunks_exact(sub))
        .zip(scales)
        .map(|((qs, ys), &sc)| {
            let s: i32 = qs
                .iter()
                .zip(ys)
                .map(|(&a, &b)| a.into() * i32::from(b))
                .sum();
            sc.into() * s
        })
        .sum()
}

/// Q2_K · Q8_K: `y.d·d · Σ sc·Σq·y − y.d·dmin · Σ m·bsum`.
pub(crate) fn dot_q2_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ2K::from_bytes, BlockQ8K::from_bytes) {
        let sc: [u8; 16] = bw.scales.map(|s| s & 0x0F);
        let summs: i32 = bw
            .scales
            .iter()
            .zip(bx.bsums)
            .map(|(&s, b)| i32::from(s >> 4) * i32::from(b))
            .sum();
        let isum = scaled_isum(&k2_levels(&bw.qs), &bx.qs, &sc, 16);
        let dall = bx.d * bw.d.to_f32();
        let dmin = bx.d * bw.dmin.to_f32();
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Q3_K · Q8_K: `y.d·d · Σ (sc − 32)·Σq·y`.
pub(crate) fn dot_q3_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ3K::from_bytes, BlockQ8K::from_bytes) {
        let isum = scaled_isum(&q3k_levels(&bw), &bx.qs, &bw.unpacked_scales(), 16);
        sumf += (bw.d.to_f32() * bx.d) * isum as f32;
    }
    sumf
}

/// Shared Q4_K/Q5_K dot: `y.d·d · Σ sc·Σq·y − y.d·dmin · Σ m·(bsum pair)`.
fn dot_k4(d: f32, dmin: f32, sm: &[(u8, u8); 8], q: &[u8; QK_K], bx: &BlockQ8K) -> f32 {
    let sc: [u8; 8] = sm.map(|p| p.0);
    let summs: i32 = sm
        .iter()
        .zip(bx.bsums.chunks_exact(2))
        .map(|(p, b)| i32::from(p.1) * (i32::from(b[0]) + i32::from(b[1])))
        .sum();
    let isum = scaled_isum(q, &bx.qs, &sc, 32);
    (d * bx.d) * isum as f32 - (dmin * bx.d) * summs as f32
}

/// The parts of a Q4_K/Q5_K block the shared dot needs: `d`, `dmin`, the (scale, minimum)
/// pairs and the 256 levels.
type K4Parts = (f16, f16, [(u8, u8); 8], [u8; QK_K]);

/// A Q4_K or Q5_K row · Q8_K through [`dot_k4`], blocks parsed by `parse` and split by
/// `parts`.
fn dot_k4_row<B, const WB: usize>(
    w: &[u8],
    x: &[u8],
    parse: fn(&[u8; WB]) -> B,
    parts: fn(&B) -> K4Parts,
) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, parse, BlockQ8K::from_bytes) {
        let (d, dmin, sm, q) = parts(&bw);
        sumf += dot_k4(d.to_f32(), dmin.to_f32(), &sm, &q, &bx);
    }
    sumf
}

/// Q4_K · Q8_K.
pub(crate) fn dot_q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    dot_k4_row(w, x, BlockQ4K::from_bytes, |b| {
        (b.d, b.dmin, b.unpacked_scales(), k4_levels(&b.qs))
    })
}

/// Q5_K · Q8_K.
pub(crate) fn dot_q5_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    dot_k4_row(w, x, BlockQ5K::from_bytes, |b| {
        (b.d, b.dmin, b.unpacked_scales(), q5k_levels(b))
    })
}

/// Q6_K · Q8_K: `d·y.d · Σ sc·Σ(q − 32)·y`.
pub(crate) fn dot_q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ6K::from_bytes, BlockQ8K::from_bytes) {
        let isum = scaled_isum(&q6k_levels(&bw), &bx.qs, &bw.scales, 16);
        sumf += (bw.d.to_f32() * bx.d) * isum as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_0_known_block() {
        // qh bit j set for odd j; nibble j = j % 16: element j = (j%16 + 16·odd(j) - 16)·d.
        let qh = 0xAAAA_AAAAu32.to_le_bytes();
        let b = BlockQ5_0 {
            d: f16::from_f32(0.5),
            qh,
            qs: std::array::from_fn(|k| k as u8 | ((k as u8) << 4)),
        };
        let mut out = [0f32; 32];
        dequantize_q5_0(&b.to_bytes(), &mut out);
        for (j, v) in out.iter().enumerate() {
            let q = (j % 16) as i32 + if j % 2 == 1 { 16 } else { 0 };
            assert_eq!(*v, (q - 16) as f32 * 0.5, "element {j}");
        }
    }

    #[test]
    fn q6_k_levels_cover_the_layout() {
        // Element e's 6-bit level written through the documented layout reads back.
        let want: [i8; QK_K] = std::array::from_fn(|e| ((e * 37) % 64) as i8 - 32);
        let mut b = BlockQ6K {
            ql: [0; 128],
            qh: [0; 64],
            scales: [1; 16],
            d: f16::ONE,
        };
        for (e, &v) in want.iter().enumerate() {
            let u = (v + 32) as u8;
            let (n, k, l) = (e / 128, (e / 32) % 4, e % 32);
            let at = 64 * n + l + 32 * (k & 1);
            b.ql[at] |= if k < 2 { u & 0xF } else { (u & 0xF) << 4 };
            b.qh[32 * n + l] |= (u >> 4) << (2 * k);
        }
        assert_eq!(q6k_levels(&b), want);
        let mut out = [0f32; QK_K];
        dequantize_q6_k(&b.to_bytes(), &mut out);
        assert!(out.iter().zip(want).all(|(o, w)| *o == f32::from(w)));
    }

    #[test]
    fn q8_k_maps_the_largest_magnitude_to_minus_127() {
        let mut x = [0f32; QK_K];
        x[3] = 2.0; // iscale = -63.5
        x[9] = -1.0; // 63.5 → ties to even: 64
        x[10] = 2f32.powi(-6); // -0.992 → -1
        x[11] = 2f32.powi(-8); // -0.248 → 0
        let mut out = [0u8; BlockQ8K::BYTES];
        quantize_q8_k(&x, &mut out);
        let b = BlockQ8K::from_bytes(&out);
        assert_eq!((b.qs[3], b.qs[9], b.qs[10], b.qs[11]), (-127, 64, -1, 0));
        assert_eq!(b.d, 1.0 / -63.5);
        assert_eq!(b.bsums[0], -127 + 64 - 1);
        assert!(b.bsums[1..].iter().all(|&s| s == 0));
    }
}
