//! AVX2 tile kernels (see `crate::tiles`), written as a macro over the integer dot step so
//! that a VEX-encoded VNNI variant (AVX-VNNI) can reuse the body; the AVX-512 table has its
//! own 512-bit body in `crate::x86_64_avx512`.
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
#![allow(unsafe_code)]

use std::arch::x86_64::*;

/// Format selectors for the const-generic kernel body.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// (weight block bytes, activation block bytes) of a format.
const fn sizes(f: u8) -> (usize, usize) {
    use crate::types::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
    match f {
        Q4_0 => (BlockQ4_0::BYTES, BlockQ8_0::BYTES),
        Q4_1 => (BlockQ4_1::BYTES, BlockQ8_1::BYTES),
        _ => (BlockQ8_0::BYTES, BlockQ8_0::BYTES),
    }
}

/// Loads a little-endian f16 at `p` and broadcasts it to eight f32 lanes.
///
/// # Safety
///
/// AVX2 and F16C must be available; `p` readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn bcast_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes; no alignment is assumed.
    let bits = u16::from_le(unsafe { p.cast::<u16>().read_unaligned() });
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// Loads a little-endian f16 at `p` as f32.
///
/// # Safety
///
/// AVX2 and F16C must be available; `p` readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes; no alignment is assumed.
    let bits = u16::from_le(unsafe { p.cast::<u16>().read_unaligned() });
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// 16 packed bytes → 32 bytes: low nibbles in the low 128 bits (elements 0..16), high
/// nibbles in the high 128 bits (elements 16..32).
///
/// # Safety
///
/// AVX2 must be available; `p` readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` takes any alignment.
    let tmp = unsafe { _mm_loadu_si128(p.cast()) };
    let bytes = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// ggml `hsum_float_8`: (lo128 + hi128), then fold pairs.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_float_8(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Defines, in the module it is invoked in, the tile kernels for one instruction set: a
/// `TILES` table and the const-generic kernel body. The invoking module provides
/// `dot_u8_i8(init, a, b)` (`init + Σ₄ a·b` per i32 lane, `a` unsigned ≤ 15, `b` signed) and
/// `dot_i8_i8(a, b)` (`Σ₄ a·b`, both signed in −127..=127), with target features within
/// `$features`.
macro_rules! tile_kernels {
    (features = $features:literal, rows = $rmax:literal, tokens = $tmax:literal) => {
        use std::arch::x86_64::*;

        use crate::tiles::{TileKernels, common_blocks};
        use crate::x86_64_tiles::{
            Q4_0, Q4_1, Q8_0, bcast_f16, hsum_float_8, load_f16, nibbles, sizes,
        };

        /// This instruction set's tiles. Only referenced from the kernel table whose
        /// constructor checked the CPU for `$features`.
        pub(crate) static TILES: TileKernels = TileKernels {
            q4_0_q8_0: tile::<Q4_0>,
            q4_1_q8_1: tile::<Q4_1>,
            q8_0_q8_0: tile::<Q8_0>,
        };

        /// Safe entry: splits the tile into kernel-sized pieces (R = `$rmax` rows or single
        /// rows at the edge, up to `$tmax` tokens) and scatters their results.
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
                if nr - r0 >= $rmax {
                    rows::<F, $rmax>(&w[r0..r0 + $rmax], x, nb, r0, nr, out);
                    r0 += $rmax;
                } else {
                    rows::<F, 1>(&w[r0..r0 + 1], x, nb, r0, nr, out);
                    r0 += 1;
                }
            }
        }

        /// R rows (`w.len() == R`) against every token of `x`, in pieces of up to `$tmax`.
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
                let tn = (x.len() - t0).min($tmax);
                let xs = &x[t0..t0 + tn];
                let mut put = |t: usize, vals: &[f32]| {
                    out[(t0 + t) * nr + r0..][..R].copy_from_slice(vals);
                };
                // Every arm's `unsafe` call is sound because the table holding this tile was handed out only after
                // the CPU was checked for `$features`; each row of `w` holds at least `nb`
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
        /// The CPU must support `$features`; every `w[r]` must be readable for `nb` weight
        /// blocks of format `F` and every `x[t]` for `nb` of its activation blocks.
        #[target_feature(enable = $features)]
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
                            Q4_0 => nibbles(p.add(2)),
                            Q4_1 => nibbles(p.add(4)),
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
    };
}

/// AVX2 (+FMA, F16C) tiles: 4 rows × 2 tokens (8 accumulators of 16 registers).
pub(crate) mod avx2 {
    tile_kernels!(features = "avx2,fma,f16c", rows = 4, tokens = 2);

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
}
