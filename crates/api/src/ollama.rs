//! Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/show`):
//! its requests as clients send them, translated into the one chat or completion request that
//! `validate` checks (so that validation, tools, constraints and the engine path are written
//! once), and its option names mapped onto ours.
//!
//! - `messages`: roles `system`, `user`, `assistant`, `tool`; an assistant's `thinking` becomes
//!   its `reasoning_content`, its `tool_calls` (`function.arguments` an object) OpenAI's calls
//!   (arguments as a JSON string); a tool message's `tool_name` its `name`. `images` are refused
//!   with a 400: the served models read text only.
//! - `format`: `"json"` is a JSON object, a schema object is that schema (constrained
//!   decoding); `think`: `false` turns a reasoning model's thinking off, `true` or a level keeps
//!   it on (a model that cannot think is a 400, as in Ollama).
//! - `options`: `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `repeat_penalty`,
//!   `presence_penalty`, `frequency_penalty` map onto our sampling fields; `num_predict` (-1 and
//!   -2: up to the context) and `num_ctx` (at most the served context; more is clamped and
//!   logged) onto the request's limits. `repeat_last_n`, `typical_p`, `tfs_z` and `mirostat`
//!   are accepted at the values our sampler matches (it penalises the whole sequence and has no
//!   typical or mirostat sampling) and refused otherwise; load-time options (`num_gpu`,
//!   `num_thread`, ...) and unknown ones are ignored and logged, as Ollama logs them. Every
//!   value is type-checked: a wrong type or range is a 400 naming `options.<name>`.
//!   `tool_choice` (`auto`, `none`, `required` or a function's name) is Souverain's own option:
//!   Ollama has no way to force a call. A forced call is a single call.
//! - Sampling defaults are Ollama's: temperature 0.8, top_k 40, top_p 0.9.

use serde::Deserialize;
use serde_json::{Map, Number, Value, json};

use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, JsonSchemaFormat, RawMessage, ResponseFormat,
};

/// Ollama's sampling defaults (`api.DefaultOptions`), used when a request leaves them out.
const DEFAULT_TEMPERATURE: f64 = 0.8;
const DEFAULT_TOP_K: i64 = 40;
const DEFAULT_TOP_P: f64 = 0.9;

/// Options that configure how Ollama loads a model; the served model is loaded already, so
/// these are ignored (and logged).
const LOAD_OPTIONS: [&str; 14] = [
    "numa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
    "penalize_newline",
];

/// `POST /api/chat` as received. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OllamaChat {
    pub(crate) model: Option<String>,
    pub(crate) messages: Option<Vec<Value>>,
    pub(crate) tools: Option<Vec<Value>>,
    pub(crate) format: Option<Value>,
    pub(crate) options: Option<Map<String, Value>>,
    pub(crate) stream: Option<bool>,
    pub(crate) think: Option<Value>,
    pub(crate) keep_alive: Option<Value>,
}

/// `POST /api/generate` as received.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OllamaGenerate {
    pub(crate) model: Option<String>,
    pub(crate) prompt: Option<String>,
    pub(crate) suffix: Option<String>,
    pub(crate) system: Option<String>,
    pub(crate) template: Option<String>,
    pub(crate) context: Option<Vec<Value>>,
    pub(crate) raw: Option<bool>,
    pub(crate) images: Option<Vec<Value>>,
    pub(crate) format: Option<Value>,
    pub(crate) options: Option<Map<String, Value>>,
    pub(crate) stream: Option<bool>,
    pub(crate) think: Option<Value>,
    pub(crate) keep_alive: Option<Value>,
}

/// `POST /api/embed` (`input`) and the legacy `POST /api/embeddings` (`prompt`) as received.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OllamaEmbed {
    pub(crate) model: Option<String>,
    pub(crate) input: Option<Value>,
    pub(crate) prompt: Option<String>,
    pub(crate) truncate: Option<bool>,
    pub(crate) options: Option<Map<String, Value>>,
    pub(crate) keep_alive: Option<Value>,
    pub(crate) dimensions: Option<i64>,
}

/// `POST /api/show` as received (`name` is the older spelling of `model`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OllamaShow {
    pub(crate) model: Option<String>,
    pub(crate) name: Option<String>,
}

impl OllamaShow {
    pub(crate) fn model_name(&self) -> Option<&str> {
        self.model.as_deref().or(self.name.as_deref())
    }
}

/// A model name as Ollama clients send it: `name` or `name:latest` (the tag Ollama adds to a
/// name without one, and the one `/api/tags` lists) both name the model `name`.
pub(crate) fn model_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// How many tokens to generate (`num_predict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumPredict {
    /// At most this many.
    Tokens(usize),
    /// Until the model stops or the context is full (-1, -2 and the default: without
    /// context shifting both end where the context ends).
    UpToContext,
}

/// The limits Ollama's options put on a generation, applied after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) num_predict: NumPredict,
    /// `num_ctx`, as asked (the handler clamps it to the served context).
    pub(crate) num_ctx: Option<usize>,
}

impl Limits {
    /// The completion's token limit (`None`: up to the context).
    pub(crate) fn max_tokens(&self) -> Option<usize> {
        match self.num_predict {
            NumPredict::Tokens(n) => Some(n),
            NumPredict::UpToContext => None,
        }
    }

    /// The context the generation may use: `num_ctx` up to the served `context_length`. Asking
    /// for more is not an error in Ollama; it is clamped here and logged.
    pub(crate) fn context(&self, context_length: usize) -> usize {
        match self.num_ctx {
            Some(n) if n > context_length => {
                tracing::warn!(
                    num_ctx = n,
                    context_length,
                    "options.num_ctx is more than the served context; clamped to it"
                );
                context_length
            }
            Some(n) => n,
            None => context_length,
        }
    }
}

/// The options mapped onto our sampling fields (still to be range-checked by `validate`).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Sampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<Number>,
    stop: Option<Value>,
    repeat_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    tool_choice: Option<Value>,
}

/// `options`, checked and mapped.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) sampling: Sampling,
    pub(crate) limits: Limits,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn option_error(name: &str, what: &str, value: &Value) -> ApiError {
    invalid(
        format!("options.{name}"),
        format!("`options.{name}` must be {what}, not {value}"),
    )
}

fn float(name: &str, value: &Value) -> Result<f64, ApiError> {
    value
        .as_f64()
        .filter(|v| v.is_finite())
        .ok_or_else(|| option_error(name, "a number", value))
}

/// An integer; a float with no fraction is taken too (JSON clients often send `40.0`).
fn integer(name: &str, value: &Value) -> Result<i64, ApiError> {
    if let Some(i) = value.as_i64() {
        return Ok(i);
    }
    match value.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(option_error(name, "an integer", value)),
    }
}

/// Checks and maps `options`.
pub(crate) fn options(options: Option<&Map<String, Value>>) -> Result<Options, ApiError> {
    let mut sampling = Sampling {
        temperature: Some(DEFAULT_TEMPERATURE),
        top_p: Some(DEFAULT_TOP_P),
        top_k: Some(DEFAULT_TOP_K),
        ..Sampling::default()
    };
    let mut limits = Limits {
        num_predict: NumPredict::UpToContext,
        num_ctx: None,
    };
    let Some(options) = options else {
        return Ok(Options { sampling, limits });
    };
    for (name, value) in options {
        if value.is_null() {
            continue;
        }
        let name = name.as_str();
        match name {
            "temperature" => sampling.temperature = Some(float(name, value)?),
            "top_p" => sampling.top_p = Some(float(name, value)?),
            "min_p" => sampling.min_p = Some(float(name, value)?),
            "repeat_penalty" => sampling.repeat_penalty = Some(float(name, value)?),
            "presence_penalty" => sampling.presence_penalty = Some(float(name, value)?),
            "frequency_penalty" => sampling.frequency_penalty = Some(float(name, value)?),
            "top_k" => sampling.top_k = Some(integer(name, value)?),
            "seed" => {
                let seed = integer(name, value)?;
                sampling.seed = Some(Number::from(seed));
            }
            "stop" => match value {
                Value::Array(items) if items.iter().all(Value::is_string) => {
                    sampling.stop = (!items.is_empty()).then(|| value.clone());
                }
                Value::String(_) => sampling.stop = Some(value.clone()),
                _ => return Err(option_error(name, "an array of strings", value)),
            },
            "num_predict" => {
                limits.num_predict = match integer(name, value)? {
                    -1 | -2 => NumPredict::UpToContext,
                    n if n >= 1 => NumPredict::Tokens(usize::try_from(n).unwrap_or(usize::MAX)),
                    n => {
                        return Err(invalid(
                            "options.num_predict",
                            format!(
                                "`options.num_predict` is {n}; it must be at least 1, or -1 \
                                 (no limit) or -2 (fill the context)"
                            ),
                        ));
                    }
                }
            }
            "num_ctx" => {
                let n = integer(name, value)?;
                if n < 1 {
                    return Err(invalid(
                        "options.num_ctx",
                        format!("`options.num_ctx` is {n}; it must be at least 1"),
                    ));
                }
                limits.num_ctx = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "repeat_last_n" => match integer(name, value)? {
                // Our penalty covers the whole sequence, which is what -1 asks for.
                -1 => {}
                0 => sampling.repeat_penalty = Some(1.0),
                n => {
                    return Err(invalid(
                        "options.repeat_last_n",
                        format!(
                            "`options.repeat_last_n` is {n}; this server penalises repeats over \
                             the whole sequence, so it takes only -1 (whole sequence) or 0 (off)"
                        ),
                    ));
                }
            },
            "typical_p" | "tfs_z" => {
                if float(name, value)? != 1.0 {
                    return Err(invalid(
                        format!("options.{name}"),
                        format!(
                            "`options.{name}` is not supported by this server's sampler; \
                             leave it out or set it to 1"
                        ),
                    ));
                }
            }
            "mirostat" => {
                if integer(name, value)? != 0 {
                    return Err(invalid(
                        "options.mirostat",
                        "mirostat sampling is not supported by this server; leave \
                         `options.mirostat` out or set it to 0",
                    ));
                }
            }
            "mirostat_tau" | "mirostat_eta" => {
                float(name, value)?;
            }
            "tool_choice" => match value {
                Value::String(choice) => {
                    sampling.tool_choice = Some(match choice.as_str() {
                        "auto" | "none" | "required" => value.clone(),
                        function => json!({"type": "function", "function": {"name": function}}),
                    });
                }
                _ => return Err(option_error(name, "a string", value)),
            },
            load if LOAD_OPTIONS.contains(&load) => {
                tracing::debug!(option = load, "Ollama load-time option ignored");
            }
            unknown => {
                tracing::warn!(option = unknown, "invalid option provided; ignored");
            }
        }
    }
    Ok(Options { sampling, limits })
}

/// `format`: `""`/absent, `"json"`, or a JSON schema object.
fn format(value: Option<&Value>) -> Result<Option<ResponseFormat>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(ResponseFormat {
            kind: "json_object".to_owned(),
            json_schema: None,
        })),
        Some(schema @ Value::Object(_)) => Ok(Some(ResponseFormat {
            kind: "json_schema".to_owned(),
            json_schema: Some(JsonSchemaFormat {
                schema: Some(schema.clone()),
            }),
        })),
        Some(other) => Err(invalid(
            "format",
            format!("`format` must be \"json\" or a JSON schema object, not {other}"),
        )),
    }
}

/// `think` as our `reasoning_effort`; `thinks` says whether the served model can think.
fn think(value: Option<&Value>, thinks: bool, model: &str) -> Result<Option<String>, ApiError> {
    let on = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Bool(false)) => return Ok(Some("none".to_owned())),
        Some(Value::Bool(true)) => None,
        Some(Value::String(level)) if matches!(level.as_str(), "low" | "medium" | "high") => {
            Some(level.clone())
        }
        Some(other) => {
            return Err(invalid(
                "think",
                format!(
                    "`think` must be true, false, \"low\", \"medium\" or \"high\", not {other}"
                ),
            ));
        }
    };
    if !thinks {
        return Err(invalid(
            "think",
            format!("\"{model}\" does not support thinking"),
        ));
    }
    Ok(on)
}

/// `keep_alive` (a number of seconds or a duration such as `"5m"`): checked, then without
/// effect, since the served model stays loaded.
fn keep_alive(value: Option<&Value>) -> Result<(), ApiError> {
    let ok = match value {
        None | Some(Value::Null | Value::Number(_)) => true,
        Some(Value::String(s)) => is_duration(s),
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "keep_alive",
            "`keep_alive` must be a number of seconds or a duration such as \"5m\"",
        ))
    }
}

/// Go's duration syntax (`"300ms"`, `"-1.5h"`, `"2h45m"`), or a plain number of seconds.
fn is_duration(s: &str) -> bool {
    let s = s.trim();
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    if s.is_empty() {
        return false;
    }
    if s.parse::<f64>().is_ok() || s == "0" {
        return true;
    }
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// What a translated generation request carries besides the request `validate` checks.
#[derive(Debug)]
pub(crate) struct Translated<R> {
    pub(crate) request: R,
    pub(crate) limits: Limits,
}

/// The request a `/api/generate` body becomes.
#[derive(Debug)]
pub(crate) enum GenerateAs {
    /// An empty prompt: Ollama's way of loading the model; answered without generating.
    Load,
    /// The prompt through the model's chat template (with `system`).
    Chat(Translated<ChatCompletionRequest>),
    /// `raw` text, or fill in the middle with `suffix`.
    Completion(Translated<CompletionRequest>),
}

/// The chat request that says what an `/api/chat` body says; `None` for a load request (no
/// messages). `thinks`: whether the served model has a reasoning block.
pub(crate) fn chat(
    req: &OllamaChat,
    thinks: bool,
    model_id: &str,
) -> Result<Option<Translated<ChatCompletionRequest>>, ApiError> {
    keep_alive(req.keep_alive.as_ref())?;
    let options = options(req.options.as_ref())?;
    let messages = match &req.messages {
        None => return Ok(None),
        Some(messages) if messages.is_empty() => return Ok(None),
        Some(messages) => messages
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut request = ChatCompletionRequest {
        model: req.model.as_deref().map(model_name).map(str::to_owned),
        messages: Some(messages),
        tools: req.tools.clone().map(Value::Array),
        response_format: format(req.format.as_ref())?,
        reasoning_effort: think(req.think.as_ref(), thinks, model_id)?,
        // Ollama streams unless told not to.
        stream: Some(req.stream.unwrap_or(true)),
        ..ChatCompletionRequest::default()
    };
    apply_sampling(&mut request, options.sampling);
    Ok(Some(Translated {
        request,
        limits: options.limits,
    }))
}

/// The request an `/api/generate` body becomes.
pub(crate) fn generate(
    req: &OllamaGenerate,
    thinks: bool,
    model_id: &str,
) -> Result<GenerateAs, ApiError> {
    keep_alive(req.keep_alive.as_ref())?;
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(images_refused("images"));
    }
    if req.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid(
            "template",
            "`template` is not supported: the model's own chat template is used. Send the \
             prompt already formatted with `raw: true` instead",
        ));
    }
    if req.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(invalid(
            "context",
            "`context` (token ids of an earlier answer) is not supported; continue a \
             conversation with /api/chat",
        ));
    }
    let options = options(req.options.as_ref())?;
    let response_format = format(req.format.as_ref())?;
    let prompt = req.prompt.clone().unwrap_or_default();
    let suffix = req.suffix.clone().filter(|s| !s.is_empty());
    if prompt.is_empty() && suffix.is_none() {
        return Ok(GenerateAs::Load);
    }
    let stream = Some(req.stream.unwrap_or(true));
    if req.raw == Some(true) || suffix.is_some() {
        if req.think.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(invalid(
                "think",
                "`think` needs the model's template; it cannot be combined with `raw` or \
                 `suffix`",
            ));
        }
        let mut request = CompletionRequest {
            model: req.model.as_deref().map(model_name).map(str::to_owned),
            prompt: Some(Value::String(prompt)),
            suffix,
            response_format,
            stream,
            ..CompletionRequest::default()
        };
        apply_completion_sampling(&mut request, options.sampling)?;
        return Ok(GenerateAs::Completion(Translated {
            request,
            limits: options.limits,
        }));
    }
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = req.system.clone().filter(|s| !s.is_empty()) {
        messages.push(RawMessage {
            role: Some("system".to_owned()),
            content: Some(Value::String(system)),
            ..RawMessage::default()
        });
    }
    messages.push(RawMessage {
        role: Some("user".to_owned()),
        content: Some(Value::String(prompt)),
        ..RawMessage::default()
    });
    let mut request = ChatCompletionRequest {
        model: req.model.as_deref().map(model_name).map(str::to_owned),
        messages: Some(messages),
        response_format,
        reasoning_effort: think(req.think.as_ref(), thinks, model_id)?,
        stream,
        ..ChatCompletionRequest::default()
    };
    apply_sampling(&mut request, options.sampling);
    Ok(GenerateAs::Chat(Translated {
        request,
        limits: options.limits,
    }))
}

/// Sets the sampling fields both generation requests share (they are made by one macro).
macro_rules! set_sampling {
    ($request:expr, $s:expr) => {{
        let (request, s) = ($request, $s);
        request.temperature = s.temperature;
        request.top_p = s.top_p;
        request.top_k = s.top_k;
        request.min_p = s.min_p;
        request.seed = s.seed;
        request.stop = s.stop;
        request.repetition_penalty = s.repeat_penalty;
        request.presence_penalty = s.presence_penalty;
        request.frequency_penalty = s.frequency_penalty;
    }};
}

fn apply_sampling(request: &mut ChatCompletionRequest, mut s: Sampling) {
    // A forced call is one call: a grammar that allows any number of them would let a model
    // call until the context is full.
    if s.tool_choice
        .as_ref()
        .is_some_and(|c| c.is_object() || c == "required")
    {
        request.parallel_tool_calls = Some(false);
    }
    request.tool_choice = s.tool_choice.take();
    set_sampling!(request, s);
}

fn apply_completion_sampling(request: &mut CompletionRequest, s: Sampling) -> Result<(), ApiError> {
    if s.tool_choice.is_some() {
        return Err(invalid(
            "options.tool_choice",
            "`options.tool_choice` is for /api/chat with `tools`",
        ));
    }
    set_sampling!(request, s);
    Ok(())
}

fn images_refused(field: &str) -> ApiError {
    invalid(
        field,
        format!(
            "`{field}` is not supported: the served model reads text only, so images cannot \
             be sent to it"
        ),
    )
}

/// One Ollama message as the chat request's message.
fn message(i: usize, m: &Value) -> Result<RawMessage, ApiError> {
    let field = |name: &str| format!("messages[{i}].{name}");
    let Some(object) = m.as_object() else {
        return Err(invalid(
            format!("messages[{i}]"),
            format!("`messages[{i}]` must be an object"),
        ));
    };
    let role = match object.get("role").and_then(Value::as_str) {
        Some(role @ ("system" | "user" | "assistant" | "tool")) => role,
        _ => {
            return Err(invalid(
                field("role"),
                format!("`messages[{i}].role` must be `system`, `user`, `assistant` or `tool`"),
            ));
        }
    };
    if object
        .get("images")
        .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()) && !v.is_null())
    {
        return Err(images_refused(&field("images")));
    }
    let string = |name: &str| -> Result<Option<String>, ApiError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(
                field(name),
                format!("`messages[{i}].{name}` must be a string"),
            )),
        }
    };
    let content = string("content")?;
    let thinking = string("thinking")?.filter(|t| !t.is_empty());
    let tool_name = string("tool_name")?;
    let tool_call_id = string("tool_call_id")?;
    let calls = match object.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(calls)) if role == "assistant" => Some(
            calls
                .iter()
                .enumerate()
                .map(|(k, call)| tool_call(&field(&format!("tool_calls[{k}]")), call))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => {
            return Err(invalid(
                field("tool_calls"),
                format!("`messages[{i}].tool_calls` must be an array on an assistant message"),
            ));
        }
    };
    let has_calls = calls.as_ref().is_some_and(|c| !c.is_empty());
    Ok(RawMessage {
        role: Some(role.to_owned()),
        content: match content {
            Some(text) => Some(Value::String(text)),
            None if has_calls => None,
            None => Some(Value::String(String::new())),
        },
        tool_calls: calls.filter(|c| !c.is_empty()).map(Value::Array),
        tool_call_id: tool_call_id.map(Value::String),
        name: tool_name.map(Value::String),
        reasoning_content: thinking.map(Value::String),
    })
}

/// `{"function": {"name", "arguments": {...}}}` as OpenAI's call (arguments as a string).
fn tool_call(field: &str, call: &Value) -> Result<Value, ApiError> {
    let name = call
        .pointer("/function/name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                format!("{field}.function.name"),
                format!("`{field}.function.name` must be a string"),
            )
        })?;
    let arguments = match call.pointer("/function/arguments") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(object @ Value::Object(_)) => object.to_string(),
        // Some clients send OpenAI's string form; it must hold an object.
        Some(Value::String(text))
            if serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()) =>
        {
            text.clone()
        }
        Some(_) => {
            return Err(invalid(
                format!("{field}.function.arguments"),
                format!("`{field}.function.arguments` must be an object"),
            ));
        }
    };
    let mut out = json!({"type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(id) = call.get("id").and_then(Value::as_str) {
        out["id"] = Value::String(id.to_owned());
    }
    Ok(out)
}

/// The inputs of `/api/embed` (`input`: a string or a list of strings) or of the legacy
/// `/api/embeddings` (`prompt`). An empty list (or an empty legacy prompt) is a load request:
/// no inputs.
pub(crate) fn embed_inputs(req: &OllamaEmbed, legacy: bool) -> Result<Vec<String>, ApiError> {
    keep_alive(req.keep_alive.as_ref())?;
    if legacy {
        return Ok(req
            .prompt
            .clone()
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect());
    }
    let shape = || invalid("input", "`input` must be a string or an array of strings");
    let inputs = match &req.input {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(shape))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(shape()),
    };
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(invalid(
            format!("input[{i}]"),
            format!("`input[{i}]` must not be an empty string"),
        ));
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate;
    use edge::parse_json;

    const MODEL: &str = "m";

    fn chat_body(body: Value) -> Result<Option<Translated<ChatCompletionRequest>>, ApiError> {
        let req: OllamaChat = parse_json(body.to_string().as_bytes())?;
        chat(&req, false, MODEL)
    }

    fn param(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(err) => {
                assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{err}");
                err.param().unwrap_or("<none>").to_owned()
            }
        }
    }

    fn opts(options: Value) -> Result<Options, ApiError> {
        let Value::Object(map) = options else {
            panic!("options must be an object")
        };
        super::options(Some(&map))
    }

    #[test]
    fn options_map_onto_our_sampling_and_limits() {
        let o = opts(json!({
            "temperature": 0.2, "top_p": 0.5, "top_k": 7.0, "min_p": 0.05, "seed": 42,
            "stop": ["END"], "repeat_penalty": 1.2, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "num_predict": 12, "num_ctx": 512,
            "num_gpu": 99, "num_thread": 8, "typical_p": 1.0, "mirostat": 0,
            "no_such_option": "ignored", "repeat_last_n": -1,
        }))
        .expect("valid options");
        assert_eq!(o.limits.max_tokens(), Some(12));
        assert_eq!(o.limits.context(2048), 512);
        let req = chat_body(json!({
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.05,
                        "seed": 42, "stop": ["END"], "repeat_penalty": 1.2,
                        "presence_penalty": 0.5, "frequency_penalty": -0.5},
        }))
        .expect("valid")
        .expect("not a load request");
        let valid = validate::chat(&req.request, MODEL).expect("validates");
        let s = &valid.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
            (0.2, 0.5, 7, 0.05, Some(42))
        );
        assert_eq!(
            (
                s.repetition_penalty,
                s.presence_penalty,
                s.frequency_penalty
            ),
            (1.2, 0.5, -0.5)
        );
        assert_eq!(valid.stop, ["END"]);
        assert!(valid.stream, "Ollama streams by default");
    }

    #[test]
    fn defaults_are_ollamas() {
        let req = chat_body(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "stream": false}),
        )
        .expect("valid")
        .expect("a chat");
        let valid = validate::chat(&req.request, MODEL).expect("validates");
        assert_eq!(
            (
                valid.sampling.temperature,
                valid.sampling.top_k,
                valid.sampling.top_p
            ),
            (0.8, 40, 0.9)
        );
        assert!(!valid.stream);
        assert_eq!(req.limits.max_tokens(), None);
        assert_eq!(req.limits.context(4096), 4096);
    }

    #[test]
    fn num_predict_and_num_ctx() {
        for unlimited in [-1, -2] {
            let o = opts(json!({"num_predict": unlimited})).expect("valid");
            assert_eq!(o.limits.num_predict, NumPredict::UpToContext);
        }
        assert_eq!(
            param(opts(json!({"num_predict": 0}))),
            "options.num_predict"
        );
        assert_eq!(
            param(opts(json!({"num_predict": -3}))),
            "options.num_predict"
        );
        assert_eq!(param(opts(json!({"num_ctx": 0}))), "options.num_ctx");
        // More than the served context is clamped, not refused.
        let o = opts(json!({"num_ctx": 1_000_000})).expect("valid");
        assert_eq!(o.limits.context(8192), 8192);
    }

    #[test]
    fn bad_option_values_are_400s_naming_the_option() {
        for (options, name) in [
            (json!({"temperature": "hot"}), "options.temperature"),
            (json!({"top_k": 1.5}), "options.top_k"),
            (json!({"seed": "x"}), "options.seed"),
            (json!({"stop": "x"}), "<ok>"),
            (json!({"stop": [1]}), "options.stop"),
            (json!({"num_ctx": "big"}), "options.num_ctx"),
            (json!({"typical_p": 0.5}), "options.typical_p"),
            (json!({"mirostat": 2}), "options.mirostat"),
            (json!({"repeat_last_n": 64}), "options.repeat_last_n"),
            (json!({"tool_choice": 3}), "options.tool_choice"),
        ] {
            if name == "<ok>" {
                assert!(opts(options).is_ok());
            } else {
                assert_eq!(param(opts(options.clone())), name, "{options}");
            }
        }
        // Ranges are `validate`'s, with the field named as ours.
        let req = chat_body(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "options": {"temperature": 9}}),
        )
        .expect("translates")
        .expect("a chat");
        assert_eq!(param(validate::chat(&req.request, MODEL)), "temperature");
    }

    #[test]
    fn messages_tools_and_images() {
        let req = chat_body(json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "thinking": "hmm",
                 "tool_calls": [{"function": {"name": "get_weather",
                                              "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "format": "json",
            "options": {"tool_choice": "get_weather"},
        }))
        .expect("valid")
        .expect("a chat");
        let messages = req.request.messages.as_ref().expect("messages");
        let call = messages[2].tool_calls.as_ref().expect("calls");
        assert_eq!(call[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(messages[2].reasoning_content, Some(json!("hmm")));
        assert_eq!(messages[3].name, Some(json!("get_weather")));
        assert_eq!(
            req.request
                .response_format
                .as_ref()
                .map(|f| f.kind.as_str()),
            Some("json_object")
        );
        let valid = validate::chat(&req.request, MODEL).expect("validates");
        assert!(matches!(
            valid.tools.as_ref().map(|t| &t.choice),
            Some(crate::tools::ToolChoice::Function(name)) if name == "get_weather"
        ));
        assert!(
            valid.tools.as_ref().is_some_and(|t| !t.parallel),
            "a forced call is one"
        );
        assert_eq!(
            param(chat_body(json!({"model": MODEL, "messages": [
                {"role": "user", "content": "what is this?", "images": ["aGk="]}]}))),
            "messages[0].images"
        );
        assert_eq!(
            param(chat_body(
                json!({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
            )),
            "messages[0].role"
        );
        assert_eq!(
            param(chat_body(
                json!({"model": MODEL, "messages": [{"role": "assistant",
                "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]})
            )),
            "messages[0].tool_calls[0].function.arguments"
        );
        assert_eq!(
            param(chat_body(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "format": "yaml"})
            )),
            "format"
        );
        assert_eq!(
            param(chat_body(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "think": true})
            )),
            "think"
        );
        assert_eq!(
            param(chat_body(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                   "keep_alive": "soon"})
            )),
            "keep_alive"
        );
        assert!(
            chat_body(json!({"model": MODEL, "messages": []}))
                .expect("load")
                .is_none()
        );
    }

    #[test]
    fn generate_shapes() {
        let gen_body = |body: Value| {
            let req: OllamaGenerate = parse_json(body.to_string().as_bytes()).expect("json");
            generate(&req, true, MODEL)
        };
        assert!(matches!(
            gen_body(json!({"model": MODEL})),
            Ok(GenerateAs::Load)
        ));
        match gen_body(json!({"model": MODEL, "prompt": "p", "system": "s", "think": false})) {
            Ok(GenerateAs::Chat(t)) => {
                let messages = t.request.messages.expect("messages");
                assert_eq!(messages.len(), 2);
                assert_eq!(t.request.reasoning_effort.as_deref(), Some("none"));
            }
            other => panic!("{other:?}"),
        }
        match gen_body(json!({"model": MODEL, "prompt": "def f(", "suffix": "return x"})) {
            Ok(GenerateAs::Completion(t)) => {
                let valid = validate::completion(&t.request, MODEL).expect("validates");
                assert!(matches!(valid.prompt, validate::Prompt::Fim { .. }));
            }
            other => panic!("{other:?}"),
        }
        match gen_body(json!({"model": MODEL, "prompt": "raw text", "raw": true,
                              "format": {"type": "object"}}))
        {
            Ok(GenerateAs::Completion(t)) => {
                let valid = validate::completion(&t.request, MODEL).expect("validates");
                assert_eq!(valid.prompt, validate::Prompt::Text("raw text".into()));
                assert!(valid.constraint.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            param(gen_body(json!({"model": MODEL, "prompt": "x",
                                         "template": "{{ .Prompt }}"}))),
            "template"
        );
        assert_eq!(
            param(gen_body(json!({"model": MODEL, "prompt": "x",
                                         "images": ["aGk="]}))),
            "images"
        );
        assert_eq!(
            param(gen_body(json!({"model": MODEL, "prompt": "x",
                                         "context": [1, 2]}))),
            "context"
        );
    }

    #[test]
    fn embed_inputs_and_durations() {
        let embed = |body: Value, legacy| {
            let req: OllamaEmbed = parse_json(body.to_string().as_bytes()).expect("json");
            embed_inputs(&req, legacy)
        };
        assert_eq!(embed(json!({"input": "a"}), false).expect("ok"), ["a"]);
        assert_eq!(
            embed(json!({"input": ["a", "b"]}), false).expect("ok"),
            ["a", "b"]
        );
        assert!(embed(json!({"input": []}), false).expect("ok").is_empty());
        assert_eq!(embed(json!({"prompt": "p"}), true).expect("ok"), ["p"]);
        assert_eq!(param(embed(json!({"input": ["a", ""]}), false)), "input[1]");
        assert_eq!(param(embed(json!({"input": [1]}), false)), "input");
        for good in ["5m", "-1", "1h30m", "300ms", "0", "2.5s"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["", "soon", "5 m", "m5", "5x"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }
}
