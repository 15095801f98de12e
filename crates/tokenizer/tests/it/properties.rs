//! Property tests on the SmolLM2 tokenizer: round trips and streaming.

use crate::common;

use common::smollm2;
use proptest::prelude::*;
use souverain_tokenizer::StreamDecoder;

const REPLACEMENT: char = '\u{FFFD}';

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..ProptestConfig::default()
    }
}

/// Text mixing ASCII, whitespace runs, digits, accents, CJK, emoji and arbitrary code points.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z ]{0,12}",
        "[ \t\n\r]{1,5}",
        "[0-9.,]{1,8}",
        "[àéîõüßñçÆØ]{1,4}",
        "[中文日本語한국어]{1,4}",
        Just("👨‍👩‍👧".to_owned()),
        Just("🇫🇷".to_owned()),
        Just("e\u{301}".to_owned()),
        any::<char>().prop_map(|c| c.to_string()),
        "'(s|t|re|ve|m|ll|d)",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

/// Whether every byte of `s` has a byte-level token. SmolLM2's vocabulary lacks a few bytes
/// (0xF1, 0xC0, ...); llama.cpp drops such bytes, so text containing them cannot round-trip.
fn representable(s: &str) -> bool {
    static BYTES: std::sync::OnceLock<[bool; 256]> = std::sync::OnceLock::new();
    let table = BYTES.get_or_init(|| {
        let tok = smollm2();
        let mut t = [false; 256];
        for id in 0..tok.vocab_size() as u32 {
            if let Some(&[b]) = tok.token_bytes(id) {
                t[usize::from(b)] = true;
            }
        }
        t
    });
    s.bytes().all(|b| table[usize::from(b)])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decode_inverts_encode(s in text().prop_filter("representable", |s| representable(s))) {
        let tok = smollm2();
        let ids = tok.encode(&s, false, false);
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }

    #[test]
    fn stream_never_splits_a_character(s in text().prop_filter("representable", |s| representable(s))) {
        let tok = smollm2();
        let ids = tok.encode(&s, false, false);
        let mut dec = StreamDecoder::new(false);
        let mut streamed = String::new();
        for &id in &ids {
            let chunk = dec.push(tok, id);
            prop_assert!(!chunk.contains(REPLACEMENT) || s.contains(REPLACEMENT));
            streamed.push_str(&chunk);
        }
        streamed.push_str(&dec.finish());
        prop_assert_eq!(streamed, s);
    }

    #[test]
    fn stream_of_arbitrary_ids_equals_lossy_decode(ids in prop::collection::vec(0u32..49152, 0..40)) {
        let tok = smollm2();
        let mut dec = StreamDecoder::new(false);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&dec.push(tok, id));
        }
        streamed.push_str(&dec.finish());
        prop_assert_eq!(streamed, tok.decode(&ids, false).unwrap());
    }
}

#[test]
fn emoji_ids_pushed_one_by_one_rebuild_the_text() {
    let tok = smollm2();
    let s = "family 👨‍👩‍👧‍👦, flag 🇯🇵, 😀!";
    let ids = tok.encode(s, false, false);
    // Emoji are split over several byte-level tokens, so some pushes must return nothing.
    let mut dec = StreamDecoder::new(true);
    let chunks: Vec<String> = ids.iter().map(|&id| dec.push(tok, id)).collect();
    assert!(chunks.iter().any(String::is_empty), "{chunks:?}");
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
    assert_eq!(chunks.concat() + &dec.finish(), s);
}

#[test]
fn finish_flushes_an_incomplete_character_lossily() {
    let tok = smollm2();
    // The first byte of "😀" (F0) alone is a byte-level token.
    let f0 = tok.token_to_id("ð").unwrap();
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(tok, f0), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
}
