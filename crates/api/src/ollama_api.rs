//! Ollama's API: `POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/show`; `GET /api/tags`, `/api/ps`, `/api/version`.
//!
//! A generation is translated (`ollama`) into the chat or completion request and goes the one
//! way every generation goes: `validate`, the admission under `--auth`, `start_generation`;
//! embeddings go through `embeddings::embed`, as `/v1/embeddings` does. Only the answer is
//! Ollama's: NDJSON (`application/x-ndjson`, one object a line; streaming is the default) or
//! one JSON object with `stream: false`. The last object has `done: true`, `done_reason`
//! (`stop`, `length`, or `load` for a request without a prompt) and Ollama's counters, in
//! nanoseconds, measured here (and Souverain's `energy_joules` and `energy_source`, as in the
//! other APIs' usage; a whole answer has the energy headers too): `load_duration` from the request's arrival to its hand-off to
//! the engine (parsing, template, tokenisation, admission: the model itself is always
//! loaded), `prompt_eval_duration` from there to the first generated text (queueing and the
//! prompt's forward pass), `eval_duration` from there to the end, `total_duration` all of it.
//! Tool calls are sent whole, each in the object where it completes, with `arguments` as an
//! object. Errors everywhere under `/api/` are `{"error": "..."}`
//! (`middleware::dialect_errors`); one after a stream started is a last line of that shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use engine::{Event, FinishReason};
use serde_json::{Map, Value, json};

use crate::admission::{Admission, AdmittedJson, NamesModel, Tagged};
use crate::backend::{Backend, ModelFacts};
use crate::embeddings::{Embedded, Input, Overlong, dimensions_refused, embed, served_embedder};
use crate::error::ApiError;
use crate::generation::{Generation, start_generation};
use crate::models::Served;
use crate::ollama::{
    self, GenerateAs, Limits, OllamaChat, OllamaEmbed, OllamaGenerate, OllamaShow, Translated,
    model_name,
};
use crate::output::{OutputParser, Piece};
use crate::state::{AppState, traced_id};
use crate::validate::{self, ValidRequest};

const NDJSON: &str = "application/x-ndjson";

impl NamesModel for OllamaChat {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref().map(model_name)
    }
}

impl NamesModel for OllamaGenerate {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref().map(model_name)
    }
}

impl NamesModel for OllamaEmbed {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref().map(model_name)
    }
}

/// Which of Ollama's answers: `message` objects (chat) or `response` text (generate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Generate,
}

/// RFC 3339 in UTC (milliseconds), as Ollama writes `created_at`.
fn rfc3339(time: SystemTime) -> String {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    control::time::format_rfc3339_ms(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The chat model a request names (loaded), a 400 when it names none, the 404 for a name
/// no model has.
async fn named_model(app: &AppState, model: Option<&str>) -> Result<Served, ApiError> {
    app.model(model.map(model_name)).await
}

fn thinks(backend: &dyn Backend) -> bool {
    backend.chat_format().reasoning.is_some()
}

/// `POST /api/chat`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn chat(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<OllamaChat>,
) -> Response {
    let started = (Instant::now(), traced_id("ollama-"));
    let how = (Shape::Chat, body.model.as_deref(), body.stream);
    respond(
        &app,
        started,
        admission,
        how,
        |model, thinks| match ollama::chat(&body, thinks, model)? {
            None => Ok(None),
            Some(Translated { request, limits }) => {
                Ok(Some((validate::chat(&request, model)?, limits)))
            }
        },
    )
    .await
}

/// `POST /api/generate`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn generate(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<OllamaGenerate>,
) -> Response {
    let started = (Instant::now(), traced_id("ollama-"));
    let how = (Shape::Generate, body.model.as_deref(), body.stream);
    respond(&app, started, admission, how, |model, thinks| {
        Ok(Some(match ollama::generate(&body, thinks, model)? {
            GenerateAs::Load => return Ok(None),
            GenerateAs::Chat(t) => (validate::chat(&t.request, model)?, t.limits),
            GenerateAs::Completion(t) => (validate::completion(&t.request, model)?, t.limits),
        }))
    })
    .await
}

/// Checks the model, then answers what `translate` makes of the body: a load request
/// (`None`) or a generation.
async fn respond(
    app: &AppState,
    (arrived, id): (Instant, String),
    admission: Option<Admission>,
    (shape, asked, stream): (Shape, Option<&str>, Option<bool>),
    translate: impl FnOnce(&str, bool) -> Result<Option<(ValidRequest, Limits)>, ApiError>,
) -> Response {
    async {
        let served = named_model(app, asked).await?;
        let backend = &served.backend;
        match translate(&served.name, thinks(backend.as_ref()))? {
            None => Ok(load_answer(backend.model_id(), shape, stream)),
            Some((valid, limits)) => {
                answer(backend, id, shape, valid, limits, admission, arrived).await
            }
        }
    }
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// The answer to a request without a prompt: Ollama loads the model and says so.
fn load_answer(model: &str, shape: Shape, stream: Option<bool>) -> Response {
    let mut object = Map::new();
    object.insert("model".into(), model.into());
    object.insert("created_at".into(), now().into());
    match shape {
        Shape::Chat => {
            object.insert(
                "message".into(),
                json!({"role": "assistant", "content": ""}),
            );
        }
        Shape::Generate => {
            object.insert("response".into(), "".into());
        }
    }
    object.insert("done".into(), true.into());
    object.insert("done_reason".into(), "load".into());
    let object = Value::Object(object);
    if stream.unwrap_or(true) {
        ndjson(futures::stream::once(async move { line(&object) }))
    } else {
        axum::Json(object).into_response()
    }
}

fn line(object: &Value) -> Bytes {
    let mut text = object.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn ndjson(lines: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    (
        [(header::CONTENT_TYPE, NDJSON)],
        Body::from_stream(lines.map(Ok::<Bytes, Infallible>)),
    )
        .into_response()
}

/// Applies Ollama's limits, starts the generation and answers, streamed or whole.
async fn answer(
    backend: &Arc<dyn Backend>,
    id: String,
    shape: Shape,
    mut valid: ValidRequest,
    limits: Limits,
    admission: Option<Admission>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    valid.max_tokens = limits.max_tokens();
    let context = limits.context(backend.context_length());
    valid.context_limit = (context < backend.context_length()).then_some(context);
    let stream = valid.stream;
    let admission = admission.map(|admission| (admission, id));
    let generation = start_generation(backend, valid, admission).await?;
    let reply = Replies {
        shape,
        model: backend.model_id().to_owned(),
        timing: Timing {
            arrived,
            handed: Instant::now(),
            first: None,
        },
        turn: Turn::new(generation),
    };
    if stream {
        Ok(ndjson(futures::stream::unfold(
            Some(reply),
            |state| async move {
                let mut reply = state?;
                loop {
                    return match reply.next().await {
                        Step::Part(part) if part.is_empty() => continue,
                        Step::Part(part) => {
                            let object = reply.object(&part, None);
                            Some((line(&object), Some(reply)))
                        }
                        Step::Done(part, done) => {
                            let object = reply.object(&part, Some(&done));
                            Some((line(&object), None))
                        }
                        Step::Failed(message) => Some((line(&json!({ "error": message })), None)),
                    };
                }
            },
        )))
    } else {
        whole(reply).await
    }
}

/// Gathers the whole generation into one object.
async fn whole(mut reply: Replies) -> Result<Response, ApiError> {
    let mut all = Part::default();
    loop {
        match reply.next().await {
            Step::Part(part) => all.extend(part),
            Step::Done(part, done) => {
                all.extend(part);
                let response = axum::Json(reply.object(&all, Some(&done))).into_response();
                return Ok(crate::openai::with_energy_headers(
                    response,
                    done.usage.energy,
                ));
            }
            Step::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
}

/// What one object adds to the answer.
#[derive(Debug, Default, PartialEq)]
struct Part {
    content: String,
    thinking: String,
    /// Complete tool calls, in Ollama's shape.
    calls: Vec<Value>,
}

impl Part {
    fn is_empty(&self) -> bool {
        self.content.is_empty() && self.thinking.is_empty() && self.calls.is_empty()
    }

    fn extend(&mut self, other: Part) {
        self.content.push_str(&other.content);
        self.thinking.push_str(&other.thinking);
        self.calls.extend(other.calls);
    }
}

/// The output of one generation, parsed into content, thinking and whole tool calls.
struct Turn {
    receiver: tokio::sync::mpsc::UnboundedReceiver<Tagged>,
    parser: OutputParser,
    /// The call being generated: id, name, arguments so far.
    call: Option<(String, String, String)>,
    calls: usize,
}

impl Turn {
    fn new(generation: Generation) -> Self {
        let Generation {
            receiver,
            mut parsers,
            ..
        } = generation;
        Turn {
            receiver,
            parser: parsers
                .pop()
                .unwrap_or_else(|| OutputParser::new(Default::default())),
            call: None,
            calls: 0,
        }
    }

    fn absorb(&mut self, pieces: Vec<Piece>, part: &mut Part) {
        for piece in pieces {
            match piece {
                Piece::Content(text) => part.content.push_str(&text),
                Piece::Reasoning(text) => part.thinking.push_str(&text),
                Piece::CallStart { id, name } => {
                    self.end_call(part);
                    self.call = Some((id, name, String::new()));
                }
                Piece::CallArguments(fragment) => {
                    if let Some((_, _, arguments)) = &mut self.call {
                        arguments.push_str(&fragment);
                    }
                }
                Piece::CallEnd => self.end_call(part),
            }
        }
    }

    /// The call in progress, whole, with its arguments as an object (`{}` when a call cut by
    /// the token limit left them unparsable).
    fn end_call(&mut self, part: &mut Part) {
        let Some((id, name, arguments)) = self.call.take() else {
            return;
        };
        let arguments = match serde_json::from_str::<Value>(&arguments) {
            Ok(object @ Value::Object(_)) => object,
            _ => json!({}),
        };
        part.calls.push(json!({
            "id": id,
            "function": {"index": self.calls, "name": name, "arguments": arguments},
        }));
        self.calls += 1;
    }
}

/// When the request arrived, went to the engine, and produced its first text.
struct Timing {
    arrived: Instant,
    handed: Instant,
    first: Option<Instant>,
}

/// Ollama's closing fields.
struct Done {
    reason: FinishReason,
    usage: engine::Usage,
    timing: (u64, u64, u64, u64),
}

enum Step {
    Part(Part),
    Done(Part, Done),
    Failed(String),
}

/// The answer being built: the generation and what every object repeats.
struct Replies {
    shape: Shape,
    model: String,
    timing: Timing,
    turn: Turn,
}

impl Replies {
    async fn next(&mut self) -> Step {
        let mut part = Part::default();
        match self.turn.receiver.recv().await {
            None => Step::Failed("the engine closed the stream without finishing it".into()),
            Some((_, Event::Text(text))) => {
                self.timing.first.get_or_insert_with(Instant::now);
                let pieces = self.turn.parser.feed(&text);
                self.turn.absorb(pieces, &mut part);
                Step::Part(part)
            }
            Some((_, Event::Logprobs(_) | Event::PromptLogprobs(_))) => Step::Part(part),
            Some((
                _,
                Event::Done {
                    finish_reason,
                    usage,
                },
            )) => {
                let end = Instant::now();
                let pieces = self.turn.parser.finish();
                self.turn.absorb(pieces, &mut part);
                self.turn.end_call(&mut part);
                let t = &self.timing;
                let first = t.first.unwrap_or(end);
                tracing::info!(
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    "ollama generation finished"
                );
                Step::Done(
                    part,
                    Done {
                        reason: finish_reason,
                        usage,
                        timing: (
                            nanos(end - t.arrived),
                            nanos(t.handed - t.arrived),
                            nanos(first - t.handed),
                            nanos(end - first),
                        ),
                    },
                )
            }
            Some((_, Event::Failed(failure))) => {
                let cause: edge::BoxError = failure.into();
                tracing::error!(detail = %edge::Chain(cause.as_ref()), "generation failed");
                Step::Failed(ApiError::internal(cause).to_string())
            }
        }
    }

    /// One object of the answer: `part`, and the closing fields when `done`.
    fn object(&self, part: &Part, done: Option<&Done>) -> Value {
        let mut object = Map::new();
        object.insert("model".into(), self.model.clone().into());
        object.insert("created_at".into(), now().into());
        match self.shape {
            Shape::Chat => {
                let mut message = Map::new();
                message.insert("role".into(), "assistant".into());
                message.insert("content".into(), part.content.clone().into());
                if !part.thinking.is_empty() {
                    message.insert("thinking".into(), part.thinking.clone().into());
                }
                if !part.calls.is_empty() {
                    message.insert("tool_calls".into(), Value::Array(part.calls.clone()));
                }
                object.insert("message".into(), Value::Object(message));
            }
            Shape::Generate => {
                object.insert("response".into(), part.content.clone().into());
                if !part.thinking.is_empty() {
                    object.insert("thinking".into(), part.thinking.clone().into());
                }
            }
        }
        object.insert("done".into(), done.is_some().into());
        if let Some(done) = done {
            let reason = match done.reason {
                FinishReason::Length => "length",
                FinishReason::Stop | FinishReason::StopSequence(_) => "stop",
            };
            let (total, load, prompt_eval, eval) = done.timing;
            object.insert("done_reason".into(), reason.into());
            object.insert("total_duration".into(), total.into());
            object.insert("load_duration".into(), load.into());
            object.insert("prompt_eval_count".into(), done.usage.prompt_tokens.into());
            object.insert("prompt_eval_duration".into(), prompt_eval.into());
            object.insert("eval_count".into(), done.usage.completion_tokens.into());
            object.insert("eval_duration".into(), eval.into());
            // Souverain's extension, as in the other APIs' usage (Ollama's clients ignore
            // fields they do not know).
            if let Some(e) = done.usage.energy {
                object.insert("energy_joules".into(), e.joules().into());
                object.insert("energy_source".into(), e.kind.as_str().into());
            }
        }
        Value::Object(object)
    }
}

/// `POST /api/embed`: `input` a string or strings; `truncate` (default true) cuts inputs
/// longer than the model takes, `false` refuses them.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn embed_route(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<OllamaEmbed>,
) -> Response {
    embed_any(app, body, admission, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /api/embeddings` (legacy): `prompt` → `embedding`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn embeddings_route(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<OllamaEmbed>,
) -> Response {
    embed_any(app, body, admission, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embed_any(
    app: AppState,
    body: OllamaEmbed,
    admission: Option<Admission>,
    legacy: bool,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let id = traced_id("ollama-embd-");
    let asked = body.model.as_deref().map(model_name);
    let embedder = match asked {
        None => return Err(ApiError::invalid("model", "`model` is required")),
        Some(model) if Some(model) == app.embedder.as_ref().map(|e| e.model_id()) => {
            served_embedder(&app, model)?
        }
        Some(model) if app.models.serves(model) => {
            return Err(ApiError::invalid(
                "model",
                format!("\"{model}\" does not support embeddings"),
            ));
        }
        Some(model) => return Err(ApiError::model_not_found(model)),
    };
    ollama::options(body.options.as_ref())?;
    if let Some(dimensions) = body.dimensions
        && usize::try_from(dimensions).ok() != Some(embedder.dimensions())
    {
        return Err(dimensions_refused(dimensions, embedder.as_ref()));
    }
    let inputs = ollama::embed_inputs(&body, legacy)?;
    let overlong = if body.truncate.unwrap_or(true) {
        Overlong::Truncate
    } else {
        Overlong::Refuse
    };
    let Embedded {
        vectors,
        prompt_tokens,
        energy,
    } = if inputs.is_empty() {
        // A load request: nothing to embed, nothing to meter.
        Embedded {
            vectors: Vec::new(),
            prompt_tokens: 0,
            energy: None,
        }
    } else {
        let inputs = inputs.into_iter().map(Input::Text).collect();
        embed(&embedder, &id, admission.as_ref(), inputs, overlong).await?
    };
    if legacy {
        let vector = vectors.into_iter().next().unwrap_or_default();
        let response = axum::Json(json!({ "embedding": vector })).into_response();
        return Ok(crate::openai::with_energy_headers(response, energy));
    }
    let mut object = json!({
        "model": embedder.model_id(),
        "embeddings": vectors,
        "total_duration": nanos(arrived.elapsed()),
        "load_duration": 0,
        "prompt_eval_count": prompt_tokens,
    });
    if let Some(e) = energy {
        object["energy_joules"] = e.joules().into();
        object["energy_source"] = e.kind.as_str().into();
    }
    let response = axum::Json(object).into_response();
    Ok(crate::openai::with_energy_headers(response, energy))
}

/// `GET /api/version`.
pub(crate) async fn version() -> Response {
    axum::Json(json!({ "version": env!("CARGO_PKG_VERSION") })).into_response()
}

/// A served model as Ollama describes it.
struct ModelDescription {
    name: String,
    facts: ModelFacts,
    context_length: usize,
    capabilities: Vec<&'static str>,
}

/// Every chat model (described from its file when it is not loaded), then the embedding
/// model; `loaded_only` keeps the models in memory.
fn served(app: &AppState, loaded_only: bool) -> Vec<ModelDescription> {
    let mut out = Vec::new();
    for (name, known) in app.models.each() {
        let mut capabilities = vec!["completion", "tools"];
        out.push(match known {
            Ok(backend) => {
                if backend.chat_format().reasoning.is_some() {
                    capabilities.push("thinking");
                }
                if backend.tokenize_fim("", "").is_ok() {
                    capabilities.push("insert");
                }
                ModelDescription {
                    name,
                    facts: backend.facts(),
                    context_length: backend.context_length(),
                    capabilities,
                }
            }
            Err(_) if loaded_only => continue,
            Err(facts) => {
                // Not loaded: the trained context its file states.
                let context_length = facts
                    .metadata
                    .iter()
                    .find(|(k, _)| k.ends_with(".context_length"))
                    .and_then(|(_, v)| v.as_u64())
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(0);
                ModelDescription {
                    name,
                    facts,
                    context_length,
                    capabilities,
                }
            }
        });
    }
    if let Some(embedder) = &app.embedder {
        let mut facts = embedder.facts();
        let arch = facts.architecture.clone();
        if facts.metadata.is_empty() && !arch.is_empty() {
            facts.metadata = vec![
                ("general.architecture".to_owned(), arch.clone().into()),
                (
                    format!("{arch}.embedding_length"),
                    embedder.dimensions().into(),
                ),
                (
                    format!("{arch}.context_length"),
                    embedder.max_tokens().into(),
                ),
            ];
        }
        out.push(ModelDescription {
            name: embedder.model_id().to_owned(),
            facts,
            context_length: embedder.max_tokens(),
            capabilities: vec!["embedding"],
        });
    }
    out
}

/// llama.cpp's `general.file_type` names (`llama_ftype`).
fn quantization(file_type: Option<i64>) -> Option<&'static str> {
    Some(match file_type? {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// Parameters as Ollama writes them: `134.52M`, `8.0B`, `22.57M`.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

impl ModelDescription {
    fn tagged(&self) -> String {
        format!("{}:latest", self.name)
    }

    fn details(&self) -> Value {
        let f = &self.facts;
        let file_type = f
            .metadata
            .iter()
            .find(|(k, _)| k == "general.file_type")
            .and_then(|(_, v)| v.as_i64());
        let quantization = match quantization(file_type) {
            Some(q) => q.to_owned(),
            // A safetensors directory is as its files are; llama.cpp would say F32.
            None if f.format == "safetensors" => "F32".to_owned(),
            None => String::new(),
        };
        json!({
            "parent_model": "",
            "format": f.format,
            "family": f.architecture,
            "families": [f.architecture],
            "parameter_size": parameter_size(f.parameters),
            "quantization_level": quantization,
        })
    }

    /// Not a hash of the weights (that would read gigabytes): SHA-256 of what identifies the
    /// served file (name, format, bytes, modification time), so it changes when the file does.
    fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let f = &self.facts;
        let identity = format!(
            "{}\n{}\n{}\n{}",
            self.name, f.format, f.file_bytes, f.modified_unix_s
        );
        Sha256::digest(identity.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn modified_at(&self) -> String {
        rfc3339(UNIX_EPOCH + Duration::from_secs(self.facts.modified_unix_s))
    }
}

/// `GET /api/tags`: the models served.
pub(crate) async fn tags(State(app): State<AppState>) -> Response {
    let models: Vec<Value> = served(&app, false)
        .iter()
        .map(|m| {
            json!({
                "name": m.tagged(),
                "model": m.tagged(),
                "modified_at": m.modified_at(),
                "size": m.facts.file_bytes,
                "digest": m.digest(),
                "details": m.details(),
            })
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

/// `GET /api/ps`: the models in memory (no `expires_at`: a model is unloaded only to make
/// room for another, or by an admin).
pub(crate) async fn ps(State(app): State<AppState>) -> Response {
    let models: Vec<Value> = served(&app, true)
        .iter()
        .map(|m| {
            json!({
                "name": m.tagged(),
                "model": m.tagged(),
                "size": m.facts.file_bytes.saturating_add(m.facts.cache_bytes),
                "digest": m.digest(),
                "details": m.details(),
                "size_vram": 0,
                "context_length": m.context_length,
            })
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

/// `POST /api/show`: a model's details, metadata, template and capabilities.
pub(crate) async fn show(
    State(app): State<AppState>,
    edge::Json(body): edge::Json<OllamaShow>,
) -> Result<Response, ApiError> {
    let asked = body
        .model_name()
        .map(model_name)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let all = served(&app, false);
    let Some(m) = all.iter().find(|m| m.name == asked) else {
        return Err(ApiError::model_not_found(asked));
    };
    let mut info = Map::new();
    for (key, value) in &m.facts.metadata {
        info.insert(key.clone(), value.clone());
    }
    info.insert("general.parameter_count".into(), m.facts.parameters.into());
    let parameters = format!("num_ctx {}", m.context_length);
    Ok(axum::Json(json!({
        "license": "",
        "modelfile": format!("# Served by Souverain\nFROM {}\nPARAMETER {parameters}\n", m.name),
        "parameters": parameters,
        "template": m.facts.chat_template.clone().unwrap_or_default(),
        "details": m.details(),
        "model_info": info,
        "capabilities": m.capabilities,
        "modified_at": m.modified_at(),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = UNIX_EPOCH + Duration::new(1_709_251_200 + 3723, 5_000_000);
        assert_eq!(rfc3339(t), "2024-03-01T01:02:03.005Z");
    }

    #[test]
    fn sizes_and_quantizations_read_as_ollama_writes_them() {
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(8_030_261_248), "8.0B");
        assert_eq!(parameter_size(22_713_216), "22.71M");
        assert_eq!(quantization(Some(3)), Some("Q4_1"));
        assert_eq!(quantization(Some(15)), Some("Q4_K_M"));
        assert_eq!(quantization(Some(999)), None);
    }

    #[test]
    fn tool_calls_come_whole_with_object_arguments() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut turn = Turn {
            receiver: rx,
            parser: OutputParser::new(Default::default()),
            call: None,
            calls: 0,
        };
        let mut part = Part::default();
        turn.absorb(
            vec![
                Piece::Content("ok".into()),
                Piece::CallStart {
                    id: "c1".into(),
                    name: "get_weather".into(),
                },
                Piece::CallArguments("{\"city\":".into()),
            ],
            &mut part,
        );
        assert!(part.calls.is_empty(), "a call is sent once whole");
        turn.absorb(
            vec![Piece::CallArguments("\"Paris\"}".into()), Piece::CallEnd],
            &mut part,
        );
        assert_eq!(part.content, "ok");
        assert_eq!(
            part.calls,
            [
                json!({"id": "c1", "function": {"index": 0, "name": "get_weather",
                                             "arguments": {"city": "Paris"}}})
            ]
        );
    }
}
