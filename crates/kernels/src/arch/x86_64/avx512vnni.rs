//! The AVX-512 table: the AVX2 kernels, with the Q4_0/Q4_1/Q8_0 dot products and matmul tiles
//! replaced by 512-bit VNNI versions, the packed-matrix kernels (this module's for Q4_0, Q4_1
//! and Q8_0 cells, `super::avx512_kpacked` for the K layouts), and 512-bit attention kernels
//! (`super::attn`). Chosen
//! when the CPU has AVX-512 F, BW, VL and VNNI besides what AVX2 needs.
//!
//! The tile body (see `crate::table::TileFn` for the contract) works on groups of 16
//! blocks:
//!
//! - Scales first: one masked gather per row reads the first four bytes of each of the 16
//!   blocks (the f16 `d`, and for Q4_1 the f16 `m` next to it), and one per token reads its
//!   activation scales (`d`, and for Q8_1 the f16 `s = d·Σq`); `vpmovdw` + `vcvtph2ps` turn
//!   them into 16 f32 lanes. This replaces two scalar loads and conversions per block and
//!   pair, which dominated the AVX2 loop.
//! - Then two blocks per 512-bit step: the two weight blocks' 32 nibble bytes are spread to
//!   64 bytes (128-bit lanes: low nibbles of block b, high nibbles of b, low of b+1, high of
//!   b+1: the element order of the activations), and one `vpdpbusd` per (row, token) gives
//!   16 i32 lanes, 8 per block, each the sum of four byte products. Those are converted to
//!   f32 and accumulated with `fma(d_w·d_x, lanes, acc)` where `d_w·d_x` is spread to its
//!   block's eight lanes by one `vpermps` from the gathered scales.
//! - Signed × signed does not exist in VNNI, so: Q4_0 computes `Σ n·x − 8·Σ x` (the `8·Σ x`
//!   lanes once per activation step, as the accumulator's start), and Q8_0 `Σ (w+128)·x −
//!   128·Σ x` (`w+128` by one XOR per weight step). Both are exact integer identities.
//! - Q4_1's `Σ m·s` term is one `fma(m, s, acc)` per 16 blocks (lane = block).
//!
//! Every (row, token) pair runs the same operation sequence whatever the tile shape, so a
//! pair's value is bit-identical in any tile and equals this table's single dot product
//! (which is the 1 × 1 tile), and results do not depend on batching or thread count. The
//! order of float additions differs from ggml's AVX2 loop (16 lanes instead of 8 plus a
//! scalar minimum sum), a difference of the same kind as llama.cpp's own batch vs
//! single-token kernels; the integer block sums are exactly ggml's.

use std::arch::x86_64::*;

use super::helpers::{Q4_0, Q4_1, Q8_0, prefetch_ahead, sizes};
use crate::formats::{CELL, CELL8, GROUP, Q8_M, XQ, vecs_at};
use crate::table::{Kernels, common_blocks};

/// Rows and tokens per kernel call (up to 16 accumulators of the 32 registers).
const RMAX: usize = 4;
const TMAX: usize = 4;

static AVX512_VNNI: Kernels = Kernels {
    name: "avx512vnni",
    tile_q4_0_q8_0: tile::<Q4_0>,
    tile_q4_1_q8_1: tile::<Q4_1>,
    tile_q8_0_q8_0: tile::<Q8_0>,
    dot_q4_0_q8_0: dot::<Q4_0>,
    dot_q4_1_q8_1: dot::<Q4_1>,
    dot_q8_0_q8_0: dot::<Q8_0>,
    packed: Some(packed_group),
    kpacked: Some(super::avx512_kpacked::kpacked_group),
    dot_f16_rows: super::attn::dot_f16_rows_512,
    axpy_f16_rows: super::attn::axpy_f16_rows_512,
    dot_f16_rows_group: super::attn::dot_f16_rows_group_512,
    axpy_f16_rows_group: super::attn::axpy_f16_rows_group_512,
    ..super::avx2::AVX2_TABLE
};

/// The AVX-512 VNNI table, or `None` when this CPU lacks any feature its kernels use.
pub(crate) fn table() -> Option<&'static Kernels> {
    if super::avx2::table().is_some()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
    {
        Some(&AVX512_VNNI)
    } else {
        None
    }
}

/// One pair: the 1 × 1 tile.
fn dot<const F: u8>(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    tile::<F>(&[w], &[x], &mut out);
    out[0]
}

/// Safe entry: splits the tile into kernel-sized pieces (`RMAX` rows, or single rows at the
/// edge, × up to `TMAX` tokens) and scatters their results into `out[t * w.len() + r]`.
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
        let rn = if nr - r0 >= RMAX { RMAX } else { 1 };
        let mut t0 = 0;
        while t0 < nt {
            let tn = (nt - t0).min(TMAX);
            // SAFETY (both arms): this function is reachable only through `AVX512_VNNI`,
            // which `table()` hands out after checking every feature `kernel` enables;
            // each row of `w` and `x` holds at least `nb` blocks (`common_blocks`).
            let (wp, xp) = (&w[r0..], &x[t0..]);
            // SAFETY: (every arm) this function is reachable only through `AVX512_VNNI`,
            // which `table()` hands out after checking every feature `kernel` enables;
            // each row of `w` and `x` holds at least `nb` blocks (`common_blocks`), and
            // `wp`/`xp` hold at least the `R`/`T` rows each arm reads.
            let vals: [[f32; RMAX]; TMAX] = unsafe {
                match (rn, tn) {
                    (RMAX, 1) => widen(kernel::<F, RMAX, 1>(ptrs(wp), ptrs(xp), nb)),
                    (RMAX, 2) => widen(kernel::<F, RMAX, 2>(ptrs(wp), ptrs(xp), nb)),
                    (RMAX, 3) => widen(kernel::<F, RMAX, 3>(ptrs(wp), ptrs(xp), nb)),
                    (RMAX, _) => widen(kernel::<F, RMAX, 4>(ptrs(wp), ptrs(xp), nb)),
                    (_, 1) => widen(kernel::<F, 1, 1>(ptrs(wp), ptrs(xp), nb)),
                    (_, 2) => widen(kernel::<F, 1, 2>(ptrs(wp), ptrs(xp), nb)),
                    (_, 3) => widen(kernel::<F, 1, 3>(ptrs(wp), ptrs(xp), nb)),
                    _ => widen(kernel::<F, 1, 4>(ptrs(wp), ptrs(xp), nb)),
                }
            };
            for (t, row) in vals.iter().enumerate().take(tn) {
                out[(t0 + t) * nr + r0..][..rn].copy_from_slice(&row[..rn]);
            }
            t0 += tn;
        }
        r0 += rn;
    }
}

/// The first `N` pointers of `rows` (which holds at least `N`).
fn ptrs<const N: usize>(rows: &[&[u8]]) -> [*const u8; N] {
    std::array::from_fn(|i| rows[i].as_ptr())
}

/// Copies an `R × T` result into the largest tile shape.
fn widen<const R: usize, const T: usize>(v: [[f32; R]; T]) -> [[f32; RMAX]; TMAX] {
    let mut out = [[0f32; RMAX]; TMAX];
    for (o, v) in out.iter_mut().zip(v) {
        o[..R].copy_from_slice(&v);
    }
    out
}

/// Gathers the little-endian u32 at the start of each of `count` (≤ 16) consecutive blocks of
/// `stride` bytes from `p`; lanes past `count` are 0.
///
/// # Safety
///
/// AVX-512F must be available; the first 4 bytes of each of the `count` blocks readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gather_heads(p: *const u8, stride: usize, count: usize) -> __m512i {
    let mask: __mmask16 = if count >= 16 {
        0xFFFF
    } else {
        (1u16 << count) - 1
    };
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(stride as i32));
    // SAFETY: masked-off lanes are not read; the others are in bounds (caller's contract).
    unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, offsets, p.cast()) }
}

/// The low (`HIGH == false`) or high f16 of each gathered u32, as 16 f32 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn f16_lanes<const HIGH: bool>(g: __m512i) -> __m512 {
    let g = if HIGH { _mm512_srli_epi32::<16>(g) } else { g };
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g))
}

/// Loads the 32 quant bytes of block `p` and, if `two`, of the next block (`stride` bytes
/// on) into one 512-bit vector (the second half zero otherwise).
///
/// # Safety
///
/// AVX-512F must be available; 32 bytes at `p`, and if `two` at `p + stride`, readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_2x32(p: *const u8, stride: usize, two: bool) -> __m512i {
    // SAFETY: the caller guarantees the bytes read are in bounds.
    unsafe {
        let lo = _mm512_castsi256_si512(_mm256_loadu_si256(p.cast()));
        if two {
            _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(p.add(stride).cast()))
        } else {
            _mm512_zextsi256_si512(_mm256_loadu_si256(p.cast()))
        }
    }
}

/// The 16 nibble bytes of block `p` and, if `two`, of the next block, spread to 64 bytes in
/// the activations' element order (see the module docs); nibbles of a missing second block
/// are 0.
///
/// # Safety
///
/// AVX-512F/BW must be available; 16 bytes at `p`, and if `two` at `p + stride`, readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn nibbles_2x16(p: *const u8, stride: usize, two: bool) -> __m512i {
    // SAFETY: the caller guarantees the bytes read are in bounds.
    let (a, b) = unsafe {
        let a = _mm_loadu_si128(p.cast());
        let b = if two {
            _mm_loadu_si128(p.add(stride).cast())
        } else {
            _mm_setzero_si128()
        };
        (a, b)
    };
    let ab = _mm512_castsi256_si512(_mm256_set_m128i(b, a));
    // 128-bit lanes [a, a, b, b], then shift the odd lanes' 64-bit halves right by 4.
    let dup = _mm512_shuffle_i64x2::<0b01_01_00_00>(ab, ab);
    let shifted = _mm512_srlv_epi64(dup, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
}

/// The tile body: `R` weight rows × `T` activation rows over `nb` blocks; returns
/// `[token][row]`.
///
/// # Safety
///
/// The CPU must support AVX2, FMA, F16C, AVX-512 F/BW/VL/VNNI; every `w[r]` must be
/// readable for `nb` weight blocks of format `F` and every `x[t]` for `nb` of its
/// activation blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel<const F: u8, const R: usize, const T: usize>(
    w: [*const u8; R],
    x: [*const u8; T],
    nb: usize,
) -> [[f32; R]; T] {
    let (wb, xb) = sizes(F);
    let (wq_at, xq_at) = if F == Q4_1 { (4, 4) } else { (2, 2) };
    let zero = _mm512_setzero_si512();
    // Spreads lane 2k / 2k+1 of a 16-lane scale vector to the two halves of a step.
    let pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut ib0 = 0;
    while ib0 < nb {
        let count = (nb - ib0).min(16);
        // Scales of this group of up to 16 blocks.
        let mut dw = [_mm512_setzero_ps(); R];
        let mut mw = [_mm512_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: blocks ib0..ib0+count of row r are readable.
            let g = unsafe { gather_heads(w[r].add(ib0 * wb), wb, count) };
            dw[r] = f16_lanes::<false>(g);
            if F == Q4_1 {
                mw[r] = f16_lanes::<true>(g);
            }
        }
        let mut dx = [_mm512_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: blocks ib0..ib0+count of token t are readable.
            let g = unsafe { gather_heads(x[t].add(ib0 * xb), xb, count) };
            dx[t] = f16_lanes::<false>(g);
            if F == Q4_1 {
                let sx = f16_lanes::<true>(g);
                for r in 0..R {
                    acc[t][r] = _mm512_fmadd_ps(mw[r], sx, acc[t][r]);
                }
            }
        }
        let mut k = 0;
        while k < count {
            let two = k + 1 < count;
            let b = ib0 + k;
            let idx = _mm512_add_epi32(pair_idx, _mm512_set1_epi32(k as i32));
            let mut wq = [zero; R];
            let mut dwk = [_mm512_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: block b (and b+1 if `two`) of row r is readable.
                wq[r] = unsafe {
                    let p = w[r].add(b * wb + wq_at);
                    match F {
                        Q8_0 => _mm512_xor_si512(load_2x32(p, wb, two), _mm512_set1_epi8(-128)),
                        _ => nibbles_2x16(p, wb, two),
                    }
                };
                dwk[r] = _mm512_permutexvar_ps(idx, dw[r]);
            }
            for t in 0..T {
                // SAFETY: block b (and b+1 if `two`) of token t is readable.
                let xq = unsafe { load_2x32(x[t].add(b * xb + xq_at), xb, two) };
                let init = match F {
                    Q4_0 => {
                        _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), xq))
                    }
                    Q8_0 => _mm512_sub_epi32(
                        zero,
                        _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), xq),
                    ),
                    _ => zero,
                };
                let dxk = _mm512_permutexvar_ps(idx, dx[t]);
                for r in 0..R {
                    let lanes = _mm512_dpbusd_epi32(init, wq[r], xq);
                    let d = _mm512_mul_ps(dwk[r], dxk);
                    acc[t][r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), acc[t][r]);
                }
            }
            k += 2;
        }
        ib0 += count;
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
        }
    }
    out
}

/// The packed kernel's safe entry (the table's `packed`): group `cells` (`nb` cells) against
/// `nt` ≤ 8 tokens of quantised activations, into `vals[t][lane]`.
fn packed_group(
    cells: &[u8],
    qs: &[i8],
    ds: &[[f32; 2]],
    nb: usize,
    nt: usize,
    bytes: bool,
    vals: &mut [[f32; GROUP]; 8],
) {
    let cell_len = if bytes { CELL8 } else { CELL };
    // The kernel reads exactly these ranges; a short slice is a caller bug, not a read
    // out of bounds.
    assert!(cells.len() >= nb * cell_len && qs.len() >= nt * nb * XQ && ds.len() >= nt * nb);
    macro_rules! call {
        ($($n:literal)*) => {
            match nt {
                $($n => {
                    // SAFETY: this function is reachable only through `AVX512_VNNI`, which
                    // `table()` hands out after checking every feature `packed_kernel`
                    // enables; `cells` holds `nb` cells and `qs`/`ds` hold `nb` blocks for
                    // each of the `$n` tokens (checked above).
                    let v = unsafe {
                        if bytes {
                            packed_kernel::<$n, true>(cells, qs, ds, nb)
                        } else {
                            packed_kernel::<$n, false>(cells, qs, ds, nb)
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

/// 16 rows × `T` tokens over `nb` blocks; returns `[token][lane]`. `BYTES`: Q8_0 cells
/// (eight byte vectors), else Q4 cells (four nibble vectors).
///
/// # Safety
///
/// The CPU must support AVX-512 F/BW/VNNI and F16C; `cells` must hold `nb` cells, `qs`
/// `T·nb` blocks of 32 bytes and `ds` `T·nb` pairs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn packed_kernel<const T: usize, const BYTES: bool>(
    cells: &[u8],
    qs: &[i8],
    ds: &[[f32; 2]],
    nb: usize,
) -> [[f32; GROUP]; T] {
    let cell_len = if BYTES { CELL8 } else { CELL };
    debug_assert!(cells.len() >= nb * cell_len && qs.len() >= T * nb * XQ && ds.len() >= T * nb);
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_m = [_mm512_setzero_ps(); T];
    let c = cells.as_ptr();
    let q = qs.as_ptr();
    for b in 0..nb {
        // SAFETY: cell `b` is in bounds (`cells` holds `nb` cells).
        let (dw, mw, w) = unsafe {
            let cell = c.add(b * cell_len);
            if T == 1 {
                // One token (a decode step) streams every cell from memory once: keep
                // enough lines in flight (as the AVX2 one-token kernels do).
                prefetch_ahead(cell, cell_len.div_ceil(64));
            }
            let (dw, mw) = if BYTES {
                // Q8_0 cells store no offsets: `Q8_M·d`, exact.
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(cell.cast()));
                (dw, _mm512_mul_ps(dw, _mm512_set1_ps(Q8_M)))
            } else {
                let dm = _mm512_loadu_si512(cell.cast());
                (
                    _mm512_cvtph_ps(_mm512_castsi512_si256(dm)),
                    _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(dm)),
                )
            };
            let mut w = [_mm512_setzero_si512(); 8];
            if BYTES {
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = _mm512_loadu_si512(cell.add(vecs_at(true) + 64 * j).cast());
                }
            } else {
                for j in 0..4 {
                    let v = _mm512_loadu_si512(cell.add(64 + 64 * j).cast());
                    w[j] = _mm512_and_si512(v, low);
                    w[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
            }
            (dw, mw, w)
        };
        for t in 0..T {
            let xb = t * nb + b;
            // SAFETY: block `xb` of `qs` (32 bytes) is in bounds.
            let isum = unsafe {
                let xq = q.add(xb * XQ);
                let mut isum = _mm512_setzero_si512();
                for (i, wi) in w.iter().enumerate() {
                    let at = if BYTES {
                        4 * i
                    } else {
                        4 * (i % 4) + 16 * (i / 4)
                    };
                    let x4 = xq.add(at).cast::<i32>().read_unaligned();
                    isum = _mm512_dpbusd_epi32(isum, *wi, _mm512_set1_epi32(x4));
                }
                isum
            };
            let [dx, sx] = ds[xb];
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
            acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), acc[t]);
            acc_m[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc_m[t]);
        }
    }
    let mut out = [[0f32; GROUP]; T];
    for ((o, a), m) in out.iter_mut().zip(acc).zip(acc_m) {
        // SAFETY: `o` is 16 f32s.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(a, m)) };
    }
    out
}
