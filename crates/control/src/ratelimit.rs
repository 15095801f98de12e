//! Per-key rate limits as token buckets, in this process's memory: a key limited to N per
//! minute holds a bucket of N that refills continuously at N/60 per second. With several
//! server processes each enforces its own limits (a fleet-wide limiter comes with the fleet
//! router); token budgets, which must hold exactly, live in the store instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        let capacity = per_minute as f64;
        Bucket {
            capacity,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, per_minute: u64, now: Instant) {
        // A changed limit (the key was re-created with the same id) takes effect at once.
        self.capacity = per_minute as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / 60.0).min(self.capacity);
        self.last = now;
    }

    /// Takes `amount` (capped at the capacity, so a request larger than a minute's worth can
    /// still pass once the bucket is full), or says how long until it could.
    fn take(&mut self, amount: f64) -> Result<(), Duration> {
        let amount = amount.min(self.capacity);
        if self.level >= amount {
            self.level -= amount;
            return Ok(());
        }
        let rate_per_sec = self.capacity / 60.0;
        if rate_per_sec <= 0.0 {
            return Err(Duration::from_secs(60));
        }
        Err(Duration::from_secs_f64(
            (amount - self.level) / rate_per_sec,
        ))
    }

    fn give_back(&mut self, amount: f64) {
        self.level = (self.level + amount).min(self.capacity);
    }
}

#[derive(Debug, Default)]
struct KeyBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// The buckets of every key seen by this process.
#[derive(Debug, Default)]
pub struct RateLimiter {
    keys: Mutex<HashMap<String, KeyBuckets>>,
}

/// Which bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Requests,
    Tokens,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        RateLimiter::default()
    }

    /// Takes `amount` from `key`'s bucket of the given kind, limited to `per_minute`; on
    /// refusal, the whole seconds to wait (at least 1).
    pub(crate) fn take(
        &self,
        key: &str,
        which: Which,
        per_minute: u64,
        amount: u64,
        now: Instant,
    ) -> Result<(), u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let buckets = keys.entry(key.to_owned()).or_default();
        let slot = match which {
            Which::Requests => &mut buckets.requests,
            Which::Tokens => &mut buckets.tokens,
        };
        let bucket = slot.get_or_insert_with(|| Bucket::new(per_minute, now));
        bucket.refill(per_minute, now);
        bucket
            .take(amount as f64)
            .map_err(|wait| wait.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Returns `amount` to `key`'s bucket (a reservation larger than what was used).
    pub(crate) fn give_back(&self, key: &str, which: Which, amount: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buckets) = keys.get_mut(key) {
            let slot = match which {
                Which::Requests => &mut buckets.requests,
                Which::Tokens => &mut buckets.tokens,
            };
            if let Some(bucket) = slot {
                bucket.give_back(amount as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refills_with_time() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("k", Which::Requests, 3, 1, t0).is_ok());
        }
        // Three per minute: one comes back every 20 s.
        assert_eq!(limiter.take("k", Which::Requests, 3, 1, t0), Err(20));
        let later = t0 + Duration::from_secs(20);
        assert!(limiter.take("k", Which::Requests, 3, 1, later).is_ok());
        assert!(limiter.take("k", Which::Requests, 3, 1, later).is_err());
        // Other keys and other kinds have their own buckets.
        assert!(limiter.take("other", Which::Requests, 3, 1, t0).is_ok());
        assert!(limiter.take("k", Which::Tokens, 100, 100, t0).is_ok());
    }

    #[test]
    fn oversized_requests_pass_on_a_full_bucket_and_refunds_return() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        assert!(limiter.take("k", Which::Tokens, 60, 500, t0).is_ok());
        assert_eq!(limiter.take("k", Which::Tokens, 60, 30, t0), Err(30));
        limiter.give_back("k", Which::Tokens, 30);
        assert!(limiter.take("k", Which::Tokens, 60, 30, t0).is_ok());
    }
}
