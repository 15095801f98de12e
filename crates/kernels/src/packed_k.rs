//! The 5- and 6-bit formats and the K-quants (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) repacked sixteen
//! rows at a time for the packed matmul (`crate::packed`), the other half of
//! [`crate::PackedMatrix`]: GGUF's Q4_K_M files are mostly Q4_K with Q6_K (and Q5_0 where a
//! row is not a multiple of 256) for some tensors.
//!
//! Every one of these types has a value of the form `a·sc_s·q + b·mn_s` for an unsigned
//! integer level `q` (4, 5 or 6 bits), a float `a` (and `b`) per row and super-block, and
//! small integer scales `sc_s` and minimums `mn_s` per sub-block `s` of 16 or 32 elements:
//!
//! | type | super-block | sub-block | `a` | `sc_s` | offset `b·Σ_s mn_s·x_s` |
//! | --- | --- | --- | --- | --- | --- |
//! | Q4_K, Q5_K | 256 | 32 | `d` | 6-bit scale | `b = −dmin`, `mn_s` the 6-bit minimum |
//! | Q6_K | 256 | 16 | `d` | signed 8-bit scale | `b = d`, `mn_s = −32·sc_s` |
//! | Q5_0 | 32 | — | `d` | 1 | `b = d`, `mn = −16` |
//! | Q5_1 | 32 | — | `d` | 1 | `b = m`, `mn = 1` |
//!
//! so one kernel computes all of them against activations quantised per super-block (ggml's
//! Q8_K for the K-quants, Q8_0 for Q5_0/Q5_1: a scale `d_x`, signed bytes and the sums of
//! each sub-block's bytes `x_s`): per row and super-block the exact integer
//! `isum = Σ_s sc_s·Σ_{e∈s} q_e·x_e` and `imin = Σ_s mn_s·x_s`, then per lane
//! `acc = fma(a·d_x, isum, acc)` and `acc_m = fma(b·d_x, imin, acc_m)`, the result
//! `acc + acc_m`: ggml's `d·sumi − dmin·summs` per super-block, in another float order than
//! its row-wise dots (a rounding of the size of the terms). Where `b = a` (Q6_K, Q5_0) the
//! offset is added to the integer sum instead, `acc = fma(a·d_x, isum + imin, acc)`, as
//! ggml's dots for those types subtract it in integers.
//!
//! A cell holds one group of 16 rows × one super-block (`KLayout` gives the offsets):
//! - `a` as f16 for the 16 rows (32 bytes); then `b` likewise where it is stored;
//! - where the type has them, the sub-block scales as i8, `[sub-block][row]` (16 bytes per
//!   sub-block), then the minimums the same way;
//! - per 32 elements, four 64-byte nibble vectors laid out as the Q4 cells of
//!   `crate::packed` (vector `j`, lane `r`: row `r`'s elements `4j..4j+4` in the low nibbles,
//!   `4j+16..4j+20` in the high ones), then for 5 and 6 bits one 64-byte plane per extra
//!   bit: byte `k` of lane `r` has at bit `2j` the extra bit of element `4j+k` and at bit
//!   `2j+1` that of element `4j+16+k`, so that one shift and one mask per vector put it in
//!   place. A Q6_K sub-block of 16 is exactly the low (or the high) nibbles of a 32-element
//!   run.
//!
//! Bytes per weight stay those of the GGUF type within 3% (Q4_K 4.625 bits, Q6_K 6.625,
//! Q5_0 5.5), so decoding, which streams every weight once per token, reads no more.

use half::f16;

use crate::arch::portable::kquants::{k4_levels, q5_levels, q5k_levels, q6k_levels};
use crate::dispatch;
use crate::formats::{
    BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K, GROUP, QK, QK_K,
};
use crate::types::{Matrix, WeightType};

/// How a super-block's offset term is formed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offset {
    /// `Σ_s mn_s·x_s` with the minimums stored per row and sub-block (Q4_K, Q5_K).
    Mins,
    /// `k·Σ_s sc_s·x_s` (Q6_K: `k = −32`).
    Scales(i32),
    /// `k·Σ x` over the super-block (Q5_0: `−16`; Q5_1: `1`).
    Sum(i32),
}

/// The packed layout of one of these types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KLayout {
    /// Columns per super-block (one `a`, `b` and activation scale each): 256 or 32.
    pub(crate) sb: usize,
    /// Columns per sub-block with its own integer scale: 32 or 16 (`sb` when unscaled).
    pub(crate) sub: usize,
    /// Bits per level: 4, 5 or 6.
    pub(crate) bits: u32,
    /// Whether sub-block scales are stored (else every `sc_s` is 1).
    pub(crate) scaled: bool,
    /// Whether `b` is stored (else `b = a`).
    pub(crate) b_stored: bool,
    /// The offset term.
    pub(crate) offset: Offset,
}

impl KLayout {
    /// The layout of `ty`, if it is one of these types.
    pub(crate) fn of(ty: WeightType) -> Option<Self> {
        let k = |bits, sub, b_stored, offset| KLayout {
            sb: QK_K,
            sub,
            bits,
            scaled: true,
            b_stored,
            offset,
        };
        let five = |b_stored, offset| KLayout {
            sb: QK,
            sub: QK,
            bits: 5,
            scaled: false,
            b_stored,
            offset,
        };
        Some(match ty {
            WeightType::Q4_K => k(4, 32, true, Offset::Mins),
            WeightType::Q5_K => k(5, 32, true, Offset::Mins),
            WeightType::Q6_K => k(6, 16, false, Offset::Scales(-32)),
            WeightType::Q5_0 => five(false, Offset::Sum(-16)),
            WeightType::Q5_1 => five(true, Offset::Sum(1)),
            _ => return None,
        })
    }

    /// Sub-blocks per super-block.
    pub(crate) fn n_sub(&self) -> usize {
        self.sb / self.sub
    }

    /// Offset of the `b` values in a cell.
    pub(crate) fn b_at(&self) -> usize {
        2 * GROUP
    }

    /// Offset of the sub-block scales.
    pub(crate) fn sc_at(&self) -> usize {
        self.b_at() + if self.b_stored { 2 * GROUP } else { 0 }
    }

    /// Offset of the minimums.
    pub(crate) fn mn_at(&self) -> usize {
        self.sc_at() + if self.scaled { GROUP * self.n_sub() } else { 0 }
    }

    /// Offset of the first 32-element run's nibble vectors.
    pub(crate) fn runs_at(&self) -> usize {
        self.mn_at()
            + if self.offset == Offset::Mins {
                GROUP * self.n_sub()
            } else {
                0
            }
    }

    /// Bytes per 32-element run: four nibble vectors and a plane per extra bit.
    pub(crate) fn run_bytes(&self) -> usize {
        64 * self.bits as usize
    }

    /// Bytes per cell (16 rows × one super-block).
    pub(crate) fn cell_bytes(&self) -> usize {
        self.runs_at() + self.sb / QK * self.run_bytes()
    }

    /// The level of element `e` of row `lane` in `cell` (the scalar twin reads it so).
    pub(crate) fn level(&self, cell: &[u8], lane: usize, e: usize) -> i32 {
        let (run, i) = (e / QK, e % QK);
        let high = i >= 16;
        let (j, k) = ((i % 16) / 4, i % 4);
        let at = self.runs_at() + run * self.run_bytes();
        let byte = cell[at + 64 * j + 4 * lane + k];
        let mut q = i32::from(if high { byte >> 4 } else { byte & 0x0F });
        let bit = 2 * j + usize::from(high);
        for extra in 0..self.bits as usize - 4 {
            let plane = cell[at + 256 + 64 * extra + 4 * lane + k];
            q |= i32::from((plane >> bit) & 1) << (4 + extra);
        }
        q
    }

    /// `(a, b)` of row `lane` in `cell`.
    pub(crate) fn ab(&self, cell: &[u8], lane: usize) -> (f32, f32) {
        let f = |at: usize| f16::from_le_bytes([cell[at + 2 * lane], cell[at + 2 * lane + 1]]);
        let a = f(0).to_f32();
        (
            a,
            if self.b_stored {
                f(self.b_at()).to_f32()
            } else {
                a
            },
        )
    }

    /// The scale of sub-block `s` of row `lane` (1 when unscaled).
    pub(crate) fn scale(&self, cell: &[u8], lane: usize, s: usize) -> i32 {
        if self.scaled {
            i32::from(cell[self.sc_at() + GROUP * s + lane] as i8)
        } else {
            1
        }
    }

    /// The stored minimum of sub-block `s` of row `lane` ([`Offset::Mins`] only).
    pub(crate) fn min(&self, cell: &[u8], lane: usize, s: usize) -> i32 {
        i32::from(cell[self.mn_at() + GROUP * s + lane] as i8)
    }
}

/// One row's super-block, unpacked: `a`, `b` (as f16 bytes), per-sub-block scales and
/// minimums, and the unsigned levels.
struct Unpacked {
    a: [u8; 2],
    b: [u8; 2],
    sc: [i8; 16],
    mn: [i8; 16],
    q: [u8; QK_K],
}

/// Unpacks super-block `blk` (the GGUF bytes of one block of `ty`).
fn unpack(ty: WeightType, blk: &[u8]) -> Option<Unpacked> {
    let mut u = Unpacked {
        a: [0; 2],
        b: [0; 2],
        sc: [0; 16],
        mn: [0; 16],
        q: [0; QK_K],
    };
    match ty {
        WeightType::Q4_K | WeightType::Q5_K => {
            let (d, dmin, sm, q) = if ty == WeightType::Q4_K {
                let b = BlockQ4K::from_bytes(blk.try_into().ok()?);
                (b.d, b.dmin, b.unpacked_scales(), k4_levels(&b.qs))
            } else {
                let b = BlockQ5K::from_bytes(blk.try_into().ok()?);
                (b.d, b.dmin, b.unpacked_scales(), q5k_levels(&b))
            };
            u.a = d.to_le_bytes();
            u.b = (-dmin).to_le_bytes();
            for (s, (sc, mn)) in sm.into_iter().enumerate() {
                // 6-bit values: non-negative as i8.
                (u.sc[s], u.mn[s]) = (sc as i8, mn as i8);
            }
            u.q = q;
        }
        WeightType::Q6_K => {
            let b = BlockQ6K::from_bytes(blk.try_into().ok()?);
            u.a = b.d.to_le_bytes();
            u.sc = b.scales;
            for (o, l) in u.q.iter_mut().zip(q6k_levels(&b)) {
                *o = (l + 32) as u8;
            }
        }
        WeightType::Q5_0 => {
            let b = BlockQ5_0::from_bytes(blk.try_into().ok()?);
            u.a = b.d.to_le_bytes();
            u.q[..QK].copy_from_slice(&q5_levels(b.qh, &b.qs));
        }
        WeightType::Q5_1 => {
            let b = BlockQ5_1::from_bytes(blk.try_into().ok()?);
            u.a = b.d.to_le_bytes();
            u.b = b.m.to_le_bytes();
            u.q[..QK].copy_from_slice(&q5_levels(b.qh, &b.qs));
        }
        _ => return None,
    }
    Some(u)
}

/// Whether this CPU runs a SIMD kernel for these layouts.
pub(crate) fn fast_available() -> bool {
    dispatch::active().kpacked.is_some()
}

/// Repacks `w` (of a type with a [`KLayout`]) into `data`, `groups × super-blocks` cells;
/// `None` for another type or a shape the layout cannot hold.
pub(crate) fn pack(w: &Matrix<'_>, data: &mut [u8]) -> Option<()> {
    let l = KLayout::of(w.ty())?;
    let (rows, cols) = (w.rows(), w.cols());
    if !cols.is_multiple_of(l.sb) {
        return None;
    }
    let nsb = cols / l.sb;
    let block = w.ty().block_bytes();
    let cb = l.cell_bytes();
    if data.len() != rows.div_ceil(GROUP).checked_mul(nsb)?.checked_mul(cb)? {
        return None;
    }
    for r in 0..rows {
        let (g, lane) = (r / GROUP, r % GROUP);
        let src = w.row(r);
        for s in 0..nsb {
            let u = unpack(w.ty(), src.get(s * block..(s + 1) * block)?)?;
            let cell = &mut data[(g * nsb + s) * cb..][..cb];
            cell[2 * lane..2 * lane + 2].copy_from_slice(&u.a);
            if l.b_stored {
                cell[l.b_at() + 2 * lane..l.b_at() + 2 * lane + 2].copy_from_slice(&u.b);
            }
            for sub in 0..l.n_sub() {
                if l.scaled {
                    cell[l.sc_at() + GROUP * sub + lane] = u.sc[sub] as u8;
                }
                if l.offset == Offset::Mins {
                    cell[l.mn_at() + GROUP * sub + lane] = u.mn[sub] as u8;
                }
            }
            for run in 0..l.sb / QK {
                let at = l.runs_at() + run * l.run_bytes();
                let q = &u.q[run * QK..(run + 1) * QK];
                for j in 0..4 {
                    for k in 0..4 {
                        let (lo, hi) = (q[4 * j + k], q[4 * j + 16 + k]);
                        cell[at + 64 * j + 4 * lane + k] = (lo & 0x0F) | (hi << 4);
                        for extra in 0..l.bits as usize - 4 {
                            let bit = |v: u8| (v >> (4 + extra)) & 1;
                            cell[at + 256 + 64 * extra + 4 * lane + k] |=
                                (bit(lo) << (2 * j)) | (bit(hi) << (2 * j + 1));
                        }
                    }
                }
            }
        }
    }
    Some(())
}

/// Activations quantised per super-block of `sb` columns for these layouts: per token the
/// signed bytes, per (token, super-block) the scale `d`, and per (token, super-block) the
/// byte sums of every 16 (`sums16`) and every 32 (`sums32`) elements.
pub(crate) struct KActivations {
    pub(crate) sb: usize,
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) sums16: Vec<i16>,
    pub(crate) sums32: Vec<i16>,
}

impl KActivations {
    /// Quantises `x` (rows of `cols`, a multiple of `sb`) as ggml does for these types:
    /// Q8_K (`sb` = 256) or Q8_0 (`sb` = 32).
    pub(crate) fn quantize(x: &[f32], cols: usize, sb: usize) -> Self {
        let n = x.len();
        let mut a = KActivations {
            sb,
            qs: vec![0; n],
            d: Vec::with_capacity(n / sb),
            sums16: Vec::with_capacity(n / 16),
            sums32: Vec::with_capacity(n / 32),
        };
        debug_assert!(cols.is_multiple_of(sb) && n.is_multiple_of(cols));
        let k = dispatch::active();
        let mut b8 = [0u8; BlockQ8_0::BYTES];
        let mut bk = [0u8; BlockQ8K::BYTES];
        for (xb, q) in x.chunks_exact(sb).zip(a.qs.chunks_exact_mut(sb)) {
            if sb == QK_K {
                (k.quantize_q8_k)(xb, &mut bk);
                let b = BlockQ8K::from_bytes(&bk);
                q.copy_from_slice(&b.qs);
                a.d.push(b.d);
            } else {
                (k.quantize_q8_0)(xb, &mut b8);
                for (o, &v) in q.iter_mut().zip(&b8[2..]) {
                    *o = v as i8;
                }
                a.d.push(f16::from_le_bytes([b8[0], b8[1]]).to_f32());
            }
            // |q| ≤ 127: a sum of 32 fits in i16.
            let sum = |c: &[i8]| c.iter().map(|&v| i16::from(v)).sum::<i16>();
            a.sums16.extend(q.chunks_exact(16).map(sum));
            a.sums32.extend(q.chunks_exact(32).map(sum));
        }
        a
    }

    /// The sub-block sums a layout reads.
    pub(crate) fn sums(&self, l: &KLayout) -> &[i16] {
        if l.sub == 16 {
            &self.sums16
        } else {
            &self.sums32
        }
    }
}

/// The scalar twin of the K-layout packed kernel (`crate::table::KPackedFn`): group `cells`
/// (`nsb` cells) against `nt` ≤ 8 tokens (`qs`: `nt·nsb·sb` bytes; `d`: `nt·nsb` scales;
/// `sums`: `nt·nsb·n_sub` sub-block sums) into `vals[t][lane]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kpacked_group(
    l: &KLayout,
    cells: &[u8],
    qs: &[i8],
    d: &[f32],
    sums: &[i16],
    nsb: usize,
    nt: usize,
    vals: &mut [[f32; GROUP]; 8],
) {
    let (cb, ns) = (l.cell_bytes(), l.n_sub());
    for t in 0..nt.min(8) {
        let mut acc = [0f32; GROUP];
        let mut acc_m = [0f32; GROUP];
        for s in 0..nsb {
            let cell = &cells[s * cb..(s + 1) * cb];
            let x = &qs[(t * nsb + s) * l.sb..][..l.sb];
            let dx = d[t * nsb + s];
            let xs = &sums[(t * nsb + s) * ns..][..ns];
            for (lane, (a_acc, m_acc)) in acc.iter_mut().zip(acc_m.iter_mut()).enumerate() {
                let mut isum = 0i32;
                for sub in 0..ns {
                    let part: i32 = (sub * l.sub..(sub + 1) * l.sub)
                        .map(|e| l.level(cell, lane, e) * i32::from(x[e]))
                        .sum();
                    isum += l.scale(cell, lane, sub) * part;
                }
                let imin: i32 = match l.offset {
                    Offset::Mins => (0..ns)
                        .map(|s| l.min(cell, lane, s) * i32::from(xs[s]))
                        .sum(),
                    Offset::Scales(k) => {
                        k * (0..ns)
                            .map(|s| l.scale(cell, lane, s) * i32::from(xs[s]))
                            .sum::<i32>()
                    }
                    Offset::Sum(k) => k * xs.iter().map(|&v| i32::from(v)).sum::<i32>(),
                };
                let (a, b) = l.ab(cell, lane);
                if l.b_stored {
                    *a_acc = (a * dx).mul_add(isum as f32, *a_acc);
                    *m_acc = (b * dx).mul_add(imin as f32, *m_acc);
                } else {
                    // `b = a`: the offset joins the integer sum (exact: |isum| < 2²⁹).
                    *a_acc = (a * dx).mul_add((isum + imin) as f32, *a_acc);
                }
            }
        }
        for (v, (a, m)) in vals[t].iter_mut().zip(acc.iter().zip(&acc_m)) {
            *v = a + m;
        }
    }
}
