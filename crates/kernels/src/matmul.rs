//! Weight-matrix × activations, ggml-style.
//!
//! Activations are first converted once per call to the weight type's "vec_dot type"
//! (Q4_0/Q8_0 → Q8_0 blocks, Q4_1 → Q8_1 blocks, F16 → f16, BF16 → bf16, F32 unchanged),
//! then every output is one table dot product of a weight row with a converted token row.
//!
//! Work is split into tasks of (a chunk of rows) × (a chunk of tokens). Inside a task the
//! loop runs over rows outside and tokens inside, so each weight row is streamed from memory
//! once per token chunk and stays in L1 while it meets every token of the chunk; a token
//! chunk of activations (≤ 32 tokens × a few KiB) stays in L2. Each (row, token) output is
//! computed by the same call no matter how tasks are split, so results are bit-identical for
//! any thread count.
#![allow(unsafe_code)]

use std::ops::Range;

use half::{bf16, f16};

use crate::dispatch;
use crate::formats::{BlockQ8_0, BlockQ8_1, BlockQ8K, QK, QK_K};
use crate::pool::ThreadPool;
use crate::table::{F16_TOKENS, Kernels, QuantizeFn, TileFn};
use crate::types::{KernelError, Matrix, WeightType};

/// Tokens per task.
const TOKEN_CHUNK: usize = 32;
/// Tasks per thread to aim for, so uneven progress still balances.
const TASKS_PER_THREAD: usize = 8;
/// Fewest rows per task (keeps hand-out overhead small on tiny matrices).
const MIN_ROW_CHUNK: usize = 4;

/// `y[t*rows + r] = dot(W row r, x[t*cols .. (t+1)*cols])` for `t` in `0..n_tokens`,
/// computed in parallel on `pool`.
///
/// # Errors
///
/// [`KernelError::LengthMismatch`] if `x.len() != n_tokens * cols` or
/// `y.len() != n_tokens * rows`; [`KernelError::Overflow`] if those products overflow.
pub fn matmul(
    pool: &ThreadPool,
    w: &Matrix<'_>,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows(), w.cols());
    check_len("matmul x", x.len(), n_tokens, cols)?;
    check_len("matmul y", y.len(), n_tokens, rows)?;
    if n_tokens == 0 || rows == 0 {
        return Ok(());
    }
    let k = dispatch::active();
    match w.ty() {
        WeightType::F32 => run(pool, w, n_tokens, y, &|row, t| {
            (k.dot_f32_bytes)(row, &x[t * cols..(t + 1) * cols])
        }),
        WeightType::F16 => {
            let mut xh = vec![f16::ZERO; x.len()];
            (k.f32_to_f16)(x, &mut xh);
            if n_tokens == 1 {
                run(pool, w, n_tokens, y, &|row, t| {
                    (k.dot_f16_bytes)(row, &xh[t * cols..(t + 1) * cols])
                });
            } else {
                // Several tokens: each weight vector widened once for all of them (the
                // activations widened back to f32 once, exactly); the same bits per output.
                let mut xw = vec![0f32; x.len()];
                (k.f16_to_f32)(&xh, &mut xw);
                run_tokens(pool, w, n_tokens, y, &|row, t0, out| {
                    (k.dot_f16_bytes_tokens)(row, &xw[t0 * cols..], cols, out)
                });
            }
        }
        WeightType::BF16 => {
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            run(pool, w, n_tokens, y, &|row, t| {
                (k.dot_bf16_bytes)(row, &xb[t * cols..(t + 1) * cols])
            });
        }
        WeightType::Q4_0 | WeightType::Q4_1 | WeightType::Q8_0 => {
            matmul_tiled(pool, &mut [(*w, y)], x, n_tokens);
        }
        WeightType::Q5_0 => {
            let (q, stride) = quantize_rows(k.quantize_q8_0, Q8_0_ACTS, x, cols);
            run(pool, w, n_tokens, y, &|row, t| {
                (k.dot_q5_0_q8_0)(row, &q[t * stride..(t + 1) * stride])
            });
        }
        WeightType::Q5_1 => {
            let (q, stride) = quantize_rows(k.quantize_q8_1, Q8_1_ACTS, x, cols);
            run(pool, w, n_tokens, y, &|row, t| {
                (k.dot_q5_1_q8_1)(row, &q[t * stride..(t + 1) * stride])
            });
        }
        // K-quants: activations to Q8_K (256-element blocks: an f32 scale and per-16 sums).
        ty @ (WeightType::Q2_K
        | WeightType::Q3_K
        | WeightType::Q4_K
        | WeightType::Q5_K
        | WeightType::Q6_K) => {
            let (q, stride) = quantize_rows(k.quantize_q8_k, Q8_K_ACTS, x, cols);
            if let Some(dot) = k.dot_q8_k(ty) {
                run(pool, w, n_tokens, y, &|row, t| {
                    dot(row, &q[t * stride..(t + 1) * stride])
                });
            }
        }
    }
    Ok(())
}

/// Several weight matrices applied to the same activations: `outs[i].1 = outs[i].0 · x`, as
/// [`matmul`] computes each (bit-identical results).
///
/// When every matrix is Q4_0/Q8_0 (or every one Q4_1), the activations are quantised once
/// and all products run as one parallel pass over the pool (one hand-off instead of one per
/// matrix): the attention projections Q, K, V and the MLP's gate and up share their input.
/// Other mixes run one [`matmul`] after another.
///
/// # Errors
///
/// As [`matmul`], for any pair; [`KernelError::LengthMismatch`] also when the matrices do
/// not all have `x.len() / n_tokens` columns.
pub fn matmul_many(
    pool: &ThreadPool,
    outs: &mut [(Matrix<'_>, &mut [f32])],
    x: &[f32],
    n_tokens: usize,
) -> Result<(), KernelError> {
    for (w, y) in outs.iter() {
        check_len("matmul_many x", x.len(), n_tokens, w.cols())?;
        check_len("matmul_many y", y.len(), n_tokens, w.rows())?;
    }
    if n_tokens == 0 || outs.is_empty() {
        return Ok(());
    }
    let k = dispatch::active();
    let act_block = |w: &Matrix<'_>| tile_of(k, w.ty()).map(|t| t.1);
    let first = act_block(&outs[0].0);
    if first.is_some() && outs.iter().all(|(w, _)| act_block(w) == first) {
        matmul_tiled(pool, outs, x, n_tokens);
        return Ok(());
    }
    for (w, y) in outs.iter_mut() {
        matmul(pool, w, x, n_tokens, y)?;
    }
    Ok(())
}

/// An activation block format: (elements, bytes) per block.
type ActBlock = (usize, usize);
const Q8_0_ACTS: ActBlock = (QK, BlockQ8_0::BYTES);
const Q8_1_ACTS: ActBlock = (QK, BlockQ8_1::BYTES);
const Q8_K_ACTS: ActBlock = (QK_K, BlockQ8K::BYTES);

/// The activation quantiser, its block format, and the tile kernel of a tiled weight type.
fn tile_of(k: &Kernels, ty: WeightType) -> Option<(QuantizeFn, ActBlock, TileFn)> {
    match ty {
        WeightType::Q4_0 => Some((k.quantize_q8_0, Q8_0_ACTS, k.tile_q4_0_q8_0)),
        WeightType::Q4_1 => Some((k.quantize_q8_1, Q8_1_ACTS, k.tile_q4_1_q8_1)),
        WeightType::Q8_0 => Some((k.quantize_q8_0, Q8_0_ACTS, k.tile_q8_0_q8_0)),
        _ => None,
    }
}

/// Rows per tile call: the tile kernels' row block.
const TILE_ROWS: usize = 4;

/// One matrix of a tiled pass and its share of the task indices.
struct Part<'a> {
    w: Matrix<'a>,
    tile: TileFn,
    out: DisjointOut,
    row_chunk: usize,
    row_tasks: usize,
    first_task: usize,
}

/// `matmul` of every pair in `outs` through the tile kernels, in one `parallel_for`. The
/// caller has checked lengths and that all matrices share one activation format.
///
/// Tasks are (matrix, chunk of rows, chunk of ≤ 32 tokens). A task walks its rows four at a
/// time; each group of four rows is read from memory once and meets every token of the chunk
/// (the kernel holds up to 4 × 4 pairs in registers), while the chunk's quantised
/// activations (≤ 32 × cols bytes) stay in L1/L2.
fn matmul_tiled(
    pool: &ThreadPool,
    outs: &mut [(Matrix<'_>, &mut [f32])],
    x: &[f32],
    n_tokens: usize,
) {
    let k = dispatch::active();
    let Some((quantize, act_block, _)) = outs.first().and_then(|(w, _)| tile_of(k, w.ty())) else {
        return;
    };
    let cols = outs[0].0.cols();
    let (q, stride) = quantize_rows(quantize, act_block, x, cols);
    let xs: Vec<&[u8]> = if stride > 0 {
        q.chunks_exact(stride).collect()
    } else {
        vec![&[][..]; n_tokens]
    };
    let token_tasks = n_tokens.div_ceil(TOKEN_CHUNK);
    let target = pool.n_threads() * TASKS_PER_THREAD;
    let mut parts = Vec::with_capacity(outs.len());
    let mut n_tasks = 0;
    for (w, y) in outs.iter_mut() {
        let Some((_, _, tile)) = tile_of(k, w.ty()) else {
            continue;
        };
        let rows = w.rows();
        let row_chunk = rows
            .div_ceil(target)
            .max(MIN_ROW_CHUNK)
            .next_multiple_of(TILE_ROWS);
        let row_tasks = rows.div_ceil(row_chunk);
        parts.push(Part {
            w: *w,
            tile,
            out: DisjointOut {
                ptr: y.as_mut_ptr(),
                len: y.len(),
            },
            row_chunk,
            row_tasks,
            first_task: n_tasks,
        });
        n_tasks += row_tasks * token_tasks;
    }
    let (parts, xs) = (&parts, &xs);
    pool.parallel_for(n_tasks, &|task| {
        let Some(p) = parts.iter().rev().find(|p| p.first_task <= task) else {
            return;
        };
        let local = task - p.first_task;
        let (rt, tt) = (local % p.row_tasks, local / p.row_tasks);
        let rows = p.w.rows();
        let r1 = ((rt + 1) * p.row_chunk).min(rows);
        let t0 = tt * TOKEN_CHUNK;
        let t1 = (t0 + TOKEN_CHUNK).min(n_tokens);
        let xt = &xs[t0..t1];
        let nt = xt.len();
        let mut buf = [0f32; TILE_ROWS * TOKEN_CHUNK];
        let mut r = rt * p.row_chunk;
        while r < r1 {
            let nr = (r1 - r).min(TILE_ROWS);
            let w_rows: [&[u8]; TILE_ROWS] =
                std::array::from_fn(|i| if i < nr { p.w.row(r + i) } else { &[] });
            (p.tile)(&w_rows[..nr], xt, &mut buf[..nr * nt]);
            for (ti, o) in buf[..nr * nt].chunks_exact(nr).enumerate() {
                for (i, &v) in o.iter().enumerate() {
                    // SAFETY: task `task` owns rows [r0, r1) × tokens [t0, t1) of this
                    // part's output alone (distinct tasks of a part differ in row or token
                    // range; distinct parts write distinct buffers), and every output stays
                    // exclusively borrowed by `outs` until `parallel_for` returns.
                    unsafe { p.out.write((t0 + ti) * rows + r + i, v) };
                }
            }
            r += nr;
        }
    });
}

pub(crate) fn check_len(
    what: &'static str,
    actual: usize,
    a: usize,
    b: usize,
) -> Result<(), KernelError> {
    let expected = a
        .checked_mul(b)
        .ok_or(KernelError::Overflow { what, a, b })?;
    if actual != expected {
        return Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Quantises every `cols`-long token row of `x` into blocks of `(block_len, block_bytes)`;
/// returns the buffer and the bytes per token. `cols` is a multiple of `block_len` (the
/// weight matrix was checked).
fn quantize_rows(
    quantize: QuantizeFn,
    (block_len, block_bytes): ActBlock,
    x: &[f32],
    cols: usize,
) -> (Vec<u8>, usize) {
    let stride = cols / block_len * block_bytes;
    let mut q = vec![0u8; x.len() / block_len * block_bytes];
    if stride > 0 {
        for (xt, qt) in x.chunks_exact(cols).zip(q.chunks_exact_mut(stride)) {
            quantize(xt, qt);
        }
    }
    (q, stride)
}

/// A shared handle for writing disjoint elements of `y` from several tasks.
pub(crate) struct DisjointOut {
    pub(crate) ptr: *mut f32,
    pub(crate) len: usize,
}

// SAFETY: `DisjointOut` is only a pointer to a `&mut [f32]` that its maker
// (`for_each_task`, the packed matmul's `run`) holds exclusively for its whole duration;
// tasks write pairwise-disjoint indices, so sharing it across the pool's threads cannot
// create a data race.
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    /// Writes `v` at `i`.
    ///
    /// # Safety
    ///
    /// No other thread may access index `i` during the borrow this handle came from.
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len, "output index in bounds");
        // SAFETY: `i < len`, the pointer comes from a live `&mut [f32]` of `len` elements,
        // and the caller guarantees exclusive access to index `i`.
        unsafe { *self.ptr.add(i) = v };
    }

    /// Writes `v` at `i..i + v.len()`.
    ///
    /// # Safety
    ///
    /// No other thread may access those indices during the borrow this handle came from.
    pub(crate) unsafe fn write_slice(&self, i: usize, v: &[f32]) {
        assert!(
            i.checked_add(v.len()).is_some_and(|end| end <= self.len),
            "output range in bounds"
        );
        // SAFETY: the range is inside the `len` elements of a live `&mut [f32]`, `v` is
        // another allocation (a task's local values), and the caller guarantees exclusive
        // access to the range.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i), v.len()) };
    }
}

/// Weight bytes of a row block in [`run_tokens`] (within a 1-2 MiB L2 beside the
/// activations).
const ROW_BLOCK_BYTES: usize = 256 * 1024;

/// A task of [`for_each_task`]: its rows, its tokens and the output.
type Task<'a> = dyn Fn(Range<usize>, Range<usize>, &DisjointOut) + Sync + 'a;

/// Splits the (row, token) pairs of a `rows` × `n_tokens` output `y` (`y[token*rows +
/// row]`) into tasks of (a chunk of rows) × (a chunk of tokens) on `pool`. A task may write
/// exactly its own pairs through `out`: distinct tasks have disjoint row or token ranges,
/// and `y` stays exclusively borrowed until every task has returned.
fn for_each_task(pool: &ThreadPool, rows: usize, n_tokens: usize, y: &mut [f32], task: &Task<'_>) {
    let row_chunk = rows
        .div_ceil(pool.n_threads() * TASKS_PER_THREAD)
        .max(MIN_ROW_CHUNK);
    let row_tasks = rows.div_ceil(row_chunk);
    let token_tasks = n_tokens.div_ceil(TOKEN_CHUNK);
    let out = DisjointOut {
        ptr: y.as_mut_ptr(),
        len: y.len(),
    };
    let out = &out;
    pool.parallel_for(row_tasks * token_tasks, &|i| {
        let (rt, tt) = (i % row_tasks, i / row_tasks);
        let r0 = rt * row_chunk;
        let t0 = tt * TOKEN_CHUNK;
        task(
            r0..(r0 + row_chunk).min(rows),
            t0..(t0 + TOKEN_CHUNK).min(n_tokens),
            out,
        );
    });
}

/// `dot(row, t0, out)` of [`run_tokens`].
type TokensDot<'a> = dyn Fn(&[u8], usize, &mut [f32]) + Sync + 'a;

/// [`run`] for a kernel that computes one row against several tokens at once:
/// `dot(row, t0, out)` fills `out[i]` for tokens `t0 + i`.
fn run_tokens(
    pool: &ThreadPool,
    w: &Matrix<'_>,
    n_tokens: usize,
    y: &mut [f32],
    dot: &TokensDot<'_>,
) {
    let rows = w.rows();
    // Rows in blocks that stay in L2, and in each, tokens outside and rows inside: a token
    // block's activations stay in L1 while the rows stream past them from L2, and each row
    // comes from memory once (rows outside would re-read 32 tokens' activations, up to 200
    // KiB, from L2 for every row; the task's rows inside without blocks would re-read a
    // large matrix, an output head, from memory for every token block).
    let row_block = (ROW_BLOCK_BYTES / w.row_bytes().max(1)).max(1);
    for_each_task(pool, rows, n_tokens, y, &|rs, ts, out| {
        let mut vals = [0f32; F16_TOKENS];
        for rb0 in rs.clone().step_by(row_block) {
            let rb1 = (rb0 + row_block).min(rs.end);
            for b0 in ts.clone().step_by(F16_TOKENS) {
                let b1 = (b0 + F16_TOKENS).min(ts.end);
                let vals = &mut vals[..b1 - b0];
                for r in rb0..rb1 {
                    dot(w.row(r), b0, vals);
                    for (t, &v) in (b0..b1).zip(vals.iter()) {
                        // SAFETY: (r, t) is this task's pair (`for_each_task`).
                        unsafe { out.write(t * rows + r, v) };
                    }
                }
            }
        }
    });
}

/// Evaluates `dot(row_bytes, token)` for every (row, token) pair into `y[token*rows + row]`.
fn run(
    pool: &ThreadPool,
    w: &Matrix<'_>,
    n_tokens: usize,
    y: &mut [f32],
    dot: &(dyn Fn(&[u8], usize) -> f32 + Sync),
) {
    let rows = w.rows();
    for_each_task(pool, rows, n_tokens, y, &|rs, ts, out| {
        for r in rs {
            let row = w.row(r);
            for t in ts.clone() {
                let v = dot(row, t);
                // SAFETY: (r, t) is this task's pair (`for_each_task`).
                unsafe { out.write(t * rows + r, v) };
            }
        }
    });
}
