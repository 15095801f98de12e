//! OpenAI's Responses API (`/v1/responses`): its request as clients send it, translated into
//! the one chat request that `validate` checks (as Anthropic's Messages are, so that nothing
//! about validation, tools, constrained decoding or the engine path is written twice), and
//! what a response echoes of its request.
//!
//! `input` (a string, or a list of items) and `instructions` become chat messages:
//! `instructions` the first (system) message; a `message` item a message of its role, its
//! `input_text`/`output_text` parts joined; `function_call` items the `tool_calls` of an
//! assistant turn (one turn for consecutive calls, and for the text before them);
//! `function_call_output` items `tool` messages; `reasoning` items the `reasoning_content` of
//! the assistant turn that follows them. Earlier turns (`previous_response_id`) come first, as
//! items. Function `tools` (flat, `{type, name, description, parameters, strict}`) become
//! chat functions, `tool_choice` `{type: function, name}` a named function, `text.format`
//! (`json_schema` or `json_object`) the `response_format` that constrained decoding follows,
//! `reasoning.effort` `reasoning_effort`, `max_output_tokens` `max_completion_tokens`. Images,
//! files and hosted tools are refused with a 400: the served models read text, and this
//! server runs no tools of its own.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, JsonSchemaFormat, RawMessage, ResponseFormat};

/// The most `metadata` pairs (OpenAI's limit), and the longest key and value, in characters.
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;
/// The longest `user` and `previous_response_id` kept, in characters.
const MAX_ID_CHARS: usize = 256;

/// The reasoning efforts `reasoning.effort` may name (those `validate` takes).
const EFFORTS: [&str; 5] = ["none", "minimal", "low", "medium", "high"];

/// `POST /v1/responses` as received. Every field is optional here so that the translation
/// names what is missing or wrong; `include`, `truncation`, `service_tier`, `prompt_cache_key`
/// and other fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResponsesRequest {
    pub(crate) model: Option<String>,
    pub(crate) input: Option<Value>,
    pub(crate) instructions: Option<Value>,
    pub(crate) tools: Option<Value>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) text: Option<Value>,
    pub(crate) reasoning: Option<Value>,
    pub(crate) max_output_tokens: Option<i64>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) parallel_tool_calls: Option<bool>,
    pub(crate) metadata: Option<Value>,
    pub(crate) user: Option<Value>,
    pub(crate) stream: Option<bool>,
    pub(crate) store: Option<bool>,
    pub(crate) previous_response_id: Option<Value>,
    pub(crate) background: Option<bool>,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// What a response echoes of its request (OpenAI's response object repeats its settings), as
/// the request gave them or their defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) instructions: Option<String>,
    pub(crate) max_output_tokens: Option<i64>,
    pub(crate) metadata: Map<String, Value>,
    pub(crate) parallel_tool_calls: bool,
    pub(crate) previous_response_id: Option<String>,
    pub(crate) effort: Option<String>,
    pub(crate) temperature: f64,
    pub(crate) top_p: f64,
    pub(crate) format: Value,
    pub(crate) tool_choice: Value,
    pub(crate) tools: Vec<Value>,
    pub(crate) user: Option<String>,
}

impl Settings {
    /// The response object's fields that repeat the request, `store` being whether it is
    /// stored.
    pub(crate) fn echo(&self, store: bool) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("instructions".into(), json!(self.instructions));
        out.insert("max_output_tokens".into(), json!(self.max_output_tokens));
        out.insert("metadata".into(), Value::Object(self.metadata.clone()));
        out.insert(
            "parallel_tool_calls".into(),
            json!(self.parallel_tool_calls),
        );
        out.insert(
            "previous_response_id".into(),
            json!(self.previous_response_id),
        );
        out.insert(
            "reasoning".into(),
            json!({"effort": self.effort, "summary": null}),
        );
        out.insert("store".into(), json!(store));
        out.insert("temperature".into(), json!(self.temperature));
        out.insert("text".into(), json!({"format": self.format}));
        out.insert("tool_choice".into(), self.tool_choice.clone());
        out.insert("tools".into(), Value::Array(self.tools.clone()));
        out.insert("top_p".into(), json!(self.top_p));
        out.insert("truncation".into(), json!("disabled"));
        out.insert("user".into(), json!(self.user));
        out
    }
}

/// A request checked and translated: the chat request, this request's input as items, and
/// what its response echoes.
#[derive(Debug)]
pub(crate) struct Translated {
    pub(crate) chat: ChatCompletionRequest,
    /// `input` as a list of items (a string is one user `message`).
    pub(crate) input: Vec<Value>,
    pub(crate) settings: Settings,
}

/// The request's `previous_response_id`, checked (before anything is looked up).
pub(crate) fn previous_response_id(req: &ResponsesRequest) -> Result<Option<String>, ApiError> {
    match &req.previous_response_id {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_ID_CHARS => {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(invalid(
            "previous_response_id",
            format!(
                "`previous_response_id` must be a response id (a string of 1 to {MAX_ID_CHARS} \
                 characters)"
            ),
        )),
    }
}

/// Translates `req`, whose conversation so far (`previous_response_id`'s input and output
/// items) is `history`.
pub(crate) fn translate(req: &ResponsesRequest, history: &[Value]) -> Result<Translated, ApiError> {
    if req.background == Some(true) {
        return Err(invalid(
            "background",
            "`background` responses are not supported: this server answers while the client \
             waits (use `stream` for long answers)",
        ));
    }
    let input = input_items(req.input.as_ref())?;
    let instructions = match &req.instructions {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err(invalid("instructions", "`instructions` must be a string")),
    };
    let mut messages = Vec::new();
    if let Some(text) = &instructions {
        messages.push(RawMessage {
            role: Some("system".to_owned()),
            content: Some(Value::String(text.clone())),
            ..RawMessage::default()
        });
    }
    let mut turns = Turns::default();
    for (i, item) in history.iter().enumerate() {
        turns.item(item, &format!("previous_response_id[{i}]"), &mut messages)?;
    }
    for (i, item) in input.iter().enumerate() {
        turns.item(item, &format!("input[{i}]"), &mut messages)?;
    }
    let tools = match &req.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools.clone(),
        Some(_) => return Err(invalid("tools", "`tools` must be an array")),
    };
    let chat_tools = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| translate_tool(i, tool))
        .collect::<Result<Vec<_>, _>>()?;
    let tool_choice = match &req.tool_choice {
        None | Some(Value::Null) => None,
        Some(choice) => Some(translate_tool_choice(choice)?),
    };
    let (format, response_format) = text_format(req.text.as_ref())?;
    let effort = reasoning_effort(req.reasoning.as_ref())?;
    if let Some(n) = req.max_output_tokens
        && n < 1
    {
        return Err(invalid(
            "max_output_tokens",
            format!("`max_output_tokens` is {n}; it must be at least 1"),
        ));
    }
    let settings = Settings {
        instructions,
        max_output_tokens: req.max_output_tokens,
        metadata: metadata(req.metadata.as_ref())?,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        previous_response_id: previous_response_id(req)?,
        effort: effort.clone(),
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        format,
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        tools,
        user: user(req.user.as_ref())?,
    };
    let chat = ChatCompletionRequest {
        model: req.model.clone(),
        max_completion_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stream: req.stream,
        messages: Some(messages),
        tools: (!chat_tools.is_empty()).then_some(Value::Array(chat_tools)),
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
        reasoning_effort: effort,
        response_format,
        ..ChatCompletionRequest::default()
    };
    Ok(Translated {
        chat,
        input,
        settings,
    })
}

/// `input` as items: a string is one user message.
fn input_items(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match input {
        None | Some(Value::Null) => Err(invalid("input", "`input` is required")),
        Some(Value::String(text)) => Ok(vec![
            json!({"type": "message", "role": "user", "content": text}),
        ]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid("input", "`input` must contain at least one item"))
        }
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(invalid(
            "input",
            "`input` must be a string or an array of input items",
        )),
    }
}

/// Items becoming chat messages: reasoning waits for the assistant turn it belongs to.
#[derive(Default)]
struct Turns {
    reasoning: Vec<String>,
}

impl Turns {
    /// Appends the chat messages of item `item`, named `field` in errors.
    fn item(
        &mut self,
        item: &Value,
        field: &str,
        out: &mut Vec<RawMessage>,
    ) -> Result<(), ApiError> {
        if !item.is_object() {
            return Err(invalid(
                field,
                format!("`{field}` must be an input item (an object)"),
            ));
        }
        let kind = match item.get("type") {
            None | Some(Value::Null) => "message",
            Some(Value::String(kind)) => kind.as_str(),
            Some(_) => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!("`{field}.type` must be a string"),
                ));
            }
        };
        match kind {
            "message" => self.message(item, field, out),
            "function_call" => {
                let call_id = string_field(item, field, "call_id")?;
                let name = string_field(item, field, "name")?;
                let arguments = string_field(item, field, "arguments")?;
                let call = json!({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments}});
                match out.last_mut() {
                    // The same assistant turn: its text, or calls before this one.
                    Some(last) if last.role.as_deref() == Some("assistant") => {
                        match &mut last.tool_calls {
                            Some(Value::Array(calls)) => calls.push(call),
                            _ => last.tool_calls = Some(Value::Array(vec![call])),
                        }
                    }
                    _ => out.push(RawMessage {
                        role: Some("assistant".to_owned()),
                        tool_calls: Some(Value::Array(vec![call])),
                        reasoning_content: self.take_reasoning(),
                        ..RawMessage::default()
                    }),
                }
                Ok(())
            }
            "function_call_output" => {
                let call_id = string_field(item, field, "call_id")?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => parts_text(parts, &format!("{field}.output"))?,
                    _ => {
                        return Err(invalid(
                            format!("{field}.output"),
                            format!(
                                "`{field}.output` must be a string or an array of `input_text` \
                                 parts"
                            ),
                        ));
                    }
                };
                out.push(RawMessage {
                    role: Some("tool".to_owned()),
                    content: Some(Value::String(output)),
                    tool_call_id: Some(Value::String(call_id.to_owned())),
                    ..RawMessage::default()
                });
                Ok(())
            }
            "reasoning" => {
                // Reasoning text as this server writes it (`content`), or a summary of it.
                let mut texts = Vec::new();
                for key in ["content", "summary"] {
                    if let Some(Value::Array(parts)) = item.get(key) {
                        texts.extend(
                            parts
                                .iter()
                                .filter_map(|p| p.get("text").and_then(Value::as_str))
                                .map(str::to_owned),
                        );
                    }
                    if !texts.is_empty() {
                        break;
                    }
                }
                self.reasoning.extend(texts);
                Ok(())
            }
            other => Err(invalid(
                format!("{field}.type"),
                format!(
                    "`{field}` is an item of type `{other}`, which is not supported here; \
                     expected `message`, `function_call`, `function_call_output` or \
                     `reasoning`"
                ),
            )),
        }
    }

    fn take_reasoning(&mut self) -> Option<Value> {
        (!self.reasoning.is_empty())
            .then(|| Value::String(std::mem::take(&mut self.reasoning).join("\n")))
    }

    fn message(
        &mut self,
        item: &Value,
        field: &str,
        out: &mut Vec<RawMessage>,
    ) -> Result<(), ApiError> {
        let role = match item.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant" | "system" | "developer")) => role,
            _ => {
                return Err(invalid(
                    format!("{field}.role"),
                    format!("`{field}.role` must be `user`, `assistant`, `system` or `developer`"),
                ));
            }
        };
        let content_field = format!("{field}.content");
        let text = match item.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts_text(parts, &content_field)?,
            _ => {
                return Err(invalid(
                    &content_field,
                    format!("`{content_field}` must be a string or an array of content parts"),
                ));
            }
        };
        let reasoning_content = if role == "assistant" {
            self.take_reasoning()
        } else {
            None
        };
        out.push(RawMessage {
            role: Some(role.to_owned()),
            content: Some(Value::String(text)),
            reasoning_content,
            ..RawMessage::default()
        });
        Ok(())
    }
}

/// A required string field of an item.
fn string_field<'a>(item: &'a Value, field: &str, key: &str) -> Result<&'a str, ApiError> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| {
        invalid(
            format!("{field}.{key}"),
            format!("`{field}.{key}` is required and must be a string"),
        )
    })
}

/// The text of content parts (`input_text`, `output_text`, `refusal`), joined.
fn parts_text(parts: &[Value], field: &str) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let field = format!("{field}[{j}]");
        let (kind, key) = match part.get("type").and_then(Value::as_str) {
            Some(kind @ ("input_text" | "output_text" | "text")) => (kind, "text"),
            Some(kind @ "refusal") => (kind, "refusal"),
            Some(kind @ ("input_image" | "input_file" | "input_audio")) => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!(
                        "`{field}` is an `{kind}` part; the served model reads text only, so \
                         only `input_text` parts are supported"
                    ),
                ));
            }
            Some(other) => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!("`{field}` has the unsupported content part type `{other}`"),
                ));
            }
            None => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!("`{field}` must be a content part with a string `type`"),
                ));
            }
        };
        let text = part.get(key).and_then(Value::as_str).ok_or_else(|| {
            invalid(
                format!("{field}.{key}"),
                format!("`{field}.{key}` must be a string (a `{kind}` part)"),
            )
        })?;
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

/// `{type: function, name, description, parameters, strict}` → a chat function tool.
fn translate_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let field = format!("tools[{i}]");
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(kind) => {
            return Err(invalid(
                format!("{field}.type"),
                format!(
                    "`{field}` is the hosted tool `{kind}`, which this server does not run; only \
                     `function` tools are supported"
                ),
            ));
        }
        None => {
            return Err(invalid(
                format!("{field}.type"),
                format!("`{field}.type` is required (`function`)"),
            ));
        }
    }
    let name = string_field(tool, &field, "name")?;
    let mut function = json!({"name": name});
    for key in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
            function[key] = value.clone();
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` → the chat request's.
fn translate_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(_) => match (
            choice.get("type").and_then(Value::as_str),
            choice.get("name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(name)) => {
                Ok(json!({"type": "function", "function": {"name": name}}))
            }
            (Some("function"), None) => Err(invalid(
                "tool_choice.name",
                "`tool_choice.name` is required when `tool_choice.type` is `function`",
            )),
            (kind, _) => Err(invalid(
                "tool_choice.type",
                format!(
                    "`tool_choice.type` is {}; only `function` (or the strings `auto`, `none`, \
                     `required`) is supported",
                    kind.map_or("missing".to_owned(), |k| format!("`{k}`"))
                ),
            )),
        },
        _ => Err(invalid(
            "tool_choice",
            "`tool_choice` must be `auto`, `none`, `required` or `{\"type\": \"function\", \
             \"name\": ...}`",
        )),
    }
}

/// `text.format` → what the response echoes and the chat request's `response_format`.
fn text_format(text: Option<&Value>) -> Result<(Value, Option<ResponseFormat>), ApiError> {
    let plain = json!({"type": "text"});
    let format = match text {
        None | Some(Value::Null) => return Ok((plain, None)),
        Some(Value::Object(text)) => match text.get("format") {
            None | Some(Value::Null) => return Ok((plain, None)),
            Some(format @ Value::Object(_)) => format,
            Some(_) => return Err(invalid("text.format", "`text.format` must be an object")),
        },
        Some(_) => return Err(invalid("text", "`text` must be an object")),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok((plain, None)),
        Some("json_object") => Ok((
            format.clone(),
            Some(ResponseFormat {
                kind: "json_object".to_owned(),
                json_schema: None,
            }),
        )),
        Some("json_schema") => {
            let schema = match format.get("schema") {
                Some(schema @ Value::Object(_)) => schema.clone(),
                _ => {
                    return Err(invalid(
                        "text.format.schema",
                        "`text.format.schema` is required and must be a JSON schema object",
                    ));
                }
            };
            if !format.get("name").is_some_and(Value::is_string) {
                return Err(invalid(
                    "text.format.name",
                    "`text.format.name` is required and must be a string",
                ));
            }
            Ok((
                format.clone(),
                Some(ResponseFormat {
                    kind: "json_schema".to_owned(),
                    json_schema: Some(JsonSchemaFormat {
                        schema: Some(schema),
                    }),
                }),
            ))
        }
        _ => Err(invalid(
            "text.format.type",
            "`text.format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// `reasoning.effort`, checked.
fn reasoning_effort(reasoning: Option<&Value>) -> Result<Option<String>, ApiError> {
    let effort = match reasoning {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(r)) => r.get("effort"),
        Some(_) => return Err(invalid("reasoning", "`reasoning` must be an object")),
    };
    match effort {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(e)) if EFFORTS.contains(&e.as_str()) => Ok(Some(e.clone())),
        Some(_) => Err(invalid(
            "reasoning.effort",
            format!("`reasoning.effort` must be one of {}", EFFORTS.join(", ")),
        )),
    }
}

/// `metadata`: at most 16 string pairs, keys up to 64 characters, values up to 512.
fn metadata(metadata: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let map = match metadata {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("metadata", "`metadata` must be an object")),
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(invalid(
            "metadata",
            format!(
                "`metadata` has {} pairs; at most {MAX_METADATA_PAIRS} are allowed",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        let ok = key.chars().count() <= MAX_METADATA_KEY_CHARS
            && value
                .as_str()
                .is_some_and(|v| v.chars().count() <= MAX_METADATA_VALUE_CHARS);
        if !ok {
            return Err(invalid(
                "metadata",
                format!(
                    "`metadata` keys are strings of at most {MAX_METADATA_KEY_CHARS} characters \
                     and values strings of at most {MAX_METADATA_VALUE_CHARS}"
                ),
            ));
        }
    }
    Ok(map.clone())
}

/// `user`: a string of at most 256 characters.
fn user(user: Option<&Value>) -> Result<Option<String>, ApiError> {
    match user {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(u)) if u.chars().count() <= MAX_ID_CHARS => Ok(Some(u.clone())),
        Some(_) => Err(invalid(
            "user",
            format!("`user` must be a string of at most {MAX_ID_CHARS} characters"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).expect("request")
    }

    #[test]
    fn items_become_one_conversation() {
        let req = request(json!({
            "model": "m", "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "reasoning", "id": "rs_1", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                {"type": "function_call", "call_id": "call_1", "name": "weather",
                 "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "weather",
                 "arguments": "{\"city\":\"Lyon\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
                {"type": "function_call_output", "call_id": "call_2",
                 "output": [{"type": "input_text", "text": "19 C"}]},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Thanks"}]}],
            "tools": [{"type": "function", "name": "weather", "strict": true,
                       "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": false,
            "max_output_tokens": 32, "reasoning": {"effort": "low"},
            "metadata": {"k": "v"}, "store": false
        }));
        let t = translate(&req, &[]).expect("valid");
        let messages = t.chat.messages.as_ref().expect("messages");
        let roles: Vec<_> = messages.iter().map(|m| m.role.as_deref()).collect();
        assert_eq!(
            roles,
            [
                Some("system"),
                Some("user"),
                Some("assistant"),
                Some("tool"),
                Some("tool"),
                Some("user")
            ]
        );
        let assistant = &messages[2];
        assert_eq!(assistant.content, Some(json!("Checking.")));
        assert_eq!(assistant.reasoning_content, Some(json!("Call the tool.")));
        let calls = assistant.tool_calls.as_ref().expect("calls");
        assert_eq!(calls[0]["id"], "call_1");
        assert_eq!(calls[1]["function"]["arguments"], r#"{"city":"Lyon"}"#);
        assert_eq!(messages[4].tool_call_id, Some(json!("call_2")));
        assert_eq!(messages[4].content, Some(json!("19 C")));
        assert_eq!(
            t.chat.tool_choice,
            Some(json!({"type": "function", "function": {"name": "weather"}}))
        );
        let tools = t.chat.tools.expect("tools");
        assert_eq!(tools[0]["function"]["strict"], true);
        assert_eq!(t.chat.parallel_tool_calls, Some(false));
        assert_eq!(t.chat.max_completion_tokens, Some(32));
        assert_eq!(t.chat.reasoning_effort.as_deref(), Some("low"));
        assert_eq!(t.input.len(), 8);
        assert_eq!(t.settings.metadata["k"], "v");
        // The echo repeats the request's own shapes.
        let echo = t.settings.echo(false);
        assert_eq!(
            echo["tool_choice"],
            json!({"type": "function", "name": "weather"})
        );
        assert_eq!(echo["tools"][0]["name"], "weather");
        assert_eq!(echo["reasoning"]["effort"], "low");
    }

    #[test]
    fn history_comes_before_the_input_and_a_string_is_a_user_message() {
        let req = request(json!({"input": "And in Lyon?", "instructions": "Short."}));
        let history = [
            json!({"type": "message", "role": "user", "content": "Paris?"}),
            json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]}),
        ];
        let t = translate(&req, &history).expect("valid");
        let messages = t.chat.messages.expect("messages");
        let texts: Vec<_> = messages.iter().map(|m| m.content.clone()).collect();
        assert_eq!(
            texts,
            [
                Some(json!("Short.")),
                Some(json!("Paris?")),
                Some(json!("Sunny.")),
                Some(json!("And in Lyon?"))
            ]
        );
        assert_eq!(
            t.input,
            [json!({"type": "message", "role": "user", "content": "And in Lyon?"})]
        );
    }

    #[test]
    fn text_format_becomes_the_response_format() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let req = request(
            json!({"input": "x", "text": {"format": {"type": "json_schema",
            "name": "thing", "schema": schema, "strict": true}}}),
        );
        let t = translate(&req, &[]).expect("valid");
        let format = t.chat.response_format.expect("format");
        assert_eq!(format.kind, "json_schema");
        assert_eq!(format.json_schema.and_then(|s| s.schema), Some(schema));
        assert_eq!(t.settings.format["name"], "thing");

        let req = request(json!({"input": "x", "text": {"format": {"type": "json_object"}}}));
        let t = translate(&req, &[]).expect("valid");
        assert_eq!(t.chat.response_format.expect("format").kind, "json_object");
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": 3}), "input"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": [{"type": "item_reference", "id": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "function"}}),
                "tool_choice.name",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
                "text.format.schema",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "huge"}}),
                "reasoning.effort",
            ),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata"),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "previous_response_id": 7}),
                "previous_response_id",
            ),
            (json!({"input": "x", "instructions": ["x"]}), "instructions"),
        ];
        for (body, param) in cases {
            let err = translate(&request(body.clone()), &[]).expect_err(&body.to_string());
            assert_eq!(err.param(), Some(param), "{body}: {err}");
        }
        let image = request(json!({"input": [{"role": "user",
            "content": [{"type": "input_image", "image_url": "x"}]}]}));
        let err = translate(&image, &[]).expect_err("image");
        assert!(err.to_string().contains("text only"), "{err}");
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        let err = translate(&request(json!({"input": "x", "metadata": many})), &[])
            .expect_err("17 pairs");
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
