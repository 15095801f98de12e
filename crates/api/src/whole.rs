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
use crate::output::Piece;

/// A tool call of a whole response, assembled from its pieces.
#[derive(Debug)]
struct ParsedCall {
    id: String,
    name: String,
    /// The arguments as a JSON string (OpenAI's shape): the concatenation of the
    /// `Piece::CallArguments` fragments, exactly what a stream sends.
    arguments: String,
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
                Piece::CallStart { id, name } => self.calls.push(ParsedCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                Piece::CallArguments(t) => {
                    if let Some(call) = self.calls.last_mut() {
                        call.arguments.push_str(&t);
                    }
                }
                Piece::CallEnd => {}
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
        prompt_tokens,
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
                usage.add_choice(&u);
                // The choices of a batch have prompts of their own: each counts once.
                usage.prompt_tokens = prompt_tokens;
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
    let energy = usage.energy;
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
                        .then(|| crate::logprobs::chat(&c.token_logprobs, meta.token_names)),
                    finish_reason: reason(c),
                })
                .collect(),
            usage: usage_body,
            system_fingerprint: None,
        })
        .into_response(),
        Endpoint::Completion => {
            let echo_of = |i: usize| echo.get(i).and_then(Option::as_ref);
            let texts: Vec<String> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| match echo_of(i) {
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
                        logprobs: meta
                            .logprobs
                            .then(|| completion_logprobs(c, echo_of(index), meta.token_names)),
                        finish_reason: Some(reason(c)),
                    })
                    .collect(),
                usage: Some(Some(usage_body)),
                system_fingerprint: None,
            })
            .into_response()
        }
    };
    Ok(crate::openai::with_energy_headers(response, energy))
}

/// A completion choice's `logprobs`, the echoed prompt's first when there is one.
fn completion_logprobs(
    choice: &WholeChoice,
    echo: Option<&Echo>,
    names: crate::logprobs::TokenNames,
) -> Value {
    match (echo, &choice.prompt_logprobs) {
        (Some(echo), Some(prompt)) => {
            let (first_id, first_text) = &echo.first_token;
            let mut all = crate::logprobs::completion_echo((*first_id, first_text), prompt, names);
            let offset = echo.prompt.chars().count();
            let generated = crate::logprobs::completion(&choice.token_logprobs, offset, names);
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
            names,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::test_events::one_choice;
    use crate::output::samples::{
        CALL, CALL_ARGUMENTS, CUT_ARGUMENTS, CUT_BEFORE_NAME, CUT_IN_ARGUMENTS,
    };
    use crate::output::{CallSyntax, OutputParser, ParserSpec};
    use http_body_util::BodyExt;

    /// The whole chat response's first choice when the model writes `tokens` then stops for
    /// `reason`.
    async fn choice(tokens: &[&str], reason: FinishReason) -> Value {
        let receiver = one_choice(tokens, reason);
        let spec = ParserSpec {
            calls: Some(CallSyntax::Hermes),
            ..ParserSpec::default()
        };
        let meta = ChunkMeta {
            token_names: crate::logprobs::TokenNames::default(),
            endpoint: Endpoint::Chat,
            id: "chatcmpl-x".to_owned(),
            created: 7,
            model: "m".to_owned(),
            include_usage: false,
            logprobs: false,
        };
        let generation = Generation {
            receiver,
            parsers: vec![OutputParser::new(spec)],
            echo: Vec::new(),
            prompt_tokens: 3,
        };
        let response = whole_response(meta, generation).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        json["choices"][0].clone()
    }

    /// The whole response's arguments are the ones `stream::tests` sees streamed in pieces.
    #[tokio::test]
    async fn calls_carry_the_arguments_the_stream_sends() {
        let choice = choice(CALL, FinishReason::Stop).await;
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Let me look.");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], CALL_ARGUMENTS);
    }

    #[tokio::test]
    async fn a_call_cut_by_max_tokens_leaves_no_markup() {
        let cut = choice(CUT_IN_ARGUMENTS, FinishReason::Length).await;
        assert_eq!(cut["finish_reason"], "length");
        assert_eq!(cut["message"]["content"], Value::Null);
        let call = &cut["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], CUT_ARGUMENTS);
        let nameless = choice(CUT_BEFORE_NAME, FinishReason::Length).await;
        assert_eq!(nameless["finish_reason"], "length");
        assert_eq!(nameless["message"]["content"], "");
        assert!(nameless["message"].get("tool_calls").is_none());
    }
}
