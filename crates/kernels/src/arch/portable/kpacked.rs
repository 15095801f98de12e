//! The scalar twin of the K-layout packed kernel (the layout: `crate::formats::KLayout`;
//! the packing: `crate::packed_k`).

use crate::formats::{GROUP, KLayout, Offset};

/// The scalar twin of the K-layout packed kernel (the tables' `kpacked` entry): group `cells`
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
