//! A model's shape as the performance model needs it: parameters (total and active), layers,
//! the bytes of KV cache each token adds, and the mixture of experts when there is one.
//!
//! Shapes come from a named preset (the Mistral family, and the models ML.ENERGY measured),
//! from a Hugging Face `config.json`, or from a GGUF file's metadata and tensor list.

use std::path::Path;

use serde::Serialize;

use crate::error::PlanError;

/// How attention keeps its cache.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attention {
    /// Grouped-query attention: keys and values of `kv_heads` heads of `head_dim` each.
    Gqa {
        /// Key/value heads.
        kv_heads: u32,
        /// Dimensions per head.
        head_dim: u32,
    },
    /// Multi-head latent attention (DeepSeek-V2/V3): one compressed latent plus the rotary
    /// part's key per token and layer.
    Mla {
        /// `kv_lora_rank`.
        latent_dim: u32,
        /// `qk_rope_head_dim`.
        rope_dim: u32,
    },
}

/// A mixture of experts: `active` of `count` routed experts per token.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Experts {
    /// Routed experts per MoE layer.
    pub count: u32,
    /// Routed experts each token uses.
    pub active: u32,
}

/// The shape of one model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    /// Its name.
    pub name: String,
    /// All parameters, in billions.
    pub params_b: f64,
    /// Parameters each token uses (equal to `params_b` for a dense model), in billions.
    pub active_params_b: f64,
    /// Transformer blocks.
    pub layers: u32,
    /// Blocks whose attention keeps every position (the others keep a sliding window or,
    /// in hybrid models, no KV cache at all).
    pub full_attention_layers: u32,
    /// Blocks with a sliding window, and the window in tokens.
    pub window_layers: u32,
    /// The sliding window in tokens (0 when there is none).
    pub window_tokens: u32,
    /// The cache's layout.
    pub attention: Attention,
    /// Query heads × the dimension scores are computed in (for attention's FLOPs).
    pub attention_width: u32,
    /// The residual stream's width (what tensor parallelism all-reduces per token and layer).
    pub hidden: u32,
    /// Bytes of recurrent state per sequence (Mamba layers of hybrid models; 0 otherwise),
    /// read and written at every step whatever the context.
    pub recurrent_state_bytes: f64,
    /// The mixture of experts, when there is one.
    pub experts: Option<Experts>,
}

/// Bytes per KV element: the cache is kept in 16 bits (vLLM's default, and ours in f16).
const KV_ELEMENT_BYTES: f64 = 2.0;

impl ModelShape {
    /// KV-cache bytes one token adds in one full-attention layer.
    fn kv_bytes_per_layer(&self) -> f64 {
        match self.attention {
            Attention::Gqa { kv_heads, head_dim } => {
                2.0 * f64::from(kv_heads) * f64::from(head_dim) * KV_ELEMENT_BYTES
            }
            Attention::Mla {
                latent_dim,
                rope_dim,
            } => f64::from(latent_dim + rope_dim) * KV_ELEMENT_BYTES,
        }
    }

    /// KV-cache bytes held by one sequence of `context` tokens (windowed layers hold at most
    /// their window).
    pub fn kv_bytes(&self, context: f64) -> f64 {
        let per_layer = self.kv_bytes_per_layer();
        let windowed = context.min(f64::from(self.window_tokens));
        per_layer
            * (f64::from(self.full_attention_layers) * context
                + f64::from(self.window_layers) * windowed)
    }

    /// Parameters every token uses whatever the routing (attention, embeddings, shared
    /// experts, dense layers), and the routed experts' parameters, both in billions.
    pub fn dense_and_routed_b(&self) -> (f64, f64) {
        match self.experts {
            Some(e) if e.count > e.active && self.params_b > self.active_params_b => {
                let share = f64::from(e.active) / f64::from(e.count);
                let routed = (self.params_b - self.active_params_b) / (1.0 - share);
                (self.params_b - routed, routed)
            }
            _ => (self.params_b, 0.0),
        }
    }

    /// Parameters (billions) whose weights a step of `tokens` tokens reads: the dense part
    /// plus the routed experts at least one token chose, expected over uniform routing.
    pub fn params_read_b(&self, tokens: f64) -> f64 {
        let (dense, routed) = self.dense_and_routed_b();
        match self.experts {
            Some(e) if routed > 0.0 => {
                let miss = 1.0 - f64::from(e.active) / f64::from(e.count);
                dense + routed * (1.0 - miss.powf(tokens.max(1.0)))
            }
            _ => dense,
        }
    }

    /// FLOPs one token costs at `context` positions: two per active parameter plus
    /// attention's scores and weighted sums over the cached positions.
    pub fn flops_per_token(&self, context: f64) -> f64 {
        let attended = f64::from(self.full_attention_layers) * context
            + f64::from(self.window_layers) * context.min(f64::from(self.window_tokens));
        2.0 * self.active_params_b * 1e9 + 4.0 * f64::from(self.attention_width) * attended
    }

    /// Checks the shape's numbers (a file's, or a preset's).
    pub fn validate(&self, file: &str) -> Result<(), PlanError> {
        let bad = |field: &str, msg: &str| Err(PlanError::field(file, field, msg));
        if !(self.params_b.is_finite() && self.params_b > 0.0) {
            return bad("params_b", "must be a positive number of billions");
        }
        if !(self.active_params_b > 0.0 && self.active_params_b <= self.params_b) {
            return bad("active_params_b", "must be positive and at most params_b");
        }
        if self.layers == 0 {
            return bad("layers", "must be at least 1");
        }
        if u64::from(self.full_attention_layers) + u64::from(self.window_layers)
            > u64::from(self.layers)
        {
            return bad(
                "full_attention_layers",
                "full and windowed attention layers exceed the layer count",
            );
        }
        if let Some(e) = self.experts
            && (e.count == 0 || e.active == 0 || e.active > e.count)
        {
            return bad("experts", "need 0 < active <= count");
        }
        Ok(())
    }
}

/// A dense GQA model (every layer full attention).
fn dense(
    name: &str,
    params_b: f64,
    layers: u32,
    hidden: u32,
    (kv_heads, head_dim, q_heads): (u32, u32, u32),
) -> ModelShape {
    ModelShape {
        name: name.to_owned(),
        params_b,
        active_params_b: params_b,
        layers,
        full_attention_layers: layers,
        window_layers: 0,
        window_tokens: 0,
        attention: Attention::Gqa { kv_heads, head_dim },
        attention_width: q_heads * head_dim,
        hidden,
        recurrent_state_bytes: 0.0,
        experts: None,
    }
}

/// A mixture-of-experts model from a dense one.
fn moe(base: ModelShape, active_params_b: f64, count: u32, active: u32) -> ModelShape {
    ModelShape {
        active_params_b,
        experts: Some(Experts { count, active }),
        ..base
    }
}

/// An MLA model (DeepSeek-V3 style).
fn mla(
    name: &str,
    params_b: f64,
    layers: u32,
    hidden: u32,
    (latent_dim, q_heads): (u32, u32),
) -> ModelShape {
    ModelShape {
        attention: Attention::Mla {
            latent_dim,
            rope_dim: 64,
        },
        // Decoding with the latent absorbed: scores and sums over latent + rope dims.
        attention_width: q_heads * (latent_dim + 64),
        ..dense(name, params_b, layers, hidden, (1, 1, 1))
    }
}

/// With `window_layers` of the layers attending over a sliding window of `window` tokens.
fn windowed(base: ModelShape, window_layers: u32, window: u32) -> ModelShape {
    ModelShape {
        full_attention_layers: base.layers - window_layers,
        window_layers,
        window_tokens: window,
        ..base
    }
}

/// A hybrid (Mamba-2 + attention) model: only `attention_layers` keep a KV cache; each of
/// `mamba_layers` keeps `heads × head_dim × state` values of 16 bits per sequence.
fn hybrid(
    base: ModelShape,
    attention_layers: u32,
    (mamba_layers, heads, head_dim, state): (u32, u32, u32, u32),
) -> ModelShape {
    ModelShape {
        full_attention_layers: attention_layers,
        recurrent_state_bytes: 2.0
            * f64::from(mamba_layers)
            * f64::from(heads)
            * f64::from(head_dim)
            * f64::from(state),
        ..base
    }
}

/// The named presets: `(names it answers to, shape)`.
///
/// Mistral models, from their published model cards and configurations (Hugging Face
/// `mistralai/*`, NVIDIA's model-coverage pages):
/// - Mistral Large 3 (`Mistral-Large-3-675B-Instruct-2512`): 675B total, 41B active,
///   DeepSeek-V3 layout (61 layers, MLA with a 512-dim latent + 64 rope dims, 128 heads);
///   the routed experts (256, 8 per token) are taken as DeepSeek-V3's.
/// - Mistral Small 4: 119B total, 6.5B active, 128 experts with 4 per token, MLA; 36 layers
///   and 22.5 KiB of KV per token (a 256-dim latent + 64 rope dims in 16 bits), 32 heads.
/// - Mistral Medium 3.5: 128B dense, 88 layers (width 12288, 96 heads, 8 KV heads of 128).
/// - Ministral 3 14B: dense, 40 layers, 32 heads, 8 KV heads of 128.
/// - Magistral Small (2509, the Mistral Small 3.2 24B backbone): 40 layers, 32 heads, 8 KV
///   heads of 128.
///
/// The models of ML.ENERGY's v3 chat results (for the validation), from each model's
/// `config.json`; hybrid Mamba models count their attention layers' cache and their Mamba
/// layers' state (Nemotron-H: 128 heads of 80 dims, a 128-dim state).
fn presets() -> Vec<(&'static [&'static str], ModelShape)> {
    vec![
        (
            &["mistral-large-3", "Mistral Large 3"],
            moe(
                mla("Mistral Large 3", 675.0, 61, 7168, (512, 128)),
                41.0,
                256,
                8,
            ),
        ),
        (
            &["mistral-small-4", "Mistral Small 4"],
            moe(
                mla("Mistral Small 4", 119.0, 36, 4096, (256, 32)),
                6.5,
                128,
                4,
            ),
        ),
        (
            &["mistral-medium-3.5", "Mistral Medium 3.5"],
            dense("Mistral Medium 3.5", 128.0, 88, 12288, (8, 128, 96)),
        ),
        (
            &["ministral-3-14b", "Ministral 3 14B"],
            dense("Ministral 3 14B", 14.0, 40, 5120, (8, 128, 32)),
        ),
        (
            &["magistral-small", "Magistral Small"],
            dense("Magistral Small", 24.0, 40, 5120, (8, 128, 32)),
        ),
        (
            &["smollm2-135m", "SmolLM2-135M"],
            dense("SmolLM2-135M", 0.1348, 30, 576, (3, 64, 9)),
        ),
        (
            &["Qwen/Qwen3-8B"],
            dense("Qwen/Qwen3-8B", 8.19, 36, 4096, (8, 128, 32)),
        ),
        (
            &["Qwen/Qwen3-14B"],
            dense("Qwen/Qwen3-14B", 14.8, 40, 5120, (8, 128, 40)),
        ),
        (
            &["Qwen/Qwen3-32B"],
            dense("Qwen/Qwen3-32B", 32.8, 64, 5120, (8, 128, 64)),
        ),
        (
            &["Qwen/Qwen3-30B-A3B-Instruct-2507"],
            moe(
                dense(
                    "Qwen/Qwen3-30B-A3B-Instruct-2507",
                    30.5,
                    48,
                    2048,
                    (4, 128, 32),
                ),
                3.3,
                128,
                8,
            ),
        ),
        (
            &[
                "Qwen/Qwen3-235B-A22B-Instruct-2507",
                "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8",
            ],
            moe(
                dense(
                    "Qwen/Qwen3-235B-A22B-Instruct-2507",
                    235.0,
                    94,
                    4096,
                    (4, 128, 64),
                ),
                22.0,
                128,
                8,
            ),
        ),
        (
            &["meta-llama/Llama-3.1-8B-Instruct"],
            dense(
                "meta-llama/Llama-3.1-8B-Instruct",
                8.03,
                32,
                4096,
                (8, 128, 32),
            ),
        ),
        (
            &[
                "meta-llama/Llama-3.1-70B-Instruct",
                "meta-llama/Llama-3.3-70B-Instruct",
            ],
            dense(
                "meta-llama/Llama-3.1-70B-Instruct",
                70.6,
                80,
                8192,
                (8, 128, 64),
            ),
        ),
        (
            &[
                "meta-llama/Llama-3.1-405B-Instruct",
                "meta-llama/Llama-3.1-405B-Instruct-FP8",
            ],
            dense(
                "meta-llama/Llama-3.1-405B-Instruct",
                405.9,
                126,
                16384,
                (8, 128, 128),
            ),
        ),
        (
            &["meta-llama/Llama-4-Scout-17B-16E-Instruct"],
            moe(
                dense(
                    "meta-llama/Llama-4-Scout-17B-16E-Instruct",
                    108.6,
                    48,
                    5120,
                    (8, 128, 40),
                ),
                17.2,
                16,
                1,
            ),
        ),
        (
            &["meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"],
            moe(
                dense(
                    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8",
                    401.6,
                    48,
                    5120,
                    (8, 128, 40),
                ),
                17.2,
                128,
                1,
            ),
        ),
        (
            &["google/gemma-3-12b-it"],
            windowed(
                dense("google/gemma-3-12b-it", 12.2, 48, 3840, (8, 256, 16)),
                40,
                1024,
            ),
        ),
        (
            &["google/gemma-3-27b-it"],
            windowed(
                dense("google/gemma-3-27b-it", 27.4, 62, 5376, (16, 128, 32)),
                52,
                1024,
            ),
        ),
        (
            &["deepseek-ai/DeepSeek-V3.1"],
            moe(
                mla("deepseek-ai/DeepSeek-V3.1", 671.0, 61, 7168, (512, 128)),
                37.0,
                256,
                8,
            ),
        ),
        (
            &["nvidia/NVIDIA-Nemotron-Nano-9B-v2"],
            hybrid(
                dense(
                    "nvidia/NVIDIA-Nemotron-Nano-9B-v2",
                    8.9,
                    56,
                    4480,
                    (8, 128, 40),
                ),
                4,
                (27, 128, 80, 128),
            ),
        ),
        (
            &["nvidia/NVIDIA-Nemotron-Nano-12B-v2"],
            hybrid(
                dense(
                    "nvidia/NVIDIA-Nemotron-Nano-12B-v2",
                    12.3,
                    62,
                    5120,
                    (8, 128, 40),
                ),
                6,
                (28, 128, 80, 128),
            ),
        ),
    ]
}

/// The preset called `name` (case-insensitive), if there is one.
pub fn preset(name: &str) -> Option<ModelShape> {
    presets()
        .into_iter()
        .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)))
        .map(|(_, shape)| shape)
}

/// The names of the Mistral presets (for messages and the README).
pub fn preset_names() -> Vec<&'static str> {
    presets().into_iter().map(|(names, _)| names[0]).collect()
}

/// Reads a shape from a Hugging Face `config.json` (its `text_config` when the model is
/// multimodal): dense, Mixtral/Qwen-style MoE and DeepSeek-style MLA + MoE.
pub fn from_hf_config(name: &str, json: &str, file: &str) -> Result<ModelShape, PlanError> {
    let root: serde_json::Value = serde_json::from_str(json).map_err(|e| PlanError::Parse {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let c = root.get("text_config").unwrap_or(&root);
    let int = |key: &str| -> Result<Option<u64>, PlanError> {
        match c.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| PlanError::field(file, key, "must be a non-negative integer")),
        }
    };
    let need = |key: &str| -> Result<u64, PlanError> {
        int(key)?.ok_or_else(|| PlanError::field(file, key, "missing"))
    };
    let hidden = need("hidden_size")?;
    let layers = need("num_hidden_layers")?;
    let heads = need("num_attention_heads")?;
    let vocab = need("vocab_size")?;
    let ffn = need("intermediate_size")?;
    if heads == 0 || hidden == 0 || layers == 0 {
        return Err(PlanError::field(
            file,
            "num_attention_heads",
            "hidden_size, num_hidden_layers and num_attention_heads must be positive",
        ));
    }
    let kv_heads = int("num_key_value_heads")?.unwrap_or(heads);
    let head_dim = int("head_dim")?.unwrap_or(hidden / heads);
    let tied = c
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    // Parameter counts in floating point: a config's dimensions may multiply past any
    // integer (they are checked to fit the shape's fields below).
    let [
        hidden_f,
        heads_f,
        kv_heads_f,
        head_dim_f,
        vocab_f,
        ffn_f,
        layers_f,
    ] = [hidden, heads, kv_heads, head_dim, vocab, ffn, layers].map(|v| v as f64);
    let embeddings = vocab_f * hidden_f * if tied { 1.0 } else { 2.0 };
    // The experts' count under whichever key the family uses (named by it in errors).
    let mut experts_key = "num_experts";
    for key in ["n_routed_experts", "num_local_experts", "num_experts"] {
        if int(key)?.is_some() {
            experts_key = key;
            break;
        }
    }
    let experts = match int(experts_key)? {
        Some(count) if count > 1 => Some((count, need("num_experts_per_tok")?)),
        _ => None,
    };
    let kv_lora = int("kv_lora_rank")?;
    // Attention parameters per layer.
    let attn = match kv_lora {
        Some(rank) => {
            let rank = rank as f64;
            let rope = int("qk_rope_head_dim")?.unwrap_or(64) as f64;
            let nope = int("qk_nope_head_dim")?.unwrap_or(128) as f64;
            let v = int("v_head_dim")?.unwrap_or(128) as f64;
            let q = match int("q_lora_rank")? {
                Some(qr) => hidden_f * qr as f64 + qr as f64 * heads_f * (nope + rope),
                None => hidden_f * heads_f * (nope + rope),
            };
            q + hidden_f * (rank + rope) + rank * heads_f * (nope + v) + heads_f * v * hidden_f
        }
        None => hidden_f * head_dim_f * (2.0 * heads_f + 2.0 * kv_heads_f),
    };
    let (total, active) = match experts {
        None => {
            let p = layers_f * (attn + 3.0 * hidden_f * ffn_f) + embeddings;
            (p, p)
        }
        Some((count, k)) => {
            let expert_ffn = int("moe_intermediate_size")?.unwrap_or(ffn) as f64;
            let shared = int("n_shared_experts")?.unwrap_or(0) as f64;
            let dense_layers = int("first_k_dense_replace")?.unwrap_or(0).min(layers);
            let moe_layers = (layers - dense_layers) as f64;
            let dense_layers = dense_layers as f64;
            let per_expert = 3.0 * hidden_f * expert_ffn;
            let common = layers_f * attn
                + dense_layers * 3.0 * hidden_f * ffn_f
                + moe_layers * (shared * per_expert + hidden_f * count as f64)
                + embeddings;
            (
                common + moe_layers * count as f64 * per_expert,
                common + moe_layers * k as f64 * per_expert,
            )
        }
    };
    let to_u32 =
        |v: u64, key: &str| u32::try_from(v).map_err(|_| PlanError::field(file, key, "too large"));
    let attention = match kv_lora {
        Some(rank) => Attention::Mla {
            latent_dim: to_u32(rank, "kv_lora_rank")?,
            rope_dim: to_u32(int("qk_rope_head_dim")?.unwrap_or(64), "qk_rope_head_dim")?,
        },
        None => Attention::Gqa {
            kv_heads: to_u32(kv_heads, "num_key_value_heads")?,
            // Named by the key it came from: `head_dim`, or hidden_size / heads without one.
            head_dim: to_u32(
                head_dim,
                if int("head_dim")?.is_some() {
                    "head_dim"
                } else {
                    "hidden_size"
                },
            )?,
        },
    };
    let attention_width = match attention {
        Attention::Mla {
            latent_dim,
            rope_dim,
        } => latent_dim
            .checked_add(rope_dim)
            .ok_or_else(|| PlanError::field(file, "kv_lora_rank", "too large"))?
            .checked_mul(to_u32(heads, "num_attention_heads")?),
        Attention::Gqa { head_dim, .. } => {
            head_dim.checked_mul(to_u32(heads, "num_attention_heads")?)
        }
    }
    .ok_or_else(|| PlanError::field(file, "num_attention_heads", "too large"))?;
    let layers = to_u32(layers, "num_hidden_layers")?;
    let shape = ModelShape {
        name: name.to_owned(),
        params_b: total / 1e9,
        active_params_b: active / 1e9,
        layers,
        full_attention_layers: layers,
        window_layers: 0,
        window_tokens: 0,
        attention,
        attention_width,
        hidden: to_u32(hidden, "hidden_size")?,
        recurrent_state_bytes: 0.0,
        experts: match experts {
            Some((count, k)) => Some(Experts {
                count: to_u32(count, experts_key)?,
                active: to_u32(k, "num_experts_per_tok")?,
            }),
            None => None,
        },
    };
    shape.validate(file)?;
    Ok(shape)
}

/// Reads a shape from a GGUF file: parameters counted from its tensors, the rest from the
/// `{architecture}.*` metadata.
pub fn from_gguf(name: &str, path: &Path) -> Result<ModelShape, PlanError> {
    let file = gguf::GgufFile::open(path).map_err(|source| PlanError::Gguf {
        path: path.to_owned(),
        source,
    })?;
    let label = path.display().to_string();
    let meta = file.metadata();
    let arch = meta
        .get("general.architecture")
        .and_then(gguf::Value::as_str)
        .ok_or_else(|| PlanError::field(&label, "general.architecture", "missing"))?
        .to_owned();
    let int = |key: &str| -> Option<u64> {
        meta.get(&format!("{arch}.{key}"))
            .and_then(gguf::Value::as_integer)
            .and_then(|v| u64::try_from(v).ok())
    };
    let need = |key: &str| {
        int(key).ok_or_else(|| {
            PlanError::field(&label, format!("{arch}.{key}"), "missing or not an integer")
        })
    };
    let layers = need("block_count")?;
    let width = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    if heads == 0 || layers == 0 {
        return Err(PlanError::field(
            &label,
            format!("{arch}.attention.head_count"),
            "must be positive",
        ));
    }
    let head_dim = int("attention.key_length").unwrap_or(width / heads);
    // In floating point: a hostile file's counts may sum or multiply past any integer.
    let total: f64 = file.tensors().iter().map(|t| t.n_elements as f64).sum();
    let experts = match (int("expert_count"), int("expert_used_count")) {
        (Some(count), Some(k)) if count > 1 => Some(Experts {
            count: u32::try_from(count).unwrap_or(u32::MAX),
            active: u32::try_from(k).unwrap_or(u32::MAX),
        }),
        _ => None,
    };
    // Routed experts' tensors are named `*_exps`: a token uses `k / count` of them.
    let routed: f64 = file
        .tensors()
        .iter()
        .filter(|t| t.name.contains("_exps"))
        .map(|t| t.n_elements as f64)
        .sum();
    let active = match experts {
        Some(e) => total - routed + routed * f64::from(e.active) / f64::from(e.count.max(1)),
        None => total,
    };
    let as_u32 = |v: u64, key: &str| {
        u32::try_from(v).map_err(|_| PlanError::field(&label, format!("{arch}.{key}"), "too large"))
    };
    let layers = as_u32(layers, "block_count")?;
    let shape = ModelShape {
        name: name.to_owned(),
        params_b: total / 1e9,
        active_params_b: active / 1e9,
        layers,
        full_attention_layers: layers,
        window_layers: 0,
        window_tokens: 0,
        attention: Attention::Gqa {
            kv_heads: as_u32(kv_heads, "attention.head_count_kv")?,
            head_dim: as_u32(head_dim, "attention.key_length")?,
        },
        attention_width: as_u32(heads.saturating_mul(head_dim), "attention.head_count")?,
        hidden: as_u32(width, "embedding_length")?,
        recurrent_state_bytes: 0.0,
        experts,
    };
    shape.validate(&label)?;
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_config_counts_its_parameters() {
        let json = r#"{"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"intermediate_size":14336,"vocab_size":128256}"#;
        let s = from_hf_config("llama", json, "config.json").unwrap();
        assert!((s.params_b - 8.03).abs() < 0.02, "{}", s.params_b);
        // 32 layers × 2 (K and V) × 8 heads × 128 dims × 2 bytes = 128 KiB per token.
        assert_eq!(s.kv_bytes(1.0), 131_072.0);
    }

    #[test]
    fn deepseek_style_config_has_latent_cache_and_few_active_parameters() {
        let json = r#"{"hidden_size":7168,"num_hidden_layers":61,"num_attention_heads":128,
            "intermediate_size":18432,"moe_intermediate_size":2048,"vocab_size":129280,
            "n_routed_experts":256,"num_experts_per_tok":8,"n_shared_experts":1,
            "first_k_dense_replace":3,"kv_lora_rank":512,"q_lora_rank":1536,
            "qk_rope_head_dim":64,"qk_nope_head_dim":128,"v_head_dim":128}"#;
        let s = from_hf_config("dsv3", json, "config.json").unwrap();
        assert!((s.params_b - 671.0).abs() < 10.0, "{}", s.params_b);
        assert!(
            (s.active_params_b - 37.0).abs() < 3.0,
            "{}",
            s.active_params_b
        );
        assert_eq!(s.kv_bytes(1.0), 61.0 * 576.0 * 2.0);
        // One token reads its experts only; a large batch reads nearly all of them.
        assert!(s.params_read_b(1.0) < 40.0);
        assert!(s.params_read_b(4096.0) > 660.0);
    }

    #[test]
    fn a_config_without_its_fields_names_the_missing_one() {
        let err = from_hf_config("x", r#"{"hidden_size":64}"#, "c.json").unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers"), "{err}");
        let err = from_hf_config("x", r#"{"hidden_size":"wide"}"#, "c.json").unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }

    #[test]
    fn a_config_with_dimensions_past_any_integer_is_refused_not_wrapped() {
        // Each product of these overflowed u64 (a panic in a debug build, a wrapped and
        // plausible-looking parameter count in a release one).
        let big = u64::MAX / 2;
        for json in [
            format!(
                r#"{{"hidden_size":{big},"num_hidden_layers":{big},"num_attention_heads":1,
                "intermediate_size":{big},"vocab_size":{big}}}"#
            ),
            r#"{"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":4294967295,
                "head_dim":4096,"intermediate_size":14336,"vocab_size":128256}"#
                .to_owned(),
            format!(
                r#"{{"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
                "intermediate_size":14336,"vocab_size":128256,"kv_lora_rank":4294967295,
                "qk_rope_head_dim":4294967295,"n_routed_experts":{big},"num_experts_per_tok":2}}"#
            ),
        ] {
            let err = from_hf_config("x", &json, "c.json").expect_err(&json);
            assert!(err.to_string().contains("c.json: field `"), "{err}");
        }
        // Each names the key at fault.
        let base = r#""hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
            "intermediate_size":14336,"vocab_size":128256"#;
        for (extra, key) in [
            (r#""head_dim":8589934592"#, "head_dim"),
            (
                r#""kv_lora_rank":4294967295,"qk_rope_head_dim":1"#,
                "kv_lora_rank",
            ),
            (
                r#""n_routed_experts":8589934592,"num_experts_per_tok":2"#,
                "n_routed_experts",
            ),
            (r#""num_key_value_heads":8589934592"#, "num_key_value_heads"),
        ] {
            let json = format!("{{{base},{extra}}}");
            let err = from_hf_config("x", &json, "c.json")
                .expect_err(&json)
                .to_string();
            assert!(err.contains(&format!("field `{key}`")), "{extra}: {err}");
        }
        let huge = r#"{"hidden_size":42949672960000,"num_hidden_layers":32,
            "num_attention_heads":2,"intermediate_size":14336,"vocab_size":128256}"#;
        let err = from_hf_config("x", huge, "c.json")
            .expect_err("huge")
            .to_string();
        assert!(err.contains("field `hidden_size`"), "{err}");
    }

    /// A GGUF file with `kv` metadata over an `llama` architecture and F32 tensors of the
    /// given names and shapes, written to a temporary file.
    fn gguf(tag: &str, kv: &[(&str, u64)], tensors: &[(&str, &[u64])]) -> std::path::PathBuf {
        use gguf::{GgmlType, GgufWriter, Value};
        let mut w = GgufWriter::new(3);
        w.add_kv("general.architecture", Value::from("llama"));
        for &(k, v) in kv {
            w.add_kv(format!("llama.{k}"), Value::U64(v));
        }
        for &(name, dims) in tensors {
            let n: u64 = dims.iter().product();
            w.add_tensor(name, dims, GgmlType::F32, vec![0; n as usize * 4])
                .expect("tensor");
        }
        let path =
            std::env::temp_dir().join(format!("souverain-plan-{}-{tag}.gguf", std::process::id()));
        w.write(&path).expect("write");
        path
    }

    #[test]
    fn a_gguf_file_gives_its_shape_from_its_tensors_and_metadata() {
        let dims = [
            ("block_count", 2),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
        ];
        let dense = gguf(
            "dense",
            &dims,
            &[
                ("token_embd.weight", &[64, 100]),
                ("blk.0.attn_q.weight", &[64, 64]),
            ],
        );
        let s = from_gguf("tiny", &dense).expect("a shape");
        assert_eq!(s.params_b, (6400.0 + 4096.0) / 1e9);
        assert_eq!(s.active_params_b, s.params_b);
        assert_eq!((s.layers, s.hidden, s.attention_width), (2, 64, 64));
        assert_eq!(
            s.attention,
            Attention::Gqa {
                kv_heads: 2,
                head_dim: 16
            }
        );
        // Two of eight routed experts: a quarter of the `_exps` tensors is active.
        // Eight routed experts, `used` of them per token.
        let experts = |tag: &str, used: u64| {
            gguf(
                tag,
                &[
                    dims.as_slice(),
                    &[("expert_count", 8), ("expert_used_count", used)],
                ]
                .concat(),
                &[
                    ("token_embd.weight", &[64, 100]),
                    ("blk.0.ffn_up_exps.weight", &[64, 32, 8]),
                ],
            )
        };
        let moe = experts("moe", 2);
        let s = from_gguf("tiny-moe", &moe).expect("a shape");
        assert_eq!(s.params_b, (6400.0 + 16384.0) / 1e9);
        assert_eq!(s.active_params_b, (6400.0 + 4096.0) / 1e9);
        assert_eq!(
            s.experts,
            Some(Experts {
                count: 8,
                active: 2
            })
        );
        // Heads × their length past any integer (a panic before), and more experts used
        // than there are, are errors naming the key.
        let wide = gguf(
            "wide",
            &[
                ("block_count", 2),
                ("embedding_length", 64),
                ("attention.head_count", 1 << 50),
                ("attention.head_count_kv", 8),
                ("attention.key_length", 1 << 20),
            ],
            &[("token_embd.weight", &[64, 100])],
        );
        let e = from_gguf("wide", &wide).expect_err("too wide").to_string();
        assert!(
            e.contains("field `llama.attention.head_count`: too large"),
            "{e}"
        );
        let greedy = experts("greedy", 9);
        let e = from_gguf("greedy", &greedy)
            .expect_err("9 of 8")
            .to_string();
        assert!(
            e.contains("experts") || e.contains("active_params_b"),
            "{e}"
        );
        for p in [dense, moe, wide, greedy] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn mistral_presets_exist_and_are_valid() {
        for name in [
            "mistral-large-3",
            "Mistral Small 4",
            "mistral-medium-3.5",
            "ministral-3-14b",
            "magistral-small",
        ] {
            let s = preset(name).unwrap_or_else(|| panic!("no preset {name}"));
            s.validate("preset").unwrap();
        }
        let small4 = preset("mistral-small-4").unwrap();
        // 22.5 KiB per token, as published.
        assert_eq!(small4.kv_bytes(1.0), 22.5 * 1024.0);
    }
}
