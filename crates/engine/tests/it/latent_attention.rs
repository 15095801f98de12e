//! The engine with a latent-attention model (DeepSeek-V3's design, `deepseek2` GGUF): the tiny
//! model of `crates/model/tests/golden/tiny/deepseek3` (whose logits match transformers),
//! given a byte-level tokenizer, served through the paged KV pool (which stores each token's
//! latent once), chunked prefill, continuous batching and the prefix cache: every greedy
//! continuation is the one the model computes alone, token for token.

use crate::common;

use common::{alone, tiny_model, tokens, with_byte_tokenizer};
use souverain_engine::{Engine, EngineConfig, GenerateRequest};

#[test]
fn latent_attention_serves_through_the_paged_pool_and_the_prefix_cache() {
    let dir = std::env::temp_dir().join(format!("souverain-mla-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("deepseek2-bytes.gguf");
    with_byte_tokenizer(&tiny_model("deepseek3/model.gguf"), &path);
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
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&path, p, n, 64)).collect();
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
