//! `souverain`: serve, run and inspect open-weight language models.
//!
//! This binary is glue: flags are parsed and validated here once, then handed to the library
//! crates (`engine`, `api`, `model`, `gguf`, `tokenizer`).

mod admin;
mod bench;
mod inspect;
mod malloc;
mod overhead;
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
    Serve(Box<ServeArgs>),
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

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// GGUF model file, or a Hugging Face / Mistral model directory (default: the default
    /// model in the model cache). `serve` takes it more than once: the first is loaded at
    /// start and is the default, the others on first use.
    #[arg(long, short = 'm', env = "SOUVERAIN_MODEL")]
    model: Vec<PathBuf>,
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
    /// Name the (first) model is served under (default: the file name without extension).
    #[arg(long)]
    model_id: Option<String>,
    /// Serve every GGUF file in this directory too (each under its file name without
    /// extension), loaded on first use, as llama.cpp's `--models-dir`.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Another name for a served model, `ALIAS=ID` (repeatable).
    #[arg(long = "model-alias", value_name = "ALIAS=ID")]
    model_aliases: Vec<String>,
    /// Most bytes the loaded models may hold (weights and KV caches; suffixes K, M, G, T
    /// in powers of 1024): loading one more unloads the least recently used (default: no
    /// bound).
    #[arg(long, value_parser = clap::builder::ValueParser::new(parse_bytes))]
    max_loaded_bytes: Option<u64>,
    /// Longest a request waits for its model to load, seconds; then 503 with Retry-After.
    #[arg(long, default_value_t = 600)]
    model_load_timeout: u64,
    /// Requests of a batch (Batch API, with --auth) sent at once; the engine runs batch work
    /// in at most half its slots, behind every interactive request.
    #[arg(long, default_value_t = 8)]
    batch_concurrency: usize,
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
#[derive(Args, Debug, Clone)]
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
    /// With --draft-model, a draft ends before its first token whose probability under the
    /// draft model is below P (llama.cpp's `--draft-p-min`); 0 always drafts --draft-max.
    #[arg(long, value_name = "P", default_value_t = engine::Speculation::default().draft_p_min)]
    draft_p_min: f32,
    /// Longest n-gram looked up for a draft (with --speculate ngram).
    #[arg(long, default_value_t = engine::Speculation::default().ngram_max)]
    ngram_max: usize,
    /// Speculative decoding with a draft model: a small model of the same vocabulary (GGUF
    /// file or model directory) whose greedy continuations the model verifies, as llama.cpp's
    /// `--model-draft` (also accepted); lossless like `--speculate ngram`, which it replaces.
    #[arg(
        long,
        alias = "model-draft",
        value_name = "PATH",
        conflicts_with = "speculate"
    )]
    draft_model: Option<PathBuf>,
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
        (self.speculate == Speculate::Ngram || self.draft_model.is_some()).then(|| {
            engine::Speculation {
                draft_max: self.draft_max,
                ngram_max: self.ngram_max,
                draft_p_min: self.draft_p_min,
                ..engine::Speculation::default()
            }
        })
    }
}

/// Where the energy reported per request comes from.
#[derive(Args, Debug, Clone)]
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
    malloc::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(a) => serve(*a),
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
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime `serve` runs the API on (and `bench --profile`'s server, to time it
/// as served): two workers.
fn serve_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// An error and its causes on one line, as `{:#}` writes them, except a cause whose text the
/// message already ends with (errors of the libraries below name their cause in their own
/// message, so `{:#}` would repeat it).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out == text || out.ends_with(&format!(": {text}")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
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

/// A byte count: digits, optionally followed by K, M, G or T (powers of 1024; `KiB`,
/// `GiB`... and `KB`, `GB`... are read the same).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 8G, 512M, 1073741824)"))?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches('B') {
        "" => 0,
        "K" | "KI" => 10,
        "M" | "MI" => 20,
        "G" | "GI" => 30,
        "T" | "TI" => 40,
        _ => return Err(format!("`{text}`: unknown unit (use K, M, G or T)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// The one model file of a command that runs one model (`run`, `chat`, `bench`).
fn one_model_path(args: &ModelArgs) -> Result<PathBuf> {
    match args.model.as_slice() {
        [] => {
            let p = default_model_path()?;
            if !p.exists() {
                bail!(
                    "no --model given and the default model is not at {} (run scripts/fetch-model)",
                    p.display()
                );
            }
            Ok(p)
        }
        [one] => Ok(one.clone()),
        _ => bail!("this command runs one model; give --model once"),
    }
}

fn load_engine(
    args: &ModelArgs,
    model_id: Option<String>,
    batching: Option<&BatchingArgs>,
) -> Result<Engine> {
    load_engine_at(&one_model_path(args)?, args, model_id, batching, true, None)
}

/// The energy metering `serve`'s flags ask for.
fn energy_config(b: &BatchingArgs) -> engine::EnergyConfig {
    engine::EnergyConfig {
        source: b.energy.energy_source,
        idle_watts: b.energy.energy_idle_watts,
        active_watts_per_thread: b.energy.energy_active_watts,
    }
}

/// Loads the model at `path` with the command's settings; `progress` draws a bar while the
/// weights load (when stderr is a terminal).
fn load_engine_at(
    path: &Path,
    args: &ModelArgs,
    model_id: Option<String>,
    batching: Option<&BatchingArgs>,
    progress: bool,
    energy_account: Option<Arc<engine::EnergyAccount>>,
) -> Result<Engine> {
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
            draft_model: b.draft_model.clone(),
            kv_cache_type: b.kv_cache_type,
            energy: energy_config(b),
            energy_account,
        },
        // One user at the terminal: one sequence, one context's worth of cache.
        None => EngineConfig {
            threads: args.threads,
            model_id,
            context_length: args.ctx_size,
            max_seqs: 1,
            chat_template,
            energy_account,
            ..EngineConfig::default()
        },
    };
    let bar = if progress { progress_bar(path) } else { None };
    let engine = Engine::load(path, config, &mut |done, total| {
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

/// The models `serve` serves: every `--model` and every GGUF file of `--models-dir` (the
/// default model when there are none), the first loaded now, the others on first use.
fn served_models(
    args: &ServeArgs,
    energy_account: &Arc<engine::EnergyAccount>,
) -> Result<api::ModelSet> {
    let mut paths = args.model.model.clone();
    if let Some(dir) = &args.models_dir {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading --models-dir {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        found.sort();
        if found.is_empty() && paths.is_empty() {
            bail!("--models-dir {} holds no .gguf file", dir.display());
        }
        paths.extend(found);
    }
    if paths.is_empty() {
        paths.push(one_model_path(&args.model)?);
    }
    if paths.len() > 1 && args.batching.draft_model.is_some() {
        bail!("--draft-model drafts for one model: serve a single --model with it");
    }
    let mut entries = Vec::with_capacity(paths.len());
    for (i, path) in paths.into_iter().enumerate() {
        let id = match (i, &args.model_id) {
            (0, Some(id)) => id.clone(),
            _ => engine::default_model_id(&path),
        };
        let d = engine::describe_file(&path)
            .with_context(|| format!("reading the model {}", path.display()))?;
        let facts = api::ModelFacts {
            format: d.format.to_owned(),
            architecture: d.architecture,
            parameters: d.n_params,
            file_bytes: d.file_bytes,
            cache_bytes: 0,
            modified_unix_s: d.modified_unix_s,
            metadata: d.metadata,
            chat_template: d.chat_template,
        };
        let (model_args, batching, first) = (args.model.clone(), args.batching.clone(), i == 0);
        let loader_id = id.clone();
        let account = energy_account.clone();
        let loader: api::Loader = Arc::new(move || {
            load_engine_at(
                &path,
                &model_args,
                Some(loader_id.clone()),
                Some(&batching),
                first,
                Some(account.clone()),
            )
            .map(|engine| Arc::new(engine) as Arc<dyn api::Backend>)
            .map_err(|e| error_chain(&e))
        });
        entries.push(api::ModelEntry {
            id,
            aliases: Vec::new(),
            facts,
            loader,
        });
    }
    for alias in &args.model_aliases {
        let Some((alias, id)) = alias.split_once('=') else {
            bail!("--model-alias `{alias}` is not ALIAS=ID");
        };
        let Some(entry) = entries.iter_mut().find(|e| e.id == id) else {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            bail!(
                "--model-alias {alias}={id}: no model `{id}` (served: {})",
                ids.join(", ")
            );
        };
        entry.aliases.push(alias.to_owned());
    }
    let first = entries[0].id.clone();
    let set = api::ModelSet::new(
        entries,
        args.max_loaded_bytes,
        std::time::Duration::from_secs(args.model_load_timeout),
    )?;
    set.load_now(&first)?;
    Ok(set)
}

fn serve(args: ServeArgs) -> Result<()> {
    // Opened before the weights load, so a bad database or flag fails at once.
    let control = admin::open_if_asked(&args.auth, admin::HotDefaults::SERVE)?;
    // One energy meter for the process: every model's engine and the embedding model read
    // it, so that the machine's energy is counted once (`engine::EnergyAccount`).
    let threads = match args.model.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let energy_account = engine::EnergyAccount::open(&energy_config(&args.batching), threads)
        .map_err(|e| anyhow::anyhow!(e))
        .context("opening the energy meter")?;
    let models = Arc::new(served_models(&args, &energy_account)?);
    let embedder: Option<Arc<dyn api::EmbeddingBackend>> = match &args.embedding_model {
        Some(dir) => {
            let config = engine::EmbedderConfig {
                threads: args.model.threads,
                model_id: args.embedding_model_id.clone(),
                energy_account: Some(energy_account.clone()),
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
            // One name, one model: requests, `/v1/models` and `/metrics` tell them apart by it.
            if models.serves(embedder.model_id()) {
                bail!(
                    "the embedding model's id `{}` is a chat model's too: set --embedding-model-id",
                    embedder.model_id()
                );
            }
            Some(Arc::new(embedder))
        }
        None => None,
    };
    let runtime = serve_runtime()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(address = %addr, model = models.default_id(), "listening");
        let shutdown = route::shutdown();
        api::App::with_models(models)
            .with_batch_concurrency(args.batch_concurrency)
            .with_energy_account(Some(energy_account))
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
                eprintln!("error: {}", error_chain(&e));
                history.pop();
            }
        }
    }
    Ok(())
}
