//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod anthropic;
mod common;
mod control;
mod embeddings;
mod http;
mod models;
mod module_graph;
mod ollama;
