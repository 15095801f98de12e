//! The whole (non-streamed) response: every choice's events gathered, then one JSON body in
//! the endpoint's shape.

use axum::response::{IntoResponse, Response};
use engine::{Event, FinishReason, TokenLogprobs, Usage};
use serde_json::Value;

use crate::error::ApiError;
use crate::generation::{ChunkMeta, Echo, Endpoint, Generation, finish_reason};
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, FunctionBody, Header, TextChoice, TextCompletion,
    ToolCallBody, UsageBody,
};
use crate::output::{ParsedCall, Piece};

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
pub(crate) async fn whole_response(
    meta: ChunkMeta,
    generation: Generation,
) -> Result<Response, ApiError> {
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
            return Err(ApiError::internal(
                "the engine closed the stream without finishing it",
            ));
        };
        let i = index as usize;
        let (Some(choice), Some(parser)) = (choices.get_mut(i), parsers.get_mut(i)) else {
            return Err(ApiError::internal(format!(
                "an event for choice {index}, which does not exist"
            )));
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
            Event::Failed(failure) => return Err(ApiError::internal(failure)),
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
    let reason =
        |c: &WholeChoice| finish_reason(c.finish.unwrap_or(FinishReason::Stop), c.calls.len());
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
