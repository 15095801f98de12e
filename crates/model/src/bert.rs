//! BERT encoders (the sentence-embedding family: all-MiniLM, BGE, E5, ...), loaded from a
//! Hugging Face directory: `config.json` and `model.safetensors`.
//!
//! The forward pass, for every token of every sequence:
//!
//! 1. `x = word_embeddings[id] + position_embeddings[pos] + token_type_embeddings[type]`,
//!    then LayerNorm.
//! 2. Per layer (post-norm, as BERT is): Q, K, V projections with biases; bidirectional
//!    multi-head attention within the sequence (`softmax(q·k / sqrt(head_dim)) · v`); output
//!    projection; `x = LayerNorm(x + attention)`; then `h = GELU(x·W_in + b)`,
//!    `x = LayerNorm(x + h·W_out + b)`.
//! 3. The last hidden states are the output; [`pool`] turns one sequence's states into one
//!    vector as sentence-transformers' `Pooling` module does.
//!
//! Every sequence of a batch is packed back to back (no padding): the linear layers run once
//! over all tokens of the batch, and attention only ever looks within one sequence, so a
//! sequence's numbers do not depend on what else is in its batch.
//!
//! Weights stay in the memory map; F32, F16 and BF16 tensors are accepted (matrices go to the
//! kernels' `matmul` as they are; vectors are converted to f32 once at load).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kernels::{KernelError, Matrix, ThreadPool, WeightType};
use serde_json::Value;

use crate::safetensors::FileBytes;

/// Why a BERT model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is malformed (not JSON, not safetensors, ...).
    #[error("{path}: {reason}")]
    BadFile {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `config.json` is missing a field, or a value is out of range or not supported.
    #[error("BERT config: {0}")]
    BadConfig(String),
    /// A tensor the architecture needs is absent.
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    BadShape {
        /// Tensor name.
        name: String,
        /// Expected shape, outermost first (as safetensors writes it).
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type the kernels do not compute with.
    #[error("tensor {name:?} has unsupported type {dtype}")]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// The safetensors type.
        dtype: String,
    },
    /// A token id or token type id is outside its table.
    #[error("token id {token} is out of range ({limit} entries)")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Entries in the table.
        limit: usize,
    },
    /// A sequence is empty, longer than the position table, or has token types of another
    /// length.
    #[error("sequence {index}: {reason}")]
    BadSequence {
        /// Index of the sequence in the batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A kernel rejected its operands (a bug if it happens after a successful load).
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
}

/// The hyperparameters of a BERT encoder, from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Rows of the word embedding table.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position table: the longest sequence the model can encode.
    pub max_position_embeddings: usize,
    /// Rows of the token type (segment) table.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
}

/// Upper bounds on configuration values, so that a hostile config cannot ask for absurd
/// allocations before the tensors are checked against it.
const MAX_DIM: usize = 1 << 20;

impl BertConfig {
    /// Reads and checks `config.json`: `model_type` (when present) must be `bert` (or a
    /// BERT-shaped type such as `xlm-roberta` is refused), `hidden_act` must be `gelu`,
    /// `position_embedding_type` absolute, and the hidden size a multiple of the head count.
    pub fn from_json(text: &str) -> Result<Self, BertError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| BertError::BadConfig(format!("{e}")))?;
        if let Some(t) = v.get("model_type").and_then(Value::as_str)
            && t != "bert"
        {
            return Err(BertError::BadConfig(format!(
                "model_type {t:?} is not \"bert\""
            )));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(BertError::BadConfig(format!(
                "hidden_act {act:?} is not supported (only \"gelu\")"
            )));
        }
        let pos = v
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute");
        if pos != "absolute" {
            return Err(BertError::BadConfig(format!(
                "position_embedding_type {pos:?} is not supported (only \"absolute\")"
            )));
        }
        let int = |key: &str, default: Option<usize>| -> Result<usize, BertError> {
            let n = match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        BertError::BadConfig(format!("{key} is not a non-negative integer"))
                    })?,
                None => default.ok_or_else(|| BertError::BadConfig(format!("{key} is missing")))?,
            };
            if n == 0 || n > MAX_DIM {
                return Err(BertError::BadConfig(format!(
                    "{key} = {n} is outside 1..={MAX_DIM}"
                )));
            }
            Ok(n)
        };
        let config = Self {
            vocab_size: int("vocab_size", None)?,
            hidden_size: int("hidden_size", None)?,
            num_attention_heads: int("num_attention_heads", None)?,
            num_hidden_layers: int("num_hidden_layers", None)?,
            intermediate_size: int("intermediate_size", None)?,
            max_position_embeddings: int("max_position_embeddings", None)?,
            type_vocab_size: int("type_vocab_size", Some(2))?,
            layer_norm_eps: match v.get("layer_norm_eps") {
                None => 1e-12,
                Some(x) => match x.as_f64() {
                    Some(e) if e.is_finite() && e >= 0.0 => e as f32,
                    _ => {
                        return Err(BertError::BadConfig(
                            "layer_norm_eps is not a non-negative number".into(),
                        ));
                    }
                },
            },
        };
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(BertError::BadConfig(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if config.num_hidden_layers > 1024 {
            return Err(BertError::BadConfig(format!(
                "num_hidden_layers {} is implausibly large",
                config.num_hidden_layers
            )));
        }
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Where a tensor lies in the file.
#[derive(Clone, Debug)]
struct TensorRef {
    ty: WeightType,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// A 2-D weight, by reference into the file.
#[derive(Clone, Debug)]
struct MatrixRef {
    ty: WeightType,
    bytes: Range<usize>,
    rows: usize,
    cols: usize,
}

/// A linear layer: `y = W x + b`.
#[derive(Debug)]
struct Linear {
    weight: MatrixRef,
    bias: Vec<f32>,
}

/// LayerNorm's scale and shift.
#[derive(Debug)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

/// One input sequence: token ids and, optionally, their token types (all 0 when empty).
#[derive(Clone, Copy, Debug)]
pub struct BertInput<'a> {
    /// Token ids, special tokens included.
    pub token_ids: &'a [u32],
    /// Token type of each id, or empty for all zeros.
    pub type_ids: &'a [u32],
}

/// A loaded BERT encoder. It holds only weights: [`BertModel::forward`] takes `&self`, so one
/// model can serve many callers.
#[derive(Debug)]
pub struct BertModel {
    config: BertConfig,
    storage: FileBytes,
    word_embeddings: MatrixRef,
    position_embeddings: MatrixRef,
    token_type_embeddings: MatrixRef,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model directory.
    pub fn load(dir: &Path) -> Result<Self, BertError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| BertError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = BertConfig::from_json(&text)?;
        let weights = dir.join("model.safetensors");
        let storage = FileBytes::open(&weights).map_err(|source| BertError::Io {
            path: weights.clone(),
            source,
        })?;
        Self::from_storage(config, storage, &weights)
    }

    /// Builds a model from a configuration and the bytes of a safetensors file (for tests
    /// and for callers that hold weights in memory).
    pub fn from_safetensors_bytes(config: BertConfig, bytes: Vec<u8>) -> Result<Self, BertError> {
        Self::from_storage(config, FileBytes::Owned(bytes), Path::new("<memory>"))
    }

    fn from_storage(
        config: BertConfig,
        storage: FileBytes,
        path: &Path,
    ) -> Result<Self, BertError> {
        let tensors = index_tensors(storage.bytes(), path)?;
        let bytes = storage.bytes();
        let c = &config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let t = Tables {
            tensors: &tensors,
            bytes,
        };
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear, BertError> {
            Ok(Linear {
                weight: t.matrix(&format!("{name}.weight"), rows, cols)?,
                bias: t.vector(&format!("{name}.bias"), rows)?,
            })
        };
        let norm = |name: &str| -> Result<Norm, BertError> {
            Ok(Norm {
                weight: t.vector(&format!("{name}.weight"), h)?,
                bias: t.vector(&format!("{name}.bias"), h)?,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                query: linear(&format!("{p}.attention.self.query"), h, h)?,
                key: linear(&format!("{p}.attention.self.key"), h, h)?,
                value: linear(&format!("{p}.attention.self.value"), h, h)?,
                attention_output: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                intermediate: linear(&format!("{p}.intermediate.dense"), inter, h)?,
                output: linear(&format!("{p}.output.dense"), h, inter)?,
                output_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let word_embeddings = t.matrix("embeddings.word_embeddings.weight", c.vocab_size, h)?;
        let position_embeddings = t.matrix(
            "embeddings.position_embeddings.weight",
            c.max_position_embeddings,
            h,
        )?;
        let token_type_embeddings = t.matrix(
            "embeddings.token_type_embeddings.weight",
            c.type_vocab_size,
            h,
        )?;
        let embeddings_norm = norm("embeddings.LayerNorm")?;
        Ok(Self {
            config,
            storage,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Parameters of the model (elements of the tensors it uses).
    pub fn n_params(&self) -> usize {
        let m = |m: &MatrixRef| m.rows * m.cols;
        let lin = |l: &Linear| m(&l.weight) + l.bias.len();
        let norm = |n: &Norm| n.weight.len() + n.bias.len();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                lin(&l.query)
                    + lin(&l.key)
                    + lin(&l.value)
                    + lin(&l.attention_output)
                    + norm(&l.attention_norm)
                    + lin(&l.intermediate)
                    + lin(&l.output)
                    + norm(&l.output_norm)
            })
            .sum();
        m(&self.word_embeddings)
            + m(&self.position_embeddings)
            + m(&self.token_type_embeddings)
            + norm(&self.embeddings_norm)
            + layers
    }

    fn matrix(&self, m: &MatrixRef) -> Result<Matrix<'_>, BertError> {
        let data =
            self.storage
                .bytes()
                .get(m.bytes.clone())
                .ok_or(KernelError::LengthMismatch {
                    what: "bert weight bytes",
                    expected: m.bytes.end,
                    actual: self.storage.bytes().len(),
                })?;
        Ok(Matrix::new(m.ty, data, m.rows, m.cols)?)
    }

    /// Runs the encoder over a batch of sequences and returns each sequence's last hidden
    /// states (`tokens × hidden_size`, row-major).
    pub fn forward(
        &self,
        pool: &ThreadPool,
        batch: &[BertInput<'_>],
    ) -> Result<Vec<Vec<f32>>, BertError> {
        let c = &self.config;
        let h = c.hidden_size;
        // Check every sequence before any work.
        let mut total = 0usize;
        for (index, s) in batch.iter().enumerate() {
            let bad = |reason: String| BertError::BadSequence { index, reason };
            if s.token_ids.is_empty() {
                return Err(bad("no tokens".into()));
            }
            if s.token_ids.len() > c.max_position_embeddings {
                return Err(bad(format!(
                    "{} tokens exceed the model's {} positions",
                    s.token_ids.len(),
                    c.max_position_embeddings
                )));
            }
            if !s.type_ids.is_empty() && s.type_ids.len() != s.token_ids.len() {
                return Err(bad(format!(
                    "{} token types for {} tokens",
                    s.type_ids.len(),
                    s.token_ids.len()
                )));
            }
            for &id in s.token_ids {
                if id as usize >= c.vocab_size {
                    return Err(BertError::TokenOutOfRange {
                        token: id,
                        limit: c.vocab_size,
                    });
                }
            }
            for &t in s.type_ids {
                if t as usize >= c.type_vocab_size {
                    return Err(BertError::TokenOutOfRange {
                        token: t,
                        limit: c.type_vocab_size,
                    });
                }
            }
            total += s.token_ids.len();
        }
        if total == 0 {
            return Ok(Vec::new());
        }

        // Embeddings: word + position + token type, then LayerNorm.
        let word = self.matrix(&self.word_embeddings)?;
        let position = self.matrix(&self.position_embeddings)?;
        let token_type = self.matrix(&self.token_type_embeddings)?;
        let mut x = vec![0f32; total * h];
        let mut row = vec![0f32; h];
        let mut sum = vec![0f32; h];
        let mut t = 0;
        for s in batch {
            for (pos, &id) in s.token_ids.iter().enumerate() {
                let ty = s.type_ids.get(pos).copied().unwrap_or(0);
                embedding_row(&word, id as usize, &mut sum)?;
                embedding_row(&position, pos, &mut row)?;
                kernels::add_assign(&mut sum, &row);
                embedding_row(&token_type, ty as usize, &mut row)?;
                kernels::add_assign(&mut sum, &row);
                let out = &mut x[t * h..(t + 1) * h];
                let n = &self.embeddings_norm;
                kernels::layer_norm(&sum, &n.weight, &n.bias, c.layer_norm_eps, out);
                t += 1;
            }
        }

        let lengths: Vec<usize> = batch.iter().map(|s| s.token_ids.len()).collect();
        let mut q = vec![0f32; total * h];
        let mut k = vec![0f32; total * h];
        let mut v = vec![0f32; total * h];
        let mut ctx = vec![0f32; total * h];
        let mut proj = vec![0f32; total * h];
        let mut up = vec![0f32; total * c.intermediate_size];
        for layer in &self.layers {
            {
                let mut outs = [
                    (self.matrix(&layer.query.weight)?, q.as_mut_slice()),
                    (self.matrix(&layer.key.weight)?, k.as_mut_slice()),
                    (self.matrix(&layer.value.weight)?, v.as_mut_slice()),
                ];
                kernels::matmul_many(pool, &mut outs, &x, total)?;
            }
            add_bias(&mut q, &layer.query.bias);
            add_bias(&mut k, &layer.key.bias);
            add_bias(&mut v, &layer.value.bias);
            self.attention(pool, &lengths, &q, &k, &v, &mut ctx);

            self.linear(pool, &layer.attention_output, &ctx, total, &mut proj)?;
            residual_norm(&mut x, &proj, &layer.attention_norm, c.layer_norm_eps);

            self.linear(pool, &layer.intermediate, &x, total, &mut up)?;
            for u in up.iter_mut() {
                *u = kernels::gelu(*u);
            }
            self.linear(pool, &layer.output, &up, total, &mut proj)?;
            residual_norm(&mut x, &proj, &layer.output_norm, c.layer_norm_eps);
        }

        let mut out = Vec::with_capacity(batch.len());
        let mut start = 0;
        for len in lengths {
            out.push(x[start * h..(start + len) * h].to_vec());
            start += len;
        }
        Ok(out)
    }

    /// `y = W x + b` for `n` tokens.
    fn linear(
        &self,
        pool: &ThreadPool,
        l: &Linear,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), BertError> {
        kernels::matmul(pool, &self.matrix(&l.weight)?, x, n, y)?;
        add_bias(y, &l.bias);
        Ok(())
    }

    /// Bidirectional multi-head attention within each sequence: for every (sequence, head)
    /// pair, one task on the pool computes `softmax(q·kᵀ / sqrt(d)) · v` for all of that
    /// sequence's queries and writes the head's slice of `ctx`.
    fn attention(
        &self,
        pool: &ThreadPool,
        lengths: &[usize],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ctx: &mut [f32],
    ) {
        let c = &self.config;
        let (h, heads, d) = (c.hidden_size, c.num_attention_heads, c.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let mut starts = Vec::with_capacity(lengths.len());
        let mut s = 0;
        for &len in lengths {
            starts.push(s);
            s += len;
        }
        let n_tasks = lengths.len() * heads;
        // Each task's result (len × d) comes back through its own slot, then is scattered
        // into `ctx`: tasks never share an output buffer.
        let slots: Vec<Mutex<Vec<f32>>> = (0..n_tasks).map(|_| Mutex::new(Vec::new())).collect();
        pool.parallel_for(n_tasks, &|task| {
            let (seq, head) = (task / heads, task % heads);
            let (start, len) = (starts[seq], lengths[seq]);
            let mut out = vec![0f32; len * d];
            let mut scores = vec![0f32; len];
            let col = head * d;
            for i in 0..len {
                let qi = &q[(start + i) * h + col..(start + i) * h + col + d];
                for (j, score) in scores.iter_mut().enumerate() {
                    let kj = &k[(start + j) * h + col..(start + j) * h + col + d];
                    *score = kernels::dot_f32(qi, kj) * scale;
                }
                kernels::softmax(&mut scores);
                let oi = &mut out[i * d..(i + 1) * d];
                for (j, &p) in scores.iter().enumerate() {
                    let vj = &v[(start + j) * h + col..(start + j) * h + col + d];
                    for (o, &vv) in oi.iter_mut().zip(vj) {
                        *o += p * vv;
                    }
                }
            }
            if let Ok(mut slot) = slots[task].lock() {
                *slot = out;
            }
        });
        for (task, slot) in slots.into_iter().enumerate() {
            let out = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            let (seq, head) = (task / heads, task % heads);
            let col = head * d;
            for (i, row) in out.chunks_exact(d).enumerate() {
                let at = (starts[seq] + i) * h + col;
                ctx[at..at + d].copy_from_slice(row);
            }
        }
    }
}

/// One row of an embedding table as f32.
fn embedding_row(m: &Matrix<'_>, row: usize, out: &mut [f32]) -> Result<(), BertError> {
    let bytes = m.get_row(row).ok_or(BertError::TokenOutOfRange {
        token: u32::try_from(row).unwrap_or(u32::MAX),
        limit: m.rows(),
    })?;
    Ok(kernels::dequantize_row(m.ty(), bytes, out)?)
}

/// Adds `bias` to every row of `y`.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        kernels::add_assign(row, bias);
    }
}

/// `x = LayerNorm(x + delta)`, row by row.
fn residual_norm(x: &mut [f32], delta: &[f32], norm: &Norm, eps: f32) {
    let h = norm.weight.len();
    let mut sum = vec![0f32; h];
    for (xr, dr) in x.chunks_exact_mut(h).zip(delta.chunks_exact(h)) {
        sum.copy_from_slice(xr);
        kernels::add_assign(&mut sum, dr);
        kernels::layer_norm(&sum, &norm.weight, &norm.bias, eps, xr);
    }
}

/// A tensor table entry: where the tensor lies, or the name of a type the kernels do not
/// compute with (such as the I64 `position_ids` buffer, which is not a weight we use; a
/// weight we need in such a type is reported when it is looked up).
type Entry = Result<TensorRef, String>;

/// The tensor table of a safetensors file, with BERT's names (an optional `bert.` prefix, as
/// `BertFor*` checkpoints have, is dropped).
fn index_tensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, Entry>, BertError> {
    let bad = |reason: String| BertError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut out = HashMap::new();
    for e in crate::safetensors::entries(bytes).map_err(bad)? {
        let key = e.name.strip_prefix("bert.").unwrap_or(&e.name).to_owned();
        let entry = e.ty.map(|ty| TensorRef {
            ty,
            shape: e.shape,
            bytes: e.bytes,
        });
        if out.insert(key, entry).is_some() {
            return Err(bad(format!("tensor {:?} appears twice", e.name)));
        }
    }
    Ok(out)
}

/// Typed lookups in the tensor table.
struct Tables<'a> {
    tensors: &'a HashMap<String, Entry>,
    bytes: &'a [u8],
}

impl Tables<'_> {
    fn get(&self, name: &str) -> Result<&TensorRef, BertError> {
        match self.tensors.get(name) {
            Some(Ok(t)) => Ok(t),
            Some(Err(dtype)) => Err(BertError::UnsupportedType {
                name: name.to_owned(),
                dtype: dtype.clone(),
            }),
            None => Err(BertError::MissingTensor(name.to_owned())),
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<MatrixRef, BertError> {
        let t = self.get(name)?;
        if t.shape != [rows, cols] {
            return Err(BertError::BadShape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                found: t.shape.clone(),
            });
        }
        // Checks that the byte size matches the shape (Matrix::new does).
        Matrix::new(
            t.ty,
            self.bytes.get(t.bytes.clone()).unwrap_or_default(),
            rows,
            cols,
        )?;
        Ok(MatrixRef {
            ty: t.ty,
            bytes: t.bytes.clone(),
            rows,
            cols,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, BertError> {
        let t = self.get(name)?;
        if t.shape != [len] {
            return Err(BertError::BadShape {
                name: name.to_owned(),
                expected: vec![len],
                found: t.shape.clone(),
            });
        }
        let data = self.bytes.get(t.bytes.clone()).unwrap_or_default();
        let m = Matrix::new(t.ty, data, 1, len)?;
        let mut out = vec![0f32; len];
        kernels::dequantize_row(t.ty, m.row(0), &mut out)?;
        Ok(out)
    }
}

/// How sentence-transformers' `Pooling` module turns a sequence's token states into one
/// vector. With several modes, the results are concatenated in this order, as
/// sentence-transformers does: CLS, max, mean, mean-sqrt-len, weighted mean, last token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pooling {
    /// The first token's state (`pooling_mode_cls_token`).
    pub cls_token: bool,
    /// The element-wise maximum over tokens (`pooling_mode_max_tokens`).
    pub max_tokens: bool,
    /// The mean over tokens (`pooling_mode_mean_tokens`).
    pub mean_tokens: bool,
    /// The sum over tokens divided by the square root of their count
    /// (`pooling_mode_mean_sqrt_len_tokens`).
    pub mean_sqrt_len_tokens: bool,
    /// The mean weighted by position 1, 2, … (`pooling_mode_weightedmean_tokens`).
    pub weighted_mean_tokens: bool,
    /// The last token's state (`pooling_mode_lasttoken`).
    pub last_token: bool,
}

impl Pooling {
    /// Mean pooling, the most common choice.
    pub const MEAN: Pooling = Pooling {
        cls_token: false,
        max_tokens: false,
        mean_tokens: true,
        mean_sqrt_len_tokens: false,
        weighted_mean_tokens: false,
        last_token: false,
    };

    /// How many modes are on: the pooled vector is that many times the hidden size.
    pub fn n_modes(&self) -> usize {
        [
            self.cls_token,
            self.max_tokens,
            self.mean_tokens,
            self.mean_sqrt_len_tokens,
            self.weighted_mean_tokens,
            self.last_token,
        ]
        .iter()
        .filter(|&&b| b)
        .count()
    }
}

/// Pools one sequence's hidden states (`tokens × hidden_size`) into one vector of
/// `pooling.n_modes() * hidden_size` values. Every token counts (there is no padding).
pub fn pool(states: &[f32], hidden_size: usize, pooling: Pooling) -> Vec<f32> {
    let h = hidden_size.max(1);
    let n = states.len() / h;
    let rows = || states.chunks_exact(h);
    let mut out = Vec::with_capacity(pooling.n_modes() * h);
    let sums = || {
        let mut s = vec![0f64; h];
        for r in rows() {
            for (a, &b) in s.iter_mut().zip(r) {
                *a += f64::from(b);
            }
        }
        s
    };
    if pooling.cls_token {
        out.extend(rows().next().map_or(vec![0.0; h], <[f32]>::to_vec));
    }
    if pooling.max_tokens {
        let mut m = vec![f32::NEG_INFINITY; h];
        for r in rows() {
            for (a, &b) in m.iter_mut().zip(r) {
                *a = a.max(b);
            }
        }
        out.extend(m);
    }
    // sentence-transformers clamps the token count at 1e-9 to avoid dividing by zero.
    let count = (n as f64).max(1e-9);
    if pooling.mean_tokens {
        out.extend(sums().into_iter().map(|s| (s / count) as f32));
    }
    if pooling.mean_sqrt_len_tokens {
        out.extend(sums().into_iter().map(|s| (s / count.sqrt()) as f32));
    }
    if pooling.weighted_mean_tokens {
        let mut s = vec![0f64; h];
        let mut total = 0f64;
        for (i, r) in rows().enumerate() {
            let w = (i + 1) as f64;
            total += w;
            for (a, &b) in s.iter_mut().zip(r) {
                *a += w * f64::from(b);
            }
        }
        let total = total.max(1e-9);
        out.extend(s.into_iter().map(|v| (v / total) as f32));
    }
    if pooling.last_token {
        out.extend(rows().last().map_or(vec![0.0; h], <[f32]>::to_vec));
    }
    out
}

/// Scales `v` to unit Euclidean length, as sentence-transformers' `Normalize` module does
/// (`v / max(‖v‖, 1e-12)`).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let inv = 1.0 / norm.max(1e-12);
    for x in v.iter_mut() {
        *x = (f64::from(*x) * inv) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// Named tensors of a test model: name, shape, values.
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

    /// One pool for every test, never dropped: tests only need threads, not their teardown.
    fn threads() -> &'static ThreadPool {
        static POOL: std::sync::OnceLock<ThreadPool> = std::sync::OnceLock::new();
        POOL.get_or_init(|| ThreadPool::new(3))
    }

    fn tiny_config() -> BertConfig {
        BertConfig {
            vocab_size: 11,
            hidden_size: 8,
            num_attention_heads: 2,
            num_hidden_layers: 2,
            intermediate_size: 12,
            max_position_embeddings: 6,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }

    /// Every tensor of a tiny BERT with seeded random values, by name and shape.
    fn tiny_tensors(c: &BertConfig, prefix: &str) -> Tensors {
        // A fixed-seed xorshift: uniform values in [-0.5, 0.5).
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| next()).collect();
            out.push((format!("{prefix}{name}"), shape, data));
        };
        let (h, i) = (c.hidden_size, c.intermediate_size);
        add(
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, h],
        );
        add(
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, h],
        );
        add(
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, h],
        );
        add("embeddings.LayerNorm.weight".into(), vec![h]);
        add("embeddings.LayerNorm.bias".into(), vec![h]);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for name in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
            ] {
                add(format!("{p}.{name}.weight"), vec![h, h]);
                add(format!("{p}.{name}.bias"), vec![h]);
            }
            add(format!("{p}.attention.output.dense.weight"), vec![h, h]);
            add(format!("{p}.attention.output.dense.bias"), vec![h]);
            add(format!("{p}.attention.output.LayerNorm.weight"), vec![h]);
            add(format!("{p}.attention.output.LayerNorm.bias"), vec![h]);
            add(format!("{p}.intermediate.dense.weight"), vec![i, h]);
            add(format!("{p}.intermediate.dense.bias"), vec![i]);
            add(format!("{p}.output.dense.weight"), vec![h, i]);
            add(format!("{p}.output.dense.bias"), vec![h]);
            add(format!("{p}.output.LayerNorm.weight"), vec![h]);
            add(format!("{p}.output.LayerNorm.bias"), vec![h]);
        }
        out
    }

    fn serialize(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    s.clone(),
                    d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn tiny_model() -> (BertModel, Tensors) {
        let c = tiny_config();
        let tensors = tiny_tensors(&c, "");
        let model = BertModel::from_safetensors_bytes(c, serialize(&tensors)).unwrap();
        (model, tensors)
    }

    /// A plain, obviously-correct BERT forward pass over one sequence, in f64.
    fn reference(
        c: &BertConfig,
        tensors: &[(String, Vec<usize>, Vec<f32>)],
        ids: &[u32],
    ) -> Vec<f64> {
        let get = |name: &str| -> Vec<f64> {
            let t = tensors.iter().find(|t| t.0 == name).unwrap();
            t.2.iter().map(|&v| f64::from(v)).collect()
        };
        let h = c.hidden_size;
        let n = ids.len();
        let ln = |x: &mut [f64], w: &[f64], b: &[f64]| {
            let mean = x.iter().sum::<f64>() / h as f64;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
            for j in 0..h {
                x[j] = (x[j] - mean) / (var + 1e-12).sqrt() * w[j] + b[j];
            }
        };
        let linear = |x: &[f64], w: &[f64], b: &[f64], rows: usize, cols: usize| {
            let mut y = vec![0f64; n * rows];
            for t in 0..n {
                for r in 0..rows {
                    y[t * rows + r] = b[r]
                        + (0..cols)
                            .map(|k| w[r * cols + k] * x[t * cols + k])
                            .sum::<f64>();
                }
            }
            y
        };
        let (we, pe, te) = (
            get("embeddings.word_embeddings.weight"),
            get("embeddings.position_embeddings.weight"),
            get("embeddings.token_type_embeddings.weight"),
        );
        let mut x = vec![0f64; n * h];
        for (t, &id) in ids.iter().enumerate() {
            for j in 0..h {
                x[t * h + j] = we[id as usize * h + j] + pe[t * h + j] + te[j];
            }
            ln(
                &mut x[t * h..(t + 1) * h],
                &get("embeddings.LayerNorm.weight"),
                &get("embeddings.LayerNorm.bias"),
            );
        }
        let d = c.head_dim();
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let lin = |x: &[f64], name: &str, rows, cols| {
                linear(
                    x,
                    &get(&format!("{p}.{name}.weight")),
                    &get(&format!("{p}.{name}.bias")),
                    rows,
                    cols,
                )
            };
            let q = lin(&x, "attention.self.query", h, h);
            let k = lin(&x, "attention.self.key", h, h);
            let v = lin(&x, "attention.self.value", h, h);
            let mut ctx = vec![0f64; n * h];
            for head in 0..c.num_attention_heads {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..d)
                                .map(|e| q[i * h + head * d + e] * k[j * h + head * d + e])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for j in 0..n {
                        let pr = (s[j] - m).exp() / z;
                        for e in 0..d {
                            ctx[i * h + head * d + e] += pr * v[j * h + head * d + e];
                        }
                    }
                }
            }
            let a = lin(&ctx, "attention.output.dense", h, h);
            for t in 0..n {
                for j in 0..h {
                    x[t * h + j] += a[t * h + j];
                }
                ln(
                    &mut x[t * h..(t + 1) * h],
                    &get(&format!("{p}.attention.output.LayerNorm.weight")),
                    &get(&format!("{p}.attention.output.LayerNorm.bias")),
                );
            }
            let mut up = lin(&x, "intermediate.dense", c.intermediate_size, h);
            for u in up.iter_mut() {
                *u = f64::from(kernels::gelu(*u as f32));
            }
            let o = lin(&up, "output.dense", h, c.intermediate_size);
            for t in 0..n {
                for j in 0..h {
                    x[t * h + j] += o[t * h + j];
                }
                ln(
                    &mut x[t * h..(t + 1) * h],
                    &get(&format!("{p}.output.LayerNorm.weight")),
                    &get(&format!("{p}.output.LayerNorm.bias")),
                );
            }
        }
        x
    }

    fn input(ids: &[u32]) -> BertInput<'_> {
        BertInput {
            token_ids: ids,
            type_ids: &[],
        }
    }

    #[test]
    fn forward_matches_a_plain_reference() {
        let (model, tensors) = tiny_model();
        let pool = threads();
        let ids = [1u32, 5, 7, 2, 10];
        let out = model.forward(pool, &[input(&ids)]).unwrap();
        let want = reference(model.config(), &tensors, &ids);
        assert_eq!(out[0].len(), want.len());
        for (a, b) in out[0].iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn batching_does_not_change_a_sequence() {
        let (model, _) = tiny_model();
        let pool = threads();
        let a = [1u32, 2, 3];
        let b = [4u32, 5, 6, 7, 8, 9];
        let c = [10u32];
        let together = model
            .forward(pool, &[input(&a), input(&b), input(&c)])
            .unwrap();
        for (seq, got) in [&a[..], &b[..], &c[..]].iter().zip(&together) {
            let alone = model.forward(pool, &[input(seq)]).unwrap();
            assert_eq!(&alone[0], got);
        }
    }

    #[test]
    fn bert_prefix_and_token_types_are_understood() {
        let c = tiny_config();
        let tensors = tiny_tensors(&c, "bert.");
        let model = BertModel::from_safetensors_bytes(c, serialize(&tensors)).unwrap();
        let pool = threads();
        let ids = [1u32, 2, 3];
        let zeros = model
            .forward(
                pool,
                &[BertInput {
                    token_ids: &ids,
                    type_ids: &[0, 0, 0],
                }],
            )
            .unwrap();
        let default = model.forward(pool, &[input(&ids)]).unwrap();
        assert_eq!(zeros, default);
        let ones = model
            .forward(
                pool,
                &[BertInput {
                    token_ids: &ids,
                    type_ids: &[1, 1, 1],
                }],
            )
            .unwrap();
        assert_ne!(ones, default);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (model, _) = tiny_model();
        let pool = threads();
        assert!(matches!(
            model.forward(pool, &[input(&[])]),
            Err(BertError::BadSequence { index: 0, .. })
        ));
        assert!(matches!(
            model.forward(pool, &[input(&[1]), input(&[1; 7])]),
            Err(BertError::BadSequence { index: 1, .. })
        ));
        assert!(matches!(
            model.forward(pool, &[input(&[11])]),
            Err(BertError::TokenOutOfRange { token: 11, .. })
        ));
        let types = BertInput {
            token_ids: &[1, 2],
            type_ids: &[0, 2],
        };
        assert!(matches!(
            model.forward(pool, &[types]),
            Err(BertError::TokenOutOfRange { token: 2, .. })
        ));
        assert!(model.forward(pool, &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_weights_are_errors() {
        let c = tiny_config();
        let mut tensors = tiny_tensors(&c, "");
        tensors.retain(|t| t.0 != "encoder.layer.1.output.dense.bias");
        let err = BertModel::from_safetensors_bytes(c.clone(), serialize(&tensors)).unwrap_err();
        assert!(
            matches!(err, BertError::MissingTensor(ref n) if n == "encoder.layer.1.output.dense.bias")
        );

        let mut tensors = tiny_tensors(&c, "");
        let t = tensors
            .iter_mut()
            .find(|t| t.0 == "encoder.layer.0.intermediate.dense.weight")
            .unwrap();
        t.1 = vec![c.hidden_size, c.intermediate_size];
        let err = BertModel::from_safetensors_bytes(c.clone(), serialize(&tensors)).unwrap_err();
        assert!(matches!(err, BertError::BadShape { .. }), "{err}");

        let err = BertModel::from_safetensors_bytes(c, b"not safetensors".to_vec()).unwrap_err();
        assert!(matches!(err, BertError::BadFile { .. }), "{err}");
    }

    #[test]
    fn config_is_checked() {
        let good = r#"{"model_type": "bert", "vocab_size": 11, "hidden_size": 8,
            "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 12,
            "max_position_embeddings": 6, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "hidden_act": "gelu"}"#;
        assert_eq!(BertConfig::from_json(good).unwrap(), tiny_config());
        for (from, to) in [
            ("\"hidden_size\": 8", "\"hidden_size\": 9"),
            ("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\""),
            ("\"model_type\": \"bert\"", "\"model_type\": \"llama\""),
            ("\"vocab_size\": 11,", ""),
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": -1"),
            ("\"intermediate_size\": 12", "\"intermediate_size\": 0"),
        ] {
            let bad = good.replace(from, to);
            assert!(BertConfig::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pooling_modes() {
        // Two tokens, hidden size 2.
        let states = [1.0f32, -2.0, 3.0, 4.0];
        let mean = pool(&states, 2, Pooling::MEAN);
        assert_eq!(mean, [2.0, 1.0]);
        let all = Pooling {
            cls_token: true,
            max_tokens: true,
            mean_tokens: true,
            mean_sqrt_len_tokens: true,
            weighted_mean_tokens: true,
            last_token: true,
        };
        let v = pool(&states, 2, all);
        let s2 = 2f32.sqrt();
        let want = [
            1.0,
            -2.0,
            3.0,
            4.0,
            2.0,
            1.0,
            4.0 / s2,
            2.0 / s2,
            7.0 / 3.0,
            2.0,
            3.0,
            4.0,
        ];
        assert_eq!(v.len(), want.len());
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn l2_normalize_gives_unit_length() {
        let mut v = [3.0f32, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, [0.0; 3]);
    }
}
