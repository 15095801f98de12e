//! RoPE context scaling as model files state it: GGUF's `{arch}.rope.scaling.*` keys and
//! `rope_freqs.weight` tensor, read as llama.cpp reads them, and the arithmetic shared with
//! the Hugging Face reader (`hf.rs`): Llama 3.1's frequency divisors and YaRN's attention
//! factor. The result is a [`RopeScaling`], which `kernels::Rope::scaled` turns into each
//! layer's rotation once, at load.

use crate::ModelError;
use gguf::{GgmlType, GgufFile};
use kernels::RopeScaling;

/// YaRN's defaults (the paper's, transformers' and llama.cpp's).
pub(crate) const YARN_BETA_FAST: f32 = 32.0;
pub(crate) const YARN_BETA_SLOW: f32 = 1.0;

/// The YaRN paper's magnitude correction, `0.1 · mscale · ln(factor) + 1` (1 for factors up
/// to 1): transformers' `yarn_get_mscale`, llama.cpp's `get_mscale`.
pub(crate) fn yarn_mscale(factor: f32, mscale: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// Llama 3.1's per-pair divisors (transformers' `_compute_llama3_parameters`, which
/// llama.cpp's converter writes as `rope_freqs.weight`): pairs whose wavelength is shorter
/// than `original_context / high_freq_factor` keep their frequency, those longer than
/// `original_context / low_freq_factor` are divided by `factor`, and the ones between blend
/// smoothly.
pub(crate) fn llama3_divisors(
    freq_base: f32,
    rope_dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: f32,
) -> Vec<f32> {
    let (factor, low, high, old) = (
        f64::from(factor),
        f64::from(low_freq_factor),
        f64::from(high_freq_factor),
        f64::from(original_context),
    );
    (0..rope_dim / 2)
        .map(|i| {
            let inv_freq = f64::from(freq_base).powf(-2.0 * i as f64 / rope_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            let divisor = if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            divisor as f32
        })
        .collect()
}

/// `v` if it is finite and positive, else a `BadConfig` naming `key`.
pub(crate) fn positive(key: &str, v: f32) -> Result<f32, ModelError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(ModelError::BadConfig(format!(
            "{key} = {v} must be positive"
        )))
    }
}

/// The scaling of a GGUF file, as llama.cpp reads it (`llama-model.cpp`,
/// `llama-context.cpp`): `rope.scaling.type` (llama.cpp assumes `linear` when it is absent,
/// so a bare `rope.scaling.factor` — or the older `rope.scale_linear` — scales linearly; a
/// factor of 0 or 1 means none), for `yarn` `rope.scaling.original_context_length` (default
/// the training context), `yarn_beta_fast`/`yarn_beta_slow` (32 / 1), `yarn_log_multiplier`
/// (DeepSeek's `mscale_all_dim`: the attention factor becomes
/// `mscale(factor, 1) / mscale(factor, log_multiplier)`) and `attn_factor` (a further
/// multiplier); and the `rope_freqs.weight` tensor (F32, one divisor per pair), which Llama
/// 3.1-3.3 files carry instead of scaling keys.
pub(crate) fn from_gguf(
    file: &GgufFile,
    architecture: &str,
    context_length: usize,
    rope_dim: usize,
) -> Result<RopeScaling, ModelError> {
    let md = file.metadata();
    let key = |k: &str| format!("{architecture}.rope.{k}");
    let type_key = key("scaling.type");
    let factor_key = key("scaling.factor");
    let factor = match md.opt_f32(&factor_key)? {
        Some(f) => Some((factor_key.clone(), f)),
        None => md
            .opt_f32(&key("scale_linear"))?
            .map(|f| (key("scale_linear"), f)),
    };
    let factor = match factor {
        Some((_, 0.0)) => None,
        Some((k, f)) => Some(positive(&k, f)?),
        None => None,
    };
    let scaling = match md.opt_str(&type_key)?.unwrap_or("linear") {
        "none" => RopeScaling::None,
        "linear" => match factor {
            Some(factor) if factor != 1.0 => RopeScaling::Linear { factor },
            _ => RopeScaling::None,
        },
        "yarn" => {
            let factor =
                factor.ok_or_else(|| ModelError::BadConfig(format!("{factor_key} is missing")))?;
            let ctx_key = key("scaling.original_context_length");
            let original_context = match md.opt_u32(&ctx_key)? {
                Some(0) => return Err(ModelError::BadConfig(format!("{ctx_key} is 0"))),
                Some(n) => n as usize,
                None => context_length,
            };
            let f32_or = |k: &str, default: f32| -> Result<f32, ModelError> {
                let k = key(k);
                match md.opt_f32(&k)? {
                    Some(v) => positive(&k, v),
                    None => Ok(default),
                }
            };
            let ext_key = key("scaling.yarn_ext_factor");
            if let Some(ext) = md.opt_f32(&ext_key)?
                && ext >= 0.0
                && ext != 1.0
            {
                return Err(ModelError::UnsupportedRopeScaling {
                    key: ext_key,
                    value: ext.to_string(),
                });
            }
            let log_mul = md
                .opt_f32(&key("scaling.yarn_log_multiplier"))?
                .unwrap_or(0.0);
            let mut attention_factor = yarn_mscale(factor, 1.0);
            if log_mul != 0.0 {
                attention_factor /= yarn_mscale(factor, log_mul);
            }
            attention_factor *= f32_or("scaling.attn_factor", 1.0)?;
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast: f32_or("scaling.yarn_beta_fast", YARN_BETA_FAST)?,
                beta_slow: f32_or("scaling.yarn_beta_slow", YARN_BETA_SLOW)?,
                attention_factor: positive(&key("scaling.yarn_log_multiplier"), attention_factor)?,
            }
        }
        other => {
            return Err(ModelError::UnsupportedRopeScaling {
                key: type_key,
                value: other.to_owned(),
            });
        }
    };
    let Some(info) = file.tensor("rope_freqs.weight") else {
        return Ok(scaling);
    };
    if scaling != RopeScaling::None {
        return Err(ModelError::BadConfig(format!(
            "rope_freqs.weight together with {type_key} = {} is not supported",
            scaling.name()
        )));
    }
    let pairs = rope_dim / 2;
    if info.dims != [pairs as u64] {
        return Err(ModelError::BadShape {
            name: info.name.clone(),
            expected: vec![pairs as u64],
            found: info.dims.clone(),
        });
    }
    if info.ggml_type != GgmlType::F32 {
        return Err(ModelError::UnsupportedTensorType {
            name: info.name.clone(),
            ggml_type: format!("{:?} (rope_freqs must be F32)", info.ggml_type),
        });
    }
    let bytes = file.tensor_data(info);
    if bytes.len() != pairs * 4 {
        return Err(ModelError::BadShape {
            name: info.name.clone(),
            expected: vec![pairs as u64],
            found: vec![bytes.len() as u64 / 4],
        });
    }
    let divisors = bytes
        .chunks_exact(4)
        .map(|b| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            positive("rope_freqs.weight", v)
        })
        .collect::<Result<Vec<f32>, _>>()?;
    Ok(RopeScaling::FreqFactors(divisors))
}

/// Checks a scaling against the rotated width (for configurations from any source).
pub(crate) fn check(scaling: &RopeScaling, rope_dim: usize) -> Result<(), ModelError> {
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            positive("RoPE scaling factor", *factor)?;
        }
        RopeScaling::FreqFactors(divisors) => {
            if divisors.len() != rope_dim / 2 {
                return Err(ModelError::BadConfig(format!(
                    "{} RoPE frequency factors for {} pairs",
                    divisors.len(),
                    rope_dim / 2
                )));
            }
            for &d in divisors {
                positive("RoPE frequency factor", d)?;
            }
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        } => {
            positive("YaRN factor", *factor)?;
            positive("YaRN beta_fast", *beta_fast)?;
            positive("YaRN beta_slow", *beta_slow)?;
            positive("YaRN attention factor", *attention_factor)?;
            if *original_context == 0 {
                return Err(ModelError::BadConfig(
                    "YaRN original context length is 0".into(),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's scaling (factor 8, low 1, high 4, original 8192, base 500000, 128
    /// dims): the fastest pairs keep their frequency, the slowest are divided by 8, and the
    /// divisors never decrease along the head.
    #[test]
    fn llama3_divisors_span_one_to_factor() {
        let d = llama3_divisors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(d.len(), 64);
        assert_eq!(d[0], 1.0);
        assert_eq!(d[63], 8.0);
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
        assert!(d.iter().any(|&v| v > 1.0 && v < 8.0), "a smooth band");
    }

    fn gguf_with(kv: &[(&str, gguf::Value)], freqs: Option<Vec<f32>>) -> GgufFile {
        let mut w = gguf::GgufWriter::new(3);
        w.add_kv("general.architecture", gguf::Value::String("llama".into()));
        for (k, v) in kv {
            w.add_kv(format!("llama.{k}"), v.clone());
        }
        if let Some(f) = freqs {
            let bytes = f.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.add_tensor("rope_freqs.weight", &[f.len() as u64], GgmlType::F32, bytes)
                .expect("tensor");
        }
        GgufFile::from_bytes(w.to_bytes()).expect("gguf")
    }

    /// llama.cpp's readings: a bare factor scales linearly, `none` and factor 1 do not
    /// scale, unknown types and YaRN without a factor are typed errors naming the key, and
    /// a `rope_freqs` tensor of the wrong length is refused.
    #[test]
    fn gguf_scaling_keys() {
        use gguf::Value as V;
        let read = |kv: &[(&str, V)], freqs| from_gguf(&gguf_with(kv, freqs), "llama", 4096, 8);
        assert_eq!(read(&[], None).unwrap(), RopeScaling::None);
        assert_eq!(
            read(&[("rope.scaling.factor", V::F32(2.0))], None).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        let none = [
            ("rope.scaling.type", V::String("none".into())),
            ("rope.scaling.factor", V::F32(2.0)),
        ];
        assert_eq!(read(&none, None).unwrap(), RopeScaling::None);
        let yarn = [
            ("rope.scaling.type", V::String("yarn".into())),
            ("rope.scaling.factor", V::F32(40.0)),
            ("rope.scaling.yarn_log_multiplier", V::F32(0.1)),
        ];
        let RopeScaling::Yarn {
            original_context,
            beta_fast,
            attention_factor,
            ..
        } = read(&yarn, None).unwrap()
        else {
            panic!("yarn");
        };
        assert_eq!((original_context, beta_fast), (4096, 32.0));
        let want = yarn_mscale(40.0, 1.0) / yarn_mscale(40.0, 0.1);
        assert!((attention_factor - want).abs() < 1e-6);
        match read(&[("rope.scaling.type", V::String("longrope".into()))], None) {
            Err(ModelError::UnsupportedRopeScaling { key, value }) => {
                assert_eq!(
                    (key.as_str(), value.as_str()),
                    ("llama.rope.scaling.type", "longrope")
                );
            }
            other => panic!("{other:?}"),
        }
        match read(&[("rope.scaling.type", V::String("yarn".into()))], None) {
            Err(ModelError::BadConfig(m)) => {
                assert!(m.contains("llama.rope.scaling.factor"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match read(&[("rope.scaling.factor", V::F32(-1.0))], None) {
            Err(ModelError::BadConfig(m)) => {
                assert!(m.contains("llama.rope.scaling.factor"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read(&[], Some(vec![1.0, 2.0, 4.0, 8.0])).unwrap(),
            RopeScaling::FreqFactors(vec![1.0, 2.0, 4.0, 8.0])
        );
        assert!(matches!(
            read(&[], Some(vec![1.0, 2.0])),
            Err(ModelError::BadShape { .. })
        ));
        assert!(matches!(
            read(&[], Some(vec![1.0, 0.0, 4.0, 8.0])),
            Err(ModelError::BadConfig(_))
        ));
    }

    #[test]
    fn yarn_mscale_is_the_papers() {
        assert_eq!(yarn_mscale(1.0, 1.0), 1.0);
        assert!((yarn_mscale(4.0, 1.0) - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-7);
        // DeepSeek's ratio with mscale = mscale_all_dim is 1.
        assert_eq!(yarn_mscale(40.0, 0.707) / yarn_mscale(40.0, 0.707), 1.0);
    }
}
