//! What the engine's golden tests share: llama.cpp's prompt log-probability golden file, and
//! the model crate's tiny models given a byte-level tokenizer.
#![allow(dead_code)] // the tests use part of it

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gguf::{Array, GgufFile, GgufWriter};
use serde_json::Value;
use souverain_engine::Event;
use tokio::sync::mpsc::UnboundedReceiver;

/// `tests/golden/llamacpp-prompt-logprobs.json` (made by `scripts/golden/llamacpp_prompt_logprobs.py`), parsed.
pub(crate) fn prompt_logprobs_golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/llamacpp-prompt-logprobs.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("golden")
}

/// A JSON array of token ids.
pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

/// A tiny model of `crates/model/tests/golden/tiny` (`name` relative to it).
pub(crate) fn tiny_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/golden/tiny")
        .join(name)
}

/// GPT-2's byte-level alphabet: byte `b` as the character its BPE vocabulary names it by.
pub(crate) fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("a valid character")
}

/// A copy of the tiny model at `src` (256 tokens) with a tokenizer of one token per byte (no
/// merges).
pub(crate) fn with_byte_tokenizer(src: &Path, dst: &Path) {
    let file = GgufFile::open(src).expect("open the tiny model");
    let mut w = GgufWriter::new(file.version());
    w.set_alignment(file.alignment()).expect("alignment");
    for (k, v) in file.metadata().iter() {
        if k != "general.alignment" {
            w.add_kv(k, v.clone());
        }
    }
    let tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let kvs = [
        ("tokenizer.ggml.model", gguf::Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", gguf::Value::String("default".into())),
        (
            "tokenizer.ggml.tokens",
            gguf::Value::Array(Array::from_strings(tokens)),
        ),
        (
            "tokenizer.ggml.merges",
            gguf::Value::Array(Array::from_strings(Vec::<String>::new())),
        ),
        ("tokenizer.ggml.bos_token_id", gguf::Value::U32(1)),
        // A token no prompt here contains and greedy decoding is unlikely to reach.
        ("tokenizer.ggml.eos_token_id", gguf::Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", gguf::Value::Bool(false)),
    ];
    for (k, v) in kvs {
        w.add_kv(k, v);
    }
    for t in file.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ggml_type, file.tensor_data(t).to_vec())
            .expect("tensor");
    }
    w.write(dst).expect("write the model");
}

/// The greedy continuation the model computes alone, one sequence in its own cache.
pub(crate) fn alone(path: &Path, prompt: &[u32], n: usize, capacity: usize) -> Vec<u32> {
    let file = Arc::new(GgufFile::open(path).expect("open"));
    let model = model::LlamaModel::load(file, &mut |_, _| {}).expect("load");
    let pool = model::ThreadPool::new(1);
    let mut kv = model.new_kv_cache(capacity).expect("kv");
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..n {
        let logits = model
            .forward(&pool, &next, &mut kv, model::Logits::Last)
            .expect("forward");
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .expect("logits") as u32;
        out.push(best);
        next = vec![best];
    }
    out
}

/// The tokens of a generation, from its log-probability events.
pub(crate) fn tokens(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Logprobs(l) => out.push(l.token),
            Event::Done { .. } => return out,
            Event::Failed(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    }
    panic!("the engine dropped the request")
}
