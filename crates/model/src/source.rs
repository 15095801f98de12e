//! Opening a model from a path, whatever its format: a `.gguf` file, or a directory in the
//! Hugging Face or Mistral layout. The caller learns where the tokenizer lives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gguf::GgufFile;

use crate::hf::{self, DirLayout};
use crate::weights::Tensors;
use crate::{LlamaModel, ModelError};

/// The format a model was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFormat {
    /// A GGUF file.
    Gguf,
    /// A Hugging Face directory: `config.json` + safetensors.
    HuggingFace,
    /// A Mistral directory: `params.json` + `consolidated*.safetensors`.
    Mistral,
}

/// Where the model's tokenizer is, for the caller to build it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TokenizerSource {
    /// In the GGUF file's metadata (`tokenizer.ggml.*`).
    Gguf(Arc<GgufFile>),
    /// A Hugging Face `tokenizer.json`, with `tokenizer_config.json` (special tokens, chat
    /// template) when present.
    HuggingFace {
        /// `tokenizer.json`.
        tokenizer_json: PathBuf,
        /// `tokenizer_config.json`, if present.
        tokenizer_config: Option<PathBuf>,
    },
    /// Mistral's Tekken tokenizer (`tekken.json`).
    Tekken(PathBuf),
    /// Mistral's SentencePiece model (`tokenizer.model.v*` or `tokenizer.model`).
    SentencePiece(PathBuf),
    /// The directory holds no tokenizer file this build knows.
    Missing,
}

/// How many tensors of each storage type a model has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorSummary {
    /// Tensors the model reads.
    pub n_tensors: usize,
    /// Their elements.
    pub n_params: u64,
    /// Storage type name (`F32`, `BF16`, `Q8_0`, ...) → (tensors, elements).
    pub by_type: BTreeMap<String, (usize, u64)>,
}

/// A model opened from a path, with what the caller needs beside the weights.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: LlamaModel,
    /// The format it was read from.
    pub format: ModelFormat,
    /// Where its tokenizer is.
    pub tokenizer: TokenizerSource,
    /// Its tensors, counted by type.
    pub tensors: TensorSummary,
    /// The path it was opened from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Opens a `.gguf` file or a model directory (Hugging Face or Mistral layout), checks
    /// every tensor and builds the model. `progress(done, total)` reports weight paging.
    pub fn open(path: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        if path.is_dir() {
            let (layout, config, tensors) = hf::open_dir(path)?;
            let summary = summary(&tensors);
            let model = LlamaModel::from_tensors(tensors, config, progress)?;
            Ok(Self {
                model,
                format: match layout {
                    DirLayout::HuggingFace => ModelFormat::HuggingFace,
                    DirLayout::Mistral => ModelFormat::Mistral,
                },
                tokenizer: tokenizer_in(path, layout),
                tensors: summary,
                path: path.to_path_buf(),
            })
        } else {
            let file = Arc::new(GgufFile::open(path)?);
            let tensors = Tensors::from_gguf(file.clone());
            let summary = summary(&tensors);
            let model = LlamaModel::load(file.clone(), progress)?;
            Ok(Self {
                model,
                format: ModelFormat::Gguf,
                tokenizer: TokenizerSource::Gguf(file),
                tensors: summary,
                path: path.to_path_buf(),
            })
        }
    }
}

fn summary(tensors: &Tensors) -> TensorSummary {
    let by_type = hf::type_counts(tensors);
    TensorSummary {
        n_tensors: by_type.values().map(|v| v.0).sum(),
        n_params: by_type.values().map(|v| v.1).sum(),
        by_type,
    }
}

/// The tokenizer files of a directory, in the order each layout prefers them: Mistral's own
/// tokenizers first in a Mistral directory, `tokenizer.json` first in a Hugging Face one.
fn tokenizer_in(dir: &Path, layout: DirLayout) -> TokenizerSource {
    let hf = || {
        let json = dir.join("tokenizer.json");
        json.is_file().then(|| {
            let config = dir.join("tokenizer_config.json");
            TokenizerSource::HuggingFace {
                tokenizer_json: json,
                tokenizer_config: config.is_file().then_some(config),
            }
        })
    };
    let mistral = || {
        let tekken = dir.join("tekken.json");
        if tekken.is_file() {
            return Some(TokenizerSource::Tekken(tekken));
        }
        // The highest tokenizer.model.vN, else plain tokenizer.model.
        let mut sp: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("tokenizer.model.v"))
            })
            .collect();
        sp.sort();
        sp.pop()
            .or_else(|| Some(dir.join("tokenizer.model")).filter(|p| p.is_file()))
            .map(TokenizerSource::SentencePiece)
    };
    let found = match layout {
        DirLayout::HuggingFace => hf().or_else(mistral),
        DirLayout::Mistral => mistral().or_else(hf),
    };
    found.unwrap_or(TokenizerSource::Missing)
}
