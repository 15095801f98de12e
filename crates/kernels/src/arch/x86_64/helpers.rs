//! The x86 building blocks every AVX2-level kernel shares (ggml's x86 helpers of the same
//! names): scalar loads of little-endian scales, horizontal sums, nibble and bit unpacking,
//! and the byte-product sums. Written once here so that every kernel unpacks and reduces
//! the same way (the float order of the reductions is part of the numerics).
//!
//! Each function enables only the features it uses; callers enable at least those.

use std::arch::x86_64::*;

use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

/// How far ahead of its reads a one-token (decode) kernel prefetches the cells it streams,
/// in bytes: the hardware prefetchers alone keep too few lines in flight for a core to read
/// a matrix larger than the caches at the memory's speed while it also computes. Measured
/// with the `head_bandwidth` example (`SHAPES=mistral7b`, 2 threads, alternated): 4,096 and
/// 8,192 bytes ahead made Q4_K 14336x4096 and Q6_K 4096x14336 1.5-1.7x faster than no
/// prefetch; 16,384 was no better.
pub(crate) const PREFETCH_AHEAD: usize = 8192;

/// Prefetches the `lines` 64-byte lines that start [`PREFETCH_AHEAD`] bytes after `p`. A
/// hint only: nothing is read, so an address past the matrix's end is harmless.
#[inline]
#[target_feature(enable = "sse")]
pub(crate) fn prefetch_ahead(p: *const u8, lines: usize) {
    prefetch_lines(p.wrapping_add(PREFETCH_AHEAD), lines);
}

/// Prefetches the 64-byte lines that hold the `bytes` bytes from `p` (a hint, as
/// [`prefetch_ahead`]).
#[inline]
#[target_feature(enable = "sse")]
pub(crate) fn prefetch_span(p: *const u8, bytes: usize) {
    prefetch_lines(p, (p as usize % 64 + bytes).div_ceil(64));
}

/// Prefetches `lines` 64-byte lines from `p`.
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_lines(p: *const u8, lines: usize) {
    for k in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * k).cast());
    }
}

/// Format selectors of the const-generic tile bodies (`avx2_tiles`, `avx512vnni`).
pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q8_0: u8 = 2;

/// (weight block bytes, activation block bytes) of a tile format.
pub(crate) const fn sizes(f: u8) -> (usize, usize) {
    match f {
        Q4_0 => (BlockQ4_0::BYTES, BlockQ8_0::BYTES),
        Q4_1 => (BlockQ4_1::BYTES, BlockQ8_1::BYTES),
        _ => (BlockQ8_0::BYTES, BlockQ8_0::BYTES),
    }
}

/// Defines safe table entries `fn(w: &[u8], x: &[u8]) -> f32` over rows of weight blocks `W`
/// and activation blocks `X`, each calling its `unsafe` raw kernel on the whole blocks both
/// rows hold. Only for kernels whose table is handed out after checking the CPU for every
/// feature the raw kernel enables.
macro_rules! block_dots {
    ($( $(#[$meta:meta])* $name:ident => $raw:path, $w:ty, $x:ty; )*) => {$(
        $(#[$meta])*
        pub(crate) fn $name(w: &[u8], x: &[u8]) -> f32 {
            let nb = (w.len() / <$w>::BYTES).min(x.len() / <$x>::BYTES);
            // SAFETY: this entry is reachable only through a table handed out after the CPU
            // check (see the module docs); `nb` is clamped to the whole blocks both slices
            // hold, so every pointer access stays in bounds.
            unsafe { $raw(w.as_ptr(), x.as_ptr(), nb) }
        }
    )*};
}
pub(crate) use block_dots;

/// Reads a little-endian f16 at `p` and widens it (exact) with F16C, avoiding `half`'s
/// per-call feature check in the per-block hot loops.
///
/// # Safety
///
/// AVX2 and F16C must be available and `p` readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes; no alignment is assumed.
    let bits = u16::from_le(unsafe { p.cast::<u16>().read_unaligned() });
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Loads a little-endian f16 at `p` and broadcasts it to eight f32 lanes.
///
/// # Safety
///
/// AVX2 and F16C must be available; `p` readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn bcast_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes; no alignment is assumed.
    let bits = u16::from_le(unsafe { p.cast::<u16>().read_unaligned() });
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// Reads a little-endian f32 at `p`.
///
/// # Safety
///
/// `p` must be readable for 4 bytes.
#[inline]
pub(crate) unsafe fn load_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes; no alignment is assumed.
    f32::from_bits(u32::from_le(unsafe { p.cast::<u32>().read_unaligned() }))
}

/// Loads 32 bytes at `p`.
///
/// # Safety
///
/// AVX2 must be available; `p` readable for 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; `loadu` takes any alignment.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// ggml `hsum_float_8`: (lo128 + hi128), then fold pairs.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum_float_8(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Sum of four i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum_i32_4(a: __m128i) -> i32 {
    let hi64 = _mm_unpackhi_epi64(a, a);
    let sum64 = _mm_add_epi32(hi64, a);
    let hi32 = _mm_shuffle_epi32::<0b10_11_00_01>(sum64);
    _mm_cvtsi128_si32(_mm_add_epi32(sum64, hi32))
}

/// 16 packed bytes → 32 bytes: low nibbles in the low 128 bits (elements 0..16), high
/// nibbles in the high 128 bits (elements 16..32).
///
/// # Safety
///
/// AVX2 must be available; `p` readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn bytes_from_nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` takes any alignment.
    let tmp = unsafe { _mm_loadu_si128(p.cast()) };
    let bytes = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// 32 bits (little-endian at `p`) → 32 bytes, 0xFF where the bit is set, else 0.
///
/// # Safety
///
/// AVX2 must be available; `p` readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn bytes_from_bits_32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes; no alignment is assumed.
    let x32 = u32::from_le(unsafe { p.cast::<u32>().read_unaligned() });
    // Byte k takes source byte k/8, then everything but bit k%8 is forced to 1.
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Unsigned × signed bytes, summed in groups of four into eight i32, as f32.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn mul_sum_us8_pairs_float(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

/// Signed × signed bytes via the sign trick (|x| · sign(x)·y), summed in fours into eight
/// f32. Exact for `x` in -127..=127.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn mul_sum_i8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8_pairs_float(ax, sy)
}
