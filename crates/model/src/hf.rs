//! Model directories: the Hugging Face layout (`config.json` + `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`) and Mistral's own layout (`params.json` +
//! `consolidated*.safetensors`). Tensors are renamed to GGUF's names as the table is built,
//! so that [`crate::LlamaModel`] reads every format the same way.
//!
//! Hugging Face stores the rows of `q_proj`/`k_proj` for "rotate half" RoPE (pairs `x[i]`,
//! `x[i + d/2]`, [`RopeStyle::NeoX`]); Mistral's `wq`/`wk`, like GGUF's, are ordered for
//! adjacent pairs ([`RopeStyle::Normal`]). The golden tests check both against transformers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kernels::{RopeScaling, RopeStyle, WeightType};
use serde_json::Value;

use crate::config::{Activation, GEMMA3_LOCAL_ROPE_BASE, GEMMA3_PATTERN, gemma3_window_layers};
use crate::rope_scaling::{YARN_BETA_FAST, YARN_BETA_SLOW, llama3_divisors, positive, yarn_mscale};
use crate::safetensors::FileBytes;
use crate::weights::{Storage, TensorRef, Tensors};
use crate::{LlamaConfig, ModelError};

/// Maps a tensor name of a layout to our internal name (`None`: not ours).
type RenameFn = fn(&str) -> Option<String>;
/// Which layout a model directory uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirLayout {
    HuggingFace,
    Mistral,
}

/// Context length assumed for a Mistral-layout model whose `params.json` names none (the
/// 32k of Mistral 7B v0.3 and Mixtral).
const MISTRAL_DEFAULT_CONTEXT: usize = 32_768;

/// Largest JSON file read (config, params, index): they are a few KiB.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// The layout of `dir`, from the files it holds.
pub(crate) fn layout(dir: &Path) -> Result<DirLayout, ModelError> {
    if dir.join("config.json").is_file() {
        Ok(DirLayout::HuggingFace)
    } else if dir.join("params.json").is_file() {
        Ok(DirLayout::Mistral)
    } else {
        Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: "a model directory needs config.json (Hugging Face) or params.json \
                     (Mistral) beside its safetensors files"
                .into(),
        })
    }
}

/// Reads the configuration and the tensor table of a model directory.
pub(crate) fn open_dir(dir: &Path) -> Result<(DirLayout, LlamaConfig, Tensors), ModelError> {
    let layout = layout(dir)?;
    let json_path = dir.join(match layout {
        DirLayout::HuggingFace => "config.json",
        DirLayout::Mistral => "params.json",
    });
    let json = read_json(&json_path)?;
    // Gemma names its norms differently (and has more of them): its own table.
    let (files, rename): (Vec<PathBuf>, RenameFn) = match layout {
        DirLayout::HuggingFace if hf_architecture(&json) == Some("Gemma3ForCausalLM") => {
            (hf_files(dir)?, gemma_name)
        }
        DirLayout::HuggingFace
            if hf_architecture(&json) == Some("Mistral3ForConditionalGeneration") =>
        {
            tracing::info!(
                dir = %dir.display(),
                "Mistral3ForConditionalGeneration: the language model is loaded; the vision tower and its projector are skipped (image input is not supported)"
            );
            (hf_files(dir)?, mistral3_vlm_name)
        }
        DirLayout::HuggingFace => (hf_files(dir)?, hf_name),
        DirLayout::Mistral => (mistral_files(dir)?, mistral_name),
    };
    let mut tensors = read_tensors(&files, rename)?;
    let config = match layout {
        DirLayout::HuggingFace => hf_config(&json, &tensors),
        DirLayout::Mistral => mistral_config(&json, &tensors),
    }
    .map_err(|e| in_file(&json_path, e))?;
    if config.mla.is_some() {
        split_kv_b(&mut tensors, &config)?;
    }
    Ok((layout, config, tensors))
}

/// Llama 4's attention temperature from RoPE parameters (Ministral 3, Mistral 4):
/// `llama_4_scaling_beta` over `original_max_position_embeddings`; none when beta is absent
/// or 0.
fn llama4_temperature(p: &Fields<'_>) -> Result<Option<crate::AttnTemperature>, ModelError> {
    let Some(beta) = p.f32("llama_4_scaling_beta")?.filter(|&b| b != 0.0) else {
        return Ok(None);
    };
    let length_key = "rope_parameters.original_max_position_embeddings";
    let length = p
        .usize("original_max_position_embeddings")?
        .ok_or_else(|| ModelError::BadConfig(format!("{length_key} is missing")))?;
    crate::AttnTemperature::new(
        beta,
        length,
        "rope_parameters.llama_4_scaling_beta",
        length_key,
    )
    .map(Some)
}

/// Latent attention's `kv_b_proj` (`attn_kv_b`: per head `qk_nope` key rows then `v_head_dim`
/// value rows, of `kv_lora_rank` columns) split as llama.cpp's converter splits it: each
/// head's key block transposed (`attn_k_b`, dims `[qk_nope, kv_lora_rank, n_heads]`) and its
/// value block as it is (`attn_v_b`, `[kv_lora_rank, v_head_dim, n_heads]`), in the file's
/// float type, held in memory beside the mapped files, in place of `attn_kv_b`.
fn split_kv_b(tensors: &mut Tensors, c: &LlamaConfig) -> Result<(), ModelError> {
    let Some(m) = c.mla else { return Ok(()) };
    let Storage::Safetensors(shards) = &mut tensors.storage else {
        return Ok(());
    };
    let (nh, rank, nope, vd) = (c.n_heads, m.kv_lora_rank, m.qk_nope_dim, m.v_head_dim);
    for layer in 0..c.n_layers {
        let name = format!("blk.{layer}.attn_kv_b.weight");
        let r = tensors
            .index
            .get(&name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        // Sizes from the configuration, each at most 2^24: their products fit u64.
        let rows = nh as u64 * (nope + vd) as u64;
        let expected = [rank as u64, rows];
        let ty =
            r.ty.clone()
                .map_err(|ggml_type| ModelError::UnsupportedTensorType {
                    name: name.clone(),
                    ggml_type,
                })?;
        if r.dims != expected {
            return Err(ModelError::BadShape {
                name,
                expected: expected.to_vec(),
                found: r.dims.clone(),
            });
        }
        let bytes = shards
            .get(r.shard)
            .and_then(|s| s.bytes().get(r.start..r.start + r.len))
            .unwrap_or(&[]);
        // Safetensors hold floats: the halves are a permutation of whole elements, kept in
        // the file's type.
        let elem = match ty {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            other => {
                return Err(ModelError::UnsupportedTensorType {
                    name,
                    ggml_type: format!("{other:?}"),
                });
            }
        };
        // The tensor's dims matched the configuration's, so this is its byte count (which
        // the safetensors reader checked against the file).
        if bytes.len() as u64 != elem as u64 * rank as u64 * rows {
            return Err(ModelError::BadShape {
                name,
                expected: expected.to_vec(),
                found: r.dims.clone(),
            });
        }
        let (mut k_b, mut v_b) = (Vec::with_capacity(elem * nh * nope * rank), Vec::new());
        for head in bytes.chunks_exact(elem * rank * (nope + vd)) {
            let (k, v) = head.split_at(elem * rank * nope);
            for j in 0..rank {
                for i in 0..nope {
                    k_b.extend_from_slice(&k[(i * rank + j) * elem..][..elem]);
                }
            }
            v_b.extend_from_slice(v);
        }
        for (ours, bytes, dims) in [
            ("attn_k_b", k_b, [nope, rank, nh]),
            ("attn_v_b", v_b, [rank, vd, nh]),
        ] {
            tensors.index.insert(
                format!("blk.{layer}.{ours}.weight"),
                TensorRef {
                    ty: Ok(ty),
                    dims: dims.iter().map(|&d| d as u64).collect(),
                    shard: shards.len(),
                    start: 0,
                    len: bytes.len(),
                },
            );
            shards.push(FileBytes::Owned(bytes));
        }
        // Only the split halves are used (and counted).
        tensors.index.remove(&name);
    }
    Ok(())
}

/// `architectures[0]` of a Hugging Face `config.json`.
fn hf_architecture(json: &Value) -> Option<&str> {
    json.get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
}

/// Names a hyperparameter error after the file it came from.
fn in_file(path: &Path, e: ModelError) -> ModelError {
    match e {
        ModelError::BadConfig(reason) => ModelError::BadFile {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_JSON_BYTES {
        return Err(ModelError::BadFile {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is too large for a JSON configuration"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

/// The safetensors files of a Hugging Face directory: the shards its index names, or
/// `model.safetensors`.
fn hf_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::BadFile {
                path: index.clone(),
                reason: "no weight_map object".into(),
            })?;
        let mut names: Vec<&str> = Vec::new();
        for v in map.values() {
            let name = v
                .as_str()
                .filter(|n| is_plain_file_name(n))
                .ok_or_else(|| ModelError::BadFile {
                    path: index.clone(),
                    reason: format!("weight_map value {v} is not a file name in the directory"),
                })?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.sort_unstable();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::BadFile {
        path: dir.to_path_buf(),
        reason: "neither model.safetensors nor model.safetensors.index.json is present".into(),
    })
}

/// The `consolidated*.safetensors` files of a Mistral directory, in name order.
fn mistral_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("consolidated") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: "no consolidated*.safetensors file beside params.json".into(),
        });
    }
    Ok(files)
}

fn is_plain_file_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\'])
}

/// Maps the files and builds the table of tensors whose names `rename` knows.
fn read_tensors(
    files: &[PathBuf],
    rename: fn(&str) -> Option<String>,
) -> Result<Tensors, ModelError> {
    let mut shards = Vec::with_capacity(files.len());
    let mut index: HashMap<String, TensorRef> = HashMap::new();
    for (shard, path) in files.iter().enumerate() {
        let bytes = FileBytes::open(path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |reason: String| ModelError::BadFile {
            path: path.clone(),
            reason,
        };
        for e in crate::safetensors::entries(bytes.bytes()).map_err(bad)? {
            let Some(ours) = rename(&e.name) else {
                continue;
            };
            let r = TensorRef {
                ty: e.ty,
                // safetensors shapes are outermost first; GGUF dims innermost first.
                dims: e.shape.iter().rev().map(|&d| d as u64).collect(),
                shard,
                start: e.bytes.start,
                len: e.bytes.len(),
            };
            if index.insert(ours.clone(), r).is_some() {
                return Err(bad(format!("tensor {:?} ({ours}) appears twice", e.name)));
            }
        }
        shards.push(bytes);
    }
    Ok(Tensors {
        storage: Storage::Safetensors(shards),
        index,
    })
}

/// Whole-model tensors: (Hugging Face name, Mistral name, ours).
const TOP_NAMES: [(&str, &str, &str); 3] = [
    (
        "model.embed_tokens.weight",
        "tok_embeddings.weight",
        "token_embd.weight",
    ),
    ("model.norm.weight", "norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight", "output.weight"),
];

/// A layer's tensors after `N.`: (Hugging Face, Mistral, ours without `blk.N.` and
/// `.weight`).
const LAYER_NAMES: [(&str, &str, &str); 10] = [
    (
        "input_layernorm.weight",
        "attention_norm.weight",
        "attn_norm",
    ),
    (
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        "ffn_norm",
    ),
    ("self_attn.q_proj.weight", "attention.wq.weight", "attn_q"),
    ("self_attn.k_proj.weight", "attention.wk.weight", "attn_k"),
    ("self_attn.v_proj.weight", "attention.wv.weight", "attn_v"),
    (
        "self_attn.o_proj.weight",
        "attention.wo.weight",
        "attn_output",
    ),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight", "ffn_gate"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight", "ffn_up"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight", "ffn_down"),
    (
        "block_sparse_moe.gate.weight",
        "feed_forward.gate.weight",
        "ffn_gate_inp",
    ),
];

/// A layout's tensor name → GGUF's (`<layers>N.<rest>` → `blk.N.<ours>.weight`); `None`
/// for tensors the model does not use.
fn rename(layout: DirLayout, name: &str) -> Option<String> {
    let theirs = |t: &(&'static str, &'static str, &'static str)| match layout {
        DirLayout::HuggingFace => t.0,
        DirLayout::Mistral => t.1,
    };
    // Mixtral's experts, and Qwen3-MoE's (Hugging Face); Mistral's own layout.
    let (layers_prefix, experts_prefixes): (&str, &[&str]) = match layout {
        DirLayout::HuggingFace => (
            "model.layers.",
            &["block_sparse_moe.experts.", "mlp.experts."],
        ),
        DirLayout::Mistral => ("layers.", &["feed_forward.experts."]),
    };
    if let Some(t) = TOP_NAMES.iter().find(|t| theirs(t) == name) {
        return Some(t.2.into());
    }
    let rest = name.strip_prefix(layers_prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some(t) = LAYER_NAMES.iter().find(|t| theirs(t) == rest) {
        return Some(format!("blk.{layer}.{}.weight", t.2));
    }
    if layout == DirLayout::HuggingFace
        && let Some(t) = HF_EXTRA_LAYER_NAMES.iter().find(|t| t.0 == rest)
    {
        return Some(format!("blk.{layer}.{}", t.1));
    }
    let ours = experts_prefixes
        .iter()
        .find_map(|p| rest.strip_prefix(p))
        .and_then(expert_name)?;
    Some(format!("blk.{layer}.{ours}.weight"))
}

/// A Gemma 3 layer's tensors after `model.layers.N.` (Hugging Face) → ours (llama.cpp's
/// names for `gemma3`): four norms per block, and the per-head query and key norms.
const GEMMA_LAYER_NAMES: [(&str, &str); 13] = [
    ("input_layernorm.weight", "attn_norm"),
    ("post_attention_layernorm.weight", "post_attention_norm"),
    ("pre_feedforward_layernorm.weight", "ffn_norm"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm"),
    ("self_attn.q_norm.weight", "attn_q_norm"),
    ("self_attn.k_norm.weight", "attn_k_norm"),
    ("self_attn.q_proj.weight", "attn_q"),
    ("self_attn.k_proj.weight", "attn_k"),
    ("self_attn.v_proj.weight", "attn_v"),
    ("self_attn.o_proj.weight", "attn_output"),
    ("mlp.gate_proj.weight", "ffn_gate"),
    ("mlp.up_proj.weight", "ffn_up"),
    ("mlp.down_proj.weight", "ffn_down"),
];

/// Gemma 3's Hugging Face names → GGUF's.
fn gemma_name(name: &str) -> Option<String> {
    if let Some(t) = TOP_NAMES.iter().find(|t| t.0 == name) {
        return Some(t.2.into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let ours = GEMMA_LAYER_NAMES.iter().find(|t| t.0 == rest)?.1;
    Some(format!("blk.{layer}.{ours}.weight"))
}

/// Tensors after `model.layers.N.` that only some Hugging Face architectures have (Qwen3-MoE's
/// router, Qwen2's q/k/v biases, Qwen3's per-head QK-norms, DeepSeek's latent attention,
/// router bias and shared experts) → ours after `blk.N.` (llama.cpp's names, with their
/// suffix).
const HF_EXTRA_LAYER_NAMES: [(&str, &str); 18] = [
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    // Experts stacked in one tensor each (transformers 5's Mistral 4: [experts, 2·width,
    // hidden] with gate rows first, and [experts, hidden, width]).
    ("mlp.experts.gate_up_proj", "ffn_gate_up_exps.weight"),
    ("mlp.experts.down_proj", "ffn_down_exps.weight"),
    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    (
        "mlp.shared_experts.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_experts.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    (
        "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
    ),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn_kv_b.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
];

/// `model.layers.N.<rest>` → `blk.N.<ours>`; `None` for tensors the model does not use.
fn hf_name(name: &str) -> Option<String> {
    rename(DirLayout::HuggingFace, name)
}

/// Mistral 3's image-text checkpoints (`Mistral3ForConditionalGeneration`): the language
/// model's tensors under `model.language_model.` (transformers 5; `language_model.model.` and
/// `language_model.lm_head.` before) → GGUF's; the vision tower and projector → `None`.
fn mistral3_vlm_name(name: &str) -> Option<String> {
    if name == "lm_head.weight" {
        return hf_name(name);
    }
    let text = match name.strip_prefix("model.language_model.") {
        Some(rest) => format!("model.{rest}"),
        None => name.strip_prefix("language_model.")?.to_owned(),
    };
    hf_name(&text)
}

/// Mistral's names (`layers.N.attention.wq.weight`, ...) → GGUF's.
fn mistral_name(name: &str) -> Option<String> {
    rename(DirLayout::Mistral, name)
}

/// `E.w1.weight` → `ffn_gate.E` (w1 gate, w3 up, w2 down, in Mixtral's and Mistral's naming;
/// `gate_proj`, `up_proj`, `down_proj` in Qwen3-MoE's).
fn expert_name(rest: &str) -> Option<String> {
    let (e, w) = rest.split_once('.')?;
    let e: usize = e.parse().ok()?;
    let which = match w {
        "w1.weight" | "gate_proj.weight" => "ffn_gate",
        "w3.weight" | "up_proj.weight" => "ffn_up",
        "w2.weight" | "down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("{which}.{e}"))
}

/// A JSON object's fields, typed.
struct Fields<'a>(&'a Value);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| ModelError::BadConfig(format!("{key} = {v} is not a count"))),
        }
    }

    fn need(&self, key: &str) -> Result<usize, ModelError> {
        self.usize(key)?
            .ok_or_else(|| ModelError::BadConfig(format!("{key} is missing")))
    }

    fn f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| ModelError::BadConfig(format!("{key} = {v} is not a number"))),
        }
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }

    fn bool(&self, key: &str) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(false)
    }
}

/// The RoPE scaling of a Hugging Face configuration, as transformers'
/// `modeling_rope_utils.py` computes it from `params` (`rope_parameters`, or the older
/// `rope_scaling`; `prefix` names it in errors): `default`, `linear` (`factor`), `llama3`
/// (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`;
/// turned into per-pair divisors here) and `yarn` (`factor`, or
/// `max_position_embeddings / original_max_position_embeddings` without one;
/// `beta_fast`/`beta_slow`, 32 / 1 when absent or 0; `attention_factor`, else
/// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are given, else
/// `mscale(factor, 1)`). `original_max_position_embeddings` defaults to the model's own
/// (a top-level one wins, as for Phi-3).
fn hf_rope_scaling(
    top: &Fields<'_>,
    params: &Fields<'_>,
    prefix: &str,
    base: f32,
    rope_dim: usize,
) -> Result<RopeScaling, ModelError> {
    let (type_key, kind) = match (params.str("rope_type"), params.str("type")) {
        (Some(t), _) => (format!("{prefix}.rope_type"), t),
        (None, Some(t)) => (format!("{prefix}.type"), t),
        (None, None) => return Ok(RopeScaling::None),
    };
    let key = |k: &str| format!("{prefix}.{k}");
    let need = |k: &str| -> Result<f32, ModelError> {
        let v = params
            .f32(k)?
            .ok_or_else(|| ModelError::BadConfig(format!("{} is missing", key(k))))?;
        positive(&key(k), v)
    };
    let max_pos = top.need("max_position_embeddings")?;
    let original = match (
        top.usize("original_max_position_embeddings")?,
        params.usize("original_max_position_embeddings")?,
    ) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => max_pos,
    };
    if original == 0 {
        return Err(ModelError::BadConfig(format!(
            "{} is 0",
            key("original_max_position_embeddings")
        )));
    }
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => {
            let factor = need("factor")?;
            if factor == 1.0 {
                RopeScaling::None
            } else {
                RopeScaling::Linear { factor }
            }
        }
        "llama3" => {
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if low == high {
                return Err(ModelError::BadConfig(format!(
                    "{} equals {}",
                    key("low_freq_factor"),
                    key("high_freq_factor")
                )));
            }
            RopeScaling::FreqFactors(llama3_divisors(
                base,
                rope_dim,
                need("factor")?,
                low,
                high,
                original as f32,
            ))
        }
        "yarn" => {
            if params.get("truncate").and_then(Value::as_bool) == Some(false) {
                return Err(ModelError::UnsupportedRopeScaling {
                    key: key("truncate"),
                    value: "false".into(),
                });
            }
            let factor = match params.f32("factor")? {
                Some(f) => positive(&key("factor"), f)?,
                None => max_pos as f32 / original as f32,
            };
            let beta = |k: &str, default: f32| -> Result<f32, ModelError> {
                match params.f32(k)? {
                    None | Some(0.0) => Ok(default),
                    Some(v) => positive(&key(k), v),
                }
            };
            let attention_factor = match params.f32("attention_factor")? {
                Some(a) => positive(&key("attention_factor"), a)?,
                None => match (params.f32("mscale")?, params.f32("mscale_all_dim")?) {
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => positive(
                        &key("mscale_all_dim"),
                        yarn_mscale(factor, m) / yarn_mscale(factor, all),
                    )?,
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            RopeScaling::Yarn {
                factor,
                original_context: original,
                beta_fast: beta("beta_fast", YARN_BETA_FAST)?,
                beta_slow: beta("beta_slow", YARN_BETA_SLOW)?,
                attention_factor,
            }
        }
        other => {
            return Err(ModelError::UnsupportedRopeScaling {
                key: type_key,
                value: other.to_owned(),
            });
        }
    })
}

/// True when every tensor of the table is f32: such a model computes, and caches keys and
/// values, in f32.
fn all_f32(tensors: &Tensors) -> bool {
    tensors
        .index
        .values()
        .all(|t| matches!(t.ty, Ok(WeightType::F32)))
}

/// The hyperparameters of a Hugging Face `config.json`.
fn hf_config(json: &Value, tensors: &Tensors) -> Result<LlamaConfig, ModelError> {
    let outer = hf_architecture(json)
        .ok_or_else(|| ModelError::BadConfig("architectures is missing".into()))?;
    if outer == "Gemma3ForCausalLM" {
        return gemma3_config(json, tensors);
    }
    if matches!(outer, "DeepseekV3ForCausalLM" | "Mistral4ForCausalLM") {
        return deepseek_config(json, tensors, outer);
    }
    // An image-text Mistral 3 checkpoint runs its language model: `text_config`, a
    // Ministral 3 (YaRN and the Llama 4 temperature) or a Mistral (Mistral Small 3.1/3.2,
    // Magistral Small: the plain graph).
    let (json, arch) = if outer == "Mistral3ForConditionalGeneration" {
        let text = json
            .get("text_config")
            .ok_or_else(|| ModelError::BadConfig("text_config is missing".into()))?;
        let arch = match text.get("model_type").and_then(Value::as_str) {
            Some("ministral3") => "Ministral3ForCausalLM",
            // Mistral Small 4: DeepSeek-V3's design with Llama 4's temperature.
            Some("mistral4") => {
                let config = deepseek_config(text, tensors, "Mistral4ForCausalLM")?;
                return Ok(LlamaConfig {
                    architecture: outer.to_owned(),
                    ..config
                });
            }
            Some("mistral") | None => "MistralForCausalLM",
            Some(other) => {
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "{outer} with text_config.model_type {other:?}"
                )));
            }
        };
        (text, arch)
    } else {
        (json, outer)
    };
    let f = Fields(json);
    if !matches!(
        arch,
        "LlamaForCausalLM"
            | "MistralForCausalLM"
            | "Ministral3ForCausalLM"
            | "MixtralForCausalLM"
            | "Qwen2ForCausalLM"
            | "Qwen3ForCausalLM"
            | "Qwen3MoeForCausalLM"
    ) {
        return Err(ModelError::UnsupportedArchitecture(arch.to_owned()));
    }
    // Qwen2 always has q/k/v biases (transformers builds them whatever the config says);
    // Qwen3 normalises each query and key head (QK-norm). Neither windows attention unless
    // `use_sliding_window` says so, which is refused below.
    let (qwen2, qwen3) = (arch == "Qwen2ForCausalLM", arch.starts_with("Qwen3"));
    if (qwen2 || qwen3) && f.bool("use_sliding_window") {
        return Err(ModelError::BadConfig(
            "use_sliding_window (windowed attention in the later layers) is not supported".into(),
        ));
    }
    if let Some(act) = f.str("hidden_act")
        && act != "silu"
    {
        return Err(ModelError::BadConfig(format!(
            "hidden_act {act:?} (only silu is supported)"
        )));
    }
    for bias in ["attention_bias", "mlp_bias"] {
        if f.bool(bias) {
            return Err(ModelError::BadConfig(format!("{bias} is not supported")));
        }
    }
    // transformers 5 nests RoPE settings under rope_parameters; earlier versions wrote
    // rope_theta and rope_scaling at the top level.
    let rope = f.get("rope_parameters").map(Fields);
    let rope_theta = match rope.as_ref().map(|r| r.f32("rope_theta")).transpose()? {
        Some(Some(t)) => t,
        _ => f.f32("rope_theta")?.unwrap_or(10_000.0),
    };
    let d_model = f.need("hidden_size")?;
    let n_heads = f.need("num_attention_heads")?;
    if n_heads == 0 || d_model % n_heads != 0 && f.usize("head_dim")?.is_none() {
        return Err(ModelError::BadConfig(format!(
            "hidden_size {d_model} is not a multiple of num_attention_heads {n_heads}"
        )));
    }
    let head_dim = f.usize("head_dim")?.unwrap_or(d_model / n_heads.max(1));
    let rope_scaling = match (rope, f.get("rope_scaling")) {
        (Some(r), _) => hf_rope_scaling(&f, &r, "rope_parameters", rope_theta, head_dim)?,
        (None, Some(s)) => hf_rope_scaling(&f, &Fields(s), "rope_scaling", rope_theta, head_dim)?,
        (None, None) => RopeScaling::None,
    };
    // Ministral 3: queries scaled by Llama 4's temperature, its length the original context.
    let attn_temperature = match f.get("rope_parameters").or_else(|| f.get("rope_scaling")) {
        Some(p) if arch == "Ministral3ForCausalLM" => llama4_temperature(&Fields(p))?,
        _ => None,
    };
    let (n_experts, n_experts_used) = match arch {
        "MixtralForCausalLM" => (f.need("num_local_experts")?, f.need("num_experts_per_tok")?),
        // Released configs say num_experts; transformers 5 writes num_local_experts.
        "Qwen3MoeForCausalLM" => (
            match f.usize("num_experts")? {
                Some(n) => n,
                None => f.need("num_local_experts")?,
            },
            f.need("num_experts_per_tok")?,
        ),
        _ => (0, 0),
    };
    // Qwen3-MoE: every layer a mixture of experts of `moe_intermediate_size`, routing weights
    // renormalised over the chosen experts when `norm_topk_prob` (the released models).
    let qwen3moe = arch == "Qwen3MoeForCausalLM";
    if qwen3moe {
        if f.usize("decoder_sparse_step")?.is_some_and(|s| s != 1) {
            return Err(ModelError::BadConfig(
                "decoder_sparse_step other than 1 (dense layers between sparse ones) is not supported"
                    .into(),
            ));
        }
        if f.get("mlp_only_layers")
            .and_then(Value::as_array)
            .is_some_and(|l| !l.is_empty())
        {
            return Err(ModelError::BadConfig(
                "mlp_only_layers (dense layers among the sparse ones) is not supported".into(),
            ));
        }
    }
    let ffn_dim = if qwen3moe {
        f.need("moe_intermediate_size")?
    } else {
        f.need("intermediate_size")?
    };
    LlamaConfig {
        architecture: outer.to_owned(),
        n_layers: f.need("num_hidden_layers")?,
        d_model,
        n_heads,
        n_kv_heads: f.usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        ffn_dim,
        vocab_size: f.need("vocab_size")?,
        context_length: f.need("max_position_embeddings")?,
        rope_freq_base: rope_theta,
        rope_dim: head_dim,
        rms_eps: f.f32("rms_norm_eps")?.unwrap_or(1e-6),
        rope_scaling,
        rope_style: RopeStyle::NeoX,
        sliding_window: if arch == "LlamaForCausalLM" || qwen2 || qwen3 {
            None
        } else {
            f.usize("sliding_window")?.filter(|&w| w > 0)
        },
        n_experts,
        n_experts_used,
        moe_renormalize: !qwen3moe || f.bool("norm_topk_prob"),
        kv_f32: all_f32(tensors),
        window_layers: None,
        rope_freq_base_swa: None,
        activation: Activation::Silu,
        embedding_scale: 1.0,
        qk_norm: qwen3,
        attn_bias: qwen2,
        attn_temperature,
        post_norms: false,
        norm_weight_offset: 0.0,
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        mla: None,
        experts: None,
    }
    .checked()
}

/// The hyperparameters of a DeepSeek-V3 `config.json` (`DeepseekV3ForCausalLM`), as
/// transformers' `DeepseekV3Config` reads them: latent attention (`q_lora_rank` — null for a
/// plain `q_proj` — `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`),
/// `rope_interleave` (adjacent pairs, the default; halves when false), experts after
/// `first_k_dense_replace` dense layers (`n_routed_experts` of `moe_intermediate_size`,
/// `num_experts_per_tok`, `n_group`/`topk_group`, `n_shared_experts`, `routed_scaling_factor`,
/// `norm_topk_prob`; sigmoid scores unless `scoring_func` says softmax), and YaRN with the
/// score scale times `mscale(factor, mscale_all_dim)²` (`yarn_apply_mscale`). Mistral 4
/// (`Mistral4ForCausalLM`, Mistral Small 4) is the same with softmax scores, no selection
/// bias, and Llama 4's attention temperature (`rope_parameters.llama_4_scaling_beta` over
/// `original_max_position_embeddings`).
fn deepseek_config(json: &Value, tensors: &Tensors, arch: &str) -> Result<LlamaConfig, ModelError> {
    let mistral4 = arch == "Mistral4ForCausalLM";
    let f = Fields(json);
    if let Some(act) = f.str("hidden_act")
        && act != "silu"
    {
        return Err(ModelError::BadConfig(format!(
            "hidden_act {act:?} (only silu is supported)"
        )));
    }
    if f.bool("attention_bias") {
        return Err(ModelError::BadConfig(
            "attention_bias is not supported".into(),
        ));
    }
    let rope_dim = f.need("qk_rope_head_dim")?;
    let kv_lora_rank = f.need("kv_lora_rank")?;
    let qk_nope_dim = f.need("qk_nope_head_dim")?;
    let rope = f
        .get("rope_parameters")
        .or_else(|| f.get("rope_scaling"))
        .map(Fields);
    let rope_theta = match rope.as_ref().map(|r| r.f32("rope_theta")).transpose()? {
        Some(Some(t)) => t,
        _ => f.f32("rope_theta")?.unwrap_or(10_000.0),
    };
    let prefix = if f.get("rope_parameters").is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let rope_scaling = match &rope {
        Some(r) => hf_rope_scaling(&f, r, prefix, rope_theta, rope_dim)?,
        None => RopeScaling::None,
    };
    let mut scale = 1.0 / ((qk_nope_dim + rope_dim) as f32).sqrt();
    if let (RopeScaling::Yarn { factor, .. }, Some(r)) = (&rope_scaling, &rope)
        && let Some(all) = r.f32("mscale_all_dim")?.filter(|&m| m != 0.0)
    {
        let m = yarn_mscale(*factor, all);
        scale *= m * m;
    }
    let n_experts = f.need("n_routed_experts")?;
    let gating = match f.str("scoring_func") {
        None if mistral4 => crate::Gating::Softmax,
        None | Some("sigmoid") => crate::Gating::Sigmoid,
        Some("softmax") => crate::Gating::Softmax,
        Some(other) => {
            return Err(ModelError::BadConfig(format!(
                "scoring_func {other:?} (sigmoid and softmax are supported)"
            )));
        }
    };
    let n_groups = f.usize("n_group")?.unwrap_or(1).max(1);
    let design = crate::ExpertDesign {
        gating,
        n_groups,
        groups_used: f.usize("topk_group")?.unwrap_or(n_groups),
        weights_scale: f.f32("routed_scaling_factor")?.unwrap_or(1.0),
        n_shared: f.usize("n_shared_experts")?.unwrap_or(0),
        leading_dense: f.usize("first_k_dense_replace")?.unwrap_or(0),
        expert_ffn_dim: f.need("moe_intermediate_size")?,
    };
    let interleaved = f
        .get("rope_interleave")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    LlamaConfig {
        n_layers: f.need("num_hidden_layers")?,
        d_model: f.need("hidden_size")?,
        n_heads: f.need("num_attention_heads")?,
        n_kv_heads: 1,
        head_dim: kv_lora_rank + rope_dim,
        ffn_dim: f.need("intermediate_size")?,
        vocab_size: f.need("vocab_size")?,
        context_length: f.need("max_position_embeddings")?,
        rope_freq_base: rope_theta,
        rope_dim,
        rms_eps: f.f32("rms_norm_eps")?.unwrap_or(1e-6),
        rope_scaling,
        rope_style: if interleaved {
            RopeStyle::Normal
        } else {
            RopeStyle::NeoX
        },
        n_experts,
        n_experts_used: f.need("num_experts_per_tok")?,
        moe_renormalize: f
            .get("norm_topk_prob")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        kv_f32: all_f32(tensors),
        attention_scale: scale,
        mla: Some(crate::Mla {
            q_lora_rank: f.usize("q_lora_rank")?,
            kv_lora_rank,
            qk_nope_dim,
            v_head_dim: f.need("v_head_dim")?,
        }),
        experts: Some(design),
        attn_temperature: match &rope {
            Some(r) if mistral4 => llama4_temperature(r)?,
            _ => None,
        },
        ..LlamaConfig::base(arch)
    }
    .checked()
}

/// The hyperparameters of a Gemma 3 text model's `config.json` (`Gemma3ForCausalLM`,
/// `model_type` `gemma3_text`), as transformers' `Gemma3TextConfig` reads them: which layers
/// are windowed from `layer_types` (or every `sliding_window_pattern`-th layer global), the
/// RoPE bases of global and windowed layers (`rope_parameters.full_attention` /
/// `.sliding_attention`, or `rope_theta` / `rope_local_base_freq`), and
/// `query_pre_attn_scalar`. Norm weights scale by `1 + w`.
fn gemma3_config(json: &Value, tensors: &Tensors) -> Result<LlamaConfig, ModelError> {
    let f = Fields(json);
    let act = f
        .str("hidden_activation")
        .or_else(|| f.str("hidden_act"))
        .unwrap_or("gelu_pytorch_tanh");
    if act != "gelu_pytorch_tanh" {
        return Err(ModelError::BadConfig(format!(
            "hidden_activation {act:?} (only gelu_pytorch_tanh is supported)"
        )));
    }
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if f.get(key).is_some() {
            return Err(ModelError::BadConfig(format!(
                "{key} (logit soft-capping) is not supported"
            )));
        }
    }
    for key in ["attention_bias", "use_bidirectional_attention"] {
        if f.bool(key) {
            return Err(ModelError::BadConfig(format!("{key} is not supported")));
        }
    }
    let n_layers = f.need("num_hidden_layers")?;
    let d_model = f.need("hidden_size")?;
    let n_heads = f.need("num_attention_heads")?;
    let head_dim = match f.usize("head_dim")? {
        Some(h) => h,
        None if n_heads > 0 && d_model % n_heads == 0 => d_model / n_heads,
        None => {
            return Err(ModelError::BadConfig(format!(
                "hidden_size {d_model} is not a multiple of num_attention_heads {n_heads}"
            )));
        }
    };
    let window_layers = match f.get("layer_types") {
        Some(types) => {
            let types = types.as_array().ok_or_else(|| {
                ModelError::BadConfig(format!("layer_types = {types} is not a list"))
            })?;
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(ModelError::BadConfig(format!(
                        "layer_types entry {t} is neither \"sliding_attention\" nor \"full_attention\""
                    ))),
                })
                .collect::<Result<Vec<bool>, _>>()?
        }
        None => {
            let pattern = match f.usize("sliding_window_pattern")? {
                Some(p) => p,
                None => f
                    .usize("_sliding_window_pattern")?
                    .unwrap_or(GEMMA3_PATTERN),
            };
            if pattern == 0 {
                return Err(ModelError::BadConfig("sliding_window_pattern is 0".into()));
            }
            gemma3_window_layers(n_layers, pattern)
        }
    };
    let sliding_window = f.need("sliding_window")?;
    // transformers 5: rope_parameters per layer type; earlier: rope_theta and
    // rope_local_base_freq (and rope_scaling, for the global layers).
    // Scaling applies to the global layers only (Gemma 3 4B and larger: linear, factor 8).
    let (global_base, local_base, rope_scaling) = match f.get("rope_parameters") {
        Some(rp) if rp.get("full_attention").is_some() || rp.get("sliding_attention").is_some() => {
            let params = |kind: &str, default: f32| -> Result<(f32, RopeScaling), ModelError> {
                let Some(p) = rp.get(kind) else {
                    return Ok((default, RopeScaling::None));
                };
                let p = Fields(p);
                let base = p.f32("rope_theta")?.unwrap_or(default);
                let prefix = format!("rope_parameters.{kind}");
                Ok((base, hf_rope_scaling(&f, &p, &prefix, base, head_dim)?))
            };
            let (global, scaling) = params("full_attention", 1_000_000.0)?;
            let (local, local_scaling) = params("sliding_attention", GEMMA3_LOCAL_ROPE_BASE)?;
            if local_scaling != RopeScaling::None {
                return Err(ModelError::UnsupportedRopeScaling {
                    key: "rope_parameters.sliding_attention.rope_type".into(),
                    value: local_scaling.name().into(),
                });
            }
            (global, local, scaling)
        }
        _ => {
            let global = f.f32("rope_theta")?.unwrap_or(1_000_000.0);
            let scaling = match f.get("rope_scaling") {
                Some(s) => hf_rope_scaling(&f, &Fields(s), "rope_scaling", global, head_dim)?,
                None => RopeScaling::None,
            };
            (
                global,
                f.f32("rope_local_base_freq")?
                    .unwrap_or(GEMMA3_LOCAL_ROPE_BASE),
                scaling,
            )
        }
    };
    let query_pre_attn_scalar = f.f32("query_pre_attn_scalar")?.unwrap_or(head_dim as f32);
    if !(query_pre_attn_scalar.is_finite() && query_pre_attn_scalar > 0.0) {
        return Err(ModelError::BadConfig(format!(
            "query_pre_attn_scalar {query_pre_attn_scalar} must be positive"
        )));
    }
    LlamaConfig {
        architecture: "Gemma3ForCausalLM".to_owned(),
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: f.usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        ffn_dim: f.need("intermediate_size")?,
        vocab_size: f.need("vocab_size")?,
        context_length: f.need("max_position_embeddings")?,
        rope_freq_base: global_base,
        rope_dim: head_dim,
        rms_eps: f.f32("rms_norm_eps")?.unwrap_or(1e-6),
        rope_scaling,
        rope_style: RopeStyle::NeoX,
        sliding_window: (sliding_window > 0).then_some(sliding_window),
        n_experts: 0,
        n_experts_used: 0,
        moe_renormalize: true,
        kv_f32: all_f32(tensors),
        window_layers: Some(window_layers),
        rope_freq_base_swa: Some(local_base),
        activation: Activation::GeluTanh,
        embedding_scale: (d_model as f32).sqrt(),
        qk_norm: true,
        attn_bias: false,
        attn_temperature: None,
        post_norms: true,
        norm_weight_offset: 1.0,
        attention_scale: 1.0 / query_pre_attn_scalar.sqrt(),
        mla: None,
        experts: None,
    }
    .checked()
}

/// The hyperparameters of a Mistral `params.json`.
fn mistral_config(json: &Value, tensors: &Tensors) -> Result<LlamaConfig, ModelError> {
    let f = Fields(json);
    if f.get("quantization").is_some() {
        return Err(ModelError::BadConfig(
            "quantized Mistral checkpoints are not supported".into(),
        ));
    }
    let d_model = f.need("dim")?;
    let n_heads = f.need("n_heads")?;
    let head_dim = match f.usize("head_dim")? {
        Some(h) => h,
        None if n_heads > 0 && d_model % n_heads == 0 => d_model / n_heads,
        None => {
            return Err(ModelError::BadConfig(format!(
                "dim {d_model} is not a multiple of n_heads {n_heads}"
            )));
        }
    };
    let (n_experts, n_experts_used) = match f.get("moe") {
        Some(moe) => {
            let m = Fields(moe);
            (m.need("num_experts")?, m.need("num_experts_per_tok")?)
        }
        None => (0, 0),
    };
    let vocab_size = f.need("vocab_size")?;
    // Ministral 3 and later: `yarn` ({factor, beta: fast, alpha: slow,
    // original_max_position_embeddings, apply_scale: whether YaRN's magnitude correction
    // applies}) and `llama_4_scaling` ({beta, original_max_position_embeddings}).
    let rope_scaling = match f.get("yarn") {
        Some(y) => {
            let y = Fields(y);
            let need = |k: &str| -> Result<f32, ModelError> {
                let v = y
                    .f32(k)?
                    .ok_or_else(|| ModelError::BadConfig(format!("yarn.{k} is missing")))?;
                positive(&format!("yarn.{k}"), v)
            };
            let factor = need("factor")?;
            let original_context = y.need("original_max_position_embeddings")?;
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast: y
                    .f32("beta")?
                    .map_or(Ok(YARN_BETA_FAST), |v| positive("yarn.beta", v))?,
                beta_slow: y
                    .f32("alpha")?
                    .map_or(Ok(YARN_BETA_SLOW), |v| positive("yarn.alpha", v))?,
                attention_factor: if y.bool("apply_scale") {
                    yarn_mscale(factor, 1.0)
                } else {
                    1.0
                },
            }
        }
        None => RopeScaling::None,
    };
    let attn_temperature = match f.get("llama_4_scaling") {
        Some(t) => {
            let t = Fields(t);
            let beta = t
                .f32("beta")?
                .ok_or_else(|| ModelError::BadConfig("llama_4_scaling.beta is missing".into()))?;
            Some(crate::config::AttnTemperature::new(
                beta,
                t.need("original_max_position_embeddings")?,
                "llama_4_scaling.beta",
                "llama_4_scaling.original_max_position_embeddings",
            )?)
        }
        None => None,
    };
    if f.get("vision_encoder").is_some() {
        tracing::info!(
            "params.json names a vision encoder: it is skipped (image input is not supported)"
        );
    }
    LlamaConfig {
        architecture: if n_experts > 0 { "mixtral" } else { "mistral" }.to_owned(),
        n_layers: f.need("n_layers")?,
        d_model,
        n_heads,
        n_kv_heads: f.usize("n_kv_heads")?.unwrap_or(n_heads),
        head_dim,
        ffn_dim: f.need("hidden_dim")?,
        vocab_size,
        context_length: match f.usize("max_seq_len")? {
            Some(n) => n,
            None => f
                .usize("max_position_embeddings")?
                .unwrap_or(MISTRAL_DEFAULT_CONTEXT),
        },
        rope_freq_base: f.f32("rope_theta")?.unwrap_or(10_000.0),
        rope_dim: head_dim,
        rope_scaling,
        rms_eps: f.f32("norm_eps")?.unwrap_or(1e-5),
        rope_style: RopeStyle::Normal,
        sliding_window: f.usize("sliding_window")?.filter(|&w| w > 0),
        n_experts,
        n_experts_used,
        moe_renormalize: true,
        kv_f32: all_f32(tensors),
        window_layers: None,
        rope_freq_base_swa: None,
        activation: Activation::Silu,
        embedding_scale: 1.0,
        qk_norm: false,
        attn_bias: false,
        attn_temperature,
        post_norms: false,
        norm_weight_offset: 0.0,
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        mla: None,
        experts: None,
    }
    .checked()
}

/// Counts of tensors and elements per storage type, for descriptions.
pub(crate) fn type_counts(tensors: &Tensors) -> BTreeMap<String, (usize, u64)> {
    let mut out: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in tensors.index.values() {
        let name = match &t.ty {
            Ok(ty) => format!("{ty:?}"),
            Err(name) => name.clone(),
        };
        let e = out.entry(name).or_default();
        e.0 += 1;
        e.1 += t.dims.iter().product::<u64>();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_map_to_gguf_names() {
        // (layout's renaming, its name, ours; `None`: a tensor the model does not use).
        let (hf, mistral): (RenameFn, RenameFn) = (hf_name, mistral_name);
        #[rustfmt::skip] // one case a line
        let cases = [
            (hf, "model.embed_tokens.weight", Some("token_embd.weight")),
            (hf, "lm_head.weight", Some("output.weight")),
            (hf, "model.layers.3.self_attn.k_proj.weight", Some("blk.3.attn_k.weight")),
            (hf, "model.layers.0.block_sparse_moe.experts.7.w2.weight", Some("blk.0.ffn_down.7.weight")),
            (hf, "model.layers.1.block_sparse_moe.gate.weight", Some("blk.1.ffn_gate_inp.weight")),
            (hf, "model.layers.x.mlp.up_proj.weight", None),
            (hf, "model.rotary_emb.inv_freq", None),
            (hf, "model.layers.4.self_attn.v_proj.bias", Some("blk.4.attn_v.bias")),
            (hf, "model.layers.0.self_attn.q_norm.weight", Some("blk.0.attn_q_norm.weight")),
            (hf, "model.layers.0.self_attn.o_proj.bias", None),
            (hf, "model.layers.1.mlp.gate.weight", Some("blk.1.ffn_gate_inp.weight")),
            (hf, "model.layers.1.mlp.experts.3.up_proj.weight", Some("blk.1.ffn_up.3.weight")),
            (hf, "model.layers.1.mlp.experts.3.w9.weight", None),
            (gemma_name, "model.layers.2.pre_feedforward_layernorm.weight", Some("blk.2.ffn_norm.weight")),
            (gemma_name, "model.layers.0.post_attention_layernorm.weight", Some("blk.0.post_attention_norm.weight")),
            (gemma_name, "model.layers.1.self_attn.k_norm.weight", Some("blk.1.attn_k_norm.weight")),
            (gemma_name, "model.norm.weight", Some("output_norm.weight")),
            (mistral, "tok_embeddings.weight", Some("token_embd.weight")),
            (mistral, "norm.weight", Some("output_norm.weight")),
            (mistral, "layers.2.attention.wo.weight", Some("blk.2.attn_output.weight")),
            (mistral, "layers.0.feed_forward.w3.weight", Some("blk.0.ffn_up.weight")),
            (mistral, "layers.1.feed_forward.experts.0.w1.weight", Some("blk.1.ffn_gate.0.weight")),
            (mistral, "layers.1.feed_forward.experts.0.w4.weight", None),
            (mistral, "vision_encoder.patch_conv.weight", None),
        ];
        for (rename, name, ours) in cases {
            assert_eq!(rename(name).as_deref(), ours, "{name}");
        }
    }

    #[test]
    fn shard_names_must_stay_in_the_directory() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in ["", "..", "../x.safetensors", "/etc/passwd", "a\\b"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
