//! The 5-bit formats (Q5_0, Q5_1) and the K-quants (Q2_K … Q6_K): block layouts,
//! dequantisation, the Q8_K activation format, the integer dot products (scalar reference
//! and AVX2), and reference quantisers from f32.
//!
//! Numerics follow ggml's CPU path: a weight row of type T meets activations quantised to T's
//! "vec_dot type" — Q8_0 for Q5_0, Q8_1 for Q5_1, Q8_K (256-element blocks with an f32
//! scale and per-16 sums) for every K-quant. The dot kernels are entries of
//! [`QuantKernels`], one table per instruction set, reached through the crate's dispatch
//! table (`Kernels::quants`), so the choice is made once per process with everything else.

use crate::types::{KernelError, WeightType, checked_row_bytes};

pub(crate) mod blocks;
pub(crate) mod reference;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(test)]
mod tests;

pub use blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8K, QK_K,
};

/// A weight row · quantised activation row dot product.
pub(crate) type DotFn = fn(&[u8], &[u8]) -> f32;

/// One implementation of the kernels for these formats. Same contract as the crate's
/// `Kernels` table: lengths are not checked against each other; each entry processes as
/// many whole blocks as every argument holds and never reads or writes outside its slices.
pub(crate) struct QuantKernels {
    /// Quantise f32 activations to Q8_K blocks (ggml `quantize_row_q8_K`).
    pub(crate) quantize_q8_k: fn(&[f32], &mut [u8]),
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
}

impl QuantKernels {
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

/// Quantises every `cols`-long token row of `x` to Q8_K; returns the buffer and the bytes per
/// token. `cols` is a multiple of 256 (the K-quant weight matrix was checked).
pub(crate) fn quantize_rows_q8_k(q: &QuantKernels, x: &[f32], cols: usize) -> (Vec<u8>, usize) {
    let stride = cols / QK_K * BlockQ8K::BYTES;
    let mut out = vec![0u8; x.len() / QK_K * BlockQ8K::BYTES];
    if stride > 0 {
        for (xt, qt) in x.chunks_exact(cols).zip(out.chunks_exact_mut(stride)) {
            (q.quantize_q8_k)(xt, qt);
        }
    }
    (out, stride)
}

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
    let expected = checked_row_bytes(ty, src.len())?;
    if dst.len() != expected {
        return Err(KernelError::DataSize {
            what: "quantize_row destination",
            ty,
            rows: 1,
            cols: src.len(),
            expected,
            actual: dst.len(),
        });
    }
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
        WeightType::Q4_0 => reference::quantize_q4_0(src, dst),
        WeightType::Q4_1 => reference::quantize_q4_1(src, dst),
        WeightType::Q8_0 => reference::quantize_q8_0(src, dst),
        WeightType::Q5_0 => reference::quantize_q5_0(src, dst),
        WeightType::Q5_1 => reference::quantize_q5_1(src, dst),
        WeightType::Q2_K => reference::quantize_q2_k(src, dst),
        WeightType::Q3_K => reference::quantize_q3_k(src, dst),
        WeightType::Q4_K => reference::quantize_q4_k(src, dst),
        WeightType::Q5_K => reference::quantize_q5_k(src, dst),
        WeightType::Q6_K => reference::quantize_q6_k(src, dst),
    }
    Ok(())
}
