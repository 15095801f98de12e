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

    /// Records that a prompt of these block hashes went to `upstream`.
    pub fn insert(&self, upstream: &str, hashes: &[u64]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        let per = inner.upstreams.entry(upstream.to_owned()).or_default();
        // Stamped last block first: when blocks must go, a prompt's tail goes before its head,
        // which is what every longer prompt shares.
        for &hash in hashes.iter().rev() {
            inner.clock += 1;
            let now = inner.clock;
            match per.stamps.insert(hash, now) {
                Some(old) => {
                    per.order.remove(&old);
                }
                None => inner
                    .holders
                    .entry(hash)
                    .or_default()
                    .push(upstream.to_owned()),
            }
            per.order.insert(now, hash);
        }
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
}
