//! The Llama architecture as GGUF describes it (`general.architecture = llama`), which also
//! covers Mistral-family GGUF files: token embeddings, then per block RMSNorm → grouped-query
//! attention with RoPE → residual → RMSNorm → SwiGLU MLP → residual, then a final RMSNorm and
//! the output head (tied to the embeddings when `output.weight` is absent).

use std::sync::{Arc, Mutex};

use gguf::{GgmlType, GgufFile};
use kernels::{Matrix, RopeStyle, ThreadPool, WeightType, f16};

use crate::{KvCache, KvPool, LlamaConfig, ModelError};

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

/// A weight matrix inside the memory-mapped file: where its bytes are and how to read them.
#[derive(Clone, Debug)]
struct Weight {
    ty: WeightType,
    info: gguf::TensorInfo,
    rows: usize,
    cols: usize,
}

/// Weights of one transformer block. Shapes are `rows × cols` (GGUF dims `[cols, rows]`).
#[derive(Debug)]
struct Block {
    attn_norm: Vec<f32>, // d_model
    wq: Weight,          // q_dim × d_model
    wk: Weight,          // kv_dim × d_model
    wv: Weight,          // kv_dim × d_model
    wo: Weight,          // d_model × q_dim
    ffn_norm: Vec<f32>,  // d_model
    w_gate: Weight,      // ffn_dim × d_model
    w_up: Weight,        // ffn_dim × d_model
    w_down: Weight,      // d_model × ffn_dim
}

/// A loaded Llama-family model. Holds no per-request state.
#[derive(Debug)]
pub struct LlamaModel {
    file: Arc<GgufFile>,
    config: LlamaConfig,
    token_embd: Weight, // vocab × d_model
    output_norm: Vec<f32>,
    output: Weight, // vocab × d_model (the embeddings when tied)
    blocks: Vec<Block>,
}

/// Per-call scratch buffers, sized for `n` tokens.
struct Scratch {
    x: Vec<f32>,    // n × d_model, the residual stream
    xn: Vec<f32>,   // n × d_model, normalised input of the current sub-layer
    q: Vec<f32>,    // n × q_dim
    k: Vec<f32>,    // n × kv_dim
    v: Vec<f32>,    // n × kv_dim
    attn: Vec<f32>, // n × q_dim, attention output before wo
    proj: Vec<f32>, // n × d_model, output of wo / w_down
    gate: Vec<f32>, // n × ffn_dim
    up: Vec<f32>,   // n × ffn_dim
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
        let c = &config;
        let d = c.d_model as u64;
        let total = 3 + 9 * c.n_layers;
        let mut done = 0usize;
        let mut step = |file: &GgufFile, name: &str| {
            if let Some(info) = file.tensor(name) {
                prefault(file.tensor_data(info));
            }
            done += 1;
            progress(done, total);
        };
        let token_embd = weight(&file, "token_embd.weight", [d, c.vocab_size as u64])?;
        step(&file, "token_embd.weight");
        let output_norm = vector(&file, "output_norm.weight", c.d_model)?;
        step(&file, "output_norm.weight");
        let output = if file.tensor("output.weight").is_some() {
            weight(&file, "output.weight", [d, c.vocab_size as u64])?
        } else {
            token_embd.clone()
        };
        step(&file, "output.weight");
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let (q, kv, f) = (c.q_dim() as u64, c.kv_dim() as u64, c.ffn_dim as u64);
            let block = Block {
                attn_norm: vector(&file, &name("attn_norm"), c.d_model)?,
                wq: weight(&file, &name("attn_q"), [d, q])?,
                wk: weight(&file, &name("attn_k"), [d, kv])?,
                wv: weight(&file, &name("attn_v"), [d, kv])?,
                wo: weight(&file, &name("attn_output"), [q, d])?,
                ffn_norm: vector(&file, &name("ffn_norm"), c.d_model)?,
                w_gate: weight(&file, &name("ffn_gate"), [d, f])?,
                w_up: weight(&file, &name("ffn_up"), [d, f])?,
                w_down: weight(&file, &name("ffn_down"), [f, d])?,
            };
            for t in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                step(&file, &name(t));
            }
            blocks.push(block);
        }
        Ok(Self {
            file,
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

    /// The file the weights live in (its metadata carries the tokenizer).
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// An empty KV cache for up to `capacity` tokens of one sequence.
    pub fn new_kv_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config, capacity)
    }

    fn matrix(&self, w: &Weight) -> Result<Matrix<'_>, ModelError> {
        let data = self.file.tensor_data(&w.info);
        Ok(Matrix::new(w.ty, data, w.rows, w.cols)?)
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
        let (kv_pool, table, start_pos) = kv.parts();
        let chunk = SeqChunk {
            tokens,
            start_pos,
            block_table: table,
            logits: which,
        };
        let mut out = self.forward_batch(pool, kv_pool, &[chunk])?;
        kv.commit(tokens.len());
        Ok(out.pop().unwrap_or_default())
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
        kv.check_shape(c)?;
        let bt = kv.block_tokens();
        // Row r of the batch is token `rows[r].1` of chunk `rows[r].0`.
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
            if let Some(&bad) = ch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    token: bad,
                    vocab_size: c.vocab_size,
                });
            }
            rows.extend((0..ch.tokens.len()).map(|i| (ci, i)));
        }
        let n = rows.len();
        if n == 0 {
            return Ok(chunks.iter().map(|_| Vec::new()).collect());
        }
        let mut s = Scratch {
            x: vec![0.0; n * c.d_model],
            xn: vec![0.0; n * c.d_model],
            q: vec![0.0; n * c.q_dim()],
            k: vec![0.0; n * c.kv_dim()],
            v: vec![0.0; n * c.kv_dim()],
            attn: vec![0.0; n * c.q_dim()],
            proj: vec![0.0; n * c.d_model],
            gate: vec![0.0; n * c.ffn_dim],
            up: vec![0.0; n * c.ffn_dim],
        };
        // Position and KV offset of every row.
        let positions: Vec<usize> = rows
            .iter()
            .map(|&(ci, i)| chunks[ci].start_pos + i)
            .collect();
        let offsets: Vec<usize> = rows
            .iter()
            .zip(&positions)
            .map(|(&(ci, _), &p)| kv.offset(chunks[ci].block_table, p))
            .collect();

        // Embeddings: dequantise one row of the table per token.
        let embd = self.matrix(&self.token_embd)?;
        for (&(ci, i), row) in rows.iter().zip(s.x.chunks_exact_mut(c.d_model)) {
            let t = chunks[ci].tokens[i] as usize;
            kernels::dequantize_row(embd.ty(), embd.row(t), row)?;
        }

        let (qd, kd) = (c.q_dim(), c.kv_dim());
        for (layer, b) in self.blocks.iter().enumerate() {
            // Attention sub-layer.
            rms_norm_rows(&s.x, &b.attn_norm, c.rms_eps, c.d_model, &mut s.xn);
            kernels::matmul(pool, &self.matrix(&b.wq)?, &s.xn, n, &mut s.q)?;
            kernels::matmul(pool, &self.matrix(&b.wk)?, &s.xn, n, &mut s.k)?;
            kernels::matmul(pool, &self.matrix(&b.wv)?, &s.xn, n, &mut s.v)?;
            for (r, &pos) in positions.iter().enumerate() {
                let q = &mut s.q[r * qd..(r + 1) * qd];
                kernels::rope(
                    q,
                    c.n_heads,
                    c.head_dim,
                    c.rope_dim,
                    pos,
                    c.rope_freq_base,
                    RopeStyle::Normal,
                );
                let k = &mut s.k[r * kd..(r + 1) * kd];
                kernels::rope(
                    k,
                    c.n_kv_heads,
                    c.head_dim,
                    c.rope_dim,
                    pos,
                    c.rope_freq_base,
                    RopeStyle::Normal,
                );
                kv.write(layer, offsets[r], k, &s.v[r * kd..(r + 1) * kd]);
            }
            let ctx = AttentionRows {
                chunks,
                rows: &rows,
                positions: &positions,
            };
            attention(pool, c, kv, layer, &ctx, &s.q, &mut s.attn);
            kernels::matmul(pool, &self.matrix(&b.wo)?, &s.attn, n, &mut s.proj)?;
            kernels::add_assign(&mut s.x, &s.proj);

            // MLP sub-layer: down(silu(gate(x)) * up(x)).
            rms_norm_rows(&s.x, &b.ffn_norm, c.rms_eps, c.d_model, &mut s.xn);
            kernels::matmul(pool, &self.matrix(&b.w_gate)?, &s.xn, n, &mut s.gate)?;
            kernels::matmul(pool, &self.matrix(&b.w_up)?, &s.xn, n, &mut s.up)?;
            kernels::swiglu(&mut s.gate, &s.up);
            kernels::matmul(pool, &self.matrix(&b.w_down)?, &s.gate, n, &mut s.proj)?;
            kernels::add_assign(&mut s.x, &s.proj);
        }

        // Output head, only for the rows whose logits were asked for.
        let wanted: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|&(_, &(ci, i))| match chunks[ci].logits {
                Logits::All => true,
                Logits::Last => i + 1 == chunks[ci].tokens.len(),
                Logits::None => false,
            })
            .map(|(r, _)| r)
            .collect();
        let mut out: Vec<Vec<f32>> = chunks.iter().map(|_| Vec::new()).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let m = wanted.len();
        let xn = &mut s.xn[..m * c.d_model];
        for (&r, o) in wanted.iter().zip(xn.chunks_exact_mut(c.d_model)) {
            kernels::rms_norm(
                &s.x[r * c.d_model..(r + 1) * c.d_model],
                &self.output_norm,
                c.rms_eps,
                o,
            );
        }
        let mut logits = vec![0.0; m * c.vocab_size];
        kernels::matmul(pool, &self.matrix(&self.output)?, xn, m, &mut logits)?;
        for (&r, l) in wanted.iter().zip(logits.chunks_exact(c.vocab_size)) {
            out[rows[r].0].extend_from_slice(l);
        }
        Ok(out)
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
}

/// RMSNorm of each `dim`-wide row of `x` into `out`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        kernels::rms_norm(row, weight, eps, o);
    }
}

/// Where each batch row's sequence and position are, for attention.
struct AttentionRows<'a> {
    chunks: &'a [SeqChunk<'a>],
    rows: &'a [(usize, usize)],
    positions: &'a [usize],
}

/// Causal grouped-query attention of every batch row's queries (`q`, `n × q_dim`) over its
/// own sequence's cached keys and values of `layer`, written to `out` (`n × q_dim`).
///
/// Numerics follow llama.cpp's CPU path: queries are rounded to f16 for the dot products with
/// the f16 keys, and the softmax weights are rounded to f16 before they scale the f16 values.
/// Each (row, head) pair is an independent task on the pool; its output slice is its own.
fn attention(
    pool: &ThreadPool,
    c: &LlamaConfig,
    kv: &KvPool,
    layer: usize,
    ctx: &AttentionRows<'_>,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let keys = kv.keys(layer);
    let values = kv.values(layer);
    let n_heads = c.n_heads;
    let slots: Vec<Mutex<&mut [f32]>> = out.chunks_exact_mut(hd).map(Mutex::new).collect();
    pool.parallel_for(slots.len(), &|task| {
        let (r, h) = (task / n_heads, task % n_heads);
        let table = ctx.chunks[ctx.rows[r].0].block_table;
        let kv_h = h / group;
        let n_ctx = ctx.positions[r] + 1;
        let mut q16 = vec![f16::ZERO; hd];
        kernels::f32_to_f16_slice(&q[task * hd..(task + 1) * hd], &mut q16);
        let mut scores: Vec<f32> = (0..n_ctx)
            .map(|p| {
                let k = &keys[kv.offset(table, p) + kv_h * hd..][..hd];
                kernels::dot_f16(&q16, k) * scale
            })
            .collect();
        kernels::softmax(&mut scores);
        let Ok(mut o) = slots[task].lock() else {
            return;
        };
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let w = f16::from_f32(w).to_f32();
            let v = &values[kv.offset(table, p) + kv_h * hd..][..hd];
            kernels::axpy_f16(&mut o, w, v);
        }
    });
}

/// Touches one byte per page so that the first forward pass does not stall on page faults;
/// this is the work the load progress bar shows.
fn prefault(bytes: &[u8]) {
    let mut acc = 0u8;
    for chunk in bytes.chunks(4096) {
        acc ^= chunk[0];
    }
    std::hint::black_box(acc);
}

fn kernel_type(name: &str, ty: GgmlType) -> Result<WeightType, ModelError> {
    Ok(match ty {
        GgmlType::F32 => WeightType::F32,
        GgmlType::F16 => WeightType::F16,
        GgmlType::BF16 => WeightType::BF16,
        GgmlType::Q4_0 => WeightType::Q4_0,
        GgmlType::Q4_1 => WeightType::Q4_1,
        GgmlType::Q8_0 => WeightType::Q8_0,
        other => {
            return Err(ModelError::UnsupportedTensorType {
                name: name.to_owned(),
                ggml_type: other.to_string(),
            });
        }
    })
}

fn weight(file: &GgufFile, name: &str, dims: [u64; 2]) -> Result<Weight, ModelError> {
    let info = file
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
    if info.dims != dims {
        return Err(ModelError::BadShape {
            name: name.to_owned(),
            expected: dims.to_vec(),
            found: info.dims.clone(),
        });
    }
    let ty = kernel_type(name, info.ggml_type)?;
    let w = Weight {
        ty,
        info: info.clone(),
        rows: dims[1] as usize,
        cols: dims[0] as usize,
    };
    // Check once here that the kernels accept this shape, so forward() cannot fail on it.
    Matrix::new(ty, file.tensor_data(info), w.rows, w.cols)?;
    Ok(w)
}

fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let info = file
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
    if info.dims != [len as u64] {
        return Err(ModelError::BadShape {
            name: name.to_owned(),
            expected: vec![len as u64],
            found: info.dims.clone(),
        });
    }
    let ty = kernel_type(name, info.ggml_type)?;
    let mut out = vec![0.0; len];
    kernels::dequantize_row(ty, file.tensor_data(info), &mut out)?;
    Ok(out)
}
