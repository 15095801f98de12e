//! Feeds arbitrary text to the Batch API's input-file check: it must return `Ok` or `Err`,
//! never panic or hang, and what it accepts holds between 1 and `MAX_BATCH_REQUESTS`
//! requests, no more than the text has lines.
//!
//! Run with `cargo +nightly fuzz run batch_file` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use souverain_api::{MAX_BATCH_REQUESTS, check_batch_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = check_batch_file(text) {
        assert!((1..=MAX_BATCH_REQUESTS).contains(&n));
        assert!(n <= text.lines().count());
    }
});
