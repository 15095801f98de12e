//! OpenAI's JSON shapes: requests as clients send them (loosely typed, so that validation
//! can name the bad field) and responses exactly as the official SDKs parse them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Requests. Every field is optional here: `validate` decides what is required, so that a
// missing field gets a message naming it. Unknown fields (`user`, `metadata`, ...) are ignored.
// ---------------------------------------------------------------------------------------------

/// A request struct with the fields every generation endpoint takes (model, limits,
/// sampling, streaming, stop, output constraints) and those of its own.
macro_rules! generation_request {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default, Deserialize)]
        pub(crate) struct $name {
            pub(crate) model: Option<String>,
            pub(crate) max_tokens: Option<i64>,
            pub(crate) temperature: Option<f64>,
            pub(crate) top_p: Option<f64>,
            pub(crate) n: Option<i64>,
            pub(crate) stream: Option<bool>,
            pub(crate) stream_options: Option<StreamOptions>,
            pub(crate) stop: Option<Value>,
            pub(crate) presence_penalty: Option<f64>,
            pub(crate) frequency_penalty: Option<f64>,
            pub(crate) seed: Option<serde_json::Number>,
            pub(crate) top_k: Option<i64>,
            pub(crate) min_p: Option<f64>,
            pub(crate) repetition_penalty: Option<f64>,
            pub(crate) logit_bias: Option<serde_json::Map<String, Value>>,
            /// Mistral's name for `seed`.
            pub(crate) random_seed: Option<serde_json::Number>,
            pub(crate) response_format: Option<ResponseFormat>,
            /// llama.cpp's `grammar` (GBNF).
            pub(crate) grammar: Option<String>,
            /// vLLM's JSON schema.
            pub(crate) guided_json: Option<Value>,
            /// vLLM's regular expression.
            pub(crate) guided_regex: Option<String>,
            /// vLLM's context-free grammar (Lark syntax).
            pub(crate) guided_grammar: Option<String>,
            /// vLLM's switch that names tokens `token_id:<id>` in log-probabilities.
            pub(crate) return_tokens_as_token_ids: Option<bool>,
            $($(#[$fmeta])* pub(crate) $field: $ty,)*
        }
    };
}

generation_request! {
    /// `POST /v1/chat/completions` as received.
    ChatCompletionRequest {
        messages: Option<Vec<RawMessage>>,
        max_completion_tokens: Option<i64>,
        logprobs: Option<bool>,
        top_logprobs: Option<i64>,
        /// Mistral's switch that puts its guardrail prompt before the conversation.
        safe_prompt: Option<bool>,
        /// Functions the model may call.
        tools: Option<Value>,
        /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
        tool_choice: Option<Value>,
        parallel_tool_calls: Option<bool>,
        /// OpenAI's reasoning switch: `none`/`minimal` turn thinking off where the template
        /// has a switch (`enable_thinking`), other values leave it on.
        reasoning_effort: Option<String>,
        /// vLLM's extra chat-template variables (`{"enable_thinking": false}`).
        chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    }
}

generation_request! {
    /// `POST /v1/completions` (and Mistral's FIM) as received.
    CompletionRequest {
        prompt: Option<Value>,
        echo: Option<bool>,
        logprobs: Option<i64>,
        best_of: Option<i64>,
        suffix: Option<String>,
    }
}

/// The fields both endpoints share, borrowed out of either request for one validation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawSampling<'a> {
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) n: Option<i64>,
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<&'a StreamOptions>,
    pub(crate) stop: Option<&'a Value>,
    pub(crate) presence_penalty: Option<f64>,
    pub(crate) frequency_penalty: Option<f64>,
    pub(crate) seed: Option<&'a serde_json::Number>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f64>,
    pub(crate) repetition_penalty: Option<f64>,
    pub(crate) logit_bias: Option<&'a serde_json::Map<String, Value>>,
    pub(crate) random_seed: Option<&'a serde_json::Number>,
}

/// Builds [`RawSampling`] from a request type that has all its fields.
macro_rules! raw_sampling {
    ($req:ty) => {
        impl $req {
            pub(crate) fn raw_sampling(&self) -> RawSampling<'_> {
                RawSampling {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stream: self.stream,
                    stream_options: self.stream_options.as_ref(),
                    stop: self.stop.as_ref(),
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    seed: self.seed.as_ref(),
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    logit_bias: self.logit_bias.as_ref(),
                    random_seed: self.random_seed.as_ref(),
                }
            }
        }
    };
}
raw_sampling!(ChatCompletionRequest);
raw_sampling!(CompletionRequest);

/// One chat message as received; `content` is a string or an array of parts.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawMessage {
    pub(crate) role: Option<String>,
    pub(crate) content: Option<Value>,
    /// Assistant: the calls it made.
    pub(crate) tool_calls: Option<Value>,
    /// Tool: the call this result answers.
    pub(crate) tool_call_id: Option<Value>,
    pub(crate) name: Option<Value>,
    /// Assistant: its reasoning (vLLM's field).
    pub(crate) reasoning_content: Option<Value>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    pub(crate) include_usage: Option<bool>,
}

/// The output constraints a request may carry, borrowed for one validation: OpenAI's
/// `response_format`, llama.cpp's `grammar`, vLLM's `guided_*`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawConstraint<'a> {
    pub(crate) response_format: Option<&'a ResponseFormat>,
    pub(crate) grammar: Option<&'a str>,
    pub(crate) guided_json: Option<&'a Value>,
    pub(crate) guided_regex: Option<&'a str>,
    pub(crate) guided_grammar: Option<&'a str>,
}

/// Builds [`RawConstraint`] from a request type that has all its fields.
macro_rules! raw_constraint {
    ($req:ty) => {
        impl $req {
            pub(crate) fn raw_constraint(&self) -> RawConstraint<'_> {
                RawConstraint {
                    response_format: self.response_format.as_ref(),
                    grammar: self.grammar.as_deref(),
                    guided_json: self.guided_json.as_ref(),
                    guided_regex: self.guided_regex.as_deref(),
                    guided_grammar: self.guided_grammar.as_deref(),
                }
            }
        }
    };
}
raw_constraint!(ChatCompletionRequest);
raw_constraint!(CompletionRequest);

/// `response_format`: `{"type": "text" | "json_object" | "json_schema"}`, the last with
/// `json_schema: {"name", "schema", "strict"}`.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponseFormat {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`; `name`, `description` and `strict` are accepted and the
/// schema is always enforced (as if `strict` were true).
#[derive(Debug, Deserialize)]
pub(crate) struct JsonSchemaFormat {
    pub(crate) schema: Option<Value>,
}

// ---------------------------------------------------------------------------------------------
// Responses.
// ---------------------------------------------------------------------------------------------

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct UsageBody {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) completion_tokens_details: CompletionTokensDetails,
    /// Souverain's extension (clients that do not know it ignore it): the energy the answer
    /// took, joules, and whether it was `measured` or `modelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) energy_joules: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) energy_source: Option<&'static str>,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CompletionTokensDetails {
    pub(crate) reasoning_tokens: usize,
}

impl From<engine::Usage> for UsageBody {
    fn from(usage: engine::Usage) -> Self {
        UsageBody {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: usage.reasoning_tokens,
            },
            energy_joules: usage.energy.map(|e| e.joules()),
            energy_source: usage.energy.map(|e| e.kind.as_str()),
        }
    }
}

/// The fields every response and chunk opens with.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Header<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
}

/// A whole `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    #[serde(flatten)]
    pub(crate) header: Header<'a>,
    pub(crate) choices: Vec<ChatChoice<'a>>,
    pub(crate) usage: UsageBody,
    pub(crate) system_fingerprint: Option<&'a str>,
}

/// One choice of a `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice<'a> {
    pub(crate) index: u32,
    pub(crate) message: AssistantMessage<'a>,
    pub(crate) logprobs: Option<Value>,
    pub(crate) finish_reason: &'static str,
}

/// The assistant's reply.
#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage<'a> {
    pub(crate) role: &'static str,
    /// `null` when the reply is only tool calls.
    pub(crate) content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) tool_calls: Vec<ToolCallBody<'a>>,
}

/// One tool call of a reply, or its piece in a streamed delta.
#[derive(Debug, Serialize)]
pub(crate) struct ToolCallBody<'a> {
    /// Streamed deltas only: which call this piece belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<&'static str>,
    pub(crate) function: FunctionBody<'a>,
}

/// The function of a tool call.
#[derive(Debug, Serialize)]
pub(crate) struct FunctionBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<&'a str>,
    pub(crate) arguments: &'a str,
}

/// One `chat.completion.chunk`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk<'a> {
    #[serde(flatten)]
    pub(crate) header: Header<'a>,
    pub(crate) system_fingerprint: Option<&'a str>,
    pub(crate) choices: Vec<ChatChunkChoice<'a>>,
    /// Absent unless usage was asked for; then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Option<UsageBody>>,
}

/// One choice of a chunk.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChunkChoice<'a> {
    pub(crate) index: u32,
    pub(crate) delta: Delta<'a>,
    pub(crate) logprobs: Option<Value>,
    pub(crate) finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) tool_calls: Vec<ToolCallBody<'a>>,
}

/// A whole `text_completion`, or one streamed chunk of it.
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion<'a> {
    #[serde(flatten)]
    pub(crate) header: Header<'a>,
    pub(crate) choices: Vec<TextChoice<'a>>,
    /// On the whole response always; on chunks only when usage was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Option<UsageBody>>,
    pub(crate) system_fingerprint: Option<&'a str>,
}

/// One choice of a `text_completion`.
#[derive(Debug, Serialize)]
pub(crate) struct TextChoice<'a> {
    pub(crate) text: &'a str,
    pub(crate) index: u32,
    pub(crate) logprobs: Option<Value>,
    pub(crate) finish_reason: Option<&'static str>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelCard<'a> {
    pub(crate) id: std::borrow::Cow<'a, str>,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) owned_by: &'static str,
    /// Where a chat model is (`loaded`, `loading`, `unloaded`), as llama.cpp's router lists
    /// it; OpenAI's clients ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<ModelStatusValue>,
}

/// A model card's `status`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelStatusValue {
    pub(crate) value: &'static str,
    /// The model's other names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) aliases: Vec<String>,
    /// Its last load failed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) failed: bool,
}

/// `/v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelList<'a> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<ModelCard<'a>>,
}

/// The energy headers of a whole answer, whichever API's shape it has:
/// `x-souverain-energy-joules` (the joules of every choice) and `x-souverain-energy-source`
/// (`measured` or `modelled`).
pub(crate) fn with_energy_headers(
    mut response: axum::response::Response,
    energy: Option<engine::Energy>,
) -> axum::response::Response {
    if let Some(e) = energy {
        let headers = response.headers_mut();
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("{:.6}", e.joules())) {
            headers.insert(ENERGY_JOULES_HEADER, v);
        }
        headers.insert(
            ENERGY_SOURCE_HEADER,
            axum::http::HeaderValue::from_static(e.kind.as_str()),
        );
    }
    response
}

/// The joules an answer took.
pub(crate) const ENERGY_JOULES_HEADER: &str = "x-souverain-energy-joules";
/// `measured` or `modelled`.
pub(crate) const ENERGY_SOURCE_HEADER: &str = "x-souverain-energy-source";
