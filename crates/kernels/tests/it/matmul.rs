//! Public-API tests of `Matrix`, `dequantize_row` and `matmul`: shape checks, and results
//! that do not depend on the thread count or on how tokens are batched.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use souverain_kernels::{
    BlockQ4_1, KernelError, Matrix, QK, ThreadPool, WeightType, bf16, dequantize_row, f16, matmul,
    simd_level,
};

const ALL_TYPES: [WeightType; 6] = [
    WeightType::F32,
    WeightType::F16,
    WeightType::BF16,
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q8_0,
];

fn rand_f16_bytes(rng: &mut StdRng, lo: f32, hi: f32) -> [u8; 2] {
    f16::from_f32(rng.gen_range(lo..hi)).to_le_bytes()
}

/// Random valid matrix bytes of `ty`.
fn rand_matrix(rng: &mut StdRng, ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    let mut out = Vec::new();
    match ty {
        WeightType::F32 => (0..n).for_each(|_| out.extend(rng.gen_range(-1f32..1.0).to_le_bytes())),
        WeightType::F16 => (0..n).for_each(|_| out.extend(rand_f16_bytes(rng, -1.0, 1.0))),
        WeightType::BF16 => {
            (0..n).for_each(|_| out.extend(bf16::from_f32(rng.gen_range(-1f32..1.0)).to_le_bytes()))
        }
        WeightType::Q4_0 => (0..n / QK).for_each(|_| {
            out.extend(rand_f16_bytes(rng, -0.1, 0.1));
            out.extend((0..16).map(|_| rng.r#gen::<u8>()));
        }),
        WeightType::Q4_1 => (0..n / QK).for_each(|_| {
            out.extend(rand_f16_bytes(rng, 0.0, 0.1));
            out.extend(rand_f16_bytes(rng, -0.5, 0.5));
            out.extend((0..16).map(|_| rng.r#gen::<u8>()));
        }),
        WeightType::Q8_0 => (0..n / QK).for_each(|_| {
            out.extend(rand_f16_bytes(rng, -0.01, 0.01));
            out.extend((0..32).map(|_| rng.gen_range(-127i8..=127) as u8));
        }),
        _ => unreachable!("all types are listed"),
    }
    out
}

#[test]
fn simd_level_is_named() {
    assert!(["scalar", "avx2", "avx512vnni"].contains(&simd_level()));
}

#[test]
fn matrix_new_checks_sizes() {
    let data = vec![0u8; 2 * 18];
    let m = Matrix::new(WeightType::Q4_0, &data, 1, 64).unwrap();
    assert_eq!(
        (m.rows(), m.cols(), m.row_bytes(), m.ty()),
        (1, 64, 36, WeightType::Q4_0)
    );
    assert_eq!(m.row(0).len(), 36);
    assert!(m.get_row(1).is_none());
    assert!(matches!(
        Matrix::new(WeightType::Q4_0, &data, 1, 48),
        Err(KernelError::NotBlockMultiple {
            cols: 48,
            block_len: 32,
            ..
        })
    ));
    assert!(matches!(
        Matrix::new(WeightType::Q4_0, &data, 2, 64),
        Err(KernelError::DataSize {
            expected: 72,
            actual: 36,
            ..
        })
    ));
    assert!(matches!(
        Matrix::new(WeightType::F32, &data, usize::MAX, 2),
        Err(KernelError::Overflow { .. })
    ));
    let empty = Matrix::new(WeightType::F16, &[], 0, 8).unwrap();
    assert_eq!(empty.rows(), 0);
    // The error message names the sizes.
    let msg = Matrix::new(WeightType::Q8_0, &data, 1, 32)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("34") && msg.contains("36"), "{msg}");
}

#[test]
fn dequantize_row_checks_sizes_and_decodes_q4_1() {
    let block = BlockQ4_1 {
        d: f16::from_f32(0.25),
        m: f16::from_f32(-1.0),
        qs: std::array::from_fn(|j| (j as u8) | ((j as u8) << 4)),
    };
    let mut out = [0f32; 32];
    dequantize_row(WeightType::Q4_1, &block.to_bytes(), &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.25 - 1.0);
        assert_eq!(out[j + 16], j as f32 * 0.25 - 1.0);
    }
    assert!(matches!(
        dequantize_row(WeightType::Q4_1, &block.to_bytes()[..19], &mut out),
        Err(KernelError::DataSize { .. })
    ));
    assert!(matches!(
        dequantize_row(WeightType::Q4_1, &block.to_bytes(), &mut out[..31]),
        Err(KernelError::NotBlockMultiple { .. })
    ));
    let mut f = [0f32; 2];
    dequantize_row(WeightType::BF16, &[0x80, 0x3f, 0x00, 0xc0], &mut f).unwrap();
    assert_eq!(f, [1.0, -2.0]);
}

#[test]
fn matmul_checks_lengths() {
    let data = vec![0u8; 3 * 4 * 4];
    let w = Matrix::new(WeightType::F32, &data, 3, 4).unwrap();
    let pool = ThreadPool::new(1);
    let mut y = vec![0f32; 6];
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 7], 2, &mut y),
        Err(KernelError::LengthMismatch {
            expected: 8,
            actual: 7,
            ..
        })
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 8], 2, &mut y[..5]),
        Err(KernelError::LengthMismatch {
            expected: 6,
            actual: 5,
            ..
        })
    ));
    assert!(matmul(&pool, &w, &[], 0, &mut []).is_ok());
}

/// Every (row, token) output is computed by the same kernel call whatever the partition, so
/// pools of 1, 2 and 4 threads agree bit for bit; and a batch of tokens gives the same bits
/// as one call per token.
#[test]
fn matmul_is_deterministic_across_threads_and_batching() {
    let mut rng = StdRng::seed_from_u64(42);
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(4)];
    for ty in ALL_TYPES {
        for &(rows, cols, n_tokens) in &[
            (1usize, 32usize, 1usize),
            (37, 64, 1),
            (70, 96, 5),
            (9, 160, 40),
        ] {
            let data = rand_matrix(&mut rng, ty, rows, cols);
            let w = Matrix::new(ty, &data, rows, cols).unwrap();
            let x: Vec<f32> = (0..n_tokens * cols)
                .map(|_| rng.gen_range(-3f32..3.0))
                .collect();
            let mut reference = vec![0f32; n_tokens * rows];
            matmul(&pools[0], &w, &x, n_tokens, &mut reference).unwrap();
            assert!(reference.iter().all(|v| v.is_finite()));
            for pool in &pools[1..] {
                let mut y = vec![f32::NAN; n_tokens * rows];
                matmul(pool, &w, &x, n_tokens, &mut y).unwrap();
                let same = y
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{ty:?} {rows}x{cols}x{n_tokens} on {} threads",
                    pool.n_threads()
                );
            }
            for t in 0..n_tokens {
                let mut yt = vec![0f32; rows];
                matmul(&pools[2], &w, &x[t * cols..(t + 1) * cols], 1, &mut yt).unwrap();
                let same = yt
                    .iter()
                    .zip(&reference[t * rows..])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} token {t} alone differs from the batch");
            }
        }
    }
}
