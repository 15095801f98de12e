//! Turns a request as received into a [`ValidRequest`], once: every range check, default and
//! unsupported option is decided here, and every error names the field at fault. Handlers
//! only see validated requests.

use engine::{ChatMessage, ChatRequest, ConstraintSpec, SamplingParams};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, RawConstraint, RawMessage, RawSampling,
};
use crate::tools::{self, ToolPlan};

/// The most choices one request may ask for (`n`).
pub(crate) const MAX_CHOICES: usize = 16;

/// The most prompts one completion request may batch, and the most sequences (prompts times
/// `n`) it may start.
pub(crate) const MAX_BATCH_PROMPTS: usize = 64;

/// OpenAI's default `max_tokens` for `/v1/completions`.
pub(crate) const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// OpenAI accepts at most this many stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;

/// The most alternatives `/v1/completions` may ask for with `logprobs` (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: i64 = 5;

/// Mistral's guardrail prompt, put before the conversation when `safe_prompt` is true.
const MISTRAL_SAFE_PROMPT: &str = "Always assist with care, respect, and truth. Respond with \
utmost utility yet securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure \
replies promote fairness and positivity.";

/// The roles a chat message may have.
const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// What to generate from, before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prompt {
    /// A conversation, to be rendered with the chat template.
    Chat(ChatRequest),
    /// Raw text (`/v1/completions`).
    Text(String),
    /// Token ids, fed to the model as they are (`/v1/completions` with `prompt` as a list of
    /// integers, as OpenAI and vLLM take it).
    Tokens(Vec<u32>),
    /// Several prompts in one request (`/v1/completions` with a list of strings or of token
    /// lists: OpenAI's batched form), each a [`Prompt::Text`] or a [`Prompt::Tokens`]; choice
    /// `p * n + i` is the `i`-th choice of prompt `p`.
    Batch(Vec<Prompt>),
    /// Fill in the middle between a prefix and a suffix (`/v1/fim/completions`, or
    /// `/v1/completions` with `suffix`).
    Fim {
        /// The code before the gap.
        prefix: String,
        /// The code after it.
        suffix: String,
    },
}

/// A request that passed validation: everything the handlers need, nothing left to check
/// except what needs the tokenizer (the prompt's length).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidRequest {
    pub(crate) prompt: Prompt,
    pub(crate) sampling: SamplingParams,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    /// `stream_options.include_usage`: send a last chunk with the token counts.
    pub(crate) include_usage: bool,
    /// Report token log-probabilities with this many alternatives each.
    pub(crate) logprobs: Option<usize>,
    /// The grammar the output must follow (structured output), if any.
    pub(crate) constraint: Option<ConstraintSpec>,
    /// Choices to generate (`n`).
    pub(crate) n: usize,
    /// The tools the model may call, and how.
    pub(crate) tools: Option<ToolPlan>,
    /// Completions: return the prompt before the completion (with its log-probabilities
    /// when `logprobs` is set).
    pub(crate) echo: bool,
    /// vLLM's `return_tokens_as_token_ids`: log-probabilities name tokens `token_id:<id>`.
    pub(crate) token_ids: bool,
    /// A context smaller than the served model's that prompt plus completion must fit in
    /// (Ollama's `num_ctx`); `None`: the model's whole context.
    pub(crate) context_limit: Option<usize>,
}

/// Validates a chat completion request against the served model `model_id`.
pub(crate) fn chat(req: &ChatCompletionRequest, model_id: &str) -> Result<ValidRequest, ApiError> {
    check_model(req.model.as_deref(), model_id)?;
    let messages = match &req.messages {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(messages) if messages.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must contain at least one message",
            ));
        }
        Some(messages) => messages
            .iter()
            .enumerate()
            .map(|(index, message)| message_json(index, message))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => {
            let top = top.unwrap_or(0);
            if !(0..=engine::MAX_TOP_LOGPROBS as i64).contains(&top) {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` is {top}; it must be between 0 and 20"),
                ));
            }
            Some(top as usize)
        }
        (_, Some(top)) if top != 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ));
        }
        _ => None,
    };
    let mut messages = messages;
    if req.safe_prompt == Some(true) {
        match messages.first_mut() {
            Some(first) if first["role"] == "system" => {
                let old = first["content"].as_str().unwrap_or_default();
                first["content"] = Value::String(format!("{MISTRAL_SAFE_PROMPT}\n\n{old}"));
            }
            _ => messages.insert(0, json!({"role": "system", "content": MISTRAL_SAFE_PROMPT})),
        }
    }
    let raw = req.raw_constraint();
    let mut constraint = constraint(raw)?;
    let tools = tools::plan(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let forced = tools.as_ref().is_some_and(|t| {
        matches!(
            t.choice,
            tools::ToolChoice::Required | tools::ToolChoice::Function(_)
        )
    });
    if forced && constraint.is_some() {
        let grammar_given = raw.grammar.is_some()
            || raw.guided_json.is_some()
            || raw.guided_regex.is_some()
            || raw.guided_grammar.is_some();
        if grammar_given {
            return Err(ApiError::invalid(
                "tool_choice",
                "a forced tool call cannot be combined with a grammar (`grammar` or \
                 `guided_*`)",
            ));
        }
        // As OpenAI does (the Agents SDK sends both for an agent with an output type): the
        // call is constrained to the tool's schema, and `response_format` governs text
        // content, of which a forced call has none.
        constraint = None;
    }
    let mut template_kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(effort) = req.reasoning_effort.as_deref() {
        let on = match effort {
            "none" | "minimal" => false,
            "low" | "medium" | "high" => true,
            other => {
                return Err(ApiError::invalid(
                    "reasoning_effort",
                    format!(
                        "`reasoning_effort` is `{other}`; expected `none`, `minimal`, `low`, \
                         `medium` or `high`"
                    ),
                ));
            }
        };
        template_kwargs
            .entry("enable_thinking")
            .or_insert(Value::Bool(on));
        template_kwargs
            .entry("reasoning_effort")
            .or_insert(Value::String(effort.to_owned()));
    }
    let max_tokens = positive("max_tokens", req.max_tokens)?;
    let max_completion_tokens = positive("max_completion_tokens", req.max_completion_tokens)?;
    let common = common(req.raw_sampling())?;
    Ok(ValidRequest {
        prompt: Prompt::Chat(ChatRequest {
            messages,
            tools: None,
            template_kwargs,
        }),
        n: common.n,
        tools,
        echo: false,
        token_ids: req.return_tokens_as_token_ids == Some(true),
        context_limit: None,
        sampling: common.sampling,
        max_tokens: max_completion_tokens.or(max_tokens),
        stop: common.stop,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs,
        constraint,
    })
}

/// Validates a text completion request against the served model `model_id`.
pub(crate) fn completion(
    req: &CompletionRequest,
    model_id: &str,
) -> Result<ValidRequest, ApiError> {
    check_model(req.model.as_deref(), model_id)?;
    let prompt = completion_prompt(req.prompt.as_ref())?;
    let echo = req.echo == Some(true);
    let logprobs = match req.logprobs {
        None => None,
        Some(n) if (0..=MAX_COMPLETION_LOGPROBS).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` is {n}; it must be between 0 and {MAX_COMPLETION_LOGPROBS}"),
            ));
        }
    };
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "best_of",
            "Only `best_of` = 1 is supported by this server",
        ));
    }
    let prompt = match (req.suffix.as_deref(), prompt) {
        (Some(suffix), prompt) if !suffix.is_empty() => {
            if echo {
                return Err(ApiError::invalid(
                    "echo",
                    "`echo` cannot be combined with `suffix` (fill in the middle)",
                ));
            }
            let Prompt::Text(prefix) = prompt else {
                return Err(ApiError::invalid(
                    "suffix",
                    "`suffix` (fill in the middle) needs `prompt` as one string",
                ));
            };
            Prompt::Fim {
                prefix,
                suffix: suffix.to_owned(),
            }
        }
        (_, prompt) => prompt,
    };
    let constraint = constraint(req.raw_constraint())?;
    let max_tokens =
        positive("max_tokens", req.max_tokens)?.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS);
    let common = common(req.raw_sampling())?;
    if let Prompt::Batch(prompts) = &prompt
        && prompts.len().saturating_mul(common.n) > MAX_BATCH_PROMPTS
    {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts with `n` = {} would start {} sequences; at most \
                 {MAX_BATCH_PROMPTS} are taken in one request",
                prompts.len(),
                common.n,
                prompts.len() * common.n
            ),
        ));
    }
    Ok(ValidRequest {
        prompt,
        n: common.n,
        tools: None,
        echo,
        token_ids: req.return_tokens_as_token_ids == Some(true),
        context_limit: None,
        sampling: common.sampling,
        max_tokens: Some(max_tokens),
        stop: common.stop,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs,
        constraint,
    })
}

/// Validates Mistral's `POST /v1/fim/completions`: `prompt` (the code before the gap),
/// optional `suffix` (after it), and the sampling fields completions take; `max_tokens`
/// defaults to the room left in the context, as Mistral's API does.
pub(crate) fn fim(req: &CompletionRequest, model_id: &str) -> Result<ValidRequest, ApiError> {
    check_model(req.model.as_deref(), model_id)?;
    let prefix = match req.prompt.as_ref() {
        Some(Value::String(text)) => text.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"));
        }
        Some(_) => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
    };
    for (param, given) in [
        ("echo", req.echo == Some(true)),
        ("logprobs", req.logprobs.is_some()),
        ("best_of", req.best_of.is_some_and(|n| n != 1)),
    ] {
        if given {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` is not accepted by fill-in-the-middle completions"),
            ));
        }
    }
    let constraint = constraint(req.raw_constraint())?;
    let common = common(req.raw_sampling())?;
    Ok(ValidRequest {
        prompt: Prompt::Fim {
            prefix,
            suffix: req.suffix.clone().unwrap_or_default(),
        },
        n: common.n,
        tools: None,
        echo: false,
        token_ids: false,
        context_limit: None,
        sampling: common.sampling,
        max_tokens: positive("max_tokens", req.max_tokens)?,
        stop: common.stop,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs: None,
        constraint,
    })
}

pub(crate) fn check_model(model: Option<&str>, model_id: &str) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid("model", "`model` is required")),
        Some(model) if model == model_id => Ok(()),
        Some(model) => Err(ApiError::model_not_found(model)),
    }
}

pub(crate) fn chat_message(index: usize, message: &RawMessage) -> Result<ChatMessage, ApiError> {
    let role = message.role.as_deref().ok_or_else(|| {
        ApiError::invalid(
            format!("messages[{index}].role"),
            format!("`messages[{index}].role` is required"),
        )
    })?;
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(
            format!("messages[{index}].role"),
            format!(
                "`messages[{index}].role` is `{role}`; expected one of {}",
                ROLES.join(", ")
            ),
        ));
    }
    let param = || format!("messages[{index}].content");
    let content = match &message.content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (part_index, part) in parts.iter().enumerate() {
                text.push_str(text_part(part).ok_or_else(|| {
                    ApiError::invalid(
                        param(),
                        format!(
                            "`messages[{index}].content[{part_index}]` is not supported: only \
                             parts of type `text` with a string `text` are"
                        ),
                    )
                })?);
            }
            text
        }
        // An assistant turn that only called tools has no content.
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                param(),
                format!("`messages[{index}].content` is required"),
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                param(),
                format!("`messages[{index}].content` must be a string or an array of text parts"),
            ));
        }
    };
    Ok(ChatMessage {
        role: role.to_owned(),
        content,
    })
}

/// A chat message as the engine takes it (OpenAI's shape): the content as text (or null for
/// an assistant turn with only tool calls), and the tool and reasoning fields the role
/// allows, checked.
fn message_json(index: usize, raw: &RawMessage) -> Result<Value, ApiError> {
    let message = chat_message(index, raw)?;
    let mut out = serde_json::Map::new();
    out.insert("role".into(), Value::String(message.role.clone()));
    let bad = |field: &str, what: &str| {
        ApiError::invalid(
            format!("messages[{index}].{field}"),
            format!("`messages[{index}].{field}` {what}"),
        )
    };
    let text = |field: &str, v: &Option<Value>| -> Result<Option<String>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(field, "must be a string")),
        }
    };
    let calls = match &raw.tool_calls {
        None | Some(Value::Null) => None,
        Some(Value::Array(calls)) if message.role == "assistant" => {
            let mut checked = Vec::with_capacity(calls.len());
            for (k, call) in calls.iter().enumerate() {
                let field = format!("tool_calls[{k}]");
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(&field, "needs `function.name`"))?;
                let arguments = match call.pointer("/function/arguments") {
                    None | Some(Value::Null) => "{}".to_owned(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                let mut c = json!({"type": "function",
                    "function": {"name": name, "arguments": arguments}});
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    c["id"] = Value::String(id.to_owned());
                }
                checked.push(c);
            }
            Some(checked)
        }
        Some(Value::Array(_)) => return Err(bad("tool_calls", "is only for assistant messages")),
        Some(_) => return Err(bad("tool_calls", "must be an array")),
    };
    let content_missing = raw.content.as_ref().is_none_or(Value::is_null);
    if content_missing && calls.is_some() {
        out.insert("content".into(), Value::Null);
    } else {
        out.insert("content".into(), Value::String(message.content));
    }
    if let Some(calls) = calls {
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = text("tool_call_id", &raw.tool_call_id)? {
        out.insert("tool_call_id".into(), Value::String(id));
    }
    if let Some(name) = text("name", &raw.name)? {
        out.insert("name".into(), Value::String(name));
    }
    if let Some(reasoning) = text("reasoning_content", &raw.reasoning_content)? {
        out.insert("reasoning_content".into(), Value::String(reasoning));
    }
    Ok(Value::Object(out))
}

/// The text of a `{"type":"text","text":...}` part, or `None` for any other part.
fn text_part(part: &Value) -> Option<&str> {
    let object = part.as_object()?;
    if object.get("type")?.as_str()? != "text" {
        return None;
    }
    object.get("text")?.as_str()
}

/// `/v1/completions`' `prompt`: a string, a list of token ids, or a batch (a list of strings
/// or a list of token-id lists); a list of one string is that string.
fn completion_prompt(prompt: Option<&Value>) -> Result<Prompt, ApiError> {
    let shape = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of token ids, a list of strings or a list of \
             token-id lists",
        )
    };
    let items = match prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"));
        }
        Some(Value::String(text)) => return Ok(Prompt::Text(text.clone())),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(shape()),
    };
    match items.first() {
        None => Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        )),
        Some(Value::Number(_)) => token_ids(items, "prompt").map(Prompt::Tokens),
        Some(Value::String(_) | Value::Array(_)) => {
            if items.len() > MAX_BATCH_PROMPTS {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "`prompt` lists {} prompts; at most {MAX_BATCH_PROMPTS} are taken in one \
                         request",
                        items.len()
                    ),
                ));
            }
            let mut prompts = items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(text) => Ok(Prompt::Text(text.clone())),
                    Value::Array(ids) if !ids.is_empty() => {
                        token_ids(ids, &format!("prompt[{i}]")).map(Prompt::Tokens)
                    }
                    _ => Err(shape()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if prompts.len() == 1 {
                prompts.remove(0)
            } else {
                Prompt::Batch(prompts)
            })
        }
        Some(_) => Err(shape()),
    }
}

/// A list of token ids (each an integer from 0 to 2^32 - 1); whether each is in the model's
/// vocabulary is checked where the tokenizer is known.
fn token_ids(items: &[Value], field: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        format!("`{field}` must hold token ids (integers from 0), not {v}"),
                    )
                })
        })
        .collect()
}

/// The output constraint of a request: OpenAI's `response_format`, or one of vLLM's
/// `guided_json` / `guided_regex` / `guided_grammar`. The grammar itself is compiled (and
/// refused with a 400 if it does not compile) when the engine takes the request.
fn constraint(raw: RawConstraint<'_>) -> Result<Option<ConstraintSpec>, ApiError> {
    let mut found: Vec<(&str, ConstraintSpec)> = Vec::new();
    if let Some(format) = raw.response_format {
        match format.kind.as_str() {
            "text" => {}
            "json_object" => found.push(("response_format", ConstraintSpec::JsonObject)),
            "json_schema" => {
                let schema = format
                    .json_schema
                    .as_ref()
                    .and_then(|f| f.schema.clone())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "response_format.json_schema.schema",
                            "`response_format` of type `json_schema` needs \
                             `json_schema.schema`",
                        )
                    })?;
                found.push(("response_format", json_schema("response_format", schema)?));
            }
            other => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!(
                        "`response_format.type` is `{other}`; expected `text`, `json_object` \
                         or `json_schema`"
                    ),
                ));
            }
        }
    }
    if let Some(grammar) = raw.grammar {
        // As llama.cpp: GBNF, or (as llama.cpp built with llguidance takes it) a Lark grammar
        // opening with the `%llguidance` directive.
        let spec = if grammar.trim_start().starts_with("%llguidance") {
            ConstraintSpec::Lark(grammar.to_owned())
        } else {
            ConstraintSpec::Gbnf(grammar.to_owned())
        };
        found.push(("grammar", spec));
    }
    if let Some(schema) = raw.guided_json {
        // vLLM takes the schema as an object or as a string holding one.
        let schema = match schema {
            Value::String(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::invalid(
                    "guided_json",
                    format!("`guided_json` is a string but not JSON: {e}"),
                )
            })?,
            other => other.clone(),
        };
        found.push(("guided_json", json_schema("guided_json", schema)?));
    }
    if let Some(regex) = raw.guided_regex {
        found.push(("guided_regex", ConstraintSpec::Regex(regex.to_owned())));
    }
    if let Some(grammar) = raw.guided_grammar {
        found.push(("guided_grammar", ConstraintSpec::Lark(grammar.to_owned())));
    }
    match found.len() {
        0 | 1 => Ok(found.pop().map(|(_, spec)| spec)),
        _ => {
            let names: Vec<&str> = found.iter().map(|(name, _)| *name).collect();
            Err(ApiError::invalid(
                names[1],
                format!(
                    "only one output constraint may be given, but the request has {}",
                    names.join(" and ")
                ),
            ))
        }
    }
}

/// A JSON schema must be an object (or `true`/`false`).
fn json_schema(param: &str, schema: Value) -> Result<ConstraintSpec, ApiError> {
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(ConstraintSpec::JsonSchema(schema)),
        _ => Err(ApiError::invalid(
            param,
            format!("`{param}`'s schema must be a JSON object"),
        )),
    }
}

/// What both endpoints validate the same way.
struct Common {
    n: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn common(raw: RawSampling<'_>) -> Result<Common, ApiError> {
    let n = match raw.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` is {n}; it must be between 1 and {MAX_CHOICES}"),
            ));
        }
    };
    let defaults = SamplingParams::default();
    let temperature = in_range("temperature", raw.temperature, 0.0, 2.0)?
        .unwrap_or(f64::from(defaults.temperature));
    let top_p = raw.top_p.unwrap_or(f64::from(defaults.top_p));
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` is {top_p}; it must be greater than 0 and at most 1"),
        ));
    }
    let presence_penalty = in_range("presence_penalty", raw.presence_penalty, -2.0, 2.0)?
        .unwrap_or(f64::from(defaults.presence_penalty));
    let frequency_penalty = in_range("frequency_penalty", raw.frequency_penalty, -2.0, 2.0)?
        .unwrap_or(f64::from(defaults.frequency_penalty));
    let min_p = in_range("min_p", raw.min_p, 0.0, 1.0)?.unwrap_or(f64::from(defaults.min_p));
    let repetition_penalty = raw
        .repetition_penalty
        .unwrap_or(f64::from(defaults.repetition_penalty));
    if repetition_penalty <= 0.0 {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` is {repetition_penalty}; it must be greater than 0"),
        ));
    }
    let top_k = match raw.top_k {
        None => defaults.top_k,
        // vLLM clients send -1 for "disabled"; 0 means the same here.
        Some(-1) => 0,
        Some(k) => usize::try_from(k).map_err(|_| {
            ApiError::invalid(
                "top_k",
                format!("`top_k` is {k}; it must be 0 or more (0 or -1 disable it)"),
            )
        })?,
    };
    let seed = match (raw.seed, raw.random_seed) {
        (None, None) => None,
        (Some(number), None) | (None, Some(number)) => Some(seed(number)?),
        (Some(a), Some(b)) if a == b => Some(seed(a)?),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "random_seed",
                "`seed` and `random_seed` (its Mistral name) differ; give one",
            ));
        }
    };
    let logit_bias = match raw.logit_bias {
        None => Vec::new(),
        Some(map) => map
            .iter()
            .map(|(token, bias)| {
                let param = || format!("logit_bias.{token}");
                let id = token.parse::<u32>().map_err(|_| {
                    ApiError::invalid(
                        param(),
                        format!("`logit_bias` key {token:?} is not a token id"),
                    )
                })?;
                let value = bias
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            param(),
                            format!(
                                "`logit_bias` for token {id} must be a number between -100 and 100"
                            ),
                        )
                    })?;
                Ok((id, value as f32))
            })
            .collect::<Result<Vec<_>, ApiError>>()?,
    };
    let stream = raw.stream.unwrap_or(false);
    // Outside streaming, usage is always in the response; the option only shapes chunks.
    let include_usage = stream
        && raw
            .stream_options
            .and_then(|options| options.include_usage)
            .unwrap_or(false);
    Ok(Common {
        n,
        // Narrowing to f32 is exact enough for sampling settings already range-checked.
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            seed,
            repetition_penalty: repetition_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            presence_penalty: presence_penalty as f32,
            logit_bias,
        },
        stop: stop_sequences(raw.stop)?,
        stream,
        include_usage,
    })
}

/// `value` if it lies in `[min, max]`.
fn in_range(param: &str, value: Option<f64>, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(ApiError::invalid(
            param,
            format!("`{param}` is {v}; it must be between {min} and {max}"),
        )),
        other => Ok(other),
    }
}

/// A token count that must be at least 1 when given.
fn positive(param: &str, value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => match usize::try_from(v) {
            Ok(count) if count >= 1 => Ok(Some(count)),
            _ => Err(ApiError::invalid(
                param,
                format!("`{param}` is {v}; it must be at least 1"),
            )),
        },
    }
}

/// Any JSON integer that fits 64 bits; negative seeds are taken as their two's-complement
/// bits, so every integer a client may send names one random stream.
fn seed(number: &serde_json::Number) -> Result<u64, ApiError> {
    if let Some(seed) = number.as_u64() {
        Ok(seed)
    } else if let Some(seed) = number.as_i64() {
        Ok(seed as u64)
    } else {
        Err(ApiError::invalid(
            "seed",
            format!("`seed` is {number}; it must be an integer"),
        ))
    }
}

fn stop_sequences(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let shape = || {
        ApiError::invalid(
            "stop",
            format!(
                "`stop` must be a string or an array of at most {MAX_STOP_SEQUENCES} non-empty strings"
            ),
        )
    };
    let sequences = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_SEQUENCES {
                return Err(shape());
            }
            items
                .iter()
                .map(|item| item.as_str().map(str::to_owned).ok_or_else(shape))
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(shape()),
    };
    if sequences.iter().any(String::is_empty) {
        return Err(shape());
    }
    Ok(sequences)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge::parse_json;

    const MODEL: &str = "test-model";

    fn chat_json(body: &str) -> Result<ValidRequest, ApiError> {
        let req: ChatCompletionRequest = parse_json(body.as_bytes())?;
        chat(&req, MODEL)
    }

    fn completion_json(body: &str) -> Result<ValidRequest, ApiError> {
        let req: CompletionRequest = parse_json(body.as_bytes())?;
        completion(&req, MODEL)
    }

    fn param_of(result: Result<ValidRequest, ApiError>) -> String {
        match result {
            Ok(valid) => panic!("expected an error, got {valid:?}"),
            Err(err) => {
                assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{err}");
                err.param().unwrap_or("<none>").to_owned()
            }
        }
    }

    #[test]
    fn minimal_chat_gets_openai_defaults() {
        let valid =
            chat_json(r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert_eq!(valid.sampling, SamplingParams::default());
        assert_eq!(valid.max_tokens, None);
        assert!(valid.stop.is_empty());
        assert!(!valid.stream);
        assert!(!valid.include_usage);
        assert_eq!(
            valid.prompt,
            Prompt::Chat(ChatRequest {
                messages: vec![json!({"role": "user", "content": "hi"})],
                tools: None,
                template_kwargs: serde_json::Map::new(),
            })
        );
        assert_eq!((valid.n, valid.tools, valid.echo), (1, None, false));
    }

    #[test]
    fn logprobs_bias_seed_alias_and_safe_prompt() {
        let valid = chat_json(
            r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}],
                "logprobs":true,"top_logprobs":3,"logit_bias":{"7":-100,"9":2.5},
                "random_seed":11,"safe_prompt":true}"#,
        )
        .unwrap();
        assert_eq!(valid.logprobs, Some(3));
        assert_eq!(valid.sampling.logit_bias, vec![(7, -100.0), (9, 2.5)]);
        assert_eq!(valid.sampling.seed, Some(11));
        let Prompt::Chat(chat) = &valid.prompt else {
            panic!("chat prompt expected");
        };
        let messages = &chat.messages;
        assert_eq!(messages[0]["role"], "system");
        assert!(
            messages[0]["content"]
                .as_str()
                .unwrap()
                .starts_with("Always assist with care")
        );
        assert_eq!(messages[1]["content"], "hi");
        let plain = chat_json(
            r#"{"model":"test-model","messages":[{"role":"user","content":"hi"}],"logprobs":false}"#,
        )
        .unwrap();
        assert_eq!(plain.logprobs, None);
    }

    #[test]
    fn every_field_is_carried() {
        let valid = chat_json(
            r#"{"model":"test-model","messages":[{"role":"system","content":"s"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null},{"role":"developer","content":"d"},
                {"role":"tool","content":"t"}],
                "temperature":0.5,"top_p":0.9,"n":1,"stream":true,
                "stream_options":{"include_usage":true},"stop":["x","yy"],
                "max_tokens":7,"max_completion_tokens":9,"presence_penalty":-1.5,
                "frequency_penalty":2,"seed":-1,"top_k":40,"min_p":0.05,
                "repetition_penalty":1.1,"user":"someone","logprobs":false}"#,
        )
        .unwrap();
        assert_eq!(valid.max_tokens, Some(9), "max_completion_tokens wins");
        assert_eq!(valid.stop, vec!["x".to_owned(), "yy".to_owned()]);
        assert!(valid.stream && valid.include_usage);
        assert_eq!(
            valid.sampling,
            SamplingParams {
                temperature: 0.5,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                seed: Some(u64::MAX),
                repetition_penalty: 1.1,
                frequency_penalty: 2.0,
                presence_penalty: -1.5,
                logit_bias: Vec::new(),
            }
        );
        let Prompt::Chat(chat) = valid.prompt else {
            panic!("chat prompt expected");
        };
        let contents: Vec<&str> = chat
            .messages
            .iter()
            .map(|m| m["content"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(contents, ["s", "ab", "", "d", "t"]);
    }

    #[test]
    fn chat_rejections_name_their_field() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        let cases = [
            (r#"{"model":"test-model"}"#.to_owned(), "messages"),
            (r#"{"model":"test-model","messages":[]}"#.to_owned(), "messages"),
            (format!(r#"{{{m}}}"#), "model"),
            (
                r#"{"model":"test-model","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}"#.to_owned(),
                "messages[1].role",
            ),
            (
                r#"{"model":"test-model","messages":[{"content":"b"}]}"#.to_owned(),
                "messages[0].role",
            ),
            (
                r#"{"model":"test-model","messages":[{"role":"user"}]}"#.to_owned(),
                "messages[0].content",
            ),
            (
                r#"{"model":"test-model","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.to_owned(),
                "messages[0].content",
            ),
            (
                r#"{"model":"test-model","messages":[{"role":"user","content":5}]}"#.to_owned(),
                "messages[0].content",
            ),
            (format!(r#"{{"model":"test-model",{m},"temperature":3}}"#), "temperature"),
            (format!(r#"{{"model":"test-model",{m},"temperature":-0.1}}"#), "temperature"),
            (format!(r#"{{"model":"test-model",{m},"top_p":0}}"#), "top_p"),
            (format!(r#"{{"model":"test-model",{m},"top_p":1.5}}"#), "top_p"),
            (format!(r#"{{"model":"test-model",{m},"n":17}}"#), "n"),
            (format!(r#"{{"model":"test-model",{m},"max_tokens":0}}"#), "max_tokens"),
            (format!(r#"{{"model":"test-model",{m},"max_completion_tokens":-3}}"#), "max_completion_tokens"),
            (format!(r#"{{"model":"test-model",{m},"presence_penalty":2.5}}"#), "presence_penalty"),
            (format!(r#"{{"model":"test-model",{m},"frequency_penalty":-3}}"#), "frequency_penalty"),
            (format!(r#"{{"model":"test-model",{m},"seed":1.5}}"#), "seed"),
            (format!(r#"{{"model":"test-model",{m},"top_k":-2}}"#), "top_k"),
            (format!(r#"{{"model":"test-model",{m},"min_p":1.5}}"#), "min_p"),
            (format!(r#"{{"model":"test-model",{m},"repetition_penalty":0}}"#), "repetition_penalty"),
            (format!(r#"{{"model":"test-model",{m},"stop":["a","b","c","d","e"]}}"#), "stop"),
            (format!(r#"{{"model":"test-model",{m},"stop":[""]}}"#), "stop"),
            (format!(r#"{{"model":"test-model",{m},"stop":[1]}}"#), "stop"),
            (format!(r#"{{"model":"test-model",{m},"stop":{{}}}}"#), "stop"),
            (format!(r#"{{"model":"test-model",{m},"logprobs":true,"top_logprobs":21}}"#), "top_logprobs"),
            (format!(r#"{{"model":"test-model",{m},"top_logprobs":2}}"#), "top_logprobs"),
            (format!(r#"{{"model":"test-model",{m},"logit_bias":{{"x":1}}}}"#), "logit_bias.x"),
            (format!(r#"{{"model":"test-model",{m},"logit_bias":{{"5":101}}}}"#), "logit_bias.5"),
            (format!(r#"{{"model":"test-model",{m},"seed":1,"random_seed":2}}"#), "random_seed"),
            (format!(r#"{{"model":"test-model",{m},"response_format":{{"type":"xml"}}}}"#), "response_format"),
            (format!(r#"{{"model":"test-model",{m},"response_format":{{"type":"json_schema"}}}}"#), "response_format.json_schema.schema"),
            (format!(r#"{{"model":"test-model",{m},"response_format":{{"type":"json_schema","json_schema":{{"schema":3}}}}}}"#), "response_format"),
            (format!(r#"{{"model":"test-model",{m},"grammar":"root ::= \"a\"","guided_grammar":"start: \"a\""}}"#), "guided_grammar"),
            (format!(r#"{{"model":"test-model",{m},"guided_json":"{{nope"}}"#), "guided_json"),
            (format!(r#"{{"model":"test-model",{m},"response_format":{{"type":"json_object"}},"guided_regex":"a"}}"#), "guided_regex"),
            (format!(r#"{{"model":"test-model",{m},"temperature":"hot"}}"#), "temperature"),
            (format!(r#"{{"model":"test-model",{m},"stream":"yes"}}"#), "stream"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(chat_json(&body)), param, "body: {body}");
        }
    }

    #[test]
    fn output_constraints_are_carried() {
        let m = r#""model":"test-model","messages":[{"role":"user","content":"hi"}]"#;
        let constraint = |extra: &str| chat_json(&format!("{{{m},{extra}}}")).unwrap().constraint;
        assert_eq!(constraint(r#""response_format":{"type":"text"}"#), None);
        assert_eq!(
            constraint(r#""response_format":{"type":"json_object"}"#),
            Some(ConstraintSpec::JsonObject)
        );
        let schema = serde_json::json!({"type":"object","properties":{"a":{"type":"integer"}}});
        assert_eq!(
            constraint(&format!(
                r#""response_format":{{"type":"json_schema","json_schema":{{"name":"x","strict":true,"schema":{schema}}}}}"#
            )),
            Some(ConstraintSpec::JsonSchema(schema.clone()))
        );
        let quoted = serde_json::to_string(&schema.to_string()).unwrap();
        assert_eq!(
            constraint(&format!(r#""guided_json":{quoted}"#)),
            Some(ConstraintSpec::JsonSchema(schema))
        );
        assert_eq!(
            constraint(r#""guided_regex":"[0-9]+""#),
            Some(ConstraintSpec::Regex("[0-9]+".into()))
        );
        assert_eq!(
            constraint(r#""grammar":"%llguidance {}\nstart: /[ab]+/""#),
            Some(ConstraintSpec::Lark(
                "%llguidance {}\nstart: /[ab]+/".into()
            ))
        );
        assert_eq!(
            constraint(r#""guided_grammar":"start: /[ab]+/""#),
            Some(ConstraintSpec::Lark("start: /[ab]+/".into()))
        );
        let completion = completion_json(
            r#"{"model":"test-model","prompt":"a","response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        assert_eq!(completion.constraint, Some(ConstraintSpec::JsonObject));
    }

    #[test]
    fn a_forced_call_takes_response_format_along_and_mistral_any_forces() {
        for choice in [r#""required""#, r#""any""#] {
            let valid = chat_json(&format!(
                r#"{{"model":"test-model","messages":[{{"role":"user","content":"hi"}}],
                "tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object"}}}}}}],
                "tool_choice":{choice},"response_format":{{"type":"json_object"}}}}"#
            ))
            .unwrap_or_else(|e| panic!("{choice}: {e}"));
            assert_eq!(valid.constraint, None, "the call's grammar governs");
            assert_eq!(
                valid.tools.map(|t| t.choice),
                Some(tools::ToolChoice::Required)
            );
        }
    }

    #[test]
    fn unknown_model_is_not_found() {
        let err = chat_json(r#"{"model":"other","messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::NOT_FOUND);
        assert_eq!(err.code(), Some("model_not_found"));
    }

    #[test]
    fn stop_string_and_null_are_accepted() {
        let m = r#""model":"test-model","messages":[{"role":"user","content":"hi"}]"#;
        let one = chat_json(&format!(r#"{{{m},"stop":"END"}}"#)).unwrap();
        assert_eq!(one.stop, vec!["END".to_owned()]);
        let none = chat_json(&format!(r#"{{{m},"stop":null,"n":null,"seed":null}}"#)).unwrap();
        assert!(none.stop.is_empty());
    }

    #[test]
    fn include_usage_needs_streaming() {
        let m = r#""model":"test-model","messages":[{"role":"user","content":"hi"}]"#;
        let valid = chat_json(&format!(
            r#"{{{m},"stream":false,"stream_options":{{"include_usage":true}}}}"#
        ))
        .unwrap();
        assert!(!valid.include_usage);
    }

    #[test]
    fn completion_defaults_and_prompt_shapes() {
        let valid = completion_json(r#"{"model":"test-model","prompt":"Once"}"#).unwrap();
        assert_eq!(valid.prompt, Prompt::Text("Once".into()));
        assert_eq!(valid.max_tokens, Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
        let one = completion_json(
            r#"{"model":"test-model","prompt":["Once"],"max_tokens":3,"echo":false}"#,
        )
        .unwrap();
        assert_eq!(one.prompt, Prompt::Text("Once".into()));
        assert_eq!(one.max_tokens, Some(3));
        let ids = completion_json(r#"{"model":"test-model","prompt":[1,2,4294967295]}"#).unwrap();
        assert_eq!(ids.prompt, Prompt::Tokens(vec![1, 2, u32::MAX]));
        let batch =
            completion_json(r#"{"model":"test-model","prompt":["a",[7,8],"c"],"n":2}"#).unwrap();
        assert_eq!(
            batch.prompt,
            Prompt::Batch(vec![
                Prompt::Text("a".into()),
                Prompt::Tokens(vec![7, 8]),
                Prompt::Text("c".into())
            ])
        );
        let many = format!(
            r#"{{"model":"test-model","prompt":[{}]}}"#,
            vec!["\"x\""; MAX_BATCH_PROMPTS + 1].join(",")
        );
        assert!(completion_json(&many).is_err());
    }

    #[test]
    fn completion_rejections_name_their_field() {
        let cases = [
            (r#"{"model":"test-model"}"#, "prompt"),
            (r#"{"model":"test-model","prompt":[]}"#, "prompt"),
            (r#"{"model":"test-model","prompt":[1,-2]}"#, "prompt"),
            (
                r#"{"model":"test-model","prompt":[1,4294967296]}"#,
                "prompt",
            ),
            (r#"{"model":"test-model","prompt":[1.5]}"#, "prompt"),
            (r#"{"model":"test-model","prompt":["a",[1],[]]}"#, "prompt"),
            (r#"{"model":"test-model","prompt":["a",{"b":1}]}"#, "prompt"),
            (r#"{"model":"test-model","prompt":{"a":1}}"#, "prompt"),
            (
                r#"{"model":"test-model","prompt":[1],"suffix":"b"}"#,
                "suffix",
            ),
            (r#"{"model":"test-model","prompt":["a","b"],"n":33}"#, "n"),
            (
                r#"{"model":"test-model","prompt":"a","echo":true,"suffix":"b"}"#,
                "echo",
            ),
            (r#"{"model":"test-model","prompt":"a","n":0}"#, "n"),
            (
                r#"{"model":"test-model","prompt":"a","max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"test-model","prompt":"a","best_of":2}"#,
                "best_of",
            ),
            (
                r#"{"model":"test-model","prompt":"a","logprobs":6}"#,
                "logprobs",
            ),
            (
                r#"{"model":"test-model","prompt":"a","temperature":2.5}"#,
                "temperature",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(completion_json(body)), param, "body: {body}");
        }
    }

    #[test]
    fn n_is_bounded() {
        let ok = completion_json(r#"{"model":"test-model","prompt":"a","n":3}"#).unwrap();
        assert_eq!(ok.n, 3);
        for n in [0, 17, -1] {
            let body = format!(r#"{{"model":"test-model","prompt":"a","n":{n}}}"#);
            assert_eq!(param_of(completion_json(&body)), "n");
        }
    }

    #[test]
    fn tools_reasoning_echo_and_fim_are_carried() {
        let valid = chat_json(
            r#"{"model":"test-model","messages":[{"role":"user","content":"hi"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                 "function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"42"}],
                "tools":[{"type":"function","function":{"name":"f"}}],
                "tool_choice":"required","reasoning_effort":"none"}"#,
        )
        .unwrap();
        let Prompt::Chat(chat) = &valid.prompt else {
            panic!("chat prompt expected");
        };
        assert_eq!(chat.messages[1]["content"], Value::Null);
        assert_eq!(chat.messages[1]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(chat.messages[2]["tool_call_id"], "call_1");
        assert_eq!(chat.template_kwargs["enable_thinking"], false);
        assert_eq!(
            valid.tools.unwrap().choice,
            crate::tools::ToolChoice::Required
        );
        let echo = completion_json(r#"{"model":"test-model","prompt":"a","echo":true}"#).unwrap();
        assert!(echo.echo);
        let fim = completion_json(r#"{"model":"test-model","prompt":"a","suffix":"b"}"#).unwrap();
        assert_eq!(
            fim.prompt,
            Prompt::Fim {
                prefix: "a".into(),
                suffix: "b".into()
            }
        );
        let m = r#""model":"test-model","messages":[{"role":"user","content":"hi"}]"#;
        for (body, param) in [
            (
                format!(r#"{{{m},"reasoning_effort":"max"}}"#),
                "reasoning_effort",
            ),
            (
                format!(r#"{{{m},"tool_choice":"required"}}"#),
                "tool_choice",
            ),
            (
                format!(
                    r#"{{{m},"tools":[{{"type":"function","function":{{"name":"f"}}}}],
                    "tool_choice":"required","guided_regex":"a+"}}"#
                ),
                "tool_choice",
            ),
            (
                r#"{"model":"test-model","messages":[{"role":"user","content":"hi",
                   "tool_calls":[]}]}"#
                    .to_owned(),
                "messages[0].tool_calls",
            ),
        ] {
            assert_eq!(param_of(chat_json(&body)), param, "{body}");
        }
    }
}
