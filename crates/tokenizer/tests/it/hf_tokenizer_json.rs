//! Hugging Face `tokenizer.json` against llama.cpp: SmolLM2's vocabulary and merges (from the
//! committed GGUF spec) written as the `tokenizer.json` Hugging Face ships for that model
//! (byte-level BPE; digits split one by one, then the GPT-2 byte-level pre-tokenizer;
//! `<|...|>` markers as special added tokens) must give llama.cpp's ids for every golden string.

#[allow(dead_code)]
use crate::common;

use serde_json::{Value, json};
use souverain_tokenizer::{ChatMessage, HfStreamDecoder, HfTokenizer};

fn smollm2_tokenizer_json() -> Vec<u8> {
    let spec = common::smollm2_spec();
    let vocab: serde_json::Map<String, Value> = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let types = spec.token_types.clone().unwrap_or_default();
    let added: Vec<Value> = spec
        .tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).is_some_and(|&t| t == 3 || t == 4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::to_vec(&json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": spec.merges}
    }))
    .expect("json")
}

fn smollm2_config() -> Vec<u8> {
    let spec = common::smollm2_spec();
    serde_json::to_vec(&json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": spec.chat_template,
    }))
    .expect("json")
}

#[test]
fn tokenizer_json_gives_llama_cpp_ids() {
    let tok =
        HfTokenizer::from_json(&smollm2_tokenizer_json(), Some(&smollm2_config())).expect("build");
    assert_eq!(tok.vocab_size(), 49152);
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden_path("smollm2-tokenize.json")).expect("read"),
    )
    .expect("parse");
    let mut checked = 0;
    for case in golden["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids_parse_special"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        // llama.cpp drops bytes that have no byte token in this vocabulary; HF cannot encode
        // them at all. Compare only strings every byte of which the vocabulary covers.
        let decoded = case["decoded"].as_str().expect("decoded");
        if decoded != text {
            continue;
        }
        let got = tok.encode(text, false).expect("encode");
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).expect("decode"), text);
        // Streaming one token at a time gives the same text.
        let mut stream = HfStreamDecoder::new();
        let mut out = String::new();
        for &id in &got {
            out += &stream.push(&tok, id);
        }
        out += &stream.finish(&tok);
        assert_eq!(out, tok.decode(&got, true).expect("decode"), "{text:?}");
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} strings compared");
}

#[test]
fn config_gives_template_and_end_of_turn() {
    let tok =
        HfTokenizer::from_json(&smollm2_tokenizer_json(), Some(&smollm2_config())).expect("build");
    let im_end = 2;
    assert!(tok.is_eog(im_end));
    assert!(!tok.is_eog(100));
    let template = tok.chat_template().expect("template");
    let (bos, eos) = tok.bos_eos_text();
    let text = template
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
            true,
            bos,
            eos,
        )
        .expect("render");
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    assert!(HfTokenizer::from_json(b"{not json", None).is_err());
    assert!(tok.decode(&[49152], false).is_err());
}
