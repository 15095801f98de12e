//! The KV block manager: which blocks of the model's [`model::KvPool`] are free, who holds
//! which (reference counts), and the prefix cache.
//!
//! A block that a sequence has filled completely is registered under a hash chained over
//! every token from the start of the sequence to the end of the block, so a later request
//! that begins with the same tokens (the same system prompt, the next turn of a chat) finds
//! those blocks and skips computing them. Only full blocks are ever shared, so a sequence
//! never writes into a block another one reads. When no sequence holds a cached block it
//! stays cached but evictable, least recently used first.
//!
//! Models with sliding-window layers get a second manager over the pool's window blocks
//! (see `Scheduler::window`): a sequence holds only the window blocks its window still
//! reaches, and gives the older ones back (to the prefix cache, evictable), so its memory
//! grows with the full-attention layers only.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

#[derive(Clone, Debug, Default)]
struct Block {
    refs: u32,
    /// Set while the block is in the prefix cache.
    cached: Option<CachedBlock>,
    last_used: u64,
}

#[derive(Clone, Debug)]
struct CachedBlock {
    hash: u64,
    /// The block's own tokens, compared on lookup so that a hash collision cannot hand one
    /// sequence another's keys and values.
    tokens: Vec<u32>,
}

/// Free list, reference counts and prefix cache over `n_blocks` blocks.
#[derive(Debug)]
pub(crate) struct BlockManager {
    block_tokens: usize,
    blocks: Vec<Block>,
    /// Blocks with no holder and no cached content.
    free: Vec<u32>,
    /// Cached blocks with no holder, by (last use, id): the eviction order.
    evictable: BTreeSet<(u64, u32)>,
    by_hash: HashMap<u64, u32>,
    tick: u64,
    in_use: usize,
}

/// The hash of a block given the hash of the blocks before it.
pub(crate) fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The start of a prefix chain (the hash "before" the first block).
pub(crate) const CHAIN_ROOT: u64 = 0x736f_7576_6572_6169;

impl BlockManager {
    pub(crate) fn new(n_blocks: usize, block_tokens: usize) -> Self {
        Self {
            block_tokens,
            blocks: vec![Block::default(); n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            evictable: BTreeSet::new(),
            by_hash: HashMap::new(),
            tick: 0,
            in_use: 0,
        }
    }

    pub(crate) fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub(crate) fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks some sequence holds.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Blocks that [`BlockManager::allocate`] can hand out now (free or evictable).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A block for exclusive writing, evicting the least recently used cached block when no
    /// free one is left.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(c) = self.blocks[id as usize].cached.take() {
                    self.by_hash.remove(&c.hash);
                }
                id
            }
        };
        let tick = self.touch();
        let b = &mut self.blocks[id as usize];
        b.refs = 1;
        b.last_used = tick;
        self.in_use += 1;
        Some(id)
    }

    /// Drops one hold on `id`; a block nobody holds becomes free, or evictable if cached.
    pub(crate) fn release(&mut self, id: u32) {
        let tick = self.touch();
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.refs > 0, "release of an unheld block");
        b.refs = b.refs.saturating_sub(1);
        if b.refs == 0 {
            self.in_use -= 1;
            b.last_used = tick;
            if b.cached.is_some() {
                self.evictable.insert((tick, id));
            } else {
                self.free.push(id);
            }
        }
    }

    /// The longest run of cached blocks that holds `tokens` from the start, each now held
    /// once more by the caller. Only whole blocks match.
    pub(crate) fn match_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut parent = CHAIN_ROOT;
        for chunk in tokens.chunks_exact(self.block_tokens) {
            let hash = chain_hash(parent, chunk);
            let Some(id) = self.hold_cached(hash, chunk) else {
                break;
            };
            out.push(id);
            parent = hash;
        }
        out
    }

    /// The cached block registered under `hash` with these `tokens`, now held once more by
    /// the caller; `None` when no such block is cached. (The window blocks of a prefix: only
    /// the last ones a new sequence's window reaches are looked up, by their chained hash.)
    pub(crate) fn hold_cached(&mut self, hash: u64, tokens: &[u32]) -> Option<u32> {
        let &id = self.by_hash.get(&hash)?;
        let b = &self.blocks[id as usize];
        if b.cached.as_ref().is_none_or(|c| c.tokens != tokens) {
            return None;
        }
        if b.refs == 0 {
            self.evictable.remove(&(b.last_used, id));
            self.in_use += 1;
        }
        let tick = self.touch();
        let b = &mut self.blocks[id as usize];
        b.refs += 1;
        b.last_used = tick;
        Some(id)
    }

    /// How many blocks from the start of `tokens` are cached, given their chained hashes
    /// (`chain[i]` is block `i`'s; blocks past the end of `chain` are not looked at). Takes
    /// no hold and changes no recency: it only answers what [`BlockManager::match_prefix`]
    /// would find now, without hashing the tokens again.
    pub(crate) fn cached_run(&self, chain: &[u64], tokens: &[u32]) -> usize {
        chain
            .iter()
            .zip(tokens.chunks_exact(self.block_tokens))
            .take_while(|&(hash, chunk)| {
                self.by_hash.get(hash).is_some_and(|&id| {
                    self.blocks[id as usize]
                        .cached
                        .as_ref()
                        .is_some_and(|c| c.tokens == chunk)
                })
            })
            .count()
    }

    /// Records that block `id` (held by the caller) is full with `tokens`, whose chained
    /// hash is `hash`. If another block already caches the same prefix, this one stays
    /// private.
    pub(crate) fn register(&mut self, id: u32, hash: u64, tokens: &[u32]) {
        if self.by_hash.contains_key(&hash) || self.blocks[id as usize].cached.is_some() {
            return;
        }
        self.by_hash.insert(hash, id);
        self.blocks[id as usize].cached = Some(CachedBlock {
            hash,
            tokens: tokens.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let mut parent = CHAIN_ROOT;
        let mut ids = Vec::new();
        for chunk in tokens.chunks_exact(m.block_tokens()) {
            let id = m.allocate().expect("block");
            parent = chain_hash(parent, chunk);
            m.register(id, parent, chunk);
            ids.push(id);
        }
        ids
    }

    #[test]
    fn prefixes_are_shared_and_counted() {
        let mut m = BlockManager::new(8, 4);
        let a: Vec<u32> = (0..12).collect();
        let ids = fill(&mut m, &a);
        assert_eq!(m.in_use(), 3);
        // Same first two blocks, different third.
        let mut b = a.clone();
        b[9] = 99;
        let shared = m.match_prefix(&b);
        assert_eq!(shared, ids[..2]);
        assert_eq!(m.in_use(), 3);
        // A prefix differing in the first block shares nothing.
        assert!(m.match_prefix(&[7; 12]).is_empty());
        for id in ids.iter().chain(&shared) {
            m.release(*id);
        }
        assert_eq!(m.in_use(), 0);
        assert_eq!(m.available(), 8);
        // Cached blocks survive release and are found again.
        assert_eq!(m.match_prefix(&a), ids);
    }

    #[test]
    fn eviction_is_least_recently_used_and_forgets_the_hash() {
        let mut m = BlockManager::new(2, 2);
        let x = fill(&mut m, &[1, 2]);
        let y = fill(&mut m, &[3, 4]);
        m.release(x[0]);
        m.release(y[0]);
        assert!(m.allocate().is_some()); // evicts x, used least recently
        assert!(m.match_prefix(&[1, 2]).is_empty());
        assert_eq!(m.match_prefix(&[3, 4]), y);
        assert_eq!(m.allocate(), None);
    }

    #[test]
    fn cached_run_agrees_with_match_prefix_and_takes_no_hold() {
        let mut m = BlockManager::new(8, 4);
        let a: Vec<u32> = (0..12).collect();
        fill(&mut m, &a[..8]);
        let mut chain = Vec::new();
        let mut parent = CHAIN_ROOT;
        for chunk in a.chunks_exact(4) {
            parent = chain_hash(parent, chunk);
            chain.push(parent);
        }
        let in_use = m.in_use();
        assert_eq!(m.cached_run(&chain, &a), 2);
        assert_eq!(m.in_use(), in_use);
        assert_eq!(m.cached_run(&chain[..1], &a), 1);
        // Same hashes, other tokens: nothing matches.
        assert_eq!(m.cached_run(&chain, &[9; 12]), 0);
        assert_eq!(m.match_prefix(&a).len(), 2);
    }

    #[test]
    fn hold_cached_finds_one_block_by_its_hash() {
        let mut m = BlockManager::new(4, 2);
        let ids = fill(&mut m, &[1, 2, 3, 4]);
        let second = chain_hash(chain_hash(CHAIN_ROOT, &[1, 2]), &[3, 4]);
        m.release(ids[1]);
        assert_eq!(m.in_use(), 1);
        // Evictable, found again and held; other tokens under the hash are not.
        assert_eq!(m.hold_cached(second, &[3, 4]), Some(ids[1]));
        assert_eq!(m.in_use(), 2);
        assert_eq!(m.hold_cached(second, &[3, 5]), None);
        assert_eq!(m.hold_cached(7, &[3, 4]), None);
    }

    #[test]
    fn a_hash_collision_cannot_share_wrong_tokens() {
        let mut m = BlockManager::new(4, 2);
        let id = m.allocate().expect("block");
        // Register block `id` with tokens [5, 6] under the hash that [1, 2] would have.
        let forged = chain_hash(CHAIN_ROOT, &[1, 2]);
        m.register(id, forged, &[5, 6]);
        assert!(m.match_prefix(&[1, 2]).is_empty());
    }
}
