//! AVX2 (+FMA, F16C) kernels, following ggml's x86 code paths operation for operation so
//! that the float accumulation order matches llama.cpp on the same CPU.
//!
//! Layout of every kernel: a private safe wrapper (the table entry) that clamps lengths and
//! calls an `unsafe` `#[target_feature]` function on raw pointers. The wrappers are only
//! reachable through [`table`], which checks the CPU first; that check is what makes the
//! `unsafe` calls in the wrappers sound.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::helpers::{
    block_dots, bytes_from_nibbles_32, hsum_float_8, load_f16, mul_sum_i8_pairs_float,
    mul_sum_us8_pairs_float,
};
use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};
use crate::table::{F16_TOKENS, Kernels, kernel_table};

// The attention kernels, by their table names.
pub(crate) use super::attn::{
    axpy_f16_rows, axpy_f16_rows_group, axpy_q8_0_rows, dot_f16_rows, dot_f16_rows_group,
    dot_q8_0_rows, exp_sum,
};

/// The AVX2 table as a constant, so that wider tables can start from it (`..AVX2_TABLE`).
/// Its entries are sound to call only after [`table`]'s CPU check. ggml's x86 build
/// quantises activations to Q8_K with the scalar reference, and so does this table.
pub(crate) const AVX2_TABLE: Kernels = kernel_table! {
    name: "avx2",
    base: crate::arch::x86_64::avx2,
    quants: crate::arch::x86_64::avx2_kquants,
    tiles: crate::arch::x86_64::avx2_tiles,
    quantize_q8_k: crate::arch::x86_64::avx2_kquants::quantize_q8_k,
    packed: Some(crate::arch::x86_64::avx2_packed::packed_group),
    kpacked: Some(crate::arch::x86_64::avx2_kpacked::kpacked_group),
};

static AVX2: Kernels = AVX2_TABLE;

/// The AVX2 table, or `None` when this CPU lacks AVX2, FMA or F16C.
pub(crate) fn table() -> Option<&'static Kernels> {
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        Some(&AVX2)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Safe wrappers (table entries). Each SAFETY comment relies on the same two facts: the
// wrapper is only reachable through `AVX2`, which `table()` hands out after checking for
// AVX2, FMA and F16C; and the element/block counts passed are clamped to what every slice
// holds, so all pointer accesses stay in bounds.
// ---------------------------------------------------------------------------------------

pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: CPU features checked by `table()`; `a` and `b` hold at least `n` elements.
    unsafe { dot_f32_raw(a.as_ptr(), b.as_ptr(), n) }
}

pub(crate) fn dot_f32_bytes(w: &[u8], x: &[f32]) -> f32 {
    let n = (w.len() / 4).min(x.len());
    // SAFETY: CPU features checked by `table()`; `w` holds `n` little-endian f32 (read
    // unaligned), `x` at least `n` elements.
    unsafe { dot_f32_raw(w.as_ptr().cast(), x.as_ptr(), n) }
}

pub(crate) fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: CPU features checked by `table()`; `f16` is a transparent `u16`; both slices
    // hold at least `n` elements.
    unsafe { dot_f16_raw(a.as_ptr().cast(), b.as_ptr().cast(), n) }
}

pub(crate) fn dot_f16_bytes(w: &[u8], x: &[f16]) -> f32 {
    let n = (w.len() / 2).min(x.len());
    // SAFETY: CPU features checked by `table()`; `w` holds `n` little-endian f16 (read
    // unaligned), `x` at least `n` elements.
    unsafe { dot_f16_raw(w.as_ptr().cast(), x.as_ptr().cast(), n) }
}

pub(crate) fn dot_f16_bytes_tokens(w: &[u8], x: &[f32], stride: usize, out: &mut [f32]) {
    let n = (w.len() / 2).min(stride);
    let nt = x
        .len()
        .checked_div(stride)
        .map_or(out.len(), |fit| out.len().min(fit));
    out[nt..].fill(0.0);
    // The calls below take one to three tokens.
    const _: () = assert!(F16_TOKENS == 3);
    let mut t = 0;
    while t < nt {
        let k = (nt - t).min(F16_TOKENS);
        // SAFETY: CPU features checked by `table()`; `w` holds `n` little-endian f16 (read
        // unaligned); tokens `t..t + k` < `nt` each have `stride` ≥ `n` f32 in `x`.
        unsafe {
            let (wp, xp) = (w.as_ptr().cast(), x.as_ptr().add(t * stride));
            let o = &mut out[t..t + k];
            match k {
                3 => o.copy_from_slice(&dot_f16_tokens_raw::<3>(wp, xp, stride, n)),
                2 => o.copy_from_slice(&dot_f16_tokens_raw::<2>(wp, xp, stride, n)),
                _ => o.copy_from_slice(&dot_f16_tokens_raw::<1>(wp, xp, stride, n)),
            }
        }
        t += k;
    }
}

pub(crate) fn dot_bf16_bytes(w: &[u8], x: &[bf16]) -> f32 {
    let n = (w.len() / 2).min(x.len());
    // SAFETY: CPU features checked by `table()`; `w` holds `n` little-endian bf16 (read
    // unaligned), `x` (transparent `u16`) at least `n` elements.
    unsafe { dot_bf16_raw(w.as_ptr().cast(), x.as_ptr().cast(), n) }
}

pub(crate) fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    // SAFETY: CPU features checked by `table()`; `y` is writable and `x` readable for `n`
    // elements; they cannot overlap (one is `&mut`).
    unsafe { axpy_f16_raw(y.as_mut_ptr(), alpha, x.as_ptr().cast(), n) }
}

pub(crate) fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    // SAFETY: CPU features checked by `table()`; `src` readable and `dst` writable for `n`.
    unsafe { f32_to_f16_raw(src.as_ptr(), dst.as_mut_ptr().cast(), n) }
}

pub(crate) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    // SAFETY: CPU features checked by `table()`; `src` readable and `dst` writable for `n`.
    unsafe { f16_to_f32_raw(src.as_ptr().cast(), dst.as_mut_ptr(), n) }
}

pub(crate) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let nb = (x.len() / QK).min(out.len() / BlockQ8_0::BYTES);
    // SAFETY: CPU features checked by `table()`; `x` holds `nb * 32` floats and `out` room
    // for `nb` blocks.
    unsafe { quantize_raw::<false>(x.as_ptr(), out.as_mut_ptr(), nb) }
}

pub(crate) fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    let nb = (x.len() / QK).min(out.len() / BlockQ8_1::BYTES);
    // SAFETY: as in `quantize_q8_0`, with Q8_1 blocks.
    unsafe { quantize_raw::<true>(x.as_ptr(), out.as_mut_ptr(), nb) }
}

block_dots! {
    dot_q4_0_q8_0 => dot_q4_0_q8_0_raw, BlockQ4_0, BlockQ8_0;
    dot_q4_1_q8_1 => dot_q4_1_q8_1_raw, BlockQ4_1, BlockQ8_1;
    dot_q8_0_q8_0 => dot_q8_0_q8_0_raw, BlockQ8_0, BlockQ8_0;
}

pub(crate) fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    let nb = (src.len() / BlockQ4_0::BYTES).min(dst.len() / QK);
    // SAFETY: CPU features checked by `table()`; `src` holds `nb` blocks, `dst` `nb * 32`.
    unsafe { dequantize_q4_raw::<false>(src.as_ptr(), dst.as_mut_ptr(), nb) }
}

pub(crate) fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    let nb = (src.len() / BlockQ4_1::BYTES).min(dst.len() / QK);
    // SAFETY: CPU features checked by `table()`; `src` holds `nb` blocks, `dst` `nb * 32`.
    unsafe { dequantize_q4_raw::<true>(src.as_ptr(), dst.as_mut_ptr(), nb) }
}

pub(crate) fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    let nb = (src.len() / BlockQ8_0::BYTES).min(dst.len() / QK);
    // SAFETY: CPU features checked by `table()`; `src` holds `nb` blocks, `dst` `nb * 32`.
    unsafe { dequantize_q8_0_raw(src.as_ptr(), dst.as_mut_ptr(), nb) }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// ggml `GGML_F32x8_REDUCE` over four accumulators: 0+=2, 1+=3, 0+=1, then two `hadd`s.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce4(s: [__m256; 4]) -> f32 {
    let a = _mm256_add_ps(s[0], s[2]);
    let b = _mm256_add_ps(s[1], s[3]);
    let c = _mm256_add_ps(a, b);
    let t0 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps::<1>(c));
    let t1 = _mm_hadd_ps(t0, t0);
    _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// `ggml_vec_dot_f32`: four 8-lane FMA accumulators over 32-element steps, reduced, then the
/// tail added in f64.
///
/// # Safety
///
/// AVX2 and FMA must be available; `a` and `b` must be readable for `n` f32 (any alignment).
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    let np = n & !31;
    let mut sum = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < np {
        for (j, s) in sum.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= np <= n elements are readable.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_ps(a.add(i + 8 * j)),
                    _mm256_loadu_ps(b.add(i + 8 * j)),
                )
            };
            *s = _mm256_fmadd_ps(va, vb, *s);
        }
        i += 32;
    }
    let mut total = f64::from(reduce4(sum));
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (a.add(i).read_unaligned(), b.add(i).read_unaligned()) };
        total += f64::from(x * y);
        i += 1;
    }
    total as f32
}

/// `ggml_vec_dot_f16`: as [`dot_f32_raw`] with F16C widening loads.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `a` and `b` must be readable for `n` u16 (any
/// alignment).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_raw(a: *const u16, b: *const u16, n: usize) -> f32 {
    let np = n & !31;
    let mut sum = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < np {
        for (j, s) in sum.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= np <= n elements are readable.
            let (ha, hb) = unsafe {
                (
                    _mm_loadu_si128(a.add(i + 8 * j).cast()),
                    _mm_loadu_si128(b.add(i + 8 * j).cast()),
                )
            };
            *s = _mm256_fmadd_ps(_mm256_cvtph_ps(ha), _mm256_cvtph_ps(hb), *s);
        }
        i += 32;
    }
    let mut total = f64::from(reduce4(sum));
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (a.add(i).read_unaligned(), b.add(i).read_unaligned()) };
        total += f64::from(f16::from_bits(x).to_f32() * f16::from_bits(y).to_f32());
        i += 1;
    }
    total as f32
}

/// [`dot_f16_raw`] of one weight row `w` with `T` tokens (`x`, `stride` f32 apart, each
/// value an f16's): each weight vector is widened once and meets every token, and each
/// token's lanes see the same fused multiply-adds in the same order, the same reduction and
/// the same tail as [`dot_f16_raw`]: bit-identical results.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` must be readable for `n` u16 and `x` for
/// `(T − 1)·stride + n` f32 (any alignment).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_tokens_raw<const T: usize>(
    w: *const u16,
    x: *const f32,
    stride: usize,
    n: usize,
) -> [f32; T] {
    let np = n & !31;
    let mut sum = [[_mm256_setzero_ps(); 4]; T];
    let mut i = 0;
    while i < np {
        for j in 0..4 {
            // SAFETY: i + 8j + 8 <= np <= n elements of `w` and of each token are readable.
            unsafe {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(i + 8 * j).cast()));
                for (t, s) in sum.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(t * stride + i + 8 * j));
                    s[j] = _mm256_fmadd_ps(wv, xv, s[j]);
                }
            }
        }
        i += 32;
    }
    let mut out = [0f32; T];
    for (t, (o, s)) in out.iter_mut().zip(sum).enumerate() {
        let mut total = f64::from(reduce4(s));
        for k in i..n {
            // SAFETY: k < n.
            let (a, b) = unsafe { (w.add(k).read_unaligned(), x.add(t * stride + k).read()) };
            total += f64::from(f16::from_bits(a).to_f32() * b);
        }
        *o = total as f32;
    }
    out
}

/// Loads 8 bf16 and widens them to f32 (a 16-bit shift).
///
/// # Safety
///
/// `p` must be readable for 8 u16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_bf16x8(p: *const u16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    let h = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// `ggml_vec_dot_bf16` (AVX2 branch): four mul-then-add accumulators, combined as
/// (c1+c3)+(c2+c4), `hsum_float_8`, tail in f64.
///
/// # Safety
///
/// AVX2 must be available; `a` and `b` must be readable for `n` u16 (any alignment).
#[target_feature(enable = "avx2")]
unsafe fn dot_bf16_raw(a: *const u16, b: *const u16, n: usize) -> f32 {
    let mut c = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, s) in c.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= n elements are readable.
            let (va, vb) =
                unsafe { (load_bf16x8(a.add(i + 8 * j)), load_bf16x8(b.add(i + 8 * j))) };
            *s = _mm256_add_ps(_mm256_mul_ps(va, vb), *s);
        }
        i += 32;
    }
    let all = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
    let mut total = f64::from(hsum_float_8(all));
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (a.add(i).read_unaligned(), b.add(i).read_unaligned()) };
        total += f64::from(bf16::from_bits(x).to_f32() * bf16::from_bits(y).to_f32());
        i += 1;
    }
    total as f32
}

/// `y[i] = fma(x[i], alpha, y[i])`, ggml `ggml_vec_mad` style.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `y` writable and `x` readable for `n` elements.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_raw(y: *mut f32, alpha: f32, x: *const u16, n: usize) {
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements are readable/writable.
        unsafe {
            let vx = _mm256_cvtph_ps(_mm_loadu_si128(x.add(i).cast()));
            let vy = _mm256_loadu_ps(y.add(i));
            _mm256_storeu_ps(y.add(i), _mm256_fmadd_ps(vx, va, vy));
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe {
            let xv = f16::from_bits(x.add(i).read_unaligned()).to_f32();
            *y.add(i) += xv * alpha;
        }
        i += 1;
    }
}

/// f32 → f16 with round-to-nearest-even (`vcvtps2ph` with immediate 0).
///
/// # Safety
///
/// AVX2 and F16C must be available; `src` readable and `dst` writable for `n` elements.
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_raw(src: *const f32, dst: *mut u16, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements are readable/writable.
        unsafe {
            let v = _mm256_loadu_ps(src.add(i));
            _mm_storeu_si128(
                dst.add(i).cast(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
            );
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { *dst.add(i) = f16::from_f32(*src.add(i)).to_bits() };
        i += 1;
    }
}

/// f16 → f32 (exact).
///
/// # Safety
///
/// AVX2 and F16C must be available; `src` readable and `dst` writable for `n` elements.
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_raw(src: *const u16, dst: *mut f32, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements are readable/writable.
        unsafe {
            let h = _mm_loadu_si128(src.add(i).cast());
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { *dst.add(i) = f16::from_bits(*src.add(i)).to_f32() };
        i += 1;
    }
}

/// ggml x86 `quantize_row_q8_0` (`Q8_1 == false`) / `quantize_row_q8_1` (`Q8_1 == true`):
/// amax by `max_ps`, `d = amax/127`, multiply by `127/amax`, round half to even, pack.
///
/// # Safety
///
/// AVX2 must be available; `x` readable for `nb * 32` f32 and `out` writable for `nb`
/// blocks (34 or 36 bytes each).
#[target_feature(enable = "avx2")]
unsafe fn quantize_raw<const Q8_1: bool>(x: *const f32, out: *mut u8, nb: usize) {
    let block_bytes = if Q8_1 {
        BlockQ8_1::BYTES
    } else {
        BlockQ8_0::BYTES
    };
    let qs_offset = if Q8_1 { 4 } else { 2 };
    let sign = _mm256_set1_ps(-0.0);
    for ib in 0..nb {
        // SAFETY: block `ib < nb` lies inside `x` (32 floats) and `out` (one block).
        let (xb, ob) = unsafe { (x.add(ib * QK), out.add(ib * block_bytes)) };
        // SAFETY: 32 floats at `xb` are readable.
        let v = unsafe {
            [
                _mm256_loadu_ps(xb),
                _mm256_loadu_ps(xb.add(8)),
                _mm256_loadu_ps(xb.add(16)),
                _mm256_loadu_ps(xb.add(24)),
            ]
        };
        let mut max_abs = _mm256_andnot_ps(sign, v[0]);
        for vk in &v[1..] {
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, *vk));
        }
        let mut m4 = _mm_max_ps(
            _mm256_extractf128_ps::<1>(max_abs),
            _mm256_castps256_ps128(max_abs),
        );
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);

        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], mul),
            );
            _mm256_cvtps_epi32(r)
        });
        let d_bits = f16::from_f32(d).to_bits().to_le_bytes();
        // SAFETY: the block at `ob` has room for its 2-byte scale.
        unsafe { std::ptr::copy_nonoverlapping(d_bits.as_ptr(), ob, 2) };
        if Q8_1 {
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
            let sum = _mm_cvtsi128_si32(s1);
            let s_bits = f16::from_f32(d * sum as f32).to_bits().to_le_bytes();
            // SAFETY: a Q8_1 block has its 2-byte `s` at offset 2.
            unsafe { std::ptr::copy_nonoverlapping(s_bits.as_ptr(), ob.add(2), 2) };
        }
        // i32 → i16 → i8; the packs work per 128-bit lane, the permute restores order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let q = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: the block has 32 bytes of quants at `qs_offset`.
        unsafe { _mm256_storeu_si256(ob.add(qs_offset).cast(), q) };
    }
}

/// ggml `ggml_vec_dot_q4_0_q8_0`, AVX2 branch.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q4_0 blocks, `x` for `nb` Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_q8_0_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    for ib in 0..nb {
        // SAFETY: block `ib < nb` of each row is readable: 18 and 34 bytes.
        unsafe {
            let wb = w.add(ib * BlockQ4_0::BYTES);
            let xb = x.add(ib * BlockQ8_0::BYTES);
            let d = _mm256_set1_ps(load_f16(wb) * load_f16(xb));
            let qx = _mm256_sub_epi8(bytes_from_nibbles_32(wb.add(2)), off);
            let qy = _mm256_loadu_si256(xb.add(2).cast());
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
        }
    }
    hsum_float_8(acc)
}

/// ggml `ggml_vec_dot_q4_1_q8_1`, AVX2 branch: `hsum(Σ d_w d_x · n·q) + Σ m_w · s_x`.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` readable for `nb` Q4_1 blocks, `x` for `nb` Q8_1.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_q8_1_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for ib in 0..nb {
        // SAFETY: block `ib < nb` of each row is readable: 20 and 36 bytes.
        unsafe {
            let wb = w.add(ib * BlockQ4_1::BYTES);
            let xb = x.add(ib * BlockQ8_1::BYTES);
            let (d0, m0) = (load_f16(wb), load_f16(wb.add(2)));
            let (d1, s1) = (load_f16(xb), load_f16(xb.add(2)));
            summs += m0 * s1;
            let d0d1 = _mm256_mul_ps(_mm256_set1_ps(d0), _mm256_set1_ps(d1));
            let qx = bytes_from_nibbles_32(wb.add(4));
            let qy = _mm256_loadu_si256(xb.add(4).cast());
            acc = _mm256_fmadd_ps(d0d1, mul_sum_us8_pairs_float(qx, qy), acc);
        }
    }
    hsum_float_8(acc) + summs
}

/// ggml `ggml_vec_dot_q8_0_q8_0`, AVX2 branch. Weight quants must lie in -127..=127 (as
/// ggml's quantiser produces); -128 is outside the sign trick's exact range, exactly as in
/// ggml.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `w` and `x` readable for `nb` Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_q8_0_raw(w: *const u8, x: *const u8, nb: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for ib in 0..nb {
        // SAFETY: block `ib < nb` of each row is readable: 34 bytes each.
        unsafe {
            let wb = w.add(ib * BlockQ8_0::BYTES);
            let xb = x.add(ib * BlockQ8_0::BYTES);
            let d = _mm256_set1_ps(load_f16(wb) * load_f16(xb));
            let qx = _mm256_loadu_si256(wb.add(2).cast());
            let qy = _mm256_loadu_si256(xb.add(2).cast());
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
        }
    }
    hsum_float_8(acc)
}

/// Sign-extends 32 i8 lanes to four vectors of eight f32.
#[inline]
#[target_feature(enable = "avx2")]
fn i8x32_to_f32(q: __m256i) -> [__m256; 4] {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
    ]
}

/// Q4_0 (`MIN == false`: `(n-8)·d`) or Q4_1 (`MIN == true`: `fma(n, d, m)`) → f32.
///
/// # Safety
///
/// AVX2, FMA and F16C must be available; `src` readable for `nb` blocks of the chosen format and
/// `dst` writable for `nb * 32` f32.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q4_raw<const MIN: bool>(src: *const u8, dst: *mut f32, nb: usize) {
    let block_bytes = if MIN {
        BlockQ4_1::BYTES
    } else {
        BlockQ4_0::BYTES
    };
    let qs_offset = if MIN { 4 } else { 2 };
    for ib in 0..nb {
        // SAFETY: block `ib < nb` is readable and its 32 outputs writable.
        unsafe {
            let b = src.add(ib * block_bytes);
            let out = dst.add(ib * QK);
            let d = _mm256_set1_ps(load_f16(b));
            let mut q = bytes_from_nibbles_32(b.add(qs_offset));
            if !MIN {
                q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
            }
            let m = _mm256_set1_ps(if MIN { load_f16(b.add(2)) } else { 0.0 });
            for (k, v) in i8x32_to_f32(q).into_iter().enumerate() {
                let r = if MIN {
                    _mm256_fmadd_ps(v, d, m)
                } else {
                    _mm256_mul_ps(v, d)
                };
                _mm256_storeu_ps(out.add(8 * k), r);
            }
        }
    }
}

/// Q8_0 → f32: `q·d`.
///
/// # Safety
///
/// AVX2 and F16C must be available; `src` readable for `nb` Q8_0 blocks and `dst` writable for
/// `nb * 32` f32.
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_q8_0_raw(src: *const u8, dst: *mut f32, nb: usize) {
    for ib in 0..nb {
        // SAFETY: block `ib < nb` is readable and its 32 outputs writable.
        unsafe {
            let b = src.add(ib * BlockQ8_0::BYTES);
            let out = dst.add(ib * QK);
            let d = _mm256_set1_ps(load_f16(b));
            let q = _mm256_loadu_si256(b.add(2).cast());
            for (k, v) in i8x32_to_f32(q).into_iter().enumerate() {
                _mm256_storeu_ps(out.add(8 * k), _mm256_mul_ps(v, d));
            }
        }
    }
}
