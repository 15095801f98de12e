//! The AVX-512 VNNI kernel of the K-layout packed matrices (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: see
//! `crate::packed_k` for the layout and the arithmetic), the AVX-512 table's `kpacked`. Each
//! lane's integer sums are exact and its float operations are the scalar twin's
//! (`crate::arch::portable::kpacked`) in the same order, so the results are bit-identical to
//! it (and to the AVX2 kernel, `avx2_kpacked`).
//!
//! Where the AVX2 kernel reads a cell's 64-byte vectors as two halves of eight rows, here
//! one 512-bit register holds all 16 rows (lane = row, four bytes each), so every cell is
//! read once and every instruction works for the whole group:
//!
//! - a run's levels are unpacked as there (low and high nibbles, the high bits of 5- and
//!   6-bit levels shifted in from their planes by one shift and one mask per vector);
//! - `vpdpbusd` (unsigned levels × signed activation bytes, four products summed into each
//!   i32 lane) replaces the AVX2 kernel's `vpmaddubsw` + i16 flushes: a lane's sum over a
//!   32-element run is at most `32·63·128 < 2^18`, so nothing overflows and nothing needs
//!   flushing. The low and the high elements of a run go into two chains (Q6_K's two
//!   sub-blocks of 16; for 32-element sub-blocks they are added), which halves the
//!   dependency chain of a single token;
//! - the sub-block scale multiplies the run's (or the sub-block's) exact sum once per
//!   token (`vpmulld` by the rows' scales widened to i32), where the AVX2 kernel's
//!   `vpmaddwd` flush did it;
//! - the offset (`Σ mn_s·x_s`) is one `vpmaddwd` per two sub-blocks, as there.
//!
//! The float work (one `fma` per token and super-block, and one for the stored offset) is
//! done per cell while the token's integer sum is still in a register.

use std::arch::x86_64::*;

use super::avx2_kpacked::{handled, simd_can_run};
use crate::arch::x86_64::helpers::prefetch_ahead;
use crate::formats::{GROUP, KLayout, Offset};

/// The kernel's safe entry: group `cells` (`nsb` cells of layout `l`) against `nt` ≤ 8
/// tokens, into `vals[t][lane]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kpacked_group(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
    nt: usize,
    vals: &mut [[f32; GROUP]; 8],
) {
    let nt = nt.min(8);
    if !simd_can_run(l, cells, qs, d, sums, nsb, nt, vals) {
        return;
    }
    macro_rules! call {
        ($($n:literal)*) => {
            match nt {
                $($n => {
                    // SAFETY: reachable only through the AVX-512 table, handed out after
                    // checking for AVX-512 F/BW/VL/VNNI besides AVX2, FMA and F16C (all
                    // `kernel` enables); `simd_can_run` checked that `l` is handled, that
                    // `cells` holds `nsb` cells and that `qs`, `d`, `sums` hold `nsb`
                    // super-blocks for each of the `$n` tokens.
                    let v = unsafe {
                        match l.bits {
                            4 => kernel::<$n, 4>(l, cells, qs, d, sums, nsb),
                            5 => kernel::<$n, 5>(l, cells, qs, d, sums, nsb),
                            _ => kernel::<$n, 6>(l, cells, qs, d, sums, nsb),
                        }
                    };
                    vals[..$n].copy_from_slice(&v);
                })*
                _ => {}
            }
        };
    }
    call!(1 2 3 4 5 6 7 8);
}

/// The bits of every byte of `plane` from bit `bit` on moved to bit `to` on, those in
/// `mask` kept (the rest cleared); as `avx2_kpacked`'s, whose notes say why a 16-bit shift
/// is enough.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn high_bits(plane: __m512i, bit: i32, to: i32, mask: i8) -> __m512i {
    let sh = to - bit;
    let v = if sh >= 0 {
        _mm512_sll_epi16(plane, _mm_cvtsi32_si128(sh))
    } else {
        _mm512_srl_epi16(plane, _mm_cvtsi32_si128(-sh))
    };
    _mm512_and_si512(v, _mm512_set1_epi8(mask))
}

/// The `BITS`-bit levels of the group's 16 rows in the 32-element run at `base`: `lo[j]`
/// lane `r` holds row `r`'s elements `4j..4j + 4`, `hi[j]` its elements `4j + 16..4j + 20`.
///
/// # Safety
///
/// AVX-512 F/BW; `base` must be readable for the run's `64·BITS` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run_levels<const BITS: u32>(base: *const u8) -> ([__m512i; 4], [__m512i; 4]) {
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // SAFETY: the caller's contract: the planes and the nibble vectors are inside the run.
    unsafe {
        let p4 = if BITS >= 5 {
            _mm512_loadu_si512(base.add(256).cast())
        } else {
            zero
        };
        let p5 = if BITS == 6 {
            _mm512_loadu_si512(base.add(320).cast())
        } else {
            zero
        };
        let mut lo = [zero; 4];
        let mut hi = [zero; 4];
        for j in 0..4 {
            let v = _mm512_loadu_si512(base.add(64 * j).cast());
            lo[j] = _mm512_and_si512(v, low);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            let b = 2 * j as i32;
            if BITS == 5 {
                lo[j] = _mm512_or_si512(lo[j], high_bits(p4, b, 4, 0x10));
                hi[j] = _mm512_or_si512(hi[j], high_bits(p4, b + 1, 4, 0x10));
            }
            if BITS == 6 {
                lo[j] = _mm512_or_si512(lo[j], high_bits(p4, b, 4, 0x30));
                hi[j] = _mm512_or_si512(hi[j], high_bits(p5, b, 4, 0x30));
            }
        }
        (lo, hi)
    }
}

/// The 16 rows' i8 values at `p` (one sub-block's scales), widened to i32 lanes.
///
/// # Safety
///
/// AVX-512 F; `p` must be readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen(p: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// `Σ_s v_s·xs_s` per lane over `ns` (even) sub-blocks, the i8 values `v` laid out
/// `[sub-block][row]` (16 bytes apart) from `p`, one `vpmaddwd` per two sub-blocks against
/// their two i16 sums read as one i32.
///
/// # Safety
///
/// AVX-512 F/BW; `p` readable for `16·ns` bytes, `xs` for `ns` i16s.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw")]
unsafe fn pair_dot(p: *const u8, xs: *const i16, ns: usize) -> __m512i {
    let mut r = _mm512_setzero_si512();
    for pr in 0..ns / 2 {
        // SAFETY: the caller's contract.
        unsafe {
            let a = _mm_loadu_si128(p.add(GROUP * 2 * pr).cast());
            let b = _mm_loadu_si128(p.add(GROUP * (2 * pr + 1)).cast());
            // Lane r: (a_r, b_r) as two i16.
            let ab = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
            let v = _mm512_cvtepi8_epi16(ab);
            let x = _mm512_set1_epi32(xs.add(2 * pr).cast::<i32>().read_unaligned());
            r = _mm512_add_epi32(r, _mm512_madd_epi16(v, x));
        }
    }
    r
}

/// The offset's integer `imin` of the group's rows for one cell and token (`xs`: the
/// token's sub-block sums of this super-block).
///
/// # Safety
///
/// AVX-512 F/BW; `cell` must hold a whole cell of the handled layout `l`.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw")]
unsafe fn offset(l: &KLayout, cell: *const u8, xs: &[i16]) -> __m512i {
    let ns = l.n_sub();
    debug_assert!(xs.len() >= ns);
    // SAFETY: the minimums and scales are inside the cell (the layout's offsets); `xs`
    // holds `ns` sums.
    unsafe {
        match l.offset {
            Offset::Mins => pair_dot(cell.add(l.mn_at()), xs.as_ptr(), ns),
            Offset::Scales(k) => _mm512_mullo_epi32(
                pair_dot(cell.add(l.sc_at()), xs.as_ptr(), ns),
                _mm512_set1_epi32(k),
            ),
            Offset::Sum(k) => _mm512_set1_epi32(k * xs.iter().map(|&v| i32::from(v)).sum::<i32>()),
        }
    }
}

/// The group's 16 rows × `T` tokens over `nsb` super-blocks of `BITS`-bit levels; returns
/// `[token][row]`.
///
/// # Safety
///
/// The CPU must support AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `l` handled with
/// `l.bits == BITS`; `cells` must hold `nsb` cells, `qs` `T·nsb·sb` bytes, `d` `T·nsb`
/// scales and `sums` `T·nsb·n_sub` sums.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel<const T: usize, const BITS: u32>(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
) -> [[f32; GROUP]; T] {
    let (cb, ns, sb) = (l.cell_bytes(), l.n_sub(), l.sb);
    let (sc_at, runs_at, run_b, b_at) = (l.sc_at(), l.runs_at(), l.run_bytes(), l.b_at());
    debug_assert!(l.bits == BITS && handled(l));
    debug_assert!(cells.len() >= nsb * cb && qs.len() >= T * nsb * sb && d.len() >= T * nsb);
    debug_assert!(sums.len() >= T * nsb * ns);
    let sub16 = BITS == 6;
    let runs = sb / 32;
    // One token: the cell's lines to prefetch, spread over its runs (its header included).
    let pf_lines = cb.div_ceil(64).div_ceil(runs);
    let zero = _mm512_setzero_si512();
    let (c, q) = (cells.as_ptr(), qs.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_m = [_mm512_setzero_ps(); T];
    for s in 0..nsb {
        // SAFETY: cell `s` is in bounds (`cells` holds `nsb` cells) and every offset below
        // is inside its `cb` bytes (the layout's offsets); super-block `s` of each token
        // `t` < `T` (`sb` bytes of `qs`, one scale of `d`, `ns` sums) is in bounds.
        unsafe {
            let cell = c.add(s * cb);
            let mut isum = [zero; T];
            for run in 0..runs {
                if T == 1 {
                    // One token streams every cell from memory once (as the AVX2 and the
                    // Q4/Q8 one-token kernels); more tokens re-read cells from the caches.
                    prefetch_ahead(cell.wrapping_add(run * pf_lines * 64), pf_lines);
                }
                let (lo, hi) = run_levels::<BITS>(cell.add(runs_at + run * run_b));
                // The scales of the low and the high elements' sub-blocks (Q6_K's two
                // sub-blocks of 16), or of the run's one sub-block.
                let (sc0, sc1) = match (l.scaled, sub16) {
                    (false, _) => (zero, zero),
                    (true, true) => (
                        widen(cell.add(sc_at + GROUP * 2 * run)),
                        widen(cell.add(sc_at + GROUP * (2 * run + 1))),
                    ),
                    (true, false) => {
                        let v = widen(cell.add(sc_at + GROUP * run));
                        (v, v)
                    }
                };
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xp = q.add((t * nsb + s) * sb + run * 32);
                    let x = |o: usize| _mm512_set1_epi32(xp.add(o).cast::<i32>().read_unaligned());
                    let mut s_lo = zero;
                    let mut s_hi = zero;
                    for j in 0..4 {
                        s_lo = _mm512_dpbusd_epi32(s_lo, lo[j], x(4 * j));
                        s_hi = _mm512_dpbusd_epi32(s_hi, hi[j], x(4 * j + 16));
                    }
                    let r = match (l.scaled, sub16) {
                        (false, _) => _mm512_add_epi32(s_lo, s_hi),
                        (true, true) => _mm512_add_epi32(
                            _mm512_mullo_epi32(s_lo, sc0),
                            _mm512_mullo_epi32(s_hi, sc1),
                        ),
                        (true, false) => _mm512_mullo_epi32(_mm512_add_epi32(s_lo, s_hi), sc0),
                    };
                    *isum = _mm512_add_epi32(*isum, r);
                }
            }
            let a = _mm512_cvtph_ps(_mm256_loadu_si256(cell.cast()));
            let b = if l.b_stored {
                _mm512_cvtph_ps(_mm256_loadu_si256(cell.add(b_at).cast()))
            } else {
                a
            };
            for t in 0..T {
                let blk = t * nsb + s;
                let dt = _mm512_set1_ps(d[blk]);
                let imin = offset(l, cell, &sums[blk * ns..][..ns]);
                if l.b_stored {
                    acc[t] =
                        _mm512_fmadd_ps(_mm512_mul_ps(a, dt), _mm512_cvtepi32_ps(isum[t]), acc[t]);
                    acc_m[t] =
                        _mm512_fmadd_ps(_mm512_mul_ps(b, dt), _mm512_cvtepi32_ps(imin), acc_m[t]);
                } else {
                    // `b = a`: the offset joins the integer sum.
                    let tot = _mm512_add_epi32(isum[t], imin);
                    acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(a, dt), _mm512_cvtepi32_ps(tot), acc[t]);
                }
            }
        }
    }
    let mut out = [[0f32; GROUP]; T];
    for (o, (a, m)) in out.iter_mut().zip(acc.iter().zip(&acc_m)) {
        // SAFETY: `o` is 16 f32s.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(*a, *m)) };
    }
    out
}
