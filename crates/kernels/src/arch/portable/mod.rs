//! The portable reference implementation of every table kernel (`SCALAR`): float dots and
//! conversions, activation quantisation, the 32-element formats here, Q5 and the K-quants in
//! [`kquants`], the tiles as one dot per pair, and the scalar twin of the packed kernel.
//!
//! These follow ggml's generic C code: f32 dots accumulate in f64 (`ggml_float`), quantised
//! dots sum exact integers per block and accumulate `d_w * d_x * sumi` in f32. Activation
//! quantisation follows ggml's *x86* path (`127 / amax` as the inverse scale, round half to
//! even), so that the scalar and AVX2 tables produce identical quantised activations and the
//! numbers match what llama.cpp computes on the machines we compare against.

use half::{bf16, f16};

use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK, blocks, dequant_blocks};
use crate::formats::{CELL, CELL8, GROUP, Q8_M, XQ, vecs_at};
use crate::table::{Kernels, common_blocks, kernel_table};

pub(crate) mod kpacked;
pub(crate) mod kquants;

pub(crate) use kquants::{
    dequantize_q2_k, dequantize_q3_k, dequantize_q4_k, dequantize_q5_0, dequantize_q5_1,
    dequantize_q5_k, dequantize_q6_k, quantize_q8_k,
};

/// The scalar table.
pub(crate) static SCALAR: Kernels = kernel_table! {
    name: "scalar",
    base: crate::arch::portable,
    quants: crate::arch::portable::kquants,
    tiles: crate::arch::portable,
    quantize_q8_k: quantize_q8_k,
    packed: None,
    kpacked: None,
};

pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        sum += f64::from(x * y);
    }
    sum as f32
}

pub(crate) fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        sum += f64::from(x.to_f32() * y.to_f32());
    }
    sum as f32
}

pub(crate) fn dot_f32_bytes(w: &[u8], x: &[f32]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(4).zip(x) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        sum += f64::from(v * y);
    }
    sum as f32
}

pub(crate) fn dot_f16_bytes(w: &[u8], x: &[f16]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(2).zip(x) {
        let v = f16::from_le_bytes([c[0], c[1]]).to_f32();
        sum += f64::from(v * y.to_f32());
    }
    sum as f32
}

/// The scalar twin of the tokens kernel: [`dot_f16_bytes`] per token (the activations are
/// f16 values already, so the same products and sums).
pub(crate) fn dot_f16_bytes_tokens(w: &[u8], x: &[f32], stride: usize, out: &mut [f32]) {
    let n = (w.len() / 2).min(stride);
    for (t, o) in out.iter_mut().enumerate() {
        let xt = x
            .get(t * stride..)
            .map_or(&[][..], |x| &x[..n.min(x.len())]);
        let mut sum = 0f64;
        for (c, &y) in w.chunks_exact(2).zip(xt) {
            sum += f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32() * y);
        }
        *o = sum as f32;
    }
}

pub(crate) fn dot_bf16_bytes(w: &[u8], x: &[bf16]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(2).zip(x) {
        let v = bf16::from_le_bytes([c[0], c[1]]).to_f32();
        sum += f64::from(v * y.to_f32());
    }
    sum as f32
}

pub(crate) fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += xi.to_f32() * alpha;
    }
}

/// Row `j` of a strided run: `hd` elements from `j * stride`, or `None` past the end.
fn strided_row<T>(x: &[T], j: usize, stride: usize, hd: usize) -> Option<&[T]> {
    let start = j.checked_mul(stride)?;
    x.get(start..start.checked_add(hd)?)
}

/// How many of the first `want` rows of `hd` elements, `stride` apart, lie within `len`
/// elements (the contract of the strided attention kernels).
pub(crate) fn rows_that_fit(len: usize, hd: usize, stride: usize, want: usize) -> usize {
    if len < hd {
        return 0;
    }
    // A stride of 0 reads the same row every time.
    ((len - hd).checked_div(stride)).map_or(want, |n| want.min(n + 1))
}

pub(crate) fn dot_f16_rows(q: &[f16], k: &[f16], stride: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let Some(row) = strided_row(k, j, stride, q.len()) else {
            return;
        };
        *o = dot_f16(q, row);
    }
}

pub(crate) fn dot_f16_rows_group(
    q: &[f16],
    hd: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    dot_rows_group_by(dot_f16_rows, q, hd, k, stride, n, out, out_stride);
}

pub(crate) fn axpy_f16_rows_group(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: &[f16],
    stride: usize,
) {
    axpy_rows_group_by(axpy_f16_rows, y, hd, w, w_stride, n, v, stride);
}

/// A table's `dot_f16_rows_group` as one `dot` (its `dot_f16_rows`) per query: the queries
/// of `hd` elements in `q` whose `n` outputs `out` holds (`out_stride` apart).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows_group_by(
    dot: crate::table::DotRowsFn,
    q: &[f16],
    hd: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(k.len(), hd, stride, n);
    for g in 0..pieces_that_fit(q.len() / hd, out_stride, n, out.len()) {
        dot(
            &q[g * hd..][..hd],
            k,
            stride,
            &mut out[g * out_stride..][..n],
        );
    }
}

/// How many of the first `count` pieces of `n` elements, `stride` apart, lie within `len`
/// elements (the queries or rows of the group kernels whose outputs or weights a slice
/// holds).
pub(crate) fn pieces_that_fit(count: usize, stride: usize, n: usize, len: usize) -> usize {
    (0..count)
        .take_while(|&g| {
            g.checked_mul(stride)
                .and_then(|at| at.checked_add(n))
                .is_some_and(|end| end <= len)
        })
        .count()
}

/// A table's `axpy_f16_rows_group` as one `axpy` (its `axpy_f16_rows`) per output row of
/// `hd` in `y`, with weights `w[g * w_stride..][..n]` (the rows whose weights `w` holds).
#[allow(clippy::too_many_arguments)]
pub(crate) fn axpy_rows_group_by(
    axpy: crate::table::AxpyRowsFn,
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: &[f16],
    stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(v.len(), hd, stride, n);
    for g in 0..pieces_that_fit(y.len() / hd, w_stride, n, w.len()) {
        axpy(&mut y[g * hd..][..hd], &w[g * w_stride..][..n], v, stride);
    }
}

pub(crate) fn axpy_f16_rows(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    for (j, &a) in w.iter().enumerate() {
        let Some(row) = strided_row(v, j, stride, y.len()) else {
            return;
        };
        axpy_f16(y, a, row);
    }
}

/// [`rows_that_fit`] for a Q8_0 run: how many of the first `want` rows of `n` values (a
/// multiple of 32), `stride` apart, both `v_len` values and `d_len` scales hold (row `j`'s
/// scales end where its values end, divided by 32).
pub(crate) fn q8_rows_that_fit(
    v_len: usize,
    d_len: usize,
    n: usize,
    stride: usize,
    want: usize,
) -> usize {
    rows_that_fit(v_len.min(d_len.saturating_mul(QK)), n, stride, want)
}

/// Row `j` of a Q8_0 run: its `n` values and their `n / 32` scales, if both slices hold them
/// (`stride` a multiple of 32).
pub(crate) fn q8_row<'a>(
    v: &'a [i8],
    d: &'a [f16],
    j: usize,
    stride: usize,
    n: usize,
) -> Option<(&'a [i8], &'a [f16])> {
    let base = j.checked_mul(stride)?;
    let vals = v.get(base..base.checked_add(n)?)?;
    let scales = d.get(base / QK..base / QK + n / QK)?;
    Some((vals, scales))
}

/// Scores over Q8_0 keys as ggml's `vec_dot_q8_0_q8_0` computes them, for a query already
/// quantised to Q8_0 (`qs`, scales `dq`): per block an exact integer sum,
/// `s = fma(d_q·d_k, isum, s)` block after block.
pub(crate) fn dot_q8_0_rows(
    qs: &[i8],
    dq: &[f32],
    k: &[i8],
    d: &[f16],
    stride: usize,
    out: &mut [f32],
) {
    let n = (qs.len() / QK).min(dq.len()) * QK;
    for (j, o) in out.iter_mut().enumerate() {
        let Some((row, scales)) = q8_row(k, d, j, stride, n) else {
            return;
        };
        let mut s = 0f32;
        let blocks = qs.chunks_exact(QK).zip(row.chunks_exact(QK));
        for ((qb, kb), (&sk, &sq)) in blocks.zip(scales.iter().zip(dq)) {
            let isum: i32 = qb
                .iter()
                .zip(kb)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            s = (sq * sk.to_f32()).mul_add(isum as f32, s);
        }
        *o = s;
    }
}

pub(crate) fn axpy_q8_0_rows(y: &mut [f32], w: &[f32], v: &[i8], d: &[f16], stride: usize) {
    let n = y.len() / QK * QK;
    for (j, &a) in w.iter().enumerate() {
        let Some((row, scales)) = q8_row(v, d, j, stride, n) else {
            return;
        };
        for ((yb, vb), &sc) in y.chunks_exact_mut(QK).zip(row.chunks_exact(QK)).zip(scales) {
            let c = a * sc.to_f32();
            for (y, &v) in yb.iter_mut().zip(vb) {
                *y = c.mul_add(f32::from(v), *y);
            }
        }
    }
}

/// Inputs below this give 0 (`exp` of it is the smallest normal f32, `2^-126`).
pub(crate) const EXP_LO: f32 = -87.336_54;
/// Inputs above this are taken as this (so that `2^n` stays finite).
pub(crate) const EXP_HI: f32 = 88.0;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two, the first part exact in few bits (Cephes' `C1`, `C2`).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' minimax polynomial for `(exp(r) - 1 - r) / r²` on `|r| ≤ ln 2 / 2`, highest
/// power first.
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
];

/// `exp(x)` in f32 as every SIMD table computes it, lane by lane: `x = n ln 2 + r` with `n =
/// floor(x log2 e + 1/2)`, `exp(r) = 1 + r + r² p(r)`, times `2^n` built in the exponent
/// bits. Relative error within a few ulps; below [`EXP_LO`] (and NaN) 0, above [`EXP_HI`]
/// `exp(EXP_HI)`.
pub(crate) fn exp_poly(x: f32) -> f32 {
    // Negated so that NaN (no ordering) takes this branch, as the SIMD mask does.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(x >= EXP_LO) {
        return 0.0;
    }
    let x = x.min(EXP_HI);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // n is an integer in [-126, 127]: 2^n is a normal f32.
    let pow2n = f32::from_bits((((n as i32) + 127) as u32) << 23);
    y * pow2n
}

pub(crate) fn exp_sum(x: &mut [f32], sub: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp_poly(*v - sub);
        sum += *v;
    }
    sum
}

pub(crate) fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

pub(crate) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Scale, inverse scale and the quantised values of one 32-element block, as ggml's x86
/// `quantize_row_q8_0`/`q8_1` compute them.
fn quantize_block(x: &[f32]) -> (f32, [i8; QK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    // |x * id| <= 127 (+ rounding), so the saturating cast never clips a finite value.
    let qs = std::array::from_fn(|j| (x[j] * id).round_ties_even() as i8);
    (d, qs)
}

pub(crate) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .chunks_exact(QK)
        .zip(out.chunks_exact_mut(BlockQ8_0::BYTES))
    {
        let (d, qs) = quantize_block(xb);
        let block = BlockQ8_0 {
            d: f16::from_f32(d),
            qs,
        };
        ob.copy_from_slice(&block.to_bytes());
    }
}

pub(crate) fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .chunks_exact(QK)
        .zip(out.chunks_exact_mut(BlockQ8_1::BYTES))
    {
        let (d, qs) = quantize_block(xb);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        let block = BlockQ8_1 {
            d: f16::from_f32(d),
            s: f16::from_f32(d * sum as f32),
            qs,
        };
        ob.copy_from_slice(&block.to_bytes());
    }
}

pub(crate) fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ4_0::from_bytes, BlockQ8_0::from_bytes) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = i32::from(bw.qs[j] & 0x0F) - 8;
            let hi = i32::from(bw.qs[j] >> 4) - 8;
            sumi += lo * i32::from(bx.qs[j]) + hi * i32::from(bx.qs[j + QK / 2]);
        }
        sumf += sumi as f32 * bw.d.to_f32() * bx.d.to_f32();
    }
    sumf
}

pub(crate) fn dot_q4_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ4_1::from_bytes, BlockQ8_1::from_bytes) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = i32::from(bw.qs[j] & 0x0F);
            let hi = i32::from(bw.qs[j] >> 4);
            sumi += lo * i32::from(bx.qs[j]) + hi * i32::from(bx.qs[j + QK / 2]);
        }
        sumf += (bw.d.to_f32() * bx.d.to_f32()) * sumi as f32 + bw.m.to_f32() * bx.s.to_f32();
    }
    sumf
}

pub(crate) fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (bw, bx) in blocks(w, x, BlockQ8_0::from_bytes, BlockQ8_0::from_bytes) {
        let sumi: i32 = bw
            .qs
            .iter()
            .zip(bx.qs)
            .map(|(&a, b)| i32::from(a) * i32::from(b))
            .sum();
        sumf += sumi as f32 * (bw.d.to_f32() * bx.d.to_f32());
    }
    sumf
}

pub(crate) fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK, BlockQ4_0::from_bytes) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            out[j] = (i32::from(b.qs[j] & 0x0F) - 8) as f32 * d;
            out[j + QK / 2] = (i32::from(b.qs[j] >> 4) - 8) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK, BlockQ4_1::from_bytes) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        // Fused multiply-add, as the compiled ggml (and our AVX2 twin) computes `n * d + m`.
        for j in 0..QK / 2 {
            out[j] = f32::from(b.qs[j] & 0x0F).mul_add(d, m);
            out[j + QK / 2] = f32::from(b.qs[j] >> 4).mul_add(d, m);
        }
    }
}

pub(crate) fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, out) in dequant_blocks(src, dst, QK, BlockQ8_0::from_bytes) {
        let d = b.d.to_f32();
        for (o, q) in out.iter_mut().zip(b.qs) {
            *o = f32::from(q) * d;
        }
    }
}

/// The scalar tile for Q4_0 weights: each pair through [`dot_q4_0_q8_0`].
pub(crate) fn tile_q4_0_q8_0(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    let b = (BlockQ4_0::BYTES, BlockQ8_0::BYTES);
    pairs(dot_q4_0_q8_0, b, w, x, out);
}

/// The scalar tile for Q4_1 weights: each pair through [`dot_q4_1_q8_1`].
pub(crate) fn tile_q4_1_q8_1(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    let b = (BlockQ4_1::BYTES, BlockQ8_1::BYTES);
    pairs(dot_q4_1_q8_1, b, w, x, out);
}

/// The scalar tile for Q8_0 weights: each pair through [`dot_q8_0_q8_0`].
pub(crate) fn tile_q8_0_q8_0(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    let b = (BlockQ8_0::BYTES, BlockQ8_0::BYTES);
    pairs(dot_q8_0_q8_0, b, w, x, out);
}

/// Fills a tile pair by pair with `dot`, over the blocks common to all rows.
fn pairs(
    dot: fn(&[u8], &[u8]) -> f32,
    bytes: (usize, usize),
    w: &[&[u8]],
    x: &[&[u8]],
    out: &mut [f32],
) {
    let nr = w.len();
    if nr == 0 {
        return;
    }
    let nb = common_blocks(w, x, bytes);
    for (xt, o) in x.iter().zip(out.chunks_exact_mut(nr)) {
        for (wr, v) in w.iter().zip(o.iter_mut()) {
            *v = dot(&wr[..nb * bytes.0], &xt[..nb * bytes.1]);
        }
    }
}

/// The scalar twin of the packed kernel (the packed layout: `crate::formats`): each lane as
/// the SIMD kernel computes it, so the results are bit-identical.
pub(crate) fn packed_group(
    cells: &[u8],
    qs: &[i8],
    ds: &[[f32; 2]],
    nb: usize,
    nt: usize,
    bytes: bool,
    vals: &mut [[f32; GROUP]; 8],
) {
    let cell_len = if bytes { CELL8 } else { CELL };
    for t in 0..nt {
        let mut acc = [0f32; GROUP];
        let mut acc_m = [0f32; GROUP];
        for b in 0..nb {
            let cell = &cells[b * cell_len..(b + 1) * cell_len];
            let xq = &qs[(t * nb + b) * XQ..][..XQ];
            let [dx, sx] = ds[t * nb + b];
            for (lane, (a, am)) in acc.iter_mut().zip(acc_m.iter_mut()).enumerate() {
                let dw = f16::from_le_bytes([cell[2 * lane], cell[2 * lane + 1]]).to_f32();
                let mw = if bytes {
                    Q8_M * dw
                } else {
                    f16::from_le_bytes([cell[32 + 2 * lane], cell[33 + 2 * lane]]).to_f32()
                };
                let at = vecs_at(bytes);
                let mut isum = 0i32;
                if bytes {
                    for (e, &x) in xq.iter().enumerate() {
                        let byte = cell[at + 64 * (e / 4) + 4 * lane + e % 4];
                        isum += i32::from(byte) * i32::from(x);
                    }
                } else {
                    for j in 0..4 {
                        for k in 0..4 {
                            let byte = cell[at + 64 * j + 4 * lane + k];
                            isum += i32::from(byte & 0x0F) * i32::from(xq[4 * j + k]);
                            isum += i32::from(byte >> 4) * i32::from(xq[4 * j + 16 + k]);
                        }
                    }
                }
                let d = dw * dx;
                *a = d.mul_add(isum as f32, *a);
                *am = mw.mul_add(sx, *am);
            }
        }
        for (v, (a, m)) in vals[t].iter_mut().zip(acc.iter().zip(&acc_m)) {
            *v = a + m;
        }
    }
}
