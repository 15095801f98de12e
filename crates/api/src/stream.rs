//! Server-sent events: engine events in, OpenAI chunks out.
//!
//! The SSE body owns the engine's receiver and nothing else holds it, so when a client goes
//! away hyper drops the body, the receiver goes with it, and the engine sees its channel
//! closed and stops the sequence.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use engine::{Event, FinishReason, TokenLogprobs, Usage};
use futures::Stream;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::openai::{
    ChatChunk, ChatChunkChoice, Delta, Header, TextChoice, TextCompletion, UsageBody,
};

/// Which endpoint's chunk shape to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `chat.completion.chunk` with deltas.
    Chat,
    /// `text_completion` with `text` pieces.
    Completion,
}

/// What every chunk of one response shares.
#[derive(Debug, Clone)]
pub(crate) struct ChunkMeta {
    pub(crate) endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) include_usage: bool,
    /// The request asked for token log-probabilities.
    pub(crate) logprobs: bool,
}

impl ChunkMeta {
    fn header(&self) -> Header<'_> {
        Header {
            id: &self.id,
            object: match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completion => "text_completion",
            },
            created: self.created,
            model: &self.model,
        }
    }

    /// `usage` on a chunk that is not the last: `null` if usage was asked for, else absent.
    fn usage_placeholder(&self) -> Option<Option<UsageBody>> {
        self.include_usage.then_some(None)
    }

    /// The chunk that carries `delta` (chat) or `text` (completions), or only a finish reason.
    fn chunk(
        &self,
        role: bool,
        text: Option<&str>,
        finish: Option<FinishReason>,
        logprobs: &[TokenLogprobs],
        text_offset: usize,
    ) -> String {
        let finish_reason = finish.map(FinishReason::as_str);
        let wanted = self.logprobs && !logprobs.is_empty();
        match self.endpoint {
            Endpoint::Chat => to_json(&ChatChunk {
                header: self.header(),
                system_fingerprint: None,
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: wanted.then(|| crate::logprobs::chat(logprobs)),
                    finish_reason,
                }],
                usage: self.usage_placeholder(),
            }),
            Endpoint::Completion => to_json(&TextCompletion {
                header: self.header(),
                choices: vec![TextChoice {
                    text: text.unwrap_or_default(),
                    index: 0,
                    logprobs: wanted.then(|| crate::logprobs::completion(logprobs, text_offset)),
                    finish_reason,
                }],
                usage: self.usage_placeholder(),
                system_fingerprint: None,
            }),
        }
    }

    /// The last chunk when usage was asked for: no choices, only `usage`.
    fn usage_chunk(&self, usage: Usage) -> String {
        let usage = Some(Some(UsageBody::from(usage)));
        match self.endpoint {
            Endpoint::Chat => to_json(&ChatChunk {
                header: self.header(),
                system_fingerprint: None,
                choices: Vec::new(),
                usage,
            }),
            Endpoint::Completion => to_json(&TextCompletion {
                header: self.header(),
                choices: Vec::new(),
                usage,
                system_fingerprint: None,
            }),
        }
    }
}

/// Serialises a response type. These types hold only strings and numbers, which always
/// serialise; should one ever fail, the client gets an error object instead of a panic.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|err| {
        tracing::error!(%err, "could not serialise a chunk");
        error_json(&ApiError::Internal {
            detail: err.to_string(),
        })
    })
}

fn error_json(err: &ApiError) -> String {
    serde_json::to_string(&err.body()).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_owned()
    })
}

/// The state of one streamed response.
struct ChunkStream {
    meta: ChunkMeta,
    /// `None` once the generation ended; dropping it is what cancels the engine.
    receiver: Option<UnboundedReceiver<Event>>,
    /// Events ready to send before reading the receiver again.
    pending: VecDeque<SseEvent>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    token_logprobs: Vec<TokenLogprobs>,
    /// Characters of text sent so far (completions' `text_offset`).
    sent_chars: usize,
}

impl ChunkStream {
    /// Reads the next engine event and queues what it turns into.
    async fn pull(&mut self) {
        let Some(receiver) = self.receiver.as_mut() else {
            return;
        };
        match receiver.recv().await {
            Some(Event::Text(text)) => {
                if !text.is_empty() {
                    let logprobs = std::mem::take(&mut self.token_logprobs);
                    let chunk =
                        self.meta
                            .chunk(false, Some(&text), None, &logprobs, self.sent_chars);
                    self.sent_chars += text.chars().count();
                    self.pending.push_back(SseEvent::default().data(chunk));
                }
            }
            Some(Event::Logprobs(lp)) => self.token_logprobs.push(lp),
            Some(Event::Done {
                finish_reason,
                usage,
            }) => {
                self.receiver = None;
                tracing::info!(
                    request_id = %self.meta.id,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    finish_reason = finish_reason.as_str(),
                    "stream finished"
                );
                let text = match self.meta.endpoint {
                    Endpoint::Chat => None,
                    Endpoint::Completion => Some(""),
                };
                let logprobs = std::mem::take(&mut self.token_logprobs);
                let finish =
                    self.meta
                        .chunk(false, text, Some(finish_reason), &logprobs, self.sent_chars);
                self.pending.push_back(SseEvent::default().data(finish));
                if self.meta.include_usage {
                    let usage = self.meta.usage_chunk(usage);
                    self.pending.push_back(SseEvent::default().data(usage));
                }
                self.pending.push_back(SseEvent::default().data("[DONE]"));
            }
            Some(Event::Failed(detail)) => self.fail(detail),
            None => self.fail("the engine closed the stream without finishing it".to_owned()),
        }
    }

    /// Ends the stream with an error object; the detail is logged, not sent.
    fn fail(&mut self, detail: String) {
        self.receiver = None;
        tracing::error!(request_id = %self.meta.id, %detail, "generation failed mid-stream");
        let err = ApiError::Internal { detail };
        self.pending
            .push_back(SseEvent::default().data(error_json(&err)));
    }
}

/// The SSE stream of one generation: for chat a first chunk with the assistant role, then a
/// chunk per piece of text, a chunk with the finish reason, the usage chunk if asked for, and
/// `[DONE]`.
pub(crate) fn chunk_stream(
    meta: ChunkMeta,
    receiver: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let mut pending = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        pending.push_back(SseEvent::default().data(meta.chunk(true, Some(""), None, &[], 0)));
    }
    let state = ChunkStream {
        meta,
        receiver: Some(receiver),
        pending,
        token_logprobs: Vec::new(),
        sent_chars: 0,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            state.receiver.as_ref()?;
            state.pull().await;
        }
    })
}

/// The streamed response: `text/event-stream`, with keep-alive comments so proxies do not
/// cut a connection that waits on a long prompt.
pub(crate) fn sse_response(meta: ChunkMeta, receiver: UnboundedReceiver<Event>) -> Response {
    Sse::new(chunk_stream(meta, receiver))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn meta(endpoint: Endpoint, include_usage: bool) -> ChunkMeta {
        ChunkMeta {
            endpoint,
            id: "chatcmpl-x".to_owned(),
            created: 7,
            model: "m".to_owned(),
            include_usage,
            logprobs: false,
        }
    }

    #[test]
    fn chat_chunk_shape() {
        let json: serde_json::Value =
            serde_json::from_str(&meta(Endpoint::Chat, false).chunk(true, Some(""), None, &[], 0))
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 7,
                "model": "m", "system_fingerprint": null,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": null, "finish_reason": null}]
            })
        );
    }

    #[test]
    fn usage_is_null_until_the_last_chunk() {
        let m = meta(Endpoint::Completion, true);
        let chunk: serde_json::Value =
            serde_json::from_str(&m.chunk(false, Some("a"), None, &[], 0)).unwrap();
        assert_eq!(chunk["usage"], serde_json::Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"));
        let last: serde_json::Value = serde_json::from_str(&m.usage_chunk(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
        }))
        .unwrap();
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(last["usage"]["total_tokens"], 5);
        assert_eq!(last["object"], "text_completion");
    }

    #[tokio::test]
    async fn failure_ends_the_stream_with_an_error_and_no_done() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Event::Text("a".into())).unwrap();
        tx.send(Event::Failed("disk on fire".into())).unwrap();
        let events: Vec<_> = chunk_stream(meta(Endpoint::Chat, false), rx)
            .collect()
            .await;
        // role chunk, text chunk, error
        assert_eq!(events.len(), 3);
        // The sender is still alive: the stream must have ended on the failure itself.
        assert!(
            tx.is_closed(),
            "the stream must drop the receiver when it ends"
        );
    }

    #[tokio::test]
    async fn sender_dropped_early_is_an_error() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Event::Text("a".into())).unwrap();
        drop(tx);
        let events: Vec<_> = chunk_stream(meta(Endpoint::Completion, false), rx)
            .collect()
            .await;
        assert_eq!(events.len(), 2, "text chunk then error");
    }
}
