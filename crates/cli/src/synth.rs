//! `souverain synth`: writes a random-weight Llama-architecture GGUF of a real model's shape,
//! so that speed at real sizes can be measured (by `souverain bench` and by llama.cpp) without
//! downloading weights.
//!
//! Every weight is random: quantised tensors are random blocks whose scales are set so the
//! weights have a standard deviation of about 0.02 (a trained model's order of magnitude),
//! float tensors random values of that spread, and norm weights 1. The vocabulary is a
//! SentencePiece-style list (`<unk>`, `<s>`, `</s>`, the 256 byte tokens, then filler pieces)
//! that llama.cpp accepts. The output is streamed to disk: a 4 GB model never sits in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use model::gguf::{Array, GgmlType, Value, raw};

/// Model shapes worth measuring.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Preset {
    /// Mistral-7B v0.3: 32 layers, width 4096, FFN 14336, 32/8 heads, vocabulary 32768.
    Mistral7b,
    /// Llama-3.2-1B-like: 16 layers, width 2048, FFN 8192, 32/8 heads, vocabulary 32768.
    Llama1b,
    /// SmolLM2-135M: 30 layers, width 576, FFN 1536, 9/3 heads, vocabulary 49152.
    Smollm2_135m,
}

/// A model shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Shape {
    pub(crate) n_layers: u64,
    pub(crate) d_model: u64,
    pub(crate) ffn_dim: u64,
    pub(crate) n_heads: u64,
    pub(crate) n_kv_heads: u64,
    pub(crate) vocab: u64,
    pub(crate) context: u64,
    pub(crate) rope_base: f32,
}

impl Preset {
    fn shape(self) -> Shape {
        match self {
            Self::Mistral7b => Shape {
                n_layers: 32,
                d_model: 4096,
                ffn_dim: 14336,
                n_heads: 32,
                n_kv_heads: 8,
                vocab: 32768,
                context: 32768,
                rope_base: 1_000_000.0,
            },
            Self::Llama1b => Shape {
                n_layers: 16,
                d_model: 2048,
                ffn_dim: 8192,
                n_heads: 32,
                n_kv_heads: 8,
                vocab: 32768,
                context: 8192,
                rope_base: 500_000.0,
            },
            Self::Smollm2_135m => Shape {
                n_layers: 30,
                d_model: 576,
                ffn_dim: 1536,
                n_heads: 9,
                n_kv_heads: 3,
                vocab: 49152,
                context: 8192,
                rope_base: 100_000.0,
            },
        }
    }
}

/// Tensor types `synth` can write for the weight matrices.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SynthType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml Q4_0.
    Q4_0,
    /// ggml Q4_1.
    Q4_1,
    /// ggml Q5_0.
    Q5_0,
    /// ggml Q5_1.
    Q5_1,
    /// ggml Q8_0.
    Q8_0,
    /// ggml Q4_K.
    Q4K,
    /// ggml Q5_K.
    Q5K,
    /// ggml Q6_K.
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output head and for `attn_v` and
    /// `ffn_down` in the layers llama.cpp gives more bits (`use_more_bits`); a row that is
    /// not a multiple of 256 falls back to Q5_0 (Q8_0 for Q6_K), as llama.cpp does.
    #[value(name = "q4-k-m")]
    Q4KM,
}

impl SynthType {
    fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4K | Self::Q4KM => GgmlType::Q4_K,
            Self::Q5K => GgmlType::Q5_K,
            Self::Q6K => GgmlType::Q6_K,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q4K => 14,
            Self::Q4KM => 15,
            Self::Q5K => 16,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }
}

/// Flags of `souverain synth`.
#[derive(Args, Debug)]
pub(crate) struct SynthArgs {
    /// Where to write the GGUF file.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// The shape to imitate; the flags below override single dimensions.
    #[arg(long, value_enum, default_value_t = Preset::Mistral7b)]
    preset: Preset,
    /// Type of every weight matrix (embeddings and output head included), or a mix
    /// (`q4-k-m`).
    #[arg(long = "type", value_enum, default_value_t = SynthType::Q4_0)]
    ty: SynthType,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<u64>,
    /// Width of the residual stream.
    #[arg(long)]
    width: Option<u64>,
    /// Hidden width of the MLP.
    #[arg(long)]
    ffn: Option<u64>,
    /// Query heads.
    #[arg(long)]
    heads: Option<u64>,
    /// Key/value heads.
    #[arg(long)]
    kv_heads: Option<u64>,
    /// Vocabulary size (at least 259: specials and byte tokens).
    #[arg(long)]
    vocab: Option<u64>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Writes the file and prints what it wrote.
pub(crate) fn run(args: &SynthArgs) -> Result<()> {
    let mut shape = args.preset.shape();
    let set = |v: Option<u64>, d: &mut u64| {
        if let Some(v) = v {
            *d = v;
        }
    };
    set(args.layers, &mut shape.n_layers);
    set(args.width, &mut shape.d_model);
    set(args.ffn, &mut shape.ffn_dim);
    set(args.heads, &mut shape.n_heads);
    set(args.kv_heads, &mut shape.n_kv_heads);
    set(args.vocab, &mut shape.vocab);
    let bytes = write(&args.out, shape, args.ty, args.seed)?;
    println!(
        "wrote {} ({:.1} MiB): {} layers, width {}, FFN {}, {}/{} heads, vocab {}, {:?}",
        args.out.display(),
        bytes as f64 / (1u64 << 20) as f64,
        shape.n_layers,
        shape.d_model,
        shape.ffn_dim,
        shape.n_heads,
        shape.n_kv_heads,
        shape.vocab,
        args.ty.ggml()
    );
    Ok(())
}

/// Alignment of tensor data (GGUF's default).
const ALIGNMENT: u64 = 32;

/// One tensor to write: name, GGUF dims (row length first), type.
struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
}

impl TensorSpec {
    fn bytes(&self) -> Result<u64> {
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .context("tensor size overflows")?;
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(self.ty.block_len()) {
            bail!(
                "{}: row length {row} is not a multiple of the {} block length {}",
                self.name,
                self.ty.name(),
                self.ty.block_len()
            );
        }
        self.ty
            .row_bytes(n)
            .with_context(|| format!("{}: size overflows", self.name))
    }
}

fn check_shape(s: Shape) -> Result<()> {
    if s.n_layers == 0 || s.d_model == 0 || s.ffn_dim == 0 || s.n_heads == 0 || s.n_kv_heads == 0 {
        bail!("every dimension must be positive");
    }
    if !s.d_model.is_multiple_of(s.n_heads) || !(s.d_model / s.n_heads).is_multiple_of(2) {
        bail!(
            "width {} must split into {} heads of an even size",
            s.d_model,
            s.n_heads
        );
    }
    if !s.n_heads.is_multiple_of(s.n_kv_heads) {
        bail!(
            "{} query heads are not a multiple of {} KV heads",
            s.n_heads,
            s.n_kv_heads
        );
    }
    if s.vocab < 259 || s.vocab > u64::from(u32::MAX) {
        bail!(
            "vocabulary {} must hold the 259 special and byte tokens and fit in u32",
            s.vocab
        );
    }
    for v in [s.n_layers, s.d_model, s.ffn_dim, s.n_heads, s.n_kv_heads] {
        if v > u64::from(u32::MAX) {
            bail!("dimension {v} does not fit in u32");
        }
    }
    Ok(())
}

fn metadata(s: Shape, ty: SynthType) -> Vec<(String, Value)> {
    let head_dim = s.d_model / s.n_heads;
    let u32v = |v: u64| Value::U32(v as u32);
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let fillers = s.vocab as usize - tokens.len();
    tokens.extend((0..fillers).map(|i| format!("\u{2581}t{i}")));
    let mut types = vec![2i32, 3, 3];
    types.extend(std::iter::repeat_n(6i32, 256));
    types.extend(std::iter::repeat_n(1i32, fillers));
    let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
    let kv = |k: &str, v: Value| (k.to_owned(), v);
    vec![
        kv("general.architecture", Value::from("llama")),
        kv("general.name", Value::from("souverain synthetic")),
        kv("general.file_type", Value::U32(ty.file_type())),
        kv("llama.block_count", u32v(s.n_layers)),
        kv("llama.context_length", u32v(s.context)),
        kv("llama.embedding_length", u32v(s.d_model)),
        kv("llama.feed_forward_length", u32v(s.ffn_dim)),
        kv("llama.attention.head_count", u32v(s.n_heads)),
        kv("llama.attention.head_count_kv", u32v(s.n_kv_heads)),
        kv("llama.rope.dimension_count", u32v(head_dim)),
        kv("llama.rope.freq_base", Value::F32(s.rope_base)),
        kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        kv("llama.vocab_size", u32v(s.vocab)),
        kv("tokenizer.ggml.model", Value::from("llama")),
        kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::from_strings(tokens)),
        ),
        kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::from_values(scores)),
        ),
        kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::from_values(types)),
        ),
        kv("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        kv("tokenizer.ggml.bos_token_id", Value::U32(1)),
        kv("tokenizer.ggml.eos_token_id", Value::U32(2)),
        kv("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ]
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// one between them.
fn use_more_bits(i: u64, n: u64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type of matrix `name` (`output`, `attn_v`, ... ; `layer` of the model's `n` layers)
/// with rows of `row` elements, for `ty`: one type for all, or llama.cpp's Q4_K_M choice
/// (`llama_tensor_get_type`) with its fallbacks for rows that are not whole super-blocks.
fn matrix_type(ty: SynthType, name: &str, layer: u64, n: u64, row: u64) -> GgmlType {
    if ty != SynthType::Q4KM {
        return ty.ggml();
    }
    let more = match name {
        "output" => true,
        "attn_v" | "ffn_down" => use_more_bits(layer, n),
        _ => false,
    };
    match (more, row.is_multiple_of(256)) {
        (true, true) => GgmlType::Q6_K,
        (true, false) => GgmlType::Q8_0,
        (false, true) => GgmlType::Q4_K,
        (false, false) => GgmlType::Q5_0,
    }
}

fn tensors(s: Shape, ty: SynthType) -> Vec<TensorSpec> {
    let head_dim = s.d_model / s.n_heads;
    let kv = head_dim * s.n_kv_heads;
    let t = |name: String, dims: &[u64], ty: GgmlType| TensorSpec {
        name,
        dims: dims.to_vec(),
        ty,
    };
    let m = |name: &str, layer: u64, dims: &[u64]| {
        let ty = matrix_type(ty, name, layer, s.n_layers, dims[0]);
        let full = if name == "token_embd" || name == "output" {
            format!("{name}.weight")
        } else {
            format!("blk.{layer}.{name}.weight")
        };
        t(full, dims, ty)
    };
    let (d, f) = (s.d_model, s.ffn_dim);
    let mut out = vec![
        m("token_embd", 0, &[d, s.vocab]),
        t("output_norm.weight".into(), &[d], GgmlType::F32),
        m("output", 0, &[d, s.vocab]),
    ];
    for i in 0..s.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        out.push(t(n("attn_norm"), &[d], GgmlType::F32));
        out.push(m("attn_q", i, &[d, d]));
        out.push(m("attn_k", i, &[d, kv]));
        out.push(m("attn_v", i, &[d, kv]));
        out.push(m("attn_output", i, &[d, d]));
        out.push(t(n("ffn_norm"), &[d], GgmlType::F32));
        out.push(m("ffn_gate", i, &[d, f]));
        out.push(m("ffn_up", i, &[d, f]));
        out.push(m("ffn_down", i, &[f, d]));
    }
    out
}

/// Writes the model; returns the file size in bytes.
pub(crate) fn write(path: &std::path::Path, s: Shape, ty: SynthType, seed: u64) -> Result<u64> {
    check_shape(s)?;
    let specs = tensors(s, ty);
    let kvs = metadata(s, ty);
    let mut header = Vec::new();
    raw::put_header(&mut header, 3, specs.len() as u64, kvs.len() as u64);
    for (k, v) in &kvs {
        raw::put_kv(&mut header, k, v);
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(specs.len());
    for t in &specs {
        let bytes = t.bytes()?;
        raw::put_tensor_info(&mut header, &t.name, &t.dims, t.ty.id(), offset);
        offset = offset
            .checked_add(bytes)
            .map(|o| o.div_ceil(ALIGNMENT) * ALIGNMENT)
            .context("file size overflows")?;
        sizes.push(bytes);
    }
    raw::pad_to(&mut header, ALIGNMENT);

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&header)?;
    let mut rng = Rng(seed ^ 0x5eed_5eed_5eed_5eed);
    let mut buf = Vec::new();
    for (t, &bytes) in specs.iter().zip(&sizes) {
        let norm = t.dims.len() == 1;
        let mut left = bytes;
        let block = t.ty.block_bytes();
        // Write in chunks of whole blocks so a 500 MB tensor needs only a small buffer.
        let chunk = (1u64 << 20) / block * block;
        while left > 0 {
            let n = left.min(chunk);
            buf.resize(n as usize, 0);
            if norm {
                fill_ones_f32(&mut buf);
            } else {
                fill_random(&mut rng, t.ty, &mut buf);
            }
            out.write_all(&buf)?;
            left -= n;
        }
        let pad = bytes.div_ceil(ALIGNMENT) * ALIGNMENT - bytes;
        out.write_all(&vec![0u8; pad as usize])?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(header.len() as u64 + offset)
}

/// splitmix64: fast, seedable, good enough for weights nobody reads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }
}

fn fill_ones_f32(buf: &mut [u8]) {
    for c in buf.chunks_exact_mut(4) {
        c.copy_from_slice(&1f32.to_le_bytes());
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Random blocks of `ty` whose dequantised values spread like trained weights (std ~0.02).
fn fill_random(rng: &mut Rng, ty: GgmlType, buf: &mut [u8]) {
    const STD: f32 = 0.02;
    match ty {
        GgmlType::F32 => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&(rng.unit() * STD * 1.7).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(&f16_bytes(rng.unit() * STD * 1.7));
            }
        }
        GgmlType::BF16 => {
            for c in buf.chunks_exact_mut(2) {
                let v = rng.unit() * STD * 1.7;
                c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        _ => {
            rng.fill(buf);
            let bb = ty.block_bytes() as usize;
            for b in buf.chunks_exact_mut(bb) {
                let jitter = 1.0 + 0.25 * rng.unit();
                set_scales(ty, b, jitter * STD);
            }
        }
    }
}

/// Overwrites the scale fields of one random block so that its values have spread `std`.
fn set_scales(ty: GgmlType, b: &mut [u8], std: f32) {
    let put = |b: &mut [u8], at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16_bytes(v));
    match ty {
        // 4-bit: (q - 8) * d, q uniform in 0..16 has std ~4.6.
        GgmlType::Q4_0 => put(b, 0, std / 4.6),
        GgmlType::Q4_1 => {
            put(b, 0, std / 4.6);
            put(b, 2, -7.5 * std / 4.6);
        }
        GgmlType::Q5_0 => put(b, 0, std / 9.2),
        GgmlType::Q5_1 => {
            put(b, 0, std / 9.2);
            put(b, 2, -15.5 * std / 9.2);
        }
        GgmlType::Q8_0 => {
            put(b, 0, std / 73.0);
            for q in &mut b[2..] {
                if *q == 0x80 {
                    *q = 0x81; // keep quants in -127..=127 as ggml's quantiser does
                }
            }
        }
        // K-quants: d * sc * q - dmin * m with 6-bit sc, m (mean ~32).
        GgmlType::Q4_K => {
            put(b, 0, std / (4.6 * 32.0));
            put(b, 2, 7.5 * std / (4.6 * 32.0));
        }
        GgmlType::Q5_K => {
            put(b, 0, std / (9.2 * 32.0));
            put(b, 2, 15.5 * std / (9.2 * 32.0));
        }
        // Q6_K: ql[128] qh[64] scales[16] (i8) d; values (q - 32) * d * sc.
        GgmlType::Q6_K => {
            let len = b.len();
            put(b, len - 2, std / (18.5 * 64.0));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::gguf::GgufFile;
    use model::{LlamaModel, Logits, ThreadPool};

    fn tiny() -> Shape {
        Shape {
            n_layers: 2,
            d_model: 64,
            ffn_dim: 128,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 300,
            context: 128,
            rope_base: 10000.0,
        }
    }

    #[test]
    fn synthetic_model_loads_and_runs() {
        let dir = std::env::temp_dir().join(format!("souverain-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for ty in [
            SynthType::Q4_0,
            SynthType::Q4_1,
            SynthType::Q8_0,
            SynthType::F16,
            SynthType::Q4KM,
        ] {
            let path = dir.join(format!("{ty:?}.gguf"));
            let size = write(&path, tiny(), ty, 1).expect("write");
            assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);
            let file = std::sync::Arc::new(GgufFile::open(&path).expect("open"));
            let m = LlamaModel::load(file, &mut |_, _| {}).expect("load");
            assert_eq!(m.config().n_layers, 2);
            assert_eq!(m.config().vocab_size, 300);
            let pool = ThreadPool::new(2);
            let mut kv = m.new_kv_cache(8).expect("kv");
            let logits = m
                .forward(&pool, &[1, 5, 200], &mut kv, Logits::Last)
                .expect("forward");
            assert_eq!(logits.len(), 300);
            assert!(logits.iter().all(|v| v.is_finite()), "{ty:?}");
            let spread = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(spread > 0.0, "{ty:?}: logits all zero");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Q4_K_M as llama.cpp chooses it for a 32-layer model: Q6_K for the output head and
    /// for `attn_v`/`ffn_down` in layers 0-3, 6, 9, ..., 27 and 28-31; Q4_K elsewhere; Q5_0
    /// and Q8_0 where a row is not a multiple of 256.
    #[test]
    fn q4_k_m_chooses_as_llama_cpp() {
        let s = Preset::Mistral7b.shape();
        let specs = tensors(s, SynthType::Q4KM);
        let ty = |name: &str| specs.iter().find(|t| t.name == name).expect(name).ty;
        assert_eq!(ty("output.weight"), GgmlType::Q6_K);
        assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
        let more: Vec<u64> = (0..32)
            .filter(|&i| ty(&format!("blk.{i}.attn_v.weight")) == GgmlType::Q6_K)
            .collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        for i in 0..32 {
            assert_eq!(
                ty(&format!("blk.{i}.ffn_down.weight")),
                ty(&format!("blk.{i}.attn_v.weight"))
            );
            assert_eq!(ty(&format!("blk.{i}.attn_q.weight")), GgmlType::Q4_K);
            assert_eq!(ty(&format!("blk.{i}.ffn_up.weight")), GgmlType::Q4_K);
        }
        assert_eq!(
            matrix_type(SynthType::Q4KM, "attn_q", 5, 32, 640),
            GgmlType::Q5_0
        );
        assert_eq!(
            matrix_type(SynthType::Q4KM, "output", 0, 32, 640),
            GgmlType::Q8_0
        );
        assert_eq!(
            matrix_type(SynthType::Q8_0, "output", 0, 32, 640),
            GgmlType::Q8_0
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("souverain-synth-bad-{}.gguf", std::process::id()));
        let mut s = tiny();
        s.n_kv_heads = 3;
        assert!(write(&path, s, SynthType::Q4_0, 0).is_err());
        let mut s = tiny();
        s.d_model = 48; // 48 is not a multiple of the 32-element block
        s.n_heads = 4;
        assert!(write(&path, s, SynthType::Q4_0, 0).is_err());
        std::fs::remove_file(&path).ok();
    }
}
