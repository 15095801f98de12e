//! What every handler shares: the served models and when the app was built.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, EmbeddingBackend};
use crate::openai::ModelCard;

/// The handlers' state.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) backend: Arc<dyn Backend>,
    /// The embedding model served beside the chat model, if any (`/v1/embeddings`).
    pub(crate) embedder: Option<Arc<dyn EmbeddingBackend>>,
    /// Unix seconds when the router was built: the model's `created`.
    pub(crate) started_at: u64,
}

impl AppState {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        embedder: Option<Arc<dyn EmbeddingBackend>>,
    ) -> Self {
        AppState {
            backend,
            embedder,
            started_at: unix_now(),
        }
    }

    /// The card of the embedding model, if one is served.
    pub(crate) fn embedder_card(&self) -> Option<ModelCard<'_>> {
        self.embedder.as_ref().map(|e| ModelCard {
            id: e.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
        })
    }

    /// The card of the chat model.
    pub(crate) fn model_card(&self) -> ModelCard<'_> {
        ModelCard {
            id: self.backend.model_id(),
            object: "model",
            created: self.started_at,
            owned_by: "souverain",
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
