//! The engine with a latent-attention model (DeepSeek-V3's design, `deepseek2` GGUF): the tiny
//! model of `crates/model/tests/golden/tiny/deepseek3` (whose logits match transformers),
//! given a byte-level tokenizer, served through the paged KV pool (which stores each token's
//! latent once), chunked prefill, continuous batching and the prefix cache: every greedy
//! continuation is the one the model computes alone, token for token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gguf::{Array, GgufFile, GgufWriter, Value};
use souverain_engine::{Engine, EngineConfig, Event, GenerateRequest};
use tokio::sync::mpsc::UnboundedReceiver;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/golden/tiny/deepseek3/model.gguf")
}

/// GPT-2's byte-level alphabet: byte `b` as the character its BPE vocabulary names it by.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("a valid character")
}

/// The tiny model's file with a tokenizer of its 256 tokens, one per byte (no merges).
fn with_byte_tokenizer(dst: &Path) {
    let file = GgufFile::open(tiny_model()).expect("open the tiny deepseek2 model");
    let mut w = GgufWriter::new(file.version());
    w.set_alignment(file.alignment()).expect("alignment");
    for (k, v) in file.metadata().iter() {
        if k != "general.alignment" {
            w.add_kv(k, v.clone());
        }
    }
    let tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let kvs = [
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::from_strings(tokens)),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(Array::from_strings(Vec::<String>::new())),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        // A token no prompt here contains and greedy decoding is unlikely to reach.
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
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
fn alone(path: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let file = Arc::new(GgufFile::open(path).expect("open"));
    let model = model::LlamaModel::load(file, &mut |_, _| {}).expect("load");
    let pool = model::ThreadPool::new(1);
    let mut kv = model.new_kv_cache(64).expect("kv");
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
fn tokens(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
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

#[test]
fn latent_attention_serves_through_the_paged_pool_and_the_prefix_cache() {
    let dir = std::env::temp_dir().join(format!("souverain-mla-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("deepseek2-bytes.gguf");
    with_byte_tokenizer(&path);
    let config = EngineConfig {
        threads: 2,
        max_seqs: 4,
        context_length: Some(64),
        // Prompt chunks of 8 beside decode steps; blocks of the prefix cache reused.
        max_batch_tokens: 8,
        ..EngineConfig::default()
    };
    let e = Engine::load(&path, config, &mut |_, _| {}).expect("load");
    assert_eq!(e.description().architecture, "deepseek2");
    // A shared 33-byte prefix (two whole 16-token blocks) and four different endings.
    let shared = "Multi-head latent attention, MLA:";
    let prompts: Vec<Vec<u32>> = ["one", "two!", "3", "four four"]
        .iter()
        .map(|end| e.tokenize(&format!("{shared} {end}")))
        .collect();
    assert_eq!(e.tokenize(shared).len(), shared.len(), "one token per byte");
    let n = 12;
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&path, p, n)).collect();
    let request = |p: &Vec<u32>| {
        let mut r = GenerateRequest::new(p.clone());
        r.sampling.temperature = 0.0;
        r.max_tokens = Some(n);
        r.stop_at_eog = false;
        r.logprobs = Some(0);
        r
    };
    // One after another (the later ones find the shared blocks cached), then all at once.
    let before = e.metrics().prefix_hit_tokens;
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&tokens(e.generate(request(p)).expect("submit")), want);
    }
    let hits = e.metrics().prefix_hit_tokens - before;
    assert!(hits >= 3 * 32, "prefix cache hits: {hits}");
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| e.generate(request(p)).expect("submit"))
        .collect();
    for (rx, want) in receivers.into_iter().zip(&expected) {
        assert_eq!(&tokens(rx), want, "under continuous batching");
    }
    let distinct: std::collections::HashSet<_> = expected.iter().collect();
    assert!(distinct.len() >= 3, "{expected:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
