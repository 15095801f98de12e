//! Souverain's fleet layer: a router in front of many replicas (Souverain's own and existing
//! engines: vLLM, SGLang, llama.cpp's server, TGI), and the parts it picks with.
//!
//! - [`upstream`]: what each replica is ([`UpstreamSpec`]) and what the router knows of it
//!   while it runs ([`Upstream`]: health, load, requests in flight), in a [`Pool`] that
//!   discovery replaces as replicas come and go.
//! - [`scrape`]: each engine's load read from its own Prometheus series, and health probes.
//! - [`prefix`]: chained hashes of prompt blocks and the index of which replica saw which.
//! - [`picker`]: filters (health, model, region, subset) and weighted scorers.
//! - [`config`]: the router's TOML file.
//! - [`replicas`]: `GET /admin/v1/replicas`, the replicas as the router sees them.
//!
//! ```
//! use std::sync::Arc;
//! use souverain_fleet::{Picker, PickRequest, Pool, RouterConfig};
//!
//! let config = RouterConfig::parse(r#"
//!     [[upstream]]
//!     name = "paris-1"
//!     url = "http://10.0.0.1:8000"
//!     engine = "vllm"
//!     region = "eu-west-paris"
//! "#).unwrap();
//! let pool = Arc::new(Pool::with(config.upstreams.clone()).unwrap());
//! let picker = Picker::new(pool, config.routing.clone());
//! let regions = vec!["eu-west-paris".to_owned()];
//! let pick = picker.pick(&PickRequest { regions: Some(&regions), ..Default::default() }).unwrap();
//! assert_eq!(pick.upstream.authority(), "10.0.0.1:8000");
//! ```

pub mod client;
pub mod config;
pub mod discovery;
mod exposition;
pub mod extproc;
pub mod picker;
pub mod prefix;
pub mod proxy;
pub mod replicas;
pub mod request;
pub mod scrape;
pub mod service;
pub mod standin;
pub mod upstream;

pub use crate::client::{HttpClient, http_client};
pub use crate::config::{RouterConfig, RoutingConfig, Strategy, Weights};
pub use crate::discovery::spawn_kubernetes_discovery;
pub use crate::extproc::serve_ext_proc;
pub use crate::picker::{Pick, PickError, PickRequest, Picker, Scores};
pub use crate::proxy::{FleetRouter, app};
pub use crate::request::{RoutingKey, prompt_bytes, routing_key};
pub use crate::service::Fleet;
pub use crate::upstream::{EngineKind, InFlight, Load, Pool, Upstream, UpstreamSpec};

/// What can go wrong in the fleet layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The configuration (file, flag or discovered object) is invalid.
    #[error("invalid router configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
