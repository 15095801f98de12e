//! Prefix-cache affinity: which upstream last saw each prompt's leading blocks.
//!
//! A prompt is cut into blocks of a fixed number of bytes; block `i`'s hash is chained over
//! blocks `0..=i`, so equal hashes mean equal prefixes. The index remembers, for each
//! upstream, the block hashes of the prompts routed to it (least recently routed forgotten
//! first, a bounded number per upstream), and [`PrefixIndex::matches`] tells how many leading
//! blocks of a new prompt each upstream holds. The router's index is its guess of the
//! replicas' prefix caches, as llm-d's and the inference extension's prefix scorers guess.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::sync::Mutex;

/// The chained hashes of the whole blocks of `text`.
pub fn block_hashes(text: &[u8], block_bytes: usize) -> Vec<u64> {
    let block_bytes = block_bytes.max(1);
    let mut previous = 0u64;
    text.chunks_exact(block_bytes)
        .map(|block| {
            // SipHash with fixed keys: the same on every router replica.
            let mut h = std::hash::DefaultHasher::new();
            h.write_u64(previous);
            h.write(block);
            previous = h.finish();
            previous
        })
        .collect()
}

#[derive(Debug, Default)]
struct PerUpstream {
    /// hash → when it was last routed here.
    stamps: HashMap<u64, u64>,
    /// when → hash, oldest first.
    order: BTreeMap<u64, u64>,
    /// Prompt blocks routed here, and how many of them were leading blocks it held already.
    blocks_routed: u64,
    blocks_held: u64,
}

#[derive(Debug, Default)]
struct Inner {
    clock: u64,
    upstreams: HashMap<String, PerUpstream>,
    /// hash → the upstreams that hold it.
    holders: HashMap<u64, Vec<String>>,
}

/// The index (one lock; every operation is linear in the prompt's blocks).
#[derive(Debug)]
pub struct PrefixIndex {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl PrefixIndex {
    /// An index that remembers at most `capacity` blocks per upstream.
    pub fn new(capacity: usize) -> Self {
        PrefixIndex {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records that a prompt of these block hashes went to `upstream`; returns how many of
    /// its leading blocks `upstream` held already (the prompt's hits in its prefix cache, as
    /// far as the router can tell).
    pub fn insert(&self, upstream: &str, hashes: &[u64]) -> usize {
        let Ok(mut inner) = self.inner.lock() else {
            return 0;
        };
        let inner = &mut *inner;
        let per = inner.upstreams.entry(upstream.to_owned()).or_default();
        let mut first_missing = hashes.len();
        // Stamped last block first: when blocks must go, a prompt's tail goes before its head,
        // which is what every longer prompt shares.
        for (i, &hash) in hashes.iter().enumerate().rev() {
            inner.clock += 1;
            let now = inner.clock;
            match per.stamps.insert(hash, now) {
                Some(old) => {
                    per.order.remove(&old);
                }
                None => {
                    first_missing = i;
                    inner
                        .holders
                        .entry(hash)
                        .or_default()
                        .push(upstream.to_owned());
                }
            }
            per.order.insert(now, hash);
        }
        per.blocks_routed = per.blocks_routed.saturating_add(hashes.len() as u64);
        per.blocks_held = per.blocks_held.saturating_add(first_missing as u64);
        while per.stamps.len() > self.capacity {
            let Some((_, oldest)) = per.order.pop_first() else {
                break;
            };
            per.stamps.remove(&oldest);
            if let Some(holders) = inner.holders.get_mut(&oldest) {
                holders.retain(|h| h != upstream);
                if holders.is_empty() {
                    inner.holders.remove(&oldest);
                }
            }
        }
        first_missing
    }

    /// The share of the prompt blocks routed to `upstream` that it held already (leading
    /// blocks only), or `None` before any prompt block went there.
    pub fn hit_rate(&self, upstream: &str) -> Option<f64> {
        let inner = self.inner.lock().ok()?;
        let per = inner.upstreams.get(upstream)?;
        (per.blocks_routed > 0).then(|| per.blocks_held as f64 / per.blocks_routed as f64)
    }

    /// For each upstream holding the first block: how many leading blocks it holds.
    pub fn matches(&self, hashes: &[u64]) -> HashMap<String, usize> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let Ok(inner) = self.inner.lock() else {
            return counts;
        };
        for (i, hash) in hashes.iter().enumerate() {
            let Some(holders) = inner.holders.get(hash) else {
                break;
            };
            let mut advanced = false;
            for holder in holders {
                let count = counts.entry(holder.clone()).or_insert(0);
                if *count == i {
                    *count = i + 1;
                    advanced = true;
                }
            }
            if !advanced {
                break;
            }
        }
        counts.retain(|_, c| *c > 0);
        counts
    }

    /// Forgets an upstream that left the pool.
    pub fn remove(&self, upstream: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        if let Some(per) = inner.upstreams.remove(upstream) {
            for hash in per.stamps.keys() {
                if let Some(holders) = inner.holders.get_mut(hash) {
                    holders.retain(|h| h != upstream);
                    if holders.is_empty() {
                        inner.holders.remove(hash);
                    }
                }
            }
        }
    }

    /// The upstreams it remembers blocks for.
    pub fn upstreams(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.upstreams.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Blocks remembered for `upstream`.
    pub fn len(&self, upstream: &str) -> usize {
        self.inner
            .lock()
            .map(|i| i.upstreams.get(upstream).map_or(0, |p| p.stamps.len()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a = block_hashes(b"aaaabbbbcccc", 4);
        let b = block_hashes(b"aaaabbbbdddd", 4);
        let c = block_hashes(b"xxxxbbbbcccc", 4);
        assert_eq!(a.len(), 3);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // Same block, other prefix: another hash.
        assert_ne!(a[1], c[1]);
        assert_eq!(block_hashes(b"abc", 4), Vec::<u64>::new());
    }

    #[test]
    fn leading_blocks_are_counted_per_upstream() {
        let index = PrefixIndex::new(100);
        let long = block_hashes(&[7u8; 64], 4);
        let other = block_hashes(&[9u8; 64], 4);
        index.insert("a", &long[..10]);
        index.insert("b", &long[..4]);
        index.insert("c", &other);
        let m = index.matches(&long);
        assert_eq!(m.get("a"), Some(&10));
        assert_eq!(m.get("b"), Some(&4));
        assert_eq!(m.get("c"), None);
        // Only leading blocks count: a prompt diverging at block 0 matches nothing.
        assert!(index.matches(&other[..1]).keys().all(|k| k == "c"));
        index.remove("a");
        assert_eq!(index.matches(&long).get("a"), None);
        let mut upstreams = index.upstreams();
        upstreams.sort();
        assert_eq!(upstreams, ["b", "c"]);
    }

    #[test]
    fn least_recently_routed_blocks_are_forgotten_first() {
        let index = PrefixIndex::new(8);
        let first = block_hashes(&[1u8; 32], 4);
        let second = block_hashes(&[2u8; 32], 4);
        index.insert("a", &first);
        assert_eq!(index.len("a"), 8);
        index.insert("a", &second[..4]);
        assert_eq!(index.len("a"), 8);
        // The first prompt's tail went; its head still matches.
        assert_eq!(index.matches(&first).get("a"), Some(&4));
        assert_eq!(index.matches(&second).get("a"), Some(&4));
    }

    #[test]
    fn hits_are_the_leading_blocks_held_when_routed() {
        let index = PrefixIndex::new(100);
        let long = block_hashes(&[3u8; 40], 4);
        assert_eq!(index.hit_rate("a"), None);
        assert_eq!(index.insert("a", &long[..4]), 0);
        assert_eq!(index.hit_rate("a"), Some(0.0));
        // The next turn extends the first: its 4 leading blocks were held, 6 were new.
        assert_eq!(index.insert("a", &long), 4);
        assert_eq!(index.hit_rate("a"), Some(4.0 / 14.0));
        // A block held further in does not count when an earlier one is missing.
        let mut gap = long.clone();
        gap[0] = 42;
        assert_eq!(index.insert("a", &gap), 0);
        assert_eq!(index.hit_rate("a"), Some(4.0 / 24.0));
        assert_eq!(index.hit_rate("b"), None);
    }
}
