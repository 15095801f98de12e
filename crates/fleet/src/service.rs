//! Starting a fleet: the pool from the static list, discovery, the scraper, the picker.

use std::sync::Arc;
use std::time::Duration;

use crate::FleetError;
use crate::client::{HttpClient, http_client};
use crate::config::RouterConfig;
use crate::picker::Picker;
use crate::upstream::Pool;

/// Starts discovery over the pool and returns its task.
pub type Discover = Box<dyn FnOnce(Arc<Pool>) -> tokio::task::JoinHandle<()>>;

/// A running fleet: what the router and the endpoint picker pick from. Its background tasks
/// (scraper, discovery) stop when it is dropped.
#[derive(Debug)]
pub struct Fleet {
    /// The picker (and through it the pool).
    pub picker: Arc<Picker>,
    /// The client shared by scraping and forwarding.
    pub client: HttpClient,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Builds the pool from `config` and starts scraping it (must run inside a tokio
    /// runtime). `discover`, when given, is started with the pool and returns its task: the
    /// caller decides how upstreams are discovered (the CLI passes the Kubernetes watch).
    pub fn start(config: &RouterConfig, discover: Option<Discover>) -> Result<Fleet, FleetError> {
        let pool = Arc::new(Pool::with(config.upstreams.clone())?);
        let client = http_client(Duration::from_millis(
            config.proxy.connect_timeout_ms.min(5_000),
        ));
        let picker = Arc::new(Picker::new(Arc::clone(&pool), config.routing.clone()));
        let mut tasks = Vec::new();
        if let Some(discover) = discover {
            tasks.push(discover(Arc::clone(&pool)));
        }
        tasks.push(crate::scrape::spawn_scraper(
            Arc::clone(&pool),
            client.clone(),
            config.scrape.clone(),
        ));
        let forget = Arc::clone(&picker);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                forget.forget_departed();
            }
        }));
        Ok(Fleet {
            picker,
            client,
            tasks,
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
