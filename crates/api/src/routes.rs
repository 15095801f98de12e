//! The handlers: thin, because requests arrive validated and responses are built by the
//! shapes in `openai` and `stream`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use engine::{
    ConstraintSpec, Event, FinishReason, GenerateRequest, TokenLogprobs, ToolCallFormat, Usage,
};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::Backend;
use crate::auth::Admission;
use crate::error::ApiError;
use crate::extract::Json;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, CompletionRequest,
    FunctionBody, Header, ModelCard, ModelList, TextChoice, TextCompletion, ToolCallBody,
    UsageBody,
};
use crate::output::{CallSyntax, OutputParser, ParsedCall, ParserSpec, Piece};
use crate::stream::{ChunkMeta, Endpoint, sse_response};
use crate::tools::{ToolChoice, ToolPlan};
use crate::validate::{self, Prompt, ValidRequest};

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) backend: Arc<dyn Backend>,
    /// The embedding model served beside the chat model, if any (`/v1/embeddings`).
    pub(crate) embedder: Option<Arc<dyn crate::EmbeddingBackend>>,
    /// Unix seconds when the router was built: the model's `created`.
    pub(crate) started_at: u64,
}

impl AppState {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        AppState {
            backend,
            embedder: None,
            started_at: unix_now(),
        }
    }

    /// The same state serving `embedder` on `/v1/embeddings` too.
    pub(crate) fn with_embedder(self, embedder: Option<Arc<dyn crate::EmbeddingBackend>>) -> Self {
        AppState { embedder, ..self }
    }

    /// The card of the embedding model, if one is served.
    fn embedder_card(&self) -> Option<ModelCard<'_>> {
        self.embedder.as_ref().map(|e| ModelCard {
            id: e.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
        })
    }

    fn model_card(&self) -> ModelCard<'_> {
        ModelCard {
            id: self.backend.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// A fresh response id: the prefix and 24 random alphanumerics, as OpenAI's look.
fn response_id(prefix: &str) -> String {
    use rand::Rng;
    use rand::distributions::Alphanumeric;
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{suffix}")
}

/// `GET /health`.
pub(crate) async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(app): State<AppState>) -> Response {
    axum::Json(ModelList {
        object: "list",
        data: std::iter::once(app.model_card())
            .chain(app.embedder_card())
            .collect(),
    })
    .into_response()
}

/// `GET /v1/models/{id}`; ids may hold slashes (`org/name`).
pub(crate) async fn get_model(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id == app.backend.model_id() {
        Ok(axum::Json(app.model_card()).into_response())
    } else if let Some(card) = app.embedder_card().filter(|c| c.id == id) {
        Ok(axum::Json(card).into_response())
    } else {
        Err(ApiError::ModelNotFound { model: id })
    }
}

/// `POST /v1/chat/completions`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn chat_completions(
    State(app): State<AppState>,
    admission: Option<Extension<Admission>>,
    Json(req): Json<ChatCompletionRequest>,
) -> Response {
    answer(&app, admission, "chatcmpl-", Endpoint::Chat, |model| {
        validate::chat(&req, model)
    })
    .await
}

/// `POST /v1/completions`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn completions(
    State(app): State<AppState>,
    admission: Option<Extension<Admission>>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    answer(&app, admission, "cmpl-", Endpoint::Completion, |model| {
        validate::completion(&req, model)
    })
    .await
}

/// `POST /v1/fim/completions`: Mistral's fill-in-the-middle (`prompt` before the gap,
/// `suffix` after it), answered in the chat completion's shape as Mistral's API does.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn fim_completions(
    State(app): State<AppState>,
    admission: Option<Extension<Admission>>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    answer(&app, admission, "cmpl-", Endpoint::Chat, |model| {
        validate::fim(&req, model)
    })
    .await
}

/// Names the request (recorded in the handler's span, so that every log line about it,
/// errors included, carries the id), validates it against the served model and answers.
async fn answer(
    app: &AppState,
    admission: Option<Extension<Admission>>,
    id_prefix: &str,
    endpoint: Endpoint,
    validate: impl FnOnce(&str) -> Result<ValidRequest, ApiError>,
) -> Response {
    let id = response_id(id_prefix);
    tracing::Span::current().record("request_id", id.as_str());
    match validate(app.backend.model_id()) {
        Ok(valid) => respond(app, id, valid, endpoint, admission).await,
        Err(err) => Err(err),
    }
    .unwrap_or_else(IntoResponse::into_response)
}

/// Starts the generation and answers with a stream or, once it is done, a whole response.
async fn respond(
    app: &AppState,
    id: String,
    valid: ValidRequest,
    endpoint: Endpoint,
    admission: Option<Extension<Admission>>,
) -> Result<Response, ApiError> {
    let meta = ChunkMeta {
        endpoint,
        id,
        created: unix_now(),
        model: app.backend.model_id().to_owned(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
    };
    let stream = valid.stream;
    let admission = admission.map(|Extension(admission)| (admission, meta.id.clone()));
    let generation = start_generation(&app.backend, valid, admission).await?;
    if stream {
        Ok(sse_response(meta, generation))
    } else {
        whole_response(meta, generation).await
    }
}

/// An engine event tagged with the index of the choice it belongs to.
pub(crate) type Tagged = (u32, Event);

/// Completions' `echo`: the prompt text, and the text of its first token (which has no
/// log-probability of its own).
#[derive(Debug, Clone)]
pub(crate) struct Echo {
    pub(crate) prompt: String,
    pub(crate) first_token: String,
}

/// A started generation: every choice's events on one channel, and a parser per choice.
pub(crate) struct Generation {
    pub(crate) receiver: UnboundedReceiver<Tagged>,
    pub(crate) parsers: Vec<OutputParser>,
    pub(crate) echo: Option<Echo>,
}

/// The prompt's tokens and what the model's format says about its output.
struct Encoded {
    tokens: Vec<u32>,
    parser: ParserSpec,
    reasoning: Option<engine::ReasoningSpec>,
    forcing: Option<ConstraintSpec>,
    first_token: String,
}

/// Renders and tokenises the prompt (off the executor: both are CPU work that grows with
/// the prompt), checks that it fits the context, and hands the request's `n` choices to the
/// engine. With `--auth`, the admission reserves the request's tokens once the prompt is
/// counted, and meters the generation (`auth::Meter`).
async fn start_generation(
    backend: &Arc<dyn Backend>,
    valid: ValidRequest,
    admission: Option<(Admission, String)>,
) -> Result<Generation, ApiError> {
    let worker = Arc::clone(backend);
    let prompt = valid.prompt.clone();
    let tools = valid.tools.clone();
    let echo = valid.echo;
    let encoded = tokio::task::spawn_blocking(move || -> Result<Encoded, ApiError> {
        encode(worker.as_ref(), prompt, tools.as_ref(), echo)
    })
    .await
    .map_err(|err| ApiError::Internal {
        detail: format!("tokenisation task failed: {err}"),
    })??;
    let prompt_tokens = encoded.tokens;

    let context_length = backend.context_length();
    if prompt_tokens.len() >= context_length {
        return Err(ApiError::ContextLengthExceeded {
            prompt_tokens: prompt_tokens.len(),
            context_length,
        });
    }
    tracing::debug!(
        prompt_tokens = prompt_tokens.len(),
        max_tokens = valid.max_tokens,
        n = valid.n,
        "generation admitted"
    );
    let meter = match admission {
        Some((admission, request_id)) => {
            let room = context_length - prompt_tokens.len();
            let limit = valid.max_tokens.map_or(room, |max| max.min(room));
            Some(
                admission
                    .reserve(
                        &request_id,
                        prompt_tokens.len(),
                        limit.saturating_mul(valid.n),
                    )
                    .await?,
            )
        }
        None => None,
    };
    let echo = match &valid.prompt {
        Prompt::Text(text) if valid.echo => Some(Echo {
            prompt: text.clone(),
            first_token: encoded.first_token.clone(),
        }),
        _ => None,
    };
    let constraint = valid.constraint.clone().or(encoded.forcing);
    let mut receivers = Vec::with_capacity(valid.n);
    let mut failure = None;
    for i in 0..valid.n {
        let mut sampling = valid.sampling.clone();
        // Each choice its own random stream, reproducible from the request's seed.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        let request = GenerateRequest {
            prompt_tokens: prompt_tokens.clone(),
            sampling,
            max_tokens: valid.max_tokens,
            stop: valid.stop.clone(),
            stop_at_eog: true,
            logprobs: valid.logprobs,
            prompt_logprobs: valid.logprobs.filter(|_| echo.is_some()),
            constraint: constraint.clone(),
            keep_special: !encoded.parser.is_plain(),
            reasoning: encoded.reasoning.clone(),
        };
        match backend.generate(request) {
            Ok(rx) => receivers.push(rx),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let generated = match failure {
        // Dropping the receivers already made cancels those choices.
        Some(err) => Err(err),
        None => Ok(fan_in(receivers)),
    };
    let receiver = match meter {
        Some(meter) => meter.track(generated, valid.n)?,
        None => generated?,
    };
    Ok(Generation {
        receiver,
        parsers: (0..valid.n)
            .map(|_| OutputParser::new(encoded.parser.clone()))
            .collect(),
        echo,
    })
}

/// The prompt's tokens and output format, on a blocking thread.
fn encode(
    backend: &dyn Backend,
    prompt: Prompt,
    tools: Option<&ToolPlan>,
    echo: bool,
) -> Result<Encoded, ApiError> {
    let plain = |tokens: Vec<u32>| Encoded {
        tokens,
        parser: ParserSpec::default(),
        reasoning: None,
        forcing: None,
        first_token: String::new(),
    };
    match prompt {
        Prompt::Text(text) => {
            let mut encoded = plain(backend.tokenize(&text));
            if echo && let Some(&first) = encoded.tokens.first() {
                encoded.first_token = backend.detokenize(&[first])?;
            }
            Ok(encoded)
        }
        Prompt::Fim { prefix, suffix } => Ok(plain(backend.tokenize_fim(&prefix, &suffix)?)),
        Prompt::Chat(mut request) => {
            let format = backend.chat_format();
            request.tools = tools.and_then(ToolPlan::visible_tools);
            let prompt = backend.encode_chat(&request)?;
            let calls =
                tools
                    .filter(|t| t.choice != ToolChoice::None)
                    .map(|_| match format.tool_calls {
                        ToolCallFormat::Mistral { .. } => CallSyntax::Mistral,
                        _ => CallSyntax::Hermes,
                    });
            let forcing = tools
                .and_then(|t| t.forcing_grammar(&format, &|text: &str| backend.token_id(text)));
            let parser = ParserSpec {
                calls,
                single_call: tools.is_some_and(|t| !t.parallel),
                reasoning: format.reasoning.clone(),
                reasoning_open: prompt.reasoning_open,
                short_ids: format.short_call_ids,
            };
            Ok(Encoded {
                tokens: prompt.tokens,
                reasoning: format.reasoning_spec(prompt.reasoning_open),
                parser,
                forcing,
                first_token: String::new(),
            })
        }
    }
}

/// Merges the choices' event channels into one, each event tagged with its choice. When the
/// merged receiver is dropped (the client went away), every forwarding task stops and drops
/// its engine receiver, which cancels that choice.
fn fan_in(receivers: Vec<UnboundedReceiver<Event>>) -> UnboundedReceiver<Tagged> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for (index, mut engine_rx) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        let index = index as u32;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = engine_rx.recv() => {
                        let Some(event) = event else { break };
                        let last = matches!(event, Event::Done { .. } | Event::Failed(_));
                        if tx.send((index, event)).is_err() || last {
                            break;
                        }
                    }
                    () = tx.closed() => break,
                }
            }
        });
    }
    rx
}

/// One choice of a whole response, as its events arrive.
#[derive(Default)]
struct WholeChoice {
    content: String,
    reasoning: String,
    calls: Vec<ParsedCall>,
    token_logprobs: Vec<TokenLogprobs>,
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
    finish: Option<FinishReason>,
}

impl WholeChoice {
    fn absorb(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(t) => self.content.push_str(&t),
                Piece::Reasoning(t) => self.reasoning.push_str(&t),
                Piece::Call(c) => self.calls.push(c),
            }
        }
    }
}

/// Waits for the whole generation. If the client goes away meanwhile, axum drops this
/// future and with it the receiver, which cancels the generation.
async fn whole_response(meta: ChunkMeta, generation: Generation) -> Result<Response, ApiError> {
    let Generation {
        mut receiver,
        mut parsers,
        echo,
    } = generation;
    let n = parsers.len();
    let mut choices: Vec<WholeChoice> = (0..n).map(|_| WholeChoice::default()).collect();
    let mut usage = Usage::default();
    let mut done = 0;
    while done < n {
        let Some((index, event)) = receiver.recv().await else {
            return Err(ApiError::Internal {
                detail: "the engine closed the stream without finishing it".to_owned(),
            });
        };
        let i = index as usize;
        let (Some(choice), Some(parser)) = (choices.get_mut(i), parsers.get_mut(i)) else {
            return Err(ApiError::Internal {
                detail: format!("an event for choice {index}, which does not exist"),
            });
        };
        match event {
            Event::Text(piece) => choice.absorb(parser.feed(&piece)),
            Event::Logprobs(lp) => choice.token_logprobs.push(lp),
            Event::PromptLogprobs(lp) => choice.prompt_logprobs = Some(lp),
            Event::Done {
                finish_reason,
                usage: u,
            } => {
                choice.absorb(parser.finish());
                choice.finish = Some(finish_reason);
                if done == 0 {
                    usage.prompt_tokens = u.prompt_tokens;
                }
                usage.completion_tokens += u.completion_tokens;
                usage.reasoning_tokens += u.reasoning_tokens;
                done += 1;
            }
            Event::Failed(detail) => return Err(ApiError::Internal { detail }),
        }
    }
    drop(receiver);
    tracing::info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        choices = n,
        "completion finished"
    );
    let usage_body = UsageBody::from(usage);
    let header = |object| Header {
        id: &meta.id,
        object,
        created: meta.created,
        model: &meta.model,
    };
    let reason = |c: &WholeChoice| {
        crate::stream::finish_reason(c.finish.unwrap_or(FinishReason::Stop), c.calls.len())
    };
    let response = match meta.endpoint {
        Endpoint::Chat => axum::Json(ChatCompletion {
            header: header("chat.completion"),
            choices: choices
                .iter()
                .enumerate()
                .map(|(index, c)| ChatChoice {
                    index: index as u32,
                    message: AssistantMessage {
                        role: "assistant",
                        content: (c.calls.is_empty() || !c.content.is_empty())
                            .then_some(c.content.as_str()),
                        reasoning_content: (!c.reasoning.is_empty())
                            .then_some(c.reasoning.as_str()),
                        tool_calls: c
                            .calls
                            .iter()
                            .map(|call| ToolCallBody {
                                index: None,
                                id: Some(&call.id),
                                kind: Some("function"),
                                function: FunctionBody {
                                    name: Some(&call.name),
                                    arguments: &call.arguments,
                                },
                            })
                            .collect(),
                    },
                    logprobs: meta
                        .logprobs
                        .then(|| crate::logprobs::chat(&c.token_logprobs)),
                    finish_reason: reason(c),
                })
                .collect(),
            usage: usage_body,
            system_fingerprint: None,
        })
        .into_response(),
        Endpoint::Completion => {
            let texts: Vec<String> = choices
                .iter()
                .map(|c| match &echo {
                    Some(e) => format!("{}{}", e.prompt, c.content),
                    None => c.content.clone(),
                })
                .collect();
            axum::Json(TextCompletion {
                header: header("text_completion"),
                choices: choices
                    .iter()
                    .zip(&texts)
                    .enumerate()
                    .map(|(index, (c, text))| TextChoice {
                        text,
                        index: index as u32,
                        logprobs: meta.logprobs.then(|| completion_logprobs(c, echo.as_ref())),
                        finish_reason: Some(reason(c)),
                    })
                    .collect(),
                usage: Some(Some(usage_body)),
                system_fingerprint: None,
            })
            .into_response()
        }
    };
    Ok(response)
}

/// A completion choice's `logprobs`, the echoed prompt's first when there is one.
fn completion_logprobs(choice: &WholeChoice, echo: Option<&Echo>) -> Value {
    match (echo, &choice.prompt_logprobs) {
        (Some(echo), Some(prompt)) => {
            let mut all = crate::logprobs::completion_echo(&echo.first_token, prompt);
            let offset = echo.prompt.chars().count();
            let generated = crate::logprobs::completion(&choice.token_logprobs, offset);
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                if let (Some(items), Some(more)) = (
                    all.get_mut(key).and_then(Value::as_array_mut),
                    generated.get(key).and_then(Value::as_array),
                ) {
                    items.extend(more.iter().cloned());
                }
            }
            all
        }
        _ => crate::logprobs::completion(
            &choice.token_logprobs,
            echo.map_or(0, |e| e.prompt.chars().count()),
        ),
    }
}

/// Any path no route matches.
pub(crate) async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownUrl {
        method,
        path: uri.path().to_owned(),
    }
}

/// A known path asked with the wrong method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method,
        path: uri.path().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_are_prefixed_and_distinct() {
        let a = response_id("chatcmpl-");
        let b = response_id("chatcmpl-");
        assert!(a.starts_with("chatcmpl-"));
        assert_eq!(a.len(), "chatcmpl-".len() + 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(a, b);
    }
}
