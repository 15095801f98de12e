//! The crate's integration tests, one binary (one link of the dependency graph instead of
//! one per file): each file under tests/it/ is a module.

mod auth;
mod cli;
mod common;
mod route;
mod serve_dir;
