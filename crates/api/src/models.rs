//! The chat models one server serves: each loaded on first use (or by an admin's request),
//! the least recently used unloaded when loading another would pass the memory budget, as
//! llama.cpp's router mode and llama-swap do. Every loaded model is a [`Backend`] of its own
//! (one engine and KV pool each); a request holds its model's `Arc` until it ends, so an
//! unload never cuts a generation short: the memory goes when the last request lets go.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use edge::Refusal;
use tokio::sync::watch;

use crate::backend::{Backend, ModelFacts};
use crate::error::ApiError;

/// Loads a model: runs on a blocking thread, may take seconds to minutes. The error is a
/// message for the log and the client.
pub type Loader = Arc<dyn Fn() -> Result<Arc<dyn Backend>, String> + Send + Sync>;

/// Most names (id and aliases) one model may have.
pub const MAX_MODEL_NAMES: usize = 16;
/// Most characters in a model's id or alias.
pub const MAX_MODEL_NAME_CHARS: usize = 256;
/// Most models one server may list.
pub const MAX_MODELS: usize = 1024;

/// One model a server can serve, before it is loaded.
pub struct ModelEntry {
    /// The id clients name in `model`, and `/v1/models` lists.
    pub id: String,
    /// Other names clients may use for it.
    pub aliases: Vec<String>,
    /// What is known without loading it (file bytes, architecture); `file_bytes +
    /// cache_bytes` is the estimate its load is budgeted at.
    pub facts: ModelFacts,
    /// How to load it.
    pub loader: Loader,
}

/// Where a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Not in memory; the next request for it loads it.
    Unloaded,
    /// Being loaded; requests for it wait.
    Loading,
    /// In memory and serving.
    Loaded,
}

impl ModelState {
    /// `unloaded`, `loading` or `loaded` (llama.cpp's router words).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Loaded => "loaded",
        }
    }
}

/// A model as `/v1/models` and the admin routes describe it.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// Its id.
    pub id: String,
    /// Its other names.
    pub aliases: Vec<String>,
    /// Where it is.
    pub state: ModelState,
    /// Bytes it holds in memory when loaded (the estimate when it is not).
    pub bytes: u64,
    /// Why its last load failed, if it did.
    pub error: Option<String>,
}

/// Why a set of models cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelSetError {
    /// No models.
    #[error("no model to serve")]
    Empty,
    /// More than [`MAX_MODELS`] models.
    #[error("{0} models; at most {MAX_MODELS} may be served")]
    TooMany(usize),
    /// A name used twice, or empty, or too long.
    #[error("model name `{0}` is empty, too long, or names two models")]
    BadName(String),
    /// A model alone needs more than the budget.
    #[error("model `{id}` needs about {bytes} bytes, more than the {budget}-byte memory budget")]
    TooLarge {
        /// The model.
        id: String,
        /// Its estimated bytes.
        bytes: u64,
        /// The budget.
        budget: u64,
    },
    /// The model named to load at start failed.
    #[error("loading model `{id}`: {message}")]
    Load {
        /// The model.
        id: String,
        /// What failed.
        message: String,
    },
}

/// How long after a failed load requests for the model get that failure without another
/// try (an admin's load tries at once): a broken file must not unload the others at every
/// request.
const FAILED_BACKOFF: Duration = Duration::from_secs(10);

enum Slot {
    Unloaded {
        /// Why its last load failed, and when.
        error: Option<(String, Instant)>,
        /// The backend it had, while requests still hold it: its memory is still in use (and
        /// counted), and a request for it takes it back instead of loading a second copy.
        draining: Option<(Weak<dyn Backend>, u64)>,
    },
    Loading {
        done: watch::Receiver<bool>,
        reserved: u64,
    },
    Loaded {
        backend: Arc<dyn Backend>,
        bytes: u64,
        last_used: Instant,
    },
}

/// A model as far as it is known: its backend when loaded, else its file's facts.
pub(crate) type Known = Result<Arc<dyn Backend>, ModelFacts>;

/// A model a request was given: its backend and the name the request may use for it.
pub(crate) struct Served {
    pub(crate) backend: Arc<dyn Backend>,
    /// The name the request named (id or alias), or the id when it named none.
    pub(crate) name: String,
}

/// The models a server serves.
pub struct ModelSet {
    entries: Vec<ModelEntry>,
    budget: Option<u64>,
    wait: Duration,
    slots: Mutex<Vec<Slot>>,
}

impl ModelSet {
    /// The models, none loaded yet. `budget` bounds the bytes of the loaded models
    /// (`None`: no bound); a request for a model that is loading waits at most `wait`.
    /// The first entry is the default (for the routes where `model` is optional).
    pub fn new(
        entries: Vec<ModelEntry>,
        budget: Option<u64>,
        wait: Duration,
    ) -> Result<Self, ModelSetError> {
        if entries.is_empty() {
            return Err(ModelSetError::Empty);
        }
        if entries.len() > MAX_MODELS {
            return Err(ModelSetError::TooMany(entries.len()));
        }
        let mut names: Vec<&str> = Vec::new();
        for entry in &entries {
            if entry.aliases.len() >= MAX_MODEL_NAMES {
                return Err(ModelSetError::BadName(entry.id.clone()));
            }
            for name in std::iter::once(&entry.id).chain(&entry.aliases) {
                if name.is_empty()
                    || name.chars().count() > MAX_MODEL_NAME_CHARS
                    || name.chars().any(char::is_control)
                    || names.contains(&name.as_str())
                {
                    return Err(ModelSetError::BadName(name.clone()));
                }
                names.push(name);
            }
            if let Some(budget) = budget {
                let bytes = estimate(&entry.facts);
                if bytes > budget {
                    return Err(ModelSetError::TooLarge {
                        id: entry.id.clone(),
                        bytes,
                        budget,
                    });
                }
            }
        }
        let slots = entries
            .iter()
            .map(|_| Slot::Unloaded {
                error: None,
                draining: None,
            })
            .collect();
        Ok(ModelSet {
            entries,
            budget,
            wait,
            slots: Mutex::new(slots),
        })
    }

    /// One model, already loaded, no budget: the single-model server.
    pub fn single(backend: Arc<dyn Backend>) -> Self {
        let kept = Arc::clone(&backend);
        let entry = ModelEntry {
            id: backend.model_id().to_owned(),
            aliases: Vec::new(),
            facts: backend.facts(),
            loader: Arc::new(move || Ok(Arc::clone(&kept))),
        };
        let bytes = loaded_bytes(&entry, backend.as_ref());
        ModelSet {
            entries: vec![entry],
            budget: None,
            wait: Duration::from_secs(600),
            slots: Mutex::new(vec![Slot::Loaded {
                backend,
                bytes,
                last_used: Instant::now(),
            }]),
        }
    }

    /// Loads the model named `name` on this thread (at start, before serving), unloading
    /// others as the budget needs.
    pub fn load_now(&self, name: &str) -> Result<(), ModelSetError> {
        let Some(index) = self.find(name) else {
            return Err(ModelSetError::BadName(name.to_owned()));
        };
        let entry = &self.entries[index];
        let backend = (entry.loader)().map_err(|message| ModelSetError::Load {
            id: entry.id.clone(),
            message,
        })?;
        self.install(index, backend);
        Ok(())
    }

    /// The id of the default model (the first).
    pub fn default_id(&self) -> &str {
        &self.entries[0].id
    }

    /// Every model's id, in the order given.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.id.as_str())
    }

    /// Where every model is.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        let slots = self.lock();
        self.entries
            .iter()
            .zip(slots.iter())
            .map(|(entry, slot)| {
                let (state, bytes, error) = match slot {
                    Slot::Unloaded { error, .. } => (
                        ModelState::Unloaded,
                        estimate(&entry.facts),
                        error.as_ref().map(|(e, _)| e.clone()),
                    ),
                    Slot::Loading { reserved, .. } => (ModelState::Loading, *reserved, None),
                    Slot::Loaded { bytes, .. } => (ModelState::Loaded, *bytes, None),
                };
                ModelStatus {
                    id: entry.id.clone(),
                    aliases: entry.aliases.clone(),
                    state,
                    bytes,
                    error,
                }
            })
            .collect()
    }

    /// The loaded models' backends.
    pub fn loaded(&self) -> Vec<Arc<dyn Backend>> {
        self.lock()
            .iter()
            .filter_map(|slot| match slot {
                Slot::Loaded { backend, .. } => Some(Arc::clone(backend)),
                _ => None,
            })
            .collect()
    }

    /// Every model: its id, its backend when loaded, else the facts known without loading.
    pub(crate) fn each(&self) -> Vec<(String, Known)> {
        let slots = self.lock();
        self.entries
            .iter()
            .zip(slots.iter())
            .map(|(entry, slot)| {
                let known = match slot {
                    Slot::Loaded { backend, .. } => Ok(Arc::clone(backend)),
                    _ => Err(entry.facts.clone()),
                };
                (entry.id.clone(), known)
            })
            .collect()
    }

    /// Whether `name` names one of the models.
    pub fn serves(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.id == name || e.aliases.iter().any(|a| a == name))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic while the lock was held left the slots consistent (every change is one
        // assignment): keep serving.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model `name` names (the default when `None`), loading it if needed and waiting
    /// for its load at most the set's wait: 404 for an unknown name, 503 while it is still
    /// loading or when its load failed.
    pub(crate) async fn get(self: &Arc<Self>, name: Option<&str>) -> Result<Served, ApiError> {
        self.get_or_load(name, false).await
    }

    /// [`ModelSet::get`]; `force` tries a load even within [`FAILED_BACKOFF`] of a failure.
    async fn get_or_load(
        self: &Arc<Self>,
        name: Option<&str>,
        force: bool,
    ) -> Result<Served, ApiError> {
        let index = match name {
            None => 0,
            Some(name) => self
                .find(name)
                .ok_or_else(|| ApiError::model_not_found(name))?,
        };
        let served_name = name.unwrap_or(&self.entries[index].id).to_owned();
        let deadline = Instant::now() + self.wait;
        loop {
            let mut done = {
                let mut slots = self.lock();
                match &mut slots[index] {
                    Slot::Loaded {
                        backend, last_used, ..
                    } => {
                        *last_used = Instant::now();
                        return Ok(Served {
                            backend: Arc::clone(backend),
                            name: served_name,
                        });
                    }
                    Slot::Loading { done, .. } => done.clone(),
                    Slot::Unloaded {
                        draining: Some((weak, bytes)),
                        ..
                    } if weak.strong_count() > 0 => {
                        // Still held by requests: loaded again at no cost.
                        let (weak, bytes) = (weak.clone(), *bytes);
                        if let Some(backend) = weak.upgrade() {
                            slots[index] = Slot::Loaded {
                                backend: Arc::clone(&backend),
                                bytes,
                                last_used: Instant::now(),
                            };
                            return Ok(Served {
                                backend,
                                name: served_name,
                            });
                        }
                        continue;
                    }
                    Slot::Unloaded {
                        error: Some((error, at)),
                        ..
                    } if !force && at.elapsed() < FAILED_BACKOFF => {
                        return Err(load_failed(&self.entries[index].id, error));
                    }
                    Slot::Unloaded { .. } => self.start_load(&mut slots, index)?,
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, done.wait_for(|finished| *finished))
                .await
                .is_err()
            {
                return Err(still_loading(&self.entries[index].id));
            }
            if let Slot::Unloaded {
                error: Some((error, _)),
                ..
            } = &self.lock()[index]
            {
                return Err(load_failed(&self.entries[index].id, error));
            }
            // Loaded now (or unloaded again to make room for another): look again.
        }
    }

    /// Loads the model `name` names (an admin's request, tried even just after a failure);
    /// waits for the load like [`ModelSet::get`].
    pub(crate) async fn load(self: &Arc<Self>, name: &str) -> Result<String, ApiError> {
        self.get_or_load(Some(name), true)
            .await
            .map(|s| s.backend.model_id().to_owned())
    }

    /// Unloads the model `name` names: `Ok(false)` when it was not loaded; a 409 while it is
    /// loading.
    pub fn unload(&self, name: &str) -> Result<bool, ApiError> {
        let index = self
            .find(name)
            .ok_or_else(|| ApiError::model_not_found(name))?;
        let mut slots = self.lock();
        match &slots[index] {
            Slot::Unloaded { .. } => Ok(false),
            Slot::Loading { .. } => Err(refusal(
                StatusCode::CONFLICT,
                format!(
                    "The model `{}` is loading; unload it once it is loaded",
                    self.entries[index].id
                ),
                None,
            )),
            Slot::Loaded { backend, bytes, .. } => {
                let draining = Some((Arc::downgrade(backend), *bytes));
                slots[index] = Slot::Unloaded {
                    error: None,
                    draining,
                };
                tracing::info!(model = %self.entries[index].id, "model unloaded");
                Ok(true)
            }
        }
    }

    /// Marks `index` loading, makes room for it and starts its loader on a blocking thread;
    /// returns what to wait on.
    fn start_load(
        self: &Arc<Self>,
        slots: &mut [Slot],
        index: usize,
    ) -> Result<watch::Receiver<bool>, ApiError> {
        let reserved = estimate(&self.entries[index].facts);
        if !self.make_room(slots, index, reserved) {
            // What holds the memory is loading, or still serving requests after its unload.
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "The model `{}` does not fit in the memory budget until other models finish \
                     loading or their running requests end; retry later",
                    self.entries[index].id
                ),
                Some(5),
            ));
        }
        let (tell, done) = watch::channel(false);
        slots[index] = Slot::Loading {
            done: done.clone(),
            reserved,
        };
        tracing::info!(model = %self.entries[index].id, bytes = reserved, "loading model");
        let set = Arc::clone(self);
        tokio::spawn(async move {
            let loader = Arc::clone(&set.entries[index].loader);
            let started = Instant::now();
            let result = match tokio::task::spawn_blocking(move || loader()).await {
                Ok(result) => result,
                Err(e) => Err(format!("the loader failed: {e}")),
            };
            match result {
                Ok(backend) => {
                    tracing::info!(
                        model = %set.entries[index].id,
                        seconds = started.elapsed().as_secs_f64(),
                        "model loaded"
                    );
                    set.install(index, backend);
                }
                Err(error) => {
                    tracing::error!(model = %set.entries[index].id, %error, "model failed to load");
                    set.lock()[index] = Slot::Unloaded {
                        error: Some((error, Instant::now())),
                        draining: None,
                    };
                }
            }
            let _ = tell.send(true);
        });
        Ok(done)
    }

    /// Puts a loaded backend in its slot and unloads others if its real size needs it.
    fn install(&self, index: usize, backend: Arc<dyn Backend>) {
        let bytes = loaded_bytes(&self.entries[index], backend.as_ref());
        let mut slots = self.lock();
        slots[index] = Slot::Unloaded {
            error: None,
            draining: None,
        };
        if !self.make_room(&mut slots, index, bytes) {
            tracing::warn!(
                model = %self.entries[index].id,
                bytes,
                "loaded past the memory budget: its real size (weights and KV cache) and what \
                 is still in use leave no room"
            );
        }
        slots[index] = Slot::Loaded {
            backend,
            bytes,
            last_used: Instant::now(),
        };
    }

    /// Unloads the least recently used loaded models other than `keep` until `need` more
    /// bytes fit in the budget (or nothing more can be unloaded).
    /// Unloads the least recently used loaded models other than `keep` until `need` more
    /// bytes fit in the budget; false when they cannot (what holds the memory is loading, or
    /// unloaded but still serving requests).
    fn make_room(&self, slots: &mut [Slot], keep: usize, need: u64) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        loop {
            let used: u64 = slots
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != keep)
                .map(|(_, slot)| match slot {
                    Slot::Unloaded {
                        draining: Some((weak, bytes)),
                        ..
                    } if weak.strong_count() > 0 => *bytes,
                    Slot::Unloaded { .. } => 0,
                    Slot::Loading { reserved, .. } => *reserved,
                    Slot::Loaded { bytes, .. } => *bytes,
                })
                .sum();
            if used.saturating_add(need) <= budget {
                return true;
            }
            let victim = slots
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != keep)
                .filter_map(|(i, slot)| match slot {
                    Slot::Loaded { last_used, .. } => Some((i, *last_used)),
                    _ => None,
                })
                .min_by_key(|(_, last_used)| *last_used);
            let Some((victim, _)) = victim else {
                return false;
            };
            if let Slot::Loaded { backend, bytes, .. } = &slots[victim] {
                let draining = Some((Arc::downgrade(backend), *bytes));
                slots[victim] = Slot::Unloaded {
                    error: None,
                    draining,
                };
            }
            tracing::info!(
                model = %self.entries[victim].id,
                for_model = %self.entries[keep].id,
                "model unloaded (least recently used) to stay within the memory budget"
            );
        }
    }
}

/// The bytes a model is budgeted at before it is loaded.
fn estimate(facts: &ModelFacts) -> u64 {
    facts.file_bytes.saturating_add(facts.cache_bytes)
}

/// The bytes a loaded model holds: its files and cache as it reports them, or the estimate
/// when it reports none.
fn loaded_bytes(entry: &ModelEntry, backend: &dyn Backend) -> u64 {
    let facts = backend.facts();
    match estimate(&facts) {
        0 => estimate(&entry.facts),
        bytes => bytes,
    }
}

fn refusal(status: StatusCode, message: String, retry_after_s: Option<u64>) -> ApiError {
    ApiError::Refused(Box::new(Refusal {
        status,
        kind: if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        },
        code: Some(if status == StatusCode::CONFLICT {
            "model_loading"
        } else {
            "model_not_ready"
        }),
        param: None,
        message,
        retry_after_s,
    }))
}

fn still_loading(id: &str) -> ApiError {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("The model `{id}` is still loading; retry later"),
        Some(5),
    )
}

fn load_failed(id: &str, error: &str) -> ApiError {
    let error: String = error.chars().take(1024).collect();
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("The model `{id}` could not be loaded: {error}"),
        None,
    )
}
