//! AVX2 (+FMA, F16C) dot products for Q5_0, Q5_1 and the K-quants, following ggml's x86
//! `ggml_vec_dot_*` AVX2 branches operation for operation, so the f32 accumulation order is
//! llama.cpp's on the same CPU.
//!
//! Shape of every kernel: per super-block, the quants are unpacked to bytes in registers,
//! multiplied with the Q8 activations by `maddubs` (u8 × i8 → i16 pairs; never saturates
//! here: at most 2·63·127), widened with `madd` against the sub-block scales to i32 lanes,
//! summed exactly, and only then converted to f32 and scaled by `d`. Minimum terms use the
//! Q8_K `bsums`, so the weights' minimums never enter the inner loop.
//!
//! Each table entry is a safe wrapper that clamps the block count and calls an `unsafe`
//! `#[target_feature]` function. The wrappers are installed only in the AVX2 `Kernels`
//! table (and the wider one built from it), which `super::avx2::table()` hands out after
//! checking for AVX2, FMA and F16C: that check is what makes the calls in the wrappers
//! sound.

use std::arch::x86_64::*;

use super::helpers::{
    block_dots, bytes_from_bits_32, bytes_from_nibbles_32, hsum_float_8, hsum_i32_4, load_f16,
    load_f32, load32, mul_sum_i8_pairs_float, mul_sum_us8_pairs_float,
};
use crate::formats::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, QK_K,
};

// ---------------------------------------------------------------------------------------
// Safe wrappers. SAFETY (all of them): reachable only through the AVX2 `Kernels` table,
// handed out after checking AVX2, FMA and F16C; `nb` is clamped to the whole blocks both
// slices hold, so every pointer access stays in bounds.
// ---------------------------------------------------------------------------------------

/// ggml `quantize_row_q8_K`, byte for byte the portable `quantize_q8_k` (the scalar path
/// rounds through a libm call per element): the block's largest magnitude in vectors, the
/// first element of that magnitude found by a scalar scan, the products rounded half to
/// even by `vroundps`. A block holding a NaN or an infinity takes the scalar path (whose
/// casts saturate where `vcvtps2dq` would not).
pub(crate) fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x
        .as_chunks::<QK_K>()
        .0
        .iter()
        .zip(out.as_chunks_mut::<{ BlockQ8K::BYTES }>().0)
    {
        // SAFETY: reachable only through the AVX2 table (see the wrappers above); `xb` is
        // 256 floats.
        let (amax, finite) = unsafe { amax_256(xb.as_ptr()) };
        if !finite || amax == 0.0 {
            crate::arch::portable::quantize_q8_k(xb, ob);
            continue;
        }
        let max = xb.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        if !iscale.is_finite() {
            // A block of tiny values (|max| < 127 / f32::MAX): the scalar casts saturate.
            crate::arch::portable::quantize_q8_k(xb, ob);
            continue;
        }
        let mut qs = [0i8; QK_K];
        // SAFETY: as above; `qs` has room for 256 bytes.
        unsafe { scale_round_256(xb.as_ptr(), iscale, qs.as_mut_ptr()) };
        let mut bsums = [0i16; QK_K / 16];
        for (s, g) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| i16::from(q)).sum();
        }
        *ob = BlockQ8K {
            d: 1.0 / iscale,
            qs,
            bsums,
        }
        .to_bytes();
    }
}

/// The largest magnitude of 256 floats, and whether all are finite.
///
/// # Safety
///
/// AVX2; `x` readable for 256 floats.
#[target_feature(enable = "avx2")]
unsafe fn amax_256(x: *const f32) -> (f32, bool) {
    let sign = _mm256_set1_ps(-0.0);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut m = _mm256_setzero_ps();
    let mut bad = _mm256_setzero_ps();
    for i in 0..QK_K / 8 {
        // SAFETY: the caller's contract.
        let a = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(x.add(8 * i)) });
        // NaN compares unordered, infinity equal to `inf`: both mark the block.
        bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
        m = _mm256_max_ps(m, a);
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps::<1>(h, h));
    (_mm_cvtss_f32(h), _mm256_movemask_ps(bad) == 0)
}

/// `q[i] = min(127, round_half_even(iscale·x[i]))` for 256 finite floats with
/// `|iscale·x| ≤ 127` (plus rounding).
///
/// # Safety
///
/// AVX2; `x` readable for 256 floats, `q` writable for 256 bytes.
#[target_feature(enable = "avx2")]
unsafe fn scale_round_256(x: *const f32, iscale: f32, q: *mut i8) {
    let s = _mm256_set1_ps(iscale);
    let top = _mm256_set1_epi32(127);
    // `packs` interleaves 128-bit halves: this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in 0..QK_K / 32 {
        let v: [__m256i; 4] = std::array::from_fn(|k| {
            // SAFETY: the caller's contract.
            let f = _mm256_mul_ps(s, unsafe { _mm256_loadu_ps(x.add(32 * i + 8 * k)) });
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
            _mm256_min_epi32(_mm256_cvtps_epi32(r), top)
        });
        let a = _mm256_packs_epi32(v[0], v[1]);
        let b = _mm256_packs_epi32(v[2], v[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
        // SAFETY: the caller's contract.
        unsafe { _mm256_storeu_si256(q.add(32 * i).cast(), bytes) };
    }
}

block_dots! {
    dot_q5_0_q8_0 => dot_q5_raw::<false>, BlockQ5_0, BlockQ8_0;
    dot_q5_1_q8_1 => dot_q5_raw::<true>, BlockQ5_1, BlockQ8_1;
    dot_q2_k_q8_k => dot_q2_k_raw, BlockQ2K, BlockQ8K;
    dot_q3_k_q8_k => dot_q3_k_raw, BlockQ3K, BlockQ8K;
    dot_q4_k_q8_k => dot_q4_k_raw, BlockQ4K, BlockQ8K;
    dot_q5_k_q8_k => dot_q5_k_raw, BlockQ5K, BlockQ8K;
    dot_q6_k_q8_k => dot_q6_k_raw, BlockQ6K, BlockQ8K;
}

// ---------------------------------------------------------------------------------------
// Helpers (ggml's x86 helpers of the same names)
// ---------------------------------------------------------------------------------------

/// ggml `get_scale_shuffle_k4(i)`: broadcasts 16-bit scale `i` of a 128-bit lane.
const fn k4_shuffles() -> [[u8; 32]; 8] {
    let mut t = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 32 {
            t[i][b] = (2 * i + b % 2) as u8;
            b += 1;
        }
        i += 1;
    }
    t
}

/// ggml `get_scale_shuffle_q3k(i)`: 16-bit scale `2i` in the low lane, `2i + 1` in the high.
const fn q3k_shuffles() -> [[u8; 32]; 4] {
    let mut t = [[0u8; 32]; 4];
    let mut i = 0;
    while i < 4 {
        let mut b = 0;
        while b < 32 {
            let scale = 2 * i + b / 16;
            t[i][b] = (2 * scale + b % 2) as u8;
            b += 1;
        }
        i += 1;
    }
    t
}

/// ggml `get_scale_shuffle(i)`: byte `2i` eight times, then byte `2i + 1` eight times.
const fn q6k_shuffles() -> [[u8; 16]; 8] {
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < 16 {
            t[i][b] = (2 * i + b / 8) as u8;
            b += 1;
        }
        i += 1;
    }
    t
}

static K4_SHUFFLE: [[u8; 32]; 8] = k4_shuffles();
static Q3K_SHUFFLE: [[u8; 32]; 4] = q3k_shuffles();
static Q6K_SHUFFLE: [[u8; 16]; 8] = q6k_shuffles();

/// Loads a 32-byte shuffle mask.
#[inline]
#[target_feature(enable = "avx2")]
fn mask32(m: &[u8; 32]) -> __m256i {
    // SAFETY: `m` is 32 readable bytes; `loadu` takes any alignment.
    unsafe { _mm256_loadu_si256(m.as_ptr().cast()) }
}

/// The Q4_K/Q5_K scale bytes (12 at `p`) unpacked by ggml's `kmask` trick into 8 scales
/// (bytes 0..8) and 8 minimums (bytes 8..16).
///
/// # Safety
///
/// `p` must be readable for 12 bytes.
#[inline]
unsafe fn k4_scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    // SAFETY: the caller guarantees 12 readable bytes; no alignment is assumed.
    let r = |k: usize| u32::from_le(unsafe { p.add(4 * k).cast::<u32>().read_unaligned() });
    let (u0, u1, u2) = (r(0), r(1), r(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

/// The per-super-block head Q4_K and Q5_K share: `d = y.d·d`, `dmin = −y.d·dmin`, the
/// four i32 lanes of `Σ m·(bsum pairs)` (ggml's minimum products) and the eight sub-block
/// scales as i16, repeated in both 128-bit lanes.
///
/// # Safety
///
/// AVX2 and F16C must be available; `wb` readable for one Q4_K/Q5_K block head (16 bytes),
/// `xb` for one Q8_K block.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn k4_head(wb: *const u8, xb: *const u8) -> (f32, f32, __m128i, __m256i) {
    // SAFETY: the caller guarantees the block head and the Q8_K block are readable.
    unsafe {
        let yd = load_f32(xb);
        let d = yd * load_f16(wb);
        let dmin = -yd * load_f16(wb.add(2));
        let u = k4_scales_mins(wb.add(4));
        let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
            u[3] as i32,
            u[2] as i32,
            u[1] as i32,
            u[0] as i32,
        ));
        let q8sums = load32(xb.add(4 + QK_K));
        let q8s = _mm_hadd_epi16(
            _mm256_extracti128_si256::<0>(q8sums),
            _mm256_extracti128_si256::<1>(q8sums),
        );
        let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_and_scales), q8s);
        let sc128 = _mm256_extracti128_si256::<0>(mins_and_scales);
        (d, dmin, prod, _mm256_set_m128i(sc128, sc128))
    }
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// ggml `ggml_vec_dot_q5_0_q8_0` (`MIN == false`) / `ggml_vec_dot_q5_1_q8_1` (`MIN == true`),
/// AVX2 branches. Q5_0: the fifth bit *clear* ORs in 0xF0, i.e. subtracts 16 as i8; then the
/// signed product. Q5_1: the fifth bit ORs in 0x10; unsigned × signed, plus `Σ m·s`.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q5_0 (Q5_1) blocks and `x`
/// for `nb` Q8_0 (Q8_1) blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_raw<const MIN: bool>(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let (wbytes, xbytes) = if MIN {
        (BlockQ5_1::BYTES, BlockQ8_1::BYTES)
    } else {
        (BlockQ5_0::BYTES, BlockQ8_0::BYTES)
    };
    let (qh_off, xqs_off) = if MIN { (4, 4) } else { (2, 2) };
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for ib in 0..nb {
        // SAFETY: block `ib < nb` of each row is readable.
        unsafe {
            let wb = w.add(ib * wbytes);
            let xb = x.add(ib * xbytes);
            let mut qx = bytes_from_nibbles_32(wb.add(qh_off + 4));
            let bxhi = bytes_from_bits_32(wb.add(qh_off));
            let qy = load32(xb.add(xqs_off));
            if MIN {
                summs += load_f16(wb.add(2)) * load_f16(xb.add(2));
                qx = _mm256_or_si256(qx, _mm256_and_si256(bxhi, _mm256_set1_epi8(0x10)));
                let dxdy =
                    _mm256_mul_ps(_mm256_set1_ps(load_f16(wb)), _mm256_set1_ps(load_f16(xb)));
                acc = _mm256_fmadd_ps(mul_sum_us8_pairs_float(qx, qy), dxdy, acc);
            } else {
                let d = _mm256_set1_ps(load_f16(wb) * load_f16(xb));
                qx = _mm256_or_si256(
                    qx,
                    _mm256_andnot_si256(bxhi, _mm256_set1_epi8(0xF0u8 as i8)),
                );
                acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
            }
        }
    }
    hsum_float_8(acc) + summs
}

/// ggml `ggml_vec_dot_q2_K_q8_K`, AVX2 branch.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q2_K blocks, `x` for `nb` Q8_K.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2_k_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i < nb` of each row is readable: 84 and 292 bytes.
        unsafe {
            let wb = w.add(i * BlockQ2K::BYTES);
            let xb = x.add(i * BlockQ8K::BYTES);
            let yd = load_f32(xb);
            let d = yd * load_f16(wb.add(80));
            let dmin = -yd * load_f16(wb.add(82));
            let mins_and_scales = _mm_loadu_si128(wb.cast());
            let scales8 = _mm_and_si128(mins_and_scales, m4);
            let mins8 = _mm_and_si128(_mm_srli_epi16::<4>(mins_and_scales), m4);
            let mins = _mm256_cvtepi8_epi16(mins8);
            let prod = _mm256_madd_epi16(mins, load32(xb.add(4 + QK_K)));
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&dmin), _mm256_cvtepi32_ps(prod), acc);

            let all_scales = _mm256_cvtepi8_epi16(scales8);
            let l_scales = _mm256_extracti128_si256::<0>(all_scales);
            let h_scales = _mm256_extracti128_si256::<1>(all_scales);
            let scales = [
                _mm256_set_m128i(l_scales, l_scales),
                _mm256_set_m128i(h_scales, h_scales),
            ];
            let mut sumi = _mm256_setzero_si256();
            for (j, sc) in scales.iter().enumerate() {
                let q2bits = load32(wb.add(16 + 32 * j));
                let q8 = xb.add(4 + 128 * j);
                let mut p = [_mm256_setzero_si256(); 4];
                for (k, pk) in p.iter_mut().enumerate() {
                    let q2 = match k {
                        0 => _mm256_and_si256(q2bits, m3),
                        1 => _mm256_and_si256(_mm256_srli_epi16::<2>(q2bits), m3),
                        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(q2bits), m3),
                        _ => _mm256_and_si256(_mm256_srli_epi16::<6>(q2bits), m3),
                    };
                    let q8k = load32(q8.add(32 * k));
                    let prod = _mm256_maddubs_epi16(q2, q8k);
                    *pk =
                        _mm256_madd_epi16(_mm256_shuffle_epi8(*sc, mask32(&Q3K_SHUFFLE[k])), prod);
                }
                let p01 = _mm256_add_epi32(p[0], p[1]);
                let p23 = _mm256_add_epi32(p[2], p[3]);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p01, p23));
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_float_8(acc)
}

/// ggml `ggml_vec_dot_q3_K_q8_K`, AVX2 branch: the 2-bit low parts times q8, minus 4·q8
/// where the high bit is clear (computed as a second `maddubs`), scaled by `sc − 32`.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q3_K blocks, `x` for `nb` Q8_K.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3_k_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let m3 = _mm256_set1_epi8(3);
    let mone = _mm256_set1_epi8(1);
    let m32 = _mm_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i < nb` of each row is readable: 110 and 292 bytes.
        unsafe {
            let wb = w.add(i * BlockQ3K::BYTES);
            let xb = x.add(i * BlockQ8K::BYTES);
            let d = load_f32(xb) * load_f16(wb.add(108));
            let sp = wb.add(96);
            let r = |k: usize| u32::from_le(sp.add(4 * k).cast::<u32>().read_unaligned());
            let (a0, a1, a2) = (r(0), r(1), r(2));
            let scales128 = _mm_set_epi32(
                (((a1 >> 4) & KMASK2) | (((a2 >> 6) & KMASK1) << 4)) as i32,
                (((a0 >> 4) & KMASK2) | (((a2 >> 4) & KMASK1) << 4)) as i32,
                ((a1 & KMASK2) | (((a2 >> 2) & KMASK1) << 4)) as i32,
                ((a0 & KMASK2) | ((a2 & KMASK1) << 4)) as i32,
            );
            let scales128 = _mm_sub_epi8(scales128, m32);
            let all_scales = _mm256_cvtepi8_epi16(scales128);
            let l_scales = _mm256_extracti128_si256::<0>(all_scales);
            let h_scales = _mm256_extracti128_si256::<1>(all_scales);
            let scales = [
                _mm256_set_m128i(l_scales, l_scales),
                _mm256_set_m128i(h_scales, h_scales),
            ];
            let hbits = load32(wb);
            let mut sumi = _mm256_setzero_si256();
            for (j, sc) in scales.iter().enumerate() {
                let q3bits = load32(wb.add(32 + 32 * j));
                let q8 = xb.add(4 + 128 * j);
                let mut p = [_mm256_setzero_si256(); 4];
                for (k, pk) in p.iter_mut().enumerate() {
                    let bit = (4 * j + k) as i32;
                    let q3l = match k {
                        0 => _mm256_and_si256(q3bits, m3),
                        1 => _mm256_and_si256(_mm256_srli_epi16::<2>(q3bits), m3),
                        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(q3bits), m3),
                        _ => _mm256_and_si256(_mm256_srli_epi16::<6>(q3bits), m3),
                    };
                    // 4 where the high bit is clear, else 0.
                    let clear =
                        _mm256_andnot_si256(hbits, _mm256_sll_epi16(mone, _mm_cvtsi32_si128(bit)));
                    let q3h =
                        _mm256_slli_epi16::<2>(_mm256_srl_epi16(clear, _mm_cvtsi32_si128(bit)));
                    let q8k = load32(q8.add(32 * k));
                    let q8s = _mm256_maddubs_epi16(q3h, q8k);
                    let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(q3l, q8k), q8s);
                    *pk =
                        _mm256_madd_epi16(_mm256_shuffle_epi8(*sc, mask32(&Q3K_SHUFFLE[k])), prod);
                }
                let p01 = _mm256_add_epi32(p[0], p[1]);
                let p23 = _mm256_add_epi32(p[2], p[3]);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p01, p23));
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_float_8(acc)
}

/// ggml `ggml_vec_dot_q4_K_q8_K`, AVX2 branch: minimums against the pairwise-summed
/// `bsums` in a 4-lane accumulator, scales broadcast per 32-element sub-block.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q4_K blocks, `x` for `nb` Q8_K.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i < nb` of each row is readable: 144 and 292 bytes.
        unsafe {
            let wb = w.add(i * BlockQ4K::BYTES);
            let xb = x.add(i * BlockQ8K::BYTES);
            let (d, dmin, prod, scales) = k4_head(wb, xb);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..QK_K / 64 {
                let scale_l = _mm256_shuffle_epi8(scales, mask32(&K4_SHUFFLE[2 * j]));
                let scale_h = _mm256_shuffle_epi8(scales, mask32(&K4_SHUFFLE[2 * j + 1]));
                let q4bits = load32(wb.add(16 + 32 * j));
                let q4l = _mm256_and_si256(q4bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
                let q8l = load32(xb.add(4 + 64 * j));
                let q8h = load32(xb.add(4 + 64 * j + 32));
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_float_8(acc) + _mm_cvtss_f32(acc_m)
}

/// ggml `ggml_vec_dot_q5_K_q8_K`, AVX2 branch: as Q4_K with the fifth bit added as 16 from
/// `qh`, and the minimum term summed in scalar f32.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q5_K blocks, `x` for `nb` Q8_K.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let mone = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for i in 0..nb {
        // SAFETY: block `i < nb` of each row is readable: 176 and 292 bytes.
        unsafe {
            let wb = w.add(i * BlockQ5K::BYTES);
            let xb = x.add(i * BlockQ8K::BYTES);
            let (d, dmin, prod, scales) = k4_head(wb, xb);
            summs += dmin * hsum_i32_4(prod) as f32;
            let hbits = load32(wb.add(16));
            let mut hmask = mone;
            let mut sumi = _mm256_setzero_si256();
            let mut bit = 0i32;
            for j in 0..QK_K / 64 {
                let scale_0 = _mm256_shuffle_epi8(scales, mask32(&K4_SHUFFLE[2 * j]));
                let scale_1 = _mm256_shuffle_epi8(scales, mask32(&K4_SHUFFLE[2 * j + 1]));
                let q5bits = load32(wb.add(48 + 32 * j));
                let q5l_0 = _mm256_and_si256(q5bits, m4);
                let q5h_0 = _mm256_slli_epi16::<4>(_mm256_srl_epi16(
                    _mm256_and_si256(hbits, hmask),
                    _mm_cvtsi32_si128(bit),
                ));
                bit += 1;
                hmask = _mm256_slli_epi16::<1>(hmask);
                let q5l_1 = _mm256_and_si256(_mm256_srli_epi16::<4>(q5bits), m4);
                let q5h_1 = _mm256_slli_epi16::<4>(_mm256_srl_epi16(
                    _mm256_and_si256(hbits, hmask),
                    _mm_cvtsi32_si128(bit),
                ));
                bit += 1;
                hmask = _mm256_slli_epi16::<1>(hmask);
                let q5_0 = _mm256_add_epi8(q5l_0, q5h_0);
                let q5_1 = _mm256_add_epi8(q5l_1, q5h_1);
                let q8_0 = load32(xb.add(4 + 64 * j));
                let q8_1 = load32(xb.add(4 + 64 * j + 32));
                let p16_0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q5_0, q8_0));
                let p16_1 = _mm256_madd_epi16(scale_1, _mm256_maddubs_epi16(q5_1, q8_1));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_1));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_float_8(acc) + summs
}

/// ggml `ggml_vec_dot_q6_K_q8_K`, AVX2 branch: unsigned 6-bit levels times q8, minus 32·q8
/// (a second `maddubs`), scaled per 16-element sub-block.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q6_K blocks, `x` for `nb` Q8_K.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let m32s = _mm256_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i < nb` of each row is readable: 210 and 292 bytes.
        unsafe {
            let wb = w.add(i * BlockQ6K::BYTES);
            let xb = x.add(i * BlockQ8K::BYTES);
            let d = load_f32(xb) * load_f16(wb.add(208));
            let scales = _mm_loadu_si128(wb.add(192).cast());
            let mut sumi = _mm256_setzero_si256();
            for j in 0..QK_K / 128 {
                let ql = wb.add(64 * j);
                let q4bits1 = load32(ql);
                let q4bits2 = load32(ql.add(32));
                let q4bits_h = load32(wb.add(128 + 32 * j));
                let q4h_0 = _mm256_slli_epi16::<4>(_mm256_and_si256(q4bits_h, m2));
                let q4h_1 =
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(q4bits_h), m2));
                let q4h_2 =
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits_h), m2));
                let q4h_3 =
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(q4bits_h), m2));
                let q4 = [
                    _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0),
                    _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits1), m4), q4h_2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits2), m4), q4h_3),
                ];
                let mut p = [_mm256_setzero_si256(); 4];
                for (k, pk) in p.iter_mut().enumerate() {
                    let q8k = load32(xb.add(4 + 128 * j + 32 * k));
                    let q8s = _mm256_maddubs_epi16(m32s, q8k);
                    let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(q4[k], q8k), q8s);
                    let shuf = _mm_loadu_si128(Q6K_SHUFFLE[4 * j + k].as_ptr().cast());
                    let scale = _mm_shuffle_epi8(scales, shuf);
                    *pk = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale), prod);
                }
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_float_8(acc)
}
