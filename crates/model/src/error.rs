use std::fmt;

/// Why a model could not be loaded or run.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModelError {
    /// The file itself is not valid GGUF.
    Format(gguf::GgufError),
    /// `general.architecture` names an architecture this build does not implement.
    UnsupportedArchitecture(String),
    /// A hyperparameter is missing, zero, or inconsistent with the others.
    BadConfig(String),
    /// The model asks for a RoPE scaling this build does not implement.
    UnsupportedRopeScaling {
        /// The configuration key that names it (`llama.rope.scaling.type`,
        /// `rope_parameters.rope_type`, ...).
        key: String,
        /// Its value.
        value: String,
    },
    /// A tensor the architecture needs is absent.
    MissingTensor(String),
    /// A tensor has a shape other than the hyperparameters imply.
    BadShape {
        /// Tensor name.
        name: String,
        /// Expected dims, GGUF order (contiguous dimension first).
        expected: Vec<u64>,
        /// Dims found in the file.
        found: Vec<u64>,
    },
    /// A tensor is stored in a type the kernels cannot compute with yet.
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// The GGUF type name.
        ggml_type: String,
    },
    /// A token id is outside the vocabulary.
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The sequence would grow past the KV cache's capacity.
    ContextFull {
        /// Tokens already in the cache.
        cached: usize,
        /// Tokens being added.
        adding: usize,
        /// Capacity of the cache.
        capacity: usize,
    },
    /// The KV cache was made for a different model shape.
    CacheMismatch,
    /// A kernel rejected its operands (a bug if it happens after a successful load).
    Kernel(kernels::KernelError),
    /// A model file or directory could not be read.
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file of a model directory (config.json, params.json, a safetensors file or its
    /// index) is malformed.
    BadFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Format(e) => write!(f, "invalid GGUF file: {e}"),
            ModelError::UnsupportedArchitecture(a) => {
                write!(
                    f,
                    "unsupported architecture {a:?} (supported: GGUF {}; Hugging Face {})",
                    crate::GGUF_ARCHITECTURES.join(", "),
                    crate::HF_ARCHITECTURES.join(", ")
                )
            }
            ModelError::BadConfig(m) => write!(f, "bad model hyperparameters: {m}"),
            ModelError::UnsupportedRopeScaling { key, value } => write!(
                f,
                "{key} = {value:?}: unsupported RoPE scaling (supported: none, linear, llama3, yarn)"
            ),
            ModelError::MissingTensor(n) => write!(f, "missing tensor {n:?}"),
            ModelError::BadShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name:?} has shape {found:?}, expected {expected:?}"
            ),
            ModelError::UnsupportedTensorType { name, ggml_type } => {
                write!(f, "tensor {name:?} has unsupported type {ggml_type}")
            }
            ModelError::TokenOutOfRange { token, vocab_size } => {
                write!(
                    f,
                    "token id {token} is outside the vocabulary of {vocab_size}"
                )
            }
            ModelError::ContextFull {
                cached,
                adding,
                capacity,
            } => write!(
                f,
                "context full: {cached} cached + {adding} new tokens exceed the capacity of {capacity}"
            ),
            ModelError::CacheMismatch => write!(f, "KV cache does not match the model's shape"),
            ModelError::Kernel(e) => write!(f, "kernel error: {e}"),
            ModelError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ModelError::BadFile { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for ModelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ModelError::Format(e) => Some(e),
            ModelError::Kernel(e) => Some(e),
            ModelError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<gguf::GgufError> for ModelError {
    fn from(e: gguf::GgufError) -> Self {
        ModelError::Format(e)
    }
}

impl From<kernels::KernelError> for ModelError {
    fn from(e: kernels::KernelError) -> Self {
        ModelError::Kernel(e)
    }
}
