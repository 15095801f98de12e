//! Chat requests as [`MistralTokenizer::encode_chat`](crate::MistralTokenizer::encode_chat) takes
//! them: the OpenAI shape of `messages` and `tools` (what `ChatCompletionRequest.from_openai`
//! accepts in mistral-common), deserialisable straight from request JSON.
//!
//! Tool schemas and call arguments are [`JsonValue`]s, which keep their key order: deserialise
//! these types from the request text directly (not through `serde_json::Value`, which sorts
//! keys), or the encoded JSON will differ from mistral-common's.

use serde::{Deserialize, Serialize};

use crate::pyjson::JsonValue;

/// A chat request: the conversation and the tools the model may call.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct MistralChatRequest {
    /// The conversation, oldest first.
    pub messages: Vec<MistralMessage>,
    /// Tool definitions (`{"type": "function", "function": {...}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<MistralTool>>,
    /// Continue the last (assistant) message instead of starting a new turn: no end-of-sequence
    /// token after it.
    #[serde(default)]
    pub continue_final_message: bool,
}

/// One message.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct MistralMessage {
    /// `"system"` (or `"developer"`), `"user"`, `"assistant"` or `"tool"`.
    pub role: String,
    /// A string, a list of chunks, or nothing (an assistant message with only tool calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MistralContent>,
    /// Assistant only: the calls it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<MistralToolCall>>,
    /// Tool only: the id of the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Tool only: the function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Assistant only: reasoning text, encoded as a leading thinking chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Assistant only: the same as `reasoning_content` (both may be given if equal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Assistant only (Mistral's API): this message is a prefix the model continues.
    #[serde(default)]
    pub prefix: bool,
}

/// Message content.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MistralContent {
    /// Plain text.
    Text(String),
    /// A list of chunks.
    Chunks(Vec<MistralChunk>),
}

/// One content chunk: `{"type": "text", "text": ...}` or
/// `{"type": "thinking", "thinking": ..., "closed": true}`. Other types (images, audio) are
/// rejected when encoding.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct MistralChunk {
    /// The chunk type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `text` chunks: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `thinking` chunks: the reasoning text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    /// `thinking` chunks: whether the block is finished (default true); an open block gets
    /// no `[/THINK]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<bool>,
}

/// A tool call made by the assistant.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MistralToolCall {
    /// The call id (Mistral's are 9 alphanumeric characters); absent means `"null"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `"function"`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function and its arguments.
    pub function: MistralFunctionCall,
}

/// The function part of a tool call.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MistralFunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments: a JSON string (OpenAI) or a JSON object.
    #[serde(default = "empty_object")]
    pub arguments: JsonValue,
}

/// A tool definition.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MistralTool {
    /// `"function"`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function.
    pub function: MistralFunction,
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MistralFunction {
    /// Name (`[a-zA-Z0-9_-]{1,64}`).
    pub name: String,
    /// What it does (default empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments (default `{}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<JsonValue>,
    /// OpenAI's strict flag; not part of the encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

fn empty_object() -> JsonValue {
    JsonValue::Object(Vec::new())
}

impl MistralChatRequest {
    /// Parses a request from JSON text (`{"messages": [...], "tools": [...]}`), keeping key
    /// order.
    pub fn from_json(text: &str) -> Result<MistralChatRequest, serde_json::Error> {
        serde_json::from_str(text)
    }
}
