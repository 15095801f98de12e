//! Serving one model to many users: a bounded request queue, continuous batching over a paged
//! KV cache with a prefix cache, sampling and constraints, stop sequences and streaming
//! detokenisation; and [`Embedder`] for embedding models.
//!
//! The engine runs the model on a thread of its own. Callers (the HTTP API, the CLI) submit a
//! [`GenerateRequest`] and receive [`Event`]s over a channel; dropping the receiver cancels the
//! generation at its next step and frees its KV blocks. Every step runs one batched forward
//! pass over one decode token of each running sequence plus prompt chunks of the waiting ones
//! (up to [`EngineConfig::max_batch_tokens`]), so sequences join and leave at every step, first
//! come first served; a full queue answers [`EngineError::Overloaded`].
//!
//! ```no_run
//! use souverain_engine::{Engine, EngineConfig, GenerateRequest, Event};
//! let engine = Engine::load("model.gguf".as_ref(), EngineConfig::default(), &mut |_, _| {})?;
//! let prompt = engine.tokenize("The capital of France is");
//! let mut events = engine.generate(GenerateRequest::new(prompt))?;
//! while let Some(event) = events.blocking_recv() {
//!     if let Event::Text(t) = event { print!("{t}") }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod blocks;
mod chat;
mod constraint;
mod embed;
mod energy;
mod error;
mod fim;
mod gbnf;
mod metrics;
mod reasoning;
mod sampler;
mod scheduler;
mod speculate;
mod stop;
mod text;
mod types;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use model::gguf::{GgufError, GgufFile, Metadata};
use model::{KvPool, LlamaModel, LoadedModel, TokenizerSource};
use tokenizer::{ChatTemplate, Tokenizer, TokenizerSpec};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use chat::ChatEncoder;
pub use chat::{ChatFormat, ChatPrompt, ChatRequest, ToolCallFormat, deepseek};
pub use constraint::lark_accepts;
use constraint::{CompileError, ConstraintCompiler};
pub use embed::{Embedder, EmbedderConfig};
pub use energy::{EnergyAccount, EnergyConfig, EnergyKind, EnergySourceChoice};
pub use error::{EngineError, Failure, LoadError};
pub use gbnf::{GbnfError, gbnf_to_lark};
use metrics::Metrics;
pub use metrics::{EnergySnapshot, HistogramSnapshot, LATENCY_BUCKETS_S, MetricsSnapshot};
pub use model::KvType;
pub use speculate::Speculation;

/// The token greedy decoding picks from one row of logits: the first largest (the engine's
/// own choice at temperature 0, for measurements that time what it does per row).
pub fn greedy_token(logits: &[f32]) -> u32 {
    sampler::argmax(logits)
}
pub use types::{
    ChatMessage, ConstraintSpec, Energy, EnergyTap, Event, FinishReason, GenerateRequest,
    MAX_TOP_LOGPROBS, Priority, ReasoningSpec, SamplingParams, TokenLogprobs, Usage,
};

use scheduler::{Job, Limits, Scheduler};
use text::TextTokenizer;

/// Positions per KV block (the prefix cache shares whole blocks).
pub const KV_BLOCK_TOKENS: usize = 16;

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Worker threads for the matrix products; 0 means one per available core.
    pub threads: usize,
    /// Name the model is served under; `None` takes the file name without extension.
    pub model_id: Option<String>,
    /// Largest sequence (prompt + output) in tokens; `None` takes the model's trained context.
    pub context_length: Option<usize>,
    /// Most sequences generated at once (continuous batching).
    pub max_seqs: usize,
    /// Most requests waiting to start; more are refused with [`EngineError::Overloaded`].
    pub max_waiting: usize,
    /// Tokens of KV cache shared by all sequences; `None` means twice the context length
    /// (one context when `max_seqs` is 1).
    pub kv_cache_tokens: Option<usize>,
    /// Most tokens in one forward pass (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// A Jinja chat template (its source) to use instead of the model's own, as
    /// llama.cpp's `--chat-template-file` and vLLM's `--chat-template`.
    pub chat_template: Option<String>,
    /// How energy is metered and attributed to requests.
    pub energy: EnergyConfig,
    /// The process's energy account, when its engines share one (a server with several
    /// models or an embedding model: one meter for them all, [`EnergyAccount`]); `None`
    /// opens one of the engine's own from `energy`.
    pub energy_account: Option<Arc<EnergyAccount>>,
    /// Speculative decoding (n-gram drafts, or the draft model's); `None` generates one
    /// token per step.
    pub speculation: Option<Speculation>,
    /// A small model of the same vocabulary whose greedy continuations are the drafts
    /// (llama.cpp's `--model-draft`, vLLM's draft-model speculation); speculation is on with
    /// it, `speculation`'s `draft_max` (or the default) bounds each draft.
    pub draft_model: Option<std::path::PathBuf>,
    /// How the KV cache stores keys and values (f16, or Q8_0 at 53% of the bytes).
    pub kv_cache_type: model::KvType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            model_id: None,
            context_length: None,
            max_seqs: 16,
            max_waiting: 256,
            kv_cache_tokens: None,
            max_batch_tokens: 512,
            chat_template: None,
            energy: EnergyConfig::default(),
            energy_account: None,
            speculation: None,
            draft_model: None,
            kv_cache_type: model::KvType::F16,
        }
    }
}

impl GenerateRequest {
    /// A request for `prompt_tokens` with default sampling, no limit but the context, no stop
    /// strings, stopping at end-of-generation tokens.
    pub fn new(prompt_tokens: Vec<u32>) -> Self {
        Self {
            prompt_tokens,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_at_eog: true,
            logprobs: None,
            prompt_logprobs: None,
            keep_special: false,
            reasoning: None,
            constraint: None,
            priority: Priority::Interactive,
            energy_tap: None,
        }
    }
}

/// A loaded model with its tokenizer and a worker thread. Cheap to share behind an `Arc`.
pub struct Engine {
    model_id: String,
    context_length: usize,
    tokenizer: Arc<TextTokenizer>,
    jobs: mpsc::Sender<Job>,
    description: ModelDescription,
    metrics: Arc<Metrics>,
    max_waiting: usize,
    constraints: ConstraintCompiler,
    chat: ChatEncoder,
    /// The FIM marker tokens (llama.cpp's layout); `None` for Mistral's tokenizers.
    fim: Option<fim::FimTokens>,
}

/// Facts about the loaded model, for logs and `inspect`.
#[derive(Clone, Debug)]
pub struct ModelDescription {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// Parameters of the model, counted from its tensors.
    pub n_params: u64,
    /// Trained context length.
    pub trained_context_length: usize,
    /// The SIMD level the kernels chose.
    pub simd: &'static str,
    /// Worker threads.
    pub threads: usize,
    /// Tokens the shared KV cache holds.
    pub kv_cache_tokens: usize,
    /// Bytes of the KV cache.
    pub kv_cache_bytes: usize,
    /// `gguf`, or `safetensors` for a Hugging Face or Mistral directory.
    pub format: &'static str,
    /// Bytes of the model's files on disk (a directory: its files, not recursing).
    pub file_bytes: u64,
    /// When the model file (or directory) was last modified, Unix seconds; 0 if unknown.
    pub modified_unix_s: u64,
    /// The GGUF file's scalar metadata (numbers, booleans, strings cut to
    /// [`MAX_METADATA_STRING`] bytes), in the file's order; arrays (the vocabulary) and the
    /// chat template are left out. Empty for a model directory.
    pub metadata: Vec<(String, serde_json::Value)>,
    /// The chat template in the GGUF file (`tokenizer.chat_template`), if any.
    pub chat_template: Option<String>,
}

/// The longest metadata string [`ModelDescription::metadata`] keeps, in bytes.
pub const MAX_METADATA_STRING: usize = 4096;

/// The scalar metadata of a GGUF file, as JSON values (see [`ModelDescription::metadata`]).
fn scalar_metadata(md: &Metadata) -> Vec<(String, serde_json::Value)> {
    use model::gguf::Value as V;
    md.iter()
        .filter(|(key, _)| !key.starts_with("tokenizer.chat_template"))
        .filter_map(|(key, value)| {
            let json = match value {
                V::Bool(b) => serde_json::Value::Bool(*b),
                V::String(s) => {
                    let mut end = s.len().min(MAX_METADATA_STRING);
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    serde_json::Value::String(s[..end].to_owned())
                }
                V::Array(_) => return None,
                // Through its shortest decimal form, so that 1e-5 reads 1e-5, not f32's
                // 9.999999747378752e-6 widened.
                V::F32(x) => serde_json::Value::from(x.to_string().parse::<f64>().ok()?),
                other => match (other.as_integer(), other.as_float()) {
                    (Some(i), _) => match i64::try_from(i) {
                        Ok(i) => serde_json::Value::from(i),
                        Err(_) => serde_json::Value::from(u64::try_from(i).ok()?),
                    },
                    (None, Some(f)) => serde_json::Value::from(f),
                    (None, None) => return None,
                },
            };
            Some((key.to_owned(), json))
        })
        .collect()
}

/// Bytes of a model on disk (a file, or a directory's files) and when it last changed.
fn disk_facts(path: &Path) -> (u64, u64) {
    let modified = |m: &std::fs::Metadata| {
        m.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    };
    let Ok(meta) = std::fs::metadata(path) else {
        return (0, 0);
    };
    if !meta.is_dir() {
        return (meta.len(), modified(&meta));
    }
    let mut bytes = 0u64;
    let mut latest = modified(&meta);
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if let Ok(m) = entry.metadata()
                && m.is_file()
            {
                bytes = bytes.saturating_add(m.len());
                latest = latest.max(modified(&m));
            }
        }
    }
    (bytes, latest)
}

/// The name a model is served under when none is given: its file (or directory) name
/// without extension.
pub fn default_model_id(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// A string key of GGUF metadata, if present and a string.
fn meta_string(md: &Metadata, key: &str) -> Option<String> {
    md.opt_str(key).ok().flatten().map(str::to_owned)
}

/// What a model file says about itself without its weights being read: its header's facts
/// (for listing a model that is not loaded).
pub fn describe_file(path: &Path) -> Result<ModelDescription, EngineError> {
    let (file_bytes, modified_unix_s) = disk_facts(path);
    let mut d = ModelDescription {
        architecture: String::new(),
        name: None,
        n_params: 0,
        trained_context_length: 0,
        simd: "",
        threads: 0,
        kv_cache_tokens: 0,
        kv_cache_bytes: 0,
        format: "safetensors",
        file_bytes,
        modified_unix_s,
        metadata: Vec::new(),
        chat_template: None,
    };
    if path.is_dir() {
        return Ok(d);
    }
    let file = model::gguf::GgufFile::open(path).map_err(LoadError::Metadata)?;
    let md = file.metadata();
    d.format = "gguf";
    d.architecture = meta_string(md, "general.architecture").unwrap_or_default();
    d.name = meta_string(md, "general.name");
    d.chat_template = meta_string(md, "tokenizer.chat_template");
    d.n_params = file.tensors().iter().map(|t| t.n_elements).sum();
    d.metadata = scalar_metadata(md);
    d.trained_context_length = md
        .opt_u64(&format!("{}.context_length", d.architecture))
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    Ok(d)
}

/// How many entries a draft model's vocabulary may differ from the target's by (llama.cpp's
/// `SPEC_VOCAB_MAX_SIZE_DIFFERENCE`: padding of the embedding table).
const DRAFT_VOCAB_SLACK: usize = 128;

/// Blocks for the sliding-window layers (Gemma 3's local layers, Mistral's): a running
/// sequence holds those from the block of `n_computed + 1 - window` to the end of its step's
/// chunk (at most `max_batch_tokens` positions), so `max_seqs` of them always fit in
/// `(window + max_batch_tokens) / block + 2` blocks each; twice that leaves as much again for
/// the window blocks of cached prefixes. When that is not fewer than the pool's blocks, the
/// windowed layers share the blocks (the same count; the scheduler then keeps one table).
fn window_blocks(
    c: &model::LlamaConfig,
    (max_seqs, max_batch_tokens): (usize, usize),
    kv_blocks: usize,
) -> usize {
    let Some(window) = c.sliding_window else {
        return kv_blocks;
    };
    let per_seq = (window + max_batch_tokens).div_ceil(KV_BLOCK_TOKENS) + 2;
    per_seq
        .saturating_mul(max_seqs)
        .saturating_mul(2)
        .min(kv_blocks)
}

/// Loads the draft model for `target` (`--draft-model`) and the cost model that weighs its
/// work in a step's energy: its vocabulary must be the target's
/// (sizes within [`DRAFT_VOCAB_SLACK`], and for two GGUF files the same token strings where
/// both have one), or its drafts would name other tokens.
fn load_draft_model(
    path: &Path,
    target: &LlamaModel,
    target_tokenizer: &TokenizerSource,
) -> Result<(LlamaModel, energy::CostModel), EngineError> {
    let draft = LoadedModel::open(path, &mut |_, _| {})?;
    let inconsistent = |what: String| {
        EngineError::from(LoadError::Inconsistent(format!(
            "the draft model {}: {what}",
            path.display()
        )))
    };
    // As llama.cpp: sizes may differ by padding (at most 128 entries), the tokens both have
    // must be the same.
    let (ours, theirs) = (target.config().vocab_size, draft.model.config().vocab_size);
    if ours.abs_diff(theirs) > DRAFT_VOCAB_SLACK {
        return Err(inconsistent(format!(
            "its vocabulary has {theirs} tokens, the model's {ours}"
        )));
    }
    if let (TokenizerSource::Gguf(a), TokenizerSource::Gguf(b)) =
        (target_tokenizer, &draft.tokenizer)
    {
        let tokens = |f: &GgufFile| {
            f.metadata()
                .get_str_array("tokenizer.ggml.tokens")
                .map(|t| t.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .ok()
        };
        let (a, b) = (tokens(a), tokens(b));
        let same = match (&a, &b) {
            (Some(a), Some(b)) => a.iter().zip(b).all(|(x, y)| x == y),
            _ => a.is_none() && b.is_none(),
        };
        if !same {
            return Err(inconsistent("its tokens differ from the model's".into()));
        }
    }
    tracing::info!(
        draft = %path.display(),
        architecture = %draft.model.config().architecture,
        "speculative decoding with a draft model"
    );
    let c = draft.model.config();
    let cost = energy::CostModel::new(draft.tensors.n_params, c.n_layers, c.n_heads, c.head_dim);
    Ok((draft.model, cost))
}

impl Engine {
    /// Opens and validates a model (a GGUF file, or a directory in the Hugging Face or
    /// Mistral layout), builds its tokenizer and starts the worker thread.
    /// `progress(done, total)` reports weight loading.
    pub fn load(
        path: &Path,
        config: EngineConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, EngineError> {
        let loaded = LoadedModel::open(path, progress)?;
        let model = loaded.model;
        let (metadata, chat_template) = match &loaded.tokenizer {
            TokenizerSource::Gguf(file) => (
                scalar_metadata(file.metadata()),
                meta_string(file.metadata(), "tokenizer.chat_template"),
            ),
            _ => (Vec::new(), None),
        };
        let format = match loaded.format {
            model::ModelFormat::Gguf => "gguf",
            _ => "safetensors",
        };
        let (file_bytes, modified_unix_s) = disk_facts(path);
        let name = match &loaded.tokenizer {
            TokenizerSource::Gguf(file) => meta_string(file.metadata(), "general.name"),
            _ => None,
        };
        let text = text_tokenizer(&loaded.tokenizer)?;
        let fim = fim::FimTokens::find(
            match &loaded.tokenizer {
                TokenizerSource::Gguf(file) => Some(file.metadata()),
                _ => None,
            },
            &text,
        );
        // Embedding tables are often padded past the tokenizer's vocabulary, never shorter.
        if text.vocab_size() > model.config().vocab_size {
            return Err(LoadError::Inconsistent(format!(
                "tokenizer has {} tokens but the model's embedding has {} rows",
                text.vocab_size(),
                model.config().vocab_size
            ))
            .into());
        }
        let chat = ChatEncoder::new(&text, config.chat_template.as_deref())?;
        let tokenizer = Arc::new(text);
        let trained = model.config().context_length;
        let context_length = match config.context_length {
            Some(n) if n == 0 || n > trained => {
                return Err(LoadError::Inconsistent(format!(
                    "context length {n} must be in 1..={trained}"
                ))
                .into());
            }
            Some(n) => n,
            None => trained,
        };
        let threads = match config.threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let model_id = config.model_id.unwrap_or_else(|| default_model_id(path));
        if config.max_seqs == 0 || config.max_batch_tokens == 0 {
            return Err(LoadError::Inconsistent(
                "max_seqs and max_batch_tokens must be at least 1".into(),
            )
            .into());
        }
        let default_kv = if config.max_seqs == 1 { 1 } else { 2 } * context_length;
        let kv_tokens = config.kv_cache_tokens.unwrap_or(default_kv);
        if kv_tokens < context_length {
            return Err(LoadError::Inconsistent(format!(
                "the KV cache ({kv_tokens} tokens) must hold at least one full context ({context_length} tokens)"
            )).into());
        }
        let kv_blocks = kv_tokens.div_ceil(KV_BLOCK_TOKENS);
        let kv = KvPool::typed(
            model.config(),
            KV_BLOCK_TOKENS,
            kv_blocks,
            window_blocks(
                model.config(),
                (config.max_seqs, config.max_batch_tokens),
                kv_blocks,
            ),
            config.kv_cache_type,
        )
        .map_err(LoadError::from)?;
        let description = ModelDescription {
            architecture: model.config().architecture.clone(),
            name,
            n_params: loaded.tensors.n_params,
            trained_context_length: trained,
            simd: model::kernels_simd_level(),
            threads,
            kv_cache_tokens: kv.n_blocks() * kv.block_tokens(),
            kv_cache_bytes: kv.bytes(),
            format,
            file_bytes,
            modified_unix_s,
            metadata,
            chat_template,
        };
        let account = match &config.energy_account {
            Some(a) => a.clone(),
            None => {
                EnergyAccount::open(&config.energy, threads).map_err(LoadError::Inconsistent)?
            }
        };
        let cost = {
            let c = model.config();
            energy::CostModel::new(loaded.tensors.n_params, c.n_layers, c.n_heads, c.head_dim)
        };
        let metrics = Arc::new(Metrics::default());
        let energy = energy::EnergyLedger::new(account, metrics.clone(), threads);
        if let Some(s) = &config.speculation {
            s.validate().map_err(LoadError::Inconsistent)?;
        }
        let draft_model = match &config.draft_model {
            Some(p) => Some(load_draft_model(p, &model, &loaded.tokenizer)?),
            None => None,
        };
        let speculation = match (&draft_model, config.speculation) {
            (Some(_), None) => Some(Speculation::default()),
            (_, s) => s,
        };
        let limits = Limits {
            max_seqs: config.max_seqs,
            max_batch_tokens: config.max_batch_tokens,
            context_length,
            speculation,
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        let scheduler = Scheduler::new(
            model,
            tokenizer.clone(),
            model::ThreadPool::new(threads),
            kv,
            limits,
            metrics.clone(),
            (energy, cost),
        );
        let scheduler = match draft_model {
            Some((d, cost)) => scheduler.with_draft_model(d, cost),
            None => scheduler,
        };
        thread::Builder::new()
            .name("souverain-engine".into())
            .spawn(move || scheduler.run(rx))
            .map_err(LoadError::Thread)?;
        Ok(Self {
            model_id,
            context_length,
            constraints: ConstraintCompiler::new(tokenizer.clone()),
            tokenizer,
            jobs,
            description,
            metrics,
            max_waiting: config.max_waiting,
            chat,
            fim,
        })
    }

    /// The name the model is served under.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The longest sequence (prompt + completion) in tokens.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Facts about the model for logs.
    pub fn description(&self) -> &ModelDescription {
        &self.description
    }

    /// Renders a chat as the text the model sees, ending with the assistant's turn opened.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.render_chat_request(&ChatRequest::from_messages(messages))
    }

    /// Encodes a chat straight to the token ids the model sees, generation prompt included.
    pub fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        Ok(self
            .encode_chat_request(&ChatRequest::from_messages(messages))?
            .tokens)
    }

    /// How the model writes tool calls and reasoning.
    pub fn chat_format(&self) -> &ChatFormat {
        self.chat.format()
    }

    /// Renders a chat request (tools, tool calls and results, template variables) as the
    /// text the model sees, the assistant's turn opened.
    pub fn render_chat_request(&self, request: &ChatRequest) -> Result<String, EngineError> {
        self.chat.render(&self.tokenizer, request)
    }

    /// Encodes a chat request to its prompt tokens, and says whether the prompt opened the
    /// model's reasoning block.
    pub fn encode_chat_request(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        self.chat.encode(&self.tokenizer, request)
    }

    /// The id of a token by its vocabulary text (`[TOOL_CALLS]`, `<tool_call>`, ...).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_id(text)
    }

    /// For a model with Mistral's chat format, encodes a chat request given as JSON (messages
    /// with tool calls and results, `tools`) exactly as mistral-common does; `None` for
    /// models whose chats go through a template.
    pub fn tokenize_mistral_chat_json(&self, json: &str) -> Option<Result<Vec<u32>, EngineError>> {
        let TextTokenizer::Mistral(m) = self.tokenizer.as_ref() else {
            return None;
        };
        Some(
            tokenizer::MistralChatRequest::from_json(json)
                .map_err(|e| EngineError::InvalidRequest(format!("invalid chat request: {e}")))
                .and_then(|req| {
                    m.encode_chat(&req)
                        .map_err(|e| EngineError::InvalidRequest(e.to_string()))
                }),
        )
    }

    /// Tokenises text as a prompt: BOS when the model asks for it (once); with a GGUF
    /// tokenizer, special-token text (such as `<|im_start|>`) becomes its token.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode_prompt(text)
    }

    /// The text of token ids, special tokens shown.
    pub fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.tokenizer.decode(tokens)
    }

    /// The prompt for filling the gap between `prefix` and `suffix` (empty for none): with
    /// Mistral's tokenizer files `<s> [SUFFIX] suffix [PREFIX] prefix`, as mistral-common's
    /// `encode_fim`; otherwise llama.cpp's `/infill` layout, `[BOS] FIM_PRE prefix FIM_SUF
    /// suffix FIM_MID`, with the markers the GGUF metadata names or llama.cpp recognises by
    /// their text (`<fim_prefix>`, `<|fim_prefix|>`, `<PRE>`, ...). Special-token text in
    /// `prefix` and `suffix` stays text (except in `tokenizer.json` tokenizers, whose added
    /// tokens always match). What the model generates is the middle.
    ///
    /// Errors: [`EngineError::InvalidRequest`] when the model has no fill-in-the-middle
    /// tokens (or, for Mistral, its tokenizer version has no FIM).
    pub fn tokenize_fim(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, EngineError> {
        fim::encode_fim(&self.tokenizer, self.fim, prefix, suffix)
    }

    /// Queues a generation. Events arrive on the returned channel; dropping it cancels.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        validate(&request, self.context_length)?;
        let vocab = self.tokenizer.vocab_size();
        if let Some(&bad) = request.prompt_tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt holds token {bad}, outside the vocabulary of {vocab}"
            )));
        }
        if let Some(&(bad, _)) = request
            .sampling
            .logit_bias
            .iter()
            .find(|&&(t, _)| t as usize >= vocab)
        {
            return Err(EngineError::InvalidRequest(format!(
                "logit_bias names token {bad}, outside the vocabulary of {vocab}"
            )));
        }
        // Compiled before queueing, so that a bad grammar is refused at once; the caller
        // waits while a thread of the compiler's own (large stack, time limit) compiles it.
        let constraint = match &request.constraint {
            Some(spec) => Some(self.constraints.compile(spec).map_err(|e| match e {
                CompileError::Invalid(why) => {
                    EngineError::InvalidRequest(format!("the output constraint is invalid: {why}"))
                }
                CompileError::Busy => EngineError::Overloaded {
                    waiting: constraint::MAX_CONCURRENT_COMPILES,
                },
            })?),
            None => None,
        };
        let queued = &self.metrics.queued;
        let waiting = queued.fetch_add(1, Relaxed) as usize;
        if waiting >= self.max_waiting {
            queued.fetch_sub(1, Relaxed);
            self.metrics.requests_rejected.fetch_add(1, Relaxed);
            return Err(EngineError::Overloaded { waiting });
        }
        let (events, rx) = unbounded_channel();
        let job = Job {
            request,
            constraint,
            events,
            arrival: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            queued.fetch_sub(1, Relaxed);
            return Err(EngineError::Unavailable(
                "the engine thread has stopped".into(),
            ));
        }
        Ok(rx)
    }

    /// The engine's measurements now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
}

fn validate(r: &GenerateRequest, context_length: usize) -> Result<(), EngineError> {
    if r.prompt_tokens.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if r.prompt_tokens.len() >= context_length {
        return Err(EngineError::ContextLengthExceeded {
            prompt_tokens: r.prompt_tokens.len(),
            context_length,
        });
    }
    let s = &r.sampling;
    let bad = |what: &str| Err(EngineError::InvalidRequest(what.to_owned()));
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return bad("temperature must be a finite number >= 0");
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return bad("top_p must be in (0, 1]");
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return bad("min_p must be in [0, 1]");
    }
    if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
        return bad("repetition_penalty must be > 0");
    }
    if !(s.frequency_penalty.is_finite() && s.presence_penalty.is_finite()) {
        return bad("penalties must be finite");
    }
    if r.max_tokens == Some(0) {
        return bad("max_tokens must be at least 1");
    }
    if r.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return bad("top_logprobs must be at most 20");
    }
    if r.prompt_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return bad("prompt_logprobs must be at most 20");
    }
    if s.logit_bias
        .iter()
        .any(|&(_, b)| !(-100.0..=100.0).contains(&b))
    {
        return bad("logit_bias values must be in [-100, 100]");
    }
    Ok(())
}

/// A JSON schema as constrained decoding enforces it: no free whitespace between JSON
/// tokens, and unbounded numbers bounded so that no output runs on forever (every output
/// stays valid under the schema as given). For embedding a schema in a Lark grammar
/// (`%json {...}`), as tool-call grammars do.
pub fn finite_json_schema(schema: serde_json::Value) -> serde_json::Value {
    constraint::compact(schema)
}

/// Builds the tokenizer a model ships, wherever it is.
fn text_tokenizer(source: &TokenizerSource) -> Result<TextTokenizer, EngineError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| LoadError::read(p, e));
    match source {
        TokenizerSource::Gguf(file) => gguf_text_tokenizer(file.metadata()),
        TokenizerSource::Tekken(p) | TokenizerSource::SentencePiece(p) => {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let m = tokenizer::MistralTokenizer::from_bytes(&name, &read(p)?)
                .map_err(LoadError::from)?;
            Ok(TextTokenizer::Mistral(m))
        }
        TokenizerSource::HuggingFace {
            tokenizer_json,
            tokenizer_config,
        } => {
            let config = match tokenizer_config {
                Some(p) => Some(read(p)?),
                None => None,
            };
            let h = tokenizer::HfTokenizer::from_json(&read(tokenizer_json)?, config.as_deref())
                .map_err(LoadError::from)?;
            Ok(TextTokenizer::HuggingFace(h))
        }
        _ => Err(LoadError::Inconsistent(
            "the model directory has no tokenizer this build reads (tekken.json, \
             tokenizer.model.v*, or tokenizer.json)"
                .into(),
        )
        .into()),
    }
}

/// The tokenizer and chat template a GGUF file carries.
fn gguf_text_tokenizer(md: &Metadata) -> Result<TextTokenizer, EngineError> {
    let spec = tokenizer_spec(md).map_err(LoadError::from)?;
    let add_bos = spec.add_bos;
    let arch = md.opt_str("general.architecture").ok().flatten();
    let template = match spec.chat_template.as_deref().or(fallback_template(arch)) {
        Some(src) => Some(ChatTemplate::new(src).map_err(LoadError::from)?),
        None => None,
    };
    let tokenizer = Tokenizer::from_spec(spec).map_err(LoadError::from)?;
    Ok(TextTokenizer::bpe(tokenizer, template, add_bos))
}

/// The chat template of an architecture whose GGUF files may carry none: Gemma's turn format
/// (`templates/gemma.jinja`; llama.cpp's converter writes the template only when the
/// Hugging Face files have one, and some Gemma 3 GGUF files lack it).
fn fallback_template(architecture: Option<&str>) -> Option<&'static str> {
    match architecture? {
        "gemma3" => Some(include_str!("templates/gemma.jinja")),
        _ => None,
    }
}

/// Reads the tokenizer description out of GGUF metadata (`tokenizer.ggml.*`).
pub fn tokenizer_spec(md: &Metadata) -> Result<TokenizerSpec, GgufError> {
    let model = md.get_str("tokenizer.ggml.model")?.to_owned();
    let tokens = md
        .get_str_array("tokenizer.ggml.tokens")?
        .into_iter()
        .map(str::to_owned)
        .collect();
    let token_types = match md.get("tokenizer.ggml.token_type") {
        Some(_) => Some(md.get_i32_array("tokenizer.ggml.token_type")?),
        None => None,
    };
    let merges = match md.get("tokenizer.ggml.merges") {
        Some(_) => md
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    let id = |k: &str| md.opt_u32(k);
    Ok(TokenizerSpec {
        model,
        pre: md.opt_str("tokenizer.ggml.pre")?.map(str::to_owned),
        tokens,
        token_types,
        merges,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        eot_id: id("tokenizer.ggml.eot_token_id")?,
        unk_id: id("tokenizer.ggml.unknown_token_id")?,
        pad_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos: md
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false),
        add_eos: md
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        chat_template: md.opt_str("tokenizer.chat_template")?.map(str::to_owned),
        scores: match md.get("tokenizer.ggml.scores") {
            Some(_) => Some(md.get_f32_array("tokenizer.ggml.scores")?),
            None => None,
        },
        add_space_prefix: md.opt_bool("tokenizer.ggml.add_space_prefix")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let ok = GenerateRequest::new(vec![1, 2, 3]);
        assert!(validate(&ok, 10).is_ok());
        let long = GenerateRequest::new(vec![1; 10]);
        let err = validate(&long, 10).unwrap_err().to_string();
        assert!(err.contains("context length is 10"), "{err}");
        assert!(validate(&GenerateRequest::new(vec![]), 10).is_err());
        let mut r = ok.clone();
        r.sampling.top_p = 0.0;
        assert!(validate(&r, 10).unwrap_err().to_string().contains("top_p"));
        let mut r = ok.clone();
        r.sampling.temperature = f32::NAN;
        assert!(validate(&r, 10).is_err());
        let mut r = ok.clone();
        r.max_tokens = Some(0);
        assert!(validate(&r, 10).is_err());
        let mut r = ok;
        r.prompt_logprobs = Some(MAX_TOP_LOGPROBS + 1);
        let err = validate(&r, 10).unwrap_err().to_string();
        assert!(err.contains("prompt_logprobs"), "{err}");
        r.prompt_logprobs = Some(MAX_TOP_LOGPROBS);
        assert!(validate(&r, 10).is_ok());
    }
}
