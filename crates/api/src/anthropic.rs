//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): its request as
//! clients send it, translated into the one chat request that `validate` checks (so that
//! nothing about validation, tools or the engine path is written twice), and its response
//! shapes.
//!
//! A user turn's `tool_result` blocks become OpenAI `tool` messages (before the turn's text,
//! in their order), an assistant turn's `tool_use` blocks its `tool_calls` (the input as a
//! JSON string) and its `thinking` blocks its `reasoning_content`; `system` (a string or text
//! blocks) becomes the first message; `tools` become functions (`input_schema` their
//! `parameters`); `tool_choice` `auto`/`any`/`tool`/`none` becomes `auto`/`required`/a named
//! function/`none`; `stop_sequences` becomes `stop`; `thinking: {"type": "disabled"}` turns a
//! reasoning model's thinking off. Images and documents are refused with a 400: the served
//! models read text only.

use engine::FinishReason;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, RawMessage};

/// `POST /v1/messages` (and `/v1/messages/count_tokens`) as received. Every field is
/// optional here so that the translation names what is missing; `metadata`, `service_tier`
/// and other fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct MessagesRequest {
    pub(crate) model: Option<String>,
    pub(crate) max_tokens: Option<i64>,
    pub(crate) system: Option<Value>,
    pub(crate) messages: Option<Vec<Value>>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) stop_sequences: Option<Vec<String>>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) top_k: Option<i64>,
    pub(crate) stream: Option<bool>,
    /// `{"type": "enabled", "budget_tokens": n}` or `{"type": "disabled"}`.
    pub(crate) thinking: Option<Value>,
}

/// Which route the request came to: generation needs `max_tokens`, counting does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Generate,
    CountTokens,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// The chat request that says what `req` says.
pub(crate) fn to_chat(
    req: &MessagesRequest,
    purpose: Purpose,
) -> Result<ChatCompletionRequest, ApiError> {
    let max_tokens = match (req.max_tokens, purpose) {
        (None, Purpose::Generate) => {
            return Err(invalid("max_tokens", "`max_tokens` is required"));
        }
        (Some(n), Purpose::Generate) if n < 1 => {
            return Err(invalid(
                "max_tokens",
                format!("`max_tokens` is {n}; it must be at least 1"),
            ));
        }
        (max, Purpose::Generate) => max,
        (_, Purpose::CountTokens) => None,
    };
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        let text = text_of(system, "system")?;
        messages.push(RawMessage {
            role: Some("system".to_owned()),
            content: Some(Value::String(text)),
            ..RawMessage::default()
        });
    }
    let Some(turns) = &req.messages else {
        return Err(invalid("messages", "`messages` is required"));
    };
    if turns.is_empty() {
        return Err(invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    for (i, turn) in turns.iter().enumerate() {
        translate_turn(i, turn, &mut messages)?;
    }
    let tools = match &req.tools {
        None => None,
        Some(tools) => Some(Value::Array(
            tools
                .iter()
                .enumerate()
                .map(|(i, tool)| translate_tool(i, tool))
                .collect::<Result<_, _>>()?,
        )),
    };
    let (tool_choice, parallel_tool_calls) = match &req.tool_choice {
        None => (None, None),
        Some(choice) => translate_tool_choice(choice)?,
    };
    let reasoning_effort = match &req.thinking {
        None | Some(Value::Null) => None,
        Some(thinking) => match thinking.get("type").and_then(Value::as_str) {
            Some("disabled") => Some("none".to_owned()),
            Some("enabled" | "adaptive") => None,
            _ => {
                return Err(invalid(
                    "thinking.type",
                    "`thinking.type` must be `enabled`, `adaptive` or `disabled`",
                ));
            }
        },
    };
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stream: req.stream,
        stop: req
            .stop_sequences
            .as_ref()
            .map(|stops| Value::Array(stops.iter().cloned().map(Value::String).collect())),
        messages: Some(messages),
        tools,
        tool_choice,
        parallel_tool_calls,
        reasoning_effort,
        ..ChatCompletionRequest::default()
    })
}

/// A string, or text blocks joined with newlines (`system`, a `tool_result`'s content).
fn text_of(value: &Value, field: &str) -> Result<String, ApiError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                let field = format!("{field}[{j}]");
                match block_type(block, &field)? {
                    "text" => parts.push(block_text(block, &field)?),
                    other => return Err(unsupported_block(&field, other)),
                }
            }
            Ok(parts.join("\n"))
        }
        _ => Err(invalid(
            field,
            format!("`{field}` must be a string or an array of text blocks"),
        )),
    }
}

fn block_type<'a>(block: &'a Value, field: &str) -> Result<&'a str, ApiError> {
    block.get("type").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            format!("{field}.type"),
            format!("`{field}` must be a content block with a string `type`"),
        )
    })
}

fn block_text(block: &Value, field: &str) -> Result<String, ApiError> {
    block
        .get("text")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            invalid(
                format!("{field}.text"),
                format!("`{field}.text` must be a string"),
            )
        })
}

fn unsupported_block(field: &str, kind: &str) -> ApiError {
    let message = match kind {
        "image" | "document" => format!(
            "`{field}` is an `{kind}` block; the served model reads text only, so `{kind}` \
             content is not supported"
        ),
        other => format!("`{field}` has the unsupported content block type `{other}` here"),
    };
    invalid(format!("{field}.type"), message)
}

/// Appends the chat messages of Anthropic turn `i`.
fn translate_turn(i: usize, turn: &Value, out: &mut Vec<RawMessage>) -> Result<(), ApiError> {
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(invalid(
                format!("messages[{i}].role"),
                format!("`messages[{i}].role` must be `user` or `assistant`"),
            ));
        }
    };
    let field = format!("messages[{i}].content");
    let blocks = match turn.get("content") {
        Some(Value::String(text)) => {
            out.push(RawMessage {
                role: Some(role.to_owned()),
                content: Some(Value::String(text.clone())),
                ..RawMessage::default()
            });
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(invalid(
                &field,
                format!("`{field}` must be a string or an array of content blocks"),
            ));
        }
    };
    let mut texts = Vec::new();
    let mut thinking = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let field = format!("{field}[{j}]");
        match (role, block_type(block, &field)?) {
            (_, "text") => texts.push(block_text(block, &field)?),
            ("user", "tool_result") => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}.tool_use_id"),
                            format!("`{field}.tool_use_id` must be a string"),
                        )
                    })?;
                let mut content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(value) => text_of(value, &format!("{field}.content"))?,
                };
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    content = format!("Error: {content}");
                }
                out.push(RawMessage {
                    role: Some("tool".to_owned()),
                    content: Some(Value::String(content)),
                    tool_call_id: Some(Value::String(id.to_owned())),
                    ..RawMessage::default()
                });
            }
            ("assistant", "tool_use") => {
                let id = block.get("id").and_then(Value::as_str);
                let name = block.get("name").and_then(Value::as_str).ok_or_else(|| {
                    invalid(
                        format!("{field}.name"),
                        format!("`{field}.name` must be a string"),
                    )
                })?;
                let input = match block.get("input") {
                    Some(input @ Value::Object(_)) => input.to_string(),
                    _ => {
                        return Err(invalid(
                            format!("{field}.input"),
                            format!("`{field}.input` must be an object"),
                        ));
                    }
                };
                let mut call =
                    json!({"type": "function", "function": {"name": name, "arguments": input}});
                if let Some(id) = id {
                    call["id"] = Value::String(id.to_owned());
                }
                calls.push(call);
            }
            ("assistant", "thinking") => {
                if let Some(text) = block.get("thinking").and_then(Value::as_str) {
                    thinking.push(text.to_owned());
                }
            }
            // Encrypted reasoning of another provider's model means nothing to this one.
            ("assistant", "redacted_thinking") => {}
            (_, kind) => return Err(unsupported_block(&field, kind)),
        }
    }
    if role == "user" && texts.is_empty() && out.last().is_some_and(|m| m.tool_call_id.is_some()) {
        // A turn of tool results only.
        return Ok(());
    }
    out.push(RawMessage {
        role: Some(role.to_owned()),
        content: if texts.is_empty() && !calls.is_empty() {
            None
        } else {
            Some(Value::String(texts.join("\n")))
        },
        tool_calls: (!calls.is_empty()).then_some(Value::Array(calls)),
        reasoning_content: (!thinking.is_empty()).then(|| Value::String(thinking.join("\n"))),
        ..RawMessage::default()
    });
    Ok(())
}

/// `{name, description, input_schema}` → an OpenAI function tool.
fn translate_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let field = format!("tools[{i}]");
    if let Some(kind) = tool.get("type").and_then(Value::as_str)
        && kind != "custom"
    {
        return Err(invalid(
            format!("{field}.type"),
            format!(
                "`{field}` is Anthropic's server tool `{kind}`, which this server does not \
                 run; only client tools (`name`, `description`, `input_schema`) are supported"
            ),
        ));
    }
    let Some(name) = tool.get("name").and_then(Value::as_str) else {
        return Err(invalid(
            format!("{field}.name"),
            format!("`{field}.name` is required and must be a string"),
        ));
    };
    let Some(schema @ Value::Object(_)) = tool.get("input_schema") else {
        return Err(invalid(
            format!("{field}.input_schema"),
            format!("`{field}.input_schema` is required and must be a JSON schema object"),
        ));
    };
    let mut function = json!({"name": name, "parameters": schema});
    match tool.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => function["description"] = Value::String(d.clone()),
        Some(_) => {
            return Err(invalid(
                format!("{field}.description"),
                format!("`{field}.description` must be a string"),
            ));
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` → OpenAI's `tool_choice` and `parallel_tool_calls`.
fn translate_tool_choice(choice: &Value) -> Result<(Option<Value>, Option<bool>), ApiError> {
    let parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(disable)) => Some(!disable),
        Some(_) => {
            return Err(invalid(
                "tool_choice.disable_parallel_tool_use",
                "`tool_choice.disable_parallel_tool_use` must be a boolean",
            ));
        }
    };
    let openai = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => {
                return Err(invalid(
                    "tool_choice.name",
                    "`tool_choice.name` is required when `tool_choice.type` is `tool`",
                ));
            }
        },
        _ => {
            return Err(invalid(
                "tool_choice.type",
                "`tool_choice.type` must be `auto`, `any`, `tool` or `none`",
            ));
        }
    };
    Ok((Some(openai), parallel))
}

// ---------------------------------------------------------------------------------------------
// Responses.
// ---------------------------------------------------------------------------------------------

/// `stop_reason` and `stop_sequence` of a message that ended for `reason` after `calls` tool
/// calls, `stops` being the request's `stop_sequences`.
pub(crate) fn stop_reason(
    reason: FinishReason,
    calls: usize,
    stops: &[String],
) -> (&'static str, Option<String>) {
    match reason {
        FinishReason::Length => ("max_tokens", None),
        _ if calls > 0 => ("tool_use", None),
        FinishReason::StopSequence(i) => ("stop_sequence", stops.get(i).cloned()),
        _ => ("end_turn", None),
    }
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct MessageUsage {
    pub(crate) input_tokens: usize,
    pub(crate) output_tokens: usize,
    /// Souverain's extension, as in OpenAI-shaped usage (clients that do not know it ignore
    /// it): the energy the answer took, in joules, and `measured` or `modelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) energy_joules: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) energy_source: Option<&'static str>,
}

impl From<&engine::Usage> for MessageUsage {
    fn from(usage: &engine::Usage) -> Self {
        MessageUsage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            energy_joules: usage.energy.map(|e| e.joules()),
            energy_source: usage.energy.map(|e| e.kind.as_str()),
        }
    }
}

/// One content block of the assistant's message.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ContentBlock {
    Text {
        text: String,
    },
    /// A reasoning model's reasoning. There is no signature to give (it is Anthropic's
    /// encryption of its own models' reasoning): the field is there, empty, as the SDKs
    /// expect it.
    Thinking {
        thinking: String,
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

/// A whole `message`; also `message_start`'s message, with no content yet.
#[derive(Debug, Serialize)]
pub(crate) struct MessageBody<'a> {
    pub(crate) id: &'a str,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) role: &'static str,
    pub(crate) model: &'a str,
    pub(crate) content: Vec<ContentBlock>,
    pub(crate) stop_reason: Option<&'static str>,
    pub(crate) stop_sequence: Option<String>,
    pub(crate) usage: MessageUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).expect("request")
    }

    #[test]
    fn tool_turns_become_tool_calls_and_tool_messages() {
        let req = request(json!({
            "model": "m", "max_tokens": 16, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21 C"}]},
                    {"type": "text", "text": "Thanks"}]}],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"]
        }));
        let chat = to_chat(&req, Purpose::Generate).expect("valid");
        let messages = chat.messages.as_ref().expect("messages");
        let roles: Vec<_> = messages.iter().map(|m| m.role.as_deref()).collect();
        assert_eq!(
            roles,
            [
                Some("system"),
                Some("user"),
                Some("assistant"),
                Some("tool"),
                Some("user")
            ]
        );
        assert_eq!(messages[0].content, Some(json!("Be brief.")));
        let calls = messages[2].tool_calls.as_ref().expect("calls");
        assert_eq!(calls[0]["id"], "toolu_1");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(messages[3].tool_call_id, Some(json!("toolu_1")));
        assert_eq!(messages[3].content, Some(json!("21 C")));
        assert_eq!(chat.tool_choice, Some(json!("required")));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert_eq!(chat.stop, Some(json!(["END"])));
        let tools = chat.tools.expect("tools");
        assert_eq!(
            tools[0]["function"]["parameters"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let no_max =
            request(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let err = to_chat(&no_max, Purpose::Generate).expect_err("max_tokens");
        assert_eq!(err.param(), Some("max_tokens"));
        assert!(to_chat(&no_max, Purpose::CountTokens).is_ok());

        let image = request(
            json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user",
            "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}),
        );
        let err = to_chat(&image, Purpose::Generate).expect_err("image");
        assert_eq!(err.param(), Some("messages[0].content[0].type"));
        assert!(err.to_string().contains("text only"), "{err}");

        let forced = request(json!({"model": "m", "max_tokens": 4,
            "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}));
        let err = to_chat(&forced, Purpose::Generate).expect_err("name");
        assert_eq!(err.param(), Some("tool_choice.name"));
    }

    #[test]
    fn stop_reasons_follow_the_finish() {
        let stops = ["END".to_owned()];
        assert_eq!(
            stop_reason(FinishReason::StopSequence(0), 0, &stops),
            ("stop_sequence", Some("END".to_owned()))
        );
        assert_eq!(stop_reason(FinishReason::Stop, 1, &stops).0, "tool_use");
        assert_eq!(stop_reason(FinishReason::Stop, 0, &stops).0, "end_turn");
        assert_eq!(stop_reason(FinishReason::Length, 1, &stops).0, "max_tokens");
    }
}
