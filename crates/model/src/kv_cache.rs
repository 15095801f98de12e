use crate::{LlamaConfig, ModelError};
use kernels::f16;

/// Keys and values of one sequence, for every layer, stored as f16 as llama.cpp stores them.
///
/// Layout per layer: position-major, `[pos][kv_head][head_dim]`, so appending a token writes
/// one contiguous run and attention reads each head's keys with a fixed stride. Memory grows
/// with the sequence (amortised doubling) up to `capacity` tokens, so a long context costs
/// nothing until it is used.
#[derive(Debug)]
pub struct KvCache {
    n_layers: usize,
    kv_dim: usize,
    capacity: usize,
    len: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvCache {
    /// An empty cache for a model of this shape holding at most `capacity` tokens.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Result<Self, ModelError> {
        if capacity == 0 || capacity > config.context_length {
            return Err(ModelError::BadConfig(format!(
                "KV cache capacity {capacity} must be in 1..={}",
                config.context_length
            )));
        }
        Ok(Self {
            n_layers: config.n_layers,
            kv_dim: config.kv_dim(),
            capacity,
            len: 0,
            k: vec![Vec::new(); config.n_layers],
            v: vec![Vec::new(); config.n_layers],
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

    /// Forgets every token, keeping the memory for the next sequence.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` tokens (no effect if it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
                layer.truncate(len * self.kv_dim);
            }
        }
    }

    pub(crate) fn check_shape(&self, config: &LlamaConfig) -> Result<(), ModelError> {
        if self.n_layers != config.n_layers || self.kv_dim != config.kv_dim() {
            return Err(ModelError::CacheMismatch);
        }
        Ok(())
    }

    pub(crate) fn check_room(&self, adding: usize) -> Result<(), ModelError> {
        if self
            .len
            .checked_add(adding)
            .is_none_or(|n| n > self.capacity)
        {
            return Err(ModelError::ContextFull {
                cached: self.len,
                adding,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Appends keys and values (`n_tokens × kv_dim`, f32) for `layer`. Called once per layer
    /// per forward pass; the sequence length advances in [`KvCache::commit`].
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let start = self.len * self.kv_dim;
        for (cache, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            cache.truncate(start);
            cache.extend(src.iter().map(|&x| f16::from_f32(x)));
        }
    }

    /// Keys of `layer` for positions `0..n`, position-major.
    pub(crate) fn keys(&self, layer: usize) -> &[f16] {
        &self.k[layer]
    }

    /// Values of `layer`, laid out like [`KvCache::keys`].
    pub(crate) fn values(&self, layer: usize) -> &[f16] {
        &self.v[layer]
    }

    /// Records that `n` appended tokens are now part of the sequence.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
}
