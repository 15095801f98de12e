//! Element-wise and per-vector operations: RMSNorm, LayerNorm, RoPE, softmax, SiLU, SwiGLU,
//! GELU (exact and tanh), GeGLU, residual add. These are a small share of the work per token and stay scalar; each follows ggml's
//! CPU formula so results track llama.cpp.

/// RMS normalisation: `out[i] = x[i] * (1 / sqrt(mean(x²) + eps)) * weight[i]`.
///
/// As in ggml, the sum of squares accumulates in f64, the mean is rounded to f32, and the
/// scale is applied before the weight.
///
/// # Panics
///
/// If `weight` or `out` differ in length from `x` (a shape bug in the caller).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), weight.len(), "rms_norm: weight length");
    assert_eq!(x.len(), out.len(), "rms_norm: output length");
    if x.is_empty() {
        return;
    }
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: the original Llama layout (GGUF `llama` arch).
    Normal,
    /// Split halves `(x[i], x[i + rope_dim/2])`: GPT-NeoX layout.
    NeoX,
}

/// How a model stretches RoPE past the context it was trained on. The parameters are the
/// model's (Hugging Face `rope_scaling`, GGUF `{arch}.rope.scaling.*`); [`Rope::scaled`]
/// turns them into per-pair angles once, at load.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every angle divided by `factor` (ggml's `freq_scale = 1/factor`).
    Linear {
        /// How much longer than trained the context may be.
        factor: f32,
    },
    /// Each pair's angle divided by its own factor: Llama 3.1's `llama3` scaling, which
    /// llama.cpp's converter stores as the `rope_freqs.weight` tensor (one divisor per pair).
    FreqFactors(Vec<f32>),
    /// YaRN: pairs that turn fast (more than `beta_fast` turns over the original context)
    /// keep their angle, pairs that turn slowly (fewer than `beta_slow`) are divided by
    /// `factor`, and the ones between blend linearly; cos and sin are multiplied by
    /// `attention_factor` (the paper's `0.1 ln(factor) + 1` unless the model says otherwise),
    /// which scales attention logits by its square.
    Yarn {
        /// Context extension factor.
        factor: f32,
        /// Context length the model was trained on before the extension.
        original_context: usize,
        /// Turns above which a pair is left alone (32 in the paper).
        beta_fast: f32,
        /// Turns below which a pair is fully interpolated (1 in the paper).
        beta_slow: f32,
        /// Multiplier of cos and sin.
        attention_factor: f32,
    },
}

impl RopeScaling {
    /// The scaling's name as configuration files spell it (`none`, `linear`, `llama3`,
    /// `yarn`).
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::None => "none",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::FreqFactors(_) => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }
}

/// What [`RopeScaling`] makes of each pair, precomputed: ggml's `rope_yarn` with frequency
/// factors, `theta_extrap = theta / divisor`, `theta_interp = freq_scale * theta_extrap`,
/// `theta = theta_interp (1 - mix) + theta_extrap mix`, cos and sin times `mscale`.
#[derive(Clone, Debug, PartialEq)]
struct Scaled {
    freq_scale: f32,
    mscale: f32,
    /// Per pair: the frequency divisor and YaRN's extrapolation mix (0: interpolate fully).
    pairs: Vec<(f32, f32)>,
}

/// Rotary position embedding for one layer's heads: the configuration (head width, how many
/// leading dims rotate, the base frequency, the pairing, any context scaling) is fixed once,
/// at load, and each call rotates the heads of one token at one position.
///
/// Pair `i` of a head turns by `theta_i = pos * freq_base^(-2i/rope_dim)`; only the first
/// `rope_dim` dims of each head rotate. As in ggml, `theta_i` is built by repeated
/// multiplication by `freq_base^(-2/rope_dim)` in f32, and
/// `(x0, x1) ← (x0 cos − x1 sin, x0 sin + x1 cos)`. Scaling ([`Rope::scaled`]) changes
/// `theta_i` and the magnitude of cos and sin as ggml's `rope_yarn` does.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    head_dim: usize,
    rope_dim: usize,
    /// `freq_base^(-2/rope_dim)`, the ratio between consecutive pairs' angles.
    theta_scale: f32,
    style: RopeStyle,
    /// `None`: plain RoPE, the fast path.
    scaled: Option<Scaled>,
}

impl Rope {
    /// The rotation of `head_dim`-wide heads whose first `rope_dim` dims rotate, with base
    /// frequency `freq_base`, pairing dims as `style` says.
    ///
    /// # Panics
    ///
    /// If `rope_dim > head_dim` or `rope_dim` is odd (shape bugs in the caller: a model
    /// validates its hyper-parameters when it loads).
    pub fn new(head_dim: usize, rope_dim: usize, freq_base: f32, style: RopeStyle) -> Self {
        assert!(
            rope_dim <= head_dim && rope_dim.is_multiple_of(2),
            "rope: rope_dim {rope_dim} must be even and at most head_dim {head_dim}"
        );
        Self {
            head_dim,
            rope_dim,
            theta_scale: freq_base.powf(-2.0 / rope_dim as f32),
            style,
            scaled: None,
        }
    }

    /// Like [`Rope::new`], with context scaling. [`RopeScaling::None`] gives exactly
    /// `Rope::new`'s rotation.
    ///
    /// YaRN's blend follows ggml (`ggml_rope_yarn_corr_dims`, `rope_yarn_ramp`) and
    /// transformers (`_compute_yarn_parameters`): pair `d` turns
    /// `L / (2π freq_base^(2d/rope_dim))` times over the original context `L`, so the pairs
    /// that turn `beta` times sit at `d(beta) = rope_dim ln(L / (2π beta)) / (2 ln freq_base)`;
    /// `low = max(0, floor(d(beta_fast)))`, `high = min(rope_dim - 1, ceil(d(beta_slow)))`,
    /// and pair `i` keeps `1 - clamp((i - low) / max(0.001, high - low), 0, 1)` of its
    /// original angle.
    ///
    /// # Panics
    ///
    /// As [`Rope::new`], and if a scaling parameter is not finite and positive or
    /// [`RopeScaling::FreqFactors`] does not hold `rope_dim / 2` of them (the model checks
    /// its configuration when it loads).
    pub fn scaled(
        head_dim: usize,
        rope_dim: usize,
        freq_base: f32,
        style: RopeStyle,
        scaling: &RopeScaling,
    ) -> Self {
        let mut rope = Self::new(head_dim, rope_dim, freq_base, style);
        let half = rope_dim / 2;
        let positive = |what: &str, v: f32| {
            assert!(
                v.is_finite() && v > 0.0,
                "rope: {what} {v} must be positive"
            );
        };
        rope.scaled = match scaling {
            RopeScaling::None => None,
            &RopeScaling::Linear { factor } => {
                positive("linear factor", factor);
                Some(Scaled {
                    freq_scale: 1.0 / factor,
                    mscale: 1.0,
                    pairs: vec![(1.0, 0.0); half],
                })
            }
            RopeScaling::FreqFactors(divisors) => {
                assert_eq!(divisors.len(), half, "rope: one frequency factor per pair");
                for &d in divisors {
                    positive("frequency factor", d);
                }
                Some(Scaled {
                    freq_scale: 1.0,
                    mscale: 1.0,
                    pairs: divisors.iter().map(|&d| (d, 1.0)).collect(),
                })
            }
            &RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                positive("YaRN factor", factor);
                positive("YaRN beta_fast", beta_fast);
                positive("YaRN beta_slow", beta_slow);
                positive("YaRN attention factor", attention_factor);
                assert!(original_context > 0, "rope: YaRN original context is 0");
                let corr_dim = |turns: f32| {
                    rope_dim as f32
                        * (original_context as f32 / (turns * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * freq_base.ln())
                };
                let low = corr_dim(beta_fast).floor().max(0.0);
                let high = corr_dim(beta_slow).ceil().min(rope_dim as f32 - 1.0);
                let pairs = (0..half)
                    .map(|i| {
                        let y = (i as f32 - low) / (high - low).max(0.001);
                        (1.0, 1.0 - y.clamp(0.0, 1.0))
                    })
                    .collect();
                Some(Scaled {
                    freq_scale: 1.0 / factor,
                    mscale: attention_factor,
                    pairs,
                })
            }
        };
        rope
    }

    /// Rotates, in place, the heads laid out contiguously in `x` (any number of them) for
    /// position `pos`.
    ///
    /// # Panics
    ///
    /// If `x.len()` is not a whole number of heads (a shape bug in the caller).
    pub fn apply(&self, pos: usize, x: &mut [f32]) {
        if self.head_dim == 0 {
            assert!(x.is_empty(), "rope: x length");
            return;
        }
        assert!(
            x.len().is_multiple_of(self.head_dim),
            "rope: x length {} is not a whole number of {}-wide heads",
            x.len(),
            self.head_dim
        );
        if self.rope_dim == 0 {
            return;
        }
        let half = self.rope_dim / 2;
        let mut theta = pos as f32;
        let mut cos_sin = Vec::with_capacity(half);
        match &self.scaled {
            None => {
                for _ in 0..half {
                    cos_sin.push((theta.cos(), theta.sin()));
                    theta *= self.theta_scale;
                }
            }
            Some(s) => {
                for &(divisor, mix) in &s.pairs {
                    let extrap = theta / divisor;
                    let interp = s.freq_scale * extrap;
                    let t = if mix == 0.0 {
                        interp
                    } else {
                        interp * (1.0 - mix) + extrap * mix
                    };
                    cos_sin.push((t.cos() * s.mscale, t.sin() * s.mscale));
                    theta *= self.theta_scale;
                }
            }
        }
        for head in x.chunks_exact_mut(self.head_dim) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::NeoX => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Softmax in place: `x[i] = exp(x[i] - max) / Σ exp(x[j] - max)`, the sum in f64 as in
/// ggml. `-inf` entries get probability 0. If every entry is `-inf` (nothing to attend to)
/// the result is uniform rather than NaN. An empty slice is left alone.
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        let p = 1.0 / x.len() as f32;
        x.fill(p);
        return;
    }
    let mut sum = 0f64;
    for v in x.iter_mut() {
        let e = (*v - max).exp();
        sum += f64::from(e);
        *v = e;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU (swish): `x / (1 + exp(-x))`, ggml's `ggml_silu_f32`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU gate, in place: `gate[i] = silu(gate[i]) * up[i]`.
///
/// # Panics
///
/// If the lengths differ.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`, ggml's
/// `ggml_gelu_f32`): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in f32.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF * x * x)).tanh())
}

/// GeGLU gate, in place: `gate[i] = gelu_tanh(gate[i]) * up[i]` (Gemma's MLP).
///
/// With `f16_table`, the GELU is computed as ggml's CPU path does: inputs at or below -10
/// give 0, at or above 10 pass through, and others are rounded to f16, looked up in a table
/// of `gelu_tanh` of every f16 value, itself rounded to f16. llama.cpp's numbers for f16-cached
/// models carry that rounding; float32 references (transformers) do not, hence the switch.
///
/// # Panics
///
/// If the lengths differ.
pub fn geglu_tanh(gate: &mut [f32], up: &[f32], f16_table: bool) {
    assert_eq!(gate.len(), up.len(), "geglu: lengths");
    let table = if f16_table { gelu_f16_table() } else { &[] };
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = if !f16_table {
            gelu_tanh(x)
        } else if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            table[usize::from(half::f16::from_f32(x).to_bits())].to_f32()
        };
        *g = y * u;
    }
}

/// [`gelu_tanh`] of every f16 value, rounded to f16 (ggml's `ggml_table_gelu_f16`), indexed
/// by the f16's bits; built on first use (65,536 evaluations, 128 KiB).
fn gelu_f16_table() -> &'static [half::f16] {
    static TABLE: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_f32(gelu_tanh(half::f16::from_bits(b).to_f32())))
            .collect()
    })
}

/// Layer normalisation (BERT's `LayerNorm`):
/// `out[i] = (x[i] - mean(x)) / sqrt(var(x) + eps) * weight[i] + bias[i]`, with the biased
/// variance. Mean and variance accumulate in f64.
///
/// # Panics
///
/// If `weight`, `bias` or `out` differ in length from `x` (a shape bug in the caller).
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), weight.len(), "layer_norm: weight length");
    assert_eq!(x.len(), bias.len(), "layer_norm: bias length");
    assert_eq!(x.len(), out.len(), "layer_norm: output length");
    if x.is_empty() {
        return;
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| {
            let d = f64::from(v) - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    let scale = 1.0 / (var + f64::from(eps)).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = ((f64::from(v) - mean) * scale) as f32 * w + b;
    }
}

/// GELU with the exact error function, as BERT (`hidden_act = "gelu"`) and PyTorch's
/// default `gelu` use: `0.5 * x * (1 + erf(x / sqrt(2)))`, computed in f64.
pub fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// The error function in f64, to about 1e-15: the Maclaurin series below 3 (its terms peak
/// near `e^(z^2)`, about 8e3, so cancellation costs under four of f64's sixteen digits), and
/// above it `1 - erfc` with erfc's continued fraction, which converges fast for large `z`.
fn erf(z: f64) -> f64 {
    let a = z.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let a2 = a * a;
        let mut power = a; // (-1)^n a^(2n+1) / n!
        let mut sum = a;
        for n in 1..200u32 {
            power *= -a2 / f64::from(n);
            let term = power / f64::from(2 * n + 1);
            sum += term;
            if term.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...))))),
        // evaluated from a fixed depth back to the front.
        let mut f = a;
        for k in (1..=60u32).rev() {
            f = a + f64::from(k) / 2.0 / f;
        }
        1.0 - (-a * a).exp() * (std::f64::consts::FRAC_2_SQRT_PI / 2.0) / f
    };
    r.copysign(z)
}

/// Residual add: `y[i] += x[i]`.
///
/// # Panics
///
/// If the lengths differ.
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "add_assign: lengths");
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_vector_is_weight() {
        let x = [3.0f32; 8];
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut out = [0f32; 8];
        rms_norm(&x, &w, 0.0, &mut out);
        for (o, w) in out.iter().zip(&w) {
            assert!((o - w).abs() <= 1e-6 * w.abs().max(1.0), "{o} vs {w}");
        }
    }

    #[test]
    fn silu_known_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((silu(-1.0) + 0.268_941_43).abs() < 1e-6);
        assert_eq!(silu(-100.0), -0.0);
        assert_eq!(silu(100.0), 100.0);
    }

    #[test]
    fn erf_known_values_and_branches_agree() {
        let known = [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.999_999, 0.999_977_909_363_748),
            (3.0, 0.999_977_909_503_001_4),
            (4.0, 0.999_999_984_582_742_1),
            (6.0, 1.0),
        ];
        for (z, want) in known {
            assert!(
                (erf(z) - want).abs() < 1e-12,
                "erf({z}) = {} not {want}",
                erf(z)
            );
            assert!((erf(-z) + want).abs() < 1e-12, "erf(-{z})");
        }
    }

    #[test]
    fn gelu_known_values() {
        assert_eq!(gelu(0.0), 0.0);
        // Exact values, 0.5 x erfc(-x / sqrt 2) (PyTorch agrees to 1e-6).
        let cases = [
            (1.0, 0.841_344_7),
            (-1.0, -0.158_655_26),
            (2.0, 1.954_499_7),
            (-3.0, -0.004_049_694),
        ];
        for (x, want) in cases {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {}", gelu(x));
        }
        assert_eq!(gelu(-40.0), -0.0);
        assert_eq!(gelu(40.0), 40.0);
    }

    #[test]
    fn gelu_tanh_known_values_and_geglu() {
        // PyTorch's gelu(x, approximate="tanh") at these points.
        for (x, want) in [(1.0f32, 0.841_192), (-1.0, -0.158_808), (3.0, 2.996_363)] {
            assert!(
                (gelu_tanh(x) - want).abs() < 1e-5,
                "gelu_tanh({x}) = {}",
                gelu_tanh(x)
            );
        }
        let mut g = [1.0f32, -1.0, 20.0, -20.0, 0.3];
        let up = [2.0f32, 1.0, 0.5, 3.0, -1.0];
        geglu_tanh(&mut g, &up, false);
        assert!((g[0] - 2.0 * 0.841_192).abs() < 1e-5);
        assert_eq!(g[2], 10.0);
        assert_eq!(g[3], -0.0);
        let mut h = [1.0f32, -1.0, 20.0, -20.0, 0.3];
        geglu_tanh(&mut h, &up, true);
        assert_eq!(h[2], 10.0);
        assert_eq!(h[3], 0.0);
        // The table rounds to f16: within f16's relative step of the exact value.
        for (a, b) in g.iter().zip(&h) {
            assert!((a - b).abs() <= 2e-3 * a.abs().max(1e-3), "{a} vs {b}");
        }
        // The table holds exactly f16(gelu_tanh(f16(x))) for every x between the cut-offs.
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.004_99).collect();
        let mut t = xs.clone();
        geglu_tanh(&mut t, &vec![1.0; xs.len()], true);
        for (&x, &y) in xs.iter().zip(&t) {
            let h = half::f16::from_f32(x).to_f32();
            assert_eq!(y, half::f16::from_f32(gelu_tanh(h)).to_f32(), "{x}");
        }
    }

    #[test]
    fn layer_norm_centres_scales_and_shifts() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let b = [0.0f32, 0.0, 0.5, 0.0];
        let mut out = [0f32; 4];
        layer_norm(&x, &w, &b, 0.0, &mut out);
        // mean 2.5, biased variance 1.25
        let s = 1.25f32.sqrt();
        let want = [-1.5 / s, 2.0 * -0.5 / s, 0.5 / s + 0.5, 1.5 / s];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        // A constant vector normalises to the bias (eps keeps it finite).
        layer_norm(&[7.0; 4], &w, &b, 1e-12, &mut out);
        assert_eq!(out, b);
    }
}
