//! Llama, Mistral (with and without a sliding window) and Mixtral from safetensors, checked
//! against Hugging Face transformers.
//!
//! `tests/golden/tiny/` holds tiny random-weight models and transformers' float32 logits
//! (`logits.json`), written by `scripts/golden/transformers_tiny.py` (its header names the
//! transformers and torch versions). Every model: hidden 32, 2 layers, 4 query and 2 KV heads
//! of 8, MLP width 32, vocabulary 256, weights large enough (σ = 0.15) that logits are of
//! order 1 and every part of the model moves them.
//!
//! - F32 directories must match within 1e-4 (absolute) at every checked position: an f32
//!   model computes and caches keys and values in f32, so only float summation order differs.
//! - Mistral's layout (`*-consolidated`, converted by the script, with wq/wk rows reordered
//!   for adjacent-pair RoPE) must match the model it was converted from within the same 1e-4.
//! - BF16 and F16: the test stores the F32 weights as BF16 / F16 safetensors (round to nearest
//!   even, as torch does) and compares with transformers' float32 logits of the rounded
//!   weights, so only our rounding of activations differs (see `rounded_weights`).
//! - Q8_0 GGUF: see `q8_0_gguf`.
//! - RoPE scaling (`llama-rope-*`: linear, llama3, yarn): prompts of up to 48 tokens, past the
//!   original context, within the same 1e-4 from safetensors, and within the F32 GGUF bound
//!   (1e-2) from the GGUF files llama.cpp's converter would write; see `rope_scaling_*`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use souverain_model::{
    AttnTemperature, KvPool, LlamaModel, LoadedModel, Logits, ModelFormat, RopeScaling, RopeStyle,
    SeqChunk, ThreadPool, TokenizerSource,
};

const F32_TOL: f32 = 1e-4;

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/tiny")
        .join(name)
}

struct Golden {
    prompts: Vec<Vec<u32>>,
    /// Per prompt, rows of logits: every position of prompt 0, the last of the others.
    logits: Vec<Vec<Vec<f32>>>,
    json: Value,
}

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(tiny(name).join("logits.json")).expect("logits.json");
    let json: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["generator"], "scripts/golden/transformers_tiny.py");
    let prompts = serde_json::from_value(json["prompts"].clone()).expect("prompts");
    let logits = serde_json::from_value(json["logits"].clone()).expect("logits");
    Golden {
        prompts,
        logits,
        json,
    }
}

fn open(path: &Path) -> LoadedModel {
    LoadedModel::open(path, &mut |_, _| {}).expect("open model directory")
}

/// Our logits in the golden's shape: every position of prompt 0, the last of the others.
fn run(model: &LlamaModel, prompts: &[Vec<u32>], every_position: bool) -> Vec<Vec<Vec<f32>>> {
    let pool = ThreadPool::new(2);
    let vocab = model.config().vocab_size;
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut kv = model.new_kv_cache(64).expect("kv");
            let which = if i == 0 && every_position {
                Logits::All
            } else {
                Logits::Last
            };
            let out = model.forward(&pool, p, &mut kv, which).expect("forward");
            out.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
        })
        .collect()
}

/// Largest absolute difference, and its place, between two sets of logits of one shape.
fn max_diff(ours: &[Vec<Vec<f32>>], theirs: &[Vec<Vec<f32>>]) -> (f32, String) {
    assert_eq!(ours.len(), theirs.len());
    let mut worst = (0.0f32, String::new());
    for (p, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "prompt {p}: positions");
        for (r, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.len(), y.len(), "prompt {p} row {r}: vocabulary");
            for (t, (u, v)) in x.iter().zip(y).enumerate() {
                let d = (u - v).abs();
                assert!(d.is_finite(), "prompt {p} row {r} token {t}: {u} vs {v}");
                if d > worst.0 {
                    worst = (d, format!("prompt {p} row {r} token {t}: {u} vs {v}"));
                }
            }
        }
    }
    worst
}

fn check_f32(dir: &str, golden_of: &str) -> LoadedModel {
    let g = golden(golden_of);
    let m = open(&tiny(dir));
    assert!(
        m.model.config().kv_f32,
        "{dir}: an all-f32 model caches in f32"
    );
    let ours = run(&m.model, &g.prompts, true);
    let (d, at) = max_diff(&ours, &g.logits);
    eprintln!("{dir} vs transformers ({golden_of}): max |diff| {d:e} at {at}");
    assert!(d <= F32_TOL, "{dir}: max |diff| {d} > {F32_TOL} at {at}");

    // The same prompt in uneven chunks through one cache, and as one row of a batch beside
    // another sequence, gives the same logits.
    let pool = ThreadPool::new(2);
    let model = &m.model;
    let p0 = &g.prompts[0];
    let mut kv = model.new_kv_cache(64).expect("kv");
    let mut chunked = Vec::new();
    for range in [0..3, 3..4, 4..11, 11..p0.len()] {
        chunked.extend(
            model
                .forward(&pool, &p0[range], &mut kv, Logits::All)
                .expect("chunk"),
        );
    }
    let whole: Vec<f32> = ours[0].concat();
    assert_eq!(chunked.len(), whole.len());
    let d = chunked
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-5, "{dir}: chunked prompt differs by {d}");
    // Blocks of 4 positions, scattered: the short prompts' fixed tables, or for longer ones
    // every block of the pool handed out in reverse order.
    let (b0, b1) = (p0.len().div_ceil(4), g.prompts[1].len().div_ceil(4));
    let tables: [Vec<u32>; 2] = if b0 <= 4 && b1 <= 3 {
        [vec![7, 2, 9, 0], vec![3, 1, 15]]
    } else {
        let n = (b0 + b1) as u32;
        let all: Vec<u32> = (0..n).rev().collect();
        [all[..b0].to_vec(), all[b0..].to_vec()]
    };
    let n_blocks = tables.iter().flatten().max().map_or(0, |&m| m as usize + 1);
    let mut pool_kv = KvPool::new(model.config(), 4, n_blocks.max(16)).expect("pool");
    let chunks = [
        SeqChunk {
            tokens: p0,
            start_pos: 0,
            block_table: &tables[0],
            logits: Logits::All,
            window_table: &[],
        },
        SeqChunk {
            tokens: &g.prompts[1],
            start_pos: 0,
            block_table: &tables[1],
            logits: Logits::Last,
            window_table: &[],
        },
    ];
    let batch = model
        .forward_batch(&pool, &mut pool_kv, &chunks)
        .expect("batch");
    assert_eq!(batch[0], whole, "{dir}: batched prompt 0");
    assert_eq!(batch[1], ours[1][0], "{dir}: batched prompt 1");
    m
}

#[test]
fn llama_sharded_tied_matches_transformers() {
    let m = check_f32("llama", "llama");
    assert_eq!(m.format, ModelFormat::HuggingFace);
    let c = m.model.config();
    assert_eq!(c.architecture, "LlamaForCausalLM");
    assert_eq!(c.rope_style, RopeStyle::NeoX);
    assert_eq!((c.sliding_window, c.n_experts), (None, 0));
    assert!(matches!(m.tokenizer, TokenizerSource::Missing));
}

#[test]
fn mistral_matches_transformers() {
    let m = check_f32("mistral", "mistral");
    assert_eq!(m.model.config().sliding_window, Some(4096));
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    let m = check_f32("mistral-swa", "mistral-swa");
    assert_eq!(m.model.config().sliding_window, Some(5));
    // The window matters: the same weights without it (the `mistral` golden: same seed)
    // give different logits once a prompt is longer than the window.
    let with = golden("mistral-swa");
    let without = golden("mistral");
    let late = |g: &Golden| g.logits[0][10].clone();
    let d = late(&with)
        .iter()
        .zip(&late(&without))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d > 0.05, "sliding window changes nothing ({d})");
    let early = |g: &Golden| g.logits[0][4].clone();
    assert_eq!(
        early(&with),
        early(&without),
        "inside the window nothing changes"
    );
}

#[test]
fn mixtral_matches_transformers() {
    let m = check_f32("mixtral", "mixtral");
    let c = m.model.config();
    assert_eq!((c.n_experts, c.n_experts_used), (4, 2));
}

#[test]
fn mistral_layout_matches_the_model_it_was_converted_from() {
    for (dir, of) in [
        ("mistral-swa-consolidated", "mistral-swa"),
        ("mixtral-consolidated", "mixtral"),
        ("ministral3-consolidated", "ministral3"),
    ] {
        let m = check_f32(dir, of);
        assert_eq!(m.format, ModelFormat::Mistral);
        let c = m.model.config();
        assert_eq!(c.rope_style, RopeStyle::Normal);
        assert_eq!(c.sliding_window, (of == "mistral-swa").then_some(5));
        assert_eq!(c.n_experts, if of == "mixtral" { 4 } else { 0 });
        // Ministral 3's params.json: `yarn` (apply_scale false: no magnitude correction)
        // and `llama_4_scaling`.
        let ministral3 = of == "ministral3";
        assert_eq!(c.attn_temperature.is_some(), ministral3);
        assert_eq!(
            matches!(c.rope_scaling, RopeScaling::Yarn { attention_factor, .. } if attention_factor == 1.0),
            ministral3
        );
    }
}

// ---- BF16 / F16 ----------------------------------------------------------------------

/// The tensors of a safetensors model directory, as f32.
fn read_f32_tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.insert(name, (view.shape().to_vec(), data));
        }
    }
    out
}

/// Writes `tensors` as one safetensors file, each element encoded by `enc` into `dtype`.
fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    dtype: &str,
    enc: fn(f32) -> [u8; 2],
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in tensors {
        let start = data.len();
        for &v in values {
            data.extend_from_slice(&enc(v));
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("header");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(path, file).expect("write");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("souverain-hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A copy of the tiny model `name` (its `model.safetensors`) whose `config.json` `edit`
/// changed, in a directory of its own.
fn with_config(name: &str, tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = temp_dir(&format!("{name}-{tag}"));
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(tiny(name).join("config.json")).expect("config"))
            .expect("json");
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    std::fs::copy(
        tiny(name).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("copy");
    dir
}

/// BF16 and F16 weights. The kernels round activations to the weight's type before each
/// dot product (as ggml does), so these models differ from float32 arithmetic on the same
/// rounded weights by the rounding of every matrix input: relative 2^-9 per element for
/// bf16, 2^-12 for f16, amplified through two layers and the f16 KV cache. The bounds are
/// 0.05 (bf16) and 0.01 (f16) on logits of magnitude up to ~3: at most about 25 / 40 times
/// one unit of activation rounding on the largest logit, and measured at about a fifth of
/// that. A wrong dtype decoding (byte order, bf16 read as f16) moves logits by whole units.
#[test]
fn rounded_weights() {
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        fn(f32) -> [u8; 2],
        f32,
    );
    let cases: [Case; 8] = [
        // Six layers whose post-norms re-amplify each sub-layer's output: rounding the
        // weights to bf16 moves transformers' own logits by 0.097 here against 0.027 for the
        // two-layer llama (the golden file shows both), so the bound scales with it.
        (
            "gemma3",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.2,
        ),
        (
            "llama",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        (
            "qwen2",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        (
            "qwen3",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        // Latent attention and expert routing (BF16 moves transformers' own logits by
        // 0.03-0.055 here).
        (
            "deepseek3",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        (
            "deepseek3-lite",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        (
            "mistral4",
            "logits_bf16_weights",
            "BF16",
            |v| half::bf16::from_f32(v).to_le_bytes(),
            0.05,
        ),
        (
            "mistral",
            "logits_f16_weights",
            "F16",
            |v| half::f16::from_f32(v).to_le_bytes(),
            0.01,
        ),
    ];
    for (name, key, dtype, enc, tol) in cases {
        let g = golden(name);
        let expected: Vec<Vec<Vec<f32>>> =
            serde_json::from_value(g.json[key].clone()).expect("rounded logits");
        let dir = temp_dir(&format!("{name}-{dtype}"));
        std::fs::copy(tiny(name).join("config.json"), dir.join("config.json")).expect("cp");
        write_safetensors(
            &dir.join("model.safetensors"),
            &read_f32_tensors(&tiny(name)),
            dtype,
            enc,
        );
        let m = open(&dir);
        assert!(!m.model.config().kv_f32);
        assert_eq!(
            m.tensors.by_type.keys().collect::<Vec<_>>(),
            [&dtype.to_string()]
        );
        let ours = run(&m.model, &g.prompts, false);
        let (d, at) = max_diff(&ours, &expected);
        eprintln!("{name} {dtype} vs transformers: max |diff| {d:e} at {at}");
        assert!(d <= tol, "{name} {dtype}: max |diff| {d} > {tol} at {at}");
        // And the rounding is visible: the rounded-weight oracle is not the f32 one.
        let (d32, _) = max_diff(
            &expected,
            &g.logits
                .iter()
                .map(|p| vec![p[p.len() - 1].clone()])
                .collect::<Vec<_>>(),
        );
        assert!(d32 > 0.0, "{name}: rounding to {dtype} changed nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---- GGUF Q8_0 -----------------------------------------------------------------------

/// HF orders each head's q/k rows for rotate-half RoPE (row `j * d/2 + i` holds pair `i`,
/// half `j`); GGUF, like llama.cpp's converter, wants adjacent pairs (row `2i + j`).
fn to_interleaved(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * head_dim + j * half + i) * cols;
                let dst = (h * head_dim + 2 * i + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Quantises `values` (rows of `cols`) to Q8_0.
fn q8_0(values: &[f32], cols: usize) -> Vec<u8> {
    let row_bytes = cols / 32 * 34;
    let mut out = vec![0u8; values.len() / cols * row_bytes];
    for (src, dst) in values
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(row_bytes))
    {
        kernels::quantize_row(kernels::WeightType::Q8_0, src, dst).expect("quantize");
    }
    out
}

/// Converts a Hugging Face directory to a GGUF `llama` file as llama.cpp's converter does:
/// GGUF names, q/k rows reordered for adjacent-pair RoPE, the experts of each layer stacked
/// into 3-D tensors; matrices in Q8_0, norms in F32. Also returns the relative RMS error of
/// the Q8_0 weights.
fn to_gguf(name: &str, path: &Path, quantise: bool) -> f64 {
    use souverain_model::gguf::{GgmlType, GgufWriter, Value as V};
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny(name).join("config.json")).expect("config"),
    )
    .expect("json");
    let u = |k: &str| cfg[k].as_u64().expect(k) as u32;
    let (n_heads, n_kv, hd) = (
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
    );
    let t = read_f32_tensors(&tiny(name));
    let mut w = GgufWriter::new(3);
    w.add_kv("general.architecture", V::String("llama".into()));
    for (k, v) in [
        ("block_count", u("num_hidden_layers")),
        ("context_length", u("max_position_embeddings")),
        ("embedding_length", u("hidden_size")),
        ("feed_forward_length", u("intermediate_size")),
        ("attention.head_count", n_heads),
        ("attention.head_count_kv", n_kv),
        ("attention.key_length", hd),
        ("rope.dimension_count", hd),
    ] {
        w.add_kv(format!("llama.{k}"), V::U32(v));
    }
    w.add_kv(
        "llama.attention.layer_norm_rms_epsilon",
        V::F32(cfg["rms_norm_eps"].as_f64().expect("eps") as f32),
    );
    w.add_kv("llama.rope.freq_base", V::F32(10_000.0));
    if let Some(win) = cfg["sliding_window"].as_u64() {
        w.add_kv("llama.attention.sliding_window", V::U32(win as u32));
    }
    let n_experts = cfg["num_local_experts"].as_u64().unwrap_or(0) as usize;
    if n_experts > 0 {
        w.add_kv("llama.expert_count", V::U32(n_experts as u32));
        w.add_kv("llama.expert_used_count", V::U32(u("num_experts_per_tok")));
    }
    let (mut err2, mut sum2) = (0.0f64, 0.0f64);
    let mut add = |w: &mut GgufWriter, gname: String, shape: &[usize], values: Vec<f32>| {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if shape.len() == 1 || !quantise {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.add_tensor(gname, &dims, GgmlType::F32, bytes)
                .expect("f32");
        } else {
            let cols = shape[shape.len() - 1];
            let q = q8_0(&values, cols);
            let mut back = vec![0.0; cols];
            for (src, row) in values
                .chunks_exact(cols)
                .zip(q.chunks_exact(cols / 32 * 34))
            {
                kernels::dequantize_row(kernels::WeightType::Q8_0, row, &mut back)
                    .expect("dequantize");
                for (a, b) in src.iter().zip(&back) {
                    err2 += f64::from(a - b).powi(2);
                    sum2 += f64::from(*a).powi(2);
                }
            }
            w.add_tensor(gname, &dims, GgmlType::Q8_0, q).expect("q8_0");
        }
    };
    let get = |k: &str| t.get(k).unwrap_or_else(|| panic!("missing {k}")).clone();
    for (hf, g) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ] {
        if let Some((shape, v)) = t.get(hf) {
            add(&mut w, g.into(), shape, v.clone());
        }
    }
    for l in 0..u("num_hidden_layers") as usize {
        let p = format!("model.layers.{l}.");
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        for (hf, g) in [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("block_sparse_moe.gate", "ffn_gate_inp"),
        ] {
            if let Some((shape, v)) = t.get(&format!("{p}{hf}.weight")) {
                add(&mut w, b(g), shape, v.clone());
            }
        }
        for (hf, g, heads) in [("q_proj", "attn_q", n_heads), ("k_proj", "attn_k", n_kv)] {
            let (shape, v) = get(&format!("{p}self_attn.{hf}.weight"));
            let v = to_interleaved(&v, heads as usize, hd as usize, shape[1]);
            add(&mut w, b(g), &shape, v);
        }
        for (which, g) in [
            ("w1", "ffn_gate_exps"),
            ("w3", "ffn_up_exps"),
            ("w2", "ffn_down_exps"),
        ] {
            if n_experts == 0 {
                break;
            }
            let mut all = Vec::new();
            let mut shape = Vec::new();
            for e in 0..n_experts {
                let (s, v) = get(&format!("{p}block_sparse_moe.experts.{e}.{which}.weight"));
                shape = s;
                all.extend(v);
            }
            let stacked = [n_experts, shape[0], shape[1]];
            add(&mut w, b(g), &stacked, all);
        }
    }
    w.write(path).expect("write gguf");
    (err2 / sum2).sqrt()
}

/// The tiny models converted to GGUF Q8_0 (the GGUF path: adjacent-pair RoPE on reordered
/// rows, `llama.attention.sliding_window`, stacked 3-D experts, f16 KV cache, activations
/// quantised to Q8_0 before every product) against transformers' float32 logits.
///
/// Tolerance, derived rather than picked: Q8_0 stores each weight with a relative RMS error
/// `e` that the conversion measures (about 0.5% here; each block's step is its largest
/// magnitude / 127), and quantises activations the same way, so every matrix product carries
/// a relative error of order `2e`; through two blocks (each a sum of an attention and an MLP
/// branch) and the output head, that is about `6e` relative on each logit. We allow 4 times
/// that on the largest logit (`24 e · max|logit|`) for the largest deviation, and `6 e ·
/// mean|logit|` for the mean deviation. A wrong RoPE pairing or a mis-routed expert moves
/// logits by a large fraction of their size and fails both.
///
/// Routing is the one discontinuity: a token whose second and third experts nearly tie may
/// switch experts under any perturbation. The script picks the Mixtral seed so that no
/// prompt token's margin is below 10% of the RMS router logit (`router_min_margin`), ten
/// times Q8_0's perturbation of router logits; the test checks that this holds.
#[test]
fn q8_0_gguf() {
    for name in ["mistral-swa", "mixtral", "llama"] {
        let g = golden(name);
        if let Some(margin) = g.json["router_min_margin"].as_f64() {
            assert!(
                margin >= 0.1,
                "{name}: router margin {margin} is within Q8_0 noise"
            );
        }
        let dir = temp_dir(&format!("{name}-gguf"));
        let path = dir.join("model.gguf");
        let e = to_gguf(name, &path, true) as f32;
        let m = open(&path);
        assert_eq!(m.format, ModelFormat::Gguf);
        assert!(matches!(m.tokenizer, TokenizerSource::Gguf(_)));
        let c = m.model.config();
        assert_eq!(c.rope_style, RopeStyle::Normal);
        assert!(!c.kv_f32);
        let ours = run(&m.model, &g.prompts, true);
        let (d, at) = max_diff(&ours, &g.logits);
        let flat = |l: &[Vec<Vec<f32>>]| l.iter().flatten().flatten().copied().collect::<Vec<_>>();
        let (a, b) = (flat(&ours), flat(&g.logits));
        let mean_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        let max_logit = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mean_logit = b.iter().map(|v| v.abs()).sum::<f32>() / b.len() as f32;
        let (max_tol, mean_tol) = (24.0 * e * max_logit, 6.0 * e * mean_logit);
        eprintln!(
            "{name} Q8_0: weight rel. error {e:.4}; max |diff| {d:.4} (bound {max_tol:.4}) at \
             {at}; mean {mean_diff:.5} (bound {mean_tol:.5})"
        );
        assert!(
            d <= max_tol,
            "{name} Q8_0: max |diff| {d} > {max_tol} at {at}"
        );
        assert!(
            mean_diff <= mean_tol,
            "{name} Q8_0: mean {mean_diff} > {mean_tol}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Gemma 3 from its Hugging Face directory: GELU (tanh) MLP, `1 + w` norms before and after
/// both sub-layers, QK-norm, embeddings times sqrt(hidden), five layers with a window of 4
/// (shorter than the prompts) and RoPE base 1e4 to one global layer with 1e6, and
/// `query_pre_attn_scalar` 12 instead of head_dim 8: within the F32 bound of transformers.
#[test]
fn gemma3_matches_transformers() {
    let m = check_f32("gemma3", "gemma3");
    let c = m.model.config();
    assert_eq!(
        c.window_layers.as_deref(),
        Some(&[true, true, true, true, true, false][..])
    );
    assert_eq!(c.sliding_window, Some(4));
    assert_eq!(c.layer_attention(0).rope_freq_base, 10_000.0);
    assert_eq!(c.layer_attention(5).rope_freq_base, 1_000_000.0);
    assert_eq!(c.layer_attention(5).window, None);
    assert!((c.attention_scale - 12f32.sqrt().recip()).abs() < 1e-7);
}

/// The same weights as llama.cpp's converter writes a `gemma3` GGUF (`gemma3.gguf`, written
/// by the golden script with the `gguf` package: llama.cpp's tensor and key names, the norms'
/// 1 folded in). llama.cpp reads such a file with every sixth layer global and queries scaled
/// by 1/sqrt(head_dim); the oracle is transformers on the same weights with that scale
/// (`logits_gguf_reading`). Only the f16 KV cache and ggml's f16 GELU table separate us from
/// it. This six-layer model is about 3.6 times as sensitive to rounding as the two-layer ones
/// (see `rounded_weights`), so the F32 GGUF bound below (1e-2) becomes 4e-2.
#[test]
fn gemma3_gguf_as_llama_cpp_writes_it() {
    let g = golden("gemma3");
    let expected: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(g.json["logits_gguf_reading"].clone()).expect("gguf logits");
    let m = open(&tiny("gemma3").join("gemma3.gguf"));
    let c = m.model.config();
    assert_eq!(c.architecture, "gemma3");
    assert_eq!(c.rope_style, RopeStyle::NeoX);
    assert_eq!(c.n_global_layers(), 1);
    let ours = run(&m.model, &g.prompts, true);
    let (d, at) = max_diff(&ours, &expected);
    eprintln!("gemma3 GGUF vs transformers: max |diff| {d:e} at {at}");
    assert!(d <= 4e-2, "gemma3 GGUF: max |diff| {d} at {at}");
    // The scale matters: the Hugging Face reading (query_pre_attn_scalar 12) is far off.
    let (far, _) = max_diff(&ours, &g.logits);
    assert!(far > 0.05, "query_pre_attn_scalar changed nothing ({far})");
}

/// Windowed layers that keep only their window: a sequence decoded token by token through a
/// pool whose windowed layers have 3 blocks of 2 positions (the window of 4 needs at most 3),
/// reused as a ring as positions leave the window, while the global layer keeps every block,
/// gives exactly the logits of a cache that keeps everything.
#[test]
fn gemma3_window_blocks_given_back_change_nothing() {
    let g = golden("gemma3");
    let m = open(&tiny("gemma3"));
    let model = &m.model;
    let pool = ThreadPool::new(2);
    let p0 = &g.prompts[0];
    let full = run(model, &g.prompts[..1], true);
    let mut kv = KvPool::with_window_blocks(model.config(), 2, 8, 3).expect("pool");
    assert_eq!(kv.n_window_blocks(), 3);
    let table: Vec<u32> = (0..8).collect();
    let mut window_table = vec![u32::MAX; 8];
    let vocab = model.config().vocab_size;
    for (pos, &t) in p0.iter().enumerate() {
        // The block of `pos` takes the ring slot of a block that has left the window.
        window_table[pos / 2] = (pos / 2 % 3) as u32;
        if let Some(old) = (pos / 2).checked_sub(3) {
            window_table[old] = u32::MAX;
        }
        let chunk = SeqChunk {
            tokens: &[t],
            start_pos: pos,
            block_table: &table,
            logits: Logits::Last,
            window_table: &window_table,
        };
        let out = model.forward_batch(&pool, &mut kv, &[chunk]).expect("step");
        assert_eq!(out[0].len(), vocab);
        assert_eq!(out[0], full[0][pos], "position {pos}");
    }
    // A table that dropped a block still inside the window is refused, not read.
    window_table[(p0.len() - 3) / 2] = u32::MAX;
    let chunk = SeqChunk {
        tokens: &[1],
        start_pos: p0.len() - 1,
        block_table: &table,
        logits: Logits::Last,
        window_table: &window_table,
    };
    assert!(model.forward_batch(&pool, &mut kv, &[chunk]).is_err());
    // A chunk without a window table in a pool with fewer window blocks: its block table's
    // blocks past the window blocks are refused, not read out of bounds.
    let chunk = SeqChunk {
        tokens: &[1],
        start_pos: 9,
        block_table: &table,
        logits: Logits::Last,
        window_table: &[],
    };
    match model.forward_batch(&pool, &mut kv, &[chunk]) {
        Err(souverain_model::ModelError::BadConfig(m)) => assert!(m.contains("window"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The same conversion with F32 matrices isolates the GGUF path's reordering, stacking and
/// window metadata from quantisation: only the f16 KV cache (keys, values, queries and
/// attention weights rounded to f16, relative 2^-11) separates it from transformers, so
/// logits of magnitude ~3 agree within 1e-2.
#[test]
fn f32_gguf() {
    for name in ["mistral-swa", "mixtral", "llama"] {
        let g = golden(name);
        let dir = temp_dir(&format!("{name}-gguf-f32"));
        let path = dir.join("model.gguf");
        to_gguf(name, &path, false);
        let m = open(&path);
        let ours = run(&m.model, &g.prompts, true);
        let (d, at) = max_diff(&ours, &g.logits);
        eprintln!("{name} F32 GGUF: max |diff| {d:e} at {at}");
        assert!(d <= 1e-2, "{name} F32 GGUF: max |diff| {d} at {at}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---- Qwen2 and Qwen3 ------------------------------------------------------------------------

/// Qwen2: biases on the query, key and value projections (always, whatever the config says),
/// RoPE on halves, tied embeddings: within the F32 bound of transformers.
#[test]
fn qwen2_matches_transformers() {
    let m = check_f32("qwen2", "qwen2");
    let c = m.model.config();
    assert!(c.attn_bias && !c.qk_norm);
    assert_eq!(c.rope_style, RopeStyle::NeoX);
    assert_eq!(c.sliding_window, None);
}

/// Qwen3: per-head RMSNorm of queries and keys before RoPE, and a head size of its own (16,
/// where hidden / heads is 8): within the F32 bound of transformers.
#[test]
fn qwen3_matches_transformers() {
    let m = check_f32("qwen3", "qwen3");
    let c = m.model.config();
    assert!(c.qk_norm && !c.attn_bias);
    assert_eq!((c.head_dim, c.q_dim(), c.d_model), (16, 64, 32));
}

/// Qwen3-MoE: QK-norm, every layer a mixture of 4 experts of width 16 (not the dense 32),
/// top-2 routing renormalised (`norm_topk_prob`); and with `norm_topk_prob` false, each chosen
/// expert weighted by its share of the softmax over all four (transformers' default): both
/// within the F32 bound of transformers, and far apart from each other.
#[test]
fn qwen3moe_matches_transformers() {
    let m = check_f32("qwen3moe", "qwen3moe");
    let c = m.model.config();
    assert!(c.qk_norm && c.moe_renormalize);
    assert_eq!((c.n_experts, c.n_experts_used, c.ffn_dim), (4, 2, 16));

    let g = golden("qwen3moe");
    let plain: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(g.json["logits_without_renormalisation"].clone()).expect("logits");
    let dir = with_config("qwen3moe", "plain", |c| {
        c["norm_topk_prob"] = Value::Bool(false)
    });
    let m = open(&dir);
    assert!(!m.model.config().moe_renormalize);
    let ours = run(&m.model, &g.prompts, true);
    let (d, at) = max_diff(&ours, &plain);
    eprintln!("qwen3moe without renormalisation vs transformers: max |diff| {d:e} at {at}");
    assert!(d <= F32_TOL, "qwen3moe plain: max |diff| {d} at {at}");
    let (apart, _) = max_diff(&plain, &g.logits);
    assert!(apart > 0.05, "renormalising changes nothing ({apart})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same weights as llama.cpp's converter writes a `qwen2` / `qwen3` GGUF (`model.gguf`,
/// written by the golden script: llama.cpp's names, Hugging Face's q/k row order), against
/// transformers within the F32 GGUF bound; without the biases (Qwen2) or the QK-norms
/// (Qwen3) the logits are far off, so both are exercised.
#[test]
fn qwen_gguf_as_llama_cpp_writes_it() {
    for name in ["qwen2", "qwen3", "qwen3moe"] {
        let m = check_gguf(name, name);
        let c = m.model.config();
        assert_eq!(c.rope_style, RopeStyle::NeoX);
        assert_eq!((c.attn_bias, c.qk_norm), (name == "qwen2", name != "qwen2"));
        assert_eq!(c.n_experts, if name == "qwen3moe" { 4 } else { 0 });
    }
}

/// A Qwen2 directory that asks for windowed attention (`use_sliding_window`) is refused with
/// an error naming the key.
#[test]
fn qwen_configurations_that_do_not_add_up_are_refused() {
    let dir = with_config("qwen2", "swa", |c| {
        c["use_sliding_window"] = Value::Bool(true)
    });
    let Err(err) = LoadedModel::open(&dir, &mut |_, _| {}) else {
        panic!("a Qwen2 directory with use_sliding_window loaded");
    };
    assert!(err.to_string().contains("use_sliding_window"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- RoPE scaling ------------------------------------------------------------------------

/// The GGUF file beside a tiny model (`model.gguf`, written by the golden script as llama.cpp's
/// converter writes `architecture`) against transformers' logits, within the F32 GGUF bound.
fn check_gguf(name: &str, architecture: &str) -> LoadedModel {
    check_gguf_file(name, "model.gguf", architecture)
}

/// [`check_gguf`] for a GGUF file of another name beside the tiny model.
fn check_gguf_file(name: &str, file: &str, architecture: &str) -> LoadedModel {
    let g = golden(name);
    let m = open(&tiny(name).join(file));
    assert_eq!(m.model.config().architecture, architecture);
    let ours = run(&m.model, &g.prompts, true);
    let (d, at) = max_diff(&ours, &g.logits);
    eprintln!("{name} GGUF vs transformers: max |diff| {d:e} at {at}");
    assert!(d <= 1e-2, "{name} GGUF: max |diff| {d} at {at}");
    m
}

/// The same weights with RoPE unscaled (`rope_type` default) are far from transformers'
/// scaled logits: the scaling is exercised, not a no-op.
fn unscaled_differs(name: &str) {
    let g = golden(name);
    let dir = temp_dir(&format!("{name}-unscaled"));
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(tiny(name).join(f), dir.join(f)).expect("copy");
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["rope_parameters"]["rope_type"] = "default".into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    let m = open(&dir);
    assert_eq!(m.model.config().rope_scaling, RopeScaling::None);
    // A type this build does not implement is refused, naming the key.
    cfg["rope_parameters"]["rope_type"] = "dynamic".into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    match LoadedModel::open(&dir, &mut |_, _| {}) {
        Err(souverain_model::ModelError::UnsupportedRopeScaling { key, value }) => {
            assert_eq!(
                (key.as_str(), value.as_str()),
                ("rope_parameters.rope_type", "dynamic")
            );
        }
        Err(e) => panic!("{name}: {e}"),
        Ok(_) => panic!("{name}: dynamic scaling accepted"),
    }
    let ours = run(&m.model, &g.prompts, true);
    let (d, _) = max_diff(&ours, &g.logits);
    eprintln!("{name} unscaled vs transformers scaled: max |diff| {d:e}");
    assert!(d > 0.05, "{name}: scaling changes nothing ({d})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Linear scaling (factor 4): every angle divided by 4.
#[test]
fn rope_scaling_linear_matches_transformers() {
    let m = check_f32("llama-rope-linear", "llama-rope-linear");
    let expected = RopeScaling::Linear { factor: 4.0 };
    assert_eq!(m.model.config().rope_scaling, expected);
    unscaled_differs("llama-rope-linear");
    let g = check_gguf("llama-rope-linear", "llama");
    assert_eq!(g.model.config().rope_scaling, expected);
}

/// Llama 3.1's `llama3` scaling from `rope_parameters` (divisors computed at load) and from
/// the GGUF `rope_freqs.weight` tensor the converter writes: the 4 pairs of a head fall in
/// all three bands (kept, blended, divided by 8).
#[test]
fn rope_scaling_llama3_matches_transformers() {
    let m = check_f32("llama-rope-llama3", "llama-rope-llama3");
    let RopeScaling::FreqFactors(hf) = m.model.config().rope_scaling.clone() else {
        panic!("llama3 scaling: {:?}", m.model.config().rope_scaling);
    };
    assert_eq!(hf.len(), 4);
    assert_eq!((hf[0], hf[2], hf[3]), (1.0, 8.0, 8.0));
    assert!(hf[1] > 1.0 && hf[1] < 8.0, "a blended pair: {hf:?}");
    unscaled_differs("llama-rope-llama3");
    let g = check_gguf("llama-rope-llama3", "llama");
    let RopeScaling::FreqFactors(file) = g.model.config().rope_scaling.clone() else {
        panic!("rope_freqs: {:?}", g.model.config().rope_scaling);
    };
    for (a, b) in hf.iter().zip(&file) {
        assert!(
            (a - b).abs() <= 1e-6 * a,
            "divisors {hf:?} vs rope_freqs {file:?}"
        );
    }
}

/// YaRN (factor 4 over an original context of 16, beta_fast 8, beta_slow 0.5: pair 0 keeps
/// its angle, pair 1 blends, pairs 2 and 3 are interpolated) with the default attention
/// factor 0.1 ln 4 + 1 on cos and sin, from `rope_parameters` and from
/// `llama.rope.scaling.*` keys.
#[test]
fn rope_scaling_yarn_matches_transformers() {
    let m = check_f32("llama-rope-yarn", "llama-rope-yarn");
    let expected = RopeScaling::Yarn {
        factor: 4.0,
        original_context: 16,
        beta_fast: 8.0,
        beta_slow: 0.5,
        attention_factor: 0.1 * 4f32.ln() + 1.0,
    };
    assert_eq!(m.model.config().rope_scaling, expected);
    unscaled_differs("llama-rope-yarn");
    let g = check_gguf("llama-rope-yarn", "llama");
    assert_eq!(g.model.config().rope_scaling, expected);
}

// ---- Mistral 3 ---------------------------------------------------------------------------

/// Ministral 3's text model: YaRN without magnitude correction (mscale = mscale_all_dim = 1)
/// and Llama 4's attention temperature (queries times 1 + 0.5 ln(1 + floor(pos / 16)); the
/// golden's beta is 0.5, not the real 0.1, so that it moves the logits clearly), over
/// prompts of up to 48 tokens: within the F32 bound of transformers. The oracle without the
/// temperature is far from the one with it, so the prompts exercise it.
#[test]
fn ministral3_yarn_and_temperature_match_transformers() {
    let m = check_f32("ministral3", "ministral3");
    let c = m.model.config();
    assert_eq!(
        c.attn_temperature,
        Some(AttnTemperature {
            scale: 0.5,
            length: 16
        })
    );
    assert!(
        matches!(c.rope_scaling, RopeScaling::Yarn { attention_factor, .. } if attention_factor == 1.0),
        "{:?}",
        c.rope_scaling
    );
    let g = golden("ministral3");
    let cold: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(g.json["logits_without_temperature"].clone()).expect("logits");
    let (d, _) = max_diff(&cold, &g.logits);
    assert!(d > 0.05, "the temperature changes nothing ({d})");
}

/// The same weights as llama.cpp's converter writes a `mistral3` GGUF (q/k rows reordered for
/// adjacent pairs, YaRN and the temperature as keys): within the F32 GGUF bound.
#[test]
fn ministral3_gguf_as_llama_cpp_writes_it() {
    let m = check_gguf("ministral3", "mistral3");
    let c = m.model.config();
    assert_eq!(c.rope_style, RopeStyle::Normal);
    assert_eq!(
        c.attn_temperature,
        Some(AttnTemperature {
            scale: 0.5,
            length: 16
        })
    );
}

/// Mistral 3's image-text checkpoints (`Mistral3ForConditionalGeneration`, as transformers
/// saves one: `language_model.model.*`, a Pixtral `vision_tower.*`, a projector) run their
/// language model and leave the vision tower unloaded: the text logits are Ministral 3's.
#[test]
fn mistral3_image_text_checkpoint_runs_its_language_model() {
    let g = golden("ministral3");
    let m = open(&tiny("mistral3-vlm"));
    let c = m.model.config();
    assert_eq!(c.architecture, "Mistral3ForConditionalGeneration");
    assert!(c.attn_temperature.is_some());
    let ours = run(&m.model, &g.prompts, true);
    let (d, at) = max_diff(&ours, &g.logits);
    eprintln!("mistral3-vlm vs transformers (ministral3): max |diff| {d:e} at {at}");
    assert!(d <= F32_TOL, "mistral3-vlm: max |diff| {d} at {at}");
}

// ---- DeepSeek-V3 (`deepseek2`) -------------------------------------------------------------

/// DeepSeek-V3's design on tiny models (the golden script's `deepseek3`: low-rank queries,
/// YaRN with `mscale_all_dim`; `deepseek3-lite`: one `q_proj`, no scaling, one expert
/// group): multi-head latent attention caching one 40-wide latent per token and layer (32
/// latent + 8 rotated), absorbed queries; a leading dense layer, then 8 experts of width 16
/// chosen by sigmoid score plus a correction bias within the best 2 of 4 groups, weighted by
/// their unbiased scores renormalised times 2.5, and a shared expert: within the F32 bound of
/// transformers. Without the bias the oracle is far off, so the bias is exercised.
#[test]
fn deepseek3_latent_attention_and_routing_match_transformers() {
    for name in ["deepseek3", "deepseek3-lite"] {
        let m = check_f32(name, name);
        let c = m.model.config();
        let mla = c.mla.expect("latent attention");
        assert_eq!((c.n_kv_heads, c.head_dim, c.rope_dim), (1, 40, 8));
        assert_eq!(
            (mla.kv_lora_rank, mla.qk_nope_dim, mla.v_head_dim),
            (32, 16, 12)
        );
        let lite = name == "deepseek3-lite";
        assert_eq!(mla.q_lora_rank, if lite { None } else { Some(24) });
        let e = c.experts.expect("DeepSeek's experts");
        assert_eq!(e.gating, souverain_model::Gating::Sigmoid);
        assert_eq!(
            (e.n_groups, e.groups_used, e.n_shared, e.leading_dense),
            if lite { (1, 1, 1, 1) } else { (4, 2, 1, 1) }
        );
        assert_eq!(
            (c.n_experts, c.n_experts_used, e.expert_ffn_dim),
            (8, 2, 16)
        );
        if !lite {
            // 1/sqrt(16 + 8) times mscale(4, 1)^2.
            let m = 0.1 * 4f32.ln() + 1.0;
            let expected = m * m / 24f32.sqrt();
            assert!(
                (c.attention_scale - expected).abs() < 1e-6,
                "{}",
                c.attention_scale
            );
        }
        // The cache holds the latent once: 40 f32 per token and layer, not keys and values
        // of 4 heads (4 × (24 + 12)).
        assert_eq!(KvPool::bytes_per_token(c), 3 * 40 * 4);
        let g = golden(name);
        let unbiased: Vec<Vec<Vec<f32>>> =
            serde_json::from_value(g.json["logits_without_bias"].clone()).expect("logits");
        let (apart, _) = max_diff(&unbiased, &g.logits);
        assert!(
            apart > 0.05,
            "{name}: the selection bias changes nothing ({apart})"
        );
    }
}

/// The same weights as llama.cpp's converter writes a `deepseek2` GGUF (`model.gguf`: one
/// cached head of `key_length` 40, `key_length_mla`/`value_length_mla`, `kv_b_proj` split
/// into `attn_k_b` (transposed) and `attn_v_b`, `exp_probs_b.bias`, stacked experts,
/// `yarn_log_multiplier`): within the GGUF bound of transformers, read as the directory reads.
#[test]
fn deepseek2_gguf_as_llama_cpp_writes_it() {
    for name in ["deepseek3", "deepseek3-lite"] {
        let hf = open(&tiny(name));
        let m = check_gguf(name, "deepseek2");
        let (c, h) = (m.model.config(), hf.model.config());
        assert_eq!((c.mla, c.experts), (h.mla, h.experts));
        assert_eq!(c.rope_scaling, h.rope_scaling);
        assert_eq!(
            (c.head_dim, c.n_kv_heads, c.rope_style),
            (40, 1, RopeStyle::Normal)
        );
        assert!(
            (c.attention_scale - h.attention_scale).abs() < 1e-6,
            "{name}: score scale {} vs {}",
            c.attention_scale,
            h.attention_scale
        );
        // f16 cache: half the f32 directory's bytes.
        assert_eq!(KvPool::bytes_per_token(c), 3 * 40 * 2);
    }
}

/// Latent-attention and expert settings that do not add up are refused with an error naming
/// the key, never a panic.
#[test]
fn deepseek_configurations_that_do_not_add_up_are_refused() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 4] = [
        ("groups", |c| c["n_group"] = 3.into(), "expert_group_count"),
        (
            "topk",
            |c| c["topk_group"] = 0.into(),
            "expert_group_used_count",
        ),
        (
            "scoring",
            |c| c["scoring_func"] = "relu".into(),
            "scoring_func",
        ),
        ("rank", |c| c["kv_lora_rank"] = 16.into(), "attn_kv_b"),
    ];
    for (tag, edit, key) in cases {
        let dir = with_config("deepseek3", tag, edit);
        let Err(err) = LoadedModel::open(&dir, &mut |_, _| {}) else {
            panic!("{tag}: a DeepSeek directory that does not add up loaded");
        };
        assert!(err.to_string().contains(key), "{tag}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Mistral 4 (Mistral Small 4's text model, `Mistral4ForCausalLM`): latent attention, a
/// leading dense layer, 8 experts saved fused (`mlp.experts.gate_up_proj`) chosen by softmax
/// score within the better of 2 groups, a shared expert, YaRN, and Llama 4's attention
/// temperature (beta 0.5 over 16 positions): within the F32 bound of transformers; without
/// the temperature the oracle is far off. The same weights inside a
/// `Mistral3ForConditionalGeneration` (the released layout; vision tower skipped), as a
/// `mistral4` GGUF, and as Mistral Large 3's `deepseek2` GGUF give the same logits.
#[test]
fn mistral4_matches_transformers_in_every_layout() {
    let m = check_f32("mistral4", "mistral4");
    let c = m.model.config();
    let e = c.experts.expect("experts");
    assert_eq!(e.gating, souverain_model::Gating::Softmax);
    assert_eq!(
        (e.n_groups, e.groups_used, e.n_shared, e.leading_dense),
        (2, 1, 1, 1)
    );
    assert_eq!(
        c.attn_temperature,
        Some(AttnTemperature {
            scale: 0.5,
            length: 16
        })
    );
    let g = golden("mistral4");
    let cold: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(g.json["logits_without_temperature"].clone()).expect("logits");
    let (apart, _) = max_diff(&cold, &g.logits);
    assert!(apart > 0.05, "the temperature changes nothing ({apart})");

    let vlm = open(&tiny("mistral4-vlm"));
    assert_eq!(
        vlm.model.config().architecture,
        "Mistral3ForConditionalGeneration"
    );
    assert_eq!(vlm.model.config().mla, c.mla);
    let (d, at) = max_diff(&run(&vlm.model, &g.prompts, true), &g.logits);
    eprintln!("mistral4-vlm vs transformers (mistral4): max |diff| {d:e} at {at}");
    assert!(d <= F32_TOL, "mistral4-vlm: max |diff| {d} at {at}");

    let gguf = check_gguf("mistral4", "mistral4");
    let gc = gguf.model.config();
    assert_eq!(
        (gc.mla, gc.experts, gc.attn_temperature),
        (c.mla, c.experts, c.attn_temperature)
    );
    assert_eq!(gc.rope_scaling, c.rope_scaling);
    assert!((gc.attention_scale - c.attention_scale).abs() < 1e-6);

    // Mistral Large 3's conversion: `deepseek2` with softmax scores and the temperature keys
    // (gate and up stacked apart).
    let large3 = check_gguf_file("mistral4", "large3.gguf", "deepseek2");
    let lc = large3.model.config();
    assert_eq!(
        (lc.mla, lc.experts, lc.attn_temperature),
        (c.mla, c.experts, c.attn_temperature)
    );
    assert_eq!(lc.rope_scaling, c.rope_scaling);
}

/// Every tiny GGUF file against llama.cpp itself (`llamacpp-*.json`, written by
/// `scripts/golden/llamacpp_tiny.py` from the same files with a byte tokenizer added):
/// DeepSeek-V3's `deepseek2`, its lite form, Mistral Small 4's `mistral4`, Mistral Large 3's
/// `deepseek2` conversion, `mistral3`, `qwen2`, `qwen3`, `qwen3moe`, `gemma3` and `llama` with
/// each RoPE scaling. llama.cpp and we both cache in f16 and follow ggml's arithmetic: 1e-5 to
/// 1.4e-3 apart, inside half the GGUF bound (5e-3), while llama.cpp's own distance from
/// transformers, recorded in each file, is 1.7e-3 to 6.6e-3.
#[test]
fn tiny_gguf_files_match_llama_cpp() {
    for (name, file) in [
        ("deepseek3", "model"),
        ("deepseek3-lite", "model"),
        ("mistral4", "model"),
        ("mistral4", "large3"),
        ("ministral3", "model"),
        ("qwen2", "model"),
        ("qwen3", "model"),
        ("qwen3moe", "model"),
        ("gemma3", "gemma3"),
        ("llama-rope-linear", "model"),
        ("llama-rope-llama3", "model"),
        ("llama-rope-yarn", "model"),
    ] {
        let text = std::fs::read_to_string(tiny(name).join(format!("llamacpp-{file}.json")))
            .expect("llama.cpp golden");
        let json: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["generator"], "scripts/golden/llamacpp_tiny.py");
        let prompts: Vec<Vec<u32>> =
            serde_json::from_value(json["prompts"].clone()).expect("prompts");
        let theirs: Vec<Vec<Vec<f32>>> =
            serde_json::from_value(json["logits"].clone()).expect("logits");
        let m = open(&tiny(name).join(format!("{file}.gguf")));
        let (d, at) = max_diff(&run(&m.model, &prompts, true), &theirs);
        eprintln!(
            "{name}/{file}.gguf vs llama.cpp: max |diff| {d:e} at {at} (llama.cpp vs transformers {})",
            json["max_abs_diff_vs_transformers"]
        );
        // The tiny Gemma 3 re-amplifies each sub-layer's output with its post-norms over six
        // layers: llama.cpp's own f16 rounding puts one of its rows 0.136 from transformers
        // (rounding the weights to bf16 moves transformers' logits by 0.097, see
        // `rounded_weights`), so it gets that model's bound.
        let bound = if name == "gemma3" { 0.2 } else { 5e-3 };
        assert!(d <= bound, "{name}/{file}.gguf vs llama.cpp: {d} at {at}");
    }
}
