use crate::ModelError;
use gguf::{GgufFile, Metadata};
use kernels::{Rope, RopeScaling, RopeStyle};

/// The activation of the MLP's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Activation {
    /// SiLU: `down(silu(gate(x)) * up(x))` (Llama, Mistral).
    Silu,
    /// GELU, tanh approximation: `down(gelu(gate(x)) * up(x))` (Gemma).
    GeluTanh,
}

/// How one layer attends: its window and its RoPE base (Gemma 3 alternates windowed layers,
/// with a base of their own, and global ones).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttention {
    /// `Some(w)`: the token at position `p` sees positions `p + 1 - w ..= p` only.
    pub window: Option<usize>,
    /// RoPE base frequency of this layer.
    pub rope_freq_base: f32,
}

/// Hyperparameters of a Llama-family model (Llama, Mistral, Mixtral, Gemma 3), read from GGUF
/// metadata (`{arch}.*` keys), a Hugging Face `config.json` or a Mistral `params.json`.
///
/// What differs between the family's members is data here, read by one forward pass: the
/// activation, the embedding scale, QK-norm and post-norms, the attention scale, and per layer
/// the window and RoPE base ([`LlamaConfig::layer_attention`]).
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
    /// Context scaling of RoPE (linear, Llama 3.1's frequency factors, YaRN): GGUF's
    /// `rope.scaling.*` keys and `rope_freqs.weight`, Hugging Face's `rope_scaling` /
    /// `rope_parameters`. It applies to every layer except windowed layers that have a RoPE
    /// base of their own (Gemma 3 scales only its global layers, as transformers and
    /// llama.cpp do).
    pub rope_scaling: RopeScaling,
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
    /// Whether the chosen experts' routing weights are renormalised to sum to 1 (Mixtral,
    /// and Qwen3-MoE's `norm_topk_prob`, which llama.cpp always applies), or left as their
    /// share of the softmax over every expert.
    pub moe_renormalize: bool,
    /// Cache keys and values as f32 instead of f16: set by the safetensors loader for models
    /// whose weights are all f32, so that they compute as their float32 reference does.
    pub kv_f32: bool,
    /// Which layers use `sliding_window`: `None` means all of them (Mistral); otherwise one
    /// entry per layer (Gemma 3: five windowed layers, then one global).
    pub window_layers: Option<Vec<bool>>,
    /// RoPE base of the windowed layers when it differs from `rope_freq_base` (Gemma 3's
    /// `rope_local_base_freq`, 10000).
    pub rope_freq_base_swa: Option<f32>,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Factor applied to the token embeddings (Gemma: `sqrt(d_model)`; 1 otherwise).
    pub embedding_scale: f32,
    /// Per-head RMSNorm of queries and keys before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Biases added to the query, key and value projections (`attn_q.bias`, ...: Qwen2).
    pub attn_bias: bool,
    /// Llama 4's attention temperature (Ministral 3): queries times
    /// `1 + scale · ln(1 + floor(pos / length))` after RoPE.
    pub attn_temperature: Option<AttnTemperature>,
    /// RMSNorm of each sub-layer's output before the residual add (`post_attention_norm`,
    /// `post_ffw_norm`).
    pub post_norms: bool,
    /// Added to every RMSNorm weight at load: Gemma's Hugging Face weights `w` scale by
    /// `1 + w`; llama.cpp's converter folds the 1 into GGUF files, so there it is 0.
    pub norm_weight_offset: f32,
    /// Factor on query-key dot products: `1/sqrt(head_dim)`, or Gemma's
    /// `query_pre_attn_scalar^-1/2`; for latent attention `1/sqrt(qk_nope + qk_rope)` times
    /// YaRN's `mscale(factor, mscale_all_dim)²`.
    pub attention_scale: f32,
    /// Multi-head latent attention (DeepSeek-V2/V3, Mistral Large 3, Mistral Small 4): then
    /// `n_kv_heads` is 1 and `head_dim` is the cached latent's width (`kv_lora_rank +
    /// rope_dim`), the one key (and value) head every query head reads.
    pub mla: Option<Mla>,
    /// DeepSeek's mixture of experts (scores, groups, shared experts, leading dense layers);
    /// `None` for Mixtral's and Qwen3-MoE's plain softmax routing.
    pub experts: Option<ExpertDesign>,
}

/// The shape of multi-head latent attention: each token caches one compressed latent of
/// `kv_lora_rank` values (normalised) plus `rope_dim` rotated key values shared by all heads;
/// a head's key is `[k_b·latent, k_pe]` and its value `v_b·latent`. Decoding never expands
/// them: queries are absorbed (`q_nope·k_b` against the latent), and the attention's
/// weighted latent goes through `v_b` afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mla {
    /// Rank of the queries' low-rank projection (`q_a` → norm → `q_b`); `None`: one `attn_q`.
    pub q_lora_rank: Option<usize>,
    /// Width of the cached latent (`attention.kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rotation (`key_length_mla - rope_dim`).
    pub qk_nope_dim: usize,
    /// Per-head value width (`value_length_mla`).
    pub v_head_dim: usize,
}

impl Mla {
    /// Query (and key) width of one head before absorption: `qk_nope_dim + rope_dim`.
    pub fn qk_head_dim(&self, rope_dim: usize) -> usize {
        self.qk_nope_dim + rope_dim
    }
}

/// How a DeepSeek-style router turns its logits into expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts (DeepSeek-V2, Mistral Large 3 and Small 4).
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// DeepSeek's mixture of experts: the first `leading_dense` layers are dense MLPs of
/// `ffn_dim`; the others route each token to `n_experts_used` of `n_experts` experts of
/// `expert_ffn_dim`, chosen by score (plus a per-expert selection bias where the layer has
/// one, `exp_probs_b`) within the best `groups_used` of `n_groups` groups (a group's score is
/// the sum of its two best), weighted by their unbiased scores (renormalised when
/// `moe_renormalize`) times `weights_scale`, and add `n_shared` always-on experts (one MLP of
/// `n_shared · expert_ffn_dim`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertDesign {
    /// How router logits become scores (`expert_gating_func`, `scoring_func`).
    pub gating: Gating,
    /// Expert groups (`expert_group_count`, `n_group`); 1: no group limit.
    pub n_groups: usize,
    /// Groups a token's experts may come from (`expert_group_used_count`, `topk_group`).
    pub groups_used: usize,
    /// Factor on the routing weights (`expert_weights_scale`, `routed_scaling_factor`).
    pub weights_scale: f32,
    /// Shared experts (`expert_shared_count`, `n_shared_experts`).
    pub n_shared: usize,
    /// Dense layers before the first mixture (`leading_dense_block_count`,
    /// `first_k_dense_replace`).
    pub leading_dense: usize,
    /// Hidden width of one expert (`expert_feed_forward_length`, `moe_intermediate_size`).
    pub expert_ffn_dim: usize,
}

/// The GGUF architectures (`general.architecture`) this crate runs.
pub const GGUF_ARCHITECTURES: [&str; 8] = [
    "llama",
    "mistral3",
    "gemma3",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "deepseek2",
    "mistral4",
];

/// The Hugging Face architectures (`config.json` `architectures[0]`) this crate runs from
/// safetensors (Mistral's own `params.json` layout runs too).
pub const HF_ARCHITECTURES: [&str; 11] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Ministral3ForCausalLM",
    "Mistral3ForConditionalGeneration",
    "Gemma3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "Mistral4ForCausalLM",
];

/// Llama 4's position-dependent query scaling, which Ministral 3 uses for long contexts
/// (transformers' `get_llama_4_attn_scale`, llama.cpp's `attn_temp` input with offset 0):
/// queries are multiplied by `1 + scale · ln(1 + floor(pos / length))` after RoPE, so 1 below
/// `length`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnTemperature {
    /// `llama_4_scaling_beta`, GGUF `{arch}.attention.temperature_scale`.
    pub scale: f32,
    /// `original_max_position_embeddings`; in GGUF `{arch}.attention.temperature_length`, or
    /// as llama.cpp reads files without it, `rope.scaling.original_context_length`.
    pub length: usize,
}

impl AttnTemperature {
    /// The factor on the queries at position `pos`.
    pub fn factor(&self, pos: usize) -> f32 {
        1.0 + self.scale * ((pos / self.length) as f32 + 1.0).ln()
    }

    /// Checks the pair read from `scale_key` / `length_key`.
    pub(crate) fn new(
        scale: f32,
        length: usize,
        scale_key: &str,
        length_key: &str,
    ) -> Result<Self, ModelError> {
        if !scale.is_finite() || scale < 0.0 {
            return Err(ModelError::BadConfig(format!(
                "{scale_key} = {scale} must be finite and not negative"
            )));
        }
        if length == 0 {
            return Err(ModelError::BadConfig(format!("{length_key} is 0")));
        }
        Ok(Self { scale, length })
    }
}

/// A generous bound on every dimension, so that a hostile file cannot make us allocate
/// absurd scratch buffers before a shape check fails.
const MAX_DIM: usize = 1 << 20;

impl LlamaConfig {
    /// The plain Llama graph's settings with every size 0 (not a valid model until the
    /// sizes are filled in and [`LlamaConfig::checked`] passes): the base that the latent
    /// attention readers fill.
    pub(crate) fn base(architecture: &str) -> Self {
        Self {
            architecture: architecture.to_owned(),
            n_layers: 0,
            d_model: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            ffn_dim: 0,
            vocab_size: 0,
            context_length: 0,
            rope_freq_base: 10_000.0,
            rope_dim: 0,
            rms_eps: 1e-6,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::Normal,
            sliding_window: None,
            n_experts: 0,
            n_experts_used: 0,
            moe_renormalize: true,
            kv_f32: false,
            window_layers: None,
            rope_freq_base_swa: None,
            activation: Activation::Silu,
            embedding_scale: 1.0,
            qk_norm: false,
            attn_bias: false,
            attn_temperature: None,
            post_norms: false,
            norm_weight_offset: 0.0,
            attention_scale: 1.0,
            mla: None,
            experts: None,
        }
    }

    /// Reads and checks the hyperparameters. `vocab_size` comes from the embedding tensor.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let md = file.metadata();
        let architecture = md.get_str("general.architecture")?.to_owned();
        if matches!(architecture.as_str(), "deepseek2" | "mistral4") {
            return deepseek2_from_gguf(file, &architecture);
        }
        let (gemma3, qwen) = match architecture.as_str() {
            "llama" | "mistral3" => (false, false),
            "gemma3" => (true, false),
            "qwen2" | "qwen3" | "qwen3moe" => (false, true),
            _ => return Err(ModelError::UnsupportedArchitecture(architecture)),
        };
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
        let rope_scaling =
            crate::rope_scaling::from_gguf(file, &architecture, context_length, rope_dim)?;
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
        let vocab_size = gguf_vocab_size(file, d_model)?;
        let mut config = Self {
            architecture: architecture.clone(),
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
            rope_scaling,
            sliding_window,
            n_experts,
            n_experts_used,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            ..Self::base(&architecture)
        };
        if architecture == "mistral3" {
            // llama.cpp's `mistral3` graph passes RoPE an attention factor that cancels
            // YaRN's magnitude correction (as Ministral 3's mscale = mscale_all_dim = 1
            // does in transformers), and scales queries by the Llama 4 temperature when the
            // file names one.
            if let RopeScaling::Yarn {
                attention_factor, ..
            } = &mut config.rope_scaling
            {
                *attention_factor = 1.0;
            }
            config.attn_temperature =
                gguf_temperature(md, &architecture, &config.rope_scaling, context_length)?;
        }
        if qwen {
            // llama.cpp rotates Qwen's halves (NeoX) and its converter keeps Hugging Face's
            // q/k row order; `qwen2` has biases on q, k and v, `qwen3` per-head QK-norm.
            config.rope_style = RopeStyle::NeoX;
            config.attn_bias = architecture == "qwen2";
            config.qk_norm = architecture != "qwen2";
            if architecture == "qwen3moe" {
                // Every layer is a mixture of experts of their own width.
                let k = key("expert_feed_forward_length");
                config.ffn_dim = check_dim(
                    &k,
                    md.opt_u32(&k)?
                        .ok_or_else(|| ModelError::BadConfig(format!("{k} is missing")))?
                        as usize,
                )?;
            }
        }
        // A bias on the queries where the architecture has none (llama.cpp loads one when a
        // `llama` file carries it).
        if file.tensor("blk.0.attn_q.bias").is_some() {
            config.attn_bias = true;
        }
        if gemma3 {
            // llama.cpp's reading of `gemma3` (llama-model.cpp): every sixth layer is global,
            // the others windowed with RoPE base 10000 (`rope.freq_base_swa` when a file
            // names one); the converter folded Gemma's `1 + w` into the norm weights.
            let window = sliding_window.ok_or_else(|| {
                ModelError::BadConfig(format!("{} is missing", key("attention.sliding_window")))
            })?;
            config.sliding_window = Some(window);
            config.window_layers = Some(gemma3_window_layers(n_layers, GEMMA3_PATTERN));
            config.rope_freq_base_swa = Some(
                md.opt_f32(&key("rope.freq_base_swa"))?
                    .unwrap_or(GEMMA3_LOCAL_ROPE_BASE),
            );
            // llama.cpp rotates Gemma's halves (NeoX); its converter keeps Hugging Face's
            // row order for Gemma (it reorders q/k rows only for `llama`).
            config.rope_style = RopeStyle::NeoX;
            config.activation = Activation::GeluTanh;
            config.embedding_scale = (d_model as f32).sqrt();
            config.qk_norm = true;
            config.post_norms = true;
            // Gemma 3 27B (62 layers) scales by 1/sqrt(d_model / n_heads) (its
            // query_pre_attn_scalar); the others by 1/sqrt(head_dim), as llama.cpp does.
            let scalar = if n_layers == 62 {
                d_model / n_heads
            } else {
                head_dim
            };
            config.attention_scale = 1.0 / (scalar as f32).sqrt();
            for k in ["final_logit_softcapping", "attn_logit_softcapping"] {
                if md.opt_f32(&key(k))?.is_some_and(|v| v != 0.0) {
                    return Err(ModelError::BadConfig(format!(
                        "{} (logit soft-capping) is not supported",
                        key(k)
                    )));
                }
            }
        }
        config.checked()
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
        crate::rope_scaling::check(&self.rope_scaling, self.rope_dim)?;
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(ModelError::BadConfig(format!(
                "RMSNorm epsilon {} must be positive",
                self.rms_eps
            )));
        }
        if let Some(layers) = &self.window_layers {
            if layers.len() != self.n_layers {
                return Err(ModelError::BadConfig(format!(
                    "{} layer types for {} layers",
                    layers.len(),
                    self.n_layers
                )));
            }
            if layers.iter().any(|&w| w) && self.sliding_window.is_none() {
                return Err(ModelError::BadConfig(
                    "sliding-window layers without a sliding_window".into(),
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return Err(ModelError::BadConfig("sliding_window is 0".into()));
        }
        for (what, v) in [
            (
                "RoPE base of the windowed layers",
                self.rope_freq_base_swa.unwrap_or(1.0),
            ),
            ("embedding scale", self.embedding_scale),
            ("attention scale", self.attention_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::BadConfig(format!(
                    "{what} {v} must be positive"
                )));
            }
        }
        if !self.norm_weight_offset.is_finite() {
            return Err(ModelError::BadConfig(
                "norm weight offset is not finite".into(),
            ));
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
        if let Some(m) = &self.mla {
            for (what, v) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_nope_head_dim", m.qk_nope_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                check_dim(what, v)?;
            }
            if self.n_kv_heads != 1 || self.head_dim != m.kv_lora_rank + self.rope_dim {
                return Err(ModelError::BadConfig(format!(
                    "latent attention caches one head of kv_lora_rank {} + rope dimension {}, \
                     not {} of {}",
                    m.kv_lora_rank, self.rope_dim, self.n_kv_heads, self.head_dim
                )));
            }
        }
        if let Some(e) = &self.experts {
            check_dim("expert feed_forward_length", e.expert_ffn_dim)?;
            if self.n_experts == 0
                || e.groups_used == 0
                || e.groups_used > e.n_groups
                || !self.n_experts.is_multiple_of(e.n_groups)
                || self.n_experts_used > e.groups_used * (self.n_experts / e.n_groups)
            {
                return Err(ModelError::BadConfig(format!(
                    "{} experts ({} used per token) in {} groups of which {} are used do not add up \
                     (expert_group_count, expert_group_used_count)",
                    self.n_experts, self.n_experts_used, e.n_groups, e.groups_used
                )));
            }
            if e.n_groups > 1 && self.n_experts / e.n_groups < 2 {
                return Err(ModelError::BadConfig(format!(
                    "expert groups of {} (a group's score is its two best experts)",
                    self.n_experts / e.n_groups
                )));
            }
            if !(e.weights_scale.is_finite() && e.weights_scale > 0.0) {
                return Err(ModelError::BadConfig(format!(
                    "expert_weights_scale {} must be positive",
                    e.weights_scale
                )));
            }
            if e.leading_dense > self.n_layers || e.n_shared > 64 {
                return Err(ModelError::BadConfig(format!(
                    "leading_dense_block_count {} of {} layers, expert_shared_count {}",
                    e.leading_dense, self.n_layers, e.n_shared
                )));
            }
        }
        Ok(self)
    }

    /// Whether layer `layer` is a mixture of experts (every layer of Mixtral and Qwen3-MoE;
    /// DeepSeek's after its leading dense ones).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_experts > 0 && self.experts.is_none_or(|e| layer >= e.leading_dense)
    }

    /// Hidden width of one expert.
    pub fn expert_ffn_dim(&self) -> usize {
        self.experts.map_or(self.ffn_dim, |e| e.expert_ffn_dim)
    }

    /// How layer `layer` attends: its window (if it is a windowed layer) and RoPE base.
    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        let windowed = self.sliding_window.is_some()
            && self
                .window_layers
                .as_ref()
                .is_none_or(|l| l.get(layer).copied().unwrap_or(false));
        LayerAttention {
            window: if windowed { self.sliding_window } else { None },
            rope_freq_base: match (windowed, self.rope_freq_base_swa) {
                (true, Some(base)) => base,
                _ => self.rope_freq_base,
            },
        }
    }

    /// Layer `layer`'s rotation: its RoPE base, and the model's scaling unless it is a
    /// windowed layer with a base of its own. Built once per layer, at load.
    pub fn layer_rope(&self, layer: usize) -> Rope {
        let attention = self.layer_attention(layer);
        let scaling = if attention.window.is_some() && self.rope_freq_base_swa.is_some() {
            &RopeScaling::None
        } else {
            &self.rope_scaling
        };
        // Latent attention rotates each head's last rope_dim values on their own.
        let width = if self.mla.is_some() {
            self.rope_dim
        } else {
            self.head_dim
        };
        Rope::scaled(
            width,
            self.rope_dim,
            attention.rope_freq_base,
            self.rope_style,
            scaling,
        )
    }

    /// Layers that attend to the whole sequence (the others hold only their window).
    pub fn n_global_layers(&self) -> usize {
        (0..self.n_layers)
            .filter(|&l| self.layer_attention(l).window.is_none())
            .count()
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

/// Rows of the embedding matrix, which is what a GGUF file's vocabulary size is.
fn gguf_vocab_size(file: &GgufFile, d_model: usize) -> Result<usize, ModelError> {
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    match embd.dims.as_slice() {
        [_, rows] => check_dim("token_embd rows", usize::try_from(*rows).unwrap_or(0)),
        _ => Err(ModelError::BadShape {
            name: "token_embd.weight".into(),
            expected: vec![d_model as u64, 0],
            found: embd.dims.clone(),
        }),
    }
}

/// Llama 4's attention temperature of a GGUF file (`mistral3`, and `deepseek2` for Mistral
/// Large 3): the converter writes the scale, and for `mistral3` only the scale; llama.cpp
/// takes the length from YaRN's original context where the file names none.
fn gguf_temperature(
    md: &Metadata,
    arch: &str,
    scaling: &RopeScaling,
    context_length: usize,
) -> Result<Option<AttnTemperature>, ModelError> {
    let scale_key = format!("{arch}.attention.temperature_scale");
    let length_key = format!("{arch}.attention.temperature_length");
    let Some(scale) = md.opt_f32(&scale_key)?.filter(|&s| s != 0.0) else {
        return Ok(None);
    };
    let length = match md.opt_u32(&length_key)? {
        Some(n) => n as usize,
        None => match scaling {
            RopeScaling::Yarn {
                original_context, ..
            } => *original_context,
            _ => context_length,
        },
    };
    AttnTemperature::new(scale, length, &scale_key, &length_key).map(Some)
}

/// `deepseek2` (DeepSeek-V2/V3, Mistral Large 3) and `mistral4` (Mistral Small 4) as
/// llama.cpp reads them (`llama-model.cpp`, `src/models/deepseek2.cpp`): multi-head latent
/// attention with one cached head of `key_length = kv_lora_rank + rope.dimension_count`
/// (`head_count_kv` 1, the split `attn_k_b`/`attn_v_b` of current converters), the per-head
/// sizes in `key_length_mla`/`value_length_mla`, adjacent RoPE pairs on the rotated part only;
/// experts after `leading_dense_block_count` dense layers, scored by `expert_gating_func`
/// (1 softmax, 2 sigmoid; softmax when absent), in `expert_group_count` groups of which
/// `expert_group_used_count` are kept, weighted by `expert_weights_scale`, renormalised when
/// `expert_weights_norm`, plus `expert_shared_count` shared experts. YaRN's magnitude
/// correction moves from RoPE into the score scale: `kq_scale = mscale² / sqrt(key_length_mla)`
/// with `mscale = 1 + yarn_log_multiplier · ln(factor)`.
fn deepseek2_from_gguf(file: &GgufFile, arch: &str) -> Result<LlamaConfig, ModelError> {
    let md = file.metadata();
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| dim(md, &key(k));
    let opt = |k: &str| -> Result<Option<usize>, ModelError> {
        Ok(md.opt_u32(&key(k))?.map(|v| v as usize))
    };
    let n_layers = need("block_count")?;
    let d_model = need("embedding_length")?;
    let n_heads = need("attention.head_count")?;
    let context_length = need("context_length")?;
    let (Some(qk_head), Some(v_head_dim)) = (
        opt("attention.key_length_mla")?,
        opt("attention.value_length_mla")?,
    ) else {
        return Err(ModelError::BadConfig(format!(
            "{} is missing: a file converted before llama.cpp split attn_kv_b for latent \
             attention (convert it again with a current convert_hf_to_gguf.py)",
            key("attention.key_length_mla")
        )));
    };
    let kv_lora_rank = need("attention.kv_lora_rank")?;
    let rope_dim = need("rope.dimension_count")?;
    let key_length = need("attention.key_length")?;
    if key_length != kv_lora_rank + rope_dim {
        return Err(ModelError::BadConfig(format!(
            "{} = {key_length} is not kv_lora_rank {kv_lora_rank} + rope.dimension_count \
             {rope_dim}",
            key("attention.key_length")
        )));
    }
    if let Some(v) = opt("attention.value_length")?
        && v != kv_lora_rank
    {
        return Err(ModelError::BadConfig(format!(
            "{} = {v} is not kv_lora_rank {kv_lora_rank}",
            key("attention.value_length")
        )));
    }
    if let Some(kv) = opt("attention.head_count_kv")?
        && kv != 1
    {
        return Err(ModelError::BadConfig(format!(
            "{} = {kv}: latent attention caches one head",
            key("attention.head_count_kv")
        )));
    }
    if qk_head <= rope_dim || v_head_dim == 0 {
        return Err(ModelError::BadConfig(format!(
            "{} = {qk_head} must exceed rope.dimension_count {rope_dim} and {} must not be 0",
            key("attention.key_length_mla"),
            key("attention.value_length_mla")
        )));
    }
    let q_lora_rank = opt("attention.q_lora_rank")?.filter(|&r| r > 0);
    let mut rope_scaling = crate::rope_scaling::from_gguf(file, arch, context_length, rope_dim)?;
    // llama.cpp: RoPE's magnitude is attn_factor_org (below); the score scale takes
    // mscale = attn_factor_org · (1 + 0.1 · l · ln f) squared.
    let log_mul_key = key("rope.scaling.yarn_log_multiplier");
    let log_mul = md.opt_f32(&log_mul_key)?.unwrap_or(0.0);
    if !log_mul.is_finite() || log_mul < 0.0 {
        return Err(ModelError::BadConfig(format!(
            "{log_mul_key} = {log_mul} must be finite and not negative"
        )));
    }
    let mut mscale = 1.0;
    if let RopeScaling::Yarn {
        factor,
        attention_factor,
        ..
    } = &mut rope_scaling
    {
        // The key holds 0.1 · mscale_all_dim; llama.cpp reads l = key / 0.1 and gives RoPE
        // mscale(f, m) / mscale(f, l) (m = l for deepseek2 when l is not 1, else 1) times
        // `rope.scaling.attn_factor`.
        use crate::rope_scaling::yarn_mscale;
        let l = log_mul / 0.1;
        let m = if arch == "deepseek2" && l != 1.0 {
            l
        } else {
            1.0
        };
        let extra = md.opt_f32(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        *attention_factor = yarn_mscale(*factor, m) / yarn_mscale(*factor, l) * extra;
        mscale = *attention_factor * yarn_mscale(*factor, l);
    }
    let n_experts = opt("expert_count")?.unwrap_or(0);
    let experts = if n_experts > 0 {
        let gating = match opt("expert_gating_func")? {
            None | Some(1) => Gating::Softmax,
            Some(2) => Gating::Sigmoid,
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "{} = {other} (1 softmax and 2 sigmoid are supported)",
                    key("expert_gating_func")
                )));
            }
        };
        let n_groups = opt("expert_group_count")?.unwrap_or(1).max(1);
        let groups_used = opt("expert_group_used_count")?.unwrap_or(n_groups);
        let weights_scale = match md.opt_f32(&key("expert_weights_scale"))? {
            None | Some(0.0) => 1.0,
            Some(s) => s,
        };
        Some(ExpertDesign {
            gating,
            n_groups,
            groups_used,
            weights_scale,
            n_shared: opt("expert_shared_count")?.unwrap_or(0),
            leading_dense: opt("leading_dense_block_count")?.unwrap_or(0),
            expert_ffn_dim: need("expert_feed_forward_length")?,
        })
    } else {
        None
    };
    let vocab_size = gguf_vocab_size(file, d_model)?;
    let attn_temperature = gguf_temperature(md, arch, &rope_scaling, context_length)?;
    LlamaConfig {
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: 1,
        head_dim: key_length,
        ffn_dim: need("feed_forward_length")?,
        vocab_size,
        context_length,
        rope_freq_base: md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_dim,
        rms_eps: md
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6),
        rope_scaling,
        n_experts,
        n_experts_used: opt("expert_used_count")?.unwrap_or(0),
        moe_renormalize: md.opt_bool(&key("expert_weights_norm"))?.unwrap_or(false),
        attn_temperature,
        attention_scale: mscale * mscale / (qk_head as f32).sqrt(),
        mla: Some(Mla {
            q_lora_rank,
            kv_lora_rank,
            qk_nope_dim: qk_head - rope_dim,
            v_head_dim,
        }),
        experts,
        ..LlamaConfig::base(arch)
    }
    .checked()
}

/// Gemma 3's layer pattern: of every `GEMMA3_PATTERN` layers, the last is global.
pub(crate) const GEMMA3_PATTERN: usize = 6;
/// The RoPE base of Gemma 3's windowed layers (`rope_local_base_freq`).
pub(crate) const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Which of `n_layers` layers are windowed when every `pattern`-th is global (llama.cpp's
/// `set_swa_pattern`: layer `i` is windowed when `i % pattern < pattern - 1`).
pub(crate) fn gemma3_window_layers(n_layers: usize, pattern: usize) -> Vec<bool> {
    (0..n_layers)
        .map(|i| pattern == 0 || i % pattern < pattern - 1)
        .collect()
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
