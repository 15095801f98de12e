//! CPU numeric kernels for LLM inference, numerically following ggml (llama.cpp)'s CPU path.
//!
//! Quantised block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the K-quants Q2_K … Q6_K) and
//! float weights (F32, F16, BF16), reference quantisers ([`quantize_row`]),
//! dequantisation, dot products, the weight × activation [`matmul`], RMSNorm, RoPE, softmax,
//! SiLU, and a persistent [`ThreadPool`].
//!
//! Every SIMD kernel has a portable scalar twin (the reference). The implementation is
//! chosen once per process from the CPU's features (AVX-512 VNNI, else AVX2+FMA+F16C on
//! x86-64, else scalar), never from compile-time `target-cpu`; [`simd_level`] names the
//! choice.
//!
//! ```
//! use souverain_kernels::{Matrix, ThreadPool, WeightType, matmul};
//!
//! // A 2 x 3 F32 matrix, row-major, as little-endian bytes.
//! let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
//!     .iter()
//!     .flat_map(|v| v.to_le_bytes())
//!     .collect();
//! let w = Matrix::new(WeightType::F32, &w, 2, 3)?;
//! let pool = ThreadPool::new(2);
//! let mut y = [0.0f32; 2];
//! matmul(&pool, &w, &[1.0, 0.0, -1.0], 1, &mut y)?;
//! assert_eq!(y, [-2.0, -2.0]);
//! # Ok::<(), souverain_kernels::KernelError>(())
//! ```

pub use half::{bf16, f16};

mod arch;
mod dispatch;
mod formats;
mod matmul;
mod ops;
mod packed;
mod packed_k;
mod pool;
mod reference;
mod table;
mod types;

#[cfg(test)]
mod tests;

pub use formats::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, QK, QK_K,
};
pub use matmul::{matmul, matmul_many};
pub use ops::{
    Rope, RopeScaling, RopeStyle, add_assign, geglu_tanh, gelu, gelu_tanh, layer_norm, rms_norm,
    silu, softmax, swiglu,
};
pub use packed::{PackedMatrix, matmul_packed, matmul_packed_many};
pub use pool::ThreadPool;
pub use reference::quantize_row;
pub use types::{KernelError, Matrix, WeightType};

use arch::portable;
use types::check_row_bytes;

/// Name of the kernel implementation in use on this CPU: `"avx512vnni"`, `"avx2"` or
/// `"scalar"`.
pub fn simd_level() -> &'static str {
    dispatch::active().name
}

/// Converts one row of `ty` elements (`src`, as stored in GGUF) to f32.
///
/// # Errors
///
/// [`KernelError::NotBlockMultiple`] if `dst.len()` is not a whole number of blocks;
/// [`KernelError::DataSize`] if `src` is not exactly the bytes of `dst.len()` elements.
pub fn dequantize_row(ty: WeightType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_row_bytes("dequantize_row source", ty, dst.len(), src.len())?;
    let k = dispatch::active();
    match ty {
        WeightType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WeightType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WeightType::Q4_0 => (k.dequantize_q4_0)(src, dst),
        WeightType::Q4_1 => (k.dequantize_q4_1)(src, dst),
        WeightType::Q8_0 => (k.dequantize_q8_0)(src, dst),
        WeightType::Q5_0 => portable::dequantize_q5_0(src, dst),
        WeightType::Q5_1 => portable::dequantize_q5_1(src, dst),
        WeightType::Q2_K => portable::dequantize_q2_k(src, dst),
        WeightType::Q3_K => portable::dequantize_q3_k(src, dst),
        WeightType::Q4_K => portable::dequantize_q4_k(src, dst),
        WeightType::Q5_K => portable::dequantize_q5_k(src, dst),
        WeightType::Q6_K => portable::dequantize_q6_k(src, dst),
    }
    Ok(())
}

/// Reference dot product of a weight row with f32 activations: dequantise the row, then
/// an f64-accumulated f32 dot. No activation quantisation, so it is the "true" value the
/// fast path in [`matmul`] approximates (for tests and diagnostics; it allocates).
///
/// # Errors
///
/// As [`dequantize_row`] with `x.len()` elements.
pub fn vec_dot_f32_reference(ty: WeightType, row: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, row, &mut w)?;
    let sum: f64 = w
        .iter()
        .zip(x)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    Ok(sum as f32)
}

/// `Σ a[i]*b[i]` (ggml `ggml_vec_dot_f32` numerics).
///
/// # Panics
///
/// If the lengths differ.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths");
    (dispatch::active().dot_f32)(a, b)
}

/// `Σ a[i]*b[i]` over f16 (attention Q·K with an f16 KV cache; ggml `ggml_vec_dot_f16`).
///
/// # Panics
///
/// If the lengths differ.
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: lengths");
    (dispatch::active().dot_f16)(a, b)
}

/// `y += alpha * x` (attention weights × V with an f16 cache).
///
/// # Panics
///
/// If the lengths differ.
pub fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
    assert_eq!(y.len(), x.len(), "axpy_f16: lengths");
    (dispatch::active().axpy_f16)(y, alpha, x);
}

/// Attention scores of one query over a run of keys `stride` elements apart (one KV
/// block's slots of one KV head): `out[j] = Σ_i q[i] * keys[j * stride + i]`, `i <
/// q.len()`.
///
/// # Panics
///
/// If `keys` does not hold `out.len()` such rows.
pub fn dot_f16_rows(q: &[f16], keys: &[f16], stride: usize, out: &mut [f32]) {
    let fit = portable::rows_that_fit(keys.len(), q.len(), stride, out.len());
    assert_eq!(fit, out.len(), "dot_f16_rows: keys hold {fit} rows");
    (dispatch::active().dot_f16_rows)(q, keys, stride, out);
}

/// [`dot_f16_rows`] for several queries at once (the query heads of one KV head: `q` holds
/// `q.len() / hd` queries of `hd` elements), each key loaded once for all of them:
/// `out[g * out_stride + j]` is query `g`'s score of key `j < n`, bit-identical to
/// [`dot_f16_rows`] of that query alone.
///
/// # Panics
///
/// If `hd` is 0 or does not divide `q.len()`, `keys` does not hold `n` rows, `out_stride`
/// is below `n`, or `out` does not hold every query's `n` scores.
pub fn dot_f16_rows_group(
    q: &[f16],
    hd: usize,
    keys: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        hd > 0 && q.len().is_multiple_of(hd),
        "dot_f16_rows_group: query size"
    );
    let fit = portable::rows_that_fit(keys.len(), hd, stride, n);
    assert_eq!(fit, n, "dot_f16_rows_group: keys hold {fit} rows");
    let g = q.len() / hd;
    assert!(
        out_stride >= n && (g == 0 || (g - 1) * out_stride + n <= out.len()),
        "dot_f16_rows_group: out holds fewer than {g} x {n} scores"
    );
    (dispatch::active().dot_f16_rows_group)(q, hd, keys, stride, n, out, out_stride);
}

/// [`axpy_f16_rows`] into several output rows at once (one per query head of a KV head:
/// `y` holds `y.len() / hd` rows of `hd`), row `g` weighted by `w[g * w_stride..][..n]`,
/// each value loaded once for all of them; every row bit-identical to [`axpy_f16_rows`].
///
/// # Panics
///
/// If `hd` is 0 or does not divide `y.len()`, `values` does not hold `n` rows, `w_stride`
/// is below `n`, or `w` does not hold every row's `n` weights.
pub fn axpy_f16_rows_group(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    values: &[f16],
    stride: usize,
) {
    assert!(
        hd > 0 && y.len().is_multiple_of(hd),
        "axpy_f16_rows_group: row size"
    );
    let fit = portable::rows_that_fit(values.len(), hd, stride, n);
    assert_eq!(fit, n, "axpy_f16_rows_group: values hold {fit} rows");
    let g = y.len() / hd;
    assert!(
        w_stride >= n && (g == 0 || (g - 1) * w_stride + n <= w.len()),
        "axpy_f16_rows_group: w holds fewer than {g} x {n} weights"
    );
    (dispatch::active().axpy_f16_rows_group)(y, hd, w, w_stride, n, values, stride);
}

/// A run of values `stride` elements apart, weighted into `y`: `y[i] += Σ_j w[j] *
/// values[j * stride + i]`, `i < y.len()`, each `y[i]` accumulated over `j` in order.
///
/// # Panics
///
/// If `values` does not hold `w.len()` such rows.
pub fn axpy_f16_rows(y: &mut [f32], w: &[f32], values: &[f16], stride: usize) {
    let fit = portable::rows_that_fit(values.len(), y.len(), stride, w.len());
    assert_eq!(fit, w.len(), "axpy_f16_rows: values hold {fit} rows");
    (dispatch::active().axpy_f16_rows)(y, w, values, stride);
}

/// A query quantised for scores over a Q8_0 cache, as ggml quantises the activations of a
/// Q8_0 product (its vec_dot type): 32 signed bytes and a scale per block. Quantise once per
/// query and head ([`Q8Query::set`]), then score any number of key runs with it.
#[derive(Clone, Debug, Default)]
pub struct Q8Query {
    qs: Vec<i8>,
    ds: Vec<f32>,
}

impl Q8Query {
    /// Quantises `q` (its whole 32-element blocks) in place of the previous query.
    pub fn set(&mut self, q: &[f32]) {
        let nb = q.len() / QK;
        self.qs.resize(nb * QK, 0);
        self.ds.resize(nb, 0.0);
        let quantize = dispatch::active().quantize_q8_0;
        let mut block = [0u8; BlockQ8_0::BYTES];
        for ((xb, qb), d) in q
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .zip(self.ds.iter_mut())
        {
            quantize(xb, &mut block);
            *d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            for (o, &b) in qb.iter_mut().zip(&block[2..]) {
                *o = b as i8;
            }
        }
    }

    /// Elements quantised.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether no element is.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }

    /// The quantised query's values, `d·q` (tests compare scores against exact dots of
    /// these).
    pub fn values(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK)
            .zip(&self.ds)
            .flat_map(|(b, &d)| b.iter().map(move |&v| d * f32::from(v)))
            .collect()
    }
}

/// Attention scores of a quantised query over a run of keys in a Q8_0 cache (i8 `keys`,
/// one f16 scale per 32 of them in `scales`, rows `stride` elements apart; `keys` and
/// `scales` start at the run's first element and block), as ggml's `vec_dot_q8_0_q8_0`:
/// `out[j] = Σ_b dq_b·d_jb·Σ_i qq[32b+i]·k[j·stride+32b+i]`, the integer sums exact; every
/// level gives the same bits.
///
/// # Panics
///
/// If `stride` is not a multiple of 32, or the slices do not hold `out.len()` rows.
pub fn dot_q8_0_rows(q: &Q8Query, keys: &[i8], scales: &[f16], stride: usize, out: &mut [f32]) {
    check_q8_rows("dot_q8_0_rows", q.len(), keys, scales, stride, out.len());
    (dispatch::active().dot_q8_0_rows)(&q.qs, &q.ds, keys, scales, stride, out);
}

/// A run of Q8_0 values weighted into `y` (as [`axpy_f16_rows`], the values' blocks scaled
/// by their f16 scales): `y[i] += Σ_j w[j]·d_j(i)·v[j·stride + i]`.
///
/// # Panics
///
/// As [`dot_q8_0_rows`], with `y.len()` for `q.len()` and `w.len()` rows.
pub fn axpy_q8_0_rows(y: &mut [f32], w: &[f32], values: &[i8], scales: &[f16], stride: usize) {
    check_q8_rows("axpy_q8_0_rows", y.len(), values, scales, stride, w.len());
    (dispatch::active().axpy_q8_0_rows)(y, w, values, scales, stride);
}

fn check_q8_rows(what: &str, n: usize, v: &[i8], d: &[f16], stride: usize, rows: usize) {
    assert!(
        n.is_multiple_of(QK) && stride.is_multiple_of(QK),
        "{what}: {n} elements, stride {stride}: not multiples of 32"
    );
    let fit = portable::q8_rows_that_fit(v.len(), d.len(), n, stride, rows);
    assert_eq!(fit, rows, "{what}: the cache holds {fit} rows");
}

/// The softmax's exponentials in place, `x[i] = exp(x[i] - sub)`, and their sum: the same
/// value for each element on every instruction set (a polynomial with fused multiply-adds,
/// within a few ulps of `f32::exp`; below `-87.33` and NaN give 0), summed in an order that
/// depends on the instruction set.
pub fn exp_sum(x: &mut [f32], sub: f32) -> f32 {
    (dispatch::active().exp_sum)(x, sub)
}

/// f32 → f16, rounding to nearest even.
///
/// # Panics
///
/// If the lengths differ.
pub fn f32_to_f16_slice(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16_slice: lengths");
    (dispatch::active().f32_to_f16)(src, dst);
}

/// f16 → f32 (exact).
///
/// # Panics
///
/// If the lengths differ.
pub fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: lengths");
    (dispatch::active().f16_to_f32)(src, dst);
}
