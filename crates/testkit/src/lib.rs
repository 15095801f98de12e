//! Test support shared by the integration tests of every crate: where the files a test needs
//! but the repository does not hold (models, tokenizer files, a PostgreSQL database) are
//! found, and what a test does when one is missing.
//!
//! The rule is the same everywhere: a missing asset skips the test with a `skipped: …` line on
//! stderr, unless the matching `SOUVERAIN_REQUIRE_*` variable is set (as `scripts/test` and CI
//! set them), in which case it fails the test. A required asset is never silently passed over.
//!
//! ```no_run
//! let Some(path) = souverain_testkit::default_model() else { return };
//! assert!(path.is_file());
//! ```
//!
//! This crate is a dev-dependency only and depends on nothing of ours, so any crate's tests
//! may use it without a dependency cycle. It reads no machine-specific paths: only the
//! variables below and the caches under `$HOME` that the fetch scripts fill.

#![deny(missing_docs)]

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

/// The file name of the default model (SmolLM2-135M-Instruct, Q4_1) in the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The directory name of the embedding model (all-MiniLM-L6-v2) in the model cache.
pub const EMBEDDING_MODEL_DIR: &str = "all-MiniLM-L6-v2";
/// The file name of the Gemma 3 270M Q4_K_M test model in the model cache.
pub const GEMMA_TEST_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Makes a missing model or tokenizer file a failure when set (to anything but `0`).
pub const REQUIRE_MODEL_VAR: &str = "SOUVERAIN_REQUIRE_MODEL";
/// Makes a missing PostgreSQL database a failure when set (to anything but `0`).
pub const REQUIRE_POSTGRES_VAR: &str = "SOUVERAIN_REQUIRE_POSTGRES";
/// Names the PostgreSQL database the store tests may create schemas in.
pub const DATABASE_URL_VAR: &str = "SOUVERAIN_TEST_DATABASE_URL";

/// Whether the variable `name` asks for missing assets to fail tests: it is set, and to
/// something other than the empty string or `0`.
pub fn required(name: &str) -> bool {
    asks_to_require(std::env::var_os(name).as_deref())
}

/// The rule behind [`required`], on the variable's value.
fn asks_to_require(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Gives up on a missing asset: panics (failing the test) when `require_var` says it is
/// required, else prints `skipped: <what> is missing (<hint>)` on stderr and returns `None`,
/// so a test can end with `let Some(x) = … else { return };`.
#[track_caller]
pub fn skip_or_fail<T>(require_var: &str, what: &str, hint: &str) -> Option<T> {
    assert!(
        !required(require_var),
        "{require_var} is set but {what} is missing ({hint})"
    );
    eprintln!("skipped: {what} is missing ({hint})");
    None
}

/// The model cache the fetch scripts fill: `$SOUVERAIN_MODELS`, else
/// `~/.cache/souverain/models`.
pub fn model_cache() -> Option<PathBuf> {
    env_path("SOUVERAIN_MODELS").or_else(|| home_cache("models"))
}

/// The first existing candidate: the path the variable `var` names, then `cached` below the
/// model cache. `present` decides what counts as existing.
fn find_model(var: &str, cached: &str, present: impl Fn(&PathBuf) -> bool) -> Option<PathBuf> {
    [env_path(var), model_cache().map(|d| d.join(cached))]
        .into_iter()
        .flatten()
        .find(present)
}

/// The default model, SmolLM2-135M-Instruct Q4_1 GGUF: `$SOUVERAIN_TEST_MODEL`, else the model
/// cache (`scripts/fetch-model`). `None` (after a `skipped:` note) when it is missing and not
/// required; a panic when `SOUVERAIN_REQUIRE_MODEL` is set.
#[track_caller]
pub fn default_model() -> Option<PathBuf> {
    match find_model("SOUVERAIN_TEST_MODEL", DEFAULT_MODEL_FILE, |p| p.is_file()) {
        Some(path) => Some(path),
        None => skip_or_fail(
            REQUIRE_MODEL_VAR,
            "the default model",
            "run scripts/fetch-model or set SOUVERAIN_TEST_MODEL",
        ),
    }
}

/// The embedding model's directory (all-MiniLM-L6-v2, Hugging Face layout) holding the file
/// `needs`: `$SOUVERAIN_EMBEDDING_MODEL`, else the model cache
/// (`scripts/fetch-embedding-model`). Missing: as [`default_model`].
#[track_caller]
pub fn embedding_model(needs: &str) -> Option<PathBuf> {
    match find_model("SOUVERAIN_EMBEDDING_MODEL", EMBEDDING_MODEL_DIR, |d| {
        d.join(needs).is_file()
    }) {
        Some(dir) => Some(dir),
        None => skip_or_fail(
            REQUIRE_MODEL_VAR,
            "the embedding model",
            "run scripts/fetch-embedding-model or set SOUVERAIN_EMBEDDING_MODEL",
        ),
    }
}

/// The Gemma 3 270M Q4_K_M test model: `$SOUVERAIN_TEST_GEMMA`, else the model cache
/// (`scripts/fetch-test-models`). Missing: as [`default_model`].
pub fn gemma_test_model() -> Option<PathBuf> {
    find_model("SOUVERAIN_TEST_GEMMA", GEMMA_TEST_MODEL_FILE, |p| {
        p.is_file()
    })
    .or_else(|| {
        skip_or_fail(
            REQUIRE_MODEL_VAR,
            GEMMA_TEST_MODEL_FILE,
            "run scripts/fetch-test-models or set SOUVERAIN_TEST_GEMMA",
        )
    })
}

/// The directory of Mistral's tokenizer files: `$SOUVERAIN_MISTRAL_TOKENIZERS`, else
/// `~/.cache/souverain/mistral-common` (`scripts/fetch-mistral-tokenizers`). It may not exist.
pub fn mistral_tokenizer_dir() -> Option<PathBuf> {
    env_path("SOUVERAIN_MISTRAL_TOKENIZERS").or_else(|| home_cache("mistral-common"))
}

/// One of Mistral's tokenizer files (`tekken_240911.json`, `tokenizer.model.v3`, …) in
/// [`mistral_tokenizer_dir`]. Missing: as [`default_model`].
#[track_caller]
pub fn mistral_tokenizer_file(name: &str) -> Option<PathBuf> {
    match mistral_tokenizer_dir().map(|d| d.join(name)) {
        Some(path) if path.is_file() => Some(path),
        _ => skip_or_fail(
            REQUIRE_MODEL_VAR,
            &format!("Mistral's tokenizer file {name}"),
            "run scripts/fetch-mistral-tokenizers or set SOUVERAIN_MISTRAL_TOKENIZERS",
        ),
    }
}

/// A real chat template (`Qwen-Qwen3-0.6B.jinja`, ...) from `$SOUVERAIN_CHAT_TEMPLATES`, else
/// `~/.cache/souverain/chat-templates` (`scripts/fetch-chat-templates`). Missing: as
/// [`default_model`].
#[track_caller]
pub fn chat_template_file(name: &str) -> Option<PathBuf> {
    let dir = env_path("SOUVERAIN_CHAT_TEMPLATES").or_else(|| home_cache("chat-templates"));
    match dir.map(|d| d.join(name)) {
        Some(path) if path.is_file() => Some(path),
        _ => skip_or_fail(
            REQUIRE_MODEL_VAR,
            &format!("the chat template {name}"),
            "run scripts/fetch-chat-templates or set SOUVERAIN_CHAT_TEMPLATES",
        ),
    }
}

/// `crates/engine/tests/golden/chat_templates.json` (made by
/// `scripts/golden/chat_templates.py`): what transformers renders with each real template.
pub fn chat_templates_golden() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/golden/chat_templates.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the chat-template golden is JSON")
}

/// The sha256 of `text`, in lower-case hex.
pub fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The PostgreSQL URL in `$SOUVERAIN_TEST_DATABASE_URL`; when it is unset or empty, `None`
/// (after a `skipped:` note) unless `SOUVERAIN_REQUIRE_POSTGRES` is set, which fails the test.
#[track_caller]
pub fn database_url() -> Option<String> {
    match std::env::var(DATABASE_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => skip_or_fail(
            REQUIRE_POSTGRES_VAR,
            "a PostgreSQL database",
            "set SOUVERAIN_TEST_DATABASE_URL; scripts/ci/postgres start prints one",
        ),
    }
}

/// The path in the variable `name`, when it is set and not empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `~/.cache/souverain/<name>`, when `HOME` is set.
fn home_cache(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h: &OsString| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/souverain").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_to_anything_but_empty_or_zero_requires() {
        assert!(!asks_to_require(None));
        assert!(!asks_to_require(Some(OsStr::new(""))));
        assert!(!asks_to_require(Some(OsStr::new("0"))));
        assert!(asks_to_require(Some(OsStr::new("1"))));
        assert!(asks_to_require(Some(OsStr::new("yes"))));
    }

    #[test]
    fn an_absent_asset_that_is_not_required_is_skipped() {
        // A variable no environment sets: never required, so the asset is skipped.
        let none: Option<()> = skip_or_fail("SOUVERAIN_TESTKIT_NEVER_SET", "nothing", "no hint");
        assert!(none.is_none());
    }
}
