//! The AVX2 kernel of the K-layout packed matrices (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: see
//! `crate::packed_k` for the layout and the arithmetic), the AVX2 table's `kpacked` (the
//! AVX-512 VNNI table has its own, `avx512_kpacked`). Each lane's integer sums are exact and
//! its float operations are the scalar twin's (`crate::arch::portable::kpacked`) in the same
//! order, so the results are bit-identical to it.
//!
//! As in `avx2_packed`, a 64-byte vector of a cell is read as two halves of eight rows
//! (lane = row, four bytes each); a nibble vector is split into its low and high nibbles,
//! the high bits of 5- and 6-bit levels are shifted in from their planes (one shift and
//! one mask per vector and plane), and `vpmaddubsw` against four activation bytes broadcast to
//! every lane sums adjacent products into i16. A pair is at most `2·63·127 = 16002`, so the
//! i16 sums are flushed before they could overflow: once per 32 elements for 4 bits, every
//! 16 elements for 5 bits, and every 8 elements of each half (low nibbles, high nibbles:
//! Q6_K's two sub-blocks) for 6 bits. The flush is a `vpmaddwd` by the rows' sub-block
//! scales, each widened to an (i16, i16) pair, so the scale costs nothing per token. The
//! offset term (`Σ mn_s·x_s`) is one `vpmaddwd` per two sub-blocks, in a second pass (in
//! the same pass for one token: `one_token`, which reads both halves of a cell at once).
//!
//! Q5_0 and Q5_1 (32-element cells, one run each) have their own loop, `five32`: there the
//! per-cell float work is as large as the integer work, and it is done while each token's
//! sum is still in a register (1.35-1.45x the general loop's GMAC/s on Gemma 3's Q5_0
//! shapes, `SHAPES=gemma-layers TOKENS=64` of the `head_bandwidth` example).

use std::arch::x86_64::*;

use crate::arch::portable::kpacked::kpacked_group as scalar_twin;
use crate::arch::x86_64::helpers::prefetch_ahead;
use crate::formats::GROUP;
use crate::formats::{KLayout, Offset};

/// Rows per half of a 16-row group (the lanes of one 256-bit vector).
const HALF: usize = GROUP / 2;

/// Whether the SIMD kernel handles layout `l` (every layout `crate::packed_k` makes);
/// others run the scalar twin, which gives the same bits.
pub(super) fn handled(l: &KLayout) -> bool {
    let shape = matches!((l.bits, l.sub), (4 | 5, 32) | (6, 16));
    let pairs = matches!(l.offset, Offset::Sum(_)) || l.n_sub().is_multiple_of(2);
    let scaled = l.scaled || (l.sub == l.sb && !matches!(l.offset, Offset::Scales(_)));
    shape && pairs && scaled && l.sb >= 32 && l.sb.is_multiple_of(32) && l.sb.is_multiple_of(l.sub)
}

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
    if let (1, Some(k)) = (nt, five32_offset(l)) {
        // SAFETY: as below (`half_kernel`), for one token and both halves.
        let [[lo], [hi]] = unsafe { five32::<1, 2>(l, k, cells, qs, d, sums, nsb, 0) };
        vals[0][..HALF].copy_from_slice(&lo);
        vals[0][HALF..].copy_from_slice(&hi);
        return;
    }
    if nt == 1 && l.scaled {
        // SAFETY: as below (`half_kernel`), for one token.
        let v = unsafe {
            match l.bits {
                4 => one_token::<4>(l, cells, qs, d, sums, nsb),
                5 => one_token::<5>(l, cells, qs, d, sums, nsb),
                _ => one_token::<6>(l, cells, qs, d, sums, nsb),
            }
        };
        vals[0] = v;
        return;
    }
    // Tokens per kernel call: four. The unpacked levels of a 32-element run (eight
    // registers) stay in registers while every token meets them, and each token adds its
    // sums; with eight tokens they outgrow AVX2's sixteen registers and spill. Measured on an
    // Intel Xeon held to AVX2 (`head_bandwidth SHAPES=mistral7b TOKENS=64`, 2 threads,
    // alternated): Q4_K 14336x4096 143 -> 150-161 GMAC/s, 4096x4096 158 -> 166-176; Q6_K
    // the same within noise (4 to 8 alike); Mistral-7B shape pp64 +8%. Six and two were
    // slower than four; the loops turned round (each level step meeting all eight tokens,
    // only their sums live) were no faster.
    let per_call = 4;
    for half in 0..2 {
        let mut t0 = 0;
        while t0 < nt {
            let tn = (nt - t0).min(per_call);
            let (q, dt, st) = (
                &qs[t0 * nsb * l.sb..],
                &d[t0 * nsb..],
                &sums[t0 * nsb * l.n_sub()..],
            );
            macro_rules! call {
                ($($n:literal)*) => {
                    match tn {
                        $($n => {
                            // SAFETY: reachable only through the AVX2 table, handed
                            // out after checking for AVX2, FMA and F16C (all
                            // `half_kernel` enables); `l` is handled (`simd_can_run`), `cells`
                            // holds `nsb` cells and `q`, `dt`, `st` hold `nsb` super-blocks
                            // for each of the `$n` tokens (`t0 + $n ≤ nt`; `simd_can_run`).
                            let v = unsafe {
                                match l.bits {
                                    4 => half_kernel::<$n, 4>(l, cells, q, dt, st, nsb, half),
                                    5 => half_kernel::<$n, 5>(l, cells, q, dt, st, nsb, half),
                                    _ => half_kernel::<$n, 6>(l, cells, q, dt, st, nsb, half),
                                }
                            };
                            for (o, v) in vals[t0..t0 + $n].iter_mut().zip(v) {
                                o[half * HALF..(half + 1) * HALF].copy_from_slice(&v);
                            }
                        })*
                        _ => {}
                    }
                };
            }
            call!(1 2 3 4 5 6 7 8);
            t0 += tn;
        }
    }
}

/// The entry checks of both x86 kernels: whether the SIMD kernel may run on `l` with these
/// slices for `nt` ≤ 8 tokens. A layout no SIMD kernel handles runs the scalar twin here
/// (`false`, `vals` written); a slice shorter than the kernel reads is a caller bug and
/// panics (never a read out of bounds).
#[allow(clippy::too_many_arguments)]
pub(super) fn simd_can_run(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
    nt: usize,
    vals: &mut [[f32; GROUP]; 8],
) -> bool {
    if !handled(l) {
        scalar_twin(l, cells, qs, d, sums, nsb, nt, vals);
        return false;
    }
    assert!(
        nt <= 8
            && cells.len() >= nsb * l.cell_bytes()
            && qs.len() >= nt * nsb * l.sb
            && d.len() >= nt * nsb
            && sums.len() >= nt * nsb * l.n_sub()
    );
    true
}

/// The offset factor `k` of a layout [`five32`] handles (Q5_0, Q5_1: 5 bits, 32-element
/// cells, no scales, the offset `k·Σx`), or `None`.
fn five32_offset(l: &KLayout) -> Option<i32> {
    match (l.bits, l.sb, l.scaled, l.offset) {
        (5, 32, false, Offset::Sum(k)) => Some(k),
        _ => None,
    }
}

/// Eight rows' i8 sub-block scales at `p`, each widened to an (i16, i16) pair per i32 lane:
/// a `vpmaddwd` by it multiplies a lane's two i16 sums by its row's scale and adds them.
///
/// # Safety
///
/// AVX2; `p` must be readable for 8 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scale_pairs(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    let v = _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) });
    _mm256_blend_epi16::<0xAA>(v, _mm256_slli_epi32::<16>(v))
}

/// The bits of every byte of `plane` from bit `bit` on moved to bit `to` on, those in
/// `mask` kept (the rest cleared). With the arguments used here (`to` 4, masks `0x10` and
/// `0x30`, shifts from 4 left to 3 right), the bits a 16-bit shift carries across bytes
/// land below bit 4 or above the mask's bits, which it clears.
#[inline]
#[target_feature(enable = "avx2")]
fn high_bits(plane: __m256i, bit: i32, to: i32, mask: i8) -> __m256i {
    let sh = to - bit;
    let v = if sh >= 0 {
        _mm256_sll_epi16(plane, _mm_cvtsi32_si128(sh))
    } else {
        _mm256_srl_epi16(plane, _mm_cvtsi32_si128(-sh))
    };
    _mm256_and_si256(v, _mm256_set1_epi8(mask))
}

/// `Σ_s v_s·xs_s` per lane over `ns` (even) sub-blocks, the i8 values `v` laid out
/// `[sub-block][row]` (16 bytes apart) from `p` (this half's first row), one `vpmaddwd` per
/// two sub-blocks against their two i16 sums read as one i32.
///
/// # Safety
///
/// AVX2; `p` readable for `16·(ns − 1) + 8` bytes, `xs` for `ns` i16s.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair_dot(p: *const u8, xs: *const i16, ns: usize) -> __m256i {
    let mut r = _mm256_setzero_si256();
    for pr in 0..ns / 2 {
        // SAFETY: the caller's contract.
        unsafe {
            let a = _mm_loadl_epi64(p.add(GROUP * 2 * pr).cast());
            let b = _mm_loadl_epi64(p.add(GROUP * (2 * pr + 1)).cast());
            let v = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
            let x = _mm256_set1_epi32(xs.add(2 * pr).cast::<i32>().read_unaligned());
            r = _mm256_add_epi32(r, _mm256_madd_epi16(v, x));
        }
    }
    r
}

/// The `BITS`-bit levels of this half's rows in the 32-element run at `base`: `lo[j]` lane
/// `r` holds row `r`'s elements `4j..4j + 4`, `hi[j]` its elements `4j + 16..4j + 20`.
///
/// # Safety
///
/// AVX2; `base` must be readable for the run's `64·BITS` bytes; `half` < 2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run_levels<const BITS: u32>(
    base: *const u8,
    half: usize,
) -> ([__m256i; 4], [__m256i; 4]) {
    let low = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    // SAFETY: the caller's contract: the planes and the nibble vectors are inside the run.
    unsafe {
        // 5 bits: one plane of fifth bits; 6 bits: the low elements' two high bits, then
        // the high elements'.
        let p4 = if BITS >= 5 {
            _mm256_loadu_si256(base.add(256 + 32 * half).cast())
        } else {
            zero
        };
        let p5 = if BITS == 6 {
            _mm256_loadu_si256(base.add(320 + 32 * half).cast())
        } else {
            zero
        };
        let mut lo = [zero; 4];
        let mut hi = [zero; 4];
        for j in 0..4 {
            let v = _mm256_loadu_si256(base.add(64 * j + 32 * half).cast());
            lo[j] = _mm256_and_si256(v, low);
            hi[j] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            let b = 2 * j as i32;
            if BITS == 5 {
                lo[j] = _mm256_or_si256(lo[j], high_bits(p4, b, 4, 0x10));
                hi[j] = _mm256_or_si256(hi[j], high_bits(p4, b + 1, 4, 0x10));
            }
            if BITS == 6 {
                lo[j] = _mm256_or_si256(lo[j], high_bits(p4, b, 4, 0x30));
                hi[j] = _mm256_or_si256(hi[j], high_bits(p5, b, 4, 0x30));
            }
        }
        (lo, hi)
    }
}

/// The scale pairs ([`scale_pairs`]) of this half's rows for run `run` of a scaled layout
/// with `sc` its scales' start: the low and the high elements' sub-blocks (Q6_K's two
/// sub-blocks of 16), or the run's one sub-block twice.
///
/// # Safety
///
/// AVX2; `sc` must hold the cell's scales (16 bytes per sub-block); `half` < 2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run_scales<const BITS: u32>(
    sc: *const u8,
    run: usize,
    half: usize,
) -> (__m256i, __m256i) {
    // SAFETY: the caller's contract: the run's sub-blocks are inside the scales.
    unsafe {
        if BITS == 6 {
            (
                scale_pairs(sc.add(GROUP * 2 * run + HALF * half)),
                scale_pairs(sc.add(GROUP * (2 * run + 1) + HALF * half)),
            )
        } else {
            let p = scale_pairs(sc.add(GROUP * run + HALF * half));
            (p, p)
        }
    }
}

/// One token's exact integer sum over a 32-element run for this half's rows: the levels
/// `lo`, `hi` ([`run_levels`]) against the token's 32 bytes at `xp`, the i16 sums flushed by
/// a `vpmaddwd` by the scale pairs `(sp0, sp1)` (low and high elements') before they could
/// overflow (see the module's notes).
///
/// # Safety
///
/// AVX2; `xp` must be readable for 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run_isum<const BITS: u32>(
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
    xp: *const i8,
    (sp0, sp1): (__m256i, __m256i),
) -> __m256i {
    let sub16 = BITS == 6;
    let zero = _mm256_setzero_si256();
    let mut isum = zero;
    let mut s_lo = zero;
    let mut s_hi = zero;
    for j in 0..4 {
        // SAFETY: the caller's contract: `4j + 16 + 4 ≤ 32`.
        let (xl, xh) = unsafe {
            (
                _mm256_set1_epi32(xp.add(4 * j).cast::<i32>().read_unaligned()),
                _mm256_set1_epi32(xp.add(4 * j + 16).cast::<i32>().read_unaligned()),
            )
        };
        if sub16 {
            s_lo = _mm256_add_epi16(s_lo, _mm256_maddubs_epi16(lo[j], xl));
            s_hi = _mm256_add_epi16(s_hi, _mm256_maddubs_epi16(hi[j], xh));
        } else {
            let p = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo[j], xl),
                _mm256_maddubs_epi16(hi[j], xh),
            );
            s_lo = _mm256_add_epi16(s_lo, p);
        }
        if j == 3 || (BITS > 4 && j == 1) {
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(s_lo, sp0));
            s_lo = zero;
            if sub16 {
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(s_hi, sp1));
                s_hi = zero;
            }
        }
    }
    isum
}

/// Rows `8·half..8·half + 8` of the group × `T` tokens over `nsb` super-blocks of `BITS`-bit
/// levels; returns `[token][row in half]`.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; `half` < 2; `l` handled with `l.bits == BITS`;
/// `cells` must hold `nsb` cells, `qs` `T·nsb·sb` bytes, `d` `T·nsb` scales and `sums`
/// `T·nsb·n_sub` sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_kernel<const T: usize, const BITS: u32>(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
    half: usize,
) -> [[f32; HALF]; T] {
    if BITS == 5
        && let Some(k) = five32_offset(l)
    {
        // SAFETY: the caller's contract, and the layout is the one `five32` handles.
        let [v] = unsafe { five32::<T, 1>(l, k, cells, qs, d, sums, nsb, half) };
        return v;
    }
    let (cb, ns, sb) = (l.cell_bytes(), l.n_sub(), l.sb);
    let (sc_at, runs_at, run_b) = (l.sc_at(), l.runs_at(), l.run_bytes());
    debug_assert!(half < 2 && l.bits == BITS && handled(l));
    debug_assert!(cells.len() >= nsb * cb && qs.len() >= T * nsb * sb && d.len() >= T * nsb);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let c = cells.as_ptr();
    let q = qs.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    for s in 0..nsb {
        // SAFETY: cell `s` is in bounds (`cells` holds `nsb` cells) and every offset below
        // is inside its `cb` bytes (the layout's offsets, `half` < 2); super-block `s` of
        // each token `t` < `T` (`sb` bytes of `qs`) is in bounds.
        unsafe {
            let cell = c.add(s * cb);
            let mut isum = [zero; T];
            for run in 0..sb / 32 {
                let base = cell.add(runs_at + run * run_b);
                let sp = if l.scaled {
                    run_scales::<BITS>(cell.add(sc_at), run, half)
                } else {
                    (ones, ones)
                };
                // The run's levels, unpacked once for all `T` tokens.
                let (lo, hi) = run_levels::<BITS>(base, half);
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xp = q.add((t * nsb + s) * sb + run * 32);
                    *isum = _mm256_add_epi32(*isum, run_isum::<BITS>(&lo, &hi, xp, sp));
                }
            }
            let a = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(2 * HALF * half).cast()));
            for (t, acc) in acc.iter_mut().enumerate() {
                let mut tot = isum[t];
                if !l.b_stored {
                    // `b = a`: the offset joins the integer sum.
                    tot = _mm256_add_epi32(
                        tot,
                        offset(l, cell, &sums[(t * nsb + s) * ns..][..ns], half),
                    );
                }
                let dd = _mm256_mul_ps(a, _mm256_set1_ps(d[t * nsb + s]));
                *acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(tot), *acc);
            }
        }
    }
    let mut out = [[0f32; HALF]; T];
    for (t, (o, a)) in out.iter_mut().zip(acc).enumerate() {
        let mut acc_m = _mm256_setzero_ps();
        if l.b_stored {
            for s in 0..nsb {
                // SAFETY: as above: cell `s`'s `b`, scales and minimums are inside its bytes.
                let (b, imin) = unsafe {
                    let cell = c.add(s * cb);
                    let b = _mm256_cvtph_ps(_mm_loadu_si128(
                        cell.add(l.b_at() + 2 * HALF * half).cast(),
                    ));
                    (b, offset(l, cell, &sums[(t * nsb + s) * ns..][..ns], half))
                };
                let dd = _mm256_mul_ps(b, _mm256_set1_ps(d[t * nsb + s]));
                acc_m = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(imin), acc_m);
            }
        }
        // SAFETY: `o` is 8 f32s.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(a, acc_m)) };
    }
    out
}

/// One token (a decode step) against all 16 rows of the group in one pass over its cells:
/// each 64-byte vector is read whole (its two halves one after the other) and the cells
/// stream from memory once, where [`half_kernel`]'s two passes (one per half) leave the
/// memory idle while the second re-reads the cells from the caches. The same integer sums
/// and float operations per lane, in the same order, as [`half_kernel`] and the scalar twin.
///
/// # Safety
///
/// As [`half_kernel`] with `T` = 1, `l` a handled scaled layout (Q4_K, Q5_K, Q6_K).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_token<const BITS: u32>(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
) -> [f32; GROUP] {
    let (cb, ns, sb) = (l.cell_bytes(), l.n_sub(), l.sb);
    let (sc_at, runs_at, run_b, b_at) = (l.sc_at(), l.runs_at(), l.run_bytes(), l.b_at());
    debug_assert!(l.bits == BITS && l.scaled && handled(l));
    debug_assert!(cells.len() >= nsb * cb && qs.len() >= nsb * sb && d.len() >= nsb);
    debug_assert!(sums.len() >= nsb * ns);
    let pf_lines = cb.div_ceil(64).div_ceil(sb / 32);
    let zero = _mm256_setzero_si256();
    let (c, q) = (cells.as_ptr(), qs.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut acc_m = [_mm256_setzero_ps(); 2];
    for s in 0..nsb {
        // SAFETY: cell `s` is in bounds (`cells` holds `nsb` cells) and every offset below
        // is inside its `cb` bytes (the layout's offsets); super-block `s` (`sb` bytes of
        // `qs`, one scale, `ns` sums) is in bounds.
        unsafe {
            let cell = c.add(s * cb);
            let mut isum = [zero; 2];
            for run in 0..sb / 32 {
                let base = cell.add(runs_at + run * run_b);
                let xp = q.add(s * sb + run * 32);
                // The cell's lines, spread over its runs (its header included).
                prefetch_ahead(cell.wrapping_add(run * pf_lines * 64), pf_lines);
                for (half, isum) in isum.iter_mut().enumerate() {
                    let sp = run_scales::<BITS>(cell.add(sc_at), run, half);
                    let (lo, hi) = run_levels::<BITS>(base, half);
                    *isum = _mm256_add_epi32(*isum, run_isum::<BITS>(&lo, &hi, xp, sp));
                }
            }
            let dx = _mm256_set1_ps(d[s]);
            let xs = &sums[s * ns..][..ns];
            for half in 0..2 {
                let a = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(2 * HALF * half).cast()));
                let dd = _mm256_mul_ps(a, dx);
                if l.b_stored {
                    acc[half] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum[half]), acc[half]);
                    let b =
                        _mm256_cvtph_ps(_mm_loadu_si128(cell.add(b_at + 2 * HALF * half).cast()));
                    let imin = offset(l, cell, xs, half);
                    acc_m[half] = _mm256_fmadd_ps(
                        _mm256_mul_ps(b, dx),
                        _mm256_cvtepi32_ps(imin),
                        acc_m[half],
                    );
                } else {
                    // `b = a`: the offset joins the integer sum.
                    let tot = _mm256_add_epi32(isum[half], offset(l, cell, xs, half));
                    acc[half] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(tot), acc[half]);
                }
            }
        }
    }
    let mut out = [0f32; GROUP];
    for half in 0..2 {
        // SAFETY: `out[8·half..]` holds 8 f32s.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr().add(HALF * half),
                _mm256_add_ps(acc[half], acc_m[half]),
            )
        };
    }
    out
}

/// [`half_kernel`] for the 32-element layouts of unscaled 5-bit levels with an offset
/// `k·Σx` (Q5_0, Q5_1): a cell is one run, so its float work is done in the token loop while
/// the run's integer sum is still in a register (the general kernel keeps every token's sums
/// in memory until the cell's last run and reads the offset's sums through slices). The
/// same integer sums and the same float operations per lane in the same order as the
/// general kernel and the scalar twin: bit-identical results.
///
/// `H` halves from `half0` on: one (`half0`'s) per pass, or both in one pass over the cells
/// for one token (a decode step; as in [`one_token`], each cell is then read once, and
/// prefetched ahead).
///
/// # Safety
///
/// As [`half_kernel`], with `l` a handled layout of 5 bits, `sb = 32`, no scales and the
/// offset `Offset::Sum(k)`; `half0 + H` ≤ 2.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn five32<const T: usize, const H: usize>(
    l: &KLayout,
    k: i32,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
    half0: usize,
) -> [[[f32; HALF]; T]; H] {
    let (cb, runs_at, b_at) = (l.cell_bytes(), l.runs_at(), l.b_at());
    debug_assert!(half0 + H <= 2 && l.bits == 5 && l.sb == 32 && l.n_sub() == 1 && !l.scaled);
    debug_assert!(cells.len() >= nsb * cb && qs.len() >= T * nsb * 32 && d.len() >= T * nsb);
    debug_assert!(sums.len() >= T * nsb);
    let ones = _mm256_set1_epi16(1);
    let (c, q, dp, sp) = (cells.as_ptr(), qs.as_ptr(), d.as_ptr(), sums.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    let mut acc_m = [[_mm256_setzero_ps(); T]; H];
    for s in 0..nsb {
        let cell = c.wrapping_add(s * cb);
        if H == 2 {
            prefetch_ahead(cell, cb.div_ceil(64));
        }
        for (hh, (acc, acc_m)) in acc.iter_mut().zip(acc_m.iter_mut()).enumerate() {
            let half = half0 + hh;
            // SAFETY: cell `s` is in bounds (`cells` holds `nsb` cells) and every offset
            // below is inside its `cb` bytes (the layout's offsets, `half` < 2); block `s` of
            // each token `t` < `T` (32 bytes of `qs`, one scale of `d`, one sum of `sums`) is
            // in bounds.
            unsafe {
                let base = cell.add(runs_at);
                let (lo, hi) = run_levels::<5>(base, half);
                let a = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(2 * HALF * half).cast()));
                let bm = if l.b_stored {
                    _mm256_cvtph_ps(_mm_loadu_si128(cell.add(b_at + 2 * HALF * half).cast()))
                } else {
                    a
                };
                for t in 0..T {
                    let blk = t * nsb + s;
                    let xp = q.add(blk * 32);
                    let x = |o: usize| _mm256_set1_epi32(xp.add(o).cast::<i32>().read_unaligned());
                    let pair = |j: usize| {
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo[j], x(4 * j)),
                            _mm256_maddubs_epi16(hi[j], x(4 * j + 16)),
                        )
                    };
                    // Two pairs of vectors per i16 flush: at most 4·2·31·127 < 2^15.
                    let isum = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_add_epi16(pair(0), pair(1)), ones),
                        _mm256_madd_epi16(_mm256_add_epi16(pair(2), pair(3)), ones),
                    );
                    let imin = _mm256_set1_epi32(k * i32::from(sp.add(blk).read()));
                    let dt = _mm256_set1_ps(dp.add(blk).read());
                    if l.b_stored {
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_mul_ps(a, dt), _mm256_cvtepi32_ps(isum), acc[t]);
                        acc_m[t] = _mm256_fmadd_ps(
                            _mm256_mul_ps(bm, dt),
                            _mm256_cvtepi32_ps(imin),
                            acc_m[t],
                        );
                    } else {
                        // `b = a`: the offset joins the integer sum.
                        let tot = _mm256_add_epi32(isum, imin);
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_mul_ps(a, dt), _mm256_cvtepi32_ps(tot), acc[t]);
                    }
                }
            }
        }
    }
    let mut out = [[[0f32; HALF]; T]; H];
    for (out, (acc, acc_m)) in out.iter_mut().zip(acc.iter().zip(&acc_m)) {
        for ((o, a), m) in out.iter_mut().zip(acc).zip(acc_m) {
            // SAFETY: `o` is 8 f32s.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(*a, *m)) };
        }
    }
    out
}

/// The offset's integer `imin` of this half's rows for one cell and token (`xs`: the
/// token's sub-block sums of this super-block).
///
/// # Safety
///
/// AVX2; `cell` must hold a whole cell of the handled layout `l`; `half` < 2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn offset(l: &KLayout, cell: *const u8, xs: &[i16], half: usize) -> __m256i {
    let ns = l.n_sub();
    debug_assert!(xs.len() >= ns);
    // SAFETY: the minimums and scales are inside the cell (the layout's offsets); `xs`
    // holds `ns` sums.
    unsafe {
        match l.offset {
            Offset::Mins => pair_dot(cell.add(l.mn_at() + HALF * half), xs.as_ptr(), ns),
            Offset::Scales(k) => _mm256_mullo_epi32(
                pair_dot(cell.add(l.sc_at() + HALF * half), xs.as_ptr(), ns),
                _mm256_set1_epi32(k),
            ),
            Offset::Sum(k) => _mm256_set1_epi32(k * xs.iter().map(|&v| i32::from(v)).sum::<i32>()),
        }
    }
}
