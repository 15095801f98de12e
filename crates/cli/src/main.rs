//! `souverain`: serve, run and inspect open-weight language models.
//!
//! This binary is glue: flags are parsed and validated here once, then handed to the library
//! crates (`engine`, `api`, `model`, `gguf`, `tokenizer`).

mod admin;
mod bench;
mod inspect;
mod panics;
mod plan;
mod route;
mod synth;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use engine::{ChatMessage, Engine, EngineConfig, Event, GenerateRequest, SamplingParams};

/// Sovereign AI inference: run open-weight models on hardware you control.
#[derive(Parser, Debug)]
#[command(name = "souverain", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a model behind an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Manage organisations, projects, API keys, usage and the audit log (for `serve --auth`).
    Admin(admin::AdminArgs),
    /// Complete one prompt and print the result.
    Generate(GenerateArgs),
    /// Chat with a model in the terminal (streaming).
    Chat(ChatArgs),
    /// Validate a model file completely and describe it. Exits 0 only for a valid file.
    Inspect {
        /// Path of a GGUF file.
        path: PathBuf,
    },
    /// Measure prompt-processing and generation speed (tokens/s), like llama-bench.
    Bench(bench::BenchArgs),
    /// Write a random-weight GGUF model of a real model's shape (for benchmarks).
    Synth(synth::SynthArgs),
    /// Size a site (GPUs, racks, megawatts) for a demand within its latency promises.
    Plan(plan::PlanArgs),
    /// Route the OpenAI API over many replicas (Souverain, vLLM, SGLang, llama.cpp, TGI),
    /// with keys, budgets and residency enforced here.
    Route(route::RouteArgs),
    /// Serve the Gateway API Inference Extension's endpoint picker (Envoy ext_proc gRPC).
    Picker(route::PickerArgs),
    /// A stand-in engine with no model, for testing and benchmarking the router.
    #[command(hide = true)]
    Standin(route::StandinArgs),
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// GGUF model file (default: the default model in the model cache).
    #[arg(long, short = 'm', env = "SOUVERAIN_MODEL")]
    model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', default_value_t = 0)]
    threads: usize,
    /// Context length in tokens (default: the model's trained context).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// A Jinja chat template file to use instead of the model's own (llama-server's
    /// --chat-template-file, vLLM's --chat-template).
    #[arg(long, alias = "chat-template")]
    chat_template_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Name the model is served under (default: the file name without extension).
    #[arg(long)]
    model_id: Option<String>,
    #[command(flatten)]
    batching: BatchingArgs,
    #[command(flatten)]
    auth: admin::ServeAuthArgs,
    /// An embedding model to serve on /v1/embeddings beside the chat model: a BERT directory
    /// in the Hugging Face / sentence-transformers layout (config.json, model.safetensors,
    /// tokenizer.json, modules.json), e.g. all-MiniLM-L6-v2 from scripts/fetch-embedding-model.
    #[arg(long)]
    embedding_model: Option<PathBuf>,
    /// Name the embedding model is served under (default: the directory's name).
    #[arg(long)]
    embedding_model_id: Option<String>,
}

/// How many users are served at once, and with how much memory.
#[derive(Args, Debug)]
struct BatchingArgs {
    /// Most sequences generated at once (continuous batching; llama-server's -np).
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Most requests waiting to start; beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Tokens of KV cache shared by all sequences (default: twice the context length).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// Most tokens per forward pass (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// How the KV cache stores keys and values: f16 (default) or q8_0 (53% of the bytes;
    /// llama.cpp's `--cache-type-k/-v q8_0`).
    #[arg(long, default_value = "f16", value_parser = clap::builder::ValueParser::new(
        |s: &str| s.parse::<engine::KvType>()))]
    kv_cache_type: engine::KvType,
    /// Speculative decoding: `ngram` drafts tokens from each sequence's own earlier tokens
    /// (prompt lookup, as vLLM's `ngram` and llama.cpp's lookup decoding) and verifies them
    /// in one forward pass; lossless (greedy and seeded output unchanged).
    #[arg(long, value_enum, default_value_t = Speculate::None)]
    speculate: Speculate,
    /// Most draft tokens per step (with --speculate).
    #[arg(long, default_value_t = engine::Speculation::default().draft_max)]
    draft_max: usize,
    /// Longest n-gram looked up for a draft (with --speculate ngram).
    #[arg(long, default_value_t = engine::Speculation::default().ngram_max)]
    ngram_max: usize,
    #[command(flatten)]
    energy: EnergyArgs,
}

/// Speculative decoding methods.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Speculate {
    /// One token per step.
    None,
    /// Prompt-lookup (n-gram) drafts.
    Ngram,
}

impl BatchingArgs {
    fn speculation(&self) -> Option<engine::Speculation> {
        (self.speculate == Speculate::Ngram).then(|| engine::Speculation {
            draft_max: self.draft_max,
            ngram_max: self.ngram_max,
            ..engine::Speculation::default()
        })
    }
}

/// Where the energy reported per request comes from.
#[derive(Args, Debug)]
struct EnergyArgs {
    /// Energy source: auto (RAPL when readable, else the model), rapl (Linux powercap,
    /// measured), nvml (NVIDIA GPUs, measured), model (the CPU power model, modelled).
    #[arg(long, default_value = "auto", value_parser = clap::builder::ValueParser::new(
        |s: &str| s.parse::<engine::EnergySourceChoice>()))]
    energy_source: engine::EnergySourceChoice,
    /// The power model's CPU package power at rest, watts.
    #[arg(long, default_value_t = engine::EnergyConfig::default().idle_watts)]
    energy_idle_watts: f64,
    /// The power model's power per worker thread while a step computes, watts.
    #[arg(long, default_value_t = engine::EnergyConfig::default().active_watts_per_thread)]
    energy_active_watts: f64,
}

#[derive(Args, Debug)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Minimum probability relative to the most likely token.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 disables).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            repetition_penalty: self.repeat_penalty,
            ..SamplingParams::default()
        }
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt, as raw text (no chat template).
    #[arg(long, short = 'p')]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args, Debug)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Admin(a) => admin::run(a),
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Inspect { path } => inspect::run(&path),
        Command::Bench(a) => bench::run(&a),
        Command::Synth(a) => synth::run(&a),
        Command::Plan(a) => plan::run(&a),
        Command::Route(a) => route::route(a),
        Command::Picker(a) => route::picker(a),
        Command::Standin(a) => route::standin(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    panics::install();
}

/// Where `scripts/fetch-model` puts the default model.
fn default_model_path() -> Result<PathBuf> {
    let dir = match std::env::var_os("SOUVERAIN_MODELS") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set; pass --model")?;
            PathBuf::from(home).join(".cache/souverain/models")
        }
    };
    Ok(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn load_engine(
    args: &ModelArgs,
    model_id: Option<String>,
    batching: Option<&BatchingArgs>,
) -> Result<Engine> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = default_model_path()?;
            if !p.exists() {
                bail!(
                    "no --model given and the default model is not at {} (run scripts/fetch-model)",
                    p.display()
                );
            }
            p
        }
    };
    let chat_template = match &args.chat_template_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the chat template {}", p.display()))?,
        ),
        None => None,
    };
    let config = match batching {
        Some(b) => EngineConfig {
            chat_template,
            threads: args.threads,
            model_id,
            context_length: args.ctx_size,
            max_seqs: b.max_seqs,
            max_waiting: b.max_waiting,
            kv_cache_tokens: b.kv_cache_tokens,
            max_batch_tokens: b.max_batch_tokens,
            speculation: b.speculation(),
            kv_cache_type: b.kv_cache_type,
            energy: engine::EnergyConfig {
                source: b.energy.energy_source,
                idle_watts: b.energy.energy_idle_watts,
                active_watts_per_thread: b.energy.energy_active_watts,
            },
        },
        // One user at the terminal: one sequence, one context's worth of cache.
        None => EngineConfig {
            threads: args.threads,
            model_id,
            context_length: args.ctx_size,
            max_seqs: 1,
            chat_template,
            ..EngineConfig::default()
        },
    };
    let bar = progress_bar(&path);
    let engine = Engine::load(&path, config, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    })
    .with_context(|| format!("loading {}", path.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let d = engine.description();
    tracing::info!(
        model = engine.model_id(),
        architecture = %d.architecture,
        params = d.n_params,
        context = engine.context_length(),
        simd = d.simd,
        threads = d.threads,
        kv_cache_tokens = d.kv_cache_tokens,
        kv_cache_mib = d.kv_cache_bytes >> 20,
        "model loaded"
    );
    Ok(engine)
}

/// A progress bar on stderr while weights load, only when stderr is a terminal.
fn progress_bar(path: &Path) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(1);
    let style = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors")
        .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_message(format!(
        "loading {}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    Some(bar)
}

fn serve(args: ServeArgs) -> Result<()> {
    // Opened before the weights load, so a bad database or flag fails at once.
    let control = admin::open_if_asked(&args.auth, admin::HotDefaults::SERVE)?;
    let engine = Arc::new(load_engine(
        &args.model,
        args.model_id.clone(),
        Some(&args.batching),
    )?);
    let embedder: Option<Arc<dyn api::EmbeddingBackend>> = match &args.embedding_model {
        Some(dir) => {
            let config = engine::EmbedderConfig {
                threads: args.model.threads,
                model_id: args.embedding_model_id.clone(),
                ..engine::EmbedderConfig::default()
            };
            let embedder = engine::Embedder::load(dir, config)
                .with_context(|| format!("loading the embedding model {}", dir.display()))?;
            tracing::info!(
                model = embedder.model_id(),
                dimensions = embedder.dimensions(),
                max_tokens = embedder.max_tokens(),
                params = embedder.n_params(),
                "embedding model loaded"
            );
            Some(Arc::new(embedder))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(address = %addr, model = engine.model_id(), "listening");
        let shutdown = route::shutdown();
        api::App::new(engine)
            .with_embedder(embedder)
            .with_control(control)
            .serve(listener, shutdown)
            .await
            .context("serving HTTP")
    })
}

fn generate(args: GenerateArgs) -> Result<()> {
    let engine = load_engine(&args.model, None, None)?;
    let mut request = GenerateRequest::new(engine.tokenize(&args.prompt));
    request.sampling = args.sampling.params();
    request.max_tokens = Some(args.sampling.max_tokens);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    stream_to(&engine, request, &mut out)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a request and writes its text as it arrives; returns the whole text.
fn stream_to(engine: &Engine, request: GenerateRequest, out: &mut dyn Write) -> Result<String> {
    let mut events = engine.generate(request)?;
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Text(t) => {
                write!(out, "{t}")?;
                out.flush()?;
                text.push_str(&t);
            }
            Event::Logprobs(_) | Event::PromptLogprobs(_) => {}
            Event::Done { .. } => return Ok(text),
            Event::Failed(e) => bail!("generation failed: {e}"),
        }
    }
    bail!("the engine stopped before finishing")
}

fn chat(args: ChatArgs) -> Result<()> {
    let engine = load_engine(&args.model, None, None)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (/reset clears the history, /exit or Ctrl-D quits)",
            engine.model_id()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.to_owned(),
        });
        let reply = engine
            .render_chat(&history)
            .map_err(anyhow::Error::from)
            .and_then(|text| {
                let mut request = GenerateRequest::new(engine.tokenize(&text));
                request.sampling = args.sampling.params();
                request.max_tokens = Some(args.sampling.max_tokens);
                let mut out = std::io::stdout().lock();
                let reply = stream_to(&engine, request, &mut out)?;
                writeln!(out)?;
                Ok(reply)
            });
        match reply {
            Ok(reply) => history.push(ChatMessage {
                role: "assistant".into(),
                content: reply,
            }),
            Err(e) => {
                // The turn is dropped (e.g. the history outgrew the context); the chat goes on.
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
    Ok(())
}
