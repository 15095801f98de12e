//! The seam between HTTP and inference: what the API needs from an engine.

use engine::{
    ChatFormat, ChatMessage, ChatPrompt, ChatRequest, EngineError, Event, GenerateRequest,
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

    /// How the model writes tool calls and reasoning. By default: no reasoning block, tools
    /// described in a system message and called in the Hermes format.
    fn chat_format(&self) -> ChatFormat {
        ChatFormat {
            tool_calls: ToolCallFormat::Prompted,
            reasoning: None,
            short_call_ids: false,
        }
    }

    /// Encodes a chat request (tools, tool calls, template variables) to its prompt. By
    /// default the messages' roles and text go through [`Backend::tokenize_chat`].
    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        let messages: Vec<ChatMessage> = request
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap_or_default().to_owned(),
                content: m["content"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        Ok(ChatPrompt {
            tokens: self.tokenize_chat(&messages)?,
            reasoning_open: false,
        })
    }

    /// The id of a token by its vocabulary text (`[TOOL_CALLS]`); `None` by default.
    fn token_id(&self, _text: &str) -> Option<u32> {
        None
    }

    /// Encodes a fill-in-the-middle prompt; by default the model has no FIM tokens.
    fn tokenize_fim(&self, _prefix: &str, _suffix: &str) -> Result<Vec<u32>, EngineError> {
        Err(EngineError::InvalidRequest(
            "this model has no fill-in-the-middle tokens".into(),
        ))
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
