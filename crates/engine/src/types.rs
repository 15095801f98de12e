//! The vocabulary shared by the engine and its callers: what a generation asks for and what
//! it sends back.

use std::fmt;

/// One message of a chat, as the chat template sees it.
pub use tokenizer::ChatMessage;

/// How the next token is chosen. Defaults follow OpenAI's API: temperature 1, no truncation,
/// no penalties.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 disables.
    pub min_p: f32,
    /// Seed of the sampler's random stream: the same seed and request give the same output.
    pub seed: Option<u64>,
    /// Multiplicative penalty on tokens already seen (llama.cpp's `repeat_penalty`); 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted once per earlier occurrence; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI's `presence_penalty`: subtracted once if the token occurred; 0 disables.
    pub presence_penalty: f32,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`;
    /// -100 effectively bans a token, 100 effectively forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A validated request to generate from a prompt that is already token ids.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt, already tokenised (chat template applied by the caller).
    pub prompt_tokens: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens; `None` means until the context is full.
    pub max_tokens: Option<usize>,
    /// Strings that end the generation; the matched text is not returned.
    pub stop: Vec<String>,
    /// Stop at the model's end-of-generation tokens (true for normal use).
    pub stop_at_eog: bool,
    /// Report each generated token's log-probability and this many most likely
    /// alternatives (`Event::Logprobs`); `None` reports nothing.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability given the tokens before it, with this many
    /// most likely alternatives (`Event::PromptLogprobs`, as OpenAI's `echo` with `logprobs`);
    /// the first prompt token has none. `None` reports nothing.
    pub prompt_logprobs: Option<usize>,
    /// Hold the output to a grammar (constrained decoding); `None` leaves it free.
    pub constraint: Option<ConstraintSpec>,
    /// Show special (control) tokens in the text as their vocabulary text, for callers that
    /// parse markers such as `[TOOL_CALLS]`, `<tool_call>` or `[THINK]` out of the output.
    /// End-of-generation tokens end the output either way and never show.
    pub keep_special: bool,
    /// Count the tokens generated inside the model's reasoning block
    /// ([`Usage::reasoning_tokens`]); `None` counts none.
    pub reasoning: Option<ReasoningSpec>,
    /// Interactive (the default) or batch work, which only uses what interactive requests
    /// leave.
    pub priority: Priority,
    /// Where the engine also adds the energy of every step the request's sequence is in, so
    /// that a request that ends without [`Event::Done`] (its client went away, it failed) is
    /// still charged what it used; the engine lets go of it when the sequence ends. Several
    /// requests (the choices of one) may share one.
    pub energy_tap: Option<std::sync::Arc<EnergyTap>>,
}

/// The energy a request's sequences have used so far ([`GenerateRequest::energy_tap`]).
#[derive(Debug, Default)]
pub struct EnergyTap {
    microjoules: std::sync::atomic::AtomicU64,
    /// Set once a step has been charged: then `measured` says the meter's kind.
    charged: std::sync::atomic::AtomicBool,
    measured: std::sync::atomic::AtomicBool,
}

impl EnergyTap {
    pub(crate) fn add(&self, microjoules: u64, kind: crate::EnergyKind) {
        use std::sync::atomic::Ordering::Relaxed;
        self.measured
            .store(kind == crate::EnergyKind::Measured, Relaxed);
        self.charged.store(true, Relaxed);
        self.microjoules.fetch_add(microjoules, Relaxed);
    }

    /// What was charged so far; `None` when no step was.
    pub fn energy(&self) -> Option<Energy> {
        use std::sync::atomic::Ordering::Relaxed;
        self.charged.load(Relaxed).then(|| Energy {
            microjoules: self.microjoules.load(Relaxed),
            kind: if self.measured.load(Relaxed) {
                crate::EnergyKind::Measured
            } else {
                crate::EnergyKind::Modelled
            },
        })
    }
}

/// How urgent a request is. Interactive requests are admitted before any batch request and
/// preempt batch sequences first when the KV cache runs out; batch sequences hold at most half
/// of the running slots, so an interactive arrival always finds one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    /// A client is waiting (every HTTP request).
    #[default]
    Interactive,
    /// Work that can wait (the Batch API).
    Batch,
}

/// How a model marks its reasoning (`<think>`...`</think>`, `[THINK]`...`[/THINK]`) and
/// whether the prompt already opened the block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasoningSpec {
    /// The text that opens a reasoning block.
    pub open: String,
    /// The text that closes it.
    pub close: String,
    /// The prompt ends inside an open block (templates such as Qwen3's or DeepSeek-R1's
    /// write the opening marker themselves), so the output starts as reasoning.
    pub starts_inside: bool,
}

/// A grammar the output must follow, enforced token by token: at every step the tokens
/// that cannot continue a string of the grammar are masked out, and the generation ends
/// (with [`FinishReason::Stop`]) once the grammar is complete and allows nothing more.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under this JSON schema (OpenAI's `json_schema` response format).
    JsonSchema(serde_json::Value),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    Regex(String),
    /// A llama.cpp GBNF grammar (its `grammar` parameter), start rule `root`; converted to
    /// Lark by [`gbnf_to_lark`](crate::gbnf_to_lark) with the same language.
    Gbnf(String),
}

/// The most alternatives [`GenerateRequest::logprobs`] and
/// [`GenerateRequest::prompt_logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated (or prompt) token with its log-probability under the model (computed from the raw
/// logits, before biases, penalties and temperature) and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The token chosen.
    pub token: u32,
    /// Its bytes (a token may be part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first: (id, bytes, logprob).
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

/// Why a generation ended, named as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token (or a complete grammar).
    Stop,
    /// The request's stop sequence of this index (in `GenerateRequest::stop`) matched.
    StopSequence(usize),
    /// `max_tokens` reached or the context is full.
    Length,
}

impl FinishReason {
    /// The OpenAI wire name: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopSequence(_) => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (including any that a stop sequence later hid).
    pub completion_tokens: usize,
    /// Of the tokens generated, those inside the reasoning block (markers included), when
    /// [`GenerateRequest::reasoning`] asked for the count.
    pub reasoning_tokens: usize,
    /// Energy the generation took (its share of every step it was in); `None` where nothing
    /// metered it.
    pub energy: Option<Energy>,
}

impl Usage {
    /// Adds another choice of the same prompt: the prompt counted once, completions,
    /// reasoning and energy summed.
    pub fn add_choice(&mut self, other: &Usage) {
        self.prompt_tokens = other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.energy = Energy::add(self.energy, other.energy);
    }
}

/// Energy attributed to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Energy {
    /// Microjoules.
    pub microjoules: u64,
    /// Measured by a hardware counter or modelled.
    pub kind: crate::EnergyKind,
}

impl Energy {
    /// Joules.
    pub fn joules(&self) -> f64 {
        self.microjoules as f64 / 1e6
    }

    /// The sum of two requests' energy (choices of one answer); a sum of a measured and a
    /// modelled part is modelled.
    pub fn add(a: Option<Energy>, b: Option<Energy>) -> Option<Energy> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Energy {
                microjoules: a.microjoules.saturating_add(b.microjoules),
                kind: if a.kind == b.kind {
                    a.kind
                } else {
                    crate::EnergyKind::Modelled
                },
            }),
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// What the engine sends back for one request, in order: `PromptLogprobs` once if asked for,
/// any number of `Text` (each generated token's `Logprobs` before its text), then exactly one
/// `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt's log-probabilities (when [`GenerateRequest::prompt_logprobs`] asked for
    /// them), sent once before any `Text` or `Logprobs`: one entry per prompt token from the
    /// second on, since the first token has nothing before it to be predicted from (entry `i`
    /// is prompt token `i + 1`; a one-token prompt gives an empty list). Computed from the raw
    /// logits, like [`Event::Logprobs`].
    PromptLogprobs(Vec<TokenLogprobs>),
    /// New text, always whole UTF-8 characters; never contains (part of) a stop sequence.
    Text(String),
    /// A generated token's log-probabilities, sent before the text it produces (when the
    /// request asked for them).
    Logprobs(TokenLogprobs),
    /// The generation ended normally.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The generation failed after it was accepted.
    Failed(crate::Failure),
}
