//! What the engine's golden tests share: llama.cpp's prompt log-probability golden file.

use std::path::PathBuf;

use serde_json::Value;

/// `tests/golden/llamacpp-prompt-logprobs.json` (made by `scripts/golden/llamacpp_prompt_logprobs.py`), parsed.
pub(crate) fn prompt_logprobs_golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/llamacpp-prompt-logprobs.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("golden")
}

/// A JSON array of token ids.
pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}
