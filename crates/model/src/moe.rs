//! The MLP sub-layer: one gated MLP (SwiGLU for Llama and Mistral, GeGLU for Gemma; the
//! gate's activation is the caller's [`Glu`]), or a sparse mixture of SwiGLU experts
//! (Mixtral): a router scores every expert for each token, the `k` best are kept, their
//! softmax weights renormalised to sum to 1 (transformers' `MixtralSparseMoeBlock`: softmax
//! over all experts, top-k, divide by the sum; the same as a softmax over the top-k logits),
//! and the token's output is the weighted sum of those experts' outputs. DeepSeek's design
//! ([`crate::ExpertDesign`], `route`) scores by softmax or sigmoid, chooses with a
//! per-expert bias within the best groups, and adds shared experts every token runs.

use kernels::ThreadPool;

use crate::weights::{Storage, Weight};
use crate::{ExpertDesign, Gating, ModelError};

/// The gated activation in place: `gate = act(gate) * up`, rows of the given width.
pub(crate) type Glu<'a> = &'a dyn Fn(&mut [f32], &[f32], usize);

/// How a mixture chooses and weighs its experts.
#[derive(Debug)]
pub(crate) enum Routing {
    /// Mixtral's and Qwen3-MoE's softmax top-k (see [`top_k`]).
    Softmax { renormalize: bool },
    /// DeepSeek's (see [`route`]), with the layer's selection bias where it has one.
    DeepSeek {
        design: ExpertDesign,
        renormalize: bool,
        bias: Option<Vec<f32>>,
    },
}

/// One gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct Mlp {
    pub(crate) gate: Weight, // ffn_dim × d_model
    pub(crate) up: Weight,   // ffn_dim × d_model
    pub(crate) down: Weight, // d_model × ffn_dim
}

/// The MLP of one block.
#[derive(Debug)]
pub(crate) enum Ffn {
    Dense(Mlp),
    Experts {
        router: Weight, // n_experts × d_model
        experts: Vec<Mlp>,
        n_used: usize,
        routing: Routing,
        /// Experts every token runs, as one MLP (DeepSeek's shared experts).
        shared: Option<Mlp>,
    },
}

impl Mlp {
    /// `out = mlp(x)` for `n` rows; `gate`/`up` are `n × ffn_dim` scratch.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        pool: &ThreadPool,
        store: &Storage,
        x: &[f32],
        n: usize,
        gate: &mut [f32],
        up: &mut [f32],
        out: &mut [f32],
        glu: Glu<'_>,
    ) -> Result<(), ModelError> {
        store.matmul_many(
            pool,
            &mut [(&self.gate, &mut *gate), (&self.up, &mut *up)],
            x,
            n,
        )?;
        glu(gate, up, self.gate.rows);
        store.matmul(pool, &self.down, gate, n, out)?;
        Ok(())
    }
}

impl Ffn {
    /// Repacks the MLP matrices (every expert's) for the packed kernel where this CPU has one.
    pub(crate) fn pack(&mut self, store: &Storage) -> Result<(), ModelError> {
        let mlps: Vec<&mut Mlp> = match self {
            Ffn::Dense(mlp) => vec![mlp],
            Ffn::Experts {
                experts, shared, ..
            } => experts.iter_mut().chain(shared.as_mut()).collect(),
        };
        for mlp in mlps {
            for w in [&mut mlp.gate, &mut mlp.up, &mut mlp.down] {
                w.pack(store)?;
            }
        }
        Ok(())
    }

    /// `out = ffn(xn)` for `n` rows of width `d_model` (each MLP's hidden width is its
    /// matrices' own). Every row's result is the same whatever the other rows are: experts run over the rows
    /// routed to them, and each row's matrix products do not depend on its neighbours.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        pool: &ThreadPool,
        store: &Storage,
        xn: &[f32],
        n: usize,
        d_model: usize,
        out: &mut [f32],
        glu: Glu<'_>,
    ) -> Result<(), ModelError> {
        match self {
            Ffn::Dense(mlp) => {
                let ffn_dim = mlp.gate.rows;
                let mut gate = vec![0.0; n * ffn_dim];
                let mut up = vec![0.0; n * ffn_dim];
                mlp.forward(pool, store, xn, n, &mut gate, &mut up, out, glu)
            }
            Ffn::Experts {
                router,
                experts,
                n_used,
                routing,
                shared,
            } => {
                let n_experts = experts.len();
                let mut scores = vec![0.0; n * n_experts];
                kernels::matmul(pool, &store.matrix(router)?, xn, n, &mut scores)?;
                // For each expert, the rows routed to it and their weights.
                let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
                for (r, s) in scores.chunks_exact(n_experts).enumerate() {
                    let chosen = match routing {
                        Routing::Softmax { renormalize } => top_k(s, *n_used, *renormalize),
                        Routing::DeepSeek {
                            design,
                            renormalize,
                            bias,
                        } => route(s, *n_used, design, *renormalize, bias.as_deref()),
                    };
                    for (e, w) in chosen {
                        routed[e].push((r, w));
                    }
                }
                match shared {
                    Some(mlp) => {
                        let ffn_dim = mlp.gate.rows;
                        let mut gate = vec![0.0; n * ffn_dim];
                        let mut up = vec![0.0; n * ffn_dim];
                        mlp.forward(pool, store, xn, n, &mut gate, &mut up, out, glu)?;
                    }
                    None => out.fill(0.0),
                }
                for (mlp, rows) in experts.iter().zip(&routed) {
                    if rows.is_empty() {
                        continue;
                    }
                    let (m, ffn_dim) = (rows.len(), mlp.gate.rows);
                    let mut x = Vec::with_capacity(m * d_model);
                    for &(r, _) in rows {
                        x.extend_from_slice(&xn[r * d_model..(r + 1) * d_model]);
                    }
                    let mut gate = vec![0.0; m * ffn_dim];
                    let mut up = vec![0.0; m * ffn_dim];
                    let mut y = vec![0.0; m * d_model];
                    mlp.forward(pool, store, &x, m, &mut gate, &mut up, &mut y, glu)?;
                    for (&(r, w), y) in rows.iter().zip(y.chunks_exact(d_model)) {
                        for (o, &v) in out[r * d_model..(r + 1) * d_model].iter_mut().zip(y) {
                            *o += w * v;
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// DeepSeek's choice of `k` experts for one token from its router logits (llama.cpp's
/// `build_moe_ffn`, transformers' `DeepseekV3TopkRouter`): scores by softmax or sigmoid;
/// choice by score plus `bias` (when given), only among the `groups_used` groups whose two
/// best biased scores sum highest (ties to the lower index); each chosen expert weighted by
/// its unbiased score, divided by their sum when `renormalize`, times `weights_scale`.
pub(crate) fn route(
    logits: &[f32],
    k: usize,
    design: &ExpertDesign,
    renormalize: bool,
    bias: Option<&[f32]>,
) -> Vec<(usize, f32)> {
    let mut scores = logits.to_vec();
    match design.gating {
        Gating::Softmax => kernels::softmax(&mut scores),
        Gating::Sigmoid => scores
            .iter_mut()
            .for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
    }
    let mut choice = scores.clone();
    if let Some(bias) = bias {
        choice.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
    }
    let n = choice.len();
    if design.n_groups > 1 && design.groups_used < design.n_groups {
        let per = n / design.n_groups;
        let group_score = |g: usize| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in &choice[g * per..(g + 1) * per] {
                if v > a {
                    (a, b) = (v, a);
                } else if v > b {
                    b = v;
                }
            }
            a + b
        };
        let sums: Vec<f32> = (0..design.n_groups).map(group_score).collect();
        let mut groups: Vec<usize> = (0..design.n_groups).collect();
        groups.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
        for &g in &groups[design.groups_used..] {
            choice[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    order.truncate(k);
    let mut w: Vec<f32> = order.iter().map(|&e| scores[e]).collect();
    if renormalize {
        // llama.cpp clamps the sum (6.1035e-5, the smallest normal f16) against zero.
        let sum: f32 = w.iter().sum::<f32>().max(6.103_515_6e-5);
        w.iter_mut().for_each(|x| *x /= sum);
    }
    w.iter_mut().for_each(|x| *x *= design.weights_scale);
    order.into_iter().zip(w).collect()
}

/// The `k` highest-scoring experts of one token (ties to the lower index) with their routing
/// weights: renormalised, the softmax over the chosen logits, which equals transformers'
/// softmax over all experts renormalised over the chosen ones; otherwise each chosen
/// expert's share of the softmax over all of them.
pub(crate) fn top_k(logits: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if renormalize {
        order.truncate(k);
        let mut w: Vec<f32> = order.iter().map(|&e| logits[e]).collect();
        kernels::softmax(&mut w);
        return order.into_iter().zip(w).collect();
    }
    let mut all: Vec<f32> = order.iter().map(|&e| logits[e]).collect();
    kernels::softmax(&mut all);
    order.into_iter().zip(all).take(k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_best_and_renormalises() {
        let chosen = top_k(&[0.1, 2.0, -1.0, 1.0], 2, true);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
        // softmax over all four, keep two, renormalise: e^2 / (e^2 + e^1).
        let expected = 2f32.exp() / (2f32.exp() + 1f32.exp());
        assert!((chosen[0].1 - expected).abs() < 1e-6);
        assert!((chosen[0].1 + chosen[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_without_renormalising_keeps_the_full_softmax_share() {
        let logits = [0.1, 2.0, -1.0, 1.0];
        let chosen = top_k(&logits, 2, false);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((chosen[0].1 - 2f32.exp() / total).abs() < 1e-6);
        assert!((chosen[1].1 - 1f32.exp() / total).abs() < 1e-6);
    }

    fn design(gating: Gating, n_groups: usize, groups_used: usize) -> ExpertDesign {
        ExpertDesign {
            gating,
            n_groups,
            groups_used,
            weights_scale: 2.5,
            n_shared: 1,
            leading_dense: 0,
            expert_ffn_dim: 8,
        }
    }

    #[test]
    fn route_keeps_the_best_groups_and_weighs_by_unbiased_scores() {
        // Groups {0,1}, {2,3}, {4,5}: sums of sigmoid scores (plus bias) pick groups 1 and 2.
        let logits = [3.0, -3.0, 1.0, 1.0, 0.5, 2.0];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let d = design(Gating::Sigmoid, 3, 2);
        let chosen = route(&logits, 2, &d, true, Some(&bias));
        // Expert 0 has the best single score but its group (3 + -3) loses.
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [5, 2]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sum = sig(2.0) + sig(1.0);
        assert!((chosen[0].1 - 2.5 * sig(2.0) / sum).abs() < 1e-6);
        // A bias moves the choice but not the weight.
        let bias = [0.0, 0.0, 0.0, 0.9, 0.0, 0.0];
        let chosen = route(&logits, 2, &d, false, Some(&bias));
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [3, 5]);
        assert!((chosen[0].1 - 2.5 * sig(1.0)).abs() < 1e-6);
    }

    #[test]
    fn route_with_softmax_and_one_group_is_plain_top_k() {
        let logits = [0.1, 2.0, -1.0, 1.0];
        let d = ExpertDesign {
            weights_scale: 1.0,
            ..design(Gating::Softmax, 1, 1)
        };
        let ours = route(&logits, 2, &d, true, None);
        let theirs = top_k(&logits, 2, true);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1).abs() < 1e-6);
        }
    }

    #[test]
    fn top_k_breaks_ties_to_the_lower_index() {
        let chosen = top_k(&[1.0, 3.0, 3.0, 3.0], 2, true);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
        assert!((chosen[0].1 - 0.5).abs() < 1e-6);
    }
}
