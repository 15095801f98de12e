use crate::{LlamaConfig, ModelError};
use kernels::f16;

/// Most bytes a KV pool may take (a guard against absurd budgets, not a tuning knob).
const MAX_POOL_BYTES: usize = 1 << 40;

/// Keys and values of many sequences, stored as f16 (as llama.cpp stores them) or, for models
/// whose weights are all f32 ([`LlamaConfig::kv_f32`]), as f32, in fixed-size blocks of
/// `block_tokens` positions.
///
/// Layout per layer: `[block][slot][kv_head][head_dim]`, so a block is one contiguous run and a
/// sequence is a list of block ids (its block table): position `p` lives in block
/// `table[p / block_tokens]`, slot `p % block_tokens`. The pool knows nothing of which block
/// belongs to whom; the engine's block manager decides that (free list, reference counts,
/// prefix sharing).
#[derive(Debug)]
pub struct KvPool {
    n_layers: usize,
    kv_dim: usize,
    block_tokens: usize,
    n_blocks: usize,
    k: Vec<KvData>,
    v: Vec<KvData>,
}

/// One layer's keys (or values), at the precision the model asks for.
#[derive(Debug)]
enum KvData {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvData {
    fn zeros(len: usize, f32: bool) -> Self {
        if f32 {
            KvData::F32(vec![0.0; len])
        } else {
            KvData::F16(vec![f16::ZERO; len])
        }
    }

    fn view(&self) -> KvSlice<'_> {
        match self {
            KvData::F16(v) => KvSlice::F16(v),
            KvData::F32(v) => KvSlice::F32(v),
        }
    }
}

/// A layer's keys or values as the attention reads them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KvSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvPool {
    /// A pool of `n_blocks` blocks of `block_tokens` positions each, for a model of this shape.
    pub fn new(
        config: &LlamaConfig,
        block_tokens: usize,
        n_blocks: usize,
    ) -> Result<Self, ModelError> {
        if block_tokens == 0 || n_blocks == 0 {
            return Err(ModelError::BadConfig(
                "a KV pool needs at least one block of at least one token".into(),
            ));
        }
        let per_layer = n_blocks
            .checked_mul(block_tokens)
            .and_then(|n| n.checked_mul(config.kv_dim()))
            .filter(|&n| {
                n.saturating_mul(2 * elem_bytes(config) * config.n_layers) <= MAX_POOL_BYTES
            })
            .ok_or_else(|| {
                ModelError::BadConfig(format!(
                    "a KV pool of {n_blocks} blocks x {block_tokens} tokens is too large"
                ))
            })?;
        Ok(Self {
            n_layers: config.n_layers,
            kv_dim: config.kv_dim(),
            block_tokens,
            n_blocks,
            k: (0..config.n_layers)
                .map(|_| KvData::zeros(per_layer, config.kv_f32))
                .collect(),
            v: (0..config.n_layers)
                .map(|_| KvData::zeros(per_layer, config.kv_f32))
                .collect(),
        })
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in the pool.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Bytes of key and value storage.
    pub fn bytes(&self) -> usize {
        let elem = match self.k.first() {
            Some(KvData::F32(_)) => 4,
            _ => 2,
        };
        2 * self.n_layers * self.n_blocks * self.block_tokens * self.kv_dim * elem
    }

    /// Bytes one cached token costs (keys and values of every layer).
    pub fn bytes_per_token(config: &LlamaConfig) -> usize {
        2 * config.n_layers * config.kv_dim() * elem_bytes(config)
    }

    pub(crate) fn check_shape(&self, config: &LlamaConfig) -> Result<(), ModelError> {
        let f32 = matches!(self.k.first(), Some(KvData::F32(_)));
        if self.n_layers != config.n_layers
            || self.kv_dim != config.kv_dim()
            || (self.n_layers > 0 && f32 != config.kv_f32)
        {
            return Err(ModelError::CacheMismatch);
        }
        Ok(())
    }

    /// Index of position `pos`'s first element in a layer's storage.
    pub(crate) fn offset(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / self.block_tokens] as usize;
        (block * self.block_tokens + pos % self.block_tokens) * self.kv_dim
    }

    /// Stores one position's keys and values (f32, `kv_dim` each) for `layer`.
    pub(crate) fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        let kv_dim = self.kv_dim;
        for (dst, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            match dst {
                KvData::F16(dst) => {
                    for (d, &s) in dst[at..at + kv_dim].iter_mut().zip(src) {
                        *d = f16::from_f32(s);
                    }
                }
                KvData::F32(dst) => dst[at..at + kv_dim].copy_from_slice(&src[..kv_dim]),
            }
        }
    }

    /// All keys of `layer` (index with [`KvPool::offset`]).
    pub(crate) fn keys(&self, layer: usize) -> KvSlice<'_> {
        self.k[layer].view()
    }

    /// All values of `layer`, laid out like [`KvPool::keys`].
    pub(crate) fn values(&self, layer: usize) -> KvSlice<'_> {
        self.v[layer].view()
    }
}

/// Bytes of one cached element.
fn elem_bytes(config: &LlamaConfig) -> usize {
    if config.kv_f32 { 4 } else { 2 }
}

/// The cache of a single sequence: a [`KvPool`] whose blocks all belong to it, in order. The
/// simple interface for one sequence at a time (tests, `generate`); servers use the pool and
/// [`crate::LlamaModel::forward_batch`] directly.
#[derive(Debug)]
pub struct KvCache {
    pool: KvPool,
    table: Vec<u32>,
    capacity: usize,
    len: usize,
}

/// Block size of a single-sequence cache.
const SINGLE_BLOCK_TOKENS: usize = 16;

impl KvCache {
    /// An empty cache for a model of this shape holding at most `capacity` tokens.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Result<Self, ModelError> {
        if capacity == 0 || capacity > config.context_length {
            return Err(ModelError::BadConfig(format!(
                "KV cache capacity {capacity} must be in 1..={}",
                config.context_length
            )));
        }
        let n_blocks = capacity.div_ceil(SINGLE_BLOCK_TOKENS);
        let pool = KvPool::new(config, SINGLE_BLOCK_TOKENS, n_blocks)?;
        Ok(Self {
            pool,
            table: (0..n_blocks as u32).collect(),
            capacity,
            len: 0,
        })
    }

    /// Tokens currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every token.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` tokens (no effect if it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn parts(&mut self) -> (&mut KvPool, &[u32], usize) {
        (&mut self.pool, &self.table, self.len)
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
}
