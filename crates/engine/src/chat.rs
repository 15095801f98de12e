//! Chats as OpenAI's API carries them (tool calls, tool results, reasoning, tools to call),
//! turned into the prompt the model expects, and the formats in which the loaded model
//! writes tool calls and reasoning, so that callers can parse them out of its output.
//!
//! Four ways a model takes tools:
//! - Mistral's tokenizers encode tools and calls themselves (mistral-common's rules);
//! - a Jinja template that renders `tools` (Hermes/Qwen's `<tool_call>`, Mistral's
//!   `[TOOL_CALLS]` in Hugging Face templates);
//! - DeepSeek's templates, which write calls (`<｜tool▁calls▁begin｜>`...) and results but
//!   not the tools: they are described in the system message here, in the template's syntax;
//! - a template that knows nothing of tools (the default SmolLM2): the tools are described in
//!   a system message written here, in the Hermes format, as llama.cpp does for templates
//!   without tool support, and calls in the history are written back in that format.

use serde_json::{Map, Value, json};
use tokenizer::{ChatTemplate, MistralChatRequest, MistralVersion};

use crate::text::TextTokenizer;
use crate::{ChatMessage, EngineError, LoadError, ReasoningSpec};

/// A chat request in OpenAI's shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatRequest {
    /// The conversation: objects with `role`, `content` (a string, or null for an assistant
    /// turn that only called tools), and as the roles allow `tool_calls` (with `function.
    /// arguments` as a JSON string), `tool_call_id`, `name`, `reasoning_content`.
    pub messages: Vec<Value>,
    /// Tool definitions (`{"type": "function", "function": {...}}`) the model may call.
    pub tools: Option<Vec<Value>>,
    /// Extra variables for the chat template (vLLM's `chat_template_kwargs`, such as
    /// `enable_thinking`); Mistral's tokenizers take none.
    pub template_kwargs: Map<String, Value>,
}

impl ChatRequest {
    /// The messages as a Jinja chat template sees them: tool-call arguments as objects
    /// (transformers' templates write them with `tojson`), as vLLM passes them; a null
    /// content as the empty string; content given as text parts joined.
    pub fn template_messages(&self) -> Vec<Value> {
        template_messages(&self.messages)
    }

    /// A plain conversation without tools.
    pub fn from_messages(messages: &[ChatMessage]) -> Self {
        ChatRequest {
            messages: messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect(),
            tools: None,
            template_kwargs: Map::new(),
        }
    }
}

/// How the model writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolCallFormat {
    /// Mistral's: `[TOOL_CALLS]` followed by a JSON list of `{"name", "arguments"}` objects
    /// (tokenizers v2 to v7), or by `name[ARGS]{arguments}` (v11 and later, `named`), with
    /// `[CALL_ID]id` between name and `[ARGS]` in v11.
    Mistral {
        /// The `name[ARGS]arguments` form.
        named: bool,
    },
    /// Hermes/Qwen's: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the tools
    /// rendered by the model's own template.
    Hermes,
    /// Qwen3-Coder's and Qwen3.5's XML inside `<tool_call>`: `<function=name>`, then each
    /// argument as `<parameter=key>` value `</parameter>` (text for strings, JSON otherwise),
    /// `</function>`, `</tool_call>`; the tools rendered by the template.
    QwenXml,
    /// DeepSeek's: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>name<｜tool▁sep｜>
    /// {arguments}<｜tool▁call▁end｜>` (DeepSeek-V3.1 and later), or with `fenced`
    /// `<｜tool▁call▁begin｜>function<｜tool▁sep｜>name` and the arguments in a fenced
    /// ```` ```json ```` block (DeepSeek-V3 and R1), then `<｜tool▁calls▁end｜>`.
    DeepSeek {
        /// The V3/R1 form: the call's type before the separator, the arguments fenced.
        fenced: bool,
    },
    /// The template renders no tools: they are described in a system message written here
    /// and the model is asked to answer in the Hermes format.
    Prompted,
}

/// DeepSeek's tool-call markers (each one token in DeepSeek's vocabularies).
pub mod deepseek {
    /// Opens the calls of one answer.
    pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
    /// Closes them.
    pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
    /// Opens one call.
    pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
    /// Between a call's name (or type) and its arguments (or name).
    pub const SEP: &str = "<｜tool▁sep｜>";
    /// Closes one call.
    pub const CALL_END: &str = "<｜tool▁call▁end｜>";
}

/// How the loaded model writes tool calls and reasoning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatFormat {
    /// Its tool-call format.
    pub tool_calls: ToolCallFormat,
    /// The markers of its reasoning block (`("<think>", "</think>")`, `("[THINK]",
    /// "[/THINK]")`), when it has one.
    pub reasoning: Option<(String, String)>,
    /// Tool call ids: Mistral's tokenizers accept only 9 alphanumeric characters.
    pub short_call_ids: bool,
}

/// A chat's prompt, ready to generate from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The token ids, the assistant's turn opened.
    pub tokens: Vec<u32>,
    /// The prompt ends inside an open reasoning block (the template opened it).
    pub reasoning_open: bool,
}

/// The format of a model, from its tokenizer and chat template.
pub(crate) fn detect(text: &TextTokenizer, template: Option<&ChatTemplate>) -> ChatFormat {
    if let TextTokenizer::Mistral(m) = text {
        let v = m.version();
        let think = m.special_id("[THINK]").is_some() && v >= MistralVersion::V13;
        return ChatFormat {
            tool_calls: ToolCallFormat::Mistral {
                named: v >= MistralVersion::V11,
            },
            reasoning: think.then(|| ("[THINK]".to_owned(), "[/THINK]".to_owned())),
            short_call_ids: true,
        };
    }
    let source = template.map_or("", ChatTemplate::source);
    let tool_calls =
        if source.contains(deepseek::CALLS_BEGIN) || source.contains(deepseek::CALL_BEGIN) {
            ToolCallFormat::DeepSeek {
                fenced: source.contains("```json"),
            }
        } else if source.contains("<function=") && source.contains("<parameter=") {
            ToolCallFormat::QwenXml
        } else if source.contains("[TOOL_CALLS]") {
            ToolCallFormat::Mistral {
                named: source.contains("[ARGS]"),
            }
        } else if source.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else {
            ToolCallFormat::Prompted
        };
    let reasoning = if source.contains("[THINK]") {
        Some(("[THINK]", "[/THINK]"))
    } else if source.contains("<think>") {
        Some(("<think>", "</think>"))
    } else {
        None
    };
    ChatFormat {
        short_call_ids: matches!(tool_calls, ToolCallFormat::Mistral { .. }),
        tool_calls,
        reasoning: reasoning.map(|(o, c)| (o.to_owned(), c.to_owned())),
    }
}

impl ChatFormat {
    /// The reasoning markers as the engine counts them, given whether the prompt opened
    /// the block.
    pub fn reasoning_spec(&self, starts_inside: bool) -> Option<ReasoningSpec> {
        self.reasoning.as_ref().map(|(open, close)| ReasoningSpec {
            open: open.clone(),
            close: close.clone(),
            starts_inside,
        })
    }
}

/// What the engine renders chats with: the model's tokenizer and template (or the
/// operator's replacement template) and the format they imply.
pub(crate) struct ChatEncoder {
    override_template: Option<ChatTemplate>,
    format: ChatFormat,
    /// The template writes calls but never reads `tools` (DeepSeek's): the tools are
    /// described in the system message here.
    describes_tools: bool,
}

impl ChatEncoder {
    pub(crate) fn new(
        text: &TextTokenizer,
        override_source: Option<&str>,
    ) -> Result<Self, EngineError> {
        let override_template = match override_source {
            Some(_) if matches!(text, TextTokenizer::Mistral(_)) => {
                return Err(LoadError::Inconsistent(
                    "a chat template cannot replace a Mistral tokenizer's own chat encoding".into(),
                )
                .into());
            }
            Some(src) => Some(ChatTemplate::new(src).map_err(LoadError::ChatTemplate)?),
            None => None,
        };
        let template = override_template
            .as_ref()
            .or_else(|| text.template().map(|(t, _, _)| t));
        let format = detect(text, template);
        let describes_tools = matches!(format.tool_calls, ToolCallFormat::DeepSeek { .. })
            && !template.is_some_and(|t| names_variable(t.source(), "tools"));
        Ok(Self {
            override_template,
            format,
            describes_tools,
        })
    }

    pub(crate) fn format(&self) -> &ChatFormat {
        &self.format
    }

    /// The chat as text, the assistant's turn opened (for Mistral: its tokens decoded,
    /// control tokens shown).
    pub(crate) fn render(
        &self,
        text: &TextTokenizer,
        request: &ChatRequest,
    ) -> Result<String, EngineError> {
        if let TextTokenizer::Mistral(m) = text {
            let ids = self.encode_mistral(text, request)?;
            return m
                .decode(&ids, true)
                .map_err(|e| EngineError::Template(e.to_string()));
        }
        let (template, bos, eos) = match &self.override_template {
            Some(t) => {
                let (bos, eos) = text.bos_eos_text();
                (t, bos, eos)
            }
            None => text
                .template()
                .ok_or_else(|| EngineError::Template("the model has no chat template".into()))?,
        };
        let (messages, tools) = match self.format.tool_calls {
            ToolCallFormat::Prompted => (prompted_messages(request), None),
            // DeepSeek's templates write calls and results but do not describe the tools:
            // they are described in the system message, in the syntax the template writes.
            ToolCallFormat::DeepSeek { fenced } if self.describes_tools => {
                let mut messages = template_messages(&request.messages);
                if let Some(tools) = request.tools.as_deref().filter(|t| !t.is_empty()) {
                    add_to_system(&mut messages, &deepseek_tools_prompt(tools, fenced));
                }
                (messages, request.tools.as_deref())
            }
            _ => (
                template_messages(&request.messages),
                request.tools.as_deref(),
            ),
        };
        template
            .render_json(&messages, tools, &request.template_kwargs, true, bos, eos)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// The chat's prompt tokens.
    pub(crate) fn encode(
        &self,
        text: &TextTokenizer,
        request: &ChatRequest,
    ) -> Result<ChatPrompt, EngineError> {
        let open = self.format.reasoning.as_ref().map(|(o, _)| o.as_str());
        if let TextTokenizer::Mistral(_) = text {
            let tokens = self.encode_mistral(text, request)?;
            let reasoning_open = open
                .and_then(|o| text.token_id(o))
                .is_some_and(|id| tokens.last() == Some(&id));
            return Ok(ChatPrompt {
                tokens,
                reasoning_open,
            });
        }
        let rendered = self.render(text, request)?;
        let reasoning_open = open.is_some_and(|o| rendered.trim_end().ends_with(o));
        Ok(ChatPrompt {
            tokens: text.encode_rendered_chat(&rendered)?,
            reasoning_open,
        })
    }

    fn encode_mistral(
        &self,
        text: &TextTokenizer,
        request: &ChatRequest,
    ) -> Result<Vec<u32>, EngineError> {
        let TextTokenizer::Mistral(m) = text else {
            return Err(EngineError::Template("not a Mistral tokenizer".into()));
        };
        let mut body = Map::new();
        body.insert("messages".into(), Value::Array(request.messages.clone()));
        if let Some(tools) = &request.tools {
            body.insert("tools".into(), Value::Array(tools.clone()));
        }
        // The one template variable mistral-common's encoding knows.
        if let Some(continued) = request.template_kwargs.get("continue_final_message") {
            body.insert("continue_final_message".into(), continued.clone());
        }
        // Through text, so that the request keeps its key order (serde_json preserves it)
        // into mistral-common's JSON encoding of tools and arguments.
        let json = Value::Object(body).to_string();
        let req = MistralChatRequest::from_json(&json)
            .map_err(|e| EngineError::InvalidRequest(format!("invalid chat request: {e}")))?;
        m.encode_chat(&req)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }
}

/// Messages as templates expect them: tool-call arguments as objects (transformers' chat
/// templates write them with `tojson`), as vLLM passes them.
fn template_messages(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                for call in calls {
                    if let Some(args) = call.pointer_mut("/function/arguments")
                        && let Some(parsed) = args
                            .as_str()
                            .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *args = parsed;
                    }
                }
            }
            if m.get("content").is_none_or(Value::is_null) {
                m["content"] = Value::String(String::new());
            }
            // Content given as text parts reaches the template as one string, as the API's
            // validation joins them for a chat completion.
            if let Some(text) = m.get("content").and_then(joined_text_parts) {
                m["content"] = Value::String(text);
            }
            m
        })
        .collect()
}

/// The text of a content given as an array of `{"type": "text", "text": ...}` parts, joined;
/// `None` for any other content.
fn joined_text_parts(content: &Value) -> Option<String> {
    let parts = content.as_array()?;
    let mut text = String::new();
    for part in parts {
        if part.get("type").and_then(Value::as_str) != Some("text") {
            return None;
        }
        text.push_str(part.get("text")?.as_str()?);
    }
    Some(text)
}

/// Each tool's function signature as JSON, one per line.
fn listed_tools(tools: &[Value]) -> String {
    let mut listed = String::new();
    for tool in tools {
        listed.push_str(&tool.get("function").unwrap_or(tool).to_string());
        listed.push('\n');
    }
    listed
}

/// The instruction that teaches a template without tool support to call tools.
fn tools_system_prompt(tools: &[Value]) -> String {
    let listed = listed_tools(tools);
    format!(
        "You may call one or more functions to answer the user. The functions, as JSON \
         signatures, are:\n<tools>\n{listed}</tools>\n\nTo call a function, answer with a JSON \
         object holding its name and arguments inside <tool_call></tool_call> tags, one per \
         call:\n<tool_call>\n{{\"name\": \"function name\", \"arguments\": {{\"argument\": \
         \"value\"}}}}\n</tool_call>\nThe results come back in <tool_response></tool_response> \
         tags."
    )
}

/// For [`ToolCallFormat::Prompted`]: the tools described in the system message, calls in
/// the history written in the Hermes format, tool results as user turns in
/// `<tool_response>` tags (templates without tools rarely accept a `tool` role).
fn prompted_messages(request: &ChatRequest) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(request.messages.len() + 1);
    // Arguments already parsed into objects.
    for m in &template_messages(&request.messages) {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m.get("content").and_then(Value::as_str).unwrap_or_default();
        match role {
            "assistant" => {
                let mut text = content.to_owned();
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = call.pointer("/function/name").cloned().unwrap_or_default();
                    let args = call
                        .pointer("/function/arguments")
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "<tool_call>\n{}\n</tool_call>",
                        json!({"name": name, "arguments": args})
                    ));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            "tool" => out.push(json!({
                "role": "user",
                "content": format!("<tool_response>\n{content}\n</tool_response>"),
            })),
            _ => out.push(json!({"role": role, "content": content})),
        }
    }
    if let Some(tools) = request.tools.as_deref().filter(|t| !t.is_empty()) {
        add_to_system(&mut out, &tools_system_prompt(tools));
    }
    out
}

/// Whether `source` has `name` as a whole word (a variable the template reads), not only
/// inside a longer name.
fn names_variable(source: &str, name: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.match_indices(name).any(|(at, _)| {
        let before = source[..at].chars().next_back();
        let after = source[at + name.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// Appends `instruction` to the conversation's system message (a new one first if it has
/// none).
fn add_to_system(messages: &mut Vec<Value>, instruction: &str) {
    match messages.first_mut() {
        Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
            let old = first
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default();
            first["content"] = Value::String(format!("{old}\n\n{instruction}"));
        }
        _ => messages.insert(0, json!({"role": "system", "content": instruction})),
    }
}

/// The instruction that describes the tools to a DeepSeek model whose template does not,
/// with a call written in the form the template writes calls.
fn deepseek_tools_prompt(tools: &[Value], fenced: bool) -> String {
    use deepseek::{CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP};
    let listed = listed_tools(tools);
    let example = if fenced {
        format!(
            "{CALLS_BEGIN}{CALL_BEGIN}function{SEP}function name\n```json\n{{\"argument\": \"value\"}}\n```{CALL_END}{CALLS_END}"
        )
    } else {
        format!(
            "{CALLS_BEGIN}{CALL_BEGIN}function name{SEP}{{\"argument\": \"value\"}}{CALL_END}{CALLS_END}"
        )
    };
    format!(
        "## Tools\nYou may call one or more functions to answer the user. The functions, as JSON \
         signatures, are:\n{listed}\nTo call functions, answer in this form, one \
         {CALL_BEGIN}...{CALL_END} per call:\n{example}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompted_tools_go_into_the_system_message() {
        let req = ChatRequest {
            messages: vec![
                json!({"role": "user", "content": "weather?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get", "arguments": "{\"city\": \"Paris\"}"}}]}),
                json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}),
            ],
            tools: Some(vec![
                json!({"type": "function", "function": {"name": "get"}}),
            ]),
            template_kwargs: Map::new(),
        };
        let out = prompted_messages(&req);
        assert_eq!(out[0]["role"], "system");
        assert!(
            out[0]["content"]
                .as_str()
                .unwrap()
                .contains("{\"name\":\"get\"}")
        );
        assert_eq!(
            out[2]["content"],
            "<tool_call>\n{\"name\":\"get\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(out[3]["role"], "user");
        assert_eq!(
            out[3]["content"],
            "<tool_response>\nsunny\n</tool_response>"
        );
    }

    #[test]
    fn template_messages_parse_arguments() {
        let out = template_messages(&[json!({"role": "assistant", "content": null,
            "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]})]);
        assert_eq!(
            out[0]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        assert_eq!(out[0]["content"], "");
        let parts = template_messages(&[json!({"role": "user",
            "content": [{"type": "text", "text": "al"}, {"type": "text", "text": "pha"}]})]);
        assert_eq!(parts[0]["content"], "alpha");
    }
}
