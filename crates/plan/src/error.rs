//! The one error type of the planner: every bad input names its file and field.

use std::path::PathBuf;

/// What went wrong while reading a site, demand, model or profile file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid TOML or JSON, or a field has the wrong type (the parser's message
    /// names the field and line).
    #[error("{file}: {message}")]
    Parse {
        /// The file (or what it was).
        file: String,
        /// The parser's message.
        message: String,
    },
    /// A field has a value outside its allowed range, or refers to something unknown.
    #[error("{file}: field `{field}`: {message}")]
    Field {
        /// The file (or what it was).
        file: String,
        /// The field's path, e.g. `demand[2].slo.ttft_p99_ms`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A GGUF model file could not be read.
    #[error("model file {path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: gguf::GgufError,
    },
}

impl PlanError {
    /// A field error.
    pub(crate) fn field(
        file: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Field {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
