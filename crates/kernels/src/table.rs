//! The table of kernel implementations: the function types, `Kernels` (one flat table of
//! plain safe function pointers per instruction set, built by `kernel_table!` in each
//! instruction set's module) and what the tiles share. The dispatcher chooses one table.
//!
//! Contract for every entry: lengths are *not* checked against each other. Each kernel
//! processes the largest whole prefix every argument can supply (e.g. `min(a.len(),
//! b.len())` elements, or as many whole blocks as both byte slices hold) and never reads or
//! writes outside its slices. The public API checks lengths before calling in.

use half::{bf16, f16};

use crate::types::WeightType;

/// A weight row · quantised activation row dot product.
pub(crate) type DotFn = fn(&[u8], &[u8]) -> f32;

/// `(q, keys, stride, out)`: see [`Kernels::dot_f16_rows`]. Rows that do not fit in `keys`
/// are left unwritten.
pub(crate) type DotRowsFn = fn(&[f16], &[f16], usize, &mut [f32]);

/// `(y, w, values, stride)`: see [`Kernels::axpy_f16_rows`]. Rows that do not fit in
/// `values` are skipped.
pub(crate) type AxpyRowsFn = fn(&mut [f32], &[f32], &[f16], usize);

/// `(q, hd, keys, stride, n, out, out_stride)`: see [`Kernels::dot_f16_rows_group`].
pub(crate) type DotRowsGroupFn = fn(&[f16], usize, &[f16], usize, usize, &mut [f32], usize);

/// `(y, hd, w, w_stride, n, values, stride)`: see [`Kernels::axpy_f16_rows_group`].
pub(crate) type AxpyRowsGroupFn = fn(&mut [f32], usize, &[f32], usize, usize, &[f16], usize);

/// `(query bytes, query scales, keys, scales, stride, out)`: see [`Kernels::dot_q8_0_rows`].
pub(crate) type DotQ8RowsFn = fn(&[i8], &[f32], &[i8], &[f16], usize, &mut [f32]);

/// `(y, w, values, scales, stride)`: see [`Kernels::axpy_q8_0_rows`].
pub(crate) type AxpyQ8RowsFn = fn(&mut [f32], &[f32], &[i8], &[f16], usize);

/// Quantises one row of f32 activations into blocks.
pub(crate) type QuantizeFn = fn(&[f32], &mut [u8]);

/// One F16 weight row (little-endian bytes) against `out.len()` tokens: `(w, x, stride, out)`
/// with token `t`'s activations at `x[t * stride..]`, f32 values that f16 holds exactly
/// (activations rounded to f16, widened once per call).
pub(crate) type DotF16TokensFn = fn(&[u8], &[f32], usize, &mut [f32]);

/// Tokens a `dot_f16_bytes_tokens` kernel works on at once (the AVX2 kernel's: three
/// tokens' four accumulators and one widened weight vector fit sixteen registers); callers
/// hand it this many at a time.
pub(crate) const F16_TOKENS: usize = 3;

/// A tile of quantised dot products, the inner loop of the row-wise matmul for Q4_0, Q4_1 and
/// Q8_0: `out[t * w.len() + r] = dot(w[r], x[t])` for every weight row `w[r]` and
/// activation row `x[t]` of one block format pair. Block counts are the fewest whole blocks
/// any row holds ([`common_blocks`]); if `out` is shorter than `w.len() * x.len()`, only the
/// tokens that fit are computed.
///
/// Why tiles: a matrix-vector product streams each weight block from memory once and uses
/// it once, so its cost is unpacking plus one integer dot per block. For a batch of tokens (a
/// prompt), a tile unpacks each weight block (nibbles to bytes, scale to f32) once and meets
/// it with several tokens while it is in registers; each activation block likewise meets
/// several rows. Every implementation keeps one accumulator per (row, token) pair, so each
/// pair's result is bit-identical to the same table's single dot product, whatever the tile
/// shape: results do not depend on how rows and tokens are grouped (or on the thread count).
pub(crate) type TileFn = fn(&[&[u8]], &[&[u8]], &mut [f32]);

/// One group of 16 packed rows against `nt` (≤ 8) tokens, the body of
/// the packed matmul: `(cells, qs, ds, nb, nt, bytes, vals)` in the packed layout of
/// `crate::formats`.
pub(crate) type PackedFn = fn(&[u8], &[i8], &[[f32; 2]], usize, usize, bool, &mut [[f32; 16]; 8]);

/// One group of 16 rows of a K-layout packed matrix (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) against
/// `nt` (≤ 8) tokens: `(layout, cells, qs, d, sums, nsb, nt, vals)`, see
/// the portable `kpacked_group` (the scalar twin).
pub(crate) type KPackedFn =
    fn(&crate::formats::KLayout, &[u8], &[i8], &[f32], &[i16], usize, usize, &mut [[f32; 16]; 8]);

/// One implementation of every kernel that has SIMD variants.
pub(crate) struct Kernels {
    /// Name for logs: "scalar", "avx2", "avx512vnni".
    pub(crate) name: &'static str,
    /// `Σ a[i]*b[i]`, ggml `ggml_vec_dot_f32` numerics.
    pub(crate) dot_f32: fn(&[f32], &[f32]) -> f32,
    /// `Σ a[i]*b[i]` over f16, ggml `ggml_vec_dot_f16` numerics.
    pub(crate) dot_f16: fn(&[f16], &[f16]) -> f32,
    /// F32 weight row (little-endian bytes) · f32 activations.
    pub(crate) dot_f32_bytes: fn(&[u8], &[f32]) -> f32,
    /// F16 weight row (little-endian bytes) · f16 activations.
    pub(crate) dot_f16_bytes: fn(&[u8], &[f16]) -> f32,
    /// `dot_f16_bytes` of one weight row with several tokens (prompt chunks, verified
    /// drafts): each weight vector is widened once for all of them. `out[t]` is bit-identical
    /// to this table's `dot_f16_bytes` of the row with token `t` (rounded to f16), so a
    /// token's output does not depend on the tokens computed with it.
    pub(crate) dot_f16_bytes_tokens: DotF16TokensFn,
    /// BF16 weight row (little-endian bytes) · bf16 activations, `ggml_vec_dot_bf16`.
    pub(crate) dot_bf16_bytes: fn(&[u8], &[bf16]) -> f32,
    /// `y[i] += alpha * x[i]`.
    pub(crate) axpy_f16: fn(&mut [f32], f32, &[f16]),
    /// Attention scores of one query over a run of keys: `out[j] = Σ q[i] * k[j*stride + i]`
    /// for `i < q.len()` (the run's keys are `stride` apart: one KV block's slots).
    pub(crate) dot_f16_rows: DotRowsFn,
    /// Attention weights × a run of values: `y[i] += Σ_j w[j] * v[j*stride + i]` for
    /// `i < y.len()`, each `y[i]` accumulated over `j` in order.
    pub(crate) axpy_f16_rows: AxpyRowsFn,
    /// `dot_f16_rows` for the `q.len() / hd` queries of one KV head's group at once (each
    /// key loaded once for all of them): `out[g * out_stride + j]` for `j < n`, each
    /// bit-identical to the table's `dot_f16_rows` of query `g` alone. `n` is first cut to
    /// the rows `keys` holds; then only the first queries whose `n` outputs `out` holds are
    /// scored (the rest are left out).
    pub(crate) dot_f16_rows_group: DotRowsGroupFn,
    /// `axpy_f16_rows` into the `y.len() / hd` output rows of one KV head's group at once
    /// (each value loaded once for all of them), row `g` weighted by
    /// `w[g * w_stride..][..n]`: each row bit-identical to the table's `axpy_f16_rows`. `n`
    /// is first cut to the rows `values` holds; then only the first output rows whose `n`
    /// weights `w` holds are computed.
    pub(crate) axpy_f16_rows_group: AxpyRowsGroupFn,
    /// Attention scores of one query quantised to Q8_0 over a run of Q8_0 keys (i8 values
    /// and one f16 scale per 32, rows `stride` elements apart).
    pub(crate) dot_q8_0_rows: DotQ8RowsFn,
    /// Weights × a run of Q8_0 values (`(y, w, values, scales, stride)`), as
    /// `axpy_f16_rows`.
    pub(crate) axpy_q8_0_rows: AxpyQ8RowsFn,
    /// The softmax's exponentials: `x[i] = exp(x[i] - sub)`, returning their sum. Every
    /// table computes each exponential with the same operations (the portable `exp_poly`:
    /// Cephes' polynomial, fused multiply-adds), so the values are bit-identical across
    /// tables; only the sum's order differs.
    pub(crate) exp_sum: fn(&mut [f32], f32) -> f32,
    /// Round-to-nearest-even f32 → f16.
    pub(crate) f32_to_f16: fn(&[f32], &mut [f16]),
    /// Exact f16 → f32.
    pub(crate) f16_to_f32: fn(&[f16], &mut [f32]),
    /// Quantise f32 activations to Q8_0 blocks (x86 ggml `quantize_row_q8_0` numerics).
    pub(crate) quantize_q8_0: QuantizeFn,
    /// Quantise f32 activations to Q8_1 blocks (x86 ggml `quantize_row_q8_1` numerics).
    pub(crate) quantize_q8_1: QuantizeFn,
    /// Quantise f32 activations to Q8_K blocks (ggml `quantize_row_q8_K`).
    pub(crate) quantize_q8_k: QuantizeFn,
    /// Q4_0 weight row · Q8_0 activations. The matmul reaches these three through the
    /// tiles; the tests check each tile against its own table's single dot.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) dot_q4_0_q8_0: DotFn,
    /// Q4_1 weight row · Q8_1 activations.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) dot_q4_1_q8_1: DotFn,
    /// Q8_0 weight row · Q8_0 activations.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) dot_q8_0_q8_0: DotFn,
    /// Q5_0 weight row · Q8_0 activations.
    pub(crate) dot_q5_0_q8_0: DotFn,
    /// Q5_1 weight row · Q8_1 activations.
    pub(crate) dot_q5_1_q8_1: DotFn,
    /// Q2_K weight row · Q8_K activations.
    pub(crate) dot_q2_k_q8_k: DotFn,
    /// Q3_K weight row · Q8_K activations.
    pub(crate) dot_q3_k_q8_k: DotFn,
    /// Q4_K weight row · Q8_K activations.
    pub(crate) dot_q4_k_q8_k: DotFn,
    /// Q5_K weight row · Q8_K activations.
    pub(crate) dot_q5_k_q8_k: DotFn,
    /// Q6_K weight row · Q8_K activations.
    pub(crate) dot_q6_k_q8_k: DotFn,
    /// Q4_0 blocks → f32.
    pub(crate) dequantize_q4_0: fn(&[u8], &mut [f32]),
    /// Q4_1 blocks → f32.
    pub(crate) dequantize_q4_1: fn(&[u8], &mut [f32]),
    /// Q8_0 blocks → f32.
    pub(crate) dequantize_q8_0: fn(&[u8], &mut [f32]),
    /// Tiles of Q4_0 weights × Q8_0 activations.
    pub(crate) tile_q4_0_q8_0: TileFn,
    /// Tiles of Q4_1 weights × Q8_1 activations.
    pub(crate) tile_q4_1_q8_1: TileFn,
    /// Tiles of Q8_0 weights × Q8_0 activations.
    pub(crate) tile_q8_0_q8_0: TileFn,
    /// The packed-matrix kernel, where this instruction set has one (its scalar twin,
    /// the portable `packed_group`, runs everywhere but is only worth it there).
    pub(crate) packed: Option<PackedFn>,
    /// The packed kernel of the K layouts (Q5_0, Q5_1 and the K-quants repacked), where
    /// this instruction set has one (its scalar twin is the portable `kpacked_group`).
    pub(crate) kpacked: Option<KPackedFn>,
}

impl Kernels {
    /// The dot product of a K-quant weight row with Q8_K activations; `None` for a type
    /// whose activations are not Q8_K.
    pub(crate) fn dot_q8_k(&self, ty: WeightType) -> Option<DotFn> {
        match ty {
            WeightType::Q2_K => Some(self.dot_q2_k_q8_k),
            WeightType::Q3_K => Some(self.dot_q3_k_q8_k),
            WeightType::Q4_K => Some(self.dot_q4_k_q8_k),
            WeightType::Q5_K => Some(self.dot_q5_k_q8_k),
            WeightType::Q6_K => Some(self.dot_q6_k_q8_k),
            _ => None,
        }
    }
}

/// Builds a `Kernels` table from the modules that hold its functions under the table's
/// field names: `base` (float, Q4/Q8 and dequantisation kernels), `quants` (Q5 and K-quant
/// dots), `tiles` (the `tile_*` entries). Each field is named once, here.
macro_rules! kernel_table {
    (
        name: $name:literal,
        base: $base:path,
        quants: $quants:path,
        tiles: $tiles:path,
        quantize_q8_k: $q8k:expr,
        packed: $packed:expr,
        kpacked: $kpacked:expr $(,)?
    ) => {
        $crate::table::kernel_table!(@fields $name, $q8k, $packed, $kpacked,
            $base => [
                dot_f32 dot_f16 dot_f32_bytes dot_f16_bytes dot_f16_bytes_tokens dot_bf16_bytes
                axpy_f16 dot_f16_rows
                axpy_f16_rows dot_f16_rows_group axpy_f16_rows_group dot_q8_0_rows axpy_q8_0_rows exp_sum f32_to_f16
                f16_to_f32 quantize_q8_0 quantize_q8_1 dot_q4_0_q8_0 dot_q4_1_q8_1
                dot_q8_0_q8_0 dequantize_q4_0 dequantize_q4_1 dequantize_q8_0
            ],
            $quants => [
                dot_q5_0_q8_0 dot_q5_1_q8_1 dot_q2_k_q8_k dot_q3_k_q8_k dot_q4_k_q8_k
                dot_q5_k_q8_k dot_q6_k_q8_k
            ],
            $tiles => [tile_q4_0_q8_0 tile_q4_1_q8_1 tile_q8_0_q8_0],
        )
    };
    (@fields $name:literal, $q8k:expr, $packed:expr, $kpacked:expr,
        $($module:path => [$($field:ident)*],)*) => {
        $crate::table::Kernels {
            name: $name,
            quantize_q8_k: $q8k,
            packed: $packed,
            kpacked: $kpacked,
            $($($field: { use $module as m; m::$field },)*)*
        }
    };
}
pub(crate) use kernel_table;

/// The number of whole blocks every row of a tile holds (`(wb, xb)`: the weight and
/// activation block bytes).
pub(crate) fn common_blocks(w: &[&[u8]], x: &[&[u8]], (wb, xb): (usize, usize)) -> usize {
    let nw = w.iter().map(|r| r.len() / wb).min().unwrap_or(0);
    let nx = x.iter().map(|r| r.len() / xb).min().unwrap_or(0);
    nw.min(nx)
}
