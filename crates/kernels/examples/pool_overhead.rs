//! Measures the fixed cost of `ThreadPool::parallel_for` (a token's forward pass makes about
//! 200 calls) and the throughput of a Q4_1 matmul of a typical small-model shape.
//!
//! `cargo run -p souverain-kernels --release --example pool_overhead [n_threads]`

use std::time::Instant;

use souverain_kernels::{Matrix, ThreadPool, WeightType, matmul, simd_level};

fn main() {
    let n_threads = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2usize);
    let pool = ThreadPool::new(n_threads);
    println!("simd: {}, threads: {}", simd_level(), pool.n_threads());

    let calls = 20_000u32;
    let start = Instant::now();
    for _ in 0..calls {
        pool.parallel_for(pool.n_threads() * 4, &|i| {
            std::hint::black_box(i);
        });
    }
    let per_call = start.elapsed() / calls;
    println!("parallel_for, empty tasks: {per_call:?} per call");

    // 1536 x 576 Q4_1 (an MLP projection of a ~135M-parameter model), one token.
    let (rows, cols) = (1536usize, 576usize);
    let bytes = WeightType::Q4_1.row_bytes(cols).unwrap_or(0) * rows;
    let data: Vec<u8> = (0..bytes)
        .map(|i| (i * 2_654_435_761 % 251) as u8 & 0x3f)
        .collect();
    let w = match Matrix::new(WeightType::Q4_1, &data, rows, cols) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return;
        }
    };
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; rows];
    let iters = 2_000u32;
    let start = Instant::now();
    for _ in 0..iters {
        if let Err(e) = matmul(&pool, &w, &x, 1, &mut y) {
            eprintln!("{e}");
            return;
        }
    }
    let per = start.elapsed() / iters;
    let gbs = bytes as f64 / per.as_secs_f64() / 1e9;
    println!("matmul {rows}x{cols} Q4_1, 1 token: {per:?} ({gbs:.1} GB/s of weights)");

    // Matrices far larger than the caches (two of them, used in turn): what generation with a
    // 7B model sees. Rows of 4096 (a Mistral-7B projection).
    for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
        let (rows, cols) = (8192usize, 4096usize);
        let bytes = ty.row_bytes(cols).unwrap_or(0) * rows;
        let mats: Vec<Vec<u8>> = (0..4)
            .map(|m| {
                (0..bytes)
                    .map(|i| ((i + m) * 2_654_435_761 % 251) as u8 & 0x3f)
                    .collect()
            })
            .collect();
        let ws: Vec<Matrix<'_>> = mats
            .iter()
            .filter_map(|d| Matrix::new(ty, d, rows, cols).ok())
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0f32; rows];
        let iters = 40u32;
        let start = Instant::now();
        for i in 0..iters {
            let w = &ws[i as usize % ws.len()];
            if let Err(e) = matmul(&pool, w, &x, 1, &mut y) {
                eprintln!("{e}");
                return;
            }
        }
        let per = start.elapsed() / iters;
        let gbs = bytes as f64 / per.as_secs_f64() / 1e9;
        println!("matmul {rows}x{cols} {ty:?} from DRAM, 1 token: {per:?} ({gbs:.1} GB/s)");
    }
}
