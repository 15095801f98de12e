//! Public-API tests of the element-wise operations and the f16 helpers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use souverain_kernels::{
    Rope, RopeScaling, RopeStyle, add_assign, axpy_f16, dot_f16, dot_f32, f16, f16_to_f32_slice,
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

/// Rotates one NeoX head in f64 by the given per-pair angles, cos and sin times `mscale`.
fn rotate_f64(x: &[f32], angles: &[f64], mscale: f64) -> Vec<f32> {
    let half = angles.len();
    let mut y = x.to_vec();
    for (i, &t) in angles.iter().enumerate() {
        let (x0, x1) = (f64::from(x[i]), f64::from(x[i + half]));
        let (c, s) = (t.cos() * mscale, t.sin() * mscale);
        y[i] = (x0 * c - x1 * s) as f32;
        y[i + half] = (x0 * s + x1 * c) as f32;
    }
    y
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(u, v)| (u - v).abs())
        .fold(0.0, f32::max)
}

#[test]
fn rope_without_scaling_is_the_plain_rotation_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = rand_vec(&mut rng, 3 * 24);
    for style in [RopeStyle::Normal, RopeStyle::NeoX] {
        let plain = Rope::new(24, 16, 500_000.0, style);
        let scaled = Rope::scaled(24, 16, 500_000.0, style, &RopeScaling::None);
        assert_eq!(plain, scaled);
        for pos in [0, 1, 17, 4095] {
            let (mut a, mut b) = (x.clone(), x.clone());
            plain.apply(pos, &mut a);
            scaled.apply(pos, &mut b);
            assert_eq!(a, b, "{style:?} pos {pos}");
        }
    }
}

/// Each scaling against an f64 evaluation of its definition (transformers'
/// `modeling_rope_utils.py`): the angles of pair `i` at position `p`, and the magnitude.
#[test]
fn rope_scalings_match_their_definitions() {
    let (d, base) = (32usize, 10_000f64);
    let half = d / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| base.powf(-2.0 * i as f64 / d as f64))
        .collect();
    let divisors: Vec<f32> = (0..half).map(|i| 1.0 + i as f32 * 0.5).collect();
    // YaRN with factor 4 over an original context of 64: low = floor(d(32)) = 0 (clamped),
    // high = ceil(d(1)) = 5, so pairs 0..5 blend and 5.. are fully interpolated.
    let (factor, orig, beta_fast, beta_slow) = (4.0f64, 64usize, 32.0f64, 1.0f64);
    let corr = |turns: f64| {
        d as f64 * (orig as f64 / (turns * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (low, high) = (
        corr(beta_fast).floor().max(0.0),
        corr(beta_slow).ceil().min(d as f64 - 1.0),
    );
    assert_eq!((low, high), (0.0, 5.0));
    let yarn_freq: Vec<f64> = inv_freq
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / factor * (1.0 - keep) + f * keep
        })
        .collect();
    let mscale = 0.1 * factor.ln() + 1.0;
    let cases: Vec<(RopeScaling, Vec<f64>, f64)> = vec![
        (
            RopeScaling::Linear { factor: 4.0 },
            inv_freq.iter().map(|f| f / 4.0).collect(),
            1.0,
        ),
        (
            RopeScaling::FreqFactors(divisors.clone()),
            inv_freq
                .iter()
                .zip(&divisors)
                .map(|(f, &q)| f / f64::from(q))
                .collect(),
            1.0,
        ),
        (
            RopeScaling::Yarn {
                factor: factor as f32,
                original_context: orig,
                beta_fast: beta_fast as f32,
                beta_slow: beta_slow as f32,
                attention_factor: mscale as f32,
            },
            yarn_freq,
            mscale,
        ),
    ];
    let mut rng = StdRng::seed_from_u64(5);
    let x = rand_vec(&mut rng, d);
    for (scaling, freqs, m) in cases {
        let rope = Rope::scaled(d, d, base as f32, RopeStyle::NeoX, &scaling);
        for pos in [0usize, 1, 5, 63, 200] {
            let mut ours = x.clone();
            rope.apply(pos, &mut ours);
            let angles: Vec<f64> = freqs.iter().map(|f| f * pos as f64).collect();
            let want = rotate_f64(&x, &angles, m);
            let diff = max_abs_diff(&ours, &want);
            // Angles up to 200 rad in f32 (relative 6e-8 per step, 16 steps): ~2e-4 rad.
            assert!(diff < 1e-3, "{} pos {pos}: {diff}", scaling.name());
        }
        // Scaling changes late positions, not position 0's identity (up to the magnitude).
        let mut plain = x.clone();
        Rope::new(d, d, base as f32, RopeStyle::NeoX).apply(40, &mut plain);
        let mut scaled = x.clone();
        rope.apply(40, &mut scaled);
        assert!(max_abs_diff(&plain, &scaled) > 0.1, "{}", scaling.name());
    }
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
