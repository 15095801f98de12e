//! `souverain route`, `souverain picker` and `souverain standin`: the fleet commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use fleet::{EngineKind, Fleet, FleetRouter, RouterConfig};

use crate::admin;

/// `souverain route`.
#[derive(Args, Debug)]
pub(crate) struct RouteArgs {
    /// The router's configuration file (TOML: upstreams or discovery, routing weights).
    #[arg(long)]
    config: PathBuf,
    /// Where to listen (default: the file's `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Also serve the endpoint picker (Envoy ext_proc gRPC) on this address.
    #[arg(long)]
    ext_proc_listen: Option<String>,
    /// Only check the configuration file and exit.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    auth: admin::ServeAuthArgs,
}

/// `souverain picker`.
#[derive(Args, Debug)]
pub(crate) struct PickerArgs {
    /// The configuration file (the router's format; `listen` is not used).
    #[arg(long)]
    config: PathBuf,
    /// Where the ext_proc gRPC server (and gRPC health) listens.
    #[arg(long, default_value = "0.0.0.0:9002")]
    listen: String,
    /// Also serve `/metrics` (Prometheus) and `/health` over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<String>,
    #[command(flatten)]
    auth: admin::ServeAuthArgs,
}

/// `souverain standin`.
#[derive(Args, Debug)]
pub(crate) struct StandinArgs {
    /// Whose metric names it exposes: vllm, sglang, llama-cpp, tgi.
    #[arg(long, default_value = "vllm")]
    flavour: String,
    /// Its name, written into its answers.
    #[arg(long, default_value = "standin")]
    name: String,
    /// The model id it answers for.
    #[arg(long, default_value = "standin-model")]
    model: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Milliseconds per generated token.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what Kubernetes sends a pod it stops).
pub(crate) async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

fn start_fleet(config: &RouterConfig) -> Result<Fleet> {
    let discover: Option<fleet::service::Discover> = match config.discovery.kubernetes.clone() {
        Some(k8s) => {
            let client = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(kube::Client::try_default())
            })
            .context("connecting to the Kubernetes API (in-cluster or kubeconfig)")?;
            Some(Box::new(move |pool| {
                fleet::spawn_kubernetes_discovery(client, k8s, pool)
            }))
        }
        None => None,
    };
    Ok(Fleet::start(config, discover)?)
}

pub(crate) fn route(args: RouteArgs) -> Result<()> {
    let config = RouterConfig::load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let control = admin::open_if_asked(&args.auth, admin::HotDefaults::ROUTE)?;
    runtime()?.block_on(async move {
        let fleet = start_fleet(&config)?;
        let listen = args.listen.unwrap_or_else(|| config.listen.clone());
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let maintenance = control
            .as_ref()
            .map(|c| c.spawn_maintenance(std::time::Duration::from_secs(60)));
        if let Some(addr) = &args.ext_proc_listen {
            let grpc = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::info!(address = %addr, "serving the endpoint picker (ext_proc)");
            let picker = Arc::clone(&fleet.picker);
            let control = control.clone();
            tokio::spawn(async move {
                if let Err(err) = fleet::serve_ext_proc(grpc, picker, control, shutdown()).await {
                    tracing::error!(error = %err, "endpoint picker stopped");
                }
            });
        }
        let control_at_exit = control.clone();
        let router = Arc::new(FleetRouter::new(
            Arc::clone(&fleet.picker),
            fleet.client.clone(),
            control,
            config.proxy.clone(),
        ));
        tracing::info!(
            address = %listen,
            upstreams = fleet.picker.pool().snapshot().len(),
            strategy = ?config.routing.strategy,
            "routing the OpenAI API"
        );
        let result = fleet::proxy::serve(listener, router, shutdown()).await;
        if let Some(m) = maintenance {
            m.abort();
        }
        if let Some(c) = control_at_exit {
            // Budget leases go back and queued usage records reach the store before exit.
            let closed =
                tokio::task::spawn_blocking(move || c.close(Duration::from_secs(10))).await;
            if !matches!(closed, Ok(true)) {
                tracing::warn!("some usage records or budget leases were not written before exit");
            }
        }
        result.context("serving HTTP")
    })
}

pub(crate) fn picker(args: PickerArgs) -> Result<()> {
    let config = RouterConfig::load(&args.config)?;
    let control = admin::open_if_asked(&args.auth, admin::HotDefaults::ROUTE)?;
    runtime()?.block_on(async move {
        let fleet = start_fleet(&config)?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let service = fleet::extproc::EndpointPicker::new(Arc::clone(&fleet.picker), control);
        if let Some(addr) = &args.metrics_listen {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::info!(address = %addr, "serving the picker's metrics");
            let metrics = fleet::extproc::serve_metrics(http, &service, shutdown());
            tokio::spawn(async move {
                if let Err(err) = metrics.await {
                    tracing::error!(error = %err, "metrics server stopped");
                }
            });
        }
        tracing::info!(address = %args.listen, "serving the endpoint picker (ext_proc)");
        fleet::extproc::serve_endpoint_picker(listener, service, shutdown())
            .await
            .context("serving gRPC")
    })
}

pub(crate) fn standin(args: StandinArgs) -> Result<()> {
    let flavour = match args.flavour.as_str() {
        "vllm" => EngineKind::Vllm,
        "sglang" => EngineKind::Sglang,
        "llama-cpp" => EngineKind::LlamaCpp,
        "tgi" => EngineKind::Tgi,
        other => anyhow::bail!("--flavour {other}: one of vllm, sglang, llama-cpp, tgi"),
    };
    let mut standin = fleet::standin::Standin::new(&args.name, flavour, &args.model);
    standin.token_delay = std::time::Duration::from_millis(args.token_delay_ms);
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(address = %args.listen, flavour = %args.flavour, "stand-in engine (no model)");
        tokio::select! {
            r = fleet::standin::serve_standin(listener, Arc::new(standin)) => r.context("serving"),
            () = shutdown() => Ok(()),
        }
    })
}
