//! Property tests: every table kernel of every implementation this CPU supports against the
//! scalar reference, and the quantised dot products against an f32 reference within an
//! error bound derived from the quantisation step; `q32` for the 32-element formats and the
//! float kernels, `kquants` for Q5 and the K-quants.
//!
//! Random data comes from a `StdRng` seeded by a proptest-drawn seed; proptest itself runs
//! with a fixed seed, so every run tests the same cases.

use half::f16;
use proptest::test_runner::{Config, RngSeed};
use rand::Rng;
use rand::rngs::StdRng;

mod kquants;
mod q32;

/// A fixed-seed proptest configuration of `cases` cases.
fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Activation-like data: mostly uniform in ±scale, some outliers, sometimes an all-zero
/// block of `zero_block` elements (the `amax == 0` path of the quantisers).
fn rand_acts(rng: &mut StdRng, n: usize, zero_block: usize) -> Vec<f32> {
    let scale = rng.gen_range(0.01f32..8.0);
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            if rng.gen_ratio(1, 50) {
                rng.gen_range(-40.0f32..40.0)
            } else {
                rng.gen_range(-scale..scale)
            }
        })
        .collect();
    if n >= zero_block && rng.gen_ratio(1, 4) {
        let b = rng.gen_range(0..n / zero_block);
        x[b * zero_block..(b + 1) * zero_block].fill(0.0);
    }
    x
}

/// A random f16 in `lo..hi`, as little-endian bytes.
fn f16_bytes(rng: &mut StdRng, lo: f32, hi: f32) -> [u8; 2] {
    f16::from_f32(rng.gen_range(lo..hi)).to_le_bytes()
}
