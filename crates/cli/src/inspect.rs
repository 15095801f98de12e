//! `souverain inspect PATH`: validate a model file (or a Hugging Face / Mistral model
//! directory) completely and describe it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use gguf::GgufFile;

/// `println!` that ends the command quietly when its reader has gone
/// (`souverain inspect F | head`), as command-line tools do, instead of panicking; any other
/// write error is the command's error.
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        match writeln!(std::io::stdout().lock(), $($t)*) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }};
}

/// Validates the GGUF structure, then (for architectures this build runs) every weight's
/// shape and type and the tokenizer, and prints what it found.
pub(crate) fn run(path: &Path) -> Result<()> {
    if path.is_dir() {
        return run_dir(path);
    }
    let file = GgufFile::open(path)
        .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
    let md = file.metadata();
    let arch = md
        .get_str("general.architecture")
        .context("reading general.architecture")?;
    println!("file:           {}", path.display());
    println!("gguf version:   {}", file.version());
    println!("architecture:   {arch}");
    if let Some(name) = md.opt_str("general.name")? {
        println!("name:           {name}");
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in file.tensors() {
        let e = by_type.entry(t.ggml_type.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_elements;
    }
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements).sum();
    let mix: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, _))| format!("{ty} x{n}"))
        .collect();
    let dominant = by_type
        .iter()
        .max_by_key(|(_, (_, elems))| *elems)
        .map(|(ty, _)| ty.as_str())
        .unwrap_or("none");
    println!("quantisation:   {dominant} (tensors: {})", mix.join(", "));
    println!("tensors:        {}", file.tensors().len());
    println!("parameters:     {n_params}");
    println!("file size:      {} bytes", file.file_size());
    if let Some(ctx) = md.opt_u32(&format!("{arch}.context_length"))? {
        println!("context length: {ctx}");
    }
    match md.opt_str("tokenizer.ggml.model")? {
        Some(tok) => {
            let pre = md.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let n = md.get("tokenizer.ggml.tokens").map_or(0, |_| {
                md.get_str_array("tokenizer.ggml.tokens")
                    .map_or(0, |v| v.len())
            });
            println!("tokenizer:      {tok} (pre-tokenizer {pre}, {n} tokens)");
        }
        None => println!("tokenizer:      none"),
    }
    println!(
        "chat template:  {}",
        if md.opt_str("tokenizer.chat_template")?.is_some() {
            "yes"
        } else {
            "no"
        }
    );

    if !model::GGUF_ARCHITECTURES.contains(&arch) {
        println!(
            "runnable:       no (architecture {arch:?} is not supported yet; the file itself is valid)"
        );
        return Ok(());
    }
    let file = Arc::new(file);
    let model = model::LlamaModel::load(file.clone(), &mut |_, _| {})
        .context("the weights do not form a valid llama model")?;
    let c = model.config();
    println!(
        "shape:          {} layers, width {}, {} heads ({} KV), head dim {}, FFN {}, vocab {}",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
    );
    describe_layers(c)?;
    describe_experts(c)?;
    let spec = engine::tokenizer_spec(file.metadata())
        .map_err(anyhow::Error::msg)
        .context("reading the tokenizer")?;
    let tok = tokenizer::Tokenizer::from_spec(spec).context("building the tokenizer")?;
    if tok.vocab_size() != c.vocab_size {
        anyhow::bail!(
            "tokenizer has {} tokens but the embedding has {} rows",
            tok.vocab_size(),
            c.vocab_size
        );
    }
    println!("runnable:       yes");
    Ok(())
}

/// What differs between architectures of the family: attention per layer, RoPE bases, the
/// MLP's activation, norms, and the KV bytes a token costs.
/// The mixture of experts, if any: how many, how they are chosen (DeepSeek's scores, groups,
/// shared experts and leading dense layers).
fn describe_experts(c: &model::LlamaConfig) -> Result<()> {
    if c.n_experts == 0 {
        return Ok(());
    }
    let mut line = format!(
        "{} of width {} ({} per token",
        c.n_experts,
        c.expert_ffn_dim(),
        c.n_experts_used
    );
    if let Some(e) = &c.experts {
        line.push_str(&format!(", {:?} scores", e.gating).to_lowercase());
        if e.n_groups > 1 {
            line.push_str(&format!(
                ", from {} of {} groups",
                e.groups_used, e.n_groups
            ));
        }
        if e.weights_scale != 1.0 {
            line.push_str(&format!(", weights x{}", e.weights_scale));
        }
        if e.n_shared > 0 {
            line.push_str(&format!(", {} shared", e.n_shared));
        }
        if e.leading_dense > 0 {
            line.push_str(&format!(
                "; the first {} layers dense, FFN {}",
                e.leading_dense, c.ffn_dim
            ));
        }
    }
    let norm = if c.moe_renormalize {
        "renormalised"
    } else {
        "not renormalised"
    };
    println!("experts:        {line}; {norm})");
    Ok(())
}

fn describe_layers(c: &model::LlamaConfig) -> Result<()> {
    let windowed: Vec<usize> = (0..c.n_layers)
        .filter(|&l| c.layer_attention(l).window.is_some())
        .collect();
    match c.sliding_window {
        Some(w) if windowed.len() == c.n_layers => {
            println!("attention:      sliding window {w} in every layer")
        }
        Some(w) => {
            let global: Vec<String> = (0..c.n_layers)
                .filter(|l| !windowed.contains(l))
                .map(|l| l.to_string())
                .collect();
            println!(
                "attention:      {} layers with a sliding window of {w}, {} global (layers {})",
                windowed.len(),
                global.len(),
                global.join(", ")
            );
        }
        None => println!("attention:      global in every layer"),
    }
    match c.rope_freq_base_swa {
        Some(local) if !windowed.is_empty() => println!(
            "rope:           base {} (global layers), {local} (windowed layers), {:?} pairs",
            c.rope_freq_base, c.rope_style
        ),
        _ => println!(
            "rope:           base {}, {:?} pairs",
            c.rope_freq_base, c.rope_style
        ),
    }
    println!("rope scaling:   {}", describe_rope_scaling(&c.rope_scaling));
    let mut extras = vec![format!("{:?} MLP", c.activation)];
    if c.qk_norm {
        extras.push("QK-norm".into());
    }
    if c.attn_bias {
        extras.push("q/k/v biases".into());
    }
    if let Some(t) = &c.attn_temperature {
        extras.push(format!(
            "attention temperature 1 + {} ln(1 + floor(pos / {}))",
            t.scale, t.length
        ));
    }
    if let Some(m) = &c.mla {
        extras.push(format!(
            "latent attention (cached: {} latent + {} rotated per token; queries {}, per head \
             {} + {} key dims and {} value dims)",
            m.kv_lora_rank,
            c.rope_dim,
            m.q_lora_rank
                .map_or("full rank".to_owned(), |r| format!("of rank {r}")),
            m.qk_nope_dim,
            c.rope_dim,
            m.v_head_dim
        ));
    }
    if c.post_norms {
        extras.push("post-norms".into());
    }
    if c.embedding_scale != 1.0 {
        extras.push(format!("embeddings x{}", c.embedding_scale));
    }
    extras.push(format!("attention scale {}", c.attention_scale));
    println!("blocks:         {}", extras.join(", "));
    println!(
        "KV per token:   {} bytes in all layers, {} in the global ones",
        model::KvPool::bytes_per_token(c),
        model::KvPool::bytes_per_token_global(c)
    );
    Ok(())
}

/// A model directory: loads it completely (every tensor checked) and describes it.
fn run_dir(path: &Path) -> Result<()> {
    let loaded = model::LoadedModel::open(path, &mut |_, _| {})
        .with_context(|| format!("{} is not a loadable model directory", path.display()))?;
    let c = loaded.model.config();
    let layout = match loaded.format {
        model::ModelFormat::HuggingFace => "Hugging Face (config.json + safetensors)",
        model::ModelFormat::Mistral => "Mistral (params.json + consolidated safetensors)",
        _ => "GGUF",
    };
    println!("directory:      {}", path.display());
    println!("layout:         {layout}");
    println!("architecture:   {}", c.architecture);
    let t = &loaded.tensors;
    let mix: Vec<String> = t
        .by_type
        .iter()
        .map(|(ty, (n, _))| format!("{ty} x{n}"))
        .collect();
    let dominant = t
        .by_type
        .iter()
        .max_by_key(|(_, (_, elems))| *elems)
        .map_or("none", |(ty, _)| ty.as_str());
    println!("dtype:          {dominant} (tensors: {})", mix.join(", "));
    println!("tensors:        {}", t.n_tensors);
    println!("parameters:     {}", t.n_params);
    println!("context length: {}", c.context_length);
    println!(
        "shape:          {} layers, width {}, {} heads ({} KV), head dim {}, FFN {}, vocab {}",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
    );
    describe_layers(c)?;
    describe_experts(c)?;
    let tok = match &loaded.tokenizer {
        model::TokenizerSource::HuggingFace {
            tokenizer_json,
            tokenizer_config,
        } => format!(
            "{}{}",
            tokenizer_json.display(),
            tokenizer_config
                .as_ref()
                .map(|p| format!(" + {}", p.display()))
                .unwrap_or_default()
        ),
        model::TokenizerSource::Tekken(p) | model::TokenizerSource::SentencePiece(p) => {
            p.display().to_string()
        }
        _ => "none found".into(),
    };
    println!("tokenizer:      {tok}");
    println!("runnable:       yes (weights)");
    Ok(())
}

/// The RoPE scaling and its parameters, as `inspect` prints them.
fn describe_rope_scaling(s: &model::RopeScaling) -> String {
    match s {
        model::RopeScaling::Linear { factor } => format!("linear, factor {factor}"),
        model::RopeScaling::FreqFactors(d) => {
            let (lo, hi) = d.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            format!(
                "llama3, frequency divisors per pair {lo} .. {hi} ({} of {} pairs scaled)",
                d.iter().filter(|&&v| v != 1.0).count(),
                d.len()
            )
        }
        model::RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        } => format!(
            "yarn, factor {factor}, original context {original_context}, beta_fast {beta_fast}, \
             beta_slow {beta_slow}, attention factor {attention_factor}"
        ),
        other => other.name().to_owned(),
    }
}
