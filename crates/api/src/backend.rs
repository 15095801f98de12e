//! The seam between HTTP and inference: what the API needs from an engine.

use engine::{ChatMessage, EngineError, Event, GenerateRequest, MetricsSnapshot};
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

    /// Renders a conversation with the model's chat template, ending with the prompt of the
    /// assistant's turn.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;

    /// Tokenises text as a prompt (special tokens added as the model wants them).
    fn tokenize(&self, text: &str) -> Vec<u32>;

    /// Encodes a conversation to the prompt's token ids. By default the rendered chat is
    /// tokenised; a model whose chat format is defined on tokens (Mistral's) encodes it
    /// directly.
    fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenize(&self.render_chat(messages)?))
    }

    /// Encodes a chat request given as JSON (OpenAI's shape, `tools` included) when the
    /// model's chat format is defined on tokens (Mistral's); `None` otherwise.
    fn tokenize_chat_json(&self, _json: &str) -> Option<Result<Vec<u32>, EngineError>> {
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
}
