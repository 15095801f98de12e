//! Q4_0, Q4_1 and Q8_0 weights repacked sixteen rows at a time, for the AVX-512 VNNI matmul.
//!
//! In GGUF a row's blocks are contiguous, so a dot product is one row against one token
//! and ends in a horizontal sum; every block needs its nibbles spread into the token's
//! element order and its scale fetched. Here the rows are interleaved instead: for each group
//! of 16 rows and each block of 32 columns the group stores
//!
//! - the 16 rows' scales `d` as f16, then their offsets `m` as f16 (Q4_0's value
//!   `d·(q − 8)` is stored as `d·q + m` with `m = −8·d`, exact in f16), 64 bytes;
//! - four 64-byte vectors of nibbles: in vector `j`, the four bytes of lane `r` hold row `r`'s
//!   elements `4j..4j+4` in their low nibbles and `4j+16..4j+20` in their high ones. Q8_0
//!   has eight vectors of bytes instead (vector `i`, lane `r`: elements `4i..4i+4` of row `r`
//!   as `q + 128`, so that they are unsigned, with `m = −128·d`).
//!
//! One `vpdpbusd` of such a (masked) vector against four activation bytes broadcast to every
//! lane adds four products to each of the 16 rows' sums at once: 8 per block, no shuffles,
//! no horizontal sums, the scales loaded as vectors (lane = row). Per block and token each
//! lane then does `acc = fma(d_w·d_x, Σ q·x, acc)` and `acc_m = fma(m_w, s_x, acc_m)` with
//! `s_x = d_x·Σ x_q`, and the result is `acc + acc_m` (the offsets' sum apart, as ggml keeps
//! it). The unpacked nibbles stay in registers while they meet up to eight
//! tokens.
//!
//! Activations are quantised as for ggml's Q8_0/Q8_1 (32 signed bytes and an f16 scale per
//! block); `s_x` is rounded to f16 for Q4_1 as in ggml's Q8_1, and kept in f32 for Q4_0 (whose
//! `−8·Σ x`, like Q8_0's `−128·Σ x`, ggml computes exactly in integers). Each lane's operation sequence is fixed, so the scalar twin
//! (`crate::arch::portable::packed_group`, through [`matmul_scalar`]) gives bit-identical results, and a (row, token) result depends neither
//! on the other tokens of the batch nor on the thread count.
#![allow(unsafe_code)]

use half::f16;

use crate::arch::portable::packed_group;
use crate::dispatch;
use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
use crate::formats::{CELL, CELL8, GROUP, XQ};
use crate::matmul::{DisjointOut, check_len};
use crate::pool::ThreadPool;
use crate::table::PackedFn;
use crate::types::{KernelError, Matrix, WeightType};

/// The cell size of a packed source type.
fn cell_bytes(source: WeightType) -> usize {
    if source == WeightType::Q8_0 {
        CELL8
    } else {
        CELL
    }
}
/// Tokens per task.
const TOKEN_CHUNK: usize = 32;
/// Tasks per thread to aim for.
const TASKS_PER_THREAD: usize = 8;

/// Packed bytes. A large matrix lives in an anonymous mapping advised to use huge pages
/// where the system allows it: a token streams every weight once, and 2 MiB pages spare the
/// page walks of 4 KiB ones (gigabytes for a 7B model).
enum Buffer {
    Map(memmap2::MmapMut),
    Heap(Vec<u8>),
}

impl Buffer {
    fn zeroed(len: usize) -> Self {
        if len >= 2 << 20
            && let Ok(map) = memmap2::MmapMut::map_anon(len)
        {
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            return Buffer::Map(map);
        }
        Buffer::Heap(vec![0u8; len])
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buffer::Map(m) => m,
            Buffer::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Buffer::Map(m) => m,
            Buffer::Heap(v) => v,
        }
    }
}

/// A Q4_0, Q4_1 or Q8_0 weight matrix repacked for the AVX-512 VNNI kernel (see the module
/// docs).
pub struct PackedMatrix {
    data: Buffer,
    rows: usize,
    cols: usize,
    source: WeightType,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The 4-bit value of element `e` (0..32) of a block's 16 quant bytes.
fn nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

impl PackedMatrix {
    /// Repacks `w` when this CPU runs the packed kernel (AVX-512 VNNI) and `w` is Q4_0, Q4_1
    /// or Q8_0; `None` otherwise (then use [`crate::matmul`]).
    pub fn pack(w: &Matrix<'_>) -> Option<Self> {
        if !fast_available() {
            return None;
        }
        Self::pack_any(w)
    }

    /// Repacks `w` whatever the CPU (the scalar twin can run it); `None` for other types or
    /// a scale too large for its offset to fit in f16.
    pub(crate) fn pack_any(w: &Matrix<'_>) -> Option<Self> {
        // Offsets when the type has none: Q4_0 `d·(q − 8)`, Q8_0 stored as `q + 128`.
        let (block, qs_at, m_from_d) = match w.ty() {
            WeightType::Q4_0 => (BlockQ4_0::BYTES, 2, Some(-8.0)),
            WeightType::Q4_1 => (BlockQ4_1::BYTES, 4, None),
            WeightType::Q8_0 => (BlockQ8_0::BYTES, 2, Some(-128.0)),
            _ => return None,
        };
        let cell_len = cell_bytes(w.ty());
        let (rows, cols) = (w.rows(), w.cols());
        let nb = cols / QK;
        let groups = rows.div_ceil(GROUP);
        let mut data = Buffer::zeroed(groups.checked_mul(nb)?.checked_mul(cell_len)?);
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            let src = w.row(r);
            for b in 0..nb {
                let blk = &src[b * block..(b + 1) * block];
                let cell = &mut data[(g * nb + b) * cell_len..][..cell_len];
                let d = [blk[0], blk[1]];
                let m = match m_from_d {
                    None => [blk[2], blk[3]],
                    Some(k) => {
                        // A power of two times an f16: exact unless it overflows.
                        let m = f16::from_f32(k * f16::from_le_bytes(d).to_f32());
                        if !m.is_finite() {
                            return None;
                        }
                        m.to_le_bytes()
                    }
                };
                cell[2 * lane..2 * lane + 2].copy_from_slice(&d);
                cell[32 + 2 * lane..32 + 2 * lane + 2].copy_from_slice(&m);
                if w.ty() == WeightType::Q8_0 {
                    // Vector `i`, lane `r`: row `r`'s elements `4i..4i+4`, as `q + 128`.
                    for (e, &q) in blk[qs_at..qs_at + 32].iter().enumerate() {
                        cell[64 + 64 * (e / 4) + 4 * lane + e % 4] = q ^ 0x80;
                    }
                    continue;
                }
                let qs = &blk[qs_at..qs_at + 16];
                for j in 0..4 {
                    for k in 0..4 {
                        let lo = nibble(qs, 4 * j + k);
                        let hi = nibble(qs, 4 * j + 16 + k);
                        cell[64 + 64 * j + 4 * lane + k] = lo | (hi << 4);
                    }
                }
            }
        }
        Some(PackedMatrix {
            data,
            rows,
            cols,
            source: w.ty(),
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGUF type it was packed from.
    pub fn source_type(&self) -> WeightType {
        self.source
    }

    fn blocks(&self) -> usize {
        self.cols / QK
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }
}

/// Whether the packed kernel runs on this CPU.
fn fast_available() -> bool {
    dispatch::active().packed.is_some()
}

/// Quantised activations: per token, `nb` blocks of 32 signed bytes, and per block
/// `(d_x, s_x)` in f32.
struct Activations {
    qs: Vec<i8>,
    ds: Vec<[f32; 2]>,
}

fn quantize(x: &[f32], cols: usize, round_s: bool) -> Activations {
    let nb = cols / QK;
    let n_tokens = x.len().checked_div(cols).unwrap_or(0);
    let mut qs = vec![0i8; n_tokens * nb * XQ];
    let mut ds = vec![[0f32; 2]; n_tokens * nb];
    let k = dispatch::active();
    let mut block = [0u8; BlockQ8_0::BYTES];
    for (xb, (q, dsb)) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(XQ).zip(ds.iter_mut()))
    {
        (k.quantize_q8_0)(xb, &mut block);
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut sum = 0i32;
        for (o, &b) in q.iter_mut().zip(&block[2..]) {
            *o = b as i8;
            sum += i32::from(b as i8);
        }
        let s = d * sum as f32;
        // ggml's Q8_1 keeps `s` in f16 for Q4_1; Q4_0's `−8·Σ x` term needs it exact.
        let s = if round_s {
            f16::from_f32(s).to_f32()
        } else {
            s
        };
        *dsb = [d, s];
    }
    Activations { qs, ds }
}

/// `y[t*rows + r] = W row r · x[t*cols..]` through the packed kernel, on `pool`.
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] or [`KernelError::Overflow`] as for [`crate::matmul`].
pub fn matmul_packed(
    pool: &ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    run(pool, w, x, n_tokens, y, fast_available())
}

/// The scalar twin of [`matmul_packed`] (bit-identical), on `pool`.
#[cfg(test)]
pub(crate) fn matmul_scalar(
    pool: &ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    run(pool, w, x, n_tokens, y, false)
}

fn run(
    pool: &ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    fast: bool,
) -> Result<(), KernelError> {
    check_len("matmul_packed x", x.len(), n_tokens, w.cols)?;
    check_len("matmul_packed y", y.len(), n_tokens, w.rows)?;
    if n_tokens == 0 || w.rows == 0 {
        return Ok(());
    }
    let act = quantize(x, w.cols, w.source == WeightType::Q4_1);
    // The SIMD kernel where this CPU has one, else its scalar twin.
    let fast_kernel = if fast {
        dispatch::active().packed
    } else {
        None
    };
    let kernel = fast_kernel.unwrap_or(packed_group);
    let groups = w.groups();
    let group_chunk = groups.div_ceil(pool.n_threads() * TASKS_PER_THREAD).max(1);
    let group_tasks = groups.div_ceil(group_chunk);
    let token_tasks = n_tokens.div_ceil(TOKEN_CHUNK);
    let out = DisjointOut {
        ptr: y.as_mut_ptr(),
        len: y.len(),
    };
    let (out, act) = (&out, &act);
    pool.parallel_for(group_tasks * token_tasks, &|task| {
        let (gt, tt) = (task % group_tasks, task / group_tasks);
        let g1 = ((gt + 1) * group_chunk).min(groups);
        let t1 = ((tt + 1) * TOKEN_CHUNK).min(n_tokens);
        let mut vals = [[0f32; GROUP]; 8];
        for g in gt * group_chunk..g1 {
            let mut t0 = tt * TOKEN_CHUNK;
            while t0 < t1 {
                let nt = (t1 - t0).min(8);
                group_tokens(w, act, g, t0, nt, kernel, &mut vals);
                let lanes = (w.rows - g * GROUP).min(GROUP);
                for (i, v) in vals.iter().enumerate().take(nt) {
                    let at = (t0 + i) * w.rows + g * GROUP;
                    for (l, &val) in v.iter().enumerate().take(lanes) {
                        // SAFETY: this task alone owns the rows of group `g` × tokens
                        // [t0, t0 + nt), and `y` stays exclusively borrowed until
                        // `parallel_for` returns.
                        unsafe { out.write(at + l, val) };
                    }
                }
                t0 += nt;
            }
        }
    });
    Ok(())
}

/// Group `g`'s 16 rows against tokens `t0..t0 + nt` (`nt` ≤ 8) into `vals[t][lane]`.
fn group_tokens(
    w: &PackedMatrix,
    act: &Activations,
    g: usize,
    t0: usize,
    nt: usize,
    kernel: PackedFn,
    vals: &mut [[f32; GROUP]; 8],
) {
    let nb = w.blocks();
    let cell_len = cell_bytes(w.source);
    let cells = &w.data[g * nb * cell_len..(g + 1) * nb * cell_len];
    let bytes = w.source == WeightType::Q8_0;
    let qs = &act.qs[t0 * nb * XQ..(t0 + nt) * nb * XQ];
    let ds = &act.ds[t0 * nb..(t0 + nt) * nb];
    kernel(cells, qs, ds, nb, nt, bytes, vals);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_matrix(ty: WeightType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let x: Vec<f32> = (0..rows * cols)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut out = Vec::new();
        for row in x.chunks_exact(cols) {
            let mut b = vec![0u8; crate::types::checked_row_bytes(ty, cols).unwrap()];
            crate::quantize_row(ty, row, &mut b).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The SIMD kernel equals its scalar twin bit for bit, and both agree with the
        /// unpacked matmul up to float rounding, for Q4_0 and Q4_1, any shape.
        #[test]
        fn packed_matmul_matches_scalar_and_unpacked(
            groups_rows in 1usize..40, nb in 1usize..12, n_tokens in 1usize..20, seed: u64,
            which in 0usize..3,
        ) {
            let ty = [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0][which];
            let (rows, cols) = (groups_rows, nb * QK);
            let bytes = random_matrix(ty, rows, cols, seed);
            let w = Matrix::new(ty, &bytes, rows, cols).unwrap();
            let p = PackedMatrix::pack_any(&w).unwrap();
            let mut s = seed.wrapping_mul(6364136223846793005) | 1;
            let x: Vec<f32> = (0..n_tokens * cols).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 4001) as f32 / 1000.0 - 2.0
            }).collect();
            let pool = ThreadPool::new(2);
            let mut fast = vec![0f32; n_tokens * rows];
            let mut slow = vec![0f32; n_tokens * rows];
            let mut plain = vec![0f32; n_tokens * rows];
            matmul_packed(&pool, &p, &x, n_tokens, &mut fast).unwrap();
            matmul_scalar(&pool, &p, &x, n_tokens, &mut slow).unwrap();
            crate::matmul(&pool, &w, &x, n_tokens, &mut plain).unwrap();
            prop_assert_eq!(&fast, &slow);
            // The unpacked Q4_1 path rounds `s_x` to f16 as ggml does; this one keeps it in
            // f32: the two differ by a rounding of the size of the terms, not of the sum.
            for (t, (a, b)) in fast.chunks_exact(rows).zip(plain.chunks_exact(rows)).enumerate() {
                let scale: f32 = x[t * cols..(t + 1) * cols].iter().map(|v| v.abs()).sum();
                for (a, b) in a.iter().zip(b) {
                    prop_assert!((a - b).abs() <= 2e-3 * (1.0 + scale), "{} vs {}", a, b);
                }
            }
            // A token's result does not depend on the others in the batch.
            let mut one = vec![0f32; rows];
            matmul_packed(&pool, &p, &x[..cols], 1, &mut one).unwrap();
            prop_assert_eq!(&one[..], &fast[..rows]);
        }
    }

    #[test]
    fn other_types_are_not_packed() {
        let bytes = vec![0u8; 4 * 32 * 4];
        let w = Matrix::new(WeightType::F32, &bytes, 4, 32).unwrap();
        assert!(PackedMatrix::pack_any(&w).is_none());
    }

    #[test]
    fn lengths_are_checked() {
        let bytes = random_matrix(WeightType::Q4_1, 3, 64, 7);
        let w = Matrix::new(WeightType::Q4_1, &bytes, 3, 64).unwrap();
        let p = PackedMatrix::pack_any(&w).unwrap();
        let pool = ThreadPool::new(1);
        let mut y = vec![0f32; 3];
        assert!(matmul_packed(&pool, &p, &[0.0; 63], 1, &mut y).is_err());
        assert!(matmul_packed(&pool, &p, &[0.0; 64], 1, &mut y[..2]).is_err());
    }
}
