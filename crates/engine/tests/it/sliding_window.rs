//! The engine with sliding-window layers (Gemma 3's design): the tiny `gemma3` model of
//! `crates/model/tests/golden/tiny` (five layers with a window of 4, one global; its logits
//! match transformers), given a byte-level tokenizer. Its windowed layers keep their keys and
//! values in the pool's window blocks, which a sequence gives back as they leave its window
//! (three sequences of 8 blocks run in 18 window blocks), and every
//! greedy continuation — alone, after cached prefixes, under continuous batching and
//! preemption — is the one the model computes alone (its own cache, a ring of window
//! blocks), token for token.

use crate::common;

use std::time::Duration;

use common::{alone, tiny_model, tokens, with_byte_tokenizer};
use souverain_engine::{Engine, EngineConfig, GenerateRequest};

fn request(prompt: &[u32], n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt.to_vec());
    r.sampling.temperature = 0.0;
    r.max_tokens = Some(n);
    r.stop_at_eog = false;
    r.logprobs = Some(0);
    r
}

/// Waits (bounded) until the engine reports no running sequence and returns its metrics.
fn idle(e: &Engine) -> souverain_engine::MetricsSnapshot {
    let mut m = e.metrics();
    for _ in 0..500 {
        if m.running == 0 && m.waiting == 0 && m.kv_blocks_used == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        m = e.metrics();
    }
    m
}

#[test]
fn window_blocks_are_given_back_and_change_no_token() {
    let dir = std::env::temp_dir().join(format!("souverain-swa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("gemma3-bytes.gguf");
    with_byte_tokenizer(&tiny_model("gemma3/gemma3.gguf"), &path);
    let context = 128;
    let shared = "Sliding windows keep only the last few positions: ";
    let ends = ["alpha", "beta!", "gamma gamma", "d"];
    let n = 60;

    // Three sequences at a time in a pool of 19 blocks of 16 positions: the window blocks
    // ((4 + 8) / 16 + 2 = 3 per sequence, twice over: 18) are their own. One thread, so that
    // the engine leaves this one a core to submit requests on.
    let config = EngineConfig {
        threads: 1,
        max_seqs: 3,
        context_length: Some(context),
        kv_cache_tokens: Some(19 * 16),
        max_batch_tokens: 8,
        ..EngineConfig::default()
    };
    let e = Engine::load(&path, config, &mut |_, _| {}).expect("load");
    let m = e.metrics();
    assert_eq!((m.kv_blocks_total, m.kv_window_blocks_total), (19, 18));
    let prompts: Vec<Vec<u32>> = ends
        .iter()
        .map(|end| e.tokenize(&format!("{shared}{end}")))
        .collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| alone(&path, p, n, context))
        .collect();
    let distinct: std::collections::HashSet<_> = expected.iter().collect();
    assert!(distinct.len() >= 3, "{expected:?}");

    // Alone.
    assert_eq!(
        tokens(e.generate(request(&prompts[0], n)).expect("submit")),
        expected[0]
    );

    // One after another: the shared prefix is found, window blocks of its end included.
    let before = e.metrics().prefix_hit_tokens;
    for (p, want) in prompts.iter().zip(&expected).skip(1) {
        assert_eq!(&tokens(e.generate(request(p, n)).expect("submit")), want);
    }
    let hits = e.metrics().prefix_hit_tokens - before;
    assert!(hits >= 3 * 48, "prefix cache hits: {hits}");

    // All at once, three running, no shared prefix: 8 blocks each do not fit the 19 of the
    // pool (unless they started some 20 steps apart), so sequences are preempted and computed
    // again. Three sequences that kept every window block would need 24 of the 18 (the step
    // would fail): they give them back.
    let (n, prompts): (usize, Vec<Vec<u32>>) = (
        110,
        ["Eins zwei", "Uno dos tres", "One two", "Un deux"]
            .iter()
            .map(|p| e.tokenize(p))
            .collect(),
    );
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| alone(&path, p, n, context))
        .collect();
    // Whether they overlap enough depends on when each request reaches the engine (a busy
    // machine can delay this thread's submissions by many steps): up to three rounds, until
    // one preempts; every round's tokens are checked.
    let before = e.metrics().preemptions;
    for _round in 0..3 {
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| e.generate(request(p, n)).expect("submit"))
            .collect();
        for (rx, want) in receivers.into_iter().zip(&expected) {
            assert_eq!(
                &tokens(rx),
                want,
                "under continuous batching and preemption"
            );
        }
        let m = idle(&e);
        assert_eq!(
            (m.kv_blocks_used, m.kv_window_blocks_used, m.running),
            (0, 0, 0),
            "{m:?}"
        );
        if m.preemptions > before {
            break;
        }
    }
    let m = e.metrics();
    assert!(
        m.preemptions > before,
        "no preemption in three rounds: {m:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
