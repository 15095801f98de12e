//! Shared test helpers: the SmolLM2 tokenizer built from the committed golden spec.

use std::path::PathBuf;
use std::sync::OnceLock;

use souverain_tokenizer::{Tokenizer, TokenizerSpec};

/// Path of a file under `tests/golden/`.
pub(crate) fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

/// The SmolLM2 spec, as dumped by `scripts/golden/llamacpp_tokenize.py`.
pub(crate) fn smollm2_spec() -> TokenizerSpec {
    let text = std::fs::read_to_string(golden_path("smollm2-spec.json")).expect("read spec");
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("parse spec");
    serde_json::from_value(doc["spec"].take()).expect("spec shape")
}

/// The SmolLM2 tokenizer, built once per test binary.
pub(crate) fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_spec(smollm2_spec()).expect("build tokenizer"))
}
