//! Element-wise and per-vector operations: RMSNorm, RoPE, softmax, SiLU, SwiGLU, residual
//! add. These are a small share of the work per token and stay scalar; each follows ggml's
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

/// Rotary position embedding, in place.
///
/// Rotates `n_heads` heads of `head_dim` each, laid out contiguously in `x`, for position
/// `pos`; only the first `rope_dim` dims of each head rotate; pair `i` turns by
/// `theta_i = pos * freq_base^(-2i/rope_dim)`. As in ggml, `theta_i` is built by repeated
/// multiplication by `freq_base^(-2/rope_dim)` in f32, and
/// `(x0, x1) ← (x0 cos − x1 sin, x0 sin + x1 cos)`.
///
/// # Panics
///
/// If `x.len() != n_heads * head_dim`, `rope_dim > head_dim` or `rope_dim` is odd (shape
/// bugs in the caller: a model validates its hyper-parameters when it loads).
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    rope_dim: usize,
    pos: usize,
    freq_base: f32,
    style: RopeStyle,
) {
    assert_eq!(
        Some(x.len()),
        n_heads.checked_mul(head_dim),
        "rope: x length"
    );
    assert!(
        rope_dim <= head_dim && rope_dim.is_multiple_of(2),
        "rope: rope_dim {rope_dim} must be even and at most head_dim {head_dim}"
    );
    if rope_dim == 0 || head_dim == 0 {
        return;
    }
    let half = rope_dim / 2;
    let theta_scale = freq_base.powf(-2.0 / rope_dim as f32);
    let mut theta = pos as f32;
    let mut cos_sin = Vec::with_capacity(half);
    for _ in 0..half {
        cos_sin.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cos_sin.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Normal => (2 * i, 2 * i + 1),
                RopeStyle::NeoX => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
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
}
