//! Causal grouped-query attention over the paged KV cache, read in blocks, with the softmax's
//! running maximum and sum carried from segment to segment (flash-attention style).
//!
//! Work is cut three ways:
//! - **Tiles**: up to [`TILE`] consecutive rows of one sequence (a prompt chunk's queries; a
//!   decode step is a tile of one), so that a run of keys and values is read from memory
//!   once for all of the tile's queries.
//! - **KV heads**: a task takes every query head of one KV head together (grouped-query
//!   attention), so each key and value is read from memory once for the group (and, with
//!   an f16 cache, converted once: see Segments).
//! - **Segments**: the positions `[s · SEGMENT, (s + 1) · SEGMENT)`, read in runs (the slots
//!   of KV blocks that follow each other in the pool, `stride = kv_dim` apart). With an f16
//!   cache, each run's scores for all of a row's query heads of the KV head come from one
//!   call of `kernels::dot_f16_rows_group` and its values from one
//!   `kernels::axpy_f16_rows_group` (each key and value converted once for the group; the
//!   same bits as one query at a time, and whatever the runs' lengths).
//!
//! Per (row, query head) and segment, pass one computes the scaled scores, their maximum
//! `m_s` and `exp(score - m_s)` with its sum `l_s` by `kernels::exp_sum` (kept, not the keys: the keys are read
//! once). Merging the segments' `(m_s, l_s)` gives the softmax's maximum and sum; pass two
//! scales each kept exponential by `exp(m_s - m) / l` to its final weight and adds the
//! segment's values times those weights into a partial output; the partials are summed in
//! segment order. When there are few (tile, KV head) pairs (a decode step of a few
//! sequences), every segment of both passes is a pool task of its own, so one long sequence
//! uses every thread; otherwise a task walks its pair's segments itself. Both do the same
//! operations in the same order, and a row's segments, runs and masks (causal; the sliding
//! window) depend only on its own position, so a row's output is bit-identical whatever the
//! batch, the tiling, the KV block size, the task split or the thread count (the batch tests
//! rely on it).
//!
//! Numerics follow llama.cpp's CPU path for an f16 cache: queries are rounded to f16 for the
//! dot products with the f16 keys, and the normalised softmax weights are rounded to f16
//! before they scale the f16 values (its `kq · v` product converts the weights to f16). An
//! f32 cache computes in f32 throughout. The weights are normalised before the values are
//! summed (not the sum afterwards) for that reason: it keeps the outputs within float
//! rounding of the per-head loop this replaced, which the golden tests were fitted to.

use std::sync::Mutex;

use kernels::{ThreadPool, f16};

use crate::KvPool;
use crate::kv_cache::KvSlice;

/// Positions per segment: the unit of splitting one long context across tasks.
const SEGMENT: usize = 256;

/// Most query rows of one sequence that share each read of a run of keys and values.
const TILE: usize = 8;

/// Below this many (tile, KV head) pairs per thread, segments become tasks of their own.
const PAIRS_PER_THREAD: usize = 8;

/// The shape of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Multiplies every score (the config's `attention_scale`).
    pub(crate) scale: f32,
    /// `Some(w)`: the row at position `p` sees positions `p + 1 - w ..= p` only.
    pub(crate) window: Option<usize>,
}

/// One query row: its position and its sequence's block table (for this layer).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row<'a> {
    pub(crate) pos: usize,
    pub(crate) table: &'a [u32],
}

/// Causal attention of every row's queries (`q`, rows × `n_heads · head_dim`) over its own
/// sequence's cached keys and values of `layer` (`kv`), written to `out` (same shape).
/// Every row's own position must already be cached.
pub(crate) fn attention(
    pool: &ThreadPool,
    h: Heads,
    kv: &KvPool,
    layer: usize,
    rows: &[Row<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    let a = Attention::new(h, kv, layer, rows, q);
    let n_kv = h.n_kv_heads;
    let tiles = a.tiles();
    let slots: Vec<Mutex<&mut [f32]>> = out
        .chunks_exact_mut(a.group * h.head_dim)
        .map(Mutex::new)
        .collect();
    // The summed partial outputs of (tile, KV head) `pair` into the rows' outputs.
    let write = |pair: usize, o: &[f32]| {
        let (t, kvh) = (&tiles[pair / n_kv], pair % n_kv);
        for (r, o) in (t.start..t.end).zip(o.chunks_exact(a.group * h.head_dim)) {
            if let Ok(mut slot) = slots[r * n_kv + kvh].lock() {
                slot.copy_from_slice(o);
            }
        }
    };
    let pairs = tiles.len() * n_kv;
    if pairs >= PAIRS_PER_THREAD * pool.n_threads() {
        pool.parallel_for(pairs, &|pair| {
            let (t, kvh) = (&tiles[pair / n_kv], pair % n_kv);
            let segs: Vec<Scores> = t.segments.clone().map(|s| a.scores(t, kvh, s)).collect();
            let norm = Norm::of(&segs.iter().collect::<Vec<_>>());
            let mut total = vec![0f32; t.len() * a.group * h.head_dim];
            let mut part = total.clone();
            for (s, seg) in t.segments.clone().zip(&segs) {
                part.fill(0.0);
                a.weighted(t, kvh, s, seg, &norm, &mut part);
                kernels::add_assign(&mut total, &part);
            }
            write(pair, &total);
        });
        return;
    }
    // Few pairs: one task per (tile, KV head, segment) for each pass, then the sums.
    let tasks: Vec<(usize, usize)> = (0..pairs)
        .flat_map(|pair| tiles[pair / n_kv].segments.clone().map(move |s| (pair, s)))
        .collect();
    let mut first = 0;
    let starts: Vec<usize> = (0..pairs)
        .map(|pair| {
            let at = first;
            first += tiles[pair / n_kv].segments.len();
            at
        })
        .collect();
    let of_pair = |pair: usize| starts[pair]..starts[pair] + tiles[pair / n_kv].segments.len();
    let scores: Vec<Mutex<Option<Scores>>> = tasks.iter().map(|_| Mutex::new(None)).collect();
    pool.parallel_for(tasks.len(), &|i| {
        let (pair, s) = tasks[i];
        let seg = a.scores(&tiles[pair / n_kv], pair % n_kv, s);
        if let Ok(mut slot) = scores[i].lock() {
            *slot = Some(seg);
        }
    });
    let scores: Vec<Scores> = scores
        .into_iter()
        .map(|m| m.into_inner().ok().flatten().unwrap_or_default())
        .collect();
    let norms: Vec<Norm> = (0..pairs)
        .map(|pair| Norm::of(&scores[of_pair(pair)].iter().collect::<Vec<_>>()))
        .collect();
    let parts: Vec<Mutex<Vec<f32>>> = tasks.iter().map(|_| Mutex::new(Vec::new())).collect();
    pool.parallel_for(tasks.len(), &|i| {
        let (pair, s) = tasks[i];
        let t = &tiles[pair / n_kv];
        let mut part = vec![0f32; t.len() * a.group * h.head_dim];
        a.weighted(t, pair % n_kv, s, &scores[i], &norms[pair], &mut part);
        if let Ok(mut slot) = parts[i].lock() {
            *slot = part;
        }
    });
    pool.parallel_for(pairs, &|pair| {
        let t = &tiles[pair / n_kv];
        let mut total = vec![0f32; t.len() * a.group * h.head_dim];
        for part in &parts[of_pair(pair)] {
            if let Ok(part) = part.lock() {
                kernels::add_assign(&mut total, &part);
            }
        }
        write(pair, &total);
    });
}

/// Consecutive rows `start..end` of one sequence and the segments they read.
#[derive(Clone, Debug)]
struct Tile {
    start: usize,
    end: usize,
    segments: std::ops::Range<usize>,
}

impl Tile {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// Pass one's result for one segment of a tile and KV head, per (row, query head) pair `p`
/// (row-major: `p = i · group + g`): the maximum scaled score `m[p]` (−∞ where the row sees
/// no position of the segment), `l[p] = Σ exp(score − m[p])`, and those exponentials,
/// `e[p · SEGMENT + (pos − segment start)]`.
#[derive(Clone, Debug, Default)]
struct Scores {
    m: Vec<f32>,
    l: Vec<f64>,
    e: Vec<f32>,
}

/// The softmax's maximum and the factor `1 / sum` of every (row, query head) pair of a
/// tile and KV head, from the segments' [`Scores`].
struct Norm {
    m: Vec<f32>,
    inv: Vec<f32>,
}

impl Norm {
    fn of(segs: &[&Scores]) -> Self {
        let n = segs.first().map_or(0, |s| s.m.len());
        let m: Vec<f32> = (0..n)
            .map(|p| segs.iter().fold(f32::NEG_INFINITY, |m, s| m.max(s.m[p])))
            .collect();
        let inv = (0..n)
            .map(|p| {
                let sum: f64 = segs
                    .iter()
                    .filter(|s| s.m[p] > f32::NEG_INFINITY)
                    .map(|s| s.l[p] * f64::from(s.m[p] - m[p]).exp())
                    .sum();
                if sum > 0.0 { (1.0 / sum) as f32 } else { 0.0 }
            })
            .collect();
        Self { m, inv }
    }
}

/// One layer's attention inputs.
struct Attention<'a> {
    h: Heads,
    group: usize,
    kv_dim: usize,
    block_tokens: usize,
    keys: KvSlice<'a>,
    values: KvSlice<'a>,
    kv: &'a KvPool,
    rows: &'a [Row<'a>],
    q: &'a [f32],
}

impl<'a> Attention<'a> {
    fn new(h: Heads, kv: &'a KvPool, layer: usize, rows: &'a [Row<'a>], q: &'a [f32]) -> Self {
        Self {
            h,
            group: h.n_heads / h.n_kv_heads,
            kv_dim: h.n_kv_heads * h.head_dim,
            block_tokens: kv.block_tokens(),
            keys: kv.keys(layer),
            values: kv.values(layer),
            kv,
            rows,
            q,
        }
    }

    /// The first position row `r` sees.
    fn first(&self, r: usize) -> usize {
        let n_ctx = self.rows[r].pos + 1;
        self.h.window.map_or(0, |w| n_ctx.saturating_sub(w))
    }

    /// Rows cut into tiles: runs of up to [`TILE`] consecutive rows with the same table.
    fn tiles(&self) -> Vec<Tile> {
        let mut tiles: Vec<Tile> = Vec::new();
        for (r, row) in self.rows.iter().enumerate() {
            let joins = tiles.last().is_some_and(|t| {
                let prev = &self.rows[t.end - 1];
                t.end == r
                    && t.len() < TILE
                    && std::ptr::eq(prev.table, row.table)
                    && prev.pos < row.pos
            });
            if joins && let Some(t) = tiles.last_mut() {
                t.end = r + 1;
            } else {
                tiles.push(Tile {
                    start: r,
                    end: r + 1,
                    segments: 0..0,
                });
            }
        }
        for t in &mut tiles {
            let lo = (t.start..t.end).map(|r| self.first(r)).min().unwrap_or(0);
            let hi = (t.start..t.end)
                .map(|r| self.rows[r].pos)
                .max()
                .unwrap_or(0);
            t.segments = lo / SEGMENT..hi / SEGMENT + 1;
        }
        tiles
    }

    /// Calls `f(i, from, runs)` for every row `i` of the tile that sees a position of
    /// segment `s`: `from` is the first such position, `runs` its `(index from from, cache
    /// offset of KV head kvh, length)` pieces, one per run of KV blocks that follow each
    /// other in the pool.
    fn runs(&self, t: &Tile, kvh: usize, s: usize, mut f: impl FnMut(usize, usize, &[Run])) {
        let bt = self.block_tokens;
        let table = self.rows[t.start].table;
        let mut runs: Vec<Run> = Vec::new();
        for i in 0..t.len() {
            let r = t.start + i;
            let from = self.first(r).max(s * SEGMENT);
            let to = (self.rows[r].pos + 1).min((s + 1) * SEGMENT);
            if from >= to {
                continue;
            }
            runs.clear();
            let mut p = from;
            while p < to {
                let mut end = to.min((p / bt + 1) * bt);
                // Blocks that follow each other in the pool extend the run (fewer, longer
                // kernel calls; the same operations in the same order).
                while end < to && table[end / bt] as usize == table[(end - 1) / bt] as usize + 1 {
                    end = to.min(end + bt);
                }
                let at = self.kv.offset(table, p) + kvh * self.h.head_dim;
                runs.push((p - from, at, end - p));
                p = end;
            }
            f(i, from, &runs);
        }
    }

    /// Pass one over segment `s` for the tile's rows and KV head `kvh`'s query heads.
    fn scores(&self, t: &Tile, kvh: usize, s: usize) -> Scores {
        let (hd, group, kv_dim) = (self.h.head_dim, self.group, self.kv_dim);
        let q_dim = self.h.n_heads * hd;
        let pairs = t.len() * group;
        let mut out = Scores {
            m: vec![f32::NEG_INFINITY; pairs],
            l: vec![0.0; pairs],
            e: vec![0.0; pairs * SEGMENT],
        };
        let q_at = |i: usize, g: usize| {
            let (r, h) = (t.start + i, kvh * group + g);
            &self.q[r * q_dim + h * hd..r * q_dim + (h + 1) * hd]
        };
        let mut q16 = vec![f16::ZERO; group * hd];
        let mut q8 = kernels::Q8Query::default();
        self.runs(t, kvh, s, |i, from, runs| {
            let n = runs.iter().map(|r| r.0 + r.2).max().unwrap_or(0);
            let at = |g: usize| (i * group + g) * SEGMENT + (from - s * SEGMENT);
            // An f16 cache: the group's queries together, each key read once for all of
            // them (their scores `SEGMENT` apart, as `e` keeps them).
            if let KvSlice::F16(keys) = self.keys {
                for (g, q16) in q16.chunks_exact_mut(hd).enumerate() {
                    kernels::f32_to_f16_slice(q_at(i, g), q16);
                }
                for &(j, at_k, len) in runs {
                    let e = &mut out.e[at(0) + j..];
                    kernels::dot_f16_rows_group(&q16, hd, &keys[at_k..], kv_dim, len, e, SEGMENT);
                }
            }
            for g in 0..group {
                let p = i * group + g;
                let at0 = at(g);
                let sc = &mut out.e[at0..at0 + n];
                match self.keys {
                    KvSlice::F16(_) => {}
                    KvSlice::F32(keys) => {
                        let q = q_at(i, g);
                        for &(j, at, len) in runs {
                            for (k, o) in sc[j..j + len].iter_mut().enumerate() {
                                *o = kernels::dot_f32(q, &keys[at + k * kv_dim..][..hd]);
                            }
                        }
                    }
                    KvSlice::Q8(keys, scales) => {
                        q8.set(q_at(i, g));
                        for &(j, at, len) in runs {
                            let (k, d) = (&keys[at..], &scales[at / 32..]);
                            kernels::dot_q8_0_rows(&q8, k, d, kv_dim, &mut sc[j..j + len]);
                        }
                    }
                }
                let max = scale_max(sc, self.h.scale);
                let sum = kernels::exp_sum(sc, max);
                out.m[p] = max;
                out.l[p] = f64::from(sum);
            }
        });
        out
    }

    /// Pass two over segment `s`: the segment's values times their final weights, added to
    /// `o` (the tile's rows × the group's heads × `head_dim`).
    fn weighted(&self, t: &Tile, kvh: usize, s: usize, seg: &Scores, norm: &Norm, o: &mut [f32]) {
        let (hd, group, kv_dim) = (self.h.head_dim, self.group, self.kv_dim);
        // The group's weights, `SEGMENT` apart (an f16 cache weighs the values of all of
        // them at once).
        let mut wg = vec![0f32; group * SEGMENT];
        let mut w16 = vec![f16::ZERO; SEGMENT];
        self.runs(t, kvh, s, |i, from, runs| {
            let n = runs.iter().map(|r| r.0 + r.2).max().unwrap_or(0);
            for g in 0..group {
                let p = i * group + g;
                let at0 = p * SEGMENT + (from - s * SEGMENT);
                let c = (seg.m[p] - norm.m[p]).exp() * norm.inv[p];
                let o = &mut o[p * hd..(p + 1) * hd];
                let w = &mut wg[g * SEGMENT..(g + 1) * SEGMENT];
                for (w, &e) in w[..n].iter_mut().zip(&seg.e[at0..at0 + n]) {
                    *w = e * c;
                }
                match self.values {
                    KvSlice::F16(_) => {
                        kernels::f32_to_f16_slice(&w[..n], &mut w16[..n]);
                        kernels::f16_to_f32_slice(&w16[..n], &mut w[..n]);
                    }
                    KvSlice::F32(values) => {
                        for &(j, at, len) in runs {
                            for (k, &w) in w[j..j + len].iter().enumerate() {
                                let v = &values[at + k * kv_dim..][..hd];
                                for (o, &v) in o.iter_mut().zip(v) {
                                    *o += w * v;
                                }
                            }
                        }
                    }
                    KvSlice::Q8(values, scales) => {
                        for &(j, at, len) in runs {
                            let (v, d) = (&values[at..], &scales[at / 32..]);
                            kernels::axpy_q8_0_rows(o, &w[j..j + len], v, d, kv_dim);
                        }
                    }
                }
            }
            if let KvSlice::F16(values) = self.values {
                let o = &mut o[i * group * hd..(i + 1) * group * hd];
                for &(j, at, len) in runs {
                    let w = &wg[j..];
                    kernels::axpy_f16_rows_group(o, hd, w, SEGMENT, len, &values[at..], kv_dim);
                }
            }
        });
    }
}

/// Multiplies every score by `scale` and returns the largest (NaNs ignored; -inf for none):
/// eight running maxima, one per lane, so that the compiler keeps them in one vector.
fn scale_max(x: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (v, m) in c.iter_mut().zip(&mut m) {
            *v *= scale;
            *m = if *v > *m { *v } else { *m };
        }
    }
    for v in chunks.into_remainder() {
        *v *= scale;
        m[0] = if *v > m[0] { *v } else { m[0] };
    }
    m.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// A piece of a row's segment in one run of KV blocks that follow each other in the pool:
/// (index from the row's first position in the segment, cache offset, length).
type Run = (usize, usize, usize);

#[cfg(test)]
mod tests {
    //! The blocked attention against a naive one (every score, one softmax in f64, one
    //! weighted sum) on random shapes: heads, KV heads, head sizes with and without SIMD
    //! tails, block sizes, contexts crossing block and segment boundaries, windows, shuffled
    //! block tables, several sequences per batch, f16 and f32 caches.

    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{KvType, LlamaConfig};

    fn config(n_heads: usize, n_kv_heads: usize, head_dim: usize, kv_f32: bool) -> LlamaConfig {
        LlamaConfig {
            n_layers: 1,
            d_model: n_heads * head_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: 1,
            vocab_size: 1,
            context_length: 1 << 20,
            rope_dim: head_dim,
            rms_eps: 1e-5,
            kv_f32,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            ..LlamaConfig::base("llama")
        }
    }

    /// A sequence of the batch: its block table, cached length and query rows.
    struct Seq {
        table: Vec<u32>,
        len: usize,
        queries: usize,
    }

    /// Every score, an f64 softmax and an f64 weighted sum, reading the pool position by
    /// position (queries and weights rounded to f16 for an f16 cache, as llama.cpp does).
    fn naive(h: Heads, kv: &KvPool, rows: &[Row<'_>], q: &[f32]) -> Vec<f64> {
        let (hd, group, kv_dim) = (
            h.head_dim,
            h.n_heads / h.n_kv_heads,
            h.n_kv_heads * h.head_dim,
        );
        let read = |s: KvSlice<'_>, at: usize| -> Vec<f64> {
            match s {
                KvSlice::F16(x) => x[at..at + hd]
                    .iter()
                    .map(|v| f64::from(v.to_f32()))
                    .collect(),
                KvSlice::F32(x) => x[at..at + hd].iter().map(|&v| f64::from(v)).collect(),
                KvSlice::Q8(x, d) => x[at..at + hd]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| f64::from(d[(at + i) / 32].to_f32()) * f64::from(v))
                    .collect(),
            }
        };
        let f16_cache = matches!(kv.keys(0), KvSlice::F16(_));
        let q8_cache = matches!(kv.keys(0), KvSlice::Q8(..));
        let mut out = vec![0f64; q.len()];
        for (r, row) in rows.iter().enumerate() {
            let first = h.window.map_or(0, |w| (row.pos + 1).saturating_sub(w));
            for head in 0..h.n_heads {
                let q_head = &q[(r * h.n_heads + head) * hd..][..hd];
                // A Q8_0 cache's scores use the query quantised to Q8_0.
                let q_head = if q8_cache {
                    let mut qq = kernels::Q8Query::default();
                    qq.set(q_head);
                    qq.values()
                } else {
                    q_head.to_vec()
                };
                let qh: Vec<f64> = q_head
                    .iter()
                    .map(|&v| {
                        f64::from(if f16_cache {
                            f16::from_f32(v).to_f32()
                        } else {
                            v
                        })
                    })
                    .collect();
                let at = |p: usize| kv.offset(row.table, p) + (head / group) * hd;
                let scores: Vec<f64> = (first..=row.pos)
                    .map(|p| {
                        let k = read(kv.keys(0), at(p));
                        qh.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() * f64::from(h.scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                let o = &mut out[(r * h.n_heads + head) * hd..][..hd];
                for (p, w) in (first..=row.pos).zip(&w) {
                    // llama.cpp's f16 weights with an f16 cache.
                    let w = if f16_cache {
                        f64::from(f16::from_f64(w / sum).to_f32())
                    } else {
                        w / sum
                    };
                    for (o, v) in o.iter_mut().zip(read(kv.values(0), at(p))) {
                        *o += w * v;
                    }
                }
            }
        }
        let _ = kv_dim;
        out
    }

    fn fixed(cases: u32) -> Config {
        Config {
            cases,
            rng_seed: RngSeed::Fixed(0xa77e_4710),
            failure_persistence: None,
            ..Config::default()
        }
    }

    #[test]
    fn scale_max_is_the_scaled_maximum() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in 0..40 {
            let x: Vec<f32> = (0..len).map(|_| rng.gen_range(-100.0f32..100.0)).collect();
            let mut with_nan = x.clone();
            if len > 3 {
                with_nan[len / 2] = f32::NAN;
            }
            for x in [x, with_nan] {
                let scale = rng.gen_range(0.01f32..2.0);
                let want: Vec<f32> = x.iter().map(|v| v * scale).collect();
                let want_max = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut got = x.clone();
                let max = scale_max(&mut got, scale);
                assert_eq!(max.to_bits(), want_max.to_bits(), "length {len}");
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
            }
        }
    }

    proptest! {
        #![proptest_config(fixed(64))]

        #[test]
        fn blocked_matches_naive(
            n_kv_heads in 1usize..4,
            group in 1usize..4,
            head_dim in 1usize..80,
            block_tokens in 1usize..40,
            window in prop::option::of(1usize..300),
            kv_f32 in prop::bool::weighted(0.25),
            kv_q8 in prop::bool::weighted(0.25),
            seed: u64,
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let n_heads = n_kv_heads * group;
            // A Q8_0 cache (f16 models only) holds whole 32-element blocks per head.
            let kv_q8 = kv_q8 && !kv_f32;
            let head_dim = if kv_q8 { head_dim.div_ceil(32) * 32 } else { head_dim };
            let ty = if kv_q8 { KvType::Q8_0 } else { KvType::F16 };
            let c = config(n_heads, n_kv_heads, head_dim, kv_f32);
            // One to three sequences, contexts up to ~700 (crossing segment boundaries),
            // each with a few query rows at its end (a prompt chunk or a decode step).
            let n_seqs = rng.gen_range(1..=3);
            let lens: Vec<usize> = (0..n_seqs)
                .map(|_| if rng.gen_ratio(1, 2) { rng.gen_range(1..80) } else { rng.gen_range(200..700) })
                .collect();
            let blocks_of: Vec<usize> = lens.iter().map(|l| l.div_ceil(block_tokens)).collect();
            let n_blocks: usize = blocks_of.iter().sum::<usize>() + 2;
            let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
            ids.shuffle(&mut rng);
            let mut kv = KvPool::typed(&c, block_tokens, n_blocks, n_blocks, ty).expect("pool");
            let kv_dim = c.kv_dim();
            let mut taken = 0;
            let seqs: Vec<Seq> = lens
                .iter()
                .zip(&blocks_of)
                .map(|(&len, &nb)| {
                    let table = ids[taken..taken + nb].to_vec();
                    taken += nb;
                    Seq { table, len, queries: rng.gen_range(1..=len.min(12)) }
                })
                .collect();
            let scale = rng.gen_range(0.1f32..3.0);
            // The same keys and values also in a pool of another block size, tables in order.
            let bt2 = rng.gen_range(1..40);
            let n2: usize = lens.iter().map(|l| l.div_ceil(bt2)).sum();
            let mut kv2 = KvPool::typed(&c, bt2, n2, n2, ty).expect("pool");
            let mut tables2: Vec<Vec<u32>> = Vec::new();
            for s in &seqs {
                let first = tables2.iter().map(Vec::len).sum::<usize>() as u32;
                let table2: Vec<u32> = (first..first + s.len.div_ceil(bt2) as u32).collect();
                for p in 0..s.len {
                    let k: Vec<f32> = (0..kv_dim).map(|_| rng.gen_range(-scale..scale)).collect();
                    let v: Vec<f32> = (0..kv_dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                    let at = kv.offset(&s.table, p);
                    kv.write(0, at, &k, &v);
                    let at2 = kv2.offset(&table2, p);
                    kv2.write(0, at2, &k, &v);
                }
                tables2.push(table2);
            }
            let rows: Vec<Row<'_>> = seqs
                .iter()
                .flat_map(|s| (s.len - s.queries..s.len).map(|pos| Row { pos, table: &s.table }))
                .collect();
            let q: Vec<f32> = (0..rows.len() * n_heads * head_dim)
                .map(|_| rng.gen_range(-scale..scale))
                .collect();
            let h = Heads { n_heads, n_kv_heads, head_dim, scale: c.attention_scale, window };
            let want = naive(h, &kv, &rows, &q);
            let mut got = vec![f32::NAN; q.len()];
            attention(&ThreadPool::new(1), h, &kv, 0, &rows, &q, &mut got);
            // f32 rounding; with an f16 cache also a weight rounded to the other side of an
            // f16 boundary now and then (at most one f16 step of the largest weight, 2^-11;
            // a position too many or too few moves the output by a weight, ~1/700 or more).
            // A Q8_0 cache computes in f32 on the dequantised values (as `naive` reads them).
            let tol = if kv_f32 || kv_q8 { 2e-5 } else { 2e-5 + 2f64.powi(-11) };
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                prop_assert!((f64::from(g) - w).abs() <= tol, "element {}: {} vs {}", i, g, w);
            }
            // The same bits with another thread count (tasks split by segment or not), with
            // another block size, and with every row alone (no tiles).
            let mut other = vec![f32::NAN; q.len()];
            attention(&ThreadPool::new(5), h, &kv, 0, &rows, &q, &mut other);
            prop_assert!(got.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()));
            let rows2: Vec<Row<'_>> = rows
                .iter()
                .map(|row| {
                    let i = seqs.iter().position(|s| std::ptr::eq(s.table.as_slice(), row.table)).expect("seq");
                    Row { pos: row.pos, table: &tables2[i] }
                })
                .collect();
            let mut paged2 = vec![f32::NAN; q.len()];
            attention(&ThreadPool::new(2), h, &kv2, 0, &rows2, &q, &mut paged2);
            prop_assert!(got.iter().zip(&paged2).all(|(a, b)| a.to_bits() == b.to_bits()), "block size {} vs {}", block_tokens, bt2);
            let width = n_heads * head_dim;
            for (r, row) in rows.iter().enumerate() {
                let mut alone = vec![f32::NAN; width];
                let qr = &q[r * width..(r + 1) * width];
                attention(&ThreadPool::new(2), h, &kv, 0, std::slice::from_ref(row), qr, &mut alone);
                prop_assert!(alone.iter().zip(&got[r * width..]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {} alone", r);
            }
        }
    }
}
