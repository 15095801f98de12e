//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod common;
mod hf_tokenizer_json;
mod llamacpp_golden;
mod mistral_golden;
mod properties;
mod wordpiece_golden;
