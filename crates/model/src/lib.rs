//! Model architectures and their forward pass.
//!
//! A model is loaded from a GGUF file ([`gguf::GgufFile`]) or a directory of safetensors in
//! the Hugging Face or Mistral layout ([`LoadedModel::open`] takes either), and owns only its
//! weights, which stay in the files' memory maps. All per-request state lives in a [`KvCache`] that the caller
//! passes into [`LlamaModel::forward`], so one model can serve many sequences.
//!
//! ```no_run
//! use std::sync::Arc;
//! use souverain_model::{LlamaModel, Logits, ThreadPool, gguf::GgufFile};
//! let file = Arc::new(GgufFile::open("model.gguf")?);
//! let model = LlamaModel::load(file, &mut |_done, _total| {})?;
//! let pool = ThreadPool::new(2);
//! let mut kv = model.new_kv_cache(512)?;
//! let logits = model.forward(&pool, &[1, 2, 3], &mut kv, Logits::Last)?;
//! assert_eq!(logits.len(), model.config().vocab_size);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod attention;
mod bert;
mod config;
mod error;
mod hf;
mod kv_cache;
mod llama;
mod moe;
mod rope_scaling;
mod safetensors;
mod source;
mod weights;

pub use bert::{BertConfig, BertError, BertInput, BertModel, Pooling, l2_normalize, pool};
pub use config::{
    Activation, AttnTemperature, ExpertDesign, GGUF_ARCHITECTURES, Gating, HF_ARCHITECTURES,
    LayerAttention, LlamaConfig, Mla,
};
pub use error::ModelError;
pub use kernels::{RopeScaling, RopeStyle};
pub use kv_cache::{KvCache, KvPool, KvType};
pub use llama::{LlamaModel, Logits, SeqChunk};
pub use source::{LoadedModel, ModelFormat, TensorSummary, TokenizerSource};

/// The GGUF reader, re-exported so that callers (the engine) can read tokenizer metadata from
/// the same file without depending on the format crate themselves.
pub use gguf;

/// The thread pool the forward pass runs on, re-exported so that callers can own one without
/// depending on the kernels crate.
pub use kernels::ThreadPool;

/// The instruction set the kernels chose on this CPU (e.g. `avx2`), for logs.
pub fn kernels_simd_level() -> &'static str {
    kernels::simd_level()
}
