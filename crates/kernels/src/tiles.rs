//! Tiles of quantised dot products: several weight rows against several activation rows in
//! one call, the inner loop of [`crate::matmul`] for Q4_0, Q4_1 and Q8_0.
//!
//! Why tiles: a matrix-vector product streams each weight block from memory once and uses it
//! once, so its cost is unpacking plus one integer dot per block. For a batch of tokens (a
//! prompt), a tile unpacks each weight block (nibbles to bytes, scale to f32) once and meets
//! it with up to four tokens while it is in registers; each activation block likewise meets
//! up to four rows. The SIMD tiles keep one accumulator per (row, token) pair, so every pair's
//! result is bit-identical to the same table's single dot product, whatever the tile shape:
//! results do not depend on how rows and tokens are grouped (or on the thread count).

use crate::scalar::SCALAR;
use crate::types::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

/// `out[t * w.len() + r] = dot(w[r], x[t])` for every weight row `w[r]` and activation row
/// `x[t]` of one block format pair. Block counts are the fewest whole blocks any row holds;
/// if `out` is shorter than `w.len() * x.len()`, only the tokens that fit are computed.
pub(crate) type TileFn = fn(&[&[u8]], &[&[u8]], &mut [f32]);

/// One implementation of the tile kernels.
pub(crate) struct TileKernels {
    /// Q4_0 weights × Q8_0 activations.
    pub(crate) q4_0_q8_0: TileFn,
    /// Q4_1 weights × Q8_1 activations.
    pub(crate) q4_1_q8_1: TileFn,
    /// Q8_0 weights × Q8_0 activations.
    pub(crate) q8_0_q8_0: TileFn,
}

/// The scalar tiles: each pair through the scalar dot product.
pub(crate) static SCALAR_TILES: TileKernels = TileKernels {
    q4_0_q8_0: |w, x, out| {
        let b = (BlockQ4_0::BYTES, BlockQ8_0::BYTES);
        pairs(SCALAR.dot_q4_0_q8_0, b, w, x, out);
    },
    q4_1_q8_1: |w, x, out| {
        let b = (BlockQ4_1::BYTES, BlockQ8_1::BYTES);
        pairs(SCALAR.dot_q4_1_q8_1, b, w, x, out);
    },
    q8_0_q8_0: |w, x, out| {
        let b = (BlockQ8_0::BYTES, BlockQ8_0::BYTES);
        pairs(SCALAR.dot_q8_0_q8_0, b, w, x, out);
    },
};

/// The number of whole blocks every row of the tile holds.
pub(crate) fn common_blocks(w: &[&[u8]], x: &[&[u8]], (wb, xb): (usize, usize)) -> usize {
    let nw = w.iter().map(|r| r.len() / wb).min().unwrap_or(0);
    let nx = x.iter().map(|r| r.len() / xb).min().unwrap_or(0);
    nw.min(nx)
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
