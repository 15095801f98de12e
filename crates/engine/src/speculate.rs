//! Speculative decoding with n-gram (prompt-lookup) drafts, or drafts from a small model of
//! the same vocabulary (`--draft-model`, [`ModelDraft`]).
//!
//! A generating sequence often repeats what it has already seen: an edited text copies most
//! of its source, code repeats identifiers, answers quote their question. Before a decode
//! step, the sequence's last `n` tokens (`n` from `ngram_max` down to `ngram_min`) are looked
//! up in its own earlier tokens (prompt and output); the tokens that followed the most recent
//! earlier occurrence are the draft. The step then runs the pending token and the draft in
//! one forward pass (one read of the weights for up to `draft_max + 1` positions), and the
//! scheduler verifies position by position: it samples each position's token exactly as a
//! step without speculation would (same sampler, same history, same random draws) and keeps
//! going only while the sampled token equals the draft's. The first position whose token
//! differs ends the step with that token; positions after it are discarded (their keys and
//! values sit beyond the sequence's length and are overwritten later).
//!
//! This is lossless: every emitted token is drawn from the model's distribution given the
//! tokens before it, with the random draws in the same order as without speculation, so
//! greedy output is identical and seeded sampling gives the same text. For a draft that is a
//! single proposed token (a point mass), accepting it exactly when the sampled token equals
//! it has acceptance probability `p(draft)`, the optimum of speculative sampling.

use model::{KvCache, LlamaModel, Logits, ModelError, ThreadPool};

use crate::energy::CostModel;
use crate::sampler::argmax;

/// Speculation settings (`--speculate ngram`, or `--draft-model`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speculation {
    /// Most draft tokens per step.
    pub draft_max: usize,
    /// Longest suffix looked up.
    pub ngram_max: usize,
    /// Shortest suffix looked up.
    pub ngram_min: usize,
    /// A draft model's draft ends before its first token whose probability under the draft
    /// model (a softmax over its 10 most likely tokens, as llama.cpp's draft sampler) is
    /// below this (llama.cpp's `--draft-p-min`): where the draft model is unsure,
    /// the target seldom agrees, and each further draft token costs a forward pass of the
    /// draft model and a position of the verifying pass. 0 drafts `draft_max` tokens always.
    pub draft_p_min: f32,
}

impl Default for Speculation {
    fn default() -> Self {
        // llama.cpp's `--draft-max` default.
        Self {
            draft_max: 16,
            ngram_max: 3,
            ngram_min: 1,
            // llama.cpp's `common_params_speculative::p_min`.
            draft_p_min: 0.75,
        }
    }
}

impl Speculation {
    /// Checks the settings; the message names the flag.
    ///
    /// # Errors
    ///
    /// A draft length of 0 or above 64, n-gram bounds out of order or above 16, or a draft
    /// probability bound outside 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.draft_p_min) {
            return Err(format!(
                "--draft-p-min must be between 0 and 1, got {}",
                self.draft_p_min
            ));
        }
        if self.draft_max == 0 || self.draft_max > 64 {
            return Err(format!(
                "--draft-max must be between 1 and 64, got {}",
                self.draft_max
            ));
        }
        if self.ngram_min == 0 || self.ngram_min > self.ngram_max || self.ngram_max > 16 {
            return Err(format!(
                "n-gram sizes must satisfy 1 <= min ({}) <= max ({}) <= 16",
                self.ngram_min, self.ngram_max
            ));
        }
        Ok(())
    }

    /// The draft after `tokens` (at most `limit` tokens): what followed the most recent
    /// earlier occurrence of the longest suffix of `tokens` that occurs earlier, trying
    /// suffix lengths from `ngram_max` down to `ngram_min`. Empty when none occurs.
    pub(crate) fn draft(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.draft_max);
        if limit == 0 {
            return Vec::new();
        }
        let len = tokens.len();
        for n in (self.ngram_min..=self.ngram_max).rev() {
            if n >= len {
                continue;
            }
            let suffix = &tokens[len - n..];
            // Most recent earlier start `s` (s + n < len: the match ends before the suffix
            // starts being itself), scanning backwards.
            for s in (0..len - n).rev() {
                if &tokens[s..s + n] == suffix {
                    let from = s + n;
                    let to = (from + limit).min(len);
                    if from < to {
                        return tokens[from..to].to_vec();
                    }
                }
            }
        }
        Vec::new()
    }
}

/// One sequence's drafter state with a draft model: the draft model's own KV cache of the
/// sequence (private, contiguous; made at the first draft and grown by doubling, keeping
/// what it holds, so its memory follows the sequence's length) and
/// the tokens it holds. Each step it drops what no longer agrees with the sequence (the draft
/// tokens the target rejected), runs the tokens the sequence gained since, and extends them
/// greedily. Greedy is the right proposal here: verification accepts a proposed token exactly
/// when the target samples it, which keeps the output the target's whatever the drafts are.
pub(crate) struct ModelDraft {
    kv: Option<KvCache>,
    /// The tokens whose keys and values `kv` holds, in order.
    fed: Vec<u32>,
    /// The longest the sequence can grow (its prompt and completion limit).
    max_capacity: usize,
    /// Set when the draft model failed (its cache could not be made, say): no more drafts.
    disabled: bool,
}

/// The first size of a draft cache, in positions.
const DRAFT_CACHE_MIN: usize = 256;

impl ModelDraft {
    /// A drafter for a sequence of at most `max_capacity` tokens; nothing is allocated yet.
    pub(crate) fn new(max_capacity: usize) -> Self {
        Self {
            kv: None,
            fed: Vec::new(),
            max_capacity,
            disabled: false,
        }
    }

    /// Up to `limit` tokens continuing `tokens`, each the draft model's most likely next
    /// token, and the draft model's work for them in `cost`'s units (what the sequence is
    /// charged for it); fewer when the sequence cannot grow that far or when the next token's
    /// probability under the draft model is below `p_min`, none once the draft model failed
    /// (logged once). The draft model runs at most `max_feed` of the sequence's
    /// tokens it has not seen per call (a step's worth, `--max-batch-tokens`): a long prompt
    /// is caught up over several steps, with no draft until it is, rather than in one long
    /// step.
    pub(crate) fn draft(
        &mut self,
        model: &LlamaModel,
        pool: &ThreadPool,
        tokens: &[u32],
        (limit, max_feed, p_min): (usize, usize, f32),
        cost: &CostModel,
    ) -> (Vec<u32>, f64) {
        if self.disabled {
            return (Vec::new(), 0.0);
        }
        let mut work = 0.0;
        match self.try_draft(
            model,
            pool,
            tokens,
            (limit, max_feed.max(1), p_min),
            cost,
            &mut work,
        ) {
            Ok(draft) => (draft, work),
            Err(e) => {
                tracing::warn!(error = %e, "the draft model failed; this sequence goes on without drafts");
                self.disabled = true;
                self.kv = None;
                (Vec::new(), work)
            }
        }
    }

    fn try_draft(
        &mut self,
        model: &LlamaModel,
        pool: &ThreadPool,
        tokens: &[u32],
        (limit, max_feed, p_min): (usize, usize, f32),
        cost: &CostModel,
        work: &mut f64,
    ) -> Result<Vec<u32>, ModelError> {
        let max = self.max_capacity.min(model.config().context_length);
        // Feeding the draft's own tokens (all but the last) needs limit - 1 more positions.
        let limit = limit.min((max + 1).saturating_sub(tokens.len()));
        if limit == 0 || tokens.is_empty() {
            return Ok(Vec::new());
        }
        let needed = tokens.len() + limit - 1;
        let capacity = self.kv.as_ref().map_or(0, KvCache::capacity);
        if needed > capacity {
            let grown = needed.max(2 * capacity).max(DRAFT_CACHE_MIN).min(max);
            match self.kv.as_mut() {
                // The cached tokens stay: nothing is computed again.
                Some(kv) => kv.grow(model.config(), grown)?,
                None => self.kv = Some(model.new_kv_cache(grown)?),
            }
        }
        let Some(kv) = self.kv.as_mut() else {
            return Ok(Vec::new());
        };
        // The last token is always run again (its logits give the first draft token).
        let common = self
            .fed
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        kv.truncate(common);
        self.fed.truncate(common);
        if tokens.len() - common > max_feed {
            let part = &tokens[common..common + max_feed];
            model.forward(pool, part, kv, Logits::None)?;
            *work += cost.chunk(common, part.len());
            self.fed.extend_from_slice(part);
            return Ok(Vec::new());
        }
        let mut logits = model.forward(pool, &tokens[common..], kv, Logits::Last)?;
        *work += cost.chunk(common, tokens.len() - common);
        self.fed.extend_from_slice(&tokens[common..]);
        let mut draft = Vec::with_capacity(limit);
        loop {
            let next = argmax(&logits);
            // A NaN probability (logits that are not finite) ends the draft too.
            if p_min > 0.0 {
                let p = top_probability(&logits, next);
                if p.is_nan() || p < p_min {
                    return Ok(draft);
                }
            }
            draft.push(next);
            if draft.len() == limit {
                return Ok(draft);
            }
            logits = model.forward(pool, &[next], kv, Logits::Last)?;
            *work += cost.chunk(self.fed.len(), 1);
            self.fed.push(next);
        }
    }
}

/// The tokens a draft token's probability is normalised over: llama.cpp's draft sampler
/// keeps the 10 most likely (top-k 10) before its softmax.
const DRAFT_TOP_K: usize = 10;

/// The probability of `logits[top]`, the largest logit, in a softmax over the
/// [`DRAFT_TOP_K`] largest logits (NaN when the logits are not finite).
fn top_probability(logits: &[f32], top: u32) -> f32 {
    let max = logits[top as usize];
    // The largest logits, in descending order (NaNs never enter).
    let mut best = [f32::NEG_INFINITY; DRAFT_TOP_K];
    for &l in logits {
        if l > best[DRAFT_TOP_K - 1] {
            let mut i = DRAFT_TOP_K - 1;
            while i > 0 && best[i - 1] < l {
                best[i] = best[i - 1];
                i -= 1;
            }
            best[i] = l;
        }
    }
    let sum: f64 = best.iter().map(|&l| f64::from(l - max).exp()).sum();
    (1.0 / sum) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: CostModel = CostModel {
        dense_flops_per_token: 1.0,
        attention_flops_per_position: 0.0,
    };

    fn tiny() -> LlamaModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../model/tests/golden/tiny/llama");
        model::LoadedModel::open(&dir, &mut |_, _| {})
            .expect("the tiny llama golden")
            .model
    }

    /// Greedy continuation of `tokens` by the model, recomputed from nothing.
    fn greedy(model: &LlamaModel, pool: &ThreadPool, tokens: &[u32], n: usize) -> Vec<u32> {
        let mut kv = model.new_kv_cache(64).unwrap();
        let mut logits = model.forward(pool, tokens, &mut kv, Logits::Last).unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = argmax(&logits);
            out.push(t);
            logits = model.forward(pool, &[t], &mut kv, Logits::Last).unwrap();
        }
        out
    }

    /// A drafter that keeps its cache across steps drafts exactly what one that starts from
    /// nothing does, after its draft is accepted in part and the sequence goes elsewhere
    /// (the rejected tokens' keys and values are dropped), and after the sequence grows.
    #[test]
    fn a_model_draft_follows_the_sequence_through_rejections() {
        let model = tiny();
        let pool = ThreadPool::new(1);
        let mut d = ModelDraft::new(40);
        let mut seq: Vec<u32> = vec![1, 17, 200, 45, 3, 99];
        let (first, work) = d.draft(&model, &pool, &seq, (4, 64, 0.0), &COST);
        assert_eq!(first, greedy(&model, &pool, &seq, 4));
        // Charged what it ran: the 6 tokens, then 3 of its own (one cost unit a token here).
        assert_eq!(work, 9.0);
        // Two draft tokens accepted, then a token of the target's own.
        seq.extend_from_slice(&first[..2]);
        seq.push((first[2] + 1) % 256);
        let second = d.draft(&model, &pool, &seq, (5, 64, 0.0), &COST).0;
        assert_eq!(second, greedy(&model, &pool, &seq, 5));
        // Everything accepted, plus the target's next token.
        seq.extend_from_slice(&second);
        seq.push(7);
        let third = d.draft(&model, &pool, &seq, (3, 64, 0.0), &COST).0;
        assert_eq!(third, greedy(&model, &pool, &seq, 3));
        // Near the end of the sequence's room the draft is cut to what fits.
        let long: Vec<u32> = (0..38).map(|i| (i * 7 + 1) % 256).collect();
        assert_eq!(
            d.draft(&model, &pool, &long, (8, 64, 0.0), &COST).0,
            greedy(&model, &pool, &long, 3)
        );
        assert!(
            d.draft(&model, &pool, &[0; 41], (8, 64, 0.0), &COST)
                .0
                .is_empty()
        );
        assert!(!d.disabled);
        // A cache that grows keeps what it holds (nothing is run again) and drafts the same.
        let mut small = ModelDraft {
            kv: Some(model.new_kv_cache(8).unwrap()),
            fed: Vec::new(),
            max_capacity: 40,
            disabled: false,
        };
        let (start, work) = small.draft(&model, &pool, &seq[..4], (2, 64, 0.0), &COST);
        assert_eq!(start, greedy(&model, &pool, &seq[..4], 2));
        assert_eq!((work, small.kv.as_ref().unwrap().capacity()), (5.0, 8));
        let (grown, work) = small.draft(&model, &pool, &seq, (8, 64, 0.0), &COST);
        assert_eq!(grown, greedy(&model, &pool, &seq, 8));
        assert!(small.kv.as_ref().unwrap().capacity() >= seq.len() + 7);
        // At most seq[4..] and 7 of its own tokens; run from nothing it would be 6 + 7.
        assert!(work <= (seq.len() - 4 + 7) as f64, "{work}");
        // A long catch-up is spread over calls of at most `max_feed` tokens, then drafts the
        // same.
        let mut slow = ModelDraft::new(40);
        let n = seq.len();
        assert!(
            slow.draft(&model, &pool, &seq, (3, 5, 0.0), &COST)
                .0
                .is_empty()
        );
        assert_eq!(slow.fed.len(), 5);
        assert!(
            slow.draft(&model, &pool, &seq, (3, 5, 0.0), &COST)
                .0
                .is_empty()
        );
        assert_eq!(slow.fed.len(), 10);
        let more = (n - 10).div_ceil(5);
        for _ in 0..more.saturating_sub(1) {
            assert!(
                slow.draft(&model, &pool, &seq, (3, 5, 0.0), &COST)
                    .0
                    .is_empty()
            );
        }
        assert_eq!(
            slow.draft(&model, &pool, &seq, (3, 5, 0.0), &COST).0,
            greedy(&model, &pool, &seq, 3)
        );
    }

    #[test]
    fn drafts_continue_the_most_recent_match_of_the_longest_suffix() {
        let s = Speculation {
            draft_max: 3,
            ngram_max: 3,
            ngram_min: 1,
            ..Speculation::default()
        };
        // Suffix [7, 8, 9] occurs at 1..4 and is followed by 10, 11, 12.
        let t = [1, 7, 8, 9, 10, 11, 12, 13, 5, 7, 8, 9];
        assert_eq!(s.draft(&t, 8), vec![10, 11, 12]);
        assert_eq!(s.draft(&t, 2), vec![10, 11]);
        // The most recent occurrence wins: [4] occurs at 0 (then 5) and 2 (then 6).
        assert_eq!(s.draft(&[4, 5, 4, 6, 4], 8), vec![6, 4]);
        // Only the 1-gram matches here.
        assert_eq!(s.draft(&[3, 1, 2, 9, 2], 8), vec![9, 2]);
        // Nothing repeats: no draft.
        assert!(s.draft(&[1, 2, 3, 4], 8).is_empty());
        assert!(s.draft(&[], 8).is_empty());
        assert!(s.draft(&t, 0).is_empty());
    }

    #[test]
    fn settings_are_checked() {
        assert!(Speculation::default().validate().is_ok());
        let bad = |d, lo, hi| {
            Speculation {
                draft_max: d,
                ngram_min: lo,
                ngram_max: hi,
                ..Speculation::default()
            }
            .validate()
            .is_err()
        };
        assert!(bad(0, 1, 3));
        assert!(bad(65, 1, 3));
        assert!(bad(4, 0, 3));
        assert!(bad(4, 4, 3));
        assert!(bad(4, 1, 17));
        let p_min = |p| {
            Speculation {
                draft_p_min: p,
                ..Speculation::default()
            }
            .validate()
        };
        assert!(p_min(0.0).is_ok() && p_min(1.0).is_ok());
        for p in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            assert!(p_min(p).unwrap_err().contains("--draft-p-min"), "{p}");
        }
    }

    /// A draft token's probability is its softmax over the 10 largest logits only; logits
    /// that are not finite give NaN (which ends a draft).
    #[test]
    fn draft_probabilities_are_over_the_ten_most_likely() {
        // 10 logits of 0 and the top one at ln 9 (each 0 has weight 1, the top 9):
        // 9 / (9 + 9) over the ten largest; the 0s and -5s past the tenth do not count.
        let mut l = vec![-5.0f32; 40];
        l[3] = 9f32.ln();
        for i in [0, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25] {
            l[i] = 0.0;
        }
        assert!((top_probability(&l, 3) - 0.5).abs() < 1e-6);
        // Fewer logits than ten: all of them.
        assert!((top_probability(&[1f32.ln(), 3f32.ln()], 1) - 0.75).abs() < 1e-6);
        assert!((top_probability(&[f32::NEG_INFINITY, 2.0], 1) - 1.0).abs() < 1e-6);
        assert!(top_probability(&[f32::INFINITY, 2.0], 0).is_nan());
        assert!(top_probability(&[f32::NAN, f32::NAN], 0).is_nan());
        assert!(top_probability(&[f32::NEG_INFINITY; 3], 0).is_nan());
    }

    /// With `p_min`, a model draft is the greedy continuation up to (not including) its first
    /// token whose probability under the draft model is below `p_min`.
    #[test]
    fn a_model_draft_ends_where_the_draft_model_is_unsure() {
        let model = tiny();
        let pool = ThreadPool::new(1);
        let seq: Vec<u32> = vec![1, 17, 200, 45, 3, 99];
        // The greedy continuation and each of its tokens' probabilities, from nothing.
        let mut kv = model.new_kv_cache(64).unwrap();
        let mut logits = model.forward(&pool, &seq, &mut kv, Logits::Last).unwrap();
        let (mut greedy, mut probs) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let t = argmax(&logits);
            let max = logits[t as usize];
            // Normalised over the 10 largest logits.
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let sum: f64 = sorted[..10].iter().map(|&l| f64::from(l - max).exp()).sum();
            greedy.push(t);
            probs.push(1.0 / sum);
            logits = model.forward(&pool, &[t], &mut kv, Logits::Last).unwrap();
        }
        // Thresholds between the probabilities seen (so that f32 rounding cannot decide).
        let mut sorted = probs.clone();
        sorted.sort_by(f64::total_cmp);
        let mut cuts: Vec<f64> = sorted
            .windows(2)
            .filter(|w| w[1] - w[0] > 1e-3 * w[1])
            .map(|w| (w[0] + w[1]) / 2.0)
            .collect();
        assert!(cuts.len() >= 2, "{probs:?}");
        cuts.extend([sorted[0] / 2.0, 1.0]);
        for cut in cuts {
            let expect = probs.iter().take_while(|&&p| p >= cut).count();
            let mut d = ModelDraft::new(40);
            let got = d.draft(&model, &pool, &seq, (8, 64, cut as f32), &COST).0;
            assert_eq!(
                got,
                greedy[..expect],
                "p_min {cut}, probabilities {probs:?}"
            );
        }
        // p_min 0 drafts the whole limit.
        let mut d = ModelDraft::new(40);
        assert_eq!(d.draft(&model, &pool, &seq, (8, 64, 0.0), &COST).0, greedy);
    }
}
