//! Choosing the next token from logits: penalties, then truncation (top-k, top-p, min-p),
//! then temperature and a draw, in llama.cpp's order. Pure functions over a candidate list,
//! plus a seeded random stream per request.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

use crate::SamplingParams;

/// How many recent tokens the repetition penalty looks at (llama.cpp's `penalty_last_n`).
pub(crate) const PENALTY_LAST_N: usize = 64;

/// One request's sampler: its settings and its random stream.
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub(crate) fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Self { params, rng }
    }

    /// Picks the next token. `history` is every token so far (prompt and generated) and
    /// `generated` the count at its end that the model produced.
    pub(crate) fn sample(&mut self, logits: &mut [f32], history: &[u32], generated: usize) -> u32 {
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        apply_penalties(&self.params, logits, history, generated);
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let Some(max) = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .max_by(f32::total_cmp)
        else {
            return argmax(logits);
        };
        let finite = || {
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l))
        };
        let weight = |l: f32| ((l - max) * inv_t).exp();
        let (top_k, top_p, min_p) = (self.params.top_k, self.params.top_p, self.params.min_p);
        if top_k > 0 {
            // The k best, found without sorting the vocabulary, then sorted.
            let mut cands: Vec<(u32, f32)> = finite().collect();
            if top_k < cands.len() {
                cands.select_nth_unstable_by(top_k - 1, |a, b| b.1.total_cmp(&a.1));
                cands.truncate(top_k);
            }
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let weighted: Vec<(u32, f32)> = cands.iter().map(|&(id, l)| (id, weight(l))).collect();
            let mass = weighted.iter().map(|c| c.1).sum();
            return self.pick_sorted(&weighted, mass);
        }
        // Every candidate's weight relative to the best (1 for it), once; banned tokens 0.
        let weights: Vec<f32> = logits
            .iter()
            .map(|&l| if l.is_finite() { weight(l) } else { 0.0 })
            .collect();
        let mass: f32 = weights.iter().sum();
        if top_p >= 1.0 && min_p <= 0.0 {
            // Nothing is cut: a draw over the whole distribution, in vocabulary order.
            let mut r = self.rng.r#gen::<f32>() * mass;
            let mut last = None;
            for (id, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    r -= w;
                    last = Some(id as u32);
                    if r <= 0.0 {
                        return id as u32;
                    }
                }
            }
            return last.unwrap_or_else(|| argmax(logits));
        }
        // Only the candidates the cut can keep are sorted: those above min-p's floor, and for
        // top-p a floor low enough that what lies above it holds top-p of the mass (every
        // weight above a floor comes before every weight below it in the sorted order).
        const FLOORS: [f32; 6] = [1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 0.0];
        let mut floor = min_p.max(0.0);
        if top_p < 1.0 {
            // The mass at or above each floor, in one pass.
            let mut above = [0.0f32; FLOORS.len()];
            for &w in &weights {
                if let Some(j) = FLOORS.iter().position(|&f| w >= f) {
                    above[j] += w;
                }
            }
            let target = top_p * mass;
            let mut cum = 0.0;
            for (j, &f) in FLOORS.iter().enumerate() {
                cum += above[j];
                if cum >= target || f == 0.0 {
                    floor = floor.max(f);
                    break;
                }
            }
        }
        let mut cands: Vec<(u32, f32)> = finite()
            .filter(|&(i, _)| weights[i as usize] >= floor)
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let weighted: Vec<(u32, f32)> = cands
            .iter()
            .map(|&(id, _)| (id, weights[id as usize]))
            .collect();
        self.pick_sorted(&weighted, mass)
    }

    /// The draw over candidates (id, weight) sorted best first, after top-p (against `mass`,
    /// the weight of every candidate, sorted or not) and min-p (against the best's weight)
    /// cut them.
    fn pick_sorted(&mut self, cands: &[(u32, f32)], mass: f32) -> u32 {
        let mut keep = cands.len();
        if self.params.top_p < 1.0 {
            let target = self.params.top_p * mass;
            let mut cum = 0.0;
            for (i, &(_, w)) in cands.iter().enumerate() {
                cum += w;
                if cum >= target {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            let floor = cands[0].1 * self.params.min_p;
            keep = keep.min(cands.iter().take_while(|c| c.1 >= floor).count().max(1));
        }
        let kept = &cands[..keep];
        let total: f32 = kept.iter().map(|c| c.1).sum();
        let mut r = self.rng.r#gen::<f32>() * total;
        for &(id, w) in kept {
            r -= w;
            if r <= 0.0 {
                return id;
            }
        }
        cands[keep - 1].0
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp's greedy sampler does;
/// NaNs are never picked; 0 when no logit is a number).
///
/// Two passes a compiler vectorises, instead of one whose compare depends on the last
/// winner: the maximum over [`ARGMAX_LANES`] lanes, then the first block of lanes holding
/// it. Greedy decoding runs this over the whole vocabulary for every token of every
/// sequence (49,152 logits for SmolLM2, 262,144 for Gemma 3).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let max_of = |m: f32, l: f32| if l > m { l } else { m };
    let mut lanes = [f32::NEG_INFINITY; ARGMAX_LANES];
    let blocks = logits.chunks_exact(ARGMAX_LANES);
    let mut max = blocks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| max_of(m, l));
    for b in blocks {
        for (m, &l) in lanes.iter_mut().zip(b) {
            *m = max_of(*m, l);
        }
    }
    max = lanes.into_iter().fold(max, max_of);
    // The first block holding the maximum (a branch-free test per block), then its place.
    let first_block = logits
        .chunks(ARGMAX_LANES)
        .position(|b| b.iter().fold(false, |hit, &l| hit | (l == max)))
        .unwrap_or(0);
    let start = first_block * ARGMAX_LANES;
    logits[start..]
        .iter()
        .position(|&l| l == max)
        .map_or(0, |i| (start + i) as u32)
}

/// Lanes of [`argmax`]'s passes: two AVX-512 or four AVX2 vectors of f32.
const ARGMAX_LANES: usize = 32;

/// Repetition penalty over the last [`PENALTY_LAST_N`] tokens (llama.cpp's rule: divide a
/// positive logit, multiply a negative one); OpenAI's frequency and presence penalties over
/// the generated tokens.
fn apply_penalties(p: &SamplingParams, logits: &mut [f32], history: &[u32], generated: usize) {
    if p.repetition_penalty != 1.0 {
        let recent = &history[history.len().saturating_sub(PENALTY_LAST_N)..];
        let mut seen: Vec<u32> = recent.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in &history[history.len() - generated.min(history.len())..] {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }
}

/// Natural-log probabilities of `token` and of the `k` most likely tokens under `logits`
/// (a numerically stable log-softmax; ties keep the lower id first).
pub(crate) fn logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - log_z)
    };
    let mut top: Vec<u32> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < k || l > logits[top[top.len() - 1] as usize] {
                let at = top.partition_point(|&t| logits[t as usize] >= l);
                top.insert(at, i as u32);
                top.truncate(k);
            }
        }
    }
    (lp(token), top.into_iter().map(|t| (t, lp(t))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// The one-pass reference: the first index holding the largest number.
    fn argmax_reference(logits: &[f32]) -> u32 {
        let mut best: Option<usize> = None;
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_nan() && best.is_none_or(|b| l > logits[b]) {
                best = Some(i);
            }
        }
        best.unwrap_or(0) as u32
    }

    #[test]
    fn argmax_is_the_first_largest_logit() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in 0..4000 {
            let n = rng.gen_range(1..300);
            // Few distinct values, so that ties are common; some infinities and NaNs.
            let mut v: Vec<f32> = (0..n)
                .map(|_| match rng.gen_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    1 if case % 3 == 0 => f32::NAN,
                    2 if case % 5 == 0 => f32::INFINITY,
                    _ => rng.gen_range(-4..4) as f32 * 0.5,
                })
                .collect();
            assert_eq!(argmax(&v), argmax_reference(&v), "{v:?}");
            // The same with the maximum moved to the very end and to the start.
            let top = f32::INFINITY;
            v[n - 1] = top;
            assert_eq!(argmax(&v), argmax_reference(&v), "{v:?}");
            v[0] = top;
            assert_eq!(argmax(&v), 0);
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN, -1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp - (2f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = logits.iter().map(|&l| (l - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }

    #[test]
    fn logit_bias_can_force_and_ban() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(0, 100.0), (2, -100.0)],
            ..params()
        });
        assert_eq!(s.sample(&mut [0.0, 5.0, 9.0], &[], 0), 0);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        let mut logits = vec![0.0, 3.0, 1.0, 3.0];
        assert_eq!(s.sample(&mut logits, &[], 0), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params()
            });
            (0..50)
                .map(|_| s.sample(&mut [0.5, 0.4, 0.3, 0.2, 0.1], &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.1, 0.2, 5.0, 0.3], &[], 0), 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ~0.88, 0.12, ~0: top_p 0.5 keeps only the first.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [2.0, 0.0, -20.0], &[], 0), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [2.0, 0.0, -20.0], &[], 0), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params());
        let mut hits = [0usize; 2];
        for _ in 0..4000 {
            hits[s.sample(&mut [0.0, 2f32.ln()], &[], 0) as usize] += 1;
        }
        // Expect 1/3 and 2/3; 4000 draws give a standard deviation of about 30.
        assert!((1200..1470).contains(&hits[0]), "{hits:?}");
    }

    /// The distribution llama.cpp's chain (and this sampler before it stopped sorting the
    /// vocabulary) draws from: every candidate sorted, top-k, softmax at the temperature,
    /// top-p, min-p, renormalised.
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cands.truncate(p.top_k);
        }
        let max = f64::from(cands[0].1);
        let t = f64::from(p.temperature);
        let w: Vec<f64> = cands
            .iter()
            .map(|c| ((f64::from(c.1) - max) / t).exp())
            .collect();
        let sum: f64 = w.iter().sum();
        let mut keep = w.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, x) in w.iter().enumerate() {
                cum += x / sum;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let n = w
                .iter()
                .take_while(|&&x| x >= w[0] * f64::from(p.min_p))
                .count();
            keep = keep.min(n.max(1));
        }
        let total: f64 = w[..keep].iter().sum();
        (0..keep).map(|i| (cands[i].0, w[i] / total)).collect()
    }

    #[test]
    fn every_cut_draws_from_the_reference_distribution() {
        use rand::rngs::StdRng;
        let mut rng = StdRng::seed_from_u64(11);
        let mut configs = 0;
        for (top_k, top_p, min_p) in [
            (0, 1.0, 0.0),
            (0, 0.9, 0.0),
            (0, 0.5, 0.0),
            (0, 1.0, 0.05),
            (0, 0.95, 0.05),
            (40, 1.0, 0.0),
            (5, 0.8, 0.0),
            (3, 1.0, 0.3),
            (0, 0.999, 0.0),
        ] {
            for temperature in [0.6f32, 1.0, 1.7] {
                // Peaked and flat vocabularies of 300 tokens, some banned (-inf).
                let spread = if configs % 2 == 0 { 2.0 } else { 6.0 };
                let mut logits: Vec<f32> = (0..300).map(|_| rng.r#gen::<f32>() * spread).collect();
                logits[17] = f32::NEG_INFINITY;
                let p = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(configs as u64),
                    ..SamplingParams::default()
                };
                let finite: Vec<f32> = logits.iter().copied().filter(|l| l.is_finite()).collect();
                let want = reference(&finite, &p);
                // The reference's ids index the finite logits; map them back.
                let ids: Vec<u32> = (0..logits.len() as u32)
                    .filter(|&i| logits[i as usize].is_finite())
                    .collect();
                let mut expected = vec![0.0f64; logits.len()];
                for (i, prob) in want {
                    expected[ids[i as usize] as usize] = prob;
                }
                let mut s = Sampler::new(p);
                let draws = 20_000;
                let mut hits = vec![0usize; logits.len()];
                for _ in 0..draws {
                    hits[s.sample(&mut logits.clone(), &[], 0) as usize] += 1;
                }
                for (id, (&h, &e)) in hits.iter().zip(&expected).enumerate() {
                    let freq = h as f64 / f64::from(draws);
                    // Never a token the reference cuts; frequencies within 5 standard
                    // deviations of 20,000 draws (at most 0.0177).
                    assert!(
                        e > 0.0 || h == 0,
                        "token {id} drawn {h} times but cut ({top_k}, {top_p}, {min_p}, {temperature})"
                    );
                    let sd = (e * (1.0 - e) / f64::from(draws)).sqrt();
                    assert!(
                        (freq - e).abs() <= 5.0 * sd + 1e-4,
                        "token {id}: {freq} drawn against {e} ({top_k}, {top_p}, {min_p}, {temperature})"
                    );
                }
                configs += 1;
            }
        }
        assert_eq!(configs, 27);
    }

    #[test]
    fn penalties_change_the_choice() {
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..params()
        };
        let mut logits = vec![1.0, 0.8, -1.0];
        apply_penalties(&p, &mut logits, &[0, 2], 0);
        assert_eq!(logits, vec![0.5, 0.8, -2.0]);

        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params()
        };
        let mut logits = vec![1.0, 1.0, 1.0];
        // The prompt token 1 is not penalised; generated 0 twice and 2 once.
        apply_penalties(&p, &mut logits, &[1, 0, 2, 0], 3);
        assert_eq!(logits, vec![-0.25, 1.0, 0.25]);
    }
}
