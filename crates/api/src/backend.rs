//! The seam between HTTP and inference: what the API needs from a chat model and from an
//! embedding model, and their implementations by the engine's types.

use engine::{
    ChatFormat, ChatPrompt, ChatRequest, Embedder, Engine, EngineError, Event, GenerateRequest,
    MetricsSnapshot, ToolCallFormat,
};
use tokio::sync::mpsc::UnboundedReceiver;

/// What the HTTP layer needs from the model server behind it. `engine::Engine` implements
/// it; tests use a fake.
///
/// Every method but [`Backend::generate`] may do CPU work (template rendering,
/// tokenisation); the API calls them off the async executor.
pub trait Backend: Send + Sync + 'static {
    /// The id clients name in `model` and that `/v1/models` lists.
    fn model_id(&self) -> &str;

    /// The context window in tokens: prompt plus completion must fit in it.
    fn context_length(&self) -> usize;

    /// How the model writes tool calls and reasoning. By default: no reasoning block, tools
    /// described in a system message and called in the Hermes format.
    fn chat_format(&self) -> ChatFormat {
        ChatFormat {
            tool_calls: ToolCallFormat::Prompted,
            reasoning: None,
            short_call_ids: false,
        }
    }

    /// Encodes a chat request (messages, tools, template variables) to the prompt's token
    /// ids, generation prompt included: the model's chat template, or the model's own chat
    /// encoding (Mistral's tokenizers). The one way a chat becomes tokens.
    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError>;

    /// Tokenises text as a prompt (special tokens added as the model wants them).
    fn tokenize(&self, text: &str) -> Vec<u32>;

    /// Encodes a fill-in-the-middle prompt; by default the model has no FIM tokens.
    fn tokenize_fim(&self, _prefix: &str, _suffix: &str) -> Result<Vec<u32>, EngineError> {
        Err(EngineError::InvalidRequest(
            "this model has no fill-in-the-middle tokens".into(),
        ))
    }

    /// The id of a token by its vocabulary text (`[TOOL_CALLS]`); `None` by default.
    fn token_id(&self, _text: &str) -> Option<u32> {
        None
    }

    /// The text of token ids (special tokens shown); an id outside the vocabulary is an
    /// `InvalidRequest`.
    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError>;

    /// Starts a generation. Events arrive on the receiver: any number of `Text`, then one
    /// `Done` or `Failed`. Dropping the receiver cancels the generation.
    fn generate(&self, req: GenerateRequest) -> Result<UnboundedReceiver<Event>, EngineError>;

    /// The engine's measurements for `/metrics`; `None` when the backend keeps none.
    fn metrics(&self) -> Option<MetricsSnapshot> {
        None
    }

    /// What the model is (Ollama's `/api/tags`, `/api/show`, `/api/ps`); by default nothing
    /// is known beyond the model's id and context.
    fn facts(&self) -> ModelFacts {
        ModelFacts::default()
    }
}

/// Facts about a served model: its file, size and metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelFacts {
    /// `gguf` or `safetensors`; empty if unknown.
    pub format: String,
    /// The architecture (`llama`, `gemma3`, `bert`); empty if unknown.
    pub architecture: String,
    /// Parameters, counted from the tensors; 0 if unknown.
    pub parameters: u64,
    /// Bytes of the model's files; 0 if unknown.
    pub file_bytes: u64,
    /// Bytes the served model holds in memory beyond its files (its KV cache).
    pub cache_bytes: u64,
    /// When the model's files last changed, Unix seconds; 0 if unknown.
    pub modified_unix_s: u64,
    /// The model file's scalar metadata (GGUF keys such as `general.architecture`,
    /// `llama.context_length`, `general.file_type`).
    pub metadata: Vec<(String, serde_json::Value)>,
    /// The chat template the model file carries, if any.
    pub chat_template: Option<String>,
}

/// What the HTTP layer needs from an embedding model. `engine::Embedder` implements it;
/// tests use a fake. Every method may do CPU work: the API calls [`EmbeddingBackend::tokenize`]
/// and [`EmbeddingBackend::embed`] off the async executor.
pub trait EmbeddingBackend: Send + Sync + 'static {
    /// The id clients name in `model` and that `/v1/models` lists.
    fn model_id(&self) -> &str;

    /// Length of every vector.
    fn dimensions(&self) -> usize;

    /// The longest input in tokens (special tokens included).
    fn max_tokens(&self) -> usize;

    /// The model's token ids for a text, special tokens included; may exceed
    /// [`EmbeddingBackend::max_tokens`].
    fn tokenize(&self, text: &str) -> Vec<u32>;

    /// One vector per token sequence, in order.
    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError>;

    /// [`EmbeddingBackend::embed`] with the energy the call took, when the backend meters it
    /// (by default it does not).
    fn embed_metered(
        &self,
        inputs: &[Vec<u32>],
    ) -> Result<(Vec<Vec<f32>>, Option<engine::Energy>), EngineError> {
        self.embed(inputs).map(|vectors| (vectors, None))
    }

    /// The energy totals for `/metrics`, when the backend meters energy.
    fn energy(&self) -> Option<engine::EnergySnapshot> {
        None
    }

    /// What the model is; by default nothing is known.
    fn facts(&self) -> ModelFacts {
        ModelFacts::default()
    }
}

impl Backend for Engine {
    fn model_id(&self) -> &str {
        Engine::model_id(self)
    }

    fn context_length(&self) -> usize {
        Engine::context_length(self)
    }

    fn chat_format(&self) -> ChatFormat {
        Engine::chat_format(self).clone()
    }

    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        Engine::encode_chat_request(self, request)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        Engine::tokenize(self, text)
    }

    fn tokenize_fim(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, EngineError> {
        Engine::tokenize_fim(self, prefix, suffix)
    }

    fn token_id(&self, text: &str) -> Option<u32> {
        Engine::token_id(self, text)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        Engine::detokenize(self, tokens)
    }

    fn generate(&self, req: GenerateRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        Engine::generate(self, req)
    }

    fn metrics(&self) -> Option<MetricsSnapshot> {
        Some(Engine::metrics(self))
    }

    fn facts(&self) -> ModelFacts {
        let d = Engine::description(self);
        ModelFacts {
            format: d.format.to_owned(),
            architecture: d.architecture.clone(),
            parameters: d.n_params,
            file_bytes: d.file_bytes,
            cache_bytes: d.kv_cache_bytes as u64,
            modified_unix_s: d.modified_unix_s,
            metadata: d.metadata.clone(),
            chat_template: d.chat_template.clone(),
        }
    }
}

impl EmbeddingBackend for Embedder {
    fn model_id(&self) -> &str {
        Embedder::model_id(self)
    }

    fn dimensions(&self) -> usize {
        Embedder::dimensions(self)
    }

    fn max_tokens(&self) -> usize {
        Embedder::max_tokens(self)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        Embedder::tokenize(self, text)
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        Embedder::embed(self, inputs)
    }

    fn embed_metered(
        &self,
        inputs: &[Vec<u32>],
    ) -> Result<(Vec<Vec<f32>>, Option<engine::Energy>), EngineError> {
        Embedder::embed_metered(self, inputs).map(|(vectors, energy)| (vectors, Some(energy)))
    }

    fn energy(&self) -> Option<engine::EnergySnapshot> {
        Some(Embedder::energy(self))
    }

    fn facts(&self) -> ModelFacts {
        ModelFacts {
            format: "safetensors".to_owned(),
            architecture: "bert".to_owned(),
            parameters: Embedder::n_params(self) as u64,
            ..ModelFacts::default()
        }
    }
}
