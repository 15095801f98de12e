//! Tokenisers and chat templates for Souverain.
//!
//! [`Tokenizer`] is byte-level BPE (GPT-2 style) that reproduces llama.cpp's tokenisation for
//! GGUF files with `tokenizer.ggml.model = "gpt2"`: the same special-token partitioning, the
//! same pre-tokeniser per `tokenizer.ggml.pre`, the same merge order and fallbacks, the same
//! detokenisation. It is built from a plain [`TokenizerSpec`] that the caller fills from GGUF
//! metadata, so this crate knows nothing about file formats. [`StreamDecoder`] turns a stream of
//! token ids into text without ever splitting a UTF-8 character, and [`ChatTemplate`] renders
//! Hugging Face chat templates with minijinja.
//!
//! Mistral's own tokenizers live here too: [`SentencePieceBpe`] (`tokenizer.model.v*`),
//! [`Tekken`] (`tekken_*.json`) and [`MistralTokenizer`], which encodes a
//! [`MistralChatRequest`] exactly as mistral-common's `encode_chat_completion` does.
//! [`WordPiece`] is BERT's tokenizer, built from a Hugging Face `tokenizer.json`, for the
//! embedding models.
//!
//! ```
//! use souverain_tokenizer::{Tokenizer, TokenizerSpec};
//!
//! // A toy vocabulary: the printable bytes we need, one merge, and a control token.
//! let mut tokens: Vec<String> = ["h", "i", "Ġ", "hi", "<|end|>"].map(String::from).to_vec();
//! let spec = TokenizerSpec {
//!     model: "gpt2".into(),
//!     pre: Some("gpt2".into()),
//!     token_types: Some(vec![1, 1, 1, 1, 3]),
//!     tokens: std::mem::take(&mut tokens),
//!     merges: vec!["h i".into()],
//!     eos_id: Some(4),
//!     ..TokenizerSpec::default()
//! };
//! let tok = Tokenizer::from_spec(spec)?;
//! let ids = tok.encode("hi<|end|>", false, true);
//! assert_eq!(ids, [3, 4]);
//! assert_eq!(tok.decode(&ids, true)?, "hi");
//! assert!(tok.is_eog(4));
//! # Ok::<(), souverain_tokenizer::TokenizerError>(())
//! ```

/// Orders a queued BPE merge (a struct with `rank: u32` and `left: usize`) for
/// `BinaryHeap`, a max-heap, so that the lowest rank pops first and, among equal ranks, the
/// leftmost: the merge order of every BPE here.
macro_rules! lowest_rank_first {
    ($merge:ty) => {
        impl Ord for $merge {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                other
                    .rank
                    .cmp(&self.rank)
                    .then_with(|| other.left.cmp(&self.left))
            }
        }

        impl PartialOrd for $merge {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
    };
}

mod bpe;
mod chat;
mod hf;
mod mistral_chat;
mod mistral_error;
mod mistral_fim;
mod mistral_request;
mod pretokenize;
mod pyjson;
mod sentencepiece;
mod stream;
mod tekken;
mod unicode;
mod unicode_table;
mod wordpiece;

pub use bpe::{Tokenizer, TokenizerSpec};
pub use chat::{ChatMessage, ChatTemplate};
pub use hf::{HfStreamDecoder, HfTokenizer};
pub use mistral_chat::{MistralTokenizer, MistralVersion};
pub use mistral_error::MistralError;
pub use mistral_request::{
    MistralChatRequest, MistralChunk, MistralContent, MistralFunction, MistralFunctionCall,
    MistralMessage, MistralTool, MistralToolCall,
};
pub use pyjson::JsonValue;
pub use sentencepiece::{PieceType, SentencePieceBpe};
pub use stream::StreamDecoder;
pub use tekken::Tekken;
pub use wordpiece::{WordPiece, WordPieceEncoding, WordPieceError};

/// Everything that can go wrong building a tokenizer, decoding, or rendering a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A Hugging Face `tokenizer.json` / `tokenizer_config.json` could not be read or used.
    #[error("Hugging Face tokenizer: {0}")]
    HfJson(String),
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error("unsupported tokenizer model {0:?} (supported: \"gpt2\", \"llama\")")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.scores` (needed by SentencePiece vocabularies) is missing or does not
    /// have one entry per token.
    #[error("{scores} token scores for {tokens} tokens (tokenizer.ggml.scores)")]
    ScoreCount {
        /// Number of scores given.
        scores: usize,
        /// Number of tokens.
        tokens: usize,
    },
    /// `tokenizer.ggml.pre` names a pre-tokeniser this crate does not implement.
    #[error("unsupported pre-tokenizer {0:?}")]
    UnsupportedPreTokenizer(String),
    /// The vocabulary is empty.
    #[error("the vocabulary is empty")]
    EmptyVocabulary,
    /// The same token text appears twice.
    #[error("duplicate token {text:?} at ids {first} and {second}")]
    DuplicateToken {
        /// The token text.
        text: String,
        /// Its first id.
        first: u32,
        /// The id where it appears again.
        second: u32,
    },
    /// The vocabulary has more entries than token ids can address.
    #[error("vocabulary of {0} tokens is too large")]
    VocabularyTooLarge(usize),
    /// `token_types` does not have one entry per token.
    #[error("{types} token types for {tokens} tokens")]
    TokenTypeCount {
        /// Number of token types given.
        types: usize,
        /// Number of tokens.
        tokens: usize,
    },
    /// A merge rule is not of the form `"left right"`.
    #[error("merge #{index} {text:?} is not two space-separated parts")]
    MalformedMerge {
        /// Rank of the merge.
        index: usize,
        /// The merge text.
        text: String,
    },
    /// A merge rule names a part that is not in the vocabulary.
    #[error("merge #{index} {text:?} refers to unknown token {part:?}")]
    MergeUnknownToken {
        /// Rank of the merge.
        index: usize,
        /// The merge text.
        text: String,
        /// The part that is not a token.
        part: String,
    },
    /// A special token id (BOS, EOS, ...) is outside the vocabulary.
    #[error("{role} token id {id} is out of range (vocabulary size {vocab_size})")]
    SpecialIdOutOfRange {
        /// Which special token: "bos", "eos", "eot", "unk" or "pad".
        role: &'static str,
        /// The id given.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// `add_bos` / `add_eos` is set but the matching token id is missing.
    #[error("add_{role} is set but no {role} token id is given")]
    MissingSpecialToken {
        /// "bos" or "eos".
        role: &'static str,
    },
    /// A pre-tokeniser pattern failed to compile (a bug in this crate, reported rather than
    /// panicking).
    #[error("pre-tokenizer pattern {pattern:?} failed to compile: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
    /// A token id given to `decode` is outside the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The chat template does not parse.
    #[error("invalid chat template: {0}")]
    TemplateSyntax(String),
    /// The chat template failed while rendering (bad variable use, type errors, ...).
    #[error("chat template rendering failed: {0}")]
    TemplateRender(String),
    /// The chat template called `raise_exception(message)`: the request itself is invalid.
    #[error("chat template rejected the conversation: {0}")]
    TemplateRaised(String),
}
