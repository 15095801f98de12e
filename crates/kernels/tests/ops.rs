//! Public-API tests of the element-wise operations and the f16 helpers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use souverain_kernels::{
    Rope, RopeStyle, add_assign, axpy_f16, dot_f16, dot_f32, f16, f16_to_f32_slice,
    f32_to_f16_slice, rms_norm, softmax, swiglu,
};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-2f32..2.0)).collect()
}

#[test]
fn rope_at_position_zero_is_identity() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = rand_vec(&mut rng, 3 * 16);
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        let mut y = x.clone();
        Rope::new(16, 16, 10000.0, style).apply(0, &mut y);
        assert_eq!(y, x, "{style:?}");
    }
}

#[test]
fn rope_pairs_and_known_angles() {
    // One head of 8, rope_dim 8, base 10000, position 1: pair i turns by 10000^(-2i/8).
    let angles: Vec<f32> = (0..4)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / 8.0))
        .collect();
    // Normal: the pair (x[0], x[1]) = (1, 0) turns to (cos θ0, sin θ0).
    let mut x = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    Rope::new(8, 8, 10000.0, RopeStyle::Normal).apply(1, &mut x);
    assert!((x[0] - angles[0].cos()).abs() < 1e-6 && (x[1] - angles[0].sin()).abs() < 1e-6);
    assert!(x[2..].iter().all(|&v| v == 0.0));
    // NeoX: element 1 pairs with element 1 + 4, turning by θ1.
    let mut x = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    Rope::new(8, 8, 10000.0, RopeStyle::NeoX).apply(1, &mut x);
    assert!((x[1] - angles[1].cos()).abs() < 1e-6);
    assert!((x[5] - angles[1].sin()).abs() < 1e-6);
    assert!(x[0] == 0.0 && x[2] == 0.0 && x[3] == 0.0 && x[4] == 0.0);
    // Position 3 on pair 0 turns by 3 radians.
    let mut x = [0.0, 2.0, 0.0, 0.0];
    Rope::new(4, 4, 500.0, RopeStyle::Normal).apply(3, &mut x);
    assert!((x[0] + 2.0 * 3f32.sin()).abs() < 1e-6 && (x[1] - 2.0 * 3f32.cos()).abs() < 1e-6);
}

#[test]
fn rope_preserves_pair_norms_and_leaves_tail_dims() {
    let mut rng = StdRng::seed_from_u64(2);
    let (n_heads, head_dim, rope_dim) = (4, 24, 16);
    let x = rand_vec(&mut rng, n_heads * head_dim);
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        let mut y = x.clone();
        Rope::new(head_dim, rope_dim, 10000.0, style).apply(1234, &mut y);
        for h in 0..n_heads {
            let (xh, yh) = (
                &x[h * head_dim..][..head_dim],
                &y[h * head_dim..][..head_dim],
            );
            for i in 0..rope_dim / 2 {
                let (a, b) = match style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::NeoX => (i, i + rope_dim / 2),
                };
                let n0 = xh[a].hypot(xh[b]);
                let n1 = yh[a].hypot(yh[b]);
                assert!(
                    (n0 - n1).abs() <= 1e-5 * n0.max(1.0),
                    "{style:?} head {h} pair {i}"
                );
            }
            assert_eq!(
                &xh[rope_dim..],
                &yh[rope_dim..],
                "{style:?}: dims past rope_dim"
            );
            assert_ne!(&xh[..rope_dim], &yh[..rope_dim]);
        }
    }
    // The two styles pair different elements, so they disagree.
    let (mut a, mut b) = (x.clone(), x.clone());
    Rope::new(head_dim, rope_dim, 10000.0, RopeStyle::Normal).apply(7, &mut a);
    Rope::new(head_dim, rope_dim, 10000.0, RopeStyle::NeoX).apply(7, &mut b);
    assert_ne!(a, b);
}

#[test]
fn softmax_sums_to_one_and_handles_extremes() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut x = rand_vec(&mut rng, 100);
    softmax(&mut x);
    let sum: f32 = x.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5);
    assert!(x.iter().all(|&p| p > 0.0));

    let mut x = [1000.0, 1000.0, f32::NEG_INFINITY, 999.0];
    softmax(&mut x);
    assert!(x.iter().all(|v| v.is_finite()));
    assert_eq!(x[2], 0.0);
    assert_eq!(x[0], x[1]);
    let e = (-1f32).exp();
    assert!((x[3] - e / (2.0 + e)).abs() < 1e-6);

    let mut x = [f32::NEG_INFINITY; 4];
    softmax(&mut x);
    assert_eq!(x, [0.25; 4]);

    let mut x = [-3.0e38f32, 3.0e38];
    softmax(&mut x);
    assert_eq!(x, [0.0, 1.0]);
    softmax(&mut []);
}

#[test]
fn rms_norm_swiglu_add() {
    let x = [1.0f32, -2.0, 3.0, -4.0];
    let w = [1.0f32, 2.0, 0.5, 1.0];
    let mut out = [0f32; 4];
    rms_norm(&x, &w, 1e-6, &mut out);
    let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0f32 + 1e-6).sqrt();
    for i in 0..4 {
        assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
    }
    let mut g = [0.0f32, 1.0, -1.0];
    swiglu(&mut g, &[5.0, 2.0, 2.0]);
    assert_eq!(g[0], 0.0);
    assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-6);
    assert!((g[2] + 2.0 * 0.268_941_43).abs() < 1e-6);
    let mut y = [1.0f32, 2.0];
    add_assign(&mut y, &[0.5, -2.0]);
    assert_eq!(y, [1.5, 0.0]);
}

#[test]
fn f16_helpers_agree_with_f32_math() {
    let mut rng = StdRng::seed_from_u64(4);
    let a = rand_vec(&mut rng, 77);
    let b = rand_vec(&mut rng, 77);
    let mut ah = vec![f16::ZERO; 77];
    let mut bh = vec![f16::ZERO; 77];
    f32_to_f16_slice(&a, &mut ah);
    f32_to_f16_slice(&b, &mut bh);
    let mut a2 = vec![0f32; 77];
    let mut b2 = vec![0f32; 77];
    f16_to_f32_slice(&ah, &mut a2);
    f16_to_f32_slice(&bh, &mut b2);
    for (orig, round) in a.iter().zip(&a2) {
        assert!((orig - round).abs() <= orig.abs() * 2f32.powi(-11));
    }
    let exact: f64 = a2
        .iter()
        .zip(&b2)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let abs: f32 = a2.iter().zip(&b2).map(|(x, y)| (x * y).abs()).sum();
    assert!((f64::from(dot_f16(&ah, &bh)) - exact).abs() <= f64::from(1e-5 * abs));
    assert!((f64::from(dot_f32(&a2, &b2)) - exact).abs() <= f64::from(1e-5 * abs));
    let mut y = a.clone();
    axpy_f16(&mut y, 0.5, &bh);
    for i in 0..77 {
        assert!((y[i] - (a[i] + 0.5 * b2[i])).abs() <= 1e-6 * (a[i].abs() + b2[i].abs()));
    }
}
