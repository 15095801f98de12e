//! Sentence embeddings: a BERT encoder with the pooling and normalisation its
//! sentence-transformers configuration asks for.
//!
//! [`Embedder::load`] reads a model directory in the Hugging Face / sentence-transformers
//! layout:
//!
//! - `config.json` and `model.safetensors`: the encoder ([`model::BertModel`]);
//! - `tokenizer.json`: the WordPiece tokenizer ([`tokenizer::WordPiece`]);
//! - `modules.json`: the pipeline, `Transformer` → `Pooling` → optional `Normalize` (another
//!   module, such as `Dense`, is refused at load); without it, mean pooling and no
//!   normalisation, as sentence-transformers does for a plain encoder;
//! - the pooling module's `config.json` (`pooling_mode_mean_tokens`, `_cls_token`,
//!   `_max_tokens`, ...);
//! - `sentence_bert_config.json`: `max_seq_length`, the longest input in tokens (special
//!   tokens included), and `do_lower_case`.
//!
//! Inputs longer than the limit are refused, never truncated: sentence-transformers truncates
//! silently, OpenAI's API answers an error, and a server should not embed a different text
//! than it was given.
//!
//! Embedding is synchronous CPU work. One request at a time uses the model: a mutex guards the
//! thread pool that runs the forward pass, and each call runs its inputs in batches of at most
//! `max_batch_tokens` tokens (every sequence is packed without padding, so batching does not
//! change a vector). Async callers run [`Embedder::embed`] on a blocking thread
//! (`tokio::task::spawn_blocking`); it never touches the chat engine's thread. Each forward
//! pass is a step on the process's energy account ([`EnergyAccount`], shared with the chat
//! engines), and [`Embedder::embed_metered`] says what the call's passes took.

use std::path::{Component, Path};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use model::{BertInput, BertModel, Pooling, ThreadPool};
use serde_json::Value;
use tokenizer::WordPiece;

use crate::{Energy, EnergyAccount, EnergyConfig, EnergySnapshot, EngineError, LoadError};

/// How an [`Embedder`] is set up.
#[derive(Clone, Debug)]
pub struct EmbedderConfig {
    /// Worker threads for the matrix products; 0 means one per available core.
    pub threads: usize,
    /// Name the model is served under; `None` takes the directory's name.
    pub model_id: Option<String>,
    /// Longest input in tokens; `None` takes `max_seq_length` from
    /// `sentence_bert_config.json` (or the model's position table). It may not exceed the
    /// position table.
    pub max_tokens: Option<usize>,
    /// Most tokens in one forward pass; a request with more runs in several.
    pub max_batch_tokens: usize,
    /// How energy is metered, when the embedder opens an account of its own.
    pub energy: EnergyConfig,
    /// The process's energy account, shared with its chat engines (one meter for the
    /// machine, [`EnergyAccount`]); `None` opens one from `energy`.
    pub energy_account: Option<Arc<EnergyAccount>>,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            model_id: None,
            max_tokens: None,
            max_batch_tokens: 8192,
            energy: EnergyConfig::default(),
            energy_account: None,
        }
    }
}

/// A loaded embedding model: encoder, tokenizer, pooling and normalisation. Share it behind
/// an `Arc`; calls from several threads take turns.
pub struct Embedder {
    model_id: String,
    model: BertModel,
    tokenizer: WordPiece,
    pooling: Pooling,
    normalize: bool,
    lowercase: bool,
    max_tokens: usize,
    max_batch_tokens: usize,
    dimensions: usize,
    /// The forward pass's threads; the lock makes requests take turns.
    pool: Mutex<ThreadPool>,
    threads: usize,
    /// Each batch is a step on the process's energy account.
    energy: Arc<EnergyAccount>,
    /// Microjoules of the batches, charged to the requests they embedded.
    requests_uj: AtomicU64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("model_id", &self.model_id)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_tokens", &self.max_tokens)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

/// The sentence-transformers pipeline of a directory.
#[derive(Debug, PartialEq)]
struct Pipeline {
    pooling: Pooling,
    normalize: bool,
}

impl Embedder {
    /// Loads the model directory `dir` (see the module docs for the files it reads).
    pub fn load(dir: &Path, config: EmbedderConfig) -> Result<Self, EngineError> {
        let load = |m: String| EngineError::Load(LoadError::Inconsistent(m));
        let model = BertModel::load(dir).map_err(LoadError::from)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let json = read_text(&tokenizer_path)?;
        let tokenizer = WordPiece::from_json(&json).map_err(|source| LoadError::WordPiece {
            path: tokenizer_path.clone(),
            source,
        })?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(load(format!(
                "the tokenizer has {} tokens but the model's embedding table {} rows",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        let hidden = model.config().hidden_size;
        let pipeline = read_pipeline(dir, hidden)?;
        let st = optional_json(&dir.join("sentence_bert_config.json"))?;
        let positions = model.config().max_position_embeddings;
        let configured = match st.as_ref().and_then(|v| v.get("max_seq_length")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        load(
                            "sentence_bert_config.json: max_seq_length is not a positive integer"
                                .into(),
                        )
                    })?,
            ),
        };
        let lowercase = st
            .as_ref()
            .and_then(|v| v.get("do_lower_case"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let default_max = configured.unwrap_or(positions).min(positions);
        let max_tokens = match config.max_tokens {
            Some(n) if n == 0 || n > positions => {
                return Err(load(format!(
                    "the embedding input limit {n} must be in 1..={positions} (the model's positions)"
                )));
            }
            Some(n) => n,
            None => default_max,
        };
        if max_tokens <= tokenizer.num_special_tokens_to_add() {
            return Err(load(format!(
                "an input limit of {max_tokens} tokens leaves no room for text"
            )));
        }
        if config.max_batch_tokens < max_tokens {
            return Err(load(format!(
                "max_batch_tokens {} must hold one whole input ({max_tokens} tokens)",
                config.max_batch_tokens
            )));
        }
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let energy = match config.energy_account {
            Some(a) => a,
            None => EnergyAccount::open(&config.energy, threads).map_err(load)?,
        };
        let model_id = config.model_id.unwrap_or_else(|| {
            dir.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "embedding-model".into())
        });
        Ok(Self {
            model_id,
            dimensions: pipeline.pooling.n_modes() * hidden,
            model,
            tokenizer,
            pooling: pipeline.pooling,
            normalize: pipeline.normalize,
            lowercase,
            max_tokens,
            max_batch_tokens: config.max_batch_tokens,
            pool: Mutex::new(ThreadPool::new(threads)),
            threads,
            energy,
            requests_uj: AtomicU64::new(0),
        })
    }

    /// The embedder's energy: its batches' microjoules (every one charged to the request it
    /// embedded) and the process's idle, from the shared account.
    pub fn energy(&self) -> EnergySnapshot {
        self.energy.snapshot(self.requests_uj.load(Relaxed))
    }

    /// The name the model is served under.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Length of every embedding vector.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Whether vectors are scaled to unit length (a `Normalize` module).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// How token states are pooled.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Parameters of the encoder.
    pub fn n_params(&self) -> usize {
        self.model.n_params()
    }

    /// The model's token ids for `text`, `[CLS]` and `[SEP]` included, as
    /// sentence-transformers tokenises it (lowercased first when its config says so). The
    /// result may be longer than [`Embedder::max_tokens`]: the caller decides.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        if self.lowercase {
            self.tokenizer.encode(&text.to_lowercase(), true)
        } else {
            self.tokenizer.encode(text, true)
        }
    }

    /// Embeds each token sequence (as [`Embedder::tokenize`] makes them, or ids the caller
    /// chose, used as they are) and returns one vector per input, in order.
    ///
    /// An empty sequence, one longer than [`Embedder::max_tokens`] or an id outside the
    /// vocabulary is an [`EngineError::InvalidRequest`] naming its index.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.embed_metered(inputs).map(|(vectors, _)| vectors)
    }

    /// [`Embedder::embed`], with the energy it took: each forward pass is a step on the
    /// energy account (its energy all the call's: calls take turns), so the call's energy is
    /// its batches'. A batch that fails charges nobody (its energy counts as idle).
    pub fn embed_metered(
        &self,
        inputs: &[Vec<u32>],
    ) -> Result<(Vec<Vec<f32>>, Energy), EngineError> {
        let vocab = self.model.config().vocab_size;
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has no tokens"
                )));
            }
            if ids.len() > self.max_tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has {} tokens, more than the model's limit of {}",
                    ids.len(),
                    self.max_tokens
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has token id {bad}, outside the vocabulary of {vocab}"
                )));
            }
        }
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(inputs.len());
        let mut microjoules = 0u64;
        let mut start = 0;
        while start < inputs.len() {
            // Greedy batches of whole sequences up to `max_batch_tokens` tokens.
            let mut end = start;
            let mut tokens = 0;
            while end < inputs.len() && tokens + inputs[end].len() <= self.max_batch_tokens {
                tokens += inputs[end].len();
                end += 1;
            }
            let batch: Vec<BertInput<'_>> = inputs[start..end]
                .iter()
                .map(|ids| BertInput {
                    token_ids: ids,
                    type_ids: &[],
                })
                .collect();
            // A pass that fails closes its step as idle (charged to nobody), and so do the
            // call's earlier passes: no answer carries them.
            let step = self.energy.open_step(self.threads as f64);
            let states = match self.model.forward(&pool, &batch) {
                Ok(states) => states,
                Err(e) => {
                    drop(step);
                    self.energy.add_idle(microjoules);
                    return Err(EngineError::InvalidRequest(e.to_string()));
                }
            };
            microjoules = microjoules.saturating_add(step.close());
            for s in states {
                let mut v = model::pool(&s, self.model.config().hidden_size, self.pooling);
                if self.normalize {
                    model::l2_normalize(&mut v);
                }
                out.push(v);
            }
            start = end;
        }
        self.requests_uj.fetch_add(microjoules, Relaxed);
        let energy = Energy {
            microjoules,
            kind: self.energy.kind(),
        };
        Ok((out, energy))
    }
}

fn read_text(path: &Path) -> Result<String, EngineError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::read(path, e).into())
}

fn parse_json(path: &Path, text: &str) -> Result<Value, EngineError> {
    serde_json::from_str(text).map_err(|source| {
        LoadError::Json {
            path: path.to_owned(),
            source,
        }
        .into()
    })
}

/// The JSON content of `path`, or `None` when the file does not exist.
fn optional_json(path: &Path) -> Result<Option<Value>, EngineError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    parse_json(path, &text).map(Some)
}

/// Reads `modules.json` and the pooling module's config.
fn read_pipeline(dir: &Path, hidden_size: usize) -> Result<Pipeline, EngineError> {
    let load = |m: String| EngineError::Load(LoadError::Inconsistent(m));
    let modules_path = dir.join("modules.json");
    let Some(modules) = optional_json(&modules_path)? else {
        tracing::info!(
            "no modules.json: mean pooling without normalisation, as sentence-transformers does"
        );
        return Ok(Pipeline {
            pooling: Pooling::MEAN,
            normalize: false,
        });
    };
    let list = modules
        .as_array()
        .ok_or_else(|| load("modules.json is not a list".into()))?;
    let mut pooling = None;
    let mut normalize = false;
    let mut saw_transformer = false;
    for (i, m) in list.iter().enumerate() {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
        let short = kind.rsplit('.').next().unwrap_or(kind);
        let path = m.get("path").and_then(Value::as_str).unwrap_or_default();
        match short {
            "Transformer" if i == 0 => saw_transformer = true,
            "Pooling" if saw_transformer && pooling.is_none() => {
                if !is_plain_relative(path) {
                    return Err(load(format!(
                        "modules.json: pooling path {path:?} is not a folder inside the model"
                    )));
                }
                let config_path = dir.join(path).join("config.json");
                let text = read_text(&config_path)?;
                pooling = Some(read_pooling(
                    &parse_json(&config_path, &text)?,
                    hidden_size,
                )?);
            }
            "Normalize" if pooling.is_some() && !normalize => normalize = true,
            _ => {
                return Err(load(format!(
                    "modules.json: module {i} ({kind:?}) is not supported here (supported: \
                     Transformer, then Pooling, then optionally Normalize)"
                )));
            }
        }
    }
    let pooling = pooling.ok_or_else(|| load("modules.json has no Pooling module".into()))?;
    Ok(Pipeline { pooling, normalize })
}

/// A relative path that stays inside the directory (no `..`, no root).
fn is_plain_relative(path: &str) -> bool {
    Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn read_pooling(v: &Value, hidden_size: usize) -> Result<Pooling, EngineError> {
    let load = |m: String| EngineError::Load(LoadError::Inconsistent(m));
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    if let Some(d) = v.get("word_embedding_dimension").and_then(Value::as_u64)
        && d != hidden_size as u64
    {
        return Err(load(format!(
            "pooling config: word_embedding_dimension {d} is not the model's hidden size {hidden_size}"
        )));
    }
    let pooling = Pooling {
        cls_token: flag("pooling_mode_cls_token"),
        max_tokens: flag("pooling_mode_max_tokens"),
        mean_tokens: flag("pooling_mode_mean_tokens"),
        mean_sqrt_len_tokens: flag("pooling_mode_mean_sqrt_len_tokens"),
        weighted_mean_tokens: flag("pooling_mode_weightedmean_tokens"),
        last_token: flag("pooling_mode_lasttoken"),
    };
    if pooling.n_modes() == 0 {
        return Err(load("pooling config: no pooling mode is set".into()));
    }
    Ok(pooling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("souverain-embed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, rel: &str, v: &Value) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v.to_string()).unwrap();
    }

    fn modules(pooling_path: &str, normalize: bool) -> Value {
        let mut m = vec![
            json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
            json!({"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"}),
        ];
        if normalize {
            m.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        }
        Value::Array(m)
    }

    #[test]
    fn pipeline_reads_pooling_and_normalize() {
        let dir = temp_dir("pipeline");
        write(&dir, "modules.json", &modules("1_Pooling", true));
        write(
            &dir,
            "1_Pooling/config.json",
            &json!({"word_embedding_dimension": 8, "pooling_mode_cls_token": true,
                    "pooling_mode_mean_tokens": false}),
        );
        let p = read_pipeline(&dir, 8).unwrap();
        assert!(p.normalize);
        assert!(p.pooling.cls_token && p.pooling.n_modes() == 1);
        // A pooling config for another width is refused.
        assert!(read_pipeline(&dir, 16).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pipeline_defaults_and_refusals() {
        let dir = temp_dir("defaults");
        assert_eq!(
            read_pipeline(&dir, 8).unwrap(),
            Pipeline {
                pooling: Pooling::MEAN,
                normalize: false
            }
        );
        write(&dir, "modules.json", &modules("../outside", false));
        assert!(read_pipeline(&dir, 8).is_err());
        let mut dense = modules("1_Pooling", false);
        if let Value::Array(list) = &mut dense {
            list.push(json!({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}));
        }
        write(&dir, "modules.json", &dense);
        write(
            &dir,
            "1_Pooling/config.json",
            &json!({"pooling_mode_mean_tokens": true}),
        );
        let err = read_pipeline(&dir, 8).unwrap_err().to_string();
        assert!(err.contains("Dense"), "{err}");
        write(&dir, "modules.json", &modules("1_Pooling", false));
        write(&dir, "1_Pooling/config.json", &json!({}));
        assert!(read_pipeline(&dir, 8).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
