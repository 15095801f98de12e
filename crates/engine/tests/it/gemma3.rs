//! Gemma 3 270M (Q4_K_M) through the engine: its SentencePiece vocabulary and its chat
//! template against llama.cpp, and the KV memory its windowed layers give back.
//!
//! The golden file is the model crate's `gemma3-270m-q4_k_m-llamacpp.json`, written by
//! `scripts/golden/llamacpp_logits.py` with llama-cpp-python: each case's text, llama.cpp's
//! tokens for it (no BOS added, special tokens parsed), and for the chat cases the user
//! message, rendered with the same template the engine falls back to for `gemma3` files
//! without one (`crates/engine/src/templates/gemma.jinja`) by Python's jinja2.

use serde_json::Value;
use souverain_engine::{Engine, EngineConfig};
use tokenizer::ChatMessage;

fn golden() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/golden/gemma3-270m-q4_k_m-llamacpp.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn engine() -> Option<Engine> {
    let path = testkit::gemma_test_model()?;
    let config = EngineConfig {
        threads: 2,
        context_length: Some(4096),
        ..EngineConfig::default()
    };
    Some(Engine::load(&path, config, &mut |_, _| {}).expect("load gemma"))
}

#[test]
fn gemma3_tokens_and_chat_template_match_llama_cpp() {
    let Some(engine) = engine() else { return };
    let g = golden();
    let bos = g["bos_token_id"].as_u64().expect("bos") as u32;
    for case in g["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let text = case["text"].as_str().expect("text");
        let theirs = ids(&case["tokens"]);
        // The engine adds Gemma's BOS to a prompt that lacks one; llama.cpp's were asked
        // without it.
        let mut ours = engine.tokenize(text);
        if theirs.first() != Some(&bos) {
            assert_eq!(ours.first(), Some(&bos), "{name}: BOS");
            ours.remove(0);
        }
        assert_eq!(ours, theirs, "{name}: tokens of {text:?}");
        assert_eq!(
            engine.detokenize(&theirs).expect("detokenize"),
            text,
            "{name}: detokenised"
        );
        if let Some(user) = case["user_message"].as_str() {
            let chat = [ChatMessage {
                role: "user".into(),
                content: user.into(),
            }];
            assert_eq!(engine.render_chat(&chat).expect("render"), text, "{name}");
            assert_eq!(engine.tokenize_chat(&chat).expect("chat"), theirs, "{name}");
        }
    }
}

#[test]
fn gemma3_system_prompt_folds_into_the_first_user_turn() {
    let Some(engine) = engine() else { return };
    let msg = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let text = engine
        .render_chat(&[
            msg("system", "Answer in French."),
            msg("user", " Hello "),
            msg("assistant", "Bonjour"),
            msg("user", "Thanks"),
        ])
        .expect("render");
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n\
         <start_of_turn>model\nBonjour<end_of_turn>\n\
         <start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    );
    // Roles that do not alternate are refused, as Gemma's template does.
    assert!(
        engine
            .render_chat(&[msg("user", "a"), msg("user", "b")])
            .is_err()
    );
}

/// Past its window, through the engine: the 1,301-token prompt of
/// `gemma3-270m-q4_k_m-llamacpp-long.json` (`scripts/golden/llamacpp_long.py`), then each of
/// llama.cpp's 32 greedy steps asked for as a request of one token whose prompt is the golden
/// prompt plus llama.cpp's tokens so far. The engine keeps the windowed layers' KV in their
/// own blocks (two sequences at a time: fewer window blocks than blocks), gives back those
/// that leave the window, and each later request finds the earlier ones' blocks in the prefix
/// cache, window blocks of the prefix's end included. Every token is llama.cpp's, except where
/// llama.cpp's own top two are within its noise (its logits with n_batch 1 against 512).
#[test]
fn gemma3_past_its_window_follows_llama_cpp_through_the_prefix_cache() {
    let Some(path) = testkit::gemma_test_model() else {
        return;
    };
    let config = EngineConfig {
        threads: 2,
        max_seqs: 2,
        context_length: Some(4096),
        ..EngineConfig::default()
    };
    let e = Engine::load(&path, config, &mut |_, _| {}).expect("load gemma");
    let m = e.metrics();
    assert!(
        m.kv_window_blocks_total > 0 && m.kv_window_blocks_total < m.kv_blocks_total,
        "{m:?}"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/golden/gemma3-270m-q4_k_m-llamacpp-long.json");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    let noise = golden["self_consistency"]["max_abs_diff"]
        .as_f64()
        .expect("noise") as f32;
    let case = &golden["cases"][0];
    let mut prompt = ids(&case["tokens"]);
    assert!(prompt.len() > 1024, "longer than twice the window");
    let before = e.metrics().prefix_hit_tokens;
    let mut exact = 0;
    let steps = case["greedy"].as_array().expect("greedy");
    for (i, step) in steps.iter().enumerate() {
        let id = step["id"].as_u64().expect("id") as u32;
        let second = step["second_id"].as_u64().expect("id") as u32;
        let margin = (step["logit"].as_f64().expect("logit")
            - step["second_logit"].as_f64().expect("logit")) as f32;
        let mut r = souverain_engine::GenerateRequest::new(prompt.clone());
        r.sampling.temperature = 0.0;
        r.max_tokens = Some(1);
        r.stop_at_eog = false;
        r.logprobs = Some(5);
        let mut rx = e.generate(r).expect("submit");
        let mut ours = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                souverain_engine::Event::Logprobs(l) => ours = Some(l),
                souverain_engine::Event::Done { .. } => break,
                souverain_engine::Event::Failed(f) => panic!("step {i}: {f}"),
                _ => {}
            }
        }
        let ours = ours.expect("a token");
        if margin > noise {
            assert_eq!(ours.token, id, "step {i}: llama.cpp's margin {margin}");
        } else {
            // A near tie in llama.cpp: ours is one of its two, or beats its choice by less
            // than its noise (log-probabilities differ as logits do).
            let theirs = ours.top.iter().find(|t| t.0 == id).map(|t| t.2);
            assert!(
                ours.token == id
                    || ours.token == second
                    || theirs.is_some_and(|lp| ours.logprob - lp <= noise),
                "step {i}: {} is neither of llama.cpp's near-tied {id} and {second}",
                ours.token
            );
        }
        exact += usize::from(ours.token == id);
        prompt.push(id);
    }
    let hits = e.metrics().prefix_hit_tokens - before;
    eprintln!(
        "{exact}/{} of llama.cpp's greedy tokens past the window; {hits} prompt tokens found \
         in the prefix cache",
        steps.len()
    );
    assert!(
        hits as usize >= (steps.len() - 1) * 1280,
        "prefix hits {hits}"
    );
}
