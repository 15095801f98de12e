//! Measures one token through a Gemma 3 270M-sized output head (262,144 x 640) in Q8_0 and
//! Q4_0, packed, against a plain read of the same bytes on the pool: how close the packed
//! kernels come to the memory bandwidth in decode.
//!
//! `cargo run -p souverain-kernels --release --example head_bandwidth [n_threads]`
//!
//! `SHAPES=gemma-layers` measures the layers' shapes instead (`SHAPES=mistral7b` Mistral 7B's
//! Q4_K_M matrices, which outgrow the caches); `TOKENS=n` (default 1) times
//! `n` tokens at once (prompt processing: arithmetic-bound, reported per token).

use std::time::Instant;

use souverain_kernels::{Matrix, PackedMatrix, ThreadPool, WeightType, matmul_packed, simd_level};

fn main() {
    let n_threads = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2usize);
    let pool = ThreadPool::new(n_threads);
    let tokens: usize = std::env::var("TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    println!("simd: {}, threads: {}", simd_level(), pool.n_threads());
    let shapes: Vec<(WeightType, usize, usize)> = match std::env::var("SHAPES").ok().as_deref() {
        Some("gemma-layers") => vec![
            (WeightType::Q5_0, 2048, 640),
            (WeightType::Q5_0, 1024, 640),
            (WeightType::Q5_0, 256, 640),
            (WeightType::Q8_0, 256, 640),
            (WeightType::Q4_K, 640, 1024),
            (WeightType::Q6_K, 640, 2048),
        ],
        Some("mistral7b") => vec![
            (WeightType::Q4_K, 14_336, 4096),
            (WeightType::Q6_K, 4096, 14_336),
            (WeightType::Q4_K, 4096, 4096),
        ],
        _ => vec![
            (WeightType::Q8_0, 262_144, 640),
            (WeightType::Q4_0, 262_144, 640),
        ],
    };
    for (ty, rows, cols) in shapes {
        let bytes = ty.row_bytes(cols).unwrap_or(0) * rows;
        // Valid blocks: small f16 scales (0x1000 = 2^-11·…), any quant bytes.
        let mut data: Vec<u8> = (0..bytes)
            .map(|i| (i * 2_654_435_761 % 251) as u8)
            .collect();
        if matches!(ty, WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q5_0) {
            let block = ty.row_bytes(32).unwrap_or(1);
            for b in data.chunks_exact_mut(block) {
                b[0] = 0x00;
                b[1] = 0x10;
            }
        }
        let Ok(w) = Matrix::new(ty, &data, rows, cols) else {
            return;
        };
        let Some(p) = PackedMatrix::pack(&w) else {
            println!("{ty:?}: no packed kernel here");
            continue;
        };
        let x: Vec<f32> = (0..cols * tokens)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut y = vec![0f32; rows * tokens];
        let work = rows * cols * tokens;
        let reps = (2000 * (1 << 20) / work.max(1)).clamp(5, 2000) as u32;
        let _ = matmul_packed(&pool, &p, &x, tokens, &mut y);
        let start = Instant::now();
        for _ in 0..reps {
            let _ = matmul_packed(&pool, &p, &x, tokens, &mut y);
        }
        let t = start.elapsed().as_secs_f64() / f64::from(reps);
        if tokens > 1 {
            println!(
                "{ty:?} {rows}x{cols} packed, {tokens} tokens: {:.1} us per token, {:.1} GMAC/s",
                t * 1e6 / tokens as f64,
                work as f64 / t / 1e9
            );
            continue;
        }
        println!(
            "{ty:?} {rows}x{cols} packed, 1 token: {:.1} us, {:.1} GB/s of weights",
            t * 1e6,
            bytes as f64 / t / 1e9
        );
        // A plain read of as many bytes, split over the pool as the matmul splits rows.
        let chunks: Vec<&[u8]> = data.chunks(bytes.div_ceil(pool.n_threads() * 8)).collect();
        let sums: Vec<std::sync::atomic::AtomicU64> =
            (0..chunks.len()).map(|_| Default::default()).collect();
        let start = Instant::now();
        for _ in 0..reps {
            pool.parallel_for(chunks.len(), &|i| {
                let mut acc = 0u64;
                for c in chunks[i].chunks_exact(8) {
                    acc = acc.wrapping_add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
                }
                sums[i].store(acc, std::sync::atomic::Ordering::Relaxed);
            });
        }
        let t = start.elapsed().as_secs_f64() / f64::from(reps);
        println!(
            "  plain read of the same bytes: {:.1} us, {:.1} GB/s",
            t * 1e6,
            bytes as f64 / t / 1e9
        );
        std::hint::black_box(&y);
    }
}
