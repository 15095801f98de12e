//! A discrete-event simulation of one replica's continuous batching, with the policy of the
//! engine's `Scheduler` (`crates/engine/src/scheduler.rs`):
//!
//! - admission is first come, first served, while fewer than `max_seqs` run and the
//!   sequence's prompt fits in the free KV; one that does not fit stops admission (nothing
//!   overtakes it);
//! - every step runs one decode token for each sequence whose prompt is done, then prompt
//!   chunks, oldest first, up to `max_batch_tokens` in all;
//! - a sequence whose prompt finishes in a step samples its first token at the end of that
//!   step (that last prompt token is costed as a decoding sequence's: it needs the output
//!   head's logits and a draw, which the other prompt tokens do not); each later step gives
//!   it one more; it leaves after its last token;
//! - when a decoding sequence needs KV and none is free, the most recently admitted is
//!   preempted: its KV is released and it returns to the front of the queue, to be
//!   recomputed (its prompt and the tokens it had generated).
//!
//! Step times come from a [`StepCost`]: the fitted GPU model or the CPU profile.

use std::collections::VecDeque;

use serde::Serialize;

/// What a step costs, in seconds.
pub trait StepCost {
    /// Seconds for a step with `decode_seqs` decoding sequences (at `mean_context` positions
    /// on average) and `prefill_tokens` prompt tokens, which attend `prompt_attention_k`
    /// thousand positions in all (each its own chunk's earlier tokens and what its sequence
    /// had cached).
    fn step_seconds(
        &self,
        decode_seqs: usize,
        prefill_tokens: usize,
        mean_context: f64,
        prompt_attention_k: f64,
    ) -> f64;
}

/// Positions, in thousands, that `tokens` prompt tokens attend when their sequence had
/// `cached` positions before them: each token its cache and the chunk's tokens up to itself.
pub fn prompt_attention_k(cached: f64, tokens: f64) -> f64 {
    (tokens * cached + tokens * (tokens + 1.0) / 2.0) / 1000.0
}

/// The scheduler's limits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Limits {
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most tokens per step.
    pub max_batch_tokens: usize,
    /// KV capacity in tokens.
    pub kv_tokens: usize,
}

/// One request: when it arrives and how long it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Arrival, seconds.
    pub arrival_s: f64,
    /// Prompt tokens (at least 1).
    pub prompt_tokens: usize,
    /// Tokens to generate (at least 1).
    pub output_tokens: usize,
}

/// Latency and throughput of a simulated run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SimResult {
    /// Requests that finished.
    pub finished: usize,
    /// Generated tokens.
    pub tokens: usize,
    /// First arrival to last finish, seconds.
    pub wall_s: f64,
    /// Generated tokens per second over `wall_s`.
    pub tokens_per_s: f64,
    /// Time to first token percentiles (50, 90, 99), seconds.
    pub ttft_s: [f64; 3],
    /// Inter-token latency percentiles (50, 90, 99), seconds.
    pub itl_s: [f64; 3],
    /// Mean decoding sequences per step.
    pub mean_batch: f64,
    /// Steps run.
    pub steps: usize,
    /// Preemptions.
    pub preemptions: usize,
}

struct Seq {
    idx: usize,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Tokens known (prompt + generated).
    known: usize,
    generated: usize,
    last_token_s: Option<f64>,
}

/// The `p`-th percentile (0..=100) of `v` by nearest rank on the sorted values; 0 for none.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

/// [`percentile`] of the values `v` holds with their counts: the same nearest rank over
/// every value counted as often as it was seen.
pub fn weighted_percentile(v: &mut [(f64, u64)], p: f64) -> f64 {
    let n: u64 = v.iter().map(|(_, k)| k).sum();
    if n == 0 {
        return 0.0;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rank = ((p / 100.0) * (n - 1) as f64).round() as u64;
    let mut seen = 0;
    for &(x, k) in v.iter() {
        seen += k;
        if seen > rank {
            return x;
        }
    }
    v.last().map_or(0.0, |(x, _)| *x)
}

/// Runs `requests` (sorted by arrival) through the scheduler's policy. A request whose
/// prompt alone exceeds the KV capacity is dropped, as the engine fails it.
pub fn simulate(requests: &[Request], limits: Limits, cost: &dyn StepCost) -> SimResult {
    simulate_deferred(requests, &[], limits, cost)
}

/// [`simulate`], where request `i` is admitted only once the prompt of request
/// `waits_for[i]` (an earlier one) is computed: the engine defers a request whose next
/// uncached KV block another running prompt is computing, and lets later requests pass it,
/// until that block is cached (it then shares it, so its `prompt_tokens` should not count
/// it). A missing entry, `None`, or an index that is not earlier waits for nothing.
pub fn simulate_deferred(
    requests: &[Request],
    waits_for: &[Option<usize>],
    limits: Limits,
    cost: &dyn StepCost,
) -> SimResult {
    simulate_arrivals_costed(requests, waits_for, limits, cost, 0.0)
}

/// [`simulate_deferred`], where each request that arrives while a step runs makes that step
/// `per_arrival_s` longer: the work of taking a request in (sending it, the server's HTTP
/// and tokenising) shares the engine's cores, and a burst of requests lands on the steps
/// it overlaps. A step's length and the requests arriving within it depend on each other:
/// it is lengthened until no more arrive within it (at most once per request). A request
/// that arrives while no step runs costs nothing here.
pub fn simulate_arrivals_costed(
    requests: &[Request],
    waits_for: &[Option<usize>],
    limits: Limits,
    cost: &dyn StepCost,
    per_arrival_s: f64,
) -> SimResult {
    let per_arrival_s = if per_arrival_s.is_finite() {
        per_arrival_s.max(0.0)
    } else {
        0.0
    };
    let max_seqs = limits.max_seqs.max(1);
    let budget_max = limits.max_batch_tokens.max(1);
    let mut next = 0;
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut now = requests.first().map_or(0.0, |r| r.arrival_s);
    let start = now;
    let mut ttft = Vec::with_capacity(requests.len());
    // Inter-token latencies as (value, how many tokens had it): the sequences decoding in a
    // step mostly share their previous token's time, so a step adds one or a few entries
    // however large its batch (a sample per token grew with the tokens generated: gigabytes
    // for long outputs).
    let mut itl: Vec<(f64, u64)> = Vec::new();
    let mut out = SimResult::default();
    let mut batch_sum = 0.0;
    let mut last_finish = now;
    let kv_used = |running: &[Seq]| running.iter().map(|s| s.known).sum::<usize>();
    // Whose prompt each request waits for, and which prompts are computed (or dropped).
    let owner = |i: usize| waits_for.get(i).copied().flatten().filter(|&j| j < i);
    let mut prompt_done = vec![false; requests.len()];
    loop {
        while next < requests.len() && requests[next].arrival_s <= now {
            let r = requests[next];
            waiting.push_back(Seq {
                idx: next,
                computed: 0,
                known: r.prompt_tokens.max(1),
                generated: 0,
                last_token_s: None,
            });
            next += 1;
        }
        // Admission, oldest first; a request waiting for another's prompt is passed over,
        // anything else that does not fit stops it (no overtaking).
        let mut w = 0;
        // The KV the running sequences hold, kept as they come and go (summing it for each
        // admission made a wave of n admissions cost n²).
        let mut used = kv_used(&running);
        while running.len() < max_seqs {
            let Some(seq) = waiting.get(w) else { break };
            if seq.known > limits.kv_tokens {
                prompt_done[seq.idx] = true;
                waiting.remove(w);
                continue;
            }
            if owner(seq.idx).is_some_and(|j| !prompt_done[j]) {
                w += 1;
                continue;
            }
            if used + seq.known > limits.kv_tokens {
                break;
            }
            if let Some(s) = waiting.remove(w) {
                used += s.known;
                running.push(s);
            }
        }
        if running.is_empty() {
            if next >= requests.len() {
                break;
            }
            now = now.max(requests[next].arrival_s);
            continue;
        }
        // Decoding sequences need one more position each; preempt the youngest when full.
        let mut decoding = running.iter().filter(|s| s.known - s.computed == 1).count();
        while used + decoding > limits.kv_tokens && running.len() > 1 {
            if let Some(mut victim) = running.pop() {
                used -= victim.known;
                decoding -= usize::from(victim.known - victim.computed == 1);
                victim.computed = 0;
                out.preemptions += 1;
                waiting.push_front(victim);
            }
        }
        // The step's plan: decode tokens first, then prompt chunks.
        let mut budget = budget_max;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut decode = 0;
        let mut context = 0.0;
        for (i, s) in running.iter().enumerate() {
            if s.known - s.computed == 1 {
                plan.push((i, 1));
                decode += 1;
                context += s.known as f64;
                budget = budget.saturating_sub(1);
            }
        }
        let mut prefill = 0;
        let mut attended = 0.0; // thousands of positions
        // A chunk that ends its prompt needs logits for its last token, as a decoding
        // sequence does (the output head, sampling, the first token's event): that token is
        // costed as one (the profile's prompt steps carry one such row each).
        let mut logit_rows = decode;
        for (i, s) in running.iter().enumerate() {
            let todo = s.known - s.computed;
            if todo > 1 && budget > 0 {
                let n = todo.min(budget);
                plan.push((i, n));
                // Its prompt tokens (all but a last one that needs logits) attend what the
                // sequence had cached and the chunk's tokens up to their own.
                let m = if n == todo { n - 1 } else { n };
                attended += prompt_attention_k(s.computed as f64, m as f64);
                if n == todo {
                    logit_rows += 1;
                    prefill += n - 1;
                    context += s.known as f64;
                } else {
                    prefill += n;
                }
                budget -= n;
            }
        }
        let mean_context = if logit_rows > 0 {
            context / logit_rows as f64
        } else {
            0.0
        };
        let base = cost.step_seconds(logit_rows, prefill, mean_context, attended);
        let mut step = base;
        if per_arrival_s > 0.0 {
            // Requests `next..` arrive after `now` (the others are queued); those before
            // the step's end lengthen it, which may take in more.
            loop {
                let arriving = requests[next..].partition_point(|r| r.arrival_s < now + step);
                let longer = base + arriving as f64 * per_arrival_s;
                if longer <= step {
                    break;
                }
                step = longer;
            }
        }
        now += step;
        out.steps += 1;
        batch_sum += decode as f64;
        let mut done = Vec::new();
        let step_itl_from = itl.len();
        for &(i, n) in &plan {
            let s = &mut running[i];
            s.computed += n;
            if s.computed < s.known {
                continue;
            }
            // The last known token is computed: sample the next one.
            let r = &requests[s.idx];
            s.generated += 1;
            out.tokens += 1;
            match s.last_token_s {
                None => ttft.push(now - r.arrival_s),
                Some(t) => {
                    let v = now - t;
                    match itl[step_itl_from..].iter_mut().find(|(x, _)| *x == v) {
                        Some((_, k)) => *k += 1,
                        None => itl.push((v, 1)),
                    }
                }
            }
            s.last_token_s = Some(now);
            prompt_done[s.idx] = true;
            if s.generated >= r.output_tokens.max(1) {
                done.push(i);
            } else {
                s.known += 1;
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            running.remove(i);
            out.finished += 1;
            last_finish = now;
        }
    }
    out.wall_s = (last_finish - start).max(1e-9);
    out.tokens_per_s = out.tokens as f64 / out.wall_s;
    out.mean_batch = batch_sum / out.steps.max(1) as f64;
    for (k, p) in [50.0, 90.0, 99.0].into_iter().enumerate() {
        out.ttft_s[k] = percentile(&mut ttft, p);
        out.itl_s[k] = weighted_percentile(&mut itl, p);
    }
    out
}

/// A small deterministic generator (splitmix64) for arrivals and lengths.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A uniform draw in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// An exponential draw of mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.uniform().ln()
    }

    /// A lognormal draw with mean `mean` and coefficient of variation `cv` (0: constant).
    pub fn lognormal(&mut self, mean: f64, cv: f64) -> f64 {
        if cv <= 0.0 {
            return mean;
        }
        let s2 = (1.0 + cv * cv).ln();
        let mu = mean.ln() - s2 / 2.0;
        // Box–Muller.
        let z = (-2.0 * self.uniform().ln()).sqrt()
            * (2.0 * std::f64::consts::PI * self.uniform()).cos();
        (mu + s2.sqrt() * z).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each step costs 1 ms plus 0.1 ms per token.
    struct Linear;
    impl StepCost for Linear {
        fn step_seconds(&self, decode: usize, prefill: usize, _: f64, _: f64) -> f64 {
            1e-3 + 1e-4 * (decode + prefill) as f64
        }
    }

    fn limits(max_seqs: usize) -> Limits {
        Limits {
            max_seqs,
            max_batch_tokens: 512,
            kv_tokens: 1 << 20,
        }
    }

    #[test]
    fn one_request_takes_its_prompt_step_then_one_step_per_token() {
        let r = [Request {
            arrival_s: 0.0,
            prompt_tokens: 100,
            output_tokens: 10,
        }];
        let out = simulate(&r, limits(4), &Linear);
        assert_eq!(out.tokens, 10);
        assert_eq!(out.steps, 10);
        assert!((out.ttft_s[0] - 0.011).abs() < 1e-12, "{:?}", out.ttft_s);
        assert!((out.itl_s[0] - 0.0011).abs() < 1e-12, "{:?}", out.itl_s);
    }

    /// Records what each step was asked to cost.
    struct Recorder(std::sync::Mutex<Vec<(usize, usize, f64, f64)>>);
    impl StepCost for Recorder {
        fn step_seconds(&self, decode: usize, prefill: usize, ctx: f64, attended: f64) -> f64 {
            if let Ok(mut v) = self.0.lock() {
                v.push((decode, prefill, ctx, attended));
            }
            1e-3
        }
    }

    #[test]
    fn prompt_chunks_attend_the_cache_and_their_own_earlier_tokens() {
        // A 100-token prompt in chunks of 64: positions 0..64, then 64..100 whose last
        // token is a logits row at context 100.
        let r = [Request {
            arrival_s: 0.0,
            prompt_tokens: 100,
            output_tokens: 2,
        }];
        let rec = Recorder(std::sync::Mutex::new(Vec::new()));
        let lim = Limits {
            max_batch_tokens: 64,
            ..limits(1)
        };
        simulate(&r, lim, &rec);
        let steps = rec.0.into_inner().unwrap_or_default();
        assert_eq!(steps.len(), 3, "{steps:?}");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let (d, p, _, a) = steps[0];
        assert_eq!((d, p), (0, 64));
        assert!(close(a, 64.0 * 65.0 / 2.0 / 1000.0), "{a}");
        let (d, p, ctx, a) = steps[1];
        assert_eq!((d, p), (1, 35));
        assert!(close(ctx, 100.0), "{ctx}");
        assert!(close(a, (35.0 * 64.0 + 35.0 * 36.0 / 2.0) / 1000.0), "{a}");
        let (d, p, ctx, a) = steps[2];
        assert_eq!((d, p, a), (1, 0, 0.0));
        assert!(close(ctx, 101.0), "{ctx}");
    }

    /// Decode rows cost more than prompt tokens (the output head, a draw).
    struct HeadHeavy;
    impl StepCost for HeadHeavy {
        fn step_seconds(&self, decode: usize, prefill: usize, _: f64, _: f64) -> f64 {
            1e-3 + 1e-3 * decode as f64 + 1e-4 * prefill as f64
        }
    }

    #[test]
    fn prompts_ending_in_a_step_cost_their_logits_rows() {
        // 16 prompts of 30 tokens end together: 16 logit rows and 464 other prompt tokens.
        let many: Vec<Request> = (0..16)
            .map(|_| Request {
                arrival_s: 0.0,
                prompt_tokens: 30,
                output_tokens: 1,
            })
            .collect();
        let out = simulate(&many, limits(16), &HeadHeavy);
        let step = 1e-3 + 16e-3 + 464e-4;
        assert!((out.ttft_s[0] - step).abs() < 1e-12, "{:?}", out.ttft_s);
        // One prompt of the same 480 tokens: one logit row.
        let one = [Request {
            arrival_s: 0.0,
            prompt_tokens: 480,
            output_tokens: 1,
        }];
        let out = simulate(&one, limits(16), &HeadHeavy);
        assert!(
            (out.ttft_s[0] - (2e-3 + 479e-4)).abs() < 1e-12,
            "{:?}",
            out.ttft_s
        );
    }

    #[test]
    fn long_prompts_are_chunked_and_decoding_goes_first() {
        // A running stream keeps decoding while a 1,200-token prompt takes three chunks.
        let r = [
            Request {
                arrival_s: 0.0,
                prompt_tokens: 10,
                output_tokens: 50,
            },
            Request {
                arrival_s: 0.0015,
                prompt_tokens: 1200,
                output_tokens: 1,
            },
        ];
        let out = simulate(&r, limits(4), &Linear);
        assert_eq!(out.finished, 2);
        // The stream's worst gap is one step with a full 512-token batch: 1 ms + 51.2 ms.
        assert!(out.itl_s[2] <= 0.0523, "{:?}", out.itl_s);
    }

    #[test]
    fn a_request_waiting_for_anothers_prompt_is_passed_over_until_it_is_computed() {
        // Three requests at once: the second shares the first's prompt blocks (so it computes
        // 1 token, once they are cached); the third waits for nothing.
        let r = [
            Request {
                arrival_s: 0.0,
                prompt_tokens: 40,
                output_tokens: 3,
            },
            Request {
                arrival_s: 0.0,
                prompt_tokens: 1,
                output_tokens: 3,
            },
            Request {
                arrival_s: 0.0,
                prompt_tokens: 40,
                output_tokens: 3,
            },
        ];
        let rec = Recorder(std::sync::Mutex::new(Vec::new()));
        let out = simulate_deferred(&r, &[None, Some(0), None], limits(4), &rec);
        assert_eq!(out.finished, 3);
        let steps = rec.0.into_inner().unwrap_or_default();
        // Step 1: both 40-token prompts (the third passes the second); step 2: their first
        // decode rows and the second's one prompt token (a logits row); then decoding.
        assert_eq!((steps[0].0, steps[0].1), (2, 78), "{steps:?}");
        assert_eq!((steps[1].0, steps[1].1), (3, 0), "{steps:?}");
        assert_eq!(steps.len(), 4, "{steps:?}");
        // Without the wait, all three start in the first step.
        let rec = Recorder(std::sync::Mutex::new(Vec::new()));
        simulate(&r, limits(4), &rec);
        let steps = rec.0.into_inner().unwrap_or_default();
        assert_eq!((steps[0].0, steps[0].1), (3, 78), "{steps:?}");
        assert_eq!(steps.len(), 3, "{steps:?}");
        // An index that is not earlier (here its own) waits for nothing.
        let rec = Recorder(std::sync::Mutex::new(Vec::new()));
        simulate_deferred(&r, &[None, Some(1), Some(2)], limits(4), &rec);
        assert_eq!(rec.0.into_inner().unwrap_or_default().len(), 3);
    }

    #[test]
    fn requests_arriving_during_a_step_lengthen_it_until_none_more_arrive_within_it() {
        let at = |arrival_s: f64| Request {
            arrival_s,
            prompt_tokens: 10,
            output_tokens: 1,
        };
        // Steps of 1 ms + 0.1 ms per token: a lone 10-token prompt takes 2 ms.
        let r = [at(0.0), at(0.001), at(0.0025), at(0.010)];
        let plain = simulate_deferred(&r, &[], limits(8), &Linear);
        assert_eq!(
            simulate_arrivals_costed(&r, &[], limits(8), &Linear, 0.0),
            plain
        );
        let costed = simulate_arrivals_costed(&r, &[], limits(8), &Linear, 0.001);
        // The first step (2 ms) takes in the request at 1 ms (3 ms), then the one at 2.5 ms
        // (4 ms), and stops there. The second computes both (3 ms, to 7 ms). The last
        // arrives at 10 ms to an idle engine: its step is not lengthened.
        // First tokens at 4, 6, 4.5 and 2 ms: the median (nearest rank) 4.5, the p99 6.
        assert!((costed.ttft_s[0] - 0.0045).abs() < 1e-12, "{costed:?}");
        assert!((costed.ttft_s[2] - 0.006).abs() < 1e-12, "{costed:?}");
        assert!((costed.wall_s - 0.012).abs() < 1e-12, "{costed:?}");
        assert_eq!(costed.steps, 3);
        // Without the charge the first step is 2 ms and takes neither: four steps, first
        // tokens at 2, 3, 3.5 and 2 ms.
        assert_eq!(plain.steps, 4);
        assert!((plain.ttft_s[0] - 0.003).abs() < 1e-12, "{plain:?}");
        // Bad values cost nothing rather than a panic or a negative step.
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(
                simulate_arrivals_costed(&r, &[], limits(8), &Linear, bad),
                plain
            );
        }
    }

    #[test]
    fn max_seqs_bounds_the_batch_and_queues_the_rest() {
        let r: Vec<Request> = (0..8)
            .map(|_| Request {
                arrival_s: 0.0,
                prompt_tokens: 4,
                output_tokens: 20,
            })
            .collect();
        let two = simulate(&r, limits(2), &Linear);
        let eight = simulate(&r, limits(8), &Linear);
        assert_eq!(two.tokens, 160);
        assert!(two.mean_batch <= 2.0 + 1e-9);
        assert!(eight.tokens_per_s > two.tokens_per_s);
        assert!(two.ttft_s[2] > eight.ttft_s[2]);
    }

    #[test]
    fn a_full_kv_cache_preempts_and_still_finishes_everything() {
        let r: Vec<Request> = (0..4)
            .map(|_| Request {
                arrival_s: 0.0,
                prompt_tokens: 10,
                output_tokens: 30,
            })
            .collect();
        let out = simulate(
            &r,
            Limits {
                max_seqs: 4,
                max_batch_tokens: 64,
                kv_tokens: 100,
            },
            &Linear,
        );
        assert_eq!(out.finished, 4);
        assert!(out.preemptions > 0);
    }

    #[test]
    fn weighted_percentiles_are_the_percentiles_of_the_values_repeated() {
        let mut rng = Rng::new(3);
        for case in 0..200 {
            let entries: Vec<(f64, u64)> = (0..1 + case % 7)
                .map(|_| {
                    (
                        (rng.uniform() * 8.0).floor() / 4.0,
                        1 + (rng.uniform() * 5.0) as u64,
                    )
                })
                .collect();
            let mut flat: Vec<f64> = entries
                .iter()
                .flat_map(|&(x, k)| std::iter::repeat_n(x, k as usize))
                .collect();
            for p in [0.0, 50.0, 90.0, 99.0, 100.0] {
                let mut w = entries.clone();
                assert_eq!(
                    weighted_percentile(&mut w, p),
                    percentile(&mut flat, p),
                    "{entries:?} p{p}"
                );
            }
        }
        assert_eq!(weighted_percentile(&mut [], 50.0), 0.0);
    }
}
