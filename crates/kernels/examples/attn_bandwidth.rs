//! Measures the f16 attention kernels of one decode step at depth: every layer's keys
//! scored by a KV head's query heads together (`dot_f16_rows_group`) and its values
//! weighted (`axpy_f16_rows_group`), run by run (`RUN` slots, default 16, of every KV head,
//! `kv_dim` apart), against the bytes they read: how close decode attention comes to the
//! memory bandwidth.
//!
//! `cargo run -p souverain-kernels --release --example attn_bandwidth [depth] [shape]`
//!
//! Shapes: `smollm2` (30 layers, 9 heads, 3 KV heads, head size 64; the default) and
//! `gemma3` (18 layers, 4 heads, 1 KV head, head size 256). `LAYERS=n` overrides the layer
//! count (1 layer of a short depth stays in the caches: the kernels' arithmetic alone),
//! `THREADS=n` (default 1) splits the layers between threads, `REPS=n` (default 5): the
//! best repetition is reported.

use std::time::Instant;

use half::f16;
use souverain_kernels::{axpy_f16_rows_group, dot_f16_rows_group, simd_level};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let depth: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8000)
        .max(1);
    let (layers, heads, kv_heads, hd) = match std::env::args().nth(2).as_deref() {
        Some("gemma3") => (18, 4, 1, 256),
        _ => (30, 9, 3, 64),
    };
    let layers = env("LAYERS", layers).max(1);
    let run = env("RUN", 16).max(1);
    let threads = env("THREADS", 1).clamp(1, layers);
    let reps = env("REPS", 5).max(1);
    let group = heads / kv_heads;
    let kv_dim = kv_heads * hd;
    let n = layers * depth * kv_dim;
    let keys: Vec<f16> = (0..n)
        .map(|i| f16::from_f32(((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5))
        .collect();
    let values = keys.clone();
    let q: Vec<f16> = (0..group * hd)
        .map(|i| f16::from_f32(i as f32 * 1e-3))
        .collect();
    let w: Vec<f32> = (0..group * depth).map(|i| (i % 7) as f32 * 1e-4).collect();
    let bytes = 2.0 * 2.0 * n as f64;
    println!(
        "simd: {}, depth {depth}, {layers} layers, {heads}/{kv_heads} heads x {hd}, runs of {run}, {threads} threads",
        simd_level()
    );
    // One thread's layers: every KV head's runs scored, then weighted; (seconds in the
    // scores, a checksum).
    let layer_step = |ls: std::ops::Range<usize>| {
        let mut scores = vec![0f32; group * depth];
        let mut y = vec![0f32; group * hd];
        let mut dots = 0.0;
        for l in ls {
            let base = l * depth * kv_dim;
            let td = Instant::now();
            for kvh in 0..kv_heads {
                for b in (0..depth).step_by(run) {
                    let len = run.min(depth - b);
                    let at = base + b * kv_dim + kvh * hd;
                    dot_f16_rows_group(&q, hd, &keys[at..], kv_dim, len, &mut scores[b..], depth);
                }
            }
            dots += td.elapsed().as_secs_f64();
            for kvh in 0..kv_heads {
                for b in (0..depth).step_by(run) {
                    let len = run.min(depth - b);
                    let at = base + b * kv_dim + kvh * hd;
                    axpy_f16_rows_group(&mut y, hd, &w[b..], depth, len, &values[at..], kv_dim);
                }
            }
        }
        (dots, scores[depth - 1] + y[0])
    };
    let (mut best, mut best_dots, mut check) = (f64::MAX, f64::MAX, 0f32);
    for _ in 0..reps {
        let t = Instant::now();
        let per = layers.div_ceil(threads);
        let results: Vec<(f64, f32)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let ls = (i * per).min(layers)..((i + 1) * per).min(layers);
                    let step = &layer_step;
                    s.spawn(move || step(ls))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let dt = t.elapsed().as_secs_f64();
        best = best.min(dt);
        best_dots = best_dots.min(results.iter().map(|r| r.0).fold(0.0, f64::max));
        check += results.iter().map(|r| r.1).sum::<f32>();
    }
    println!(
        "best of {reps}: {:.1} us per token (scores {:.1} us), {:.1} GB/s (checksum {check:.3})",
        best * 1e6,
        best_dots * 1e6,
        bytes / best / 1e9,
    );
}
