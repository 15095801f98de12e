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
