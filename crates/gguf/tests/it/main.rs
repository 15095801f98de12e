//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod common;
mod hostile;
mod mutations;
mod real_model;
mod round_trip;
