//! The MLP sub-layer: one gated MLP (SwiGLU for Llama and Mistral, GeGLU for Gemma; the
//! gate's activation is the caller's [`Glu`]), or a sparse mixture of SwiGLU experts
//! (Mixtral): a router scores every expert for each token, the `k` best are kept, their
//! softmax weights renormalised to sum to 1 (transformers' `MixtralSparseMoeBlock`: softmax
//! over all experts, top-k, divide by the sum; the same as a softmax over the top-k logits),
//! and the token's output is the weighted sum of those experts' outputs.

use kernels::ThreadPool;

use crate::ModelError;
use crate::weights::{Storage, Weight};

/// The gated activation in place: `gate = act(gate) * up`.
pub(crate) type Glu<'a> = &'a dyn Fn(&mut [f32], &[f32]);

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
        /// Whether the chosen experts' weights are renormalised (see [`top_k`]).
        renormalize: bool,
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
        glu(gate, up);
        store.matmul(pool, &self.down, gate, n, out)?;
        Ok(())
    }
}

impl Ffn {
    /// Repacks the MLP matrices (every expert's) for the packed kernel where this CPU has one.
    pub(crate) fn pack(&mut self, store: &Storage) -> Result<(), ModelError> {
        let mlps = match self {
            Ffn::Dense(mlp) => std::slice::from_mut(mlp),
            Ffn::Experts { experts, .. } => experts.as_mut_slice(),
        };
        for mlp in mlps {
            for w in [&mut mlp.gate, &mut mlp.up, &mut mlp.down] {
                w.pack(store)?;
            }
        }
        Ok(())
    }

    /// `out = ffn(xn)` for `n` rows of width `d_model` (`ffn_dim` is the MLP's hidden width).
    /// Every row's result is the same whatever the other rows are: experts run over the rows
    /// routed to them, and each row's matrix products do not depend on its neighbours.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        pool: &ThreadPool,
        store: &Storage,
        xn: &[f32],
        n: usize,
        d_model: usize,
        ffn_dim: usize,
        out: &mut [f32],
        glu: Glu<'_>,
    ) -> Result<(), ModelError> {
        match self {
            Ffn::Dense(mlp) => {
                let mut gate = vec![0.0; n * ffn_dim];
                let mut up = vec![0.0; n * ffn_dim];
                mlp.forward(pool, store, xn, n, &mut gate, &mut up, out, glu)
            }
            Ffn::Experts {
                router,
                experts,
                n_used,
                renormalize,
            } => {
                let n_experts = experts.len();
                let mut scores = vec![0.0; n * n_experts];
                kernels::matmul(pool, &store.matrix(router)?, xn, n, &mut scores)?;
                // For each expert, the rows routed to it and their weights.
                let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
                for (r, s) in scores.chunks_exact(n_experts).enumerate() {
                    for (e, w) in top_k(s, *n_used, *renormalize) {
                        routed[e].push((r, w));
                    }
                }
                out.fill(0.0);
                for (mlp, rows) in experts.iter().zip(&routed) {
                    if rows.is_empty() {
                        continue;
                    }
                    let m = rows.len();
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

    #[test]
    fn top_k_breaks_ties_to_the_lower_index() {
        let chosen = top_k(&[1.0, 3.0, 3.0, 3.0], 2, true);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
        assert!((chosen[0].1 - 0.5).abs() < 1e-6);
    }
}
