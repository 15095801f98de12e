//! Token-exact agreement of [`WordPiece`] with Hugging Face `tokenizers` on all-MiniLM-L6-v2.
//!
//! The golden file comes from `scripts/golden/sentence_transformers.py`; the tokenizer.json is
//! the model's, put into the model cache by `scripts/fetch-embedding-model` (or named by
//! `SOUVERAIN_EMBEDDING_MODEL`, a model directory). Without it the test is skipped with a note,
//! unless `SOUVERAIN_REQUIRE_MODEL` is set (as `scripts/test` does).

use std::path::PathBuf;

use serde::Deserialize;
use souverain_tokenizer::WordPiece;

#[derive(Deserialize)]
struct Golden {
    generated_by: String,
    tokenizer_json_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    token_ids: Vec<u32>,
}

fn golden() -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/minilm-wordpiece.json");
    let text = std::fs::read_to_string(path).expect("read golden");
    serde_json::from_str(&text).expect("parse golden")
}

#[test]
fn every_string_tokenizes_as_hugging_face_does() {
    let Some(dir) = testkit::embedding_model("tokenizer.json") else {
        return;
    };
    let g = golden();
    assert_eq!(g.generated_by, "scripts/golden/sentence_transformers.py");
    assert_eq!(g.tokenizer_json_sha256.len(), 64);
    assert!(g.cases.len() >= 400, "{} cases", g.cases.len());
    let json = std::fs::read_to_string(dir.join("tokenizer.json")).expect("read tokenizer.json");
    let tok = WordPiece::from_json(&json).expect("build tokenizer");
    assert_eq!(tok.vocab_size(), 30522);
    let mut failures = Vec::new();
    for case in &g.cases {
        let ids = tok.encode(&case.text, true);
        if ids != case.token_ids {
            failures.push(format!(
                "{:?}\n  ours: {ids:?}\n  hf:   {:?}",
                case.text, case.token_ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} strings differ:\n{}",
        failures.len(),
        g.cases.len(),
        failures.join("\n")
    );
}
