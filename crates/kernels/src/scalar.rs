//! The portable reference implementation of every table kernel.
//!
//! These follow ggml's generic C code: f32 dots accumulate in f64 (`ggml_float`), quantised
//! dots sum exact integers per block and accumulate `d_w * d_x * sumi` in f32. Activation
//! quantisation follows ggml's *x86* path (`127 / amax` as the inverse scale, round half to
//! even), so that the scalar and AVX2 tables produce identical quantised activations and the
//! numbers match what llama.cpp computes on the machines we compare against.

use half::{bf16, f16};

use crate::dispatch::Kernels;
use crate::types::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

/// The scalar table.
pub(crate) static SCALAR: Kernels = Kernels {
    name: "scalar",
    dot_f32,
    dot_f16,
    dot_f32_bytes,
    dot_f16_bytes,
    dot_bf16_bytes,
    axpy_f16,
    f32_to_f16,
    f16_to_f32,
    quantize_q8_0,
    quantize_q8_1,
    dot_q4_0_q8_0,
    dot_q4_1_q8_1,
    dot_q8_0_q8_0,
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q8_0,
    quants: &crate::quants::scalar::SCALAR_QUANTS,
    tiles: &crate::tiles::SCALAR_TILES,
};

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        sum += f64::from(x * y);
    }
    sum as f32
}

fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        sum += f64::from(x.to_f32() * y.to_f32());
    }
    sum as f32
}

fn dot_f32_bytes(w: &[u8], x: &[f32]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(4).zip(x) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        sum += f64::from(v * y);
    }
    sum as f32
}

fn dot_f16_bytes(w: &[u8], x: &[f16]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(2).zip(x) {
        let v = f16::from_le_bytes([c[0], c[1]]).to_f32();
        sum += f64::from(v * y.to_f32());
    }
    sum as f32
}

fn dot_bf16_bytes(w: &[u8], x: &[bf16]) -> f32 {
    let mut sum = 0f64;
    for (c, y) in w.chunks_exact(2).zip(x) {
        let v = bf16::from_le_bytes([c[0], c[1]]).to_f32();
        sum += f64::from(v * y.to_f32());
    }
    sum as f32
}

fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += xi.to_f32() * alpha;
    }
}

fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
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

fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
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

fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
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

/// Iterates the parsed block pairs of a weight row and an activation row.
fn blocks<'a, W: 'a, X: 'a, const WB: usize, const XB: usize>(
    w: &'a [u8],
    x: &'a [u8],
    pw: fn(&[u8; WB]) -> W,
    px: fn(&[u8; XB]) -> X,
) -> impl Iterator<Item = (W, X)> + 'a {
    w.as_chunks::<WB>()
        .0
        .iter()
        .zip(x.as_chunks::<XB>().0)
        .map(move |(a, b)| (pw(a), px(b)))
}

fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
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

fn dot_q4_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
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

fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
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

fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .as_chunks::<{ BlockQ4_0::BYTES }>()
        .0
        .iter()
        .zip(dst.chunks_exact_mut(QK))
    {
        let b = BlockQ4_0::from_bytes(b);
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            out[j] = (i32::from(b.qs[j] & 0x0F) - 8) as f32 * d;
            out[j + QK / 2] = (i32::from(b.qs[j] >> 4) - 8) as f32 * d;
        }
    }
}

fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .as_chunks::<{ BlockQ4_1::BYTES }>()
        .0
        .iter()
        .zip(dst.chunks_exact_mut(QK))
    {
        let b = BlockQ4_1::from_bytes(b);
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        // Fused multiply-add, as the compiled ggml (and our AVX2 twin) computes `n * d + m`.
        for j in 0..QK / 2 {
            out[j] = f32::from(b.qs[j] & 0x0F).mul_add(d, m);
            out[j + QK / 2] = f32::from(b.qs[j] >> 4).mul_add(d, m);
        }
    }
}

fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .as_chunks::<{ BlockQ8_0::BYTES }>()
        .0
        .iter()
        .zip(dst.chunks_exact_mut(QK))
    {
        let b = BlockQ8_0::from_bytes(b);
        let d = b.d.to_f32();
        for (o, q) in out.iter_mut().zip(b.qs) {
            *o = f32::from(q) * d;
        }
    }
}
