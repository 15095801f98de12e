//! Q4_0, Q4_1 and Q8_0 weights repacked sixteen rows at a time, for the packed matmul
//! kernels (AVX-512 VNNI: `crate::arch::x86_64::avx512vnni`; AVX2:
//! `crate::arch::x86_64::avx2_packed`, which reads each 16-row vector as two halves).
//!
//! In GGUF a row's blocks are contiguous, so a dot product is one row against one token
//! and ends in a horizontal sum; every block needs its nibbles spread into the token's
//! element order and its scale fetched. Here the rows are interleaved instead: for each group
//! of 16 rows and each block of 32 columns the group stores
//!
//! - the 16 rows' scales `d` as f16, then their offsets `m` as f16 (Q4_0's value
//!   `d·(q − 8)` is stored as `d·q + m` with `m = −8·d`, exact in f16), 64 bytes; Q8_0's
//!   offsets (`m = −128·d`, below) are not stored but computed by the kernels, 32 bytes;
//! - four 64-byte vectors of nibbles: in vector `j`, the four bytes of lane `r` hold row `r`'s
//!   elements `4j..4j+4` in their low nibbles and `4j+16..4j+20` in their high ones. Q8_0
//!   has eight vectors of bytes instead (vector `i`, lane `r`: elements `4i..4i+4` of row `r`
//!   as `q + 128`, so that they are unsigned, with `m = −128·d`).
//!
//! One `vpdpbusd` of such a (masked) vector against four activation bytes broadcast to every
//! lane adds four products to each of the 16 rows' sums at once: 8 per block, no shuffles,
//! no horizontal sums, the scales loaded as vectors (lane = row); AVX2 does the same with
//! `vpmaddubsw` pairs summed in i16 and one `vpmaddwd` per block. Per block and token each
//! lane then does `acc = fma(d_w·d_x, Σ q·x, acc)` and `acc_m = fma(m_w, s_x, acc_m)` with
//! `s_x = d_x·Σ x_q`, and the result is `acc + acc_m` (the offsets' sum apart, as ggml keeps
//! it). The unpacked nibbles stay in registers while they meet several tokens.
//!
//! Activations are quantised once per call as for ggml's Q8_0/Q8_1 (32 signed bytes and an
//! f16 scale per block), also when several matrices share them ([`matmul_packed_many`]);
//! `s_x` is rounded to f16 for Q4_1 as in ggml's Q8_1, and kept in f32 for Q4_0 (whose
//! `−8·Σ x`, like Q8_0's `−128·Σ x`, ggml computes exactly in integers). Each lane's
//! operation sequence is fixed and the integer sums are exact, so every kernel (VNNI, AVX2)
//! and the scalar twin (`crate::arch::portable::packed_group`) give bit-identical results,
//! and a (row, token) result depends neither on the other tokens of the batch nor on the
//! thread count.
#![allow(unsafe_code)]

use half::f16;

use crate::arch::portable::kpacked::kpacked_group;
use crate::arch::portable::packed_group;
use crate::dispatch;
use crate::formats::KLayout;
use crate::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
use crate::formats::{CELL, CELL8, GROUP, XQ, vecs_at};
use crate::matmul::{DisjointOut, check_len};
use crate::packed_k::{self, KActivations, layout_of};
use crate::pool::ThreadPool;
use crate::table::{KPackedFn, PackedFn};
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

/// A weight matrix repacked for the packed kernels: Q4_0, Q4_1 or Q8_0 in the cells of the
/// module docs, or Q5_0, Q5_1, Q4_K, Q5_K or Q6_K in the K layouts of `crate::packed_k`.
pub struct PackedMatrix {
    data: Buffer,
    rows: usize,
    cols: usize,
    source: WeightType,
    /// The K layout, for the types `crate::packed_k` packs.
    k: Option<KLayout>,
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
    /// Repacks `w` when this CPU runs a packed kernel for its type (AVX2 or AVX-512 VNNI,
    /// within the `SOUVERAIN_SIMD` limit) and `w` is Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K,
    /// Q5_K or Q6_K; `None` otherwise (then use [`crate::matmul`]).
    pub fn pack(w: &Matrix<'_>) -> Option<Self> {
        let fast = if layout_of(w.ty()).is_some() {
            packed_k::fast_available()
        } else {
            fast_available()
        };
        if !fast {
            return None;
        }
        Self::pack_any(w)
    }

    /// Repacks `w` whatever the CPU (the scalar twins can run it); `None` for other types,
    /// a shape the layout cannot hold, or a scale too large for its offset to fit in f16.
    pub(crate) fn pack_any(w: &Matrix<'_>) -> Option<Self> {
        if let Some(l) = layout_of(w.ty()) {
            if !w.cols().is_multiple_of(l.sb) {
                return None;
            }
            let cells = w.rows().div_ceil(GROUP).checked_mul(w.cols() / l.sb)?;
            let mut data = Buffer::zeroed(cells.checked_mul(l.cell_bytes())?);
            packed_k::pack(w, &mut data)?;
            return Some(PackedMatrix {
                data,
                rows: w.rows(),
                cols: w.cols(),
                source: w.ty(),
                k: Some(l),
            });
        }
        // Offsets computed at packing when the type has none: Q4_0 `d·(q − 8)`.
        let (block, qs_at, m_from_d) = match w.ty() {
            WeightType::Q4_0 => (BlockQ4_0::BYTES, 2, Some(-8.0)),
            WeightType::Q4_1 => (BlockQ4_1::BYTES, 4, None),
            // Q8_0's offsets (`Q8_M·d`) are computed by the kernels in f32: none stored.
            WeightType::Q8_0 => (BlockQ8_0::BYTES, 2, None),
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
                cell[2 * lane..2 * lane + 2].copy_from_slice(&d);
                if w.ty() == WeightType::Q8_0 {
                    // Vector `i`, lane `r`: row `r`'s elements `4i..4i+4`, as `q + 128`.
                    let at = vecs_at(true);
                    for (e, &q) in blk[qs_at..qs_at + 32].iter().enumerate() {
                        cell[at + 64 * (e / 4) + 4 * lane + e % 4] = q ^ 0x80;
                    }
                    continue;
                }
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
                cell[32 + 2 * lane..32 + 2 * lane + 2].copy_from_slice(&m);
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
            k: None,
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

    /// Blocks (Q4/Q8 cells) or super-blocks (K layouts) per row.
    fn blocks(&self) -> usize {
        self.cols / self.k.map_or(QK, |l| l.sb)
    }

    fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }
}

/// Whether a packed kernel runs on this CPU (AVX2 or AVX-512 VNNI).
fn fast_available() -> bool {
    dispatch::active().packed.is_some()
}

/// Quantised activations: per token, `nb` blocks of 32 signed bytes, and per block
/// `(d_x, s_x)` in f32, `s_x` exact (`ds`, for Q4_0 and Q8_0) and rounded to f16 as ggml's
/// Q8_1 keeps it (`ds_f16`, for Q4_1); each only when a matrix of the call needs it.
struct Activations {
    qs: Vec<i8>,
    ds: Vec<[f32; 2]>,
    ds_f16: Vec<[f32; 2]>,
}

impl Activations {
    /// The `(d_x, s_x)` pairs a matrix packed from `source` reads.
    fn scales(&self, source: WeightType) -> &[[f32; 2]] {
        if rounds_s(source) {
            &self.ds_f16
        } else {
            &self.ds
        }
    }
}

/// Whether `source`'s offsets meet `s_x` rounded to f16 (ggml's Q8_1, for Q4_1); Q4_0's
/// `−8·Σ x` and Q8_0's `−128·Σ x` ggml computes exactly in integers.
fn rounds_s(source: WeightType) -> bool {
    source == WeightType::Q4_1
}

/// Quantises `x` (rows of `cols`) once for every matrix of a call: `exact` and `rounded`
/// say which `s_x` flavours they read.
fn quantize(x: &[f32], cols: usize, exact: bool, rounded: bool) -> Activations {
    let nb = cols / QK;
    // A pass of K layouts only reads none of it.
    let n_tokens = if exact || rounded {
        x.len().checked_div(cols).unwrap_or(0)
    } else {
        0
    };
    let mut qs = vec![0i8; n_tokens * nb * XQ];
    let mut ds = vec![[0f32; 2]; if exact { n_tokens * nb } else { 0 }];
    let mut ds_f16 = vec![[0f32; 2]; if rounded { n_tokens * nb } else { 0 }];
    let k = dispatch::active();
    let mut block = [0u8; BlockQ8_0::BYTES];
    for (i, (xb, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(XQ)).enumerate() {
        (k.quantize_q8_0)(xb, &mut block);
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut sum = 0i32;
        for (o, &b) in q.iter_mut().zip(&block[2..]) {
            *o = b as i8;
            sum += i32::from(b as i8);
        }
        let s = d * sum as f32;
        if let Some(p) = ds.get_mut(i) {
            *p = [d, s];
        }
        if let Some(p) = ds_f16.get_mut(i) {
            *p = [d, f16::from_f32(s).to_f32()];
        }
    }
    Activations { qs, ds, ds_f16 }
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
    matmul_packed_many(pool, &mut [(w, y)], x, n_tokens)
}

/// Several packed matrices applied to the same activations (`outs[i].1 = outs[i].0 · x`,
/// bit-identical to one [`matmul_packed`] each): the activations are quantised once and
/// every product runs in one parallel pass over the pool. The attention projections Q, K, V
/// and the MLP's gate and up share their input.
///
/// # Errors
///
/// As [`matmul_packed`], for any pair; [`KernelError::LengthMismatch`] also when the matrices
/// do not all have `x.len() / n_tokens` columns.
pub fn matmul_packed_many(
    pool: &ThreadPool,
    outs: &mut [(&PackedMatrix, &mut [f32])],
    x: &[f32],
    n_tokens: usize,
) -> Result<(), KernelError> {
    // The SIMD kernels where this CPU has them, else their scalar twins.
    let k = dispatch::active();
    let fns = Fns {
        packed: k.packed.unwrap_or(packed_group),
        kpacked: k.kpacked.unwrap_or(kpacked_group),
    };
    run(pool, outs, x, n_tokens, fns)
}

/// The kernels a pass runs: one for the Q4/Q8 cells, one for the K layouts.
#[derive(Clone, Copy)]
pub(crate) struct Fns {
    pub(crate) packed: PackedFn,
    pub(crate) kpacked: KPackedFn,
}

/// [`matmul_packed`] through given kernels: the scalar twins, or any table's (tests compare
/// them all).
#[cfg(test)]
pub(crate) fn matmul_with(
    pool: &ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    fns: Fns,
) -> Result<(), KernelError> {
    run(pool, &mut [(w, y)], x, n_tokens, fns)
}

/// The activations one matrix of a pass reads.
enum Act<'a> {
    /// `(d_x, s_x)` per block, with the shared quantised bytes (Q4/Q8 cells).
    Cells(&'a [[f32; 2]]),
    /// Per super-block quantisation (K layouts).
    K(&'a KActivations),
}

/// One matrix of a pass and its share of the task indices.
struct Part<'a> {
    w: &'a PackedMatrix,
    act: Act<'a>,
    out: DisjointOut,
    group_chunk: usize,
    group_tasks: usize,
    first_task: usize,
}

fn run(
    pool: &ThreadPool,
    outs: &mut [(&PackedMatrix, &mut [f32])],
    x: &[f32],
    n_tokens: usize,
    fns: Fns,
) -> Result<(), KernelError> {
    for (w, y) in outs.iter() {
        check_len("matmul_packed x", x.len(), n_tokens, w.cols)?;
        check_len("matmul_packed y", y.len(), n_tokens, w.rows)?;
    }
    let Some(cols) = outs.first().map(|(w, _)| w.cols) else {
        return Ok(());
    };
    if n_tokens == 0 {
        return Ok(());
    }
    let cells = |w: &&PackedMatrix| w.k.is_none();
    let exact = outs.iter().any(|(w, _)| cells(w) && !rounds_s(w.source));
    let rounded = outs.iter().any(|(w, _)| cells(w) && rounds_s(w.source));
    let act = quantize(x, cols, exact, rounded);
    // One K quantisation per super-block size the pass needs (32 and/or 256).
    let mut kacts: Vec<KActivations> = Vec::new();
    for (w, _) in outs.iter() {
        if let Some(l) = w.k
            && !kacts.iter().any(|a| a.sb == l.sb)
        {
            kacts.push(KActivations::quantize(x, cols, l.sb));
        }
    }
    let token_tasks = n_tokens.div_ceil(TOKEN_CHUNK);
    let target = pool.n_threads() * TASKS_PER_THREAD;
    let mut parts = Vec::with_capacity(outs.len());
    let mut n_tasks = 0;
    for (w, y) in outs.iter_mut() {
        let groups = w.groups();
        let group_chunk = groups.div_ceil(target).max(1);
        let group_tasks = groups.div_ceil(group_chunk);
        let act = match w.k {
            Some(l) => match kacts.iter().find(|a| a.sb == l.sb) {
                Some(a) => Act::K(a),
                None => return Ok(()),
            },
            None => Act::Cells(act.scales(w.source)),
        };
        parts.push(Part {
            w,
            act,
            out: DisjointOut {
                ptr: y.as_mut_ptr(),
                len: y.len(),
            },
            group_chunk,
            group_tasks,
            first_task: n_tasks,
        });
        n_tasks += group_tasks * token_tasks;
    }
    let (parts, qs) = (&parts, &act.qs);
    pool.parallel_for(n_tasks, &|task| {
        let Some(p) = parts.iter().rev().find(|p| p.first_task <= task) else {
            return;
        };
        let w = p.w;
        let local = task - p.first_task;
        let (gt, tt) = (local % p.group_tasks, local / p.group_tasks);
        let g1 = ((gt + 1) * p.group_chunk).min(w.groups());
        let t1 = ((tt + 1) * TOKEN_CHUNK).min(n_tokens);
        let mut vals = [[0f32; GROUP]; 8];
        for g in gt * p.group_chunk..g1 {
            let mut t0 = tt * TOKEN_CHUNK;
            while t0 < t1 {
                let nt = (t1 - t0).min(8);
                match p.act {
                    Act::Cells(ds) => group_tokens(w, qs, ds, g, t0, nt, fns.packed, &mut vals),
                    Act::K(a) => k_group_tokens(w, a, g, t0, nt, fns.kpacked, &mut vals),
                }
                let lanes = (w.rows - g * GROUP).min(GROUP);
                for (i, v) in vals.iter().enumerate().take(nt) {
                    let at = (t0 + i) * w.rows + g * GROUP;
                    // SAFETY: this task alone owns the rows of group `g` × tokens
                    // [t0, t0 + nt) of this part's output (distinct tasks of a part differ
                    // in group or token range; distinct parts write distinct buffers), and
                    // every output stays exclusively borrowed by `outs` until
                    // `parallel_for` returns.
                    unsafe { p.out.write_slice(at, &v[..lanes]) };
                }
                t0 += nt;
            }
        }
    });
    Ok(())
}

/// Group `g`'s 16 rows against tokens `t0..t0 + nt` (`nt` ≤ 8) into `vals[t][lane]`.
#[allow(clippy::too_many_arguments)]
fn group_tokens(
    w: &PackedMatrix,
    qs: &[i8],
    ds: &[[f32; 2]],
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
    let qs = &qs[t0 * nb * XQ..(t0 + nt) * nb * XQ];
    let ds = &ds[t0 * nb..(t0 + nt) * nb];
    kernel(cells, qs, ds, nb, nt, bytes, vals);
}

/// [`group_tokens`] for a matrix in a K layout.
fn k_group_tokens(
    w: &PackedMatrix,
    a: &KActivations,
    g: usize,
    t0: usize,
    nt: usize,
    kernel: KPackedFn,
    vals: &mut [[f32; GROUP]; 8],
) {
    let Some(l) = w.k else { return };
    let (nsb, cb, ns) = (w.blocks(), l.cell_bytes(), l.n_sub());
    let cells = &w.data[g * nsb * cb..(g + 1) * nsb * cb];
    let qs = &a.qs[t0 * w.cols..(t0 + nt) * w.cols];
    let d = &a.d[t0 * nsb..(t0 + nt) * nsb];
    let sums = &a.sums(&l)[t0 * nsb * ns..(t0 + nt) * nsb * ns];
    kernel(&l, cells, qs, d, sums, nsb, nt, vals);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{BlockQ8_1, BlockQ8K, QK_K};
    use crate::table::{DotFn, Kernels, QuantizeFn};
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

    /// `n` activation-like values in ±2, from `seed`.
    fn random_acts(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 4001) as f32 / 1000.0 - 2.0
            })
            .collect()
    }

    /// Today's row-wise result of table `k`: each (row, token) through the table's own
    /// block dot on the table's quantised activations (as `crate::matmul` computes it).
    fn row_wise(k: &Kernels, w: &Matrix<'_>, x: &[f32], n_tokens: usize) -> Vec<f32> {
        let (quantize, act_bytes, dot, block): (QuantizeFn, usize, DotFn, usize) = match w.ty() {
            WeightType::Q4_0 => (k.quantize_q8_0, BlockQ8_0::BYTES, k.dot_q4_0_q8_0, QK),
            WeightType::Q4_1 => (k.quantize_q8_1, BlockQ8_1::BYTES, k.dot_q4_1_q8_1, QK),
            WeightType::Q5_0 => (k.quantize_q8_0, BlockQ8_0::BYTES, k.dot_q5_0_q8_0, QK),
            WeightType::Q5_1 => (k.quantize_q8_1, BlockQ8_1::BYTES, k.dot_q5_1_q8_1, QK),
            ty => match k.dot_q8_k(ty) {
                Some(dot) => (k.quantize_q8_k, BlockQ8K::BYTES, dot, QK_K),
                None => (k.quantize_q8_0, BlockQ8_0::BYTES, k.dot_q8_0_q8_0, QK),
            },
        };
        let cols = w.cols();
        let stride = cols / block * act_bytes;
        let mut q = vec![0u8; n_tokens * stride];
        for (xt, qt) in x.chunks_exact(cols).zip(q.chunks_exact_mut(stride)) {
            quantize(xt, qt);
        }
        let mut y = vec![0f32; n_tokens * w.rows()];
        for (qt, yt) in q.chunks_exact(stride).zip(y.chunks_exact_mut(w.rows())) {
            for (r, v) in yt.iter_mut().enumerate() {
                *v = dot(w.row(r), qt);
            }
        }
        y
    }

    /// Runs `p · x` through every packed kernel this CPU has and through the scalar twin;
    /// checks they are bit-identical and returns the result.
    fn every_kernel(
        p: &PackedMatrix,
        x: &[f32],
        n_tokens: usize,
    ) -> Result<Vec<f32>, TestCaseError> {
        let pool = ThreadPool::new(2);
        let mut slow = vec![0f32; n_tokens * p.rows()];
        let scalar = Fns {
            packed: packed_group,
            kpacked: kpacked_group,
        };
        matmul_with(&pool, p, x, n_tokens, &mut slow, scalar).unwrap();
        let kernels: Vec<_> = dispatch::available()
            .iter()
            .filter_map(|k| {
                Some(Fns {
                    packed: k.packed?,
                    kpacked: k.kpacked?,
                })
            })
            .collect();
        // Every x86-64 CPU with AVX2, FMA and F16C runs at least the AVX2 kernel.
        #[cfg(target_arch = "x86_64")]
        if dispatch::available().iter().any(|k| k.name == "avx2") {
            prop_assert!(!kernels.is_empty());
        }
        for kernel in kernels {
            let mut fast = vec![0f32; n_tokens * p.rows()];
            matmul_with(&pool, p, x, n_tokens, &mut fast, kernel).unwrap();
            prop_assert_eq!(&fast, &slow);
        }
        Ok(slow)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Every SIMD packed kernel (AVX2, AVX-512 VNNI: each level the CPU has) equals the
        /// scalar twin bit for bit, and agrees with today's row-wise matmul of every level up
        /// to float rounding, for Q4_0, Q4_1 and Q8_0, any shape and batch size.
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
            let x = random_acts(n_tokens * cols, seed);
            let packed = every_kernel(&p, &x, n_tokens)?;
            let pool = ThreadPool::new(2);
            let mut active = vec![0f32; n_tokens * rows];
            matmul_packed(&pool, &p, &x, n_tokens, &mut active).unwrap();
            prop_assert_eq!(&active, &packed);
            for k in dispatch::available() {
                // The packed sums run in another float order than the row-wise ones (lanes
                // and the offsets' sum apart): a rounding of the size of the terms.
                let plain = row_wise(k, &w, &x, n_tokens);
                for (t, (a, b)) in packed.chunks_exact(rows).zip(plain.chunks_exact(rows)).enumerate() {
                    let scale: f32 = x[t * cols..(t + 1) * cols].iter().map(|v| v.abs()).sum();
                    for (a, b) in a.iter().zip(b) {
                        prop_assert!((a - b).abs() <= 2e-3 * (1.0 + scale), "{}: {} vs {}", k.name, a, b);
                    }
                }
            }
            // A token's result does not depend on the others in the batch.
            let mut one = vec![0f32; rows];
            matmul_packed(&pool, &p, &x[..cols], 1, &mut one).unwrap();
            prop_assert_eq!(&one[..], &packed[..rows]);
        }

        /// Matrices of mixed types sharing their input, in one call, give each matrix's own
        /// result bit for bit.
        #[test]
        fn packed_many_equals_one_by_one(
            rows in proptest::collection::vec(1usize..40, 1..4), nb in 1usize..8,
            n_tokens in 1usize..12, seed: u64,
        ) {
            let cols = nb * QK;
            let types = [WeightType::Q4_1, WeightType::Q4_0, WeightType::Q8_0];
            let bytes: Vec<_> = rows.iter().enumerate().map(|(i, &r)| {
                random_matrix(types[i % 3], r, cols, seed.wrapping_add(i as u64))
            }).collect();
            let packed: Vec<_> = rows.iter().zip(&bytes).enumerate().map(|(i, (&r, b))| {
                PackedMatrix::pack_any(&Matrix::new(types[i % 3], b, r, cols).unwrap()).unwrap()
            }).collect();
            let x = random_acts(n_tokens * cols, seed);
            let pool = ThreadPool::new(2);
            let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; n_tokens * r]).collect();
            let mut outs: Vec<_> = packed.iter().zip(ys.iter_mut()).map(|(p, y)| (p, &mut y[..])).collect();
            matmul_packed_many(&pool, &mut outs, &x, n_tokens).unwrap();
            for (p, y) in packed.iter().zip(&ys) {
                let mut one = vec![0f32; y.len()];
                matmul_packed(&pool, p, &x, n_tokens, &mut one).unwrap();
                prop_assert_eq!(&one, y);
            }
        }
    }

    /// The types packed in K layouts, and their super-block size.
    const K_TYPES: [(WeightType, usize); 5] = [
        (WeightType::Q5_0, QK),
        (WeightType::Q5_1, QK),
        (WeightType::Q4_K, QK_K),
        (WeightType::Q5_K, QK_K),
        (WeightType::Q6_K, QK_K),
    ];

    /// Checks `packed` (for `w` · `x`) against the row-wise matmul of every table.
    fn near_row_wise(
        w: &Matrix<'_>,
        x: &[f32],
        n_tokens: usize,
        packed: &[f32],
    ) -> Result<(), TestCaseError> {
        let (rows, cols) = (w.rows(), w.cols());
        for k in dispatch::available() {
            let plain = row_wise(k, w, x, n_tokens);
            for (t, (a, b)) in packed
                .chunks_exact(rows)
                .zip(plain.chunks_exact(rows))
                .enumerate()
            {
                let scale: f32 = x[t * cols..(t + 1) * cols].iter().map(|v| v.abs()).sum();
                for (a, b) in a.iter().zip(b) {
                    prop_assert!(
                        (a - b).abs() <= 2e-3 * (1.0 + scale),
                        "{:?} {}: {} vs {}",
                        w.ty(),
                        k.name,
                        a,
                        b
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Q5_0, Q5_1, Q4_K, Q5_K and Q6_K packed: every SIMD kernel equals the scalar twin
        /// bit for bit, and agrees with today's row-wise dots (ggml's) of every level up to
        /// float rounding; a token's result does not depend on the batch.
        #[test]
        fn k_packed_matmul_matches_scalar_and_unpacked(
            rows in 1usize..40, nb in 1usize..4, n_tokens in 1usize..12, seed: u64,
            which in 0usize..5,
        ) {
            let (ty, sb) = K_TYPES[which];
            let cols = nb * sb * if sb == QK { 3 } else { 1 };
            let bytes = random_matrix(ty, rows, cols, seed);
            let w = Matrix::new(ty, &bytes, rows, cols).unwrap();
            let p = PackedMatrix::pack_any(&w).unwrap();
            let x = random_acts(n_tokens * cols, seed);
            let packed = every_kernel(&p, &x, n_tokens)?;
            let pool = ThreadPool::new(2);
            let mut active = vec![0f32; n_tokens * rows];
            matmul_packed(&pool, &p, &x, n_tokens, &mut active).unwrap();
            prop_assert_eq!(&active, &packed);
            near_row_wise(&w, &x, n_tokens, &packed)?;
            let mut one = vec![0f32; rows];
            matmul_packed(&pool, &p, &x[..cols], 1, &mut one).unwrap();
            prop_assert_eq!(&one[..], &packed[..rows]);
        }

        /// A pass mixing the Q4/Q8 cells and K layouts of both super-block sizes gives each
        /// matrix its own result bit for bit.
        #[test]
        fn k_and_cells_mixed_in_one_pass(
            rows in proptest::collection::vec(1usize..40, 1..6), n_tokens in 1usize..10,
            seed: u64,
        ) {
            let cols = 2 * QK_K;
            let types = [
                WeightType::Q4_K, WeightType::Q4_1, WeightType::Q6_K, WeightType::Q5_0,
                WeightType::Q8_0, WeightType::Q5_1,
            ];
            let bytes: Vec<_> = rows.iter().enumerate().map(|(i, &r)| {
                random_matrix(types[i], r, cols, seed.wrapping_add(i as u64))
            }).collect();
            let packed: Vec<_> = rows.iter().zip(&bytes).enumerate().map(|(i, (&r, b))| {
                PackedMatrix::pack_any(&Matrix::new(types[i], b, r, cols).unwrap()).unwrap()
            }).collect();
            let x = random_acts(n_tokens * cols, seed);
            let pool = ThreadPool::new(2);
            let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; n_tokens * r]).collect();
            let mut outs: Vec<_> = packed.iter().zip(ys.iter_mut()).map(|(p, y)| (p, &mut y[..])).collect();
            matmul_packed_many(&pool, &mut outs, &x, n_tokens).unwrap();
            for (p, y) in packed.iter().zip(&ys) {
                let mut one = vec![0f32; y.len()];
                matmul_packed(&pool, p, &x, n_tokens, &mut one).unwrap();
                prop_assert_eq!(&one, y);
            }
        }
    }

    /// Every token count a kernel call takes (1..=8, and 9..=17 across calls), random weights
    /// and a different random activation per token, for every K layout: every kernel equals
    /// the scalar twin bit for bit (the property test draws the token counts at random;
    /// this covers each, so a token-indexing slip in one specialised loop cannot hide).
    #[test]
    fn k_every_token_count_matches_scalar() {
        for (i, (ty, sb)) in K_TYPES.into_iter().enumerate() {
            let (rows, cols) = (19, 2 * sb.max(QK_K));
            let bytes = random_matrix(ty, rows, cols, 11 + i as u64);
            let w = Matrix::new(ty, &bytes, rows, cols).unwrap();
            let p = PackedMatrix::pack_any(&w).unwrap();
            for n_tokens in 1..=17 {
                let x = random_acts(n_tokens * cols, 100 + n_tokens as u64);
                every_kernel(&p, &x, n_tokens).unwrap();
            }
        }
    }

    /// The K layouts at their extremes (every level at its maximum, scales and minimums at
    /// their largest magnitudes, activations at ±127): the AVX2 kernel's i16 sums must stay
    /// exact, so every kernel equals the scalar twin.
    #[test]
    fn k_extremes_stay_exact() {
        for (ty, sb) in K_TYPES {
            let cols = 2 * QK_K;
            let rows = 21;
            for (fill, xsign) in [(0xFFu8, 1f32), (0xFF, -1.0), (0x80, 1.0), (0x80, -1.0)] {
                let mut bytes = random_matrix(ty, rows, cols, 3);
                let block = ty.block_bytes();
                for blk in bytes.chunks_exact_mut(block) {
                    // Keep the f16 scales finite and small; every other byte at `fill`.
                    let scales: &[usize] = match ty {
                        WeightType::Q5_0 => &[0, 1],
                        WeightType::Q5_1 | WeightType::Q4_K | WeightType::Q5_K => &[0, 1, 2, 3],
                        _ => &[block - 2, block - 1],
                    };
                    for (i, b) in blk.iter_mut().enumerate() {
                        if !scales.contains(&i) {
                            *b = fill;
                        }
                    }
                }
                let w = Matrix::new(ty, &bytes, rows, cols).unwrap();
                let p = PackedMatrix::pack_any(&w).unwrap();
                assert_eq!(p.blocks(), cols / sb);
                for n_tokens in 1..=9 {
                    let x = vec![3.0 * xsign; n_tokens * cols];
                    let y = every_kernel(&p, &x, n_tokens).unwrap();
                    let want = row_wise(&crate::arch::portable::SCALAR, &w, &x, n_tokens);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                            "{ty:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The largest byte products each format can meet (all nibbles 15, Q8_0 quants at ±127,
    /// activations at ±127 in every block): the AVX2 kernel's i16 sums must stay exact, so
    /// every kernel still equals the scalar twin, which sums in i32.
    #[test]
    fn extreme_values_stay_exact() {
        let nb = 5;
        let cols = nb * QK;
        for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
            for (wsign, xsign) in [(1i8, 1f32), (1, -1.0), (-1, 1.0), (-1, -1.0)] {
                let rows = 19;
                let mut bytes = Vec::new();
                for _ in 0..rows * nb {
                    bytes.extend(f16::from_f32(0.01).to_le_bytes());
                    match ty {
                        WeightType::Q4_0 => bytes.extend([if wsign > 0 { 0xFF } else { 0x00 }; 16]),
                        WeightType::Q4_1 => {
                            bytes.extend(f16::from_f32(-0.5).to_le_bytes());
                            bytes.extend([0xFF; 16]);
                        }
                        _ => bytes.extend([(127 * wsign) as u8; 32]),
                    }
                }
                let w = Matrix::new(ty, &bytes, rows, cols).unwrap();
                let p = PackedMatrix::pack_any(&w).unwrap();
                for n_tokens in 1..=9 {
                    let x = vec![3.0 * xsign; n_tokens * cols];
                    let y = every_kernel(&p, &x, n_tokens).unwrap();
                    let want = row_wise(&crate::arch::portable::SCALAR, &w, &x, n_tokens);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                            "{ty:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Q8_0's offsets are computed in f32, never stored in f16, so scales whose `−128·d`
    /// would overflow f16 (`d` ≥ 512) pack too and give the row-wise results.
    #[test]
    fn q8_0_with_large_scales_packs() {
        let (rows, nb) = (17, 3);
        let cols = nb * QK;
        let mut bytes = Vec::new();
        for i in 0..rows * nb {
            bytes.extend(f16::from_f32(1024.0).to_le_bytes());
            bytes.extend((0..32).map(|e| ((i * 7 + e * 13) % 255) as u8));
        }
        let w = Matrix::new(WeightType::Q8_0, &bytes, rows, cols).unwrap();
        let p = PackedMatrix::pack_any(&w).expect("packed");
        for n_tokens in [1, 3] {
            let x = random_acts(n_tokens * cols, 5);
            let y = every_kernel(&p, &x, n_tokens).unwrap();
            let want = row_wise(&crate::arch::portable::SCALAR, &w, &x, n_tokens);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (a, b) in y.iter().zip(&want) {
                assert!(a.is_finite() && (a - b).abs() <= 1e-3 * scale, "{a} vs {b}");
            }
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
