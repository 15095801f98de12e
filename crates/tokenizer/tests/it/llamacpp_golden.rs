//! Token-exact agreement with llama.cpp on SmolLM2-135M-Instruct.
//!
//! The golden files come from `scripts/golden/llamacpp_tokenize.py` (llama-cpp-python); see their
//! headers for the versions and the model file's sha256.

use crate::common;

use common::{golden_path, smollm2, smollm2_spec};
use serde::Deserialize;
use souverain_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder};

#[derive(Deserialize)]
struct Golden {
    header: serde_json::Value,
    eog_ids: Vec<u32>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_parse_special: Vec<u32>,
    ids_plain: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(golden_path("smollm2-tokenize.json")).expect("read golden");
    serde_json::from_str(&text).expect("parse golden")
}

#[test]
fn golden_header_names_its_origin() {
    let g = golden();
    assert_eq!(
        g.header["generated_by"],
        "scripts/golden/llamacpp_tokenize.py"
    );
    assert!(
        g.header["model_sha256"]
            .as_str()
            .is_some_and(|s| s.len() == 64)
    );
    assert!(g.cases.len() >= 60, "only {} cases", g.cases.len());
}

#[test]
fn ids_match_llama_cpp_with_and_without_special_parsing() {
    let tok = smollm2();
    let mut failures = Vec::new();
    for case in golden().cases {
        let got = tok.encode(&case.text, false, true);
        if got != case.ids_parse_special {
            failures.push(format!(
                "parse_special {:?}\n  want {:?}\n  got  {:?}",
                case.text, case.ids_parse_special, got
            ));
        }
        let got = tok.encode(&case.text, false, false);
        if got != case.ids_plain {
            failures.push(format!(
                "plain {:?}\n  want {:?}\n  got  {:?}",
                case.text, case.ids_plain, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decode_matches_llama_cpp_and_round_trips() {
    let tok = smollm2();
    for case in golden().cases {
        let ids = &case.ids_parse_special;
        assert_eq!(
            tok.decode(ids, false).unwrap(),
            case.decoded,
            "{:?}",
            case.text
        );
        assert_eq!(
            tok.decode(ids, true).unwrap(),
            case.decoded_skip_special,
            "{:?}",
            case.text
        );
        // SmolLM2 does no space clean-up, so decoding gives the input back, except where
        // llama.cpp dropped bytes that have no byte token (one golden case).
        if !case.decoded.contains('\u{FFFD}') {
            assert_eq!(case.decoded, case.text);
            assert_eq!(tok.decode(&case.ids_plain, false).unwrap(), case.text);
        }
    }
}

#[test]
fn streaming_concatenation_equals_full_decode() {
    let tok = smollm2();
    for case in golden().cases {
        for skip in [false, true] {
            let mut dec = StreamDecoder::new(skip);
            let mut streamed = String::new();
            for &id in &case.ids_parse_special {
                let chunk = dec.push(tok, id);
                assert!(
                    !chunk.contains('\u{FFFD}') || case.decoded.contains('\u{FFFD}'),
                    "split character in {:?}",
                    case.text
                );
                streamed.push_str(&chunk);
            }
            streamed.push_str(&dec.finish());
            assert_eq!(streamed, tok.decode(&case.ids_parse_special, skip).unwrap());
        }
    }
}

#[test]
fn end_of_generation_tokens_match_llama_cpp() {
    let tok = smollm2();
    let g = golden();
    let ours: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&id| tok.is_eog(id))
        .collect();
    assert_eq!(ours, g.eog_ids);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert!(tok.is_special(1) && !tok.is_special(tok.token_to_id("Ġthe").unwrap()));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.id_to_token(1), Some("<|im_start|>"));
    assert_eq!(
        tok.token_bytes(tok.token_to_id("Ġthe").unwrap()),
        Some(&b" the"[..])
    );
}

#[test]
fn smollm2_chat_template_renders_and_tokenizes() {
    let spec = smollm2_spec();
    let source = spec.chat_template.expect("template in the GGUF file");
    let template = ChatTemplate::new(&source).unwrap();
    let messages = [ChatMessage {
        role: "user".into(),
        content: "What is 2+2?".into(),
    }];
    let prompt = template
        .render(&messages, true, "<|im_start|>", "<|im_end|>")
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = smollm2().encode(&prompt, false, true);
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
    assert_eq!(ids.last(), Some(&198));
}
