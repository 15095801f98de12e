//! The table of kernel implementations and the one-time choice among them.
//!
//! Each instruction set provides a `&'static Kernels` of plain safe function pointers. The
//! SIMD tables are only reachable through constructors that check the CPU first (memchr's
//! pattern), so holding a table is proof that its instructions are available. The choice is
//! made once per process and cached in a `OnceLock`; a call costs one atomic load.
//!
//! Contract for every entry: lengths are *not* checked against each other. Each kernel
//! processes the largest whole prefix every argument can supply (e.g. `min(a.len(),
//! b.len())` elements, or as many whole blocks as both byte slices hold) and never reads or
//! writes outside its slices. The public API checks lengths before calling in.

use std::sync::OnceLock;

use half::{bf16, f16};

/// One implementation of every SIMD-accelerated kernel.
pub(crate) struct Kernels {
    /// Name for logs: "scalar", "avx2".
    pub(crate) name: &'static str,
    /// `Σ a[i]*b[i]`, ggml `ggml_vec_dot_f32` numerics.
    pub(crate) dot_f32: fn(&[f32], &[f32]) -> f32,
    /// `Σ a[i]*b[i]` over f16, ggml `ggml_vec_dot_f16` numerics.
    pub(crate) dot_f16: fn(&[f16], &[f16]) -> f32,
    /// F32 weight row (little-endian bytes) · f32 activations.
    pub(crate) dot_f32_bytes: fn(&[u8], &[f32]) -> f32,
    /// F16 weight row (little-endian bytes) · f16 activations.
    pub(crate) dot_f16_bytes: fn(&[u8], &[f16]) -> f32,
    /// BF16 weight row (little-endian bytes) · bf16 activations, `ggml_vec_dot_bf16`.
    pub(crate) dot_bf16_bytes: fn(&[u8], &[bf16]) -> f32,
    /// `y[i] += alpha * x[i]`.
    pub(crate) axpy_f16: fn(&mut [f32], f32, &[f16]),
    /// Round-to-nearest-even f32 → f16.
    pub(crate) f32_to_f16: fn(&[f32], &mut [f16]),
    /// Exact f16 → f32.
    pub(crate) f16_to_f32: fn(&[f16], &mut [f32]),
    /// Quantise f32 activations to Q8_0 blocks (x86 ggml `quantize_row_q8_0` numerics).
    pub(crate) quantize_q8_0: fn(&[f32], &mut [u8]),
    /// Quantise f32 activations to Q8_1 blocks (x86 ggml `quantize_row_q8_1` numerics).
    pub(crate) quantize_q8_1: fn(&[f32], &mut [u8]),
    /// Q4_0 weight row · Q8_0 activations.
    pub(crate) dot_q4_0_q8_0: fn(&[u8], &[u8]) -> f32,
    /// Q4_1 weight row · Q8_1 activations.
    pub(crate) dot_q4_1_q8_1: fn(&[u8], &[u8]) -> f32,
    /// Q8_0 weight row · Q8_0 activations.
    pub(crate) dot_q8_0_q8_0: fn(&[u8], &[u8]) -> f32,
    /// Q4_0 blocks → f32.
    pub(crate) dequantize_q4_0: fn(&[u8], &mut [f32]),
    /// Q4_1 blocks → f32.
    pub(crate) dequantize_q4_1: fn(&[u8], &mut [f32]),
    /// Q8_0 blocks → f32.
    pub(crate) dequantize_q8_0: fn(&[u8], &mut [f32]),
    /// Q5_0, Q5_1 and K-quant kernels (`crate::quants`).
    pub(crate) quants: &'static crate::quants::QuantKernels,
    /// Tiles of Q4_0/Q4_1/Q8_0 dot products, the inner loop of `matmul` (`crate::tiles`).
    pub(crate) tiles: &'static crate::tiles::TileKernels,
}

static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();

/// The best implementation this CPU supports, detected on first use.
pub(crate) fn active() -> &'static Kernels {
    ACTIVE.get_or_init(detect)
}

fn detect() -> &'static Kernels {
    // Best first; later work (NEON) adds its constructor in front.
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::x86_64_avx512::avx512vnni() {
        return k;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::x86_64::avx2() {
        return k;
    }
    &crate::scalar::SCALAR
}

/// Every implementation this CPU can run, scalar first (for tests and benches).
#[cfg(test)]
pub(crate) fn available() -> Vec<&'static Kernels> {
    let mut all = vec![&crate::scalar::SCALAR];
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::x86_64::avx2() {
        all.push(k);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::x86_64_avx512::avx512vnni() {
        all.push(k);
    }
    all
}
