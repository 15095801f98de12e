//! The engine's errors. A load failure keeps the typed error it came from ([`LoadError`]), so
//! whoever turns it into an answer (the HTTP layer, the CLI) can log its whole chain.

use std::path::PathBuf;

/// Why a request (or the engine) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The prompt leaves no room to generate within the context window.
    #[error(
        "This model's maximum context length is {context_length} tokens. However, your prompt \
         resulted in {prompt_tokens} tokens, which leaves no room in the context for a completion."
    )]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The engine's context length.
        context_length: usize,
    },
    /// The request is malformed in a way the caller should have caught.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The chat template failed to render these messages.
    #[error("chat template error: {0}")]
    Template(String),
    /// The engine cannot take requests (its worker is gone).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The waiting queue is full; the client should retry later.
    #[error("the server is overloaded ({waiting} requests waiting); retry later")]
    Overloaded {
        /// Requests already waiting.
        waiting: usize,
    },
    /// The model could not be loaded.
    #[error("cannot load model: {0}")]
    Load(#[from] LoadError),
}

/// Why a model (or an embedding model) could not be loaded: the typed error of the layer that
/// failed, or what is inconsistent between the files and the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The model's files or weights.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The embedding model's files or weights.
    #[error(transparent)]
    Embedding(#[from] model::BertError),
    /// The GGUF metadata that describes the tokenizer.
    #[error(transparent)]
    Metadata(#[from] model::gguf::GgufError),
    /// The tokenizer or chat template the model ships.
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// Mistral's tokenizer file.
    #[error(transparent)]
    Mistral(#[from] tokenizer::MistralError),
    /// The embedding model's `tokenizer.json`.
    #[error("{}: {source}", path.display())]
    WordPiece {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: tokenizer::WordPieceError,
    },
    /// The chat template given to replace the model's own.
    #[error("the chat template: {0}")]
    ChatTemplate(#[source] tokenizer::TokenizerError),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model directory does not parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The engine's thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The files disagree with each other or with the engine's configuration.
    #[error("{0}")]
    Inconsistent(String),
}

impl LoadError {
    /// Reading `path` failed with `source`.
    pub(crate) fn read(path: &std::path::Path, source: std::io::Error) -> Self {
        LoadError::Read {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<model::ModelError> for EngineError {
    fn from(e: model::ModelError) -> Self {
        EngineError::Load(e.into())
    }
}

/// Why a generation failed after it was accepted, sent as [`crate::Event::Failed`]: the cause
/// travels whole (cheap to clone) to the edge that logs it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// The forward pass failed: a bug or a broken file, not a bad request.
    #[error("the forward pass failed")]
    Forward(#[source] std::sync::Arc<model::ModelError>),
    /// The sequence can never fit in the KV cache.
    #[error(
        "the sequence needs {needed_tokens} tokens of KV cache but the cache holds {capacity_tokens}"
    )]
    KvCacheTooSmall {
        /// Tokens the sequence needs.
        needed_tokens: usize,
        /// Tokens the whole cache holds.
        capacity_tokens: usize,
    },
    /// The output constraint could not mask or advance.
    #[error("the output constraint failed: {0}")]
    Constraint(String),
    /// A failure of a backend other than the engine, with its cause.
    #[error(transparent)]
    Other(std::sync::Arc<dyn std::error::Error + Send + Sync>),
}

impl Failure {
    /// A failure caused by `err` (for backends other than the engine).
    pub fn other(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Failure::Other(std::sync::Arc::new(err))
    }
}

/// Failures are equal when they say the same (their causes are not comparable).
impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
