//! AVX2 tile kernels (see `crate::table::TileFn` for the contract); the AVX-512 table
//! has its own 512-bit body in `super::avx512vnni`.
//!
//! The loop over blocks, per block: unpack each of the R weight blocks (nibbles → bytes, f16
//! scale → 8 lanes of f32) once; then for each of the T activation blocks (loaded once) and
//! each row, one integer dot of 32 byte pairs into eight i32 lanes, converted to f32 and
//! accumulated with `fma(d_w·d_x, lanes, acc)` into that pair's own accumulator, exactly as
//! ggml's AVX2 `ggml_vec_dot_*` does for one pair (so a pair's value does not depend on the
//! tile it was computed in, and equals the table's single dot product).
//!
//! The integer dot multiplies unsigned by signed bytes into i16 pairs (`vpmaddubsw`) and sums
//! pairs of those into i32 (`vpmaddwd`); with 16 vector registers the tile is 4 rows × 2
//! tokens (8 accumulators). It needs an unsigned operand:
//! - Q4_1: the nibbles are already unsigned (0..15).
//! - Q4_0: `Σ (n − 8)·x = Σ n·x − 8·Σ x`; the `8·Σ x` lanes are computed once per activation
//!   block (shared by the R rows) and start the accumulation negated.
//! - Q8_0: the sign trick `Σ |w|·(sign(w)·x)` (ggml's), exact for quants in −127..=127.
//!
//! Every lane holds the sum of four consecutive byte products, as in ggml's AVX2 loop.
use std::arch::x86_64::*;

use super::helpers::{
    Q4_0, Q4_1, Q8_0, bcast_f16, bytes_from_nibbles_32, hsum_float_8, load_f16, sizes,
};
use crate::table::common_blocks;

/// Rows and tokens per kernel call: 4 × 2 (8 accumulators of 16 registers).
const RMAX: usize = 4;
const TMAX: usize = 2;

/// The Q4_0 tile. Only installed in tables whose constructor checked the CPU for AVX2, FMA
/// and F16C (as every entry here).
pub(crate) fn tile_q4_0_q8_0(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    tile::<Q4_0>(w, x, out);
}

/// The Q4_1 tile.
pub(crate) fn tile_q4_1_q8_1(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    tile::<Q4_1>(w, x, out);
}

/// The Q8_0 tile.
pub(crate) fn tile_q8_0_q8_0(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    tile::<Q8_0>(w, x, out);
}

/// Safe entry: splits the tile into kernel-sized pieces (R = `RMAX` rows or single
/// rows at the edge, up to `TMAX` tokens) and scatters their results.
fn tile<const F: u8>(w: &[&[u8]], x: &[&[u8]], out: &mut [f32]) {
    let nr = w.len();
    if nr == 0 {
        return;
    }
    let nt = x.len().min(out.len() / nr);
    let x = &x[..nt];
    let nb = common_blocks(w, x, sizes(F));
    let mut r0 = 0;
    while r0 < nr {
        if nr - r0 >= RMAX {
            rows::<F, RMAX>(&w[r0..r0 + RMAX], x, nb, r0, nr, out);
            r0 += RMAX;
        } else {
            rows::<F, 1>(&w[r0..r0 + 1], x, nb, r0, nr, out);
            r0 += 1;
        }
    }
}

/// R rows (`w.len() == R`) against every token of `x`, in pieces of up to `TMAX`.
fn rows<const F: u8, const R: usize>(
    w: &[&[u8]],
    x: &[&[u8]],
    nb: usize,
    r0: usize,
    nr: usize,
    out: &mut [f32],
) {
    let wp: [*const u8; R] = std::array::from_fn(|r| w[r].as_ptr());
    let mut t0 = 0;
    while t0 < x.len() {
        let tn = (x.len() - t0).min(TMAX);
        let xs = &x[t0..t0 + tn];
        let mut put = |t: usize, vals: &[f32]| {
            out[(t0 + t) * nr + r0..][..R].copy_from_slice(vals);
        };
        // Every arm's `unsafe` call is sound because the table holding this tile was handed out only after
        // the CPU was checked for AVX2, FMA and F16C; each row of `w` holds at least `nb`
        // weight blocks and each row of `x` at least `nb` activation blocks
        // (`common_blocks`), so every block the kernel reads is in bounds.
        match tn {
            1 => {
                // SAFETY: as above.
                let v = unsafe { kernel::<F, R, 1>(wp, [xs[0].as_ptr()], nb) };
                v.iter().enumerate().for_each(|(t, v)| put(t, v));
            }
            2 => {
                let xp = [xs[0].as_ptr(), xs[1].as_ptr()];
                // SAFETY: as above.
                let v = unsafe { kernel::<F, R, 2>(wp, xp, nb) };
                v.iter().enumerate().for_each(|(t, v)| put(t, v));
            }
            3 => {
                let xp = [xs[0].as_ptr(), xs[1].as_ptr(), xs[2].as_ptr()];
                // SAFETY: as above.
                let v = unsafe { kernel::<F, R, 3>(wp, xp, nb) };
                v.iter().enumerate().for_each(|(t, v)| put(t, v));
            }
            _ => {
                let xp = std::array::from_fn(|t| xs[t].as_ptr());
                // SAFETY: as above.
                let v = unsafe { kernel::<F, R, 4>(wp, xp, nb) };
                v.iter().enumerate().for_each(|(t, v)| put(t, v));
            }
        }
        t0 += tn;
    }
}

/// The tile body: `R` weight rows × `T` activation rows over `nb` blocks; returns
/// `[token][row]`.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; every `w[r]` must be readable for `nb` weight
/// blocks of format `F` and every `x[t]` for `nb` of its activation blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel<const F: u8, const R: usize, const T: usize>(
    w: [*const u8; R],
    x: [*const u8; T],
    nb: usize,
) -> [[f32; R]; T] {
    let (wb, xb) = sizes(F);
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); R]; T];
    let mut summs = [[0f32; R]; T];
    for ib in 0..nb {
        let mut wq = [zero; R];
        let mut dw = [_mm256_setzero_ps(); R];
        let mut mw = [0f32; R];
        for r in 0..R {
            // SAFETY: block `ib < nb` of row `r` is readable (caller's contract).
            unsafe {
                let p = w[r].add(ib * wb);
                dw[r] = bcast_f16(p);
                wq[r] = match F {
                    Q4_0 => bytes_from_nibbles_32(p.add(2)),
                    Q4_1 => bytes_from_nibbles_32(p.add(4)),
                    _ => _mm256_loadu_si256(p.add(2).cast()),
                };
                if F == Q4_1 {
                    mw[r] = load_f16(p.add(2));
                }
            }
        }
        for t in 0..T {
            // SAFETY: block `ib < nb` of token `t` is readable (caller's contract).
            let (dx, xq, sx) = unsafe {
                let p = x[t].add(ib * xb);
                let qs = if F == Q4_1 { 4 } else { 2 };
                let sx = if F == Q4_1 { load_f16(p.add(2)) } else { 0.0 };
                (bcast_f16(p), _mm256_loadu_si256(p.add(qs).cast()), sx)
            };
            let init = if F == Q4_0 {
                _mm256_sub_epi32(zero, dot_u8_i8(zero, _mm256_set1_epi8(8), xq))
            } else {
                zero
            };
            for r in 0..R {
                let lanes = if F == Q8_0 {
                    dot_i8_i8(wq[r], xq)
                } else {
                    dot_u8_i8(init, wq[r], xq)
                };
                let d = _mm256_mul_ps(dw[r], dx);
                acc[t][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[t][r]);
                if F == Q4_1 {
                    summs[t][r] += mw[r] * sx;
                }
            }
        }
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = if F == Q4_1 {
                hsum_float_8(acc[t][r]) + summs[t][r]
            } else {
                hsum_float_8(acc[t][r])
            };
        }
    }
    out
}

/// `init + Σ₄ a·b` per lane via `vpmaddubsw` + `vpmaddwd` (no saturation: |a·b| pairs
/// stay below 2·15·128).
#[inline]
#[target_feature(enable = "avx2")]
fn dot_u8_i8(init: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(a, b);
    _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_set1_epi16(1), pairs))
}

/// `Σ₄ a·b` per lane with ggml's sign trick.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    _mm256_madd_epi16(_mm256_set1_epi16(1), pairs)
}
