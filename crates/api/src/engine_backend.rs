//! The engine as the API's [`Backend`]: each method forwards to `engine::Engine`'s own.

use engine::{
    ChatFormat, ChatMessage, ChatPrompt, ChatRequest, Engine, EngineError, Event, GenerateRequest,
    MetricsSnapshot,
};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::Backend;

impl Backend for Engine {
    fn model_id(&self) -> &str {
        Engine::model_id(self)
    }

    fn context_length(&self) -> usize {
        Engine::context_length(self)
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        Engine::render_chat(self, messages)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        Engine::tokenize(self, text)
    }

    fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        Engine::tokenize_chat(self, messages)
    }

    fn tokenize_chat_json(&self, json: &str) -> Option<Result<Vec<u32>, EngineError>> {
        Engine::tokenize_mistral_chat_json(self, json)
    }

    fn chat_format(&self) -> ChatFormat {
        Engine::chat_format(self).clone()
    }

    fn encode_chat(&self, request: &ChatRequest) -> Result<ChatPrompt, EngineError> {
        Engine::encode_chat_request(self, request)
    }

    fn token_id(&self, text: &str) -> Option<u32> {
        Engine::token_id(self, text)
    }

    fn tokenize_fim(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, EngineError> {
        Engine::tokenize_fim(self, prefix, suffix)
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
}
