//! Server-sent events: engine events in, OpenAI chunks out.
//!
//! The SSE body owns the generation's receiver and nothing else holds it, so when a client
//! goes away hyper drops the body, the receiver goes with it, and the engine sees its
//! channels closed and stops the sequences.
//!
//! A request with `n` choices streams them interleaved, each chunk naming its choice's
//! `index`; each choice's output goes through its own [`OutputParser`] (reasoning, content,
//! tool calls), the same parser the whole response uses, so streamed deltas concatenate to
//! the whole message.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use engine::{Event, TokenLogprobs, Usage};
use futures::Stream;
use serde::Serialize;

use crate::admission::Tagged;
use edge::{BoxError, Chain};

use crate::error::ApiError;
use crate::generation::{ChunkMeta, Echo, Endpoint, Generation, finish_reason};
use crate::openai::{
    ChatChunk, ChatChunkChoice, Delta, FunctionBody, Header, TextChoice, TextCompletion,
    ToolCallBody, UsageBody,
};
use crate::output::{OutputParser, Piece};

/// What one chunk says about one choice.
#[derive(Debug, Default)]
pub(crate) struct ChunkBody<'a> {
    pub(crate) role: bool,
    pub(crate) text: Option<&'a str>,
    pub(crate) reasoning: Option<&'a str>,
    pub(crate) tool_calls: Vec<ToolCallBody<'a>>,
    pub(crate) finish: Option<&'static str>,
    pub(crate) logprobs: Option<serde_json::Value>,
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

    /// One chunk for choice `index`.
    pub(crate) fn chunk(&self, index: u32, body: ChunkBody<'_>) -> String {
        self.chunk_with_usage(index, body, self.usage_placeholder())
    }

    /// The chunk that ends the last choice when usage was not asked for: it carries the
    /// request's usage, as Mistral's API and llama.cpp's server end every stream (Mistral's
    /// SDK reads it there); clients that asked for the usage chunk get that instead.
    fn closing_chunk(&self, index: u32, body: ChunkBody<'_>, usage: Usage) -> String {
        self.chunk_with_usage(index, body, Some(Some(UsageBody::from(usage))))
    }

    fn chunk_with_usage(
        &self,
        index: u32,
        body: ChunkBody<'_>,
        usage: Option<Option<UsageBody>>,
    ) -> String {
        match self.endpoint {
            Endpoint::Chat => to_json(&ChatChunk {
                header: self.header(),
                system_fingerprint: None,
                choices: vec![ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: body.role.then_some("assistant"),
                        content: body.text,
                        reasoning_content: body.reasoning,
                        tool_calls: body.tool_calls,
                    },
                    logprobs: body.logprobs,
                    finish_reason: body.finish,
                }],
                usage,
            }),
            Endpoint::Completion => to_json(&TextCompletion {
                header: self.header(),
                choices: vec![TextChoice {
                    text: body.text.unwrap_or_default(),
                    index,
                    logprobs: body.logprobs,
                    finish_reason: body.finish,
                }],
                usage,
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
pub(crate) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|err| {
        tracing::error!(%err, "could not serialise a chunk");
        error_json(&ApiError::internal(err.to_string()))
    })
}

fn error_json(err: &ApiError) -> String {
    serde_json::to_string(&err.body()).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_owned()
    })
}

/// One choice of a streamed response.
struct StreamChoice {
    parser: OutputParser,
    /// Log-probabilities of tokens whose text has not been sent yet.
    token_logprobs: Vec<TokenLogprobs>,
    /// Characters of text sent so far (completions' `text_offset`).
    sent_chars: usize,
    /// Tool calls started so far: the next call's `index`.
    calls_started: usize,
}

/// The state of one streamed response.
struct ChunkStream {
    meta: ChunkMeta,
    /// `None` once the generation ended; dropping it is what cancels the engine.
    receiver: Option<tokio::sync::mpsc::UnboundedReceiver<Tagged>>,
    /// Events ready to send before reading the receiver again.
    pending: VecDeque<SseEvent>,
    choices: Vec<StreamChoice>,
    /// Completions' `echo` of each choice: the prompt, sent first (with its
    /// log-probabilities when asked).
    echo: Vec<Option<Echo>>,
    done: usize,
    usage: Usage,
    /// Every prompt's tokens, each counted once (choices of a batch have their own).
    prompt_tokens: usize,
}

impl ChunkStream {
    fn push(&mut self, chunk: String) {
        self.pending.push_back(SseEvent::default().data(chunk));
    }

    /// The log-probabilities of choice `index`'s tokens not sent yet, in the endpoint's
    /// shape, for the next chunk; `None` when there are none or none were asked for.
    fn take_logprobs(&mut self, index: u32) -> Option<serde_json::Value> {
        let choice = &mut self.choices[index as usize];
        let logprobs = std::mem::take(&mut choice.token_logprobs);
        (self.meta.logprobs && !logprobs.is_empty()).then(|| match self.meta.endpoint {
            Endpoint::Chat => crate::logprobs::chat(&logprobs, self.meta.token_names),
            Endpoint::Completion => {
                crate::logprobs::completion(&logprobs, choice.sent_chars, self.meta.token_names)
            }
        })
    }

    /// Turns parsed pieces of choice `index` into chunks. A call is sent as OpenAI sends
    /// one: a delta with its `index`, `id`, `type` and name (arguments `""`), then a delta
    /// per fragment of its arguments as the parser gives them out.
    fn pieces(&mut self, index: u32, pieces: Vec<Piece>) {
        for piece in pieces {
            let chunk = match &piece {
                Piece::Content(text) => {
                    let logprobs = self.take_logprobs(index);
                    self.choices[index as usize].sent_chars += text.chars().count();
                    self.meta.chunk(
                        index,
                        ChunkBody {
                            text: Some(text),
                            logprobs,
                            ..ChunkBody::default()
                        },
                    )
                }
                Piece::Reasoning(text) => {
                    let logprobs = self.take_logprobs(index);
                    self.meta.chunk(
                        index,
                        ChunkBody {
                            reasoning: Some(text),
                            logprobs,
                            ..ChunkBody::default()
                        },
                    )
                }
                Piece::CallStart { id, name } => {
                    let logprobs = self.take_logprobs(index);
                    let choice = &mut self.choices[index as usize];
                    let k = choice.calls_started;
                    choice.calls_started += 1;
                    self.meta.chunk(
                        index,
                        ChunkBody {
                            tool_calls: vec![ToolCallBody {
                                index: Some(k),
                                id: Some(id),
                                kind: Some("function"),
                                function: FunctionBody {
                                    name: Some(name),
                                    arguments: "",
                                },
                            }],
                            logprobs,
                            ..ChunkBody::default()
                        },
                    )
                }
                Piece::CallArguments(arguments) => {
                    let logprobs = self.take_logprobs(index);
                    // The call the fragment belongs to is the last one started.
                    let k = self.choices[index as usize].calls_started.saturating_sub(1);
                    self.meta.chunk(
                        index,
                        ChunkBody {
                            tool_calls: vec![ToolCallBody {
                                index: Some(k),
                                id: None,
                                kind: None,
                                function: FunctionBody {
                                    name: None,
                                    arguments,
                                },
                            }],
                            logprobs,
                            ..ChunkBody::default()
                        },
                    )
                }
                // The client knows a call is complete from the next call or the finish.
                Piece::CallEnd => continue,
            };
            self.push(chunk);
        }
    }

    /// What choice `index` echoes, if anything.
    fn echo_of(&self, index: u32) -> Option<&Echo> {
        self.echo.get(index as usize).and_then(Option::as_ref)
    }

    /// The echoed prompt of choice `index`.
    fn echo(&mut self, index: u32, prompt_logprobs: Option<serde_json::Value>) {
        let Some(prompt) = self.echo_of(index).map(|e| e.prompt.clone()) else {
            return;
        };
        self.choices[index as usize].sent_chars += prompt.chars().count();
        let chunk = self.meta.chunk(
            index,
            ChunkBody {
                text: Some(&prompt),
                logprobs: prompt_logprobs,
                ..ChunkBody::default()
            },
        );
        self.push(chunk);
    }

    /// Reads the next engine event and queues what it turns into.
    async fn pull(&mut self) {
        let Some(receiver) = self.receiver.as_mut() else {
            return;
        };
        let Some((index, event)) = receiver.recv().await else {
            self.fail("the engine closed the stream without finishing it".into());
            return;
        };
        let Some(choice) = self.choices.get_mut(index as usize) else {
            self.fail(format!("an event for choice {index}, which does not exist").into());
            return;
        };
        match event {
            Event::Text(text) => {
                let pieces = choice.parser.feed(&text);
                self.pieces(index, pieces);
            }
            Event::Logprobs(lp) => choice.token_logprobs.push(lp),
            Event::PromptLogprobs(prompt) => {
                if self.meta.logprobs
                    && let Some((first_id, first_text)) =
                        self.echo_of(index).map(|e| e.first_token.clone())
                {
                    let logprobs = crate::logprobs::completion_echo(
                        (first_id, &first_text),
                        &prompt,
                        self.meta.token_names,
                    );
                    self.echo(index, Some(logprobs));
                }
            }
            Event::Done {
                finish_reason: reason,
                usage,
            } => {
                let pieces = choice.parser.finish();
                self.pieces(index, pieces);
                let calls = self.choices[index as usize].parser.calls();
                let logprobs = self.take_logprobs(index);
                let text = match self.meta.endpoint {
                    Endpoint::Chat => None,
                    Endpoint::Completion => Some(""),
                };
                self.usage.add_choice(&usage);
                self.usage.prompt_tokens = self.prompt_tokens;
                self.done += 1;
                let body = ChunkBody {
                    text,
                    finish: Some(finish_reason(reason, calls)),
                    logprobs,
                    ..ChunkBody::default()
                };
                let finish = if self.done == self.choices.len() && !self.meta.include_usage {
                    self.meta.closing_chunk(index, body, self.usage)
                } else {
                    self.meta.chunk(index, body)
                };
                self.push(finish);
                tracing::info!(
                    request_id = %self.meta.id,
                    choice = index,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    finish_reason = reason.as_str(),
                    "stream finished"
                );
                if self.done == self.choices.len() {
                    self.receiver = None;
                    if self.meta.include_usage {
                        let usage = self.meta.usage_chunk(self.usage);
                        self.push(usage);
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                }
            }
            Event::Failed(failure) => self.fail(failure.into()),
        }
    }

    /// Ends the stream with an error object; the detail is logged, not sent.
    fn fail(&mut self, cause: BoxError) {
        self.receiver = None;
        let detail = Chain(cause.as_ref()).to_string();
        tracing::error!(request_id = %self.meta.id, %detail, "generation failed mid-stream");
        let err = ApiError::internal(cause);
        self.pending
            .push_back(SseEvent::default().data(error_json(&err)));
    }
}

/// The SSE stream of one generation: for chat a first chunk with the assistant role for
/// each choice, then a chunk per piece of output, a chunk with each choice's finish reason,
/// the usage chunk if asked for, and `[DONE]`.
fn chunk_state(meta: ChunkMeta, generation: Generation) -> ChunkStream {
    let n = generation.parsers.len();
    let mut state = ChunkStream {
        meta,
        receiver: Some(generation.receiver),
        pending: VecDeque::new(),
        choices: generation
            .parsers
            .into_iter()
            .map(|parser| StreamChoice {
                parser,
                token_logprobs: Vec::new(),
                sent_chars: 0,
                calls_started: 0,
            })
            .collect(),
        echo: generation.echo,
        done: 0,
        usage: Usage::default(),
        prompt_tokens: generation.prompt_tokens,
    };
    for index in 0..n as u32 {
        if state.meta.endpoint == Endpoint::Chat {
            let role = state.meta.chunk(
                index,
                ChunkBody {
                    role: true,
                    text: Some(""),
                    ..ChunkBody::default()
                },
            );
            state.push(role);
        }
        // With log-probabilities the echo waits for the prompt's (`PromptLogprobs`).
        if !state.meta.logprobs {
            state.echo(index, None);
        }
    }
    state
}

impl EventSource for ChunkStream {
    fn next_event(&mut self) -> Option<SseEvent> {
        self.pending.pop_front()
    }

    fn is_open(&self) -> bool {
        self.receiver.is_some()
    }

    async fn pull(&mut self) {
        ChunkStream::pull(self).await;
    }
}

/// The state of one streamed answer, whatever its dialect: events waiting to be sent, and
/// the generation that makes more.
pub(crate) trait EventSource: Send + 'static {
    /// The next event waiting to be sent.
    fn next_event(&mut self) -> Option<SseEvent>;
    /// Whether more events may come (the generation has not ended).
    fn is_open(&self) -> bool;
    /// Waits for the generation's next event and turns it into events to send.
    fn pull(&mut self) -> impl Future<Output = ()> + Send;
}

/// The events of `source` until it is spent: what is waiting first, then what the next
/// engine event makes.
pub(crate) fn events<S: EventSource>(
    source: S,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    futures::stream::unfold(source, |mut source| async move {
        loop {
            if let Some(event) = source.next_event() {
                return Some((Ok(event), source));
            }
            if !source.is_open() {
                return None;
            }
            source.pull().await;
        }
    })
}

/// A streamed answer: `text/event-stream`, with keep-alive comments so proxies do not cut a
/// connection that waits on a long prompt.
pub(crate) fn sse<S: EventSource>(source: S) -> Response {
    Sse::new(events(source))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The streamed chat or text completion.
pub(crate) fn sse_response(meta: ChunkMeta, generation: Generation) -> Response {
    sse(chunk_state(meta, generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::test_events::one_choice;
    use crate::output::ParserSpec;
    use engine::{EngineError, Failure, FinishReason};
    use futures::StreamExt;

    fn meta(endpoint: Endpoint, include_usage: bool) -> ChunkMeta {
        ChunkMeta {
            token_names: crate::logprobs::TokenNames::default(),
            endpoint,
            id: "chatcmpl-x".to_owned(),
            created: 7,
            model: "m".to_owned(),
            include_usage,
            logprobs: false,
        }
    }

    fn generation(
        rx: tokio::sync::mpsc::UnboundedReceiver<Tagged>,
        n: usize,
        spec: ParserSpec,
    ) -> Generation {
        Generation {
            receiver: rx,
            parsers: (0..n).map(|_| OutputParser::new(spec.clone())).collect(),
            echo: Vec::new(),
            prompt_tokens: 3,
        }
    }

    fn data(events: &[Result<SseEvent, Infallible>]) -> usize {
        events.len()
    }

    #[test]
    fn chat_chunk_shape() {
        let chunk = meta(Endpoint::Chat, false).chunk(
            0,
            ChunkBody {
                role: true,
                text: Some(""),
                ..ChunkBody::default()
            },
        );
        let json: serde_json::Value = serde_json::from_str(&chunk).unwrap();
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
        let chunk: serde_json::Value = serde_json::from_str(&m.chunk(
            0,
            ChunkBody {
                text: Some("a"),
                ..ChunkBody::default()
            },
        ))
        .unwrap();
        assert_eq!(chunk["usage"], serde_json::Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"));
        let last: serde_json::Value = serde_json::from_str(&m.usage_chunk(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
            reasoning_tokens: 1,
            energy: None,
        }))
        .unwrap();
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(last["usage"]["total_tokens"], 5);
        assert_eq!(
            last["usage"]["completion_tokens_details"]["reasoning_tokens"],
            1
        );
        assert_eq!(last["object"], "text_completion");
    }

    #[tokio::test]
    async fn failure_ends_the_stream_with_an_error_and_no_done() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((0, Event::Text("a".into()))).unwrap();
        let fire = EngineError::Unavailable("disk on fire".into());
        tx.send((0, Event::Failed(Failure::other(fire)))).unwrap();
        let events: Vec<_> = events(chunk_state(
            meta(Endpoint::Chat, false),
            generation(rx, 1, ParserSpec::default()),
        ))
        .collect()
        .await;
        // role chunk, text chunk, error
        assert_eq!(data(&events), 3);
        // The sender is still alive: the stream must have ended on the failure itself.
        assert!(
            tx.is_closed(),
            "the stream must drop the receiver when it ends"
        );
    }

    #[tokio::test]
    async fn sender_dropped_early_is_an_error() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((0, Event::Text("a".into()))).unwrap();
        drop(tx);
        let events: Vec<_> = events(chunk_state(
            meta(Endpoint::Completion, false),
            generation(rx, 1, ParserSpec::default()),
        ))
        .collect()
        .await;
        assert_eq!(data(&events), 2, "text chunk then error");
    }

    /// A choice's end: `n` completion tokens after a 4-token prompt.
    fn done(n: usize) -> Event {
        Event::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: n,
                reasoning_tokens: 0,
                energy: None,
            },
        }
    }

    #[tokio::test]
    async fn choices_finish_separately_and_done_comes_last() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((1, Event::Text("b".into()))).unwrap();
        tx.send((0, Event::Text("a".into()))).unwrap();
        tx.send((1, done(1))).unwrap();
        tx.send((0, done(2))).unwrap();
        let events: Vec<_> = events(chunk_state(
            meta(Endpoint::Chat, true),
            generation(rx, 2, ParserSpec::default()),
        ))
        .collect()
        .await;
        // 2 role chunks, 2 text chunks, 2 finish chunks, usage, [DONE].
        assert_eq!(data(&events), 8);
    }

    #[tokio::test]
    async fn without_the_usage_chunk_the_last_finish_chunk_carries_usage() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((1, Event::Text("b".into()))).unwrap();
        tx.send((1, done(1))).unwrap();
        tx.send((0, Event::Text("a".into()))).unwrap();
        tx.send((0, done(2))).unwrap();
        let response = sse_response(
            meta(Endpoint::Chat, false),
            generation(rx, 2, ParserSpec::default()),
        );
        let chunks: Vec<serde_json::Value> = body(response)
            .await
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let (last, earlier) = chunks.split_last().unwrap();
        assert!(
            earlier.iter().all(|c| c.get("usage").is_none()),
            "{chunks:?}"
        );
        assert_eq!(last["choices"][0]["index"], 0);
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        // The prompt counted once (the generation's 3 tokens), both choices' completions.
        assert_eq!(last["usage"]["prompt_tokens"], 3);
        assert_eq!(last["usage"]["completion_tokens"], 3);
        assert_eq!(last["usage"]["total_tokens"], 6);
    }

    async fn body(response: Response) -> String {
        use http_body_util::BodyExt;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// The chunks of a streamed chat response.
    async fn chunks(
        pieces: &[&str],
        reason: FinishReason,
        spec: &ParserSpec,
    ) -> Vec<serde_json::Value> {
        let response = sse_response(
            meta(Endpoint::Chat, false),
            generation(one_choice(pieces, reason), 1, spec.clone()),
        );
        body(response)
            .await
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    }

    fn hermes() -> ParserSpec {
        ParserSpec {
            calls: Some(crate::output::CallSyntax::Hermes),
            ..ParserSpec::default()
        }
    }

    /// The tool-call deltas of a chat stream.
    fn call_deltas(chunks: &[serde_json::Value]) -> Vec<&serde_json::Value> {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect()
    }

    /// The arguments of the stream's call deltas, concatenated.
    fn streamed_arguments(deltas: &[&serde_json::Value]) -> String {
        deltas
            .iter()
            .filter_map(|d| d["function"]["arguments"].as_str())
            .collect()
    }

    #[tokio::test]
    async fn call_arguments_stream_in_pieces_that_make_the_whole_ones() {
        use crate::output::samples::{CALL, CALL_ARGUMENTS};
        let chunks = chunks(CALL, FinishReason::Stop, &hermes()).await;
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "Let me look.");
        let deltas = call_deltas(&chunks);
        // The opening: index, id, type, name and no arguments yet.
        assert_eq!(deltas[0]["index"], 0);
        assert_eq!(deltas[0]["type"], "function");
        assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(deltas[0]["function"]["name"], "get_weather");
        assert_eq!(deltas[0]["function"]["arguments"], "");
        // Then the arguments, as they were generated: the whole response's, in pieces
        // (`whole::tests` checks the whole response gives `CALL_ARGUMENTS`).
        let rest = &deltas[1..];
        assert!(rest.len() > 5, "{rest:?}");
        assert!(rest.iter().all(|d| d["index"] == 0
            && d.get("id").is_none()
            && d["function"].get("name").is_none()));
        assert_eq!(streamed_arguments(rest), CALL_ARGUMENTS);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    }

    #[tokio::test]
    async fn a_call_cut_by_max_tokens_leaves_no_markup() {
        use crate::output::samples::{CUT_ARGUMENTS, CUT_BEFORE_NAME, CUT_IN_ARGUMENTS};
        for (tokens, arguments) in [
            (CUT_IN_ARGUMENTS, Some(CUT_ARGUMENTS)),
            (CUT_BEFORE_NAME, None),
        ] {
            let chunks = chunks(tokens, FinishReason::Length, &hermes()).await;
            let content: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(content, "", "{tokens:?}");
            let deltas = call_deltas(&chunks);
            match arguments {
                Some(arguments) => {
                    assert_eq!(deltas[0]["function"]["name"], "get_weather");
                    assert_eq!(streamed_arguments(&deltas), arguments);
                }
                None => assert!(deltas.is_empty(), "{deltas:?}"),
            }
            let last = chunks.last().unwrap();
            assert_eq!(last["choices"][0]["finish_reason"], "length");
        }
    }
}
