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
}

/// Why a generation ended, named as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

impl FinishReason {
    /// The OpenAI wire name: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
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
}

/// What the engine sends back for one request, in order: any number of `Text`, then exactly
/// one `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text, always whole UTF-8 characters; never contains (part of) a stop sequence.
    Text(String),
    /// The generation ended normally.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The generation failed after it was accepted.
    Failed(String),
}
