use crate::ModelError;
use gguf::{GgufFile, Metadata};
use kernels::RopeStyle;

/// Hyperparameters of a Llama-family model (Llama, Mistral, Mixtral), read from GGUF metadata
/// (`{arch}.*` keys), a Hugging Face `config.json` or a Mistral `params.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// Transformer blocks (`block_count`).
    pub n_layers: usize,
    /// Width of the residual stream (`embedding_length`).
    pub d_model: usize,
    /// Query heads (`attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`attention.head_count_kv`); fewer than `n_heads` means grouped-query
    /// attention.
    pub n_kv_heads: usize,
    /// Width of one head (`attention.key_length`, default `d_model / n_heads`).
    pub head_dim: usize,
    /// Hidden width of the SwiGLU MLP (`feed_forward_length`).
    pub ffn_dim: usize,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for (`context_length`).
    pub context_length: usize,
    /// RoPE base frequency (`rope.freq_base`, default 10000).
    pub rope_freq_base: f32,
    /// Leading dimensions of each head that RoPE rotates (`rope.dimension_count`).
    pub rope_dim: usize,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// Which dimensions RoPE pairs: adjacent ones for GGUF and Mistral's own layout (their
    /// query/key rows are ordered for it), split halves for Hugging Face weights.
    pub rope_style: RopeStyle,
    /// Sliding-window attention: a token at position `p` attends only to positions
    /// `> p - window` (`attention.sliding_window`; Mistral's `sliding_window`).
    pub sliding_window: Option<usize>,
    /// Experts per mixture-of-experts layer (`expert_count`); 0 for a dense MLP.
    pub n_experts: usize,
    /// Experts each token is routed to (`expert_used_count`), when `n_experts > 0`.
    pub n_experts_used: usize,
    /// Cache keys and values as f32 instead of f16: set by the safetensors loader for models
    /// whose weights are all f32, so that they compute as their float32 reference does.
    pub kv_f32: bool,
}

/// A generous bound on every dimension, so that a hostile file cannot make us allocate
/// absurd scratch buffers before a shape check fails.
const MAX_DIM: usize = 1 << 20;

impl LlamaConfig {
    /// Reads and checks the hyperparameters. `vocab_size` comes from the embedding tensor.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let md = file.metadata();
        let architecture = md.get_str("general.architecture")?.to_owned();
        if architecture != "llama" {
            return Err(ModelError::UnsupportedArchitecture(architecture));
        }
        let key = |k: &str| format!("{architecture}.{k}");
        let n_layers = dim(md, &key("block_count"))?;
        let d_model = dim(md, &key("embedding_length"))?;
        let n_heads = dim(md, &key("attention.head_count"))?;
        let n_kv_heads = match md.opt_u32(&key("attention.head_count_kv"))? {
            Some(v) => check_dim(&key("attention.head_count_kv"), v as usize)?,
            None => n_heads,
        };
        let ffn_dim = dim(md, &key("feed_forward_length"))?;
        let context_length = dim(md, &key("context_length"))?;
        let head_dim = match md.opt_u32(&key("attention.key_length"))? {
            Some(v) => check_dim(&key("attention.key_length"), v as usize)?,
            None => {
                if d_model % n_heads != 0 {
                    return Err(ModelError::BadConfig(format!(
                        "embedding_length {d_model} is not a multiple of head_count {n_heads}"
                    )));
                }
                d_model / n_heads
            }
        };
        if let Some(v) = md.opt_u32(&key("attention.value_length"))?
            && v as usize != head_dim
        {
            return Err(ModelError::BadConfig(format!(
                "value_length {v} differs from key_length {head_dim}"
            )));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(ModelError::BadConfig(format!(
                "head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "head dimension {head_dim} is odd"
            )));
        }
        let rope_dim = match md.opt_u32(&key("rope.dimension_count"))? {
            Some(v) => v as usize,
            None => head_dim,
        };
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope.dimension_count {rope_dim} must be even and in 2..={head_dim}"
            )));
        }
        if let Some(kind) = md.opt_str(&key("rope.scaling.type"))?
            && kind != "none"
        {
            return Err(ModelError::BadConfig(format!(
                "RoPE scaling {kind:?} is not supported yet"
            )));
        }
        let rope_freq_base = md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = md
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let sliding_window = match md.opt_u32(&key("attention.sliding_window"))? {
            Some(0) | None => None,
            Some(w) => Some(w as usize),
        };
        let n_experts = md.opt_u32(&key("expert_count"))?.unwrap_or(0) as usize;
        let n_experts_used = md.opt_u32(&key("expert_used_count"))?.unwrap_or(0) as usize;
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = match embd.dims.as_slice() {
            [_, rows] => check_dim("token_embd rows", usize::try_from(*rows).unwrap_or(0))?,
            _ => {
                return Err(ModelError::BadShape {
                    name: "token_embd.weight".into(),
                    expected: vec![d_model as u64, 0],
                    found: embd.dims.clone(),
                });
            }
        };
        Self {
            architecture,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rope_freq_base,
            rope_dim,
            rms_eps,
            rope_style: RopeStyle::Normal,
            sliding_window,
            n_experts,
            n_experts_used,
            kv_f32: false,
        }
        .checked()
    }

    /// Checks the relations between the hyperparameters that every source must satisfy.
    pub(crate) fn checked(self) -> Result<Self, ModelError> {
        for (what, v) in [
            ("layers", self.n_layers),
            ("width", self.d_model),
            ("heads", self.n_heads),
            ("KV heads", self.n_kv_heads),
            ("head dimension", self.head_dim),
            ("MLP width", self.ffn_dim),
            ("vocabulary", self.vocab_size),
            ("context length", self.context_length),
        ] {
            check_dim(what, v)?;
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(ModelError::BadConfig(format!(
                "{} heads is not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::BadConfig(format!(
                "head dimension {} is odd",
                self.head_dim
            )));
        }
        if self.rope_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return Err(ModelError::BadConfig(format!(
                "RoPE dimension {} must be even and in 2..={}",
                self.rope_dim, self.head_dim
            )));
        }
        if !(self.rope_freq_base.is_finite() && self.rope_freq_base > 0.0) {
            return Err(ModelError::BadConfig(format!(
                "RoPE base {} must be positive",
                self.rope_freq_base
            )));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(ModelError::BadConfig(format!(
                "RMSNorm epsilon {} must be positive",
                self.rms_eps
            )));
        }
        if self.n_experts > 0
            && (self.n_experts > 1024
                || self.n_experts_used == 0
                || self.n_experts_used > self.n_experts)
        {
            return Err(ModelError::BadConfig(format!(
                "{} experts with {} used per token",
                self.n_experts, self.n_experts_used
            )));
        }
        Ok(self)
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn dim(md: &Metadata, key: &str) -> Result<usize, ModelError> {
    check_dim(key, md.get_u32(key)? as usize)
}

fn check_dim(key: &str, v: usize) -> Result<usize, ModelError> {
    if v == 0 || v > MAX_DIM * 16 {
        return Err(ModelError::BadConfig(format!(
            "{key} = {v} is out of range"
        )));
    }
    Ok(v)
}
