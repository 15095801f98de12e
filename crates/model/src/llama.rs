//! The Llama architecture as GGUF describes it (`general.architecture = llama`), which also
//! covers the Mistral family (sliding-window attention; Mixtral's mixture of experts) and
//! Gemma 3 (`gemma3`), from GGUF or safetensors: token embeddings (scaled by
//! `embedding_scale`), then per block RMSNorm → grouped-query attention with RoPE (queries and
//! keys RMS-normalised per head first when `qk_norm`; the layer's own RoPE base and window) →
//! [RMSNorm when `post_norms`] → residual → RMSNorm → gated MLP (SiLU or GELU; or experts,
//! `moe.rs`) → [RMSNorm] → residual, then a final RMSNorm and the output head (tied to the
//! embeddings when `output.weight` is absent). Gemma's differences are data on the config and
//! the blocks, read by this one forward pass.

use std::sync::Arc;

use gguf::GgufFile;
use kernels::{Rope, ThreadPool};

use crate::attention::{self, Heads, Row};
use crate::moe::{Ffn, Mlp, Routing};
use crate::weights::{Storage, Tensors, Weight};
use crate::{Activation, KvCache, KvPool, LlamaConfig, ModelError};

/// Which positions' logits [`LlamaModel::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`vocab_size` values): what generation needs.
    Last,
    /// Every token's (`n_tokens × vocab_size`), e.g. to score a prompt.
    All,
    /// None: a prompt chunk that does not end the prompt.
    None,
}

/// Weights of one transformer block. Shapes are `rows × cols` (GGUF dims `[cols, rows]`).
#[derive(Debug)]
struct Block {
    attn_norm: Vec<f32>, // d_model
    attn: AttnWeights,
    wo: Weight,         // d_model × q_dim (latent attention: × n_heads · v_head_dim)
    ffn_norm: Vec<f32>, // d_model
    ffn: Ffn,           // gated MLP or experts of ffn_dim
    /// Per-head RMSNorm weights of queries and keys (`qk_norm`), head_dim each.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Biases of the query, key and value projections (`attn_bias`): q_dim, kv_dim, kv_dim.
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// RMSNorm weights of the attention's and the MLP's outputs (`post_norms`), d_model each.
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    /// This layer's rotation (its own RoPE base), built once at load.
    rope: Rope,
    /// `Some(w)`: a sliding-window layer.
    window: Option<usize>,
}

/// A block's attention projections.
#[derive(Debug)]
enum AttnWeights {
    /// Grouped-query attention.
    Gqa {
        wq: Weight, // q_dim × d_model
        wk: Weight, // kv_dim × d_model
        wv: Weight, // kv_dim × d_model
    },
    /// Multi-head latent attention ([`crate::Mla`]).
    Mla(MlaWeights),
}

/// The projections of latent attention (llama.cpp's names).
#[derive(Debug)]
struct MlaWeights {
    /// Queries of every head, `[nope | rope]` each (n_heads · qk_head_dim rows).
    q: MlaQuery,
    /// `attn_kv_a_mqa`: the latent and the shared rotated key ((kv_lora_rank + rope) × d_model).
    kv_a: Weight,
    /// `attn_kv_a_norm`: RMSNorm of the latent (kv_lora_rank).
    kv_norm: Vec<f32>,
    /// `attn_k_b`, per head: kv_lora_rank × qk_nope (absorbs a head's query into the latent).
    k_b: Vec<Weight>,
    /// `attn_v_b`, per head: v_head_dim × kv_lora_rank (a head's value from the latent).
    v_b: Vec<Weight>,
}

#[derive(Debug)]
enum MlaQuery {
    /// `attn_q` (DeepSeek-V2-Lite).
    Full(Weight),
    /// `attn_q_a` (q_lora_rank × d_model) → RMSNorm `attn_q_a_norm` → `attn_q_b`.
    LowRank {
        a: Weight,
        norm: Vec<f32>,
        b: Weight,
    },
}

impl Block {
    /// Repacks the block's matrices for the packed kernel where this CPU has one.
    fn pack(&mut self, store: &Storage) -> Result<(), ModelError> {
        let attn: Vec<&mut Weight> = match &mut self.attn {
            AttnWeights::Gqa { wq, wk, wv } => vec![wq, wk, wv],
            AttnWeights::Mla(m) => {
                let q: Vec<&mut Weight> = match &mut m.q {
                    MlaQuery::Full(w) => vec![w],
                    MlaQuery::LowRank { a, b, .. } => vec![a, b],
                };
                q.into_iter()
                    .chain([&mut m.kv_a])
                    .chain(m.k_b.iter_mut())
                    .chain(m.v_b.iter_mut())
                    .collect()
            }
        };
        for w in attn.into_iter().chain([&mut self.wo]) {
            w.pack(store)?;
        }
        self.ffn.pack(store)
    }
}

/// A loaded Llama-family model. Holds no per-request state.
#[derive(Debug)]
pub struct LlamaModel {
    store: Storage,
    config: LlamaConfig,
    token_embd: Weight, // vocab × d_model
    output_norm: Vec<f32>,
    output: Weight, // vocab × d_model (the embeddings when tied)
    blocks: Vec<Block>,
    /// GELU through ggml's f16 table (GGUF models, whose oracle is llama.cpp) or exact
    /// (safetensors, whose oracle is transformers in float32).
    gelu_f16_table: bool,
}

/// Per-call scratch buffers, sized for `n` tokens.
struct Scratch {
    x: Vec<f32>,    // n × d_model, the residual stream
    xn: Vec<f32>,   // n × d_model, normalised input of the current sub-layer
    q: Vec<f32>,    // n × q_dim (latent attention: the absorbed queries)
    k: Vec<f32>,    // n × kv_dim
    v: Vec<f32>,    // n × kv_dim
    attn: Vec<f32>, // n × q_dim, attention output before wo
    proj: Vec<f32>, // n × d_model, output of wo / the MLP
}

impl LlamaModel {
    /// Builds the model from a validated GGUF file, checking every tensor's presence, shape
    /// and type. `progress(done, total)` is called once per tensor while the weights are
    /// paged in from the file.
    pub fn load(
        file: Arc<GgufFile>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file)?;
        Self::from_tensors(Tensors::from_gguf(file), config, progress)
    }

    /// Builds the model from a table of GGUF-named tensors (from a GGUF file or renamed from
    /// safetensors), checking every tensor's presence, shape and type.
    pub(crate) fn from_tensors(
        tensors: Tensors,
        config: LlamaConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let c = &config;
        let d = c.d_model as u64;
        let t = &tensors;
        let total = t.index.len();
        let mut done = 0usize;
        let mut step = |name: &str| {
            t.prefault(name);
            done += 1;
            progress(done.min(total), total);
        };
        let token_embd = t.weight("token_embd.weight", [d, c.vocab_size as u64])?;
        step("token_embd.weight");
        // Every RMSNorm weight, with Gemma's `1 + w` applied where the file stores `w`.
        let norm = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let mut w = t.vector(name, len)?;
            if c.norm_weight_offset != 0.0 {
                w.iter_mut().for_each(|x| *x += c.norm_weight_offset);
            }
            Ok(w)
        };
        let output_norm = norm("output_norm.weight", c.d_model)?;
        step("output_norm.weight");
        let mut output = if t.has("output.weight") {
            step("output.weight");
            t.weight("output.weight", [d, c.vocab_size as u64])?
        } else {
            token_embd.clone()
        };
        // Tied or not, the head is a matmul of its own (the embeddings are read by row).
        output.pack(&t.storage)?;
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let (q, kv) = (c.q_dim() as u64, c.kv_dim() as u64);
            let mlp = |gate: &str, up: &str, down: &str, f: u64| -> Result<Mlp, ModelError> {
                Ok(Mlp {
                    gate: t.weight(&name(gate), [d, f])?,
                    up: t.weight(&name(up), [d, f])?,
                    down: t.weight(&name(down), [f, d])?,
                })
            };
            let ffn = if !c.is_moe_layer(i) {
                Ffn::Dense(mlp("ffn_gate", "ffn_up", "ffn_down", c.ffn_dim as u64)?)
            } else {
                let (e, f) = (c.n_experts as u64, c.expert_ffn_dim() as u64);
                let experts = if t.has(&name("ffn_gate_up_exps")) {
                    // Gate and up fused per expert, gate rows first (Mistral Small 4's
                    // checkpoints, and llama.cpp's `ffn_gate_up_exps`).
                    let fused = t.stacked(&name("ffn_gate_up_exps"), [d, 2 * f, e])?;
                    let down = t.stacked(&name("ffn_down_exps"), [f, d, e])?;
                    fused
                        .into_iter()
                        .zip(down)
                        .map(|(w, down)| {
                            let (gate, up) = w.split_rows(f as usize)?;
                            Ok(Mlp { gate, up, down })
                        })
                        .collect::<Result<Vec<_>, ModelError>>()?
                } else if t.has(&name("ffn_gate_exps")) {
                    // Stacked 3-D tensors, as current llama.cpp writes them.
                    let gate = t.stacked(&name("ffn_gate_exps"), [d, f, e])?;
                    let up = t.stacked(&name("ffn_up_exps"), [d, f, e])?;
                    let down = t.stacked(&name("ffn_down_exps"), [f, d, e])?;
                    gate.into_iter()
                        .zip(up)
                        .zip(down)
                        .map(|((gate, up), down)| Mlp { gate, up, down })
                        .collect()
                } else {
                    // One tensor per expert (older GGUF files; renamed safetensors).
                    (0..c.n_experts)
                        .map(|x| {
                            let name = |t: &str| format!("blk.{i}.{t}.{x}.weight");
                            Ok(Mlp {
                                gate: t.weight(&name("ffn_gate"), [d, f])?,
                                up: t.weight(&name("ffn_up"), [d, f])?,
                                down: t.weight(&name("ffn_down"), [f, d])?,
                            })
                        })
                        .collect::<Result<Vec<_>, ModelError>>()?
                };
                let renormalize = c.moe_renormalize;
                let (routing, shared) = match c.experts {
                    None => (Routing::Softmax { renormalize }, None),
                    Some(design) => {
                        let bias_name = format!("blk.{i}.exp_probs_b.bias");
                        let bias = if t.has(&bias_name) {
                            Some(t.vector(&bias_name, c.n_experts)?)
                        } else {
                            None
                        };
                        let shared = if design.n_shared > 0 {
                            let w = f * design.n_shared as u64;
                            Some(mlp("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", w)?)
                        } else {
                            None
                        };
                        let routing = Routing::DeepSeek {
                            design,
                            renormalize,
                            bias,
                        };
                        (routing, shared)
                    }
                };
                Ffn::Experts {
                    router: t.weight(&name("ffn_gate_inp"), [d, e])?,
                    experts,
                    n_used: c.n_experts_used,
                    routing,
                    shared,
                }
            };
            let attention = c.layer_attention(i);
            let (attn, wo_cols) = match &c.mla {
                None => (
                    AttnWeights::Gqa {
                        wq: t.weight(&name("attn_q"), [d, q])?,
                        wk: t.weight(&name("attn_k"), [d, kv])?,
                        wv: t.weight(&name("attn_v"), [d, kv])?,
                    },
                    q,
                ),
                Some(m) => {
                    let nh = c.n_heads as u64;
                    let (rank, nope, vd) = (
                        m.kv_lora_rank as u64,
                        m.qk_nope_dim as u64,
                        m.v_head_dim as u64,
                    );
                    let qk = nh * m.qk_head_dim(c.rope_dim) as u64;
                    let q = match m.q_lora_rank {
                        None => MlaQuery::Full(t.weight(&name("attn_q"), [d, qk])?),
                        Some(r) => MlaQuery::LowRank {
                            a: t.weight(&name("attn_q_a"), [d, r as u64])?,
                            norm: norm(&name("attn_q_a_norm"), r)?,
                            b: t.weight(&name("attn_q_b"), [r as u64, qk])?,
                        },
                    };
                    let weights = MlaWeights {
                        q,
                        kv_a: t.weight(&name("attn_kv_a_mqa"), [d, rank + c.rope_dim as u64])?,
                        kv_norm: norm(&name("attn_kv_a_norm"), m.kv_lora_rank)?,
                        k_b: t.stacked(&name("attn_k_b"), [nope, rank, nh])?,
                        v_b: t.stacked(&name("attn_v_b"), [rank, vd, nh])?,
                    };
                    (AttnWeights::Mla(weights), nh * vd)
                }
            };
            let mut block = Block {
                attn_norm: norm(&name("attn_norm"), c.d_model)?,
                attn,
                wo: t.weight(&name("attn_output"), [wo_cols, d])?,
                ffn_norm: norm(&name("ffn_norm"), c.d_model)?,
                ffn,
                qk_norm: if c.qk_norm {
                    Some((
                        norm(&name("attn_q_norm"), c.head_dim)?,
                        norm(&name("attn_k_norm"), c.head_dim)?,
                    ))
                } else {
                    None
                },
                qkv_bias: if c.attn_bias {
                    let bias = |t_name: &str, len: u64| {
                        t.vector(&format!("blk.{i}.{t_name}.bias"), len as usize)
                    };
                    Some([bias("attn_q", q)?, bias("attn_k", kv)?, bias("attn_v", kv)?])
                } else {
                    None
                },
                post_norms: if c.post_norms {
                    Some((
                        norm(&name("post_attention_norm"), c.d_model)?,
                        norm(&name("post_ffw_norm"), c.d_model)?,
                    ))
                } else {
                    None
                },
                rope: c.layer_rope(i),
                window: attention.window,
            };
            block.pack(&t.storage)?;
            let prefix = format!("blk.{i}.");
            let mut names: Vec<&String> =
                t.index.keys().filter(|k| k.starts_with(&prefix)).collect();
            names.sort();
            for n in names {
                step(n);
            }
            blocks.push(block);
        }
        let gelu_f16_table = matches!(tensors.storage, Storage::Gguf(_));
        Ok(Self {
            store: tensors.storage,
            gelu_f16_table,
            config,
            token_embd,
            output_norm,
            output,
            blocks,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The GGUF file the weights live in (its metadata carries the tokenizer), if they come
    /// from one.
    pub fn file(&self) -> Option<&Arc<GgufFile>> {
        match &self.store {
            Storage::Gguf(file) => Some(file),
            Storage::Safetensors(_) => None,
        }
    }

    /// An empty KV cache for up to `capacity` tokens of one sequence.
    pub fn new_kv_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config, capacity)
    }

    fn matrix(&self, w: &Weight) -> Result<kernels::Matrix<'_>, ModelError> {
        self.store.matrix(w)
    }

    /// Runs `tokens` (appended after what `kv` holds) through the model, extends `kv`, and
    /// returns logits as `which` asks. On error the cache is left as it was.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        tokens: &[u32],
        kv: &mut KvCache,
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if kv.len() + tokens.len() > kv.capacity() {
            return Err(ModelError::ContextFull {
                cached: kv.len(),
                adding: tokens.len(),
                capacity: kv.capacity(),
            });
        }
        // Checked before any piece runs, so that a failure cannot come after a piece has
        // overwritten the windowed layers' ring.
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange {
                token: bad,
                vocab_size: vocab,
            });
        }
        // A cache whose windowed layers keep a ring takes at most `max_chunk` tokens a pass.
        let pieces: Vec<&[u32]> = tokens.chunks(kv.max_chunk().min(tokens.len())).collect();
        let mut logits = Vec::new();
        let start = kv.len();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let (kv_pool, table, window_table, start_pos) = kv.parts();
            let chunk = SeqChunk {
                tokens: piece,
                start_pos,
                block_table: table,
                logits: match which {
                    Logits::Last if !last => Logits::None,
                    other => other,
                },
                window_table,
            };
            match self.forward_batch(pool, kv_pool, &[chunk]) {
                Ok(mut out) => {
                    let piece_logits = out.pop().unwrap_or_default();
                    if logits.is_empty() {
                        // The usual case (one piece, or only the last asked): no copy.
                        logits = piece_logits;
                    } else {
                        logits.extend_from_slice(&piece_logits);
                    }
                }
                Err(e) => {
                    // Leave the cache as it was before this call.
                    kv.truncate(start);
                    return Err(e);
                }
            }
            kv.commit(piece.len());
        }
        Ok(logits)
    }

    /// One step for many sequences at once: every chunk's tokens go through each weight
    /// matrix in a single matrix-matrix product (the weights are read once per step, not
    /// once per sequence); attention reads each sequence's own blocks. Each chunk writes keys
    /// and values for positions `start_pos..start_pos + tokens.len()` into the blocks its
    /// table names; the caller must make sure no two chunks write the same block slot and
    /// that the blocks holding earlier positions are filled. Returns each chunk's logits as it
    /// asked (empty for [`Logits::None`]).
    pub fn forward_batch(
        &self,
        pool: &ThreadPool,
        kv: &mut KvPool,
        chunks: &[SeqChunk<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let plan = BatchPlan::new(c, kv, chunks)?;
        let n = plan.len();
        if n == 0 {
            return Ok(chunks.iter().map(|_| Vec::new()).collect());
        }
        let mut s = Scratch::new(c, n);
        self.embed(&plan, &mut s.x)?;
        let f16_table = self.gelu_f16_table;
        let glu = |gate: &mut [f32], up: &[f32], width: usize| {
            par_rows(pool, gate, width, &|r0, g| {
                let u = &up[r0 * width..][..g.len()];
                match c.activation {
                    Activation::Silu => kernels::swiglu(g, u),
                    Activation::GeluTanh => kernels::geglu_tanh(g, u, f16_table),
                }
            })
        };
        // Each row's attention temperature (the same in every layer).
        let temperature: Option<Vec<f32>> = c
            .attn_temperature
            .map(|t| plan.positions.iter().map(|&p| t.factor(p)).collect());
        for (layer, b) in self.blocks.iter().enumerate() {
            // Attention sub-layer.
            rms_norm_rows(pool, &s.x, &b.attn_norm, c.rms_eps, c.d_model, &mut s.xn);
            let (wq, wk, wv) = match &b.attn {
                AttnWeights::Gqa { wq, wk, wv } => (wq, wk, wv),
                AttnWeights::Mla(m) => {
                    let temperature = temperature.as_deref();
                    self.mla_attention(pool, m, b, kv, layer, &plan, &mut s, temperature)?;
                    add_rows(pool, &mut s.x, &s.proj, c.d_model);
                    self.mlp_sublayer(pool, b, &mut s, n, &glu)?;
                    continue;
                }
            };
            let mut qkv = [(wq, &mut s.q[..]), (wk, &mut s.k[..]), (wv, &mut s.v[..])];
            self.store.matmul_many(pool, &mut qkv, &s.xn, n)?;
            if let Some([bq, bk, bv]) = &b.qkv_bias {
                for (out, bias) in [(&mut s.q, bq), (&mut s.k, bk), (&mut s.v, bv)] {
                    out.chunks_exact_mut(bias.len()).for_each(|row| {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    });
                }
            }
            if let Some((q_norm, k_norm)) = &b.qk_norm {
                rms_norm_in_place(pool, &mut s.q, q_norm, c.rms_eps);
                rms_norm_in_place(pool, &mut s.k, k_norm, c.rms_eps);
            }
            rope_and_cache(pool, c, b, kv, layer, &plan, &mut s);
            if let Some(factors) = &temperature {
                for (q, &f) in s.q.chunks_exact_mut(c.q_dim()).zip(factors) {
                    if f != 1.0 {
                        q.iter_mut().for_each(|x| *x *= f);
                    }
                }
            }
            attention(pool, c, kv, layer, b.window, &plan, &s.q, &mut s.attn);
            self.store.matmul(pool, &b.wo, &s.attn, n, &mut s.proj)?;
            if let Some((post_attn, _)) = &b.post_norms {
                rms_norm_in_place(pool, &mut s.proj, post_attn, c.rms_eps);
            }
            add_rows(pool, &mut s.x, &s.proj, c.d_model);
            self.mlp_sublayer(pool, b, &mut s, n, &glu)?;
        }
        self.head(pool, &plan, &mut s)
    }

    /// The MLP sub-layer: down(act(gate(x)) * up(x)), or a mixture of such experts, added to
    /// the residual stream.
    fn mlp_sublayer(
        &self,
        pool: &ThreadPool,
        b: &Block,
        s: &mut Scratch,
        n: usize,
        glu: crate::moe::Glu<'_>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        rms_norm_rows(pool, &s.x, &b.ffn_norm, c.rms_eps, c.d_model, &mut s.xn);
        b.ffn
            .forward(pool, &self.store, &s.xn, n, c.d_model, &mut s.proj, glu)?;
        if let Some((_, post_ffn)) = &b.post_norms {
            rms_norm_in_place(pool, &mut s.proj, post_ffn, c.rms_eps);
        }
        add_rows(pool, &mut s.x, &s.proj, c.d_model);
        Ok(())
    }

    /// Multi-head latent attention of the normalised rows `s.xn` into `s.proj` (after the
    /// output projection), as llama.cpp's absorbed path computes it: each row caches its
    /// normalised latent and its rotated shared key (`[latent | k_pe]`, one head of
    /// `kv_lora_rank + rope_dim`); each query head `[q_nope | q_pe]` becomes
    /// `[k_b·q_nope | rope(q_pe)]`, which attends over the cached rows as keys and, through
    /// their first `kv_lora_rank` values, as values (the pool stores them once); the
    /// weighted latent goes through the head's `v_b`, and the heads through `attn_output`.
    #[allow(clippy::too_many_arguments)]
    fn mla_attention(
        &self,
        pool: &ThreadPool,
        m: &MlaWeights,
        b: &Block,
        kv: &mut KvPool,
        layer: usize,
        plan: &BatchPlan<'_>,
        s: &mut Scratch,
        temperature: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let shape = c.mla.ok_or(ModelError::CacheMismatch)?;
        let n = plan.len();
        let (nh, rank, rope) = (c.n_heads, shape.kv_lora_rank, c.rope_dim);
        let (nope, vd, hd) = (shape.qk_nope_dim, shape.v_head_dim, c.head_dim);
        let qk = nope + rope;
        let mut q = vec![0.0; n * nh * qk];
        match &m.q {
            MlaQuery::Full(wq) => {
                let mut outs = [(wq, &mut q[..]), (&m.kv_a, &mut s.k[..])];
                self.store.matmul_many(pool, &mut outs, &s.xn, n)?;
            }
            MlaQuery::LowRank { a, norm, b: wb } => {
                let mut qa = vec![0.0; n * a.rows];
                let mut outs = [(a, &mut qa[..]), (&m.kv_a, &mut s.k[..])];
                self.store.matmul_many(pool, &mut outs, &s.xn, n)?;
                rms_norm_in_place(pool, &mut qa, norm, c.rms_eps);
                self.store.matmul(pool, wb, &qa, n, &mut q)?;
            }
        }
        // The latent normalised, the shared key rotated, both cached.
        let mut tmp = vec![0.0; rank];
        let offsets = plan.offsets_of(kv.is_windowed(layer));
        for ((row, &pos), &at) in s.k.chunks_exact_mut(hd).zip(&plan.positions).zip(offsets) {
            let (latent, pe) = row.split_at_mut(rank);
            kernels::rms_norm(latent, &m.kv_norm, c.rms_eps, &mut tmp);
            latent.copy_from_slice(&tmp);
            b.rope.apply(pos, pe);
            kv.write(layer, at, row, &[]);
        }
        // Absorbed queries, head by head: [k_b · q_nope | rope(q_pe)].
        let mut gathered = vec![0.0; n * nope];
        let mut absorbed = vec![0.0; n * rank];
        for (h, k_b) in m.k_b.iter().enumerate() {
            for (g, row) in gathered.chunks_exact_mut(nope).zip(q.chunks_exact(nh * qk)) {
                g.copy_from_slice(&row[h * qk..][..nope]);
            }
            self.store.matmul(pool, k_b, &gathered, n, &mut absorbed)?;
            for r in 0..n {
                let dst = &mut s.q[(r * nh + h) * hd..][..hd];
                dst[..rank].copy_from_slice(&absorbed[r * rank..][..rank]);
                dst[rank..].copy_from_slice(&q[(r * nh + h) * qk + nope..][..rope]);
                b.rope.apply(plan.positions[r], &mut dst[rank..]);
            }
        }
        if let Some(factors) = temperature {
            for (row, &f) in s.q.chunks_exact_mut(c.q_dim()).zip(factors) {
                if f != 1.0 {
                    row.iter_mut().for_each(|x| *x *= f);
                }
            }
        }
        attention(pool, c, kv, layer, b.window, plan, &s.q, &mut s.attn);
        // Each head's weighted latent through its v_b, then the output projection.
        let mut heads = vec![0.0; n * nh * vd];
        let mut value = vec![0.0; n * vd];
        let latent = &mut absorbed;
        for (h, v_b) in m.v_b.iter().enumerate() {
            for (l, row) in latent
                .chunks_exact_mut(rank)
                .zip(s.attn.chunks_exact(nh * hd))
            {
                l.copy_from_slice(&row[h * hd..][..rank]);
            }
            self.store.matmul(pool, v_b, latent, n, &mut value)?;
            for (dst, v) in heads.chunks_exact_mut(nh * vd).zip(value.chunks_exact(vd)) {
                dst[h * vd..][..vd].copy_from_slice(v);
            }
        }
        self.store.matmul(pool, &b.wo, &heads, n, &mut s.proj)?;
        Ok(())
    }

    /// Embeddings: one row of the table, dequantised, per batch row (times
    /// `embedding_scale`).
    fn embed(&self, plan: &BatchPlan<'_>, x: &mut [f32]) -> Result<(), ModelError> {
        let embd = self.matrix(&self.token_embd)?;
        let scale = self.config.embedding_scale;
        for (r, row) in x.chunks_exact_mut(self.config.d_model).enumerate() {
            let t = plan.token(r) as usize;
            kernels::dequantize_row(embd.ty(), embd.row(t), row)?;
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    /// Final norm and output head, only for the rows whose logits were asked for; returns
    /// each chunk's logits (empty where none were asked for).
    fn head(
        &self,
        pool: &ThreadPool,
        plan: &BatchPlan<'_>,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let wanted = plan.logit_rows();
        let mut out: Vec<Vec<f32>> = plan.chunks.iter().map(|_| Vec::new()).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let m = wanted.len();
        let xn = &mut s.xn[..m * c.d_model];
        for (&r, o) in wanted.iter().zip(xn.chunks_exact_mut(c.d_model)) {
            let x = &s.x[r * c.d_model..(r + 1) * c.d_model];
            kernels::rms_norm(x, &self.output_norm, c.rms_eps, o);
        }
        let mut logits = vec![0.0; m * c.vocab_size];
        self.store.matmul(pool, &self.output, xn, m, &mut logits)?;
        // One chunk asked (every decode step of a single sequence): its logits are the
        // buffer itself, not a copy (a vocabulary of 262,144 is a megabyte a token).
        let first = plan.rows[wanted[0]].0;
        if wanted.iter().all(|&r| plan.rows[r].0 == first) {
            out[first] = logits;
            return Ok(out);
        }
        for (&r, l) in wanted.iter().zip(logits.chunks_exact(c.vocab_size)) {
            out[plan.rows[r].0].extend_from_slice(l);
        }
        Ok(out)
    }
}

/// RoPE (the block's own) on every row's queries and keys at the row's position, then the
/// row's key and value into its cache slot of `layer` (its window block for a windowed layer).
fn rope_and_cache(
    pool: &ThreadPool,
    c: &LlamaConfig,
    b: &Block,
    kv: &mut KvPool,
    layer: usize,
    plan: &BatchPlan<'_>,
    s: &mut Scratch,
) {
    let (qd, kd) = (c.q_dim(), c.kv_dim());
    let rope = |x: &mut [f32], dim: usize| {
        par_rows(pool, x, dim, &|r0, rows| {
            for (i, row) in rows.chunks_exact_mut(dim).enumerate() {
                b.rope.apply(plan.positions[r0 + i], row);
            }
        })
    };
    rope(&mut s.q, qd);
    rope(&mut s.k, kd);
    let offsets = plan.offsets_of(kv.is_windowed(layer));
    for (r, &at) in offsets.iter().enumerate() {
        kv.write(
            layer,
            at,
            &s.k[r * kd..(r + 1) * kd],
            &s.v[r * kd..(r + 1) * kd],
        );
    }
}

impl Scratch {
    fn new(c: &LlamaConfig, n: usize) -> Self {
        Scratch {
            x: vec![0.0; n * c.d_model],
            xn: vec![0.0; n * c.d_model],
            q: vec![0.0; n * c.q_dim()],
            k: vec![0.0; n * c.kv_dim()],
            v: vec![0.0; n * c.kv_dim()],
            attn: vec![0.0; n * c.q_dim()],
            proj: vec![0.0; n * c.d_model],
        }
    }
}

/// The rows of a batched step, checked: row `r` is token `rows[r].1` of chunk `rows[r].0`,
/// at position `positions[r]`, cached at `offsets[r]` of the KV pool's full-attention layers
/// and at `window_offsets[r]` of its windowed layers.
struct BatchPlan<'a> {
    chunks: &'a [SeqChunk<'a>],
    rows: Vec<(usize, usize)>,
    positions: Vec<usize>,
    offsets: Vec<usize>,
    window_offsets: Vec<usize>,
}

impl<'a> BatchPlan<'a> {
    /// Lays out the rows of `chunks`, checking that every chunk's block table covers its
    /// positions inside `kv` and that every token is in the vocabulary.
    fn new(c: &LlamaConfig, kv: &KvPool, chunks: &'a [SeqChunk<'a>]) -> Result<Self, ModelError> {
        kv.check_shape(c)?;
        let bt = kv.block_tokens();
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (ci, ch) in chunks.iter().enumerate() {
            let end = ch.start_pos + ch.tokens.len();
            let needed = end.div_ceil(bt);
            if ch.block_table.len() < needed {
                return Err(ModelError::ContextFull {
                    cached: ch.start_pos,
                    adding: ch.tokens.len(),
                    capacity: ch.block_table.len() * bt,
                });
            }
            if let Some(&b) = ch.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= kv.n_blocks())
            {
                return Err(ModelError::BadConfig(format!(
                    "block {b} is outside the KV pool of {} blocks",
                    kv.n_blocks()
                )));
            }
            if kv.n_window_blocks() > 0 {
                // The windowed layers read back to `start_pos + 1 - window` and write to `end`,
                // in the window table (or the block table when a chunk gives none: then its
                // blocks must exist among the window blocks too).
                let window = c.sliding_window.unwrap_or(usize::MAX);
                let first = (ch.start_pos + 1).saturating_sub(window) / bt;
                let table = ch.window_blocks();
                if table.len() < needed {
                    return Err(ModelError::ContextFull {
                        cached: ch.start_pos,
                        adding: ch.tokens.len(),
                        capacity: table.len() * bt,
                    });
                }
                if let Some(&b) = table[first..needed]
                    .iter()
                    .find(|&&b| b as usize >= kv.n_window_blocks())
                {
                    return Err(ModelError::BadConfig(format!(
                        "window block {b} is outside the KV pool's {} window blocks",
                        kv.n_window_blocks()
                    )));
                }
            }
            if let Some(&bad) = ch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    token: bad,
                    vocab_size: c.vocab_size,
                });
            }
            rows.extend((0..ch.tokens.len()).map(|i| (ci, i)));
        }
        let positions: Vec<usize> = rows
            .iter()
            .map(|&(ci, i)| chunks[ci].start_pos + i)
            .collect();
        let offsets = rows
            .iter()
            .zip(&positions)
            .map(|(&(ci, _), &p)| kv.offset(chunks[ci].block_table, p))
            .collect();
        let window_offsets = rows
            .iter()
            .zip(&positions)
            .map(|(&(ci, _), &p)| kv.offset(chunks[ci].window_blocks(), p))
            .collect();
        Ok(Self {
            chunks,
            rows,
            positions,
            offsets,
            window_offsets,
        })
    }

    /// Every row's cache offset in a windowed layer or a full-attention one.
    fn offsets_of(&self, windowed: bool) -> &[usize] {
        if windowed {
            &self.window_offsets
        } else {
            &self.offsets
        }
    }

    /// Rows in the batch.
    fn len(&self) -> usize {
        self.rows.len()
    }

    /// The token of row `r`.
    fn token(&self, r: usize) -> u32 {
        let (ci, i) = self.rows[r];
        self.chunks[ci].tokens[i]
    }

    /// The block table of row `r`'s sequence, for a windowed layer or a full-attention one.
    fn block_table(&self, r: usize, windowed: bool) -> &'a [u32] {
        let chunk = &self.chunks[self.rows[r].0];
        if windowed {
            chunk.window_blocks()
        } else {
            chunk.block_table
        }
    }

    /// The rows whose logits their chunk asked for, in order.
    fn logit_rows(&self) -> Vec<usize> {
        let chunks = self.chunks;
        (0..self.len())
            .filter(|&r| {
                let (ci, i) = self.rows[r];
                match chunks[ci].logits {
                    Logits::All => true,
                    Logits::Last => i + 1 == chunks[ci].tokens.len(),
                    Logits::None => false,
                }
            })
            .collect()
    }
}

/// One sequence's part of a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// Tokens to run, at positions `start_pos..`.
    pub tokens: &'a [u32],
    /// Position of the first token (the number already cached for this sequence).
    pub start_pos: usize,
    /// Block ids of the sequence in the [`KvPool`], covering at least
    /// `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// Which logits to return for this chunk.
    pub logits: Logits,
    /// Where the sliding-window layers keep this sequence's keys and values, indexed like
    /// `block_table` (position `p` in block `window_table[p / block_tokens]` of the pool's
    /// window blocks). Only the entries from the block of `start_pos + 1 - window` on are
    /// read: blocks that left the window may have been given back. Empty: the windowed
    /// layers use `block_table` (a pool made by [`KvPool::new`]).
    pub window_table: &'a [u32],
}

impl<'a> SeqChunk<'a> {
    /// The table the windowed layers use.
    fn window_blocks(&self) -> &'a [u32] {
        if self.window_table.is_empty() {
            self.block_table
        } else {
            self.window_table
        }
    }
}

/// Below this many elements a row-wise operation runs on the calling thread (a decode
/// step's rows are not worth waking the pool for).
const PAR_MIN_ELEMENTS: usize = 1 << 14;

/// `f(first_row, rows)` over `x` cut into runs of whole `dim`-wide rows, two runs per
/// thread, on the pool (inline when `x` is small). Each run is its own `&mut` slice; `f`
/// reads any inputs by row index.
fn par_rows(pool: &ThreadPool, x: &mut [f32], dim: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = x.len().checked_div(dim).unwrap_or(0);
    if rows <= 1 || x.len() < PAR_MIN_ELEMENTS || pool.n_threads() == 1 {
        f(0, x);
        return;
    }
    let per = rows.div_ceil(2 * pool.n_threads());
    let runs: Vec<std::sync::Mutex<(usize, &mut [f32])>> = x
        .chunks_mut(per * dim)
        .enumerate()
        .map(|(i, c)| std::sync::Mutex::new((i * per, c)))
        .collect();
    pool.parallel_for(runs.len(), &|i| {
        // Each run is locked by its one task only: never contended, never poisoned
        // before its use.
        if let Ok(mut run) = runs[i].lock() {
            let (r0, ref mut rows) = *run;
            f(r0, rows);
        }
    });
}

/// `x += y`, row-parallel.
fn add_rows(pool: &ThreadPool, x: &mut [f32], y: &[f32], dim: usize) {
    par_rows(pool, x, dim, &|r0, rows| {
        kernels::add_assign(rows, &y[r0 * dim..][..rows.len()]);
    });
}

/// RMSNorm of each `weight.len()`-wide piece of `x` (a row, or one head of a row), in place.
fn rms_norm_in_place(pool: &ThreadPool, x: &mut [f32], weight: &[f32], eps: f32) {
    par_rows(pool, x, weight.len(), &|_, rows| {
        let mut tmp = vec![0.0; weight.len()];
        for piece in rows.chunks_exact_mut(weight.len()) {
            kernels::rms_norm(piece, weight, eps, &mut tmp);
            piece.copy_from_slice(&tmp);
        }
    });
}

/// RMSNorm of each `dim`-wide row of `x` into `out`.
fn rms_norm_rows(
    pool: &ThreadPool,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    dim: usize,
    out: &mut [f32],
) {
    par_rows(pool, out, dim, &|r0, rows| {
        let x = &x[r0 * dim..][..rows.len()];
        for (row, o) in x.chunks_exact(dim).zip(rows.chunks_exact_mut(dim)) {
            kernels::rms_norm(row, weight, eps, o);
        }
    });
}

/// Causal grouped-query attention of every batch row's queries (`q`, `n × q_dim`) over its
/// own sequence's cached keys and values of `layer`, written to `out` (`n × q_dim`), by
/// [`crate::attention`]: the paged KV read in blocks with an online softmax, all query heads
/// of a KV head together, on the pool. With a sliding window `w` (the layer's), the row at
/// position `p` sees positions `p + 1 - w ..= p` only. Scores are scaled by the config's
/// `attention_scale`.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    c: &LlamaConfig,
    kv: &KvPool,
    layer: usize,
    window: Option<usize>,
    plan: &BatchPlan<'_>,
    q: &[f32],
    out: &mut [f32],
) {
    let windowed = kv.is_windowed(layer);
    let rows: Vec<Row<'_>> = (0..plan.len())
        .map(|r| Row {
            pos: plan.positions[r],
            table: plan.block_table(r, windowed),
        })
        .collect();
    let heads = Heads {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        scale: c.attention_scale,
        window,
    };
    attention::attention(pool, heads, kv, layer, &rows, q, out);
}
