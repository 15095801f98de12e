//! Attention kernels over runs of the paged f16 KV cache, for the AVX2 and the AVX-512
//! tables: the scores of one query against a run of keys (`dot_f16_rows`) and a run of
//! values weighted into an output row (`axpy_f16_rows`). A run is one KV head's slots at
//! consecutive pool positions (one KV block, or several that follow each other): `hd`
//! elements every `stride` (the pool's `kv_dim`).
//!
//! Scores: several keys at a time (one accumulator each), the query chunk loaded once per
//! step for all of them, one horizontal sum per key at the end. Values: the output row stays
//! in registers (up to 64 f32 lanes at a time) while every weighted value row is added to
//! it, one fused multiply-add per element and row, in row order: each output element gets
//! the same operations as a sequence of single-row `axpy_f16` calls.
//!
//! Both levels prefetch the rows they will read a few KiB ahead ([`rows_ahead`]).
//!
//! Both are written for a KV head's query heads together (`dot_f16_rows_group`,
//! `axpy_f16_rows_group`): each key or value chunk is loaded and converted once for all of
//! them, while every (query, key) pair and output lane gets the same operations whatever
//! the group's size, so one query (`dot_f16_rows`, `axpy_f16_rows`: a group of one) has the
//! same bits as in a group. The AVX-512 kernels are built the same way, 16 lanes a step.

use std::arch::x86_64::*;

use half::f16;

use super::helpers::{PREFETCH_AHEAD, hsum_float_8, prefetch_span};
use crate::arch::portable::{self, rows_that_fit};
use crate::formats::QK;

/// Keys scored together (one accumulator each).
const KEYS: usize = 4;

/// Rows ahead of the one being read that the f16 run kernels prefetch: about
/// [`PREFETCH_AHEAD`] bytes of the cache. A run's rows are `stride` halves apart (every KV
/// head's slots of a position), so the hardware's stream prefetchers, which stop at every
/// 4 KiB page, keep too few of them in flight at depth. Measured with the `attn_bandwidth`
/// example (SmolLM2's shape at depth 8,000, best of 3-5, alternated): 8,192 bytes ahead
/// read the cache 1.15-1.25x faster than no prefetch on 2 threads and 1.05-1.3x on one;
/// 4,096 gained less, 16,384 about as much.
fn rows_ahead(stride: usize) -> usize {
    (PREFETCH_AHEAD / (2 * stride).max(1)).max(1)
}

// ---------------------------------------------------------------------------------------
// Safe wrappers (table entries). The AVX2 ones are reachable only through the AVX2 table
// (and the AVX-512 table built on it), handed out after checking AVX2, FMA and F16C; the
// AVX-512 ones only through the AVX-512 table, handed out after checking AVX-512 F, BW and
// VL besides. Row counts are clamped to the rows every slice holds (`rows_that_fit`), so
// every pointer access stays in bounds.
// ---------------------------------------------------------------------------------------

/// One query: the group kernel with a group of one.
pub(crate) fn dot_f16_rows(q: &[f16], k: &[f16], stride: usize, out: &mut [f32]) {
    if q.is_empty() {
        // Empty dot products (no query to group by its size).
        let n = rows_that_fit(k.len(), 0, stride, out.len());
        out[..n].fill(0.0);
        return;
    }
    let n = out.len();
    dot_f16_rows_group(q, q.len(), k, stride, n, out, n);
}

/// One output row: the group kernel with a group of one.
pub(crate) fn axpy_f16_rows(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    axpy_f16_rows_group(y, y.len(), w, w.len(), w.len(), v, stride);
}

pub(crate) fn dot_f16_rows_group(
    q: &[f16],
    hd: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(k.len(), hd, stride, n);
    // The queries whose `n` scores `out` holds.
    let groups = portable::pieces_that_fit(q.len() / hd, out_stride, n, out.len());
    let mut g0 = 0;
    while g0 < groups {
        let qp = q[g0 * hd..].as_ptr().cast::<u16>();
        let take = (groups - g0).min(4);
        let o = &mut out[g0 * out_stride..];
        // SAFETY (every arm): CPU features checked by the table; queries g0..g0 + take
        // are in `q` (`hd` each), keys 0..n are in bounds (`rows_that_fit`).
        match take {
            // SAFETY: see above.
            4 => unsafe {
                dot_group_rows::<4, 2>(qp, hd, k.as_ptr().cast(), stride, n, o, out_stride)
            },
            // SAFETY: see above.
            3 => unsafe {
                dot_group_rows::<3, 2>(qp, hd, k.as_ptr().cast(), stride, n, o, out_stride)
            },
            // SAFETY: see above.
            2 => unsafe {
                dot_group_rows::<2, 4>(qp, hd, k.as_ptr().cast(), stride, n, o, out_stride)
            },
            // SAFETY: see above.
            _ => unsafe {
                dot_group_rows::<1, 4>(qp, hd, k.as_ptr().cast(), stride, n, o, out_stride)
            },
        }
        g0 += take;
    }
}

/// Keys `0..n` against `G` queries, `R` keys at a time then one at a time; query `g`'s
/// score of key `j` into `out[g * out_stride + j]` (checked indexing).
///
/// # Safety
///
/// AVX2, FMA and F16C; `q` readable for `G * hd` u16, `k` for `hd` u16 from each
/// `j * stride`, `j < n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_group_rows<const G: usize, const R: usize>(
    q: *const u16,
    hd: usize,
    k: *const u16,
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let ahead = rows_ahead(stride);
    let mut j = 0;
    while j + R <= n {
        for r in 0..R {
            prefetch_span(k.wrapping_add((j + r + ahead) * stride).cast(), 2 * hd);
        }
        // SAFETY: keys j..j + R are below `n` (the caller's contract).
        let s = unsafe { dot_keys_group_avx2::<G, R>(q, hd, k.add(j * stride), stride) };
        for (g, s) in s.iter().enumerate() {
            out[g * out_stride + j..][..R].copy_from_slice(s);
        }
        j += R;
    }
    while j < n {
        // SAFETY: key j is below `n`.
        let s = unsafe { dot_keys_group_avx2::<G, 1>(q, hd, k.add(j * stride), stride) };
        for (g, s) in s.iter().enumerate() {
            out[g * out_stride + j] = s[0];
        }
        j += 1;
    }
}

/// The dots of `G` queries (`hd` apart from `q`) with `R` keys `stride` apart from `k`:
/// each key chunk converted once, then per (query, key) 8 lanes per step by fused
/// multiply-adds, one horizontal sum, and the tail of `hd % 8` elements in f32 added after
/// it: the same operations whatever `G` and `R`, so every score has the bits of a group of
/// one.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `q` readable for `G * hd` u16, and `k` for `hd`
/// u16 from each `r * stride`, `r < R`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_keys_group_avx2<const G: usize, const R: usize>(
    q: *const u16,
    hd: usize,
    k: *const u16,
    stride: usize,
) -> [[f32; R]; G] {
    let body = hd & !7;
    let mut acc = [[_mm256_setzero_ps(); R]; G];
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= hd elements of every query and every key are readable.
        unsafe {
            let qv: [__m256; G] =
                std::array::from_fn(|g| _mm256_cvtph_ps(_mm_loadu_si128(q.add(g * hd + i).cast())));
            for r in 0..R {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.add(r * stride + i).cast()));
                for (a, qv) in acc.iter_mut().zip(&qv) {
                    a[r] = _mm256_fmadd_ps(*qv, kv, a[r]);
                }
            }
        }
        i += 8;
    }
    let mut out = [[0f32; R]; G];
    for (g, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        for (r, (o, a)) in o.iter_mut().zip(a).enumerate() {
            let mut tail = 0f32;
            for t in body..hd {
                // SAFETY: t < hd.
                let (x, y) = unsafe {
                    (
                        q.add(g * hd + t).read_unaligned(),
                        k.add(r * stride + t).read_unaligned(),
                    )
                };
                tail += f16::from_bits(x).to_f32() * f16::from_bits(y).to_f32();
            }
            *o = hsum_float_8(*a) + tail;
        }
    }
    out
}

pub(crate) fn axpy_f16_rows_group(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: &[f16],
    stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(v.len(), hd, stride, n);
    // The output rows whose `n` weights `w` holds.
    let groups = portable::pieces_that_fit(y.len() / hd, w_stride, n, w.len());
    let mut g0 = 0;
    while g0 < groups {
        let take = (groups - g0).min(4);
        let ys = &mut y[g0 * hd..(g0 + take) * hd];
        let ws = &w[g0 * w_stride..];
        // SAFETY (every arm): CPU features checked by the table; `ys` holds `take` rows of
        // `hd`, `ws` their `n` weights `w_stride` apart, value rows 0..n are in bounds.
        match take {
            // SAFETY: see above.
            4 => unsafe {
                axpy_group_rows::<4, 2>(ys, hd, ws, w_stride, n, v.as_ptr().cast(), stride)
            },
            // SAFETY: see above.
            3 => unsafe {
                axpy_group_rows::<3, 2>(ys, hd, ws, w_stride, n, v.as_ptr().cast(), stride)
            },
            // SAFETY: see above.
            2 => unsafe {
                axpy_group_rows::<2, 4>(ys, hd, ws, w_stride, n, v.as_ptr().cast(), stride)
            },
            // SAFETY: see above.
            _ => unsafe {
                axpy_group_rows::<1, 4>(ys, hd, ws, w_stride, n, v.as_ptr().cast(), stride)
            },
        }
        g0 += take;
    }
}

/// `y_g[i] += Σ_j w_g[j] * v_j[i]` for `G` rows at once (`y` holds them, `hd` each; row
/// `g`'s weights `w[g * w_stride..][..n]`): `8 * L` lanes of every row in registers, each
/// value chunk converted once for all rows, then 8 lanes, then the scalar tail; every lane
/// gets one fused multiply-add per value row, in row order, whatever `G` and `L` (the bits
/// of a group of one).
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `y.len() == G * hd`; `w` holds
/// `(G - 1) * w_stride + n` weights; `v` readable for `hd` u16 from each `j * stride`,
/// `j < n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_group_rows<const G: usize, const L: usize>(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: *const u16,
    stride: usize,
) {
    debug_assert_eq!(y.len(), G * hd);
    let yp = y.as_mut_ptr();
    let ws: [&[f32]; G] = std::array::from_fn(|g| &w[g * w_stride..][..n]);
    let mut c = 0;
    while c + 8 * L <= hd {
        // SAFETY: lanes c..c + 8L of every row of `y` and of every value row are in bounds.
        unsafe { axpy_lanes_group_avx2::<G, L>(yp.add(c), hd, &ws, v.add(c), stride) };
        c += 8 * L;
    }
    while c + 8 <= hd {
        // SAFETY: lanes c..c + 8 are in bounds.
        unsafe { axpy_lanes_group_avx2::<G, 1>(yp.add(c), hd, &ws, v.add(c), stride) };
        c += 8;
    }
    while c < hd {
        for (g, w) in ws.iter().enumerate() {
            let mut acc = y[g * hd + c];
            for (j, &a) in w.iter().enumerate() {
                // SAFETY: element c of value row j is in bounds.
                let x = unsafe { v.add(j * stride + c).read_unaligned() };
                acc += f16::from_bits(x).to_f32() * a;
            }
            y[g * hd + c] = acc;
        }
        c += 1;
    }
}

/// `8 * L` lanes of `G` rows (`hd` apart from `y`) of [`axpy_group_rows`].
///
/// # Safety
///
/// `y` readable and writable for `8 * L` f32 from each `g * hd`, `v` readable for `8 * L`
/// u16 from each `j * stride`, `j < ws[g].len()` (all the same length); AVX2, FMA and F16C
/// available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `j` walks every row's weights and the value rows
unsafe fn axpy_lanes_group_avx2<const G: usize, const L: usize>(
    y: *mut f32,
    hd: usize,
    ws: &[&[f32]; G],
    v: *const u16,
    stride: usize,
) {
    let n = ws[0].len();
    let ahead = rows_ahead(stride) * stride;
    // SAFETY: bounds by the caller's contract.
    unsafe {
        let mut acc: [[__m256; L]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|l| _mm256_loadu_ps(y.add(g * hd + 8 * l)))
        });
        for j in 0..n {
            let va: [__m256; G] = std::array::from_fn(|g| _mm256_set1_ps(ws[g][j]));
            let row = v.add(j * stride);
            prefetch_span(row.wrapping_add(ahead).cast(), 16 * L);
            for l in 0..L {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * l).cast()));
                for (s, va) in acc.iter_mut().zip(&va) {
                    s[l] = _mm256_fmadd_ps(x, *va, s[l]);
                }
            }
        }
        for (g, s) in acc.iter().enumerate() {
            for (l, s) in s.iter().enumerate() {
                _mm256_storeu_ps(y.add(g * hd + 8 * l), *s);
            }
        }
    }
}

pub(crate) fn dot_f16_rows_group_512(
    q: &[f16],
    hd: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(k.len(), hd, stride, n);
    // The queries whose `n` scores `out` holds.
    let groups = portable::pieces_that_fit(q.len() / hd, out_stride, n, out.len());
    let kp = k.as_ptr().cast::<u16>();
    let mut g0 = 0;
    while g0 < groups {
        let qp = q[g0 * hd..].as_ptr().cast::<u16>();
        let take = (groups - g0).min(4);
        let o = &mut out[g0 * out_stride..];
        // SAFETY (every arm): CPU features checked by the AVX-512 table; queries
        // g0..g0 + take are in `q` (`hd` each), keys 0..n are in bounds (`rows_that_fit`).
        match take {
            // SAFETY: see above.
            4 => unsafe { dot_group_rows_512::<4>(qp, hd, kp, stride, n, o, out_stride) },
            // SAFETY: see above.
            3 => unsafe { dot_group_rows_512::<3>(qp, hd, kp, stride, n, o, out_stride) },
            // SAFETY: see above.
            2 => unsafe { dot_group_rows_512::<2>(qp, hd, kp, stride, n, o, out_stride) },
            // SAFETY: see above.
            _ => unsafe { dot_group_rows_512::<1>(qp, hd, kp, stride, n, o, out_stride) },
        }
        g0 += take;
    }
}

pub(crate) fn axpy_f16_rows_group_512(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: &[f16],
    stride: usize,
) {
    if hd == 0 {
        return;
    }
    let n = rows_that_fit(v.len(), hd, stride, n);
    // The output rows whose `n` weights `w` holds.
    let groups = portable::pieces_that_fit(y.len() / hd, w_stride, n, w.len());
    let vp = v.as_ptr().cast::<u16>();
    let mut g0 = 0;
    while g0 < groups {
        let take = (groups - g0).min(4);
        let ys = &mut y[g0 * hd..(g0 + take) * hd];
        let ws = &w[g0 * w_stride..];
        // SAFETY (every arm): CPU features checked by the AVX-512 table; `ys` holds `take`
        // rows of `hd`, `ws` their `n` weights `w_stride` apart, value rows 0..n are in
        // bounds.
        match take {
            // SAFETY: see above.
            4 => unsafe { axpy_group_rows_512::<4>(ys, hd, ws, w_stride, n, vp, stride) },
            // SAFETY: see above.
            3 => unsafe { axpy_group_rows_512::<3>(ys, hd, ws, w_stride, n, vp, stride) },
            // SAFETY: see above.
            2 => unsafe { axpy_group_rows_512::<2>(ys, hd, ws, w_stride, n, vp, stride) },
            // SAFETY: see above.
            _ => unsafe { axpy_group_rows_512::<1>(ys, hd, ws, w_stride, n, vp, stride) },
        }
        g0 += take;
    }
}

/// One query: the AVX-512 group kernel with a group of one.
pub(crate) fn dot_f16_rows_512(q: &[f16], k: &[f16], stride: usize, out: &mut [f32]) {
    if q.is_empty() {
        // Empty dot products (no query to group by its size).
        let n = rows_that_fit(k.len(), 0, stride, out.len());
        out[..n].fill(0.0);
        return;
    }
    let n = out.len();
    dot_f16_rows_group_512(q, q.len(), k, stride, n, out, n);
}

/// One output row: the AVX-512 group kernel with a group of one.
pub(crate) fn axpy_f16_rows_512(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    axpy_f16_rows_group_512(y, y.len(), w, w.len(), w.len(), v, stride);
}

pub(crate) fn dot_q8_0_rows(
    qs: &[i8],
    dq: &[f32],
    k: &[i8],
    d: &[f16],
    stride: usize,
    out: &mut [f32],
) {
    let nb = (qs.len() / QK).min(dq.len());
    let rows = portable::q8_rows_that_fit(k.len(), d.len(), nb * QK, stride, out.len());
    // SAFETY: CPU features checked by the table; rows `0..rows` of `k` (`32·nb` values from
    // `j·stride`) and their `nb` scales are in bounds (`q8_rows_that_fit`), `qs`/`dq` hold
    // `nb` blocks.
    unsafe {
        dot_q8_rows_avx2(
            qs.as_ptr(),
            &dq[..nb],
            k.as_ptr(),
            d.as_ptr().cast(),
            stride,
            &mut out[..rows],
        );
    }
}

pub(crate) fn axpy_q8_0_rows(y: &mut [f32], w: &[f32], v: &[i8], d: &[f16], stride: usize) {
    let n = y.len() / QK * QK;
    let rows = portable::q8_rows_that_fit(v.len(), d.len(), n, stride, w.len());
    if rows == 0 || n == 0 {
        return;
    }
    // SAFETY: CPU features checked by the table; rows `0..rows` of `v` (`n` values from
    // `j·stride`) and their scales (`n / 32` from `j·stride / 32`) are in bounds, `y` holds
    // `n` floats and `w` `rows` weights.
    unsafe {
        axpy_q8_rows_avx2(
            y.as_mut_ptr(),
            &w[..rows],
            v.as_ptr(),
            d.as_ptr().cast(),
            stride,
            n / QK,
        );
    }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------

/// Eight i8 values at `p` as f32.
///
/// # Safety
///
/// AVX2; `p` readable for 8 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn i8x8_to_ps(p: *const i8) -> __m256 {
    // SAFETY: the caller's contract.
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) }))
}

/// Rows `0..out.len()` of [`dot_q8_0_rows`]: per row and block the exact integer sum, then
/// the scalar twin's `s = fma(d_q·d_k, isum, s)`, so the results are bit-identical to it.
///
/// # Safety
///
/// AVX2, FMA and F16C; `qs` readable for `32·dq.len()` bytes; for each row `j`, `k` for
/// `32·dq.len()` bytes from `j·stride` and `d` for `dq.len()` f16s from `j·stride / 32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_rows_avx2(
    qs: *const i8,
    dq: &[f32],
    k: *const i8,
    d: *const u16,
    stride: usize,
    out: &mut [f32],
) {
    for (j, o) in out.iter_mut().enumerate() {
        let mut s = 0f32;
        for (b, &sq) in dq.iter().enumerate() {
            // SAFETY: block `b` of the query and of row `j` is in bounds (the contract).
            unsafe {
                let sk = f16::from_bits(d.add(j * stride / QK + b).read_unaligned()).to_f32();
                let isum = dot_i8_32(qs.add(QK * b), k.add(j * stride + QK * b));
                s = (sq * sk).mul_add(isum as f32, s);
            }
        }
        *o = s;
    }
}

/// The exact `Σ_i a[i]·b[i]` of 32 signed bytes each (values in -127..=127): `vpsignb`
/// moves `a`'s signs onto `b` so that `vpmaddubsw` multiplies |a| (unsigned) by them, a pair
/// at most 2·127·127 < 2^15.
///
/// # Safety
///
/// AVX2; `a` and `b` readable for 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_32(a: *const i8, b: *const i8) -> i32 {
    // SAFETY: the caller's contract.
    let (x, y) = unsafe { (_mm256_loadu_si256(a.cast()), _mm256_loadu_si256(b.cast())) };
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
    let s = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    let h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
    let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h));
    _mm_cvtsi128_si32(h)
}

/// For each row `j` in order, `y[32b + i] = fma(w[j]·d_j[b], v_j[32b + i], y[32b + i])`: the
/// scalar twin's operations lane for lane (bit-identical results), with each 32-element
/// block of `y` held in registers across all the rows.
///
/// # Safety
///
/// AVX2, FMA and F16C; `y` valid for `32·nb` floats; for each `j < w.len()`, `v` readable
/// for `32·nb` values from `j·stride` and `d` for `nb` f16s from `j·stride / 32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_q8_rows_avx2(
    y: *mut f32,
    w: &[f32],
    v: *const i8,
    d: *const u16,
    stride: usize,
    nb: usize,
) {
    for b in 0..nb {
        // SAFETY: block `b` of `y` and of every row is in bounds (the caller's contract).
        unsafe {
            let yb = y.add(b * QK);
            let mut acc: [__m256; QK / 8] = std::array::from_fn(|k| _mm256_loadu_ps(yb.add(8 * k)));
            for (j, &a) in w.iter().enumerate() {
                let sc = f16::from_bits(d.add(j * stride / QK + b).read_unaligned()).to_f32();
                let c = _mm256_set1_ps(a * sc);
                let vb = v.add(j * stride + b * QK);
                for (k, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(c, i8x8_to_ps(vb.add(8 * k)), *acc);
                }
            }
            for (k, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(yb.add(8 * k), *acc);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// AVX-512 F + BW + VL
// ---------------------------------------------------------------------------------------

/// The lanes of a 16-lane step at element `i` of `n`: all 16, or the `n - i` left.
#[inline]
fn lane_mask(i: usize, n: usize) -> __mmask16 {
    let left = n.saturating_sub(i);
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

/// Keys `0..n` against `G` queries, [`KEYS`] keys at a time then one at a time; query `g`'s
/// score of key `j` into `out[g * out_stride + j]` (checked indexing).
///
/// # Safety
///
/// AVX-512 F, BW and VL and F16C; `q` readable for `G * hd` u16, `k` for `hd` u16 from each
/// `j * stride`, `j < n`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn dot_group_rows_512<const G: usize>(
    q: *const u16,
    hd: usize,
    k: *const u16,
    stride: usize,
    n: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let ahead = rows_ahead(stride);
    let mut j = 0;
    while j + KEYS <= n {
        for r in 0..KEYS {
            prefetch_span(k.wrapping_add((j + r + ahead) * stride).cast(), 2 * hd);
        }
        // SAFETY: keys j..j + KEYS are below `n` (the caller's contract).
        let s = unsafe { dot_keys_group_512::<G, KEYS>(q, hd, k.add(j * stride), stride) };
        for (g, s) in s.iter().enumerate() {
            out[g * out_stride + j..][..KEYS].copy_from_slice(s);
        }
        j += KEYS;
    }
    while j < n {
        // SAFETY: key j is below `n`.
        let s = unsafe { dot_keys_group_512::<G, 1>(q, hd, k.add(j * stride), stride) };
        for (g, s) in s.iter().enumerate() {
            out[g * out_stride + j] = s[0];
        }
        j += 1;
    }
}

/// The dots of `G` queries (`hd` apart from `q`) with `R` keys `stride` apart from `k`: per
/// 16-lane step (the last one masked) each key chunk and each query chunk converted once,
/// then one fused multiply-add per (query, key), and one horizontal sum per pair at the end:
/// the same operations whatever `G` and `R`, so every score has the bits of a group of one.
///
/// # Safety
///
/// AVX-512 F, BW and VL and F16C; `q` readable for `G * hd` u16, `k` for `hd` u16 from each
/// `r * stride`, `r < R`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn dot_keys_group_512<const G: usize, const R: usize>(
    q: *const u16,
    hd: usize,
    k: *const u16,
    stride: usize,
) -> [[f32; R]; G] {
    let mut acc = [[_mm512_setzero_ps(); R]; G];
    let mut i = 0;
    while i < hd {
        let m = lane_mask(i, hd);
        // SAFETY: the lanes `m` selects (elements i.. < hd) are in bounds for every query
        // and every key; masked-off lanes are not accessed.
        unsafe {
            let qv: [__m512; G] = std::array::from_fn(|g| {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, q.add(g * hd + i).cast()))
            });
            for r in 0..R {
                let kv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, k.add(r * stride + i).cast()));
                for (a, qv) in acc.iter_mut().zip(&qv) {
                    a[r] = _mm512_fmadd_ps(*qv, kv, a[r]);
                }
            }
        }
        i += 16;
    }
    // Loops, not `map` closures: a closure may be compiled out of line (as the crate's code
    // units fall), and then each reduction is a call that takes its vector through memory
    // (seen: the spec-decoding verify step 10% slower in one build).
    let mut out = [[0f32; R]; G];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = _mm512_reduce_add_ps(*a);
        }
    }
    out
}

/// `y_g[i] += Σ_j w_g[j] * v_j[i]` for `G` rows at once (`y` holds them, `hd` each; row
/// `g`'s weights `w[g * w_stride..][..n]`): 64 lanes of every row in registers at a time
/// (the last ones masked), each value chunk converted once for all rows, then one fused
/// multiply-add per lane and value row, in row order, whatever `G` (the bits of a group of
/// one).
///
/// # Safety
///
/// AVX-512 F, BW and VL and F16C; `y.len() == G * hd`; `w` holds `(G - 1) * w_stride + n`
/// weights; `v` readable for `hd` u16 from each `j * stride`, `j < n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn axpy_group_rows_512<const G: usize>(
    y: &mut [f32],
    hd: usize,
    w: &[f32],
    w_stride: usize,
    n: usize,
    v: *const u16,
    stride: usize,
) {
    debug_assert_eq!(y.len(), G * hd);
    let yp = y.as_mut_ptr();
    let ws: [&[f32]; G] = std::array::from_fn(|g| &w[g * w_stride..][..n]);
    let ahead = rows_ahead(stride) * stride;
    let mut c = 0;
    while c < hd {
        let masks: [__mmask16; 4] = std::array::from_fn(|l| lane_mask(c + 16 * l, hd));
        // SAFETY: only the lanes `masks` select are accessed, all below `hd` in every row of
        // `y` and in every value row; pointers to lanes past the end are formed with
        // `wrapping_add` and never dereferenced (their mask is empty).
        unsafe {
            let mut acc: [[__m512; 4]; G] = std::array::from_fn(|g| {
                std::array::from_fn(|l| {
                    _mm512_maskz_loadu_ps(masks[l], yp.wrapping_add(g * hd + c + 16 * l))
                })
            });
            for j in 0..n {
                let row = v.wrapping_add(j * stride + c);
                prefetch_span(row.wrapping_add(ahead).cast(), 2 * (hd - c).min(64));
                let h: [__m512; 4] = std::array::from_fn(|l| {
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        masks[l],
                        row.wrapping_add(16 * l).cast(),
                    ))
                });
                for (s, w) in acc.iter_mut().zip(&ws) {
                    let va = _mm512_set1_ps(w[j]);
                    for (s, h) in s.iter_mut().zip(&h) {
                        *s = _mm512_fmadd_ps(*h, va, *s);
                    }
                }
            }
            for (g, s) in acc.iter().enumerate() {
                for (l, s) in s.iter().enumerate() {
                    _mm512_mask_storeu_ps(yp.wrapping_add(g * hd + c + 16 * l), masks[l], *s);
                }
            }
        }
        c += 64;
    }
}

// ---------------------------------------------------------------------------------------
// The softmax's exponentials: `crate::arch::portable::exp_poly` lane by lane, the same
// operations in the same order (fused multiply-adds where it has `mul_add`), so every lane
// equals the scalar twin's value bit for bit; the tail goes through the scalar function.
// The AVX-512 table uses this one too (no 16-lane variant: none could be run here).
// ---------------------------------------------------------------------------------------

pub(crate) fn exp_sum(x: &mut [f32], sub: f32) -> f32 {
    let whole = x.len() / 8 * 8;
    let (body, tail) = x.split_at_mut(whole);
    // SAFETY: CPU features checked by the table; `exp_sum_avx2` touches `body.len()`
    // elements, a multiple of 8.
    let mut sum = unsafe { exp_sum_avx2(body, sub) };
    for v in tail {
        *v = portable::exp_poly(*v - sub);
        sum += *v;
    }
    sum
}

/// # Safety
///
/// AVX2 and FMA must be available; `x.len()` a multiple of 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_avx2(x: &mut [f32], sub: f32) -> f32 {
    let vsub = _mm256_set1_ps(sub);
    let mut acc = _mm256_setzero_ps();
    for chunk in x.chunks_exact_mut(8) {
        // SAFETY: the chunk holds 8 f32.
        let v = _mm256_sub_ps(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, vsub);
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(v, _mm256_set1_ps(portable::EXP_LO));
        let v = _mm256_min_ps(v, _mm256_set1_ps(portable::EXP_HI));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            v,
            _mm256_set1_ps(portable::LOG2E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(portable::LN2_HI), v);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(portable::LN2_LO), r);
        let mut p = _mm256_set1_ps(portable::EXP_P[0]);
        for c in &portable::EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        // Lanes below EXP_LO may hold any n; they are masked to 0 below.
        let n = _mm256_max_ps(n, _mm256_set1_ps(-126.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let out = _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
        // SAFETY: as the load.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), out) };
        acc = _mm256_add_ps(acc, out);
    }
    hsum_float_8(acc)
}
