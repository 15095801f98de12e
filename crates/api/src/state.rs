//! What every handler shares: the served models and when the app was built.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::EmbeddingBackend;
use crate::error::ApiError;
use crate::models::{ModelSet, Served};
use crate::openai::{ModelCard, ModelStatusValue};

/// The handlers' state.
#[derive(Clone)]
pub(crate) struct AppState {
    /// The chat models, each loaded on first use.
    pub(crate) models: Arc<ModelSet>,
    /// What the Batch API's handlers tell its runner.
    pub(crate) batches: Arc<BatchSignals>,
    /// The embedding model served beside the chat model, if any (`/v1/embeddings`).
    pub(crate) embedder: Option<Arc<dyn EmbeddingBackend>>,
    /// Unix seconds when the router was built: the model's `created`.
    pub(crate) started_at: u64,
    /// The process's energy account, when the server was given it (`/metrics`' idle).
    pub(crate) energy: Option<Arc<engine::EnergyAccount>>,
}

impl AppState {
    pub(crate) fn new(
        models: Arc<ModelSet>,
        embedder: Option<Arc<dyn EmbeddingBackend>>,
        batches: Arc<BatchSignals>,
    ) -> Self {
        AppState {
            models,
            batches,
            embedder,
            started_at: unix_now(),
            energy: None,
        }
    }

    /// The card of the embedding model, if one is served.
    pub(crate) fn embedder_card(&self) -> Option<ModelCard<'_>> {
        self.embedder.as_ref().map(|e| ModelCard {
            id: e.model_id().into(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
            status: None,
        })
    }

    /// The cards of the chat models, with where each is (llama.cpp's router `status`).
    pub(crate) fn model_cards(&self) -> Vec<ModelCard<'static>> {
        self.models
            .statuses()
            .into_iter()
            .map(|s| ModelCard {
                id: s.id.into(),
                object: "model",
                created: self.started_at,
                owned_by: "souverain",
                status: Some(ModelStatusValue {
                    value: s.state.as_str(),
                    aliases: s.aliases,
                    failed: s.error.is_some(),
                }),
            })
            .collect()
    }

    /// The chat model `name` names, loaded: a 400 when the request names none (before any
    /// model is loaded for it), 404 for a name no model has, 503 while it loads past the wait
    /// or when its load failed.
    pub(crate) async fn model(&self, name: Option<&str>) -> Result<Served, ApiError> {
        let Some(name) = name else {
            return Err(ApiError::invalid("model", "`model` is required"));
        };
        self.models.get(Some(name)).await
    }

    /// The model a route where `model` is optional names (the default one when `None`),
    /// loaded, once the key (under `--auth`) may use it: these routes are not admitted as
    /// generations are, so the key's model list is checked here (403).
    pub(crate) async fn optional_model(
        &self,
        name: Option<&str>,
        key: Option<&control::KeyContext>,
    ) -> Result<Served, ApiError> {
        let asked = name.unwrap_or(self.models.default_id());
        if let Some(key) = key
            && !key.key.policy.allows_model(asked)
        {
            return Err(ApiError::from(control::ControlError::from(
                control::Denial::ModelNotAllowed {
                    model: asked.chars().take(edge::ECHOED_NAME_CHARS).collect(),
                },
            )));
        }
        self.models.get(name).await
    }
}

/// What the Batch API's handlers tell its runner: a batch was created (wake up) or
/// cancelled (stop sending its requests).
#[derive(Default)]
pub(crate) struct BatchSignals {
    wake: tokio::sync::Notify,
    cancelled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl BatchSignals {
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes at the next [`BatchSignals::wake`] (or at once if one came meanwhile).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    pub(crate) fn cancel(&self, id: &str) {
        if let Ok(mut set) = self.cancelled.lock() {
            set.insert(id.to_owned());
        }
    }

    pub(crate) fn is_cancelled(&self, id: &str) -> bool {
        self.cancelled.lock().is_ok_and(|set| set.contains(id))
    }

    /// The batch ended: nothing more to say about it.
    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut set) = self.cancelled.lock() {
            set.remove(id);
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// A fresh response id: the prefix and 24 random alphanumerics, as OpenAI's look.
pub(crate) fn response_id(prefix: &str) -> String {
    use rand::Rng;
    use rand::distributions::Alphanumeric;
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{suffix}")
}

/// A fresh response id (see [`response_id`]), recorded as the current span's `request_id`
/// so that every log line about the request carries it.
pub(crate) fn traced_id(prefix: &str) -> String {
    let id = response_id(prefix);
    tracing::Span::current().record("request_id", id.as_str());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_are_prefixed_and_distinct() {
        let a = response_id("chatcmpl-");
        let b = response_id("chatcmpl-");
        assert!(a.starts_with("chatcmpl-"));
        assert_eq!(a.len(), "chatcmpl-".len() + 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(a, b);
    }
}
