//! The error type of Mistral's tokenizers and chat encoding.

/// Everything that can go wrong loading a Mistral tokenizer file or encoding a chat request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MistralError {
    /// The SentencePiece `.model` protobuf is malformed.
    #[error("malformed SentencePiece model at byte {offset}: {message}")]
    Protobuf {
        /// Byte offset in the file.
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// The Tekken JSON file does not parse or lacks a field.
    #[error("malformed Tekken file: {0}")]
    TekkenJson(String),
    /// The file parses but its content is inconsistent (duplicate pieces, bad ranks, ...).
    #[error("invalid tokenizer model: {0}")]
    InvalidModel(String),
    /// The file uses a feature this crate does not implement.
    #[error("unsupported tokenizer model: {0}")]
    UnsupportedModel(String),
    /// The tokenizer version is not one mistral-common knows (`v1`, `v2`, `v3`, `v7`, `v11`,
    /// `v13`) or is not implemented here (`v15`).
    #[error("unsupported tokenizer version {0:?}")]
    UnsupportedVersion(String),
    /// A token id given to `decode` is outside the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The chat request is malformed or breaks mistral-common's rules (message order, tool call
    /// ids, ...); the message says which.
    #[error("invalid chat request: {0}")]
    InvalidRequest(String),
    /// The chat request uses something this tokenizer version cannot encode (tools in v1,
    /// reasoning before v13, several tool results per turn in v2, ...).
    #[error("not supported by tokenizer {version}: {what}")]
    Unsupported {
        /// The tokenizer version, e.g. `"v3"`.
        version: &'static str,
        /// What is not supported.
        what: String,
    },
}
