//! Anthropic's Messages API: `POST /v1/messages` (a whole `message`, or Anthropic's
//! server-sent events) and `POST /v1/messages/count_tokens`.
//!
//! The request is translated into the chat request (`anthropic::to_chat`) and from there
//! goes the one way every chat goes: `validate::chat`, the admission under `--auth`,
//! `start_generation`. Only the answer's shape is Anthropic's: the same `OutputParser` splits
//! the output into thinking, text and tool calls, which become content blocks. Errors on these
//! routes are re-rendered in Anthropic's shape by `middleware::dialect_errors`; an error
//! after a stream started is an `error` event.

use std::collections::VecDeque;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use engine::FinishReason;
use serde_json::{Value, json};

use crate::admission::{Admission, AdmittedJson, NamesModel};
use crate::anthropic::{
    ContentBlock, MessageBody, MessageUsage, MessagesRequest, Purpose, stop_reason, to_chat,
};
use crate::error::ApiError;
use crate::generation::{Generation, OneChoice, Step, count_prompt_tokens, start_generation};
use crate::output::Piece;
use crate::state::{AppState, response_id};
use crate::stream::{EventSource, sse, to_json};
use crate::validate;

impl NamesModel for MessagesRequest {
    fn model_name(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// `POST /v1/messages`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn messages(
    State(app): State<AppState>,
    AdmittedJson { body, admission }: AdmittedJson<MessagesRequest>,
) -> Response {
    let id = response_id("msg_");
    tracing::Span::current().record("request_id", id.as_str());
    respond(&app, id, &body, admission)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    app: &AppState,
    id: String,
    body: &MessagesRequest,
    admission: Option<Admission>,
) -> Result<Response, ApiError> {
    let chat = to_chat(body, Purpose::Generate)?;
    let served = app.model(chat.model_name()).await?;
    let valid = validate::chat(&chat, &served.name)?;
    let stream = valid.stream;
    let meta = Meta {
        id,
        model: served.backend.model_id().to_owned(),
        stops: valid.stop.clone(),
    };
    let admission = admission.map(|admission| (admission, meta.id.clone()));
    let generation = start_generation(&served.backend, valid, admission).await?;
    if stream {
        Ok(sse(message_stream(meta, generation)))
    } else {
        whole_message(meta, generation).await
    }
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens (system, messages and tools, as the
/// model's template renders them), `{"input_tokens": n}`.
pub(crate) async fn count_tokens(
    State(app): State<AppState>,
    caller: Option<axum::Extension<crate::admission::Caller>>,
    edge::Json(body): edge::Json<MessagesRequest>,
) -> Result<Response, ApiError> {
    let chat = to_chat(&body, Purpose::CountTokens)?;
    let caller = caller.map(|axum::Extension(c)| c);
    if chat.model_name().is_none() {
        return Err(ApiError::invalid("model", "`model` is required"));
    }
    let served = app
        .optional_model(chat.model_name(), caller.as_ref().map(|c| c.ctx.as_ref()))
        .await?;
    let valid = validate::chat(&chat, &served.name)?;
    let input_tokens = count_prompt_tokens(&served.backend, valid).await?;
    Ok(axum::Json(json!({ "input_tokens": input_tokens })).into_response())
}

/// What the whole answer and every event share.
struct Meta {
    id: String,
    model: String,
    /// The request's `stop_sequences`, to name the one that matched.
    stops: Vec<String>,
}

/// Content blocks built from parsed pieces: consecutive pieces of one kind extend one block.
#[derive(Default)]
struct Blocks {
    blocks: Vec<ContentBlock>,
    /// The arguments of tool calls, as generated, by block index.
    arguments: Vec<(usize, String)>,
    calls: usize,
}

impl Blocks {
    fn absorb(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(t) => match self.blocks.last_mut() {
                    Some(ContentBlock::Text { text }) => text.push_str(&t),
                    _ => self.blocks.push(ContentBlock::Text { text: t }),
                },
                Piece::Reasoning(t) => match self.blocks.last_mut() {
                    Some(ContentBlock::Thinking { thinking, .. }) => thinking.push_str(&t),
                    _ => self.blocks.push(ContentBlock::Thinking {
                        thinking: t,
                        signature: String::new(),
                    }),
                },
                Piece::CallStart { id, name } => {
                    self.calls += 1;
                    self.arguments.push((self.blocks.len(), String::new()));
                    self.blocks.push(ContentBlock::ToolUse {
                        id,
                        name,
                        input: json!({}),
                    });
                }
                Piece::CallArguments(t) => {
                    if let Some((_, arguments)) = self.arguments.last_mut() {
                        arguments.push_str(&t);
                    }
                }
                Piece::CallEnd => {}
            }
        }
    }

    /// The blocks, each call's `input` parsed from its arguments. A call cut by `max_tokens`
    /// has arguments that do not parse: its `input` stays `{}` (the stream sent the fragments).
    fn finish(mut self) -> Vec<ContentBlock> {
        for (at, arguments) in self.arguments {
            if let Some(ContentBlock::ToolUse { input, .. }) = self.blocks.get_mut(at)
                && let Ok(parsed @ Value::Object(_)) = serde_json::from_str(&arguments)
            {
                *input = parsed;
            }
        }
        // A model that wrote only a call writes no text; an empty answer is one empty text.
        self.blocks
            .retain(|b| !matches!(b, ContentBlock::Text { text } if text.is_empty()));
        self.blocks
    }
}

/// Waits for the whole generation and answers one `message`.
async fn whole_message(meta: Meta, generation: Generation) -> Result<Response, ApiError> {
    let mut choice = OneChoice::new(generation);
    let mut blocks = Blocks::default();
    let (reason, usage) = loop {
        match choice.next().await {
            Step::Pieces(pieces) => blocks.absorb(pieces),
            Step::Done {
                pieces,
                reason,
                usage,
            } => {
                blocks.absorb(pieces);
                break (reason, usage);
            }
            Step::Failed(cause) => return Err(ApiError::internal(cause)),
        }
    };
    tracing::info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        "message finished"
    );
    let (stop, stop_sequence) = stop_reason(reason, blocks.calls, &meta.stops);
    let response = axum::Json(MessageBody {
        id: &meta.id,
        kind: "message",
        role: "assistant",
        model: &meta.model,
        content: blocks.finish(),
        stop_reason: Some(stop),
        stop_sequence,
        usage: MessageUsage::from(&usage),
    })
    .into_response();
    Ok(crate::openai::with_energy_headers(response, usage.energy))
}

/// The kind of the content block open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    ToolUse,
}

/// The state of one streamed message.
struct MessageStream {
    meta: Meta,
    choice: OneChoice,
    pending: VecDeque<SseEvent>,
    /// The open block and its index.
    open: Option<(Open, usize)>,
    /// Blocks started so far: the next block's index.
    started: usize,
    calls: usize,
}

fn event(name: &'static str, data: &Value) -> SseEvent {
    SseEvent::default().event(name).data(to_json(data))
}

impl MessageStream {
    fn send(&mut self, name: &'static str, data: Value) {
        self.pending.push_back(event(name, &data));
    }

    fn close(&mut self) {
        if let Some((_, index)) = self.open.take() {
            self.send(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Opens a block of `kind` unless one is open already (tool calls always open a new one).
    fn open(&mut self, kind: Open, block: Value) -> usize {
        if let Some((open, index)) = self.open
            && open == kind
            && kind != Open::ToolUse
        {
            return index;
        }
        self.close();
        let index = self.started;
        self.started += 1;
        self.open = Some((kind, index));
        self.send(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn delta(&mut self, index: usize, delta: Value) {
        self.send(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn pieces(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(text) if text.is_empty() => {}
                Piece::Content(text) => {
                    let index = self.open(Open::Text, json!({"type": "text", "text": ""}));
                    self.delta(index, json!({"type": "text_delta", "text": text}));
                }
                Piece::Reasoning(text) if text.is_empty() => {}
                Piece::Reasoning(text) => {
                    let block = json!({"type": "thinking", "thinking": "", "signature": ""});
                    let index = self.open(Open::Thinking, block);
                    self.delta(index, json!({"type": "thinking_delta", "thinking": text}));
                }
                Piece::CallStart { id, name } => {
                    self.calls += 1;
                    let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                    self.open(Open::ToolUse, block);
                }
                Piece::CallArguments(fragment) => {
                    if let Some((Open::ToolUse, index)) = self.open {
                        self.delta(
                            index,
                            json!({"type": "input_json_delta", "partial_json": fragment}),
                        );
                    }
                }
                Piece::CallEnd => self.close(),
            }
        }
    }

    fn finish(&mut self, pieces: Vec<Piece>, reason: FinishReason, usage: engine::Usage) {
        self.pieces(pieces);
        self.close();
        let (stop, stop_sequence) = stop_reason(reason, self.calls, &self.meta.stops);
        tracing::info!(
            request_id = %self.meta.id,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            stop_reason = stop,
            "message stream finished"
        );
        self.send(
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
                "usage": MessageUsage::from(&usage),
            }),
        );
        self.send("message_stop", json!({"type": "message_stop"}));
    }

    /// Ends the stream with an `error` event; the detail is logged, not sent.
    fn fail(&mut self, cause: edge::BoxError) {
        let detail = edge::Chain(cause.as_ref()).to_string();
        tracing::error!(request_id = %self.meta.id, %detail, "generation failed mid-stream");
        let err = ApiError::internal(cause);
        let body = edge::anthropic_error_body(err.status(), &err.to_string());
        self.send("error", body);
    }
}

impl EventSource for MessageStream {
    fn next_event(&mut self) -> Option<SseEvent> {
        self.pending.pop_front()
    }

    fn is_open(&self) -> bool {
        self.choice.is_open()
    }

    async fn pull(&mut self) {
        match self.choice.next().await {
            Step::Pieces(pieces) => self.pieces(pieces),
            Step::Done {
                pieces,
                reason,
                usage,
            } => self.finish(pieces, reason, usage),
            Step::Failed(cause) => self.fail(cause),
        }
    }
}

/// Anthropic's event sequence: `message_start`, `ping`, then per content block
/// `content_block_start`, its deltas (`text_delta`, `thinking_delta`, `input_json_delta`) and
/// `content_block_stop`; then `message_delta` (stop reason, usage) and `message_stop`.
fn message_stream(meta: Meta, generation: Generation) -> MessageStream {
    let start = MessageBody {
        id: &meta.id,
        kind: "message",
        role: "assistant",
        model: &meta.model,
        content: Vec::new(),
        stop_reason: None,
        stop_sequence: None,
        usage: MessageUsage {
            input_tokens: generation.prompt_tokens,
            ..MessageUsage::default()
        },
    };
    let start = json!({"type": "message_start", "message": start});
    let mut state = MessageStream {
        choice: OneChoice::new(generation),
        pending: VecDeque::new(),
        open: None,
        started: 0,
        calls: 0,
        meta,
    };
    state.send("message_start", start);
    state.send("ping", json!({"type": "ping"}));
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::test_events::one_generation;
    use crate::stream::events;
    use futures::StreamExt;

    fn meta() -> Meta {
        Meta {
            id: "msg_1".to_owned(),
            model: "m".to_owned(),
            stops: vec!["END".to_owned()],
        }
    }

    #[tokio::test]
    async fn a_stream_is_anthropics_event_sequence_and_matches_the_whole_message() {
        let events: Vec<_> = events(message_stream(
            meta(),
            one_generation(&["Hel", "lo"], FinishReason::StopSequence(0)),
        ))
        .collect()
        .await;
        assert_eq!(events.len(), 8, "{events:?}");
        let whole = whole_message(
            meta(),
            one_generation(&["Hel", "lo"], FinishReason::StopSequence(0)),
        )
        .await
        .expect("whole");
        let bytes = axum::body::to_bytes(whole.into_body(), usize::MAX)
            .await
            .expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(body["content"], json!([{"type": "text", "text": "Hello"}]));
        assert_eq!(body["stop_reason"], "stop_sequence");
        assert_eq!(body["stop_sequence"], "END");
        assert_eq!(
            body["usage"],
            json!({"input_tokens": 3, "output_tokens": 2})
        );
    }
}
