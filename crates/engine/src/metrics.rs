//! Counters, gauges and histograms the engine keeps while it runs, read without locks by
//! whoever exports them (the API's `/metrics`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS_S.iter().position(|&b| seconds <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_S`], the total count and the sum of
    /// observations in seconds.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS_S
            .iter()
            .zip(&self.counts)
            .map(|(&le, c)| {
                cumulative += c.load(Relaxed);
                (le, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Relaxed),
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram's values at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    /// All observations.
    pub count: u64,
    /// Sum of all observations, seconds.
    pub sum_seconds: f64,
}

/// Everything the engine measures.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Requests accepted and not yet admitted: what the bounded queue limits.
    pub(crate) queued: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) waiting: AtomicU64,
    pub(crate) kv_blocks_used: AtomicU64,
    pub(crate) kv_blocks_total: AtomicU64,
    pub(crate) kv_window_blocks_used: AtomicU64,
    pub(crate) kv_window_blocks_total: AtomicU64,
    pub(crate) kv_block_tokens: AtomicU64,
    pub(crate) prefix_query_tokens: AtomicU64,
    pub(crate) prefix_hit_tokens: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    pub(crate) requests_finished: AtomicU64,
    pub(crate) requests_rejected: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    /// Draft tokens proposed by speculation, and of those, accepted.
    pub(crate) spec_draft_tokens: AtomicU64,
    pub(crate) spec_accepted_tokens: AtomicU64,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) inter_token_latency: Histogram,
    pub(crate) request_latency: Histogram,
    /// The process's energy account the engine's steps are metered on, set once when the
    /// engine starts.
    pub(crate) energy_account: OnceLock<std::sync::Arc<crate::EnergyAccount>>,
    /// Microjoules of the engine's steps, attributed to their sequences.
    pub(crate) energy_requests_uj: AtomicU64,
}

/// The engine's energy totals since it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnergySnapshot {
    /// The source: `rapl`, `nvml` or `model`.
    pub meter: &'static str,
    /// Measured or modelled.
    pub kind: EnergyKind,
    /// Microjoules of steps, attributed to the requests in them.
    pub requests_uj: u64,
    /// Microjoules while no step of any engine of the process computed (waiting for
    /// requests, bookkeeping), attributed to none: the process's, shared by its engines'
    /// snapshots (the energy account is one per process).
    pub idle_uj: u64,
}

/// The engine's measurements at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSnapshot {
    /// Sequences being generated now.
    pub running: u64,
    /// Requests waiting to start.
    pub waiting: u64,
    /// KV blocks held by sequences.
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Window blocks (the sliding-window layers' own, given back once they leave a
    /// sequence's window) held by sequences; 0 when the windowed layers share the blocks.
    pub kv_window_blocks_used: u64,
    /// Window blocks in the pool (0 when the windowed layers share the blocks).
    pub kv_window_blocks_total: u64,
    /// Tokens per KV block.
    pub kv_block_tokens: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found (and not recomputed).
    pub prefix_hit_tokens: u64,
    /// Prompt tokens processed or found in the cache, all requests.
    pub prompt_tokens: u64,
    /// Tokens generated, all requests.
    pub generation_tokens: u64,
    /// Requests that ran to an end (stop, length or client gone).
    pub requests_finished: u64,
    /// Requests refused because the waiting queue was full.
    pub requests_rejected: u64,
    /// Sequences preempted (their cache dropped, to be recomputed) for lack of KV blocks.
    pub preemptions: u64,
    /// Draft tokens proposed by speculative decoding.
    pub spec_draft_tokens: u64,
    /// Of those, tokens the model accepted (sampled the same token).
    pub spec_accepted_tokens: u64,
    /// Seconds from arrival to the first generated token.
    pub time_to_first_token: HistogramSnapshot,
    /// Seconds between consecutive generated tokens of one sequence.
    pub inter_token_latency: HistogramSnapshot,
    /// Seconds from arrival to the end of a request.
    pub request_latency: HistogramSnapshot,
    /// Energy by where it went.
    pub energy: EnergySnapshot,
}

impl Metrics {
    /// Reads every value.
    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            running: self.running.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            kv_blocks_used: self.kv_blocks_used.load(Relaxed),
            kv_blocks_total: self.kv_blocks_total.load(Relaxed),
            kv_window_blocks_used: self.kv_window_blocks_used.load(Relaxed),
            kv_window_blocks_total: self.kv_window_blocks_total.load(Relaxed),
            kv_block_tokens: self.kv_block_tokens.load(Relaxed),
            prefix_query_tokens: self.prefix_query_tokens.load(Relaxed),
            prefix_hit_tokens: self.prefix_hit_tokens.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            generation_tokens: self.generation_tokens.load(Relaxed),
            requests_finished: self.requests_finished.load(Relaxed),
            requests_rejected: self.requests_rejected.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
            spec_draft_tokens: self.spec_draft_tokens.load(Relaxed),
            spec_accepted_tokens: self.spec_accepted_tokens.load(Relaxed),
            time_to_first_token: self.time_to_first_token.snapshot(),
            inter_token_latency: self.inter_token_latency.snapshot(),
            request_latency: self.request_latency.snapshot(),
            energy: {
                let requests_uj = self.energy_requests_uj.load(Relaxed);
                match self.energy_account.get() {
                    Some(account) => account.snapshot(requests_uj),
                    None => EnergySnapshot {
                        meter: "model",
                        kind: EnergyKind::Modelled,
                        requests_uj,
                        idle_uj: 0,
                    },
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for s in [0.0005, 0.003, 0.003, 0.2, 100.0] {
            h.observe(s);
        }
        let snap = h.snapshot();
        assert_eq!(snap.count, 5);
        assert_eq!(snap.buckets[0], (0.001, 1));
        assert_eq!(snap.buckets[2], (0.005, 3));
        assert_eq!(snap.buckets.last().map(|b| b.1), Some(4)); // 100 s is only in +Inf
        assert!((snap.sum_seconds - 100.2065).abs() < 1e-4);
    }
}

/// Whether joules come from a meter or from a model. Nothing modelled is ever labelled
/// `measured`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnergyKind {
    /// Read from a hardware energy counter (RAPL, NVML).
    Measured,
    /// Computed from a power model of the device.
    Modelled,
}

impl EnergyKind {
    /// `"measured"` or `"modelled"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EnergyKind::Measured => "measured",
            EnergyKind::Modelled => "modelled",
        }
    }
}
