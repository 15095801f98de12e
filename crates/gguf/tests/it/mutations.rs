//! Random and exhaustive corruption of a valid file never panics: every input gives `Ok`
//! (with all invariants holding) or a typed error.

use crate::common;

use common::{sample_bytes, touch_everything};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use souverain_gguf::GgufFile;

fn check(bytes: Vec<u8>) {
    if let Ok(file) = GgufFile::from_bytes(bytes) {
        touch_everything(&file);
    }
}

fn runner(seed: u8, cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

#[test]
fn random_mutations_and_truncations_never_panic() {
    let original = sample_bytes();
    let len = original.len();
    let strategy = (
        proptest::collection::vec((0..len, any::<u8>()), 1..16),
        proptest::option::of(0..len),
    );
    runner(7, 4096)
        .run(&strategy, |(edits, cut)| {
            let mut bytes = original.clone();
            for (at, byte) in edits {
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            check(bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_edits_of_header_fields_never_panic() {
    // Overwrite aligned 8-byte windows of the header with extreme values, where the counts,
    // lengths and offsets live, more often than random bytes would.
    let original = sample_bytes();
    let header_len = GgufFile::from_bytes(original.clone())
        .unwrap()
        .data_offset() as usize;
    let values = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(1 << 32),
        Just(u64::from(u32::MAX)),
        any::<u64>(),
    ];
    runner(11, 4096)
        .run(&(0..header_len - 8, values), |(at, value)| {
            let mut bytes = original.clone();
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            check(bytes.clone());
            bytes[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
            check(bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn every_single_byte_corruption_never_panics() {
    let original = sample_bytes();
    for at in 0..original.len() {
        for byte in [
            0x00,
            0x01,
            0x09,
            0x0d,
            0x7f,
            0x80,
            0xff,
            original[at] ^ 0xff,
        ] {
            let mut bytes = original.clone();
            bytes[at] = byte;
            check(bytes);
        }
    }
}
