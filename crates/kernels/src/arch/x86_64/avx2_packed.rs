//! The packed-matrix kernel for AVX2 CPUs (the AVX2 table's `packed`): the same 16-row
//! interleaved layout as the AVX-512 VNNI kernel (`crate::packed`, `crate::formats`), read
//! as two halves of eight rows, and the same per-lane float sequence, so its results are
//! bit-identical to the VNNI kernel's and to the scalar twin
//! (`crate::arch::portable::packed_group`).
//!
//! A 64-byte vector of a cell holds rows 0..8 in its first 32 bytes and rows 8..16 in the
//! others: one 256-bit load per half, where lane `r` (four bytes) belongs to row `r`. AVX2
//! has no `vpdpbusd`; its byte product `vpmaddubsw` (unsigned × signed bytes, adjacent pairs
//! summed into i16 lanes) saturates at ±32767, and a nibble (0..15) times an activation byte
//! (|x| ≤ 128) pair is at most 3840, so the eight products of one block (four nibble vectors,
//! low and high) are summed exactly in i16, and one `vpmaddwd` by ones per block and token
//! turns each row's pairs into its i32 block sum: 8 `vpmaddubsw`, 7 `vpaddw` and one
//! `vpmaddwd` per block, eight rows and token, no shuffles and no horizontal sums (lane =
//! row). Q8_0 cells hold `q + 128` (0..255, too large for an exact pair sum); each byte is
//! split into its nibbles, `u = lo + 16·hi`, both halves summed as above and combined as
//! `madd(lo, 1) + madd(hi, 16)`: exactly the integer `Σ u·x` the VNNI kernel computes.
//!
//! Float work per block and token is then what the VNNI kernel does lane for lane:
//! `acc = fma(d_w·d_x, isum, acc)`; the offsets' `acc_m = fma(m_w, s_x, acc_m)` run in a
//! second pass over the block scales in `half_kernel` (fewer live registers in the hot loop)
//! and beside `acc` in the one-token kernels (the sequence of each lane's operations is the
//! same either way); the result is `acc + acc_m`.
//!
//! The unpacked weights of a block stay in registers while they meet up to four tokens
//! (two for Q8_0, whose two i16 sums per token take twice the registers); a call with more
//! tokens walks the half-group again per four (the half-group's cells are then in L1/L2).
//! One token (decode) runs `one_token_q4` or `one_token_q8` instead: both halves in one pass.

use std::arch::x86_64::*;

use crate::arch::x86_64::helpers::prefetch_ahead;
use crate::formats::{CELL, CELL8, GROUP, Q8_M, XQ, vecs_at};

/// Rows per half of a 16-row group (the lanes of one 256-bit vector).
const HALF: usize = GROUP / 2;

/// The packed kernel's safe entry (the AVX2 table's `packed`): group `cells` (`nb` cells)
/// against `nt` ≤ 8 tokens of quantised activations, into `vals[t][lane]`.
pub(crate) fn packed_group(
    cells: &[u8],
    qs: &[i8],
    ds: &[[f32; 2]],
    nb: usize,
    nt: usize,
    bytes: bool,
    vals: &mut [[f32; GROUP]; 8],
) {
    let cell_len = if bytes { CELL8 } else { CELL };
    let nt = nt.min(8);
    // The kernel reads exactly these ranges; a short slice is a caller bug, not a read
    // out of bounds.
    assert!(cells.len() >= nb * cell_len && qs.len() >= nt * nb * XQ && ds.len() >= nt * nb);
    if nt == 1 {
        // SAFETY: as below (the AVX2 table's check; `cells` holds `nb` cells, `qs` and `ds`
        // one token's `nb` blocks, checked above).
        vals[0] = unsafe {
            if bytes {
                one_token_q8(cells, qs, ds, nb)
            } else {
                one_token_q4(cells, qs, ds, nb)
            }
        };
        return;
    }
    // Tokens per kernel call: as many as the registers hold.
    let per_call = if bytes { 2 } else { 4 };
    for half in 0..2 {
        let mut t0 = 0;
        while t0 < nt {
            let tn = (nt - t0).min(per_call);
            let (q, d) = (&qs[t0 * nb * XQ..], &ds[t0 * nb..]);
            macro_rules! call {
                ($($n:literal)*) => {
                    match tn {
                        $($n => {
                            // SAFETY: this function is reachable only through the AVX2
                            // table, which `avx2::table()` hands out after checking for
                            // AVX2, FMA and F16C (all `half_kernel` enables); `cells` holds
                            // `nb` cells and `q`/`d` hold `nb` blocks for each of the `$n`
                            // tokens (checked above: `t0 + $n ≤ nt`).
                            let v = unsafe {
                                if bytes {
                                    half_kernel::<$n, true>(cells, q, d, nb, half)
                                } else {
                                    half_kernel::<$n, false>(cells, q, d, nb, half)
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
            call!(1 2 3 4);
            t0 += tn;
        }
    }
}

/// All 16 rows of a Q4 group × one token (decode) in one pass over the cells: each cell's
/// whole 64-byte lines are read once, where [`half_kernel`] reads their halves in two passes
/// (the second from cache); 1.15-1.25x faster on a 262,144 × 640 Q4_0 matrix (the
/// `head_bandwidth` example). Each lane's integer sums and float operations are
/// `half_kernel`'s, in the same order (the offsets' accumulator is independent of the
/// other, so running it in the same loop changes no lane's sequence): bit-identical.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; `cells` must hold `nb` Q4 cells, `qs` `nb`
/// blocks of 32 bytes and `ds` `nb` pairs.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_token_q4(cells: &[u8], qs: &[i8], ds: &[[f32; 2]], nb: usize) -> [f32; GROUP] {
    debug_assert!(cells.len() >= nb * CELL && qs.len() >= nb * XQ && ds.len() >= nb);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (c, q, dsp) = (cells.as_ptr(), qs.as_ptr(), ds.as_ptr());
    let mut acc = OneToken::new();
    for b in 0..nb {
        // SAFETY: cell `b` is in bounds (`cells` holds `nb` cells) and every offset below is
        // inside its `CELL` bytes; block `b` of `qs` (32 bytes) and pair `b` of `ds` are in
        // bounds.
        unsafe {
            let cell = c.add(b * CELL);
            prefetch_ahead(cell, CELL / 64);
            let vecs = cell.add(64);
            let xq = q.add(b * XQ);
            let mut sums = [_mm256_setzero_si256(); 2];
            for j in 0..4 {
                let xl = _mm256_set1_epi32(xq.add(4 * j).cast::<i32>().read_unaligned());
                let xh = _mm256_set1_epi32(xq.add(4 * j + 16).cast::<i32>().read_unaligned());
                for (h, s) in sums.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(vecs.add(64 * j + 32 * h).cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, xl),
                        _mm256_maddubs_epi16(hi, xh),
                    );
                    *s = _mm256_add_epi16(*s, p);
                }
            }
            let isum = sums.map(|s| _mm256_madd_epi16(s, ones));
            acc.add_block::<false>(cell, isum, *dsp.add(b));
        }
    }
    acc.lanes()
}

/// All 16 rows of a Q8_0 group × one token (decode) in one pass over the cells, as
/// [`one_token_q4`] does for Q4 cells: each 64-byte line of a cell (its two halves' 32 bytes)
/// is read once. Gemma 3 270M's 262,144 × 640 Q8_0 output head (`head_bandwidth`, alternated
/// with the two-pass build, 5 runs each): 0.90-1.13x the time of a plain read of its bytes in
/// the same run, against 1.09-1.17x (means 1.02x and 1.15x). Each lane's integer sums (low
/// and high nibbles apart) and float operations are [`half_kernel`]'s `BYTES` ones, in the
/// same order: bit-identical.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; `cells` must hold `nb` Q8_0 cells, `qs` `nb`
/// blocks of 32 bytes and `ds` `nb` pairs.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_token_q8(cells: &[u8], qs: &[i8], ds: &[[f32; 2]], nb: usize) -> [f32; GROUP] {
    debug_assert!(cells.len() >= nb * CELL8 && qs.len() >= nb * XQ && ds.len() >= nb);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let sixteen = _mm256_set1_epi16(16);
    let (c, q, dsp) = (cells.as_ptr(), qs.as_ptr(), ds.as_ptr());
    let mut acc = OneToken::new();
    for b in 0..nb {
        // SAFETY: cell `b` is in bounds (`cells` holds `nb` cells) and every offset below is
        // inside its `CELL8` bytes; block `b` of `qs` (32 bytes) and pair `b` of `ds` are in
        // bounds.
        unsafe {
            let cell = c.add(b * CELL8);
            prefetch_ahead(cell, CELL8.div_ceil(64));
            let vecs = cell.add(vecs_at(true));
            let xq = q.add(b * XQ);
            let mut lo16 = [_mm256_setzero_si256(); 2];
            let mut hi16 = [_mm256_setzero_si256(); 2];
            for i in 0..8 {
                let x = _mm256_set1_epi32(xq.add(4 * i).cast::<i32>().read_unaligned());
                for h in 0..2 {
                    let v = _mm256_loadu_si256(vecs.add(64 * i + 32 * h).cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    lo16[h] = _mm256_add_epi16(lo16[h], _mm256_maddubs_epi16(lo, x));
                    hi16[h] = _mm256_add_epi16(hi16[h], _mm256_maddubs_epi16(hi, x));
                }
            }
            let isum = [0, 1].map(|h| {
                let isum = _mm256_madd_epi16(lo16[h], ones);
                _mm256_add_epi32(isum, _mm256_madd_epi16(hi16[h], sixteen))
            });
            acc.add_block::<true>(cell, isum, *dsp.add(b));
        }
    }
    acc.lanes()
}

/// Half `h`'s scales `d_w` and offsets `m_w` of a cell: read, or for Q8_0 (`BYTES`)
/// computed as `Q8_M·d_w` (exact in f32: a power of two times an f16).
///
/// # Safety
///
/// AVX2 and F16C; `cell` readable for its first 64 bytes (32 for `BYTES`); `h` < 2.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn scale_offset<const BYTES: bool>(cell: *const u8, h: usize) -> (__m256, __m256) {
    // SAFETY: the caller's contract.
    unsafe {
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(2 * HALF * h).cast()));
        let mw = if BYTES {
            _mm256_mul_ps(dw, _mm256_set1_ps(Q8_M))
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(cell.add(32 + 2 * HALF * h).cast()))
        };
        (dw, mw)
    }
}

/// The float accumulators of both halves of a group × one token (`one_token_q4`,
/// `one_token_q8`): per block `acc = fma(d_w·d_x, isum, acc)` and `acc_m = fma(m_w, s_x,
/// acc_m)` lane by lane, as `half_kernel` does them.
struct OneToken {
    acc: [__m256; 2],
    acc_m: [__m256; 2],
}

impl OneToken {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new() -> Self {
        Self {
            acc: [_mm256_setzero_ps(); 2],
            acc_m: [_mm256_setzero_ps(); 2],
        }
    }

    /// One block: `isum[h]`, the exact integer sums of half `h`'s rows; `cell` the block's
    /// cell (scales at `16·h`, offsets 32 bytes on, or for Q8_0 (`BYTES`) none: `Q8_M·d`);
    /// `(d_x, s_x)` the token's pair.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2, FMA and F16C; `cell` must be readable for its first 64
    /// bytes (32 for `BYTES`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn add_block<const BYTES: bool>(
        &mut self,
        cell: *const u8,
        isum: [__m256i; 2],
        [dx, sx]: [f32; 2],
    ) {
        for (h, isum) in isum.into_iter().enumerate() {
            // SAFETY: both loads are inside the cell's first 64 bytes (`h` < 2), the first
            // inside its first 32.
            let (dw, mw) = unsafe { scale_offset::<BYTES>(cell, h) };
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
            self.acc[h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), self.acc[h]);
            self.acc_m[h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), self.acc_m[h]);
        }
    }

    /// The group's 16 results, `acc + acc_m` per lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lanes(self) -> [f32; GROUP] {
        let mut out = [0f32; GROUP];
        for (h, o) in out.chunks_exact_mut(HALF).enumerate() {
            // SAFETY: `o` is 8 f32s.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(self.acc[h], self.acc_m[h])) };
        }
        out
    }
}

/// Rows `8·half..8·half + 8` of the group × `T` tokens over `nb` blocks; returns
/// `[token][row in half]`. `BYTES`: Q8_0 cells (eight byte vectors), else Q4 cells (four
/// nibble vectors).
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C; `half` < 2; `cells` must hold `nb` cells, `qs`
/// `T·nb` blocks of 32 bytes and `ds` `T·nb` pairs.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_kernel<const T: usize, const BYTES: bool>(
    cells: &[u8],
    qs: &[i8],
    ds: &[[f32; 2]],
    nb: usize,
    half: usize,
) -> [[f32; HALF]; T] {
    let cell_len = if BYTES { CELL8 } else { CELL };
    debug_assert!(half < 2);
    debug_assert!(cells.len() >= nb * cell_len && qs.len() >= T * nb * XQ && ds.len() >= T * nb);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let sixteen = _mm256_set1_epi16(16);
    // This half's bytes of a cell: scales at 2·8·half, offsets 32 bytes on (none for Q8_0),
    // vectors at `vecs_at`.
    let c = cells.as_ptr();
    let q = qs.as_ptr();
    let dsp = ds.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: cell `b` is in bounds (`cells` holds `nb` cells); every offset below is
        // inside its `cell_len` bytes (`half` < 2), and block `t·nb + b` of `qs` (32 bytes)
        // is in bounds for each `t` < `T`.
        unsafe {
            let cell = c.add(b * cell_len);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(2 * HALF * half).cast()));
            let vecs = cell.add(vecs_at(BYTES) + 32 * half);
            // Per token the block's byte products, summed in i16 lanes (see the module docs
            // for why they cannot overflow); for Q8_0 the low and high nibbles apart.
            let mut lo16 = [_mm256_setzero_si256(); T];
            let mut hi16 = [_mm256_setzero_si256(); T];
            if BYTES {
                for i in 0..8 {
                    let v = _mm256_loadu_si256(vecs.add(64 * i).cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    for t in 0..T {
                        let xq = q.add((t * nb + b) * XQ);
                        let x = _mm256_set1_epi32(xq.add(4 * i).cast::<i32>().read_unaligned());
                        lo16[t] = _mm256_add_epi16(lo16[t], _mm256_maddubs_epi16(lo, x));
                        hi16[t] = _mm256_add_epi16(hi16[t], _mm256_maddubs_epi16(hi, x));
                    }
                }
            } else {
                for j in 0..4 {
                    let v = _mm256_loadu_si256(vecs.add(64 * j).cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    for (t, s) in lo16.iter_mut().enumerate() {
                        let xq = q.add((t * nb + b) * XQ);
                        let xl = _mm256_set1_epi32(xq.add(4 * j).cast::<i32>().read_unaligned());
                        let xh =
                            _mm256_set1_epi32(xq.add(4 * j + 16).cast::<i32>().read_unaligned());
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xl),
                            _mm256_maddubs_epi16(hi, xh),
                        );
                        *s = _mm256_add_epi16(*s, p);
                    }
                }
            }
            for t in 0..T {
                let mut isum = _mm256_madd_epi16(lo16[t], ones);
                if BYTES {
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(hi16[t], sixteen));
                }
                let d = _mm256_mul_ps(dw, _mm256_set1_ps((*dsp.add(t * nb + b))[0]));
                acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc[t]);
            }
        }
    }
    let mut out = [[0f32; HALF]; T];
    for (t, (o, a)) in out.iter_mut().zip(acc).enumerate() {
        let mut acc_m = _mm256_setzero_ps();
        for b in 0..nb {
            // SAFETY: the offsets of cell `b` and pair `t·nb + b` of `ds` (in bounds, as
            // above).
            let (mw, sx) = unsafe {
                let (_, mw) = scale_offset::<BYTES>(c.add(b * cell_len), half);
                (mw, (*dsp.add(t * nb + b))[1])
            };
            acc_m = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), acc_m);
        }
        // SAFETY: `o` is 8 f32s.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(a, acc_m)) };
    }
    out
}
