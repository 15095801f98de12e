//! A generation: the prompt encoded (chat template or the model's own chat encoding, FIM,
//! plain text) on a blocking thread, checked against the context, reserved under `--auth`,
//! and handed to the engine as `n` sequences whose events are merged into one channel.
//! What the responders (`whole`, `stream`) need to shape the answer travels with it.

use std::sync::Arc;

use engine::{ConstraintSpec, EngineError, Event, FinishReason, GenerateRequest};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::admission::{Admission, Meter, Tagged};
use crate::backend::Backend;
use crate::error::{ApiError, engine_error};
use crate::output::{CallSyntax, OutputParser, ParserSpec, Piece};
use crate::tools::{ToolChoice, ToolPlan};
use crate::validate::{Prompt, ValidRequest};

tokio::task_local! {
    /// The priority of the generations started in this task: interactive unless the Batch
    /// API's runner set it (`batch`) around the requests it makes of the app.
    pub(crate) static PRIORITY: engine::Priority;
}

/// Which endpoint's chunk shape to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `chat.completion.chunk` with deltas (chat, and Mistral's FIM).
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
    /// How the log-probabilities name tokens.
    pub(crate) token_names: crate::logprobs::TokenNames,
}

/// The OpenAI finish reason of a choice: `tool_calls` when it ended by calling tools.
pub(crate) fn finish_reason(reason: FinishReason, calls: usize) -> &'static str {
    if calls > 0 && reason != FinishReason::Length {
        "tool_calls"
    } else {
        reason.as_str()
    }
}

/// Completions' `echo`: the prompt text, and the id and text of its first token (which has
/// no log-probability of its own).
#[derive(Debug, Clone)]
pub(crate) struct Echo {
    pub(crate) prompt: String,
    pub(crate) first_token: (u32, String),
}

/// A started generation: every choice's events on one channel, and a parser per choice.
pub(crate) struct Generation {
    pub(crate) receiver: UnboundedReceiver<Tagged>,
    pub(crate) parsers: Vec<OutputParser>,
    /// Completions' `echo` of each choice's prompt (empty when not asked for).
    pub(crate) echo: Vec<Option<Echo>>,
    /// Tokens in the prompt, every prompt of a batch counted once (Anthropic's stream gives
    /// them before any output; the usage reports them).
    pub(crate) prompt_tokens: usize,
}

/// The prompt's tokens and what the model's format says about its output.
struct Encoded {
    tokens: Vec<u32>,
    parser: ParserSpec,
    reasoning: Option<engine::ReasoningSpec>,
    forcing: Option<ConstraintSpec>,
    /// Completions' `echo`, when asked for.
    echo: Option<Echo>,
}

/// Renders and tokenises the prompt (off the executor: both are CPU work that grows with
/// the prompt), checks that it fits the context, and hands the request's `n` choices to the
/// engine (`n` for each prompt of a batch, choice `p * n + i` being prompt `p`'s `i`-th).
/// With `--auth`, the admission reserves the request's tokens once the prompt is counted,
/// and meters the generation (`auth::Meter`).
pub(crate) async fn start_generation(
    backend: &Arc<dyn Backend>,
    valid: ValidRequest,
    admission: Option<(Admission, String)>,
) -> Result<Generation, ApiError> {
    let worker = Arc::clone(backend);
    let prompt = valid.prompt.clone();
    let tools = valid.tools.clone();
    let echo = valid.echo;
    let encoded = tokio::task::spawn_blocking(move || {
        encode_all(worker.as_ref(), prompt, tools.as_ref(), echo)
    })
    .await
    .map_err(|err| ApiError::internal(format!("tokenisation task failed: {err}")))??;

    let context_length = valid
        .context_limit
        .map_or(backend.context_length(), |limit| {
            limit.min(backend.context_length())
        });
    if let Some(long) = encoded.iter().find(|e| e.tokens.len() >= context_length) {
        return Err(ApiError::ContextLengthExceeded {
            prompt_tokens: long.tokens.len(),
            context_length,
        });
    }
    let prompt_tokens: usize = encoded.iter().map(|e| e.tokens.len()).sum();
    let sequences = encoded.len() * valid.n;
    tracing::debug!(
        prompt_tokens,
        prompts = encoded.len(),
        max_tokens = valid.max_tokens,
        n = valid.n,
        "generation admitted"
    );
    let meter = match admission {
        Some((admission, request_id)) => {
            // Each sequence may run to `max_tokens` or to the end of its context.
            let completion_limit: usize = encoded
                .iter()
                .map(|e| {
                    let room = context_length - e.tokens.len();
                    valid.max_tokens.map_or(room, |max| max.min(room))
                })
                .sum();
            Some(
                admission
                    .reserve(
                        &request_id,
                        prompt_tokens,
                        completion_limit.saturating_mul(valid.n),
                    )
                    .await?,
            )
        }
        None => None,
    };
    let mut requests: Vec<GenerateRequest> = Vec::with_capacity(sequences);
    let mut parsers = Vec::with_capacity(sequences);
    let mut echoes = Vec::with_capacity(sequences);
    for prompt in encoded {
        let constraint = valid.constraint.clone().or(prompt.forcing);
        // Under a context smaller than the model's, the completion stops where it ends.
        let max_tokens = match valid.context_limit {
            Some(_) => {
                let room = context_length - prompt.tokens.len();
                Some(valid.max_tokens.map_or(room, |max| max.min(room)))
            }
            None => valid.max_tokens,
        };
        for i in 0..valid.n {
            let mut sampling = valid.sampling.clone();
            // Each choice its own random stream, reproducible from the request's seed.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            requests.push(GenerateRequest {
                prompt_tokens: prompt.tokens.clone(),
                sampling,
                max_tokens,
                stop: valid.stop.clone(),
                stop_at_eog: true,
                logprobs: valid.logprobs,
                prompt_logprobs: valid.logprobs.filter(|_| prompt.echo.is_some()),
                constraint: constraint.clone(),
                keep_special: !prompt.parser.is_plain(),
                reasoning: prompt.reasoning.clone(),
                priority: PRIORITY.try_with(|p| *p).unwrap_or_default(),
                energy_tap: meter.as_ref().map(Meter::energy_tap),
            });
            parsers.push(OutputParser::new(prompt.parser.clone()));
            echoes.push(prompt.echo.clone());
        }
    }
    let generated = if requests.iter().any(|r| r.constraint.is_some()) {
        // Starting a constrained generation compiles its grammar, which may take a while:
        // off the async workers, so that other requests (and `/health`) go on meanwhile.
        let worker = Arc::clone(backend);
        tokio::task::spawn_blocking(move || start_all(worker.as_ref(), requests))
            .await
            .map_err(|err| ApiError::internal(format!("generation start failed: {err}")))?
    } else {
        start_all(backend.as_ref(), requests)
    };
    let receiver = match meter {
        Some(meter) => meter.track(generated, sequences)?,
        None => generated.map_err(engine_error)?,
    };
    Ok(Generation {
        receiver,
        parsers,
        echo: echoes,
        prompt_tokens,
    })
}

/// The one choice of an answer that has one (Anthropic's message, a Responses response):
/// its events, parsed. Whole answers and streams read it the same way, so they agree.
pub(crate) struct OneChoice {
    /// `None` once the generation ended; dropping it is what cancels the engine.
    receiver: Option<UnboundedReceiver<Tagged>>,
    parser: OutputParser,
}

/// What [`OneChoice::next`] found.
pub(crate) enum Step {
    /// Output, parsed.
    Pieces(Vec<Piece>),
    /// The end: what the parser held back, why it ended and what it used.
    Done {
        pieces: Vec<Piece>,
        reason: FinishReason,
        usage: engine::Usage,
    },
    /// The generation failed (the cause is for the log, not the client).
    Failed(edge::BoxError),
}

impl OneChoice {
    /// The first choice of `generation`.
    pub(crate) fn new(generation: Generation) -> Self {
        let Generation {
            receiver,
            mut parsers,
            ..
        } = generation;
        OneChoice {
            receiver: Some(receiver),
            parser: parsers
                .pop()
                .unwrap_or_else(|| OutputParser::new(ParserSpec::default())),
        }
    }

    /// Whether the generation goes on.
    pub(crate) fn is_open(&self) -> bool {
        self.receiver.is_some()
    }

    /// Waits for the next output or the end; after the end, the receiver is dropped.
    pub(crate) async fn next(&mut self) -> Step {
        let Some(receiver) = self.receiver.as_mut() else {
            return Step::Failed("the generation has ended already".into());
        };
        let step = loop {
            match receiver.recv().await {
                None => {
                    break Step::Failed("the engine closed the stream without finishing it".into());
                }
                Some((_, Event::Text(text))) => return Step::Pieces(self.parser.feed(&text)),
                Some((_, Event::Logprobs(_) | Event::PromptLogprobs(_))) => {}
                Some((
                    _,
                    Event::Done {
                        finish_reason,
                        usage,
                    },
                )) => {
                    break Step::Done {
                        pieces: self.parser.finish(),
                        reason: finish_reason,
                        usage,
                    };
                }
                Some((_, Event::Failed(failure))) => break Step::Failed(failure.into()),
            }
        };
        self.receiver = None;
        step
    }
}

/// The number of tokens the request's prompt encodes to (tools included; every prompt of a
/// batch), as a generation would count it; nothing is generated or metered.
pub(crate) async fn count_prompt_tokens(
    backend: &Arc<dyn Backend>,
    valid: ValidRequest,
) -> Result<usize, ApiError> {
    let worker = Arc::clone(backend);
    tokio::task::spawn_blocking(move || {
        encode_all(worker.as_ref(), valid.prompt, valid.tools.as_ref(), false)
    })
    .await
    .map_err(|err| ApiError::internal(format!("tokenisation task failed: {err}")))?
    .map(|encoded| encoded.iter().map(|e| e.tokens.len()).sum())
}

/// Starts every choice's sequence; the first refusal cancels those started (their receivers
/// are dropped) and is the answer.
fn start_all(
    backend: &dyn Backend,
    requests: Vec<GenerateRequest>,
) -> Result<UnboundedReceiver<Tagged>, EngineError> {
    let mut receivers = Vec::with_capacity(requests.len());
    for request in requests {
        receivers.push(backend.generate(request)?);
    }
    Ok(fan_in(receivers))
}

/// Every prompt of the request (one, or each of a batch), encoded.
fn encode_all(
    backend: &dyn Backend,
    prompt: Prompt,
    tools: Option<&ToolPlan>,
    echo: bool,
) -> Result<Vec<Encoded>, ApiError> {
    match prompt {
        Prompt::Batch(prompts) => prompts
            .into_iter()
            .map(|p| encode(backend, p, tools, echo))
            .collect(),
        one => Ok(vec![encode(backend, one, tools, echo)?]),
    }
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
        echo: None,
    };
    // Completions' echo: the prompt's text, and its first token's (which has no
    // log-probability of its own).
    let echoed = |text: String, tokens: &[u32]| -> Result<Option<Echo>, ApiError> {
        if !echo {
            return Ok(None);
        }
        let first_token = match tokens.first() {
            Some(&first) => (first, backend.detokenize(&[first]).map_err(engine_error)?),
            None => (0, String::new()),
        };
        Ok(Some(Echo {
            prompt: text,
            first_token,
        }))
    };
    match prompt {
        Prompt::Text(text) => {
            let mut encoded = plain(backend.tokenize(&text));
            encoded.echo = echoed(text, &encoded.tokens)?;
            Ok(encoded)
        }
        Prompt::Tokens(tokens) => {
            // Decoding checks that every id is in the vocabulary (a 400 names the first
            // that is not), and gives the text to echo.
            let text = backend.detokenize(&tokens).map_err(engine_error)?;
            let mut encoded = plain(tokens);
            encoded.echo = echoed(text, &encoded.tokens)?;
            Ok(encoded)
        }
        Prompt::Batch(_) => Err(ApiError::invalid(
            "prompt",
            "a batch of prompts cannot hold another batch",
        )),
        Prompt::Fim { prefix, suffix } => Ok(plain(
            backend
                .tokenize_fim(&prefix, &suffix)
                .map_err(engine_error)?,
        )),
        Prompt::Chat(mut request) => {
            let format = backend.chat_format();
            request.tools = tools.and_then(ToolPlan::visible_tools);
            let prompt = backend.encode_chat(&request).map_err(engine_error)?;
            let calls = tools
                .filter(|t| t.choice != ToolChoice::None)
                .map(|_| CallSyntax::of(format.tool_calls));
            let forcing = tools
                .and_then(|t| t.forcing_grammar(&format, &|text: &str| backend.token_id(text)));
            let parser = ParserSpec {
                calls,
                single_call: tools.is_some_and(|t| !t.parallel),
                reasoning: format.reasoning.clone(),
                reasoning_open: prompt.reasoning_open,
                short_ids: format.short_call_ids,
                string_params: tools.map(ToolPlan::string_parameters).unwrap_or_default(),
            };
            Ok(Encoded {
                tokens: prompt.tokens,
                reasoning: format.reasoning_spec(prompt.reasoning_open),
                parser,
                forcing,
                echo: None,
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

/// Test support for the responders: one choice's events.
#[cfg(test)]
pub(crate) mod test_events {
    use engine::{Event, FinishReason, Usage};
    use tokio::sync::mpsc::UnboundedReceiver;

    use crate::admission::Tagged;

    /// A one-choice generation that writes `pieces` then stops for `reason`.
    pub(crate) fn one_generation(pieces: &[&str], reason: FinishReason) -> super::Generation {
        super::Generation {
            receiver: one_choice(pieces, reason),
            parsers: vec![crate::output::OutputParser::new(Default::default())],
            echo: Vec::new(),
            prompt_tokens: 3,
        }
    }

    /// The events of one choice that writes `pieces` then stops for `reason`.
    pub(crate) fn one_choice(pieces: &[&str], reason: FinishReason) -> UnboundedReceiver<Tagged> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for piece in pieces {
            let _ = tx.send((0, Event::Text((*piece).into())));
        }
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: pieces.len(),
            reasoning_tokens: 0,
            energy: None,
        };
        let _ = tx.send((
            0,
            Event::Done {
                finish_reason: reason,
                usage,
            },
        ));
        rx
    }
}
