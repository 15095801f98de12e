//! The 5- and 6-bit formats and the K-quants (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) repacked sixteen
//! rows at a time for the packed matmul, the other half of a `PackedMatrix`: GGUF's Q4_K_M files are mostly Q4_K with Q6_K (and Q5_0 where a
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
//! A cell holds one group of 16 rows × one super-block (`crate::formats::KLayout` gives the
//! offsets; the scalar twin of the kernel is `crate::arch::portable::kpacked`):
//! - `a` as f16 for the 16 rows (32 bytes); then `b` likewise where it is stored;
//! - where the type has them, the sub-block scales as i8, `[sub-block][row]` (16 bytes per
//!   sub-block), then the minimums the same way;
//! - per 32 elements, four 64-byte nibble vectors laid out as the packed Q4 cells (vector `j`, lane `r`: row `r`'s elements `4j..4j+4` in the low nibbles,
//!   `4j+16..4j+20` in the high ones), then the levels' high bits: one 64-byte plane for
//!   5 bits, two for 6. For 5 bits: byte `k` of lane `r` has at bit `2j` the fifth bit of element
//!   `4j+k` and at bit `2j+1` that of element `4j+16+k`. For 6 bits two: the first has at
//!   bits `2j..2j+2` the two high bits of element `4j+k`, the second those of element
//!   `4j+16+k`. Either way one shift and one mask per vector (and plane) put them in place.
//!   A Q6_K sub-block of 16 is exactly the low (or the high) nibbles of a 32-element run.
//!
//! Bytes per weight stay those of the GGUF type within 3% (Q4_K 4.625 bits, Q6_K 6.625,
//! Q5_0 5.5), so decoding, which streams every weight once per token, reads no more.

use half::f16;

use crate::arch::portable::kquants::{k4_levels, q5_levels, q5k_levels, q6k_levels};
use crate::dispatch;
use crate::formats::{BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K};
use crate::formats::{GROUP, KLayout, Offset, QK, QK_K};
use crate::types::{Matrix, WeightType};

/// The K layout of `ty`, if it is one of these types.
pub(crate) fn layout_of(ty: WeightType) -> Option<KLayout> {
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
    let l = layout_of(w.ty())?;
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
                        let plane = at + 256 + 4 * lane + k;
                        if l.bits == 5 {
                            let bit = |v: u8| (v >> 4) & 1;
                            cell[plane] |= (bit(lo) << (2 * j)) | (bit(hi) << (2 * j + 1));
                        } else if l.bits == 6 {
                            cell[plane] |= ((lo >> 4) & 3) << (2 * j);
                            cell[plane + 64] |= ((hi >> 4) & 3) << (2 * j);
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
