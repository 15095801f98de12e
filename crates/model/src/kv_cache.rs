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
///
/// Sliding-window layers (Gemma 3's local layers, Mistral's) have blocks of their own, the
/// pool's window blocks, with a table of their own per sequence
/// ([`crate::SeqChunk::window_table`]): a sequence needs only the window blocks that hold its
/// last `window` positions, so its owner can give the older ones back, and a long sequence's
/// memory grows with the full-attention layers only. A pool made by [`KvPool::new`] has as
/// many window blocks as blocks, and sequences may use one table for both.
#[derive(Debug)]
pub struct KvPool {
    n_layers: usize,
    kv_dim: usize,
    block_tokens: usize,
    n_blocks: usize,
    n_window_blocks: usize,
    /// Per layer: does it use the window blocks.
    windowed: Vec<bool>,
    /// Latent attention: the values are the keys' first `kv_lora_rank` elements, so only
    /// keys are stored (`v` is empty) and the attention reads them as values too.
    shared_values: bool,
    k: Vec<KvData>,
    v: Vec<KvData>,
}

/// How a pool stores keys and values (`--kv-cache-type`): f16 (llama.cpp's default) or
/// Q8_0 (i8 values and one f16 scale per 32, 34 bytes per 32 instead of 64: 53%). Models
/// whose weights are all f32 ([`LlamaConfig::kv_f32`]) keep f32 whatever is asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 16-bit floats.
    #[default]
    F16,
    /// ggml's Q8_0 blocks, split into values and scales.
    Q8_0,
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("unknown KV cache type {other:?} (f16, q8_0)")),
        }
    }
}

/// One layer's keys (or values), at the precision the model asks for.
#[derive(Debug)]
enum KvData {
    F16(Vec<f16>),
    F32(Vec<f32>),
    /// Values, and one scale per 32 values (a head's 32-element blocks: head sizes are
    /// multiples of 32).
    Q8(Vec<i8>, Vec<f16>),
}

impl KvData {
    fn zeros(len: usize, f32: bool, ty: KvType) -> Self {
        if f32 {
            KvData::F32(vec![0.0; len])
        } else if ty == KvType::Q8_0 {
            KvData::Q8(vec![0; len], vec![f16::ZERO; len / QK])
        } else {
            KvData::F16(vec![f16::ZERO; len])
        }
    }

    /// Zero-filled up to `len` elements (never shorter).
    fn grow(&mut self, len: usize) {
        match self {
            KvData::F16(v) => v.resize(len.max(v.len()), f16::ZERO),
            KvData::F32(v) => v.resize(len.max(v.len()), 0.0),
            KvData::Q8(v, d) => {
                v.resize(len.max(v.len()), 0);
                d.resize(v.len() / QK, f16::ZERO);
            }
        }
    }

    fn view(&self) -> KvSlice<'_> {
        match self {
            KvData::F16(v) => KvSlice::F16(v),
            KvData::F32(v) => KvSlice::F32(v),
            KvData::Q8(v, d) => KvSlice::Q8(v, d),
        }
    }
}

/// Elements per Q8_0 block.
const QK: usize = 32;

/// A layer's keys or values as the attention reads them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KvSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
    /// Values and scales (scale `e / 32` for element `e`).
    Q8(&'a [i8], &'a [f16]),
}

impl KvPool {
    /// A pool of `n_blocks` blocks of `block_tokens` positions each, for a model of this shape;
    /// its windowed layers have as many blocks (one block table serves both).
    pub fn new(
        config: &LlamaConfig,
        block_tokens: usize,
        n_blocks: usize,
    ) -> Result<Self, ModelError> {
        Self::with_window_blocks(config, block_tokens, n_blocks, n_blocks)
    }

    /// A pool of `n_blocks` blocks for the full-attention layers and `n_window_blocks` for the
    /// sliding-window layers (ignored when the model has none).
    pub fn with_window_blocks(
        config: &LlamaConfig,
        block_tokens: usize,
        n_blocks: usize,
        n_window_blocks: usize,
    ) -> Result<Self, ModelError> {
        Self::typed(config, block_tokens, n_blocks, n_window_blocks, KvType::F16)
    }

    /// [`KvPool::with_window_blocks`] storing keys and values as `ty` (f32 models keep
    /// f32). Q8_0 needs head sizes that are multiples of 32.
    pub fn typed(
        config: &LlamaConfig,
        block_tokens: usize,
        n_blocks: usize,
        n_window_blocks: usize,
        ty: KvType,
    ) -> Result<Self, ModelError> {
        let ty = if config.kv_f32 { KvType::F16 } else { ty };
        if ty == KvType::Q8_0 && !config.head_dim.is_multiple_of(QK) {
            return Err(ModelError::BadConfig(format!(
                "a Q8_0 KV cache needs a head size that is a multiple of {QK}, not {}",
                config.head_dim
            )));
        }
        let windowed: Vec<bool> = (0..config.n_layers)
            .map(|l| config.layer_attention(l).window.is_some())
            .collect();
        let n_windowed = windowed.iter().filter(|&&w| w).count();
        let n_window_blocks = if n_windowed == 0 { 0 } else { n_window_blocks };
        if block_tokens == 0 || n_blocks == 0 || (n_windowed > 0 && n_window_blocks == 0) {
            return Err(ModelError::BadConfig(
                "a KV pool needs at least one block of at least one token".into(),
            ));
        }
        let elems = |blocks: usize| {
            blocks
                .checked_mul(block_tokens)
                .and_then(|n| n.checked_mul(config.kv_dim()))
        };
        let too_large = || {
            ModelError::BadConfig(format!(
                "a KV pool of {n_blocks} blocks ({n_window_blocks} for windowed layers) x \
                 {block_tokens} tokens is too large"
            ))
        };
        let (global, local) = (
            elems(n_blocks).ok_or_else(too_large)?,
            elems(n_window_blocks).ok_or_else(too_large)?,
        );
        let total = global
            .saturating_mul(config.n_layers - n_windowed)
            .saturating_add(local.saturating_mul(n_windowed))
            .saturating_mul(copies(config) * bytes_per_32(config.kv_f32, ty))
            / QK;
        if total > MAX_POOL_BYTES {
            return Err(too_large());
        }
        let shared_values = config.mla.is_some();
        let data = |empty: bool| {
            windowed
                .iter()
                .map(|&w| {
                    let len = if empty {
                        0
                    } else if w {
                        local
                    } else {
                        global
                    };
                    KvData::zeros(len, config.kv_f32, ty)
                })
                .collect()
        };
        Ok(Self {
            n_layers: config.n_layers,
            kv_dim: config.kv_dim(),
            block_tokens,
            n_blocks,
            n_window_blocks,
            k: data(false),
            v: data(shared_values),
            windowed,
            shared_values,
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

    /// Blocks of the sliding-window layers (0 when the model has none).
    pub fn n_window_blocks(&self) -> usize {
        self.n_window_blocks
    }

    /// Whether `layer` keeps its keys and values in the window blocks.
    pub fn is_windowed(&self, layer: usize) -> bool {
        self.windowed.get(layer).copied().unwrap_or(false)
    }

    /// Bytes of key and value storage.
    pub fn bytes(&self) -> usize {
        self.bytes_with(self.n_blocks, self.n_window_blocks)
    }

    /// Bytes of key and value storage with this many blocks (saturating).
    fn bytes_with(&self, n_blocks: usize, n_window_blocks: usize) -> usize {
        let per_32 = match self.k.first() {
            Some(KvData::F32(_)) => bytes_per_32(true, KvType::F16),
            Some(KvData::Q8(..)) => bytes_per_32(false, KvType::Q8_0),
            _ => bytes_per_32(false, KvType::F16),
        };
        let n_windowed = self.windowed.iter().filter(|&&w| w).count();
        let block_elems = self.block_tokens * self.kv_dim;
        let blocks = (self.n_layers - n_windowed)
            .saturating_mul(n_blocks)
            .saturating_add(n_windowed.saturating_mul(n_window_blocks));
        let copies: usize = if self.shared_values { 1 } else { 2 };
        copies
            .saturating_mul(blocks)
            .saturating_mul(block_elems)
            .saturating_mul(per_32)
            / QK
    }

    /// Adds zeroed blocks after the last: `n_blocks` in all, `n_window_blocks` for the
    /// windowed layers (ignored when there are none). Blocks already there keep their
    /// numbers and contents.
    fn grow(&mut self, n_blocks: usize, n_window_blocks: usize) -> Result<(), ModelError> {
        let n_window_blocks = if self.windowed.contains(&true) {
            n_window_blocks
        } else {
            0
        };
        if n_blocks < self.n_blocks || n_window_blocks < self.n_window_blocks {
            return Err(ModelError::BadConfig(format!(
                "a KV pool of {} blocks ({} windowed) cannot shrink to {n_blocks} ({n_window_blocks})",
                self.n_blocks, self.n_window_blocks
            )));
        }
        if self.bytes_with(n_blocks, n_window_blocks) > MAX_POOL_BYTES {
            return Err(ModelError::BadConfig(format!(
                "a KV pool of {n_blocks} blocks x {} tokens is too large",
                self.block_tokens
            )));
        }
        let block_elems = self.block_tokens * self.kv_dim;
        let copies = if self.shared_values { 1 } else { 2 };
        for data in [&mut self.k, &mut self.v].into_iter().take(copies) {
            for (d, &w) in data.iter_mut().zip(&self.windowed) {
                d.grow(block_elems * if w { n_window_blocks } else { n_blocks });
            }
        }
        self.n_blocks = n_blocks;
        self.n_window_blocks = n_window_blocks;
        Ok(())
    }

    /// How this pool stores keys and values.
    pub fn kv_type(&self) -> KvType {
        match self.k.first() {
            Some(KvData::Q8(..)) => KvType::Q8_0,
            _ => KvType::F16,
        }
    }

    /// Bytes one cached token costs in every layer (keys and values).
    pub fn bytes_per_token(config: &LlamaConfig) -> usize {
        copies(config) * config.n_layers * config.kv_dim() * elem_bytes(config)
    }

    /// Bytes one cached token costs in the full-attention layers only: what a long
    /// sequence's memory grows by per token when its windowed layers hold only their window.
    pub fn bytes_per_token_global(config: &LlamaConfig) -> usize {
        copies(config) * config.n_global_layers() * config.kv_dim() * elem_bytes(config)
    }

    /// Bytes of keys and values a sequence of `n_tokens` holds: in every layer when
    /// `windowed_release` is false; otherwise its windowed layers hold only the blocks of its
    /// last `window` positions (as the engine keeps them), at `block_tokens` per block.
    pub fn sequence_bytes(
        config: &LlamaConfig,
        n_tokens: usize,
        block_tokens: usize,
        windowed_release: bool,
    ) -> usize {
        let bt = block_tokens.max(1);
        let blocks = n_tokens.div_ceil(bt);
        let per_block_layer = copies(config) * bt * config.kv_dim() * elem_bytes(config);
        (0..config.n_layers)
            .map(|l| match config.layer_attention(l).window {
                Some(w) if windowed_release && n_tokens > 0 => {
                    // The blocks from the one holding position n - w (the next token sees
                    // n + 1 - w onwards) to the last.
                    let first = (n_tokens + 1).saturating_sub(w) / bt;
                    (blocks - first.min(blocks)) * per_block_layer
                }
                _ => blocks * per_block_layer,
            })
            .sum()
    }

    pub(crate) fn check_shape(&self, config: &LlamaConfig) -> Result<(), ModelError> {
        let f32 = matches!(self.k.first(), Some(KvData::F32(_)));
        let windowed_layers = (0..config.n_layers)
            .all(|l| self.is_windowed(l) == config.layer_attention(l).window.is_some());
        if self.n_layers != config.n_layers
            || self.kv_dim != config.kv_dim()
            || !windowed_layers
            || self.shared_values != config.mla.is_some()
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

    /// Stores one position's keys and values (f32, `kv_dim` each) for `layer`; a pool of
    /// latent attention stores the keys only (`v` is ignored).
    pub(crate) fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        let kv_dim = self.kv_dim;
        let pairs = [(&mut self.k[layer], k), (&mut self.v[layer], v)];
        let n = if self.shared_values { 1 } else { 2 };
        for (dst, src) in pairs.into_iter().take(n) {
            match dst {
                KvData::F16(dst) => {
                    for (d, &s) in dst[at..at + kv_dim].iter_mut().zip(src) {
                        *d = f16::from_f32(s);
                    }
                }
                KvData::F32(dst) => dst[at..at + kv_dim].copy_from_slice(&src[..kv_dim]),
                KvData::Q8(q, d) => {
                    // ggml's `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d).
                    let (q, d) = (&mut q[at..at + kv_dim], &mut d[at / QK..(at + kv_dim) / QK]);
                    for ((qb, xb), d) in q.chunks_exact_mut(QK).zip(src.chunks_exact(QK)).zip(d) {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let scale = amax / 127.0;
                        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                        for (o, &x) in qb.iter_mut().zip(xb) {
                            *o = round_half_away(x * inv).clamp(-127, 127) as i8;
                        }
                        *d = f16::from_f32(scale);
                    }
                }
            }
        }
    }

    /// All keys of `layer` (index with [`KvPool::offset`]).
    pub(crate) fn keys(&self, layer: usize) -> KvSlice<'_> {
        self.k[layer].view()
    }

    /// All values of `layer`, laid out like [`KvPool::keys`].
    pub(crate) fn values(&self, layer: usize) -> KvSlice<'_> {
        if self.shared_values {
            return self.k[layer].view();
        }
        self.v[layer].view()
    }
}

/// `roundf` (halves away from zero) for |v| < 2^23, without a libm call: the truncation is
/// exact, and so is the fraction left.
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

/// How many vectors a cached position keeps per layer: keys and values, or for latent
/// attention the latent alone.
fn copies(config: &LlamaConfig) -> usize {
    if config.mla.is_some() { 1 } else { 2 }
}

/// Bytes of one cached f16 (or f32) element.
fn elem_bytes(config: &LlamaConfig) -> usize {
    bytes_per_32(config.kv_f32, KvType::F16) / QK
}

/// Bytes of 32 cached elements.
fn bytes_per_32(f32: bool, ty: KvType) -> usize {
    match (f32, ty) {
        (true, _) => 4 * QK,
        (false, KvType::F16) => 2 * QK,
        (false, KvType::Q8_0) => QK + 2,
    }
}

/// The cache of a single sequence: a [`KvPool`] whose blocks all belong to it, in order. The
/// simple interface for one sequence at a time (tests, `generate`); servers use the pool and
/// [`crate::LlamaModel::forward_batch`] directly.
///
/// Sliding-window layers keep a ring of window blocks: position `p`'s block is
/// `(p / block_tokens) % ring`, with enough blocks in the ring for a window plus one chunk of
/// [`KvCache::MAX_CHUNK`] tokens (the forward pass splits longer inputs), so a chunk never
/// overwrites a position one of its own rows still reads.
#[derive(Debug)]
pub struct KvCache {
    pool: KvPool,
    table: Vec<u32>,
    /// The ring of window blocks, one entry per block of `table`; empty when the windowed
    /// layers use `table` (no window, or a ring would not be smaller).
    window_table: Vec<u32>,
    capacity: usize,
    len: usize,
}

/// Block size of a single-sequence cache.
const SINGLE_BLOCK_TOKENS: usize = 16;

impl KvCache {
    /// The most tokens one forward pass writes into a cache whose windowed layers keep a ring.
    pub const MAX_CHUNK: usize = 512;

    /// An empty cache for a model of this shape holding at most `capacity` tokens.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Result<Self, ModelError> {
        if capacity == 0 || capacity > config.context_length {
            return Err(ModelError::BadConfig(format!(
                "KV cache capacity {capacity} must be in 1..={}",
                config.context_length
            )));
        }
        let n_blocks = capacity.div_ceil(SINGLE_BLOCK_TOKENS);
        let (pool, window_table) = match Self::ring(config) {
            Some(ring) if ring < n_blocks => (
                KvPool::with_window_blocks(config, SINGLE_BLOCK_TOKENS, n_blocks, ring)?,
                (0..n_blocks).map(|b| (b % ring) as u32).collect(),
            ),
            _ => (
                KvPool::new(config, SINGLE_BLOCK_TOKENS, n_blocks)?,
                Vec::new(),
            ),
        };
        Ok(Self {
            pool,
            table: (0..n_blocks as u32).collect(),
            window_table,
            capacity,
            len: 0,
        })
    }

    /// Blocks in the ring of the windowed layers: a window plus a chunk (`None` without
    /// windowed layers).
    fn ring(config: &LlamaConfig) -> Option<usize> {
        config
            .sliding_window
            .map(|w| (w + Self::MAX_CHUNK).div_ceil(SINGLE_BLOCK_TOKENS) + 1)
    }

    /// Makes room for `capacity` tokens (no effect if there is), keeping every cached token:
    /// blocks are added after the last, the cached keys and values stay where they are,
    /// and the windowed layers keep (or, once the cache is larger than their ring, start)
    /// a ring of window blocks, as [`KvCache::new`] makes them. `config` must be the one
    /// the cache was made for. A forward pass continues as if the cache had been made at
    /// `capacity`.
    ///
    /// # Errors
    ///
    /// A capacity beyond the model's context, or a cache too large to hold.
    pub fn grow(&mut self, config: &LlamaConfig, capacity: usize) -> Result<(), ModelError> {
        self.pool.check_shape(config)?;
        if capacity <= self.capacity {
            return Ok(());
        }
        if capacity > config.context_length {
            return Err(ModelError::BadConfig(format!(
                "KV cache capacity {capacity} must be in 1..={}",
                config.context_length
            )));
        }
        let n_blocks = capacity.div_ceil(SINGLE_BLOCK_TOKENS);
        match Self::ring(config) {
            // Without a ring so far the windowed layers used blocks 0..n (n <= ring), which
            // are their own ring slots.
            Some(ring) if ring < n_blocks => {
                self.pool.grow(n_blocks, ring)?;
                self.window_table = (0..n_blocks).map(|b| (b % ring) as u32).collect();
            }
            _ => self.pool.grow(n_blocks, n_blocks)?,
        }
        self.table = (0..n_blocks as u32).collect();
        self.capacity = capacity;
        Ok(())
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

    /// Bytes of key and value storage the cache holds.
    pub fn bytes(&self) -> usize {
        self.pool.bytes()
    }

    /// Forgets every token.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` tokens (no effect if it holds fewer). With a ring, the
    /// windowed layers' older positions are gone, so only a truncation that keeps the last
    /// [`KvCache::MAX_CHUNK`] tokens' window is exact; callers that rewind further clear.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The most tokens one forward pass may add (the whole capacity without a ring).
    pub(crate) fn max_chunk(&self) -> usize {
        if self.window_table.is_empty() {
            usize::MAX
        } else {
            Self::MAX_CHUNK
        }
    }

    pub(crate) fn parts(&mut self) -> (&mut KvPool, &[u32], &[u32], usize) {
        (&mut self.pool, &self.table, &self.window_table, self.len)
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_half_away_is_roundf() {
        for i in -300_000..300_000 {
            let v = i as f32 * 0.000_43 + 0.25 * (i % 7) as f32;
            assert_eq!(super::round_half_away(v), v.round() as i32, "{v}");
        }
        for v in [
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            126.5,
            -126.5,
            0.499_999_97,
            -0.499_999_97,
            0.0,
        ] {
            assert_eq!(super::round_half_away(v), v.round() as i32, "{v}");
        }
    }
}
