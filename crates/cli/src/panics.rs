//! What a panic leaves in the log. Rust's default hook prints the panic's message and where
//! it happened; a panic inside a library that handles client input (a grammar compiler, a
//! template engine) can carry that input in its message and the library's build paths in
//! its location. The server's threads catch such panics and answer an error; this hook keeps
//! the log to the thread and, for our own code only, the file and line: never the message.

/// Replaces the default panic hook for the whole process.
pub(crate) fn install() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        match info
            .location()
            .and_then(|l| ours(l.file()).map(|f| (f, l.line())))
        {
            Some((file, line)) => tracing::error!(
                thread,
                file,
                line,
                "a thread panicked (its message is not logged: it may hold request data)"
            ),
            None => tracing::error!(
                thread,
                "a thread panicked inside a dependency (its message and location are not logged)"
            ),
        }
    }));
}

/// `file` when it is a source file of this workspace (`crates/...`), else `None`.
fn ours(file: &str) -> Option<&str> {
    (file.starts_with("crates/") && !file.contains("..")).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::ours;

    #[test]
    fn only_our_own_files_are_named() {
        assert_eq!(ours(file!()), Some(file!()));
        assert_eq!(
            ours("crates/engine/src/constraint.rs"),
            Some("crates/engine/src/constraint.rs")
        );
        for theirs in [
            "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/llguidance-1.0.0/src/earley/parser.rs",
            "/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/core/src/panicking.rs",
            "src/lib.rs",
            "crates/../../etc/passwd",
        ] {
            assert_eq!(ours(theirs), None, "{theirs}");
        }
    }
}
