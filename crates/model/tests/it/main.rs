//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod batch;
mod gemma_dequant;
mod hf_golden;
mod llamacpp_golden;
