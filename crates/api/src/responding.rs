//! OpenAI's Responses API: `POST /v1/responses` (a whole `response`, or its server-sent
//! events), `GET /v1/responses/{id}` and `DELETE /v1/responses/{id}`.
//!
//! The request is translated into the chat request (`responses::translate`) and from there
//! goes the one way every chat goes: `validate::chat`, the admission under `--auth`,
//! `start_generation`. Only the answer's shape is the Responses API's: the same
//! `OutputParser` splits the output into reasoning, text and function calls, which one
//! [`Builder`] turns into output items, and, for a stream, into OpenAI's events as they
//! happen (so a stream's last event carries the very response a whole answer would be).
//!
//! Storing (`store`, `previous_response_id`, `GET`, `DELETE`) needs the control plane: a
//! response is kept in its project's store only while the project's retention allows
//! keeping content. With zero retention (the default) `store: true` is a 400 saying so; an
//! absent `store` stores only when the retention allows it. Without `--auth` there is no
//! store: `store: true` is a 400, `previous_response_id` and `GET` a 404.

use std::collections::VecDeque;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use engine::FinishReason;
use serde_json::{Map, Value, json};

use crate::admission::{Admission, AdmittedJson, Caller, NamesModel};
use crate::error::ApiError;
use crate::generation::{Generation, OneChoice, Step, start_generation};
use crate::openai::UsageBody;
use crate::output::Piece;
use crate::responses::{ResponsesRequest, Settings, Translated, previous_response_id, translate};
use crate::state::{AppState, response_id, unix_now};
use crate::stream::{EventSource, sse, to_json};
use crate::validate;

impl NamesModel for ResponsesRequest {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// The most characters of a client's id echoed in an error message.
const ECHOED_ID_CHARS: usize = 64;

fn echoed(id: &str) -> String {
    id.chars().take(ECHOED_ID_CHARS).collect()
}

fn not_found(param: Option<&str>, message: String) -> ApiError {
    ApiError::Refused(Box::new(edge::Refusal {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some(if param.is_some() {
            "previous_response_not_found"
        } else {
            "response_not_found"
        }),
        param: param.map(str::to_owned),
        message,
        retry_after_s: None,
    }))
}

fn refused_store(code: &'static str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some("store".to_owned()),
        code: Some(code),
    }
}

/// Whether the response is to be stored: `store: true` is refused where nothing may be
/// kept; an absent `store` stores when the key's project keeps content.
fn decide_store(store: Option<bool>, caller: Option<&Caller>) -> Result<bool, ApiError> {
    match (store, caller) {
        (Some(false), _) | (None, None) => Ok(false),
        (None, Some(caller)) => Ok(caller.retains()),
        (Some(true), None) => Err(refused_store(
            "store_unavailable",
            "`store` is true, but this server runs without `--auth`: it has no control plane \
             and keeps no responses. Send `store: false` (or leave it out), or serve with \
             `--auth` and a project whose retention allows storing."
                .to_owned(),
        )),
        (Some(true), Some(caller)) if !caller.retains() => Err(refused_store(
            "zero_retention",
            format!(
                "`store` is true, but project {} has zero retention (the default): it keeps no \
                 prompts or outputs, so the response cannot be stored. Send `store: false`, or \
                 give the project a retention (`retention_secs`) to store responses for that \
                 long.",
                caller.ctx.project.id
            ),
        )),
        (Some(true), Some(_)) => Ok(true),
    }
}

/// `POST /v1/responses`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn create(
    State(app): State<AppState>,
    caller: Option<Extension<Caller>>,
    AdmittedJson { body, admission }: AdmittedJson<ResponsesRequest>,
) -> Response {
    let id = response_id("resp_");
    tracing::Span::current().record("request_id", id.as_str());
    respond(&app, id, &body, caller.map(|Extension(c)| c), admission)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    app: &AppState,
    id: String,
    body: &ResponsesRequest,
    caller: Option<Caller>,
    admission: Option<Admission>,
) -> Result<Response, ApiError> {
    let store = decide_store(body.store, caller.as_ref())?;
    let history = match previous_response_id(body)? {
        None => Vec::new(),
        Some(previous) => conversation_of(caller.as_ref(), &previous).await?,
    };
    let Translated {
        chat,
        input,
        settings,
    } = translate(body, &history)?;
    let served = app.model(chat.model_name()).await?;
    let valid = validate::chat(&chat, &served.name)?;
    let stream = valid.stream;
    let meta = Meta {
        id,
        created_at: unix_now(),
        model: served.backend.model_id().to_owned(),
        settings,
        saving: store.then(|| Saving {
            caller: caller.clone(),
            conversation: history.into_iter().chain(input).collect(),
        }),
    };
    let admission = admission.map(|admission| (admission, meta.id.clone()));
    let generation = start_generation(&served.backend, valid, admission).await?;
    if stream {
        Ok(sse(response_stream(meta, generation)))
    } else {
        whole_response(meta, generation).await
    }
}

/// The input and output items of stored response `id`, in order: the conversation a
/// request with `previous_response_id` continues.
async fn conversation_of(caller: Option<&Caller>, id: &str) -> Result<Vec<Value>, ApiError> {
    let missing = || {
        not_found(
            Some("previous_response_id"),
            format!(
                "Previous response with id '{}' not found.{}",
                echoed(id),
                if caller.is_none() {
                    " This server runs without `--auth` and stores no responses."
                } else {
                    ""
                }
            ),
        )
    };
    let Some(caller) = caller else {
        return Err(missing());
    };
    let wanted = id.to_owned();
    let Some(stored) = caller
        .run(move |plane, ctx| plane.get_response(ctx, &wanted))
        .await?
    else {
        return Err(missing());
    };
    let corrupt = |what: &str| ApiError::internal(format!("stored response {id}: {what}"));
    let mut items: Vec<Value> =
        serde_json::from_str(&stored.input).map_err(|_| corrupt("input is not a JSON list"))?;
    let response: Value =
        serde_json::from_str(&stored.response).map_err(|_| corrupt("response is not JSON"))?;
    match response.get("output") {
        Some(Value::Array(output)) => items.extend(output.iter().cloned()),
        _ => return Err(corrupt("response has no output list")),
    }
    Ok(items)
}

/// `GET /v1/responses/{id}`: a response the key's project stored.
pub(crate) async fn retrieve(
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = stored(caller.map(|Extension(c)| c), &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        stored.response,
    )
        .into_response())
}

/// `DELETE /v1/responses/{id}`: deletes a response the key's project stored.
pub(crate) async fn delete(
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller.map(|Extension(c)| c);
    let wanted = id.clone();
    let deleted = match &caller {
        Some(caller) => {
            caller
                .run(move |plane, ctx| plane.delete_response(ctx, &wanted))
                .await?
        }
        None => false,
    };
    if !deleted {
        return Err(missing_response(caller.is_none(), &id));
    }
    Ok(axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

fn missing_response(without_auth: bool, id: &str) -> ApiError {
    not_found(
        None,
        format!(
            "Response with id '{}' not found.{}",
            echoed(id),
            if without_auth {
                " This server runs without `--auth` and stores no responses."
            } else {
                ""
            }
        ),
    )
}

async fn stored(caller: Option<Caller>, id: &str) -> Result<control::StoredResponse, ApiError> {
    let Some(caller) = caller else {
        return Err(missing_response(true, id));
    };
    let wanted = id.to_owned();
    caller
        .run(move |plane, ctx| plane.get_response(ctx, &wanted))
        .await?
        .ok_or_else(|| missing_response(false, id))
}

/// Where a response to be stored goes, and the conversation it ends.
struct Saving {
    caller: Option<Caller>,
    /// The input items so far: earlier responses' and this request's.
    conversation: Vec<Value>,
}

/// What the whole answer and every event share.
struct Meta {
    id: String,
    created_at: u64,
    model: String,
    settings: Settings,
    /// Set when the response is to be stored.
    saving: Option<Saving>,
}

/// How a response ended.
enum Ending<'a> {
    Done(FinishReason, &'a engine::Usage),
    Failed,
}

impl Meta {
    /// The response object with `output`, as it stands at `ending` (`None`: in progress).
    fn response(&self, output: Vec<Value>, ending: Option<Ending<'_>>) -> Value {
        let (status, incomplete, usage, error) = match ending {
            None => ("in_progress", Value::Null, Value::Null, Value::Null),
            Some(Ending::Done(reason, usage)) => {
                let incomplete = reason == FinishReason::Length;
                (
                    if incomplete {
                        "incomplete"
                    } else {
                        "completed"
                    },
                    if incomplete {
                        json!({"reason": "max_output_tokens"})
                    } else {
                        Value::Null
                    },
                    usage_json(usage),
                    Value::Null,
                )
            }
            Some(Ending::Failed) => (
                "failed",
                Value::Null,
                Value::Null,
                json!({"code": "server_error",
                       "message": "The server had an error while processing the request"}),
            ),
        };
        let mut body = Map::new();
        body.insert("id".into(), json!(self.id));
        body.insert("object".into(), json!("response"));
        body.insert("created_at".into(), json!(self.created_at));
        body.insert("status".into(), json!(status));
        body.insert("background".into(), json!(false));
        body.insert("error".into(), error);
        body.insert("incomplete_details".into(), incomplete);
        body.insert("model".into(), json!(self.model));
        body.insert("output".into(), Value::Array(output));
        body.insert("usage".into(), usage);
        body.extend(self.settings.echo(self.saving.is_some()));
        Value::Object(body)
    }

    /// Stores the finished `response` when it is to be stored.
    async fn save(&self, response: &Value) -> Result<(), ApiError> {
        let Some(saving) = &self.saving else {
            return Ok(());
        };
        let Some(caller) = &saving.caller else {
            return Err(ApiError::internal(
                "a response to store without a control plane",
            ));
        };
        let input = to_json(&saving.conversation);
        let body = to_json(response);
        let id = self.id.clone();
        caller
            .run(move |plane, ctx| plane.store_response(ctx, &id, input, body))
            .await
            .map(|_| ())
    }
}

/// `usage`: tokens in and out (reasoning among them), and Souverain's energy figures.
fn usage_json(usage: &engine::Usage) -> Value {
    let body = UsageBody::from(*usage);
    let mut out = json!({
        "input_tokens": body.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": body.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": body.completion_tokens_details.reasoning_tokens},
        "total_tokens": body.total_tokens,
    });
    if let (Some(joules), Some(source)) = (body.energy_joules, body.energy_source) {
        out["energy_joules"] = json!(joules);
        out["energy_source"] = json!(source);
    }
    out
}

/// The kind of an output item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Reasoning,
    Call,
}

/// One output item as it grows.
struct Item {
    kind: Kind,
    id: String,
    /// The message's text, the reasoning's text or the call's arguments.
    text: String,
    /// A call's id and function name.
    call_id: String,
    name: String,
    status: &'static str,
}

impl Item {
    fn json(&self) -> Value {
        match self.kind {
            Kind::Message => json!({
                "id": self.id, "type": "message", "status": self.status, "role": "assistant",
                "content": if self.status == "in_progress" { json!([]) } else { json!([self.part()]) },
            }),
            Kind::Reasoning => json!({
                "id": self.id, "type": "reasoning", "status": self.status, "summary": [],
                "content": if self.status == "in_progress" { json!([]) } else { json!([self.part()]) },
            }),
            Kind::Call => json!({
                "id": self.id, "type": "function_call", "status": self.status,
                "call_id": self.call_id, "name": self.name, "arguments": self.text,
            }),
        }
    }

    /// The content part of a message or a reasoning item.
    fn part(&self) -> Value {
        match self.kind {
            Kind::Reasoning => json!({"type": "reasoning_text", "text": self.text}),
            _ => {
                json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
            }
        }
    }
}

/// The output items built from parsed pieces: consecutive pieces of one kind extend one
/// item. For a stream it also writes OpenAI's events as items open, grow and close.
struct Builder {
    items: Vec<Item>,
    /// The index of the item open now.
    open: Option<usize>,
    /// The events not sent yet; `None` for a whole answer.
    events: Option<VecDeque<SseEvent>>,
    sequence_number: u64,
}

impl Builder {
    fn new(streaming: bool) -> Self {
        Builder {
            items: Vec::new(),
            open: None,
            events: streaming.then(VecDeque::new),
            sequence_number: 0,
        }
    }

    fn emit(&mut self, kind: &'static str, data: Value) {
        let Some(events) = &mut self.events else {
            return;
        };
        let mut data = data;
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence_number);
        self.sequence_number += 1;
        events.push_back(SseEvent::default().event(kind).data(to_json(&data)));
    }

    /// The open item of `kind` (a call always opens a new one).
    fn open(&mut self, kind: Kind, call: Option<(String, String)>) -> usize {
        if let Some(index) = self.open
            && self.items[index].kind == kind
            && kind != Kind::Call
        {
            return index;
        }
        self.close("completed");
        let index = self.items.len();
        let prefix = match kind {
            Kind::Message => "msg_",
            Kind::Reasoning => "rs_",
            Kind::Call => "fc_",
        };
        let (call_id, name) = call.unwrap_or_default();
        self.items.push(Item {
            kind,
            id: response_id(prefix),
            text: String::new(),
            call_id,
            name,
            status: "in_progress",
        });
        self.open = Some(index);
        let item = self.items[index].json();
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        if kind != Kind::Call {
            let part = self.items[index].part();
            let item_id = self.items[index].id.clone();
            self.emit(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
            );
        }
        index
    }

    fn grow(&mut self, index: usize, delta: String) {
        let item = &mut self.items[index];
        item.text.push_str(&delta);
        let item_id = item.id.clone();
        let (event, data) = match item.kind {
            Kind::Message => (
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                       "delta": delta, "logprobs": []}),
            ),
            Kind::Reasoning => (
                "response.reasoning_text.delta",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                       "delta": delta}),
            ),
            Kind::Call => (
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": delta}),
            ),
        };
        self.emit(event, data);
    }

    /// Closes the open item as `status`.
    fn close(&mut self, status: &'static str) {
        let Some(index) = self.open.take() else {
            return;
        };
        self.items[index].status = status;
        let item = &self.items[index];
        let (item_id, text) = (item.id.clone(), item.text.clone());
        match item.kind {
            Kind::Message | Kind::Reasoning => {
                let part = item.part();
                let done = if item.kind == Kind::Message {
                    "response.output_text.done"
                } else {
                    "response.reasoning_text.done"
                };
                let mut data = json!({"item_id": item_id, "output_index": index,
                    "content_index": 0, "text": text});
                if item.kind == Kind::Message {
                    data["logprobs"] = json!([]);
                }
                self.emit(done, data);
                self.emit(
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0,
                           "part": part}),
                );
            }
            Kind::Call => {
                let name = item.name.clone();
                self.emit(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": text,
                           "name": name}),
                );
            }
        }
        let item = self.items[index].json();
        self.emit(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }

    fn pieces(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(text) | Piece::Reasoning(text) if text.is_empty() => {}
                Piece::Content(text) => {
                    let index = self.open(Kind::Message, None);
                    self.grow(index, text);
                }
                Piece::Reasoning(text) => {
                    let index = self.open(Kind::Reasoning, None);
                    self.grow(index, text);
                }
                Piece::CallStart { id, name } => {
                    self.open(Kind::Call, Some((id, name)));
                }
                Piece::CallArguments(fragment) => {
                    if let Some(index) = self.open
                        && self.items[index].kind == Kind::Call
                    {
                        self.grow(index, fragment);
                    }
                }
                Piece::CallEnd => self.close("completed"),
            }
        }
    }

    /// Ends the output: the open item closes (`incomplete` when the generation was cut by
    /// `max_output_tokens`), and an answer with neither text nor calls gets an empty message.
    fn finish(&mut self, reason: FinishReason) {
        let cut = reason == FinishReason::Length;
        self.close(if cut { "incomplete" } else { "completed" });
        if !self.items.iter().any(|i| i.kind != Kind::Reasoning) {
            self.open(Kind::Message, None);
            self.close(if cut { "incomplete" } else { "completed" });
        }
    }

    fn output(&self) -> Vec<Value> {
        self.items.iter().map(Item::json).collect()
    }
}

/// Waits for the whole generation and answers one `response` (stored first when asked).
async fn whole_response(meta: Meta, generation: Generation) -> Result<Response, ApiError> {
    let mut choice = OneChoice::new(generation);
    let mut builder = Builder::new(false);
    let (reason, usage) = loop {
        match choice.next().await {
            Step::Pieces(pieces) => builder.pieces(pieces),
            Step::Done {
                pieces,
                reason,
                usage,
            } => {
                builder.pieces(pieces);
                builder.finish(reason);
                break (reason, usage);
            }
            Step::Failed(cause) => return Err(ApiError::internal(cause)),
        }
    };
    tracing::info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        "response finished"
    );
    let body = meta.response(builder.output(), Some(Ending::Done(reason, &usage)));
    meta.save(&body).await?;
    Ok(crate::openai::with_energy_headers(
        axum::Json(body).into_response(),
        usage.energy,
    ))
}

/// The state of one streamed response.
struct ResponseStream {
    meta: Meta,
    choice: OneChoice,
    builder: Builder,
}

impl ResponseStream {
    async fn finish(&mut self, pieces: Vec<Piece>, reason: FinishReason, usage: engine::Usage) {
        self.builder.pieces(pieces);
        self.builder.finish(reason);
        let body = self
            .meta
            .response(self.builder.output(), Some(Ending::Done(reason, &usage)));
        tracing::info!(
            request_id = %self.meta.id,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "response stream finished"
        );
        if let Err(err) = self.meta.save(&body).await {
            // Asked to be stored and not stored: the client must not believe it was.
            tracing::warn!(request_id = %self.meta.id, error = %err, "response not stored");
            let mut failed = body;
            failed["status"] = json!("failed");
            failed["error"] = json!({"code": "store_failed",
                "message": format!("The response could not be stored: {err}")});
            self.builder
                .emit("response.failed", json!({"response": failed}));
            return;
        }
        let event = if reason == FinishReason::Length {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.builder.emit(event, json!({"response": body}));
    }

    /// Ends the stream with `response.failed`; the detail is logged, not sent.
    fn fail(&mut self, cause: edge::BoxError) {
        let detail = edge::Chain(cause.as_ref()).to_string();
        tracing::error!(request_id = %self.meta.id, %detail, "generation failed mid-stream");
        self.builder.close("incomplete");
        let body = self
            .meta
            .response(self.builder.output(), Some(Ending::Failed));
        self.builder
            .emit("response.failed", json!({"response": body}));
    }
}

impl EventSource for ResponseStream {
    fn next_event(&mut self) -> Option<SseEvent> {
        self.builder.events.as_mut().and_then(VecDeque::pop_front)
    }

    fn is_open(&self) -> bool {
        self.choice.is_open()
    }

    async fn pull(&mut self) {
        match self.choice.next().await {
            Step::Pieces(pieces) => self.builder.pieces(pieces),
            Step::Done {
                pieces,
                reason,
                usage,
            } => self.finish(pieces, reason, usage).await,
            Step::Failed(cause) => self.fail(cause),
        }
    }
}

/// OpenAI's event sequence: `response.created`, `response.in_progress`, then per output item
/// `response.output_item.added`, its content part's `added`, deltas and `done` (or a call's
/// argument deltas and `done`), `response.output_item.done`; last `response.completed` (or
/// `response.incomplete`, `response.failed`) with the whole response. Every event carries its
/// `sequence_number`.
fn response_stream(meta: Meta, generation: Generation) -> ResponseStream {
    let mut builder = Builder::new(true);
    let start = meta.response(Vec::new(), None);
    builder.emit("response.created", json!({"response": start}));
    builder.emit("response.in_progress", json!({"response": start}));
    ResponseStream {
        choice: OneChoice::new(generation),
        builder,
        meta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::test_events::one_generation;
    use crate::stream::events;
    use futures::StreamExt;

    fn meta() -> Meta {
        let req: ResponsesRequest =
            serde_json::from_value(json!({"input": "hi", "max_output_tokens": 2}))
                .expect("request");
        Meta {
            id: "resp_1".to_owned(),
            created_at: 7,
            model: "m".to_owned(),
            settings: translate(&req, &[]).expect("valid").settings,
            saving: None,
        }
    }

    async fn whole(pieces: &[&str], reason: FinishReason) -> Value {
        let response = whole_response(meta(), one_generation(pieces, reason))
            .await
            .expect("whole");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn a_stream_is_openais_event_sequence_and_ends_with_the_whole_response() {
        let events: Vec<_> = events(response_stream(
            meta(),
            one_generation(&["Hel", "lo"], FinishReason::Stop),
        ))
        .collect()
        .await;
        // created, in_progress, item added, part added, 2 deltas, text done, part done,
        // item done, completed.
        assert_eq!(events.len(), 10, "{events:?}");
        let body = whole(&["Hel", "lo"], FinishReason::Stop).await;
        assert_eq!(body["status"], "completed");
        assert_eq!(body["incomplete_details"], Value::Null);
        assert_eq!(body["output"][0]["type"], "message");
        assert_eq!(body["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(body["usage"]["input_tokens"], 3);
        assert_eq!(body["usage"]["output_tokens"], 2);
        assert_eq!(body["usage"]["total_tokens"], 5);
        assert_eq!(body["max_output_tokens"], 2);
        assert_eq!(body["store"], false);
    }

    #[tokio::test]
    async fn a_cut_answer_is_incomplete_and_an_empty_one_still_has_a_message() {
        let body = whole(&["Hel", "lo"], FinishReason::Length).await;
        assert_eq!(body["status"], "incomplete");
        assert_eq!(body["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(body["output"][0]["status"], "incomplete");
        let body = whole(&[], FinishReason::Stop).await;
        assert_eq!(body["output"][0]["content"][0]["text"], "");
    }

    #[test]
    fn pieces_become_reasoning_message_and_call_items() {
        let mut builder = Builder::new(true);
        builder.pieces(vec![
            Piece::Reasoning("think".into()),
            Piece::Content("Sure.".into()),
            Piece::CallStart {
                id: "call_1".into(),
                name: "f".into(),
            },
            Piece::CallArguments("{\"a\":".into()),
            Piece::CallArguments("1}".into()),
            Piece::CallEnd,
        ]);
        builder.finish(FinishReason::Stop);
        let output = builder.output();
        let kinds: Vec<_> = output.iter().map(|i| i["type"].clone()).collect();
        assert_eq!(
            kinds,
            [json!("reasoning"), json!("message"), json!("function_call")]
        );
        assert_eq!(output[0]["content"][0]["text"], "think");
        assert_eq!(output[2]["arguments"], "{\"a\":1}");
        assert_eq!(output[2]["call_id"], "call_1");
        assert!(output.iter().all(|i| i["status"] == "completed"));
        let numbers = builder.sequence_number;
        // 3 items: reasoning 6 events, message 6, call 5 (added, 2 deltas, done, item done).
        assert_eq!(numbers, 17);
    }
}
