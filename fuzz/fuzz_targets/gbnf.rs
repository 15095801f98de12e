//! Feeds arbitrary text to the GBNF converter: it must return `Ok` or `Err`, never panic,
//! overflow the stack or hang, and what it accepts must be a Lark grammar with a start rule.
//!
//! Run with `cargo +nightly fuzz run gbnf` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use souverain_engine::gbnf_to_lark;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match gbnf_to_lark(text) {
        Ok(lark) => assert!(lark.starts_with("start: "), "{lark}"),
        Err(e) => {
            // Every error but a size error points into the grammar.
            if let Some((line, column)) = e.position() {
                assert!(line >= 1 && column >= 1);
                assert!(line <= text.lines().count().max(1) + 1, "{e}");
            }
        }
    }
});
