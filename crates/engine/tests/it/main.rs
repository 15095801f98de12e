//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod chat_templates;
mod common;
mod concurrency;
mod embed_golden;
mod energy;
mod fim;
mod gbnf;
mod gemma3;
mod kv_q8;
mod latent_attention;
mod prompt_logprobs;
mod sliding_window;
mod speculation;
mod structured;
