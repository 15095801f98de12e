//! `POST /v1/embeddings`, OpenAI's shape, over an [`EmbeddingBackend`].
//!
//! The request: `model`; `input` as a string, an array of strings, an array of token ids or
//! an array of token-id arrays (ids are the model's own, used as given: no `[CLS]`/`[SEP]` is
//! added, as vLLM does); `encoding_format` `"float"` (default) or `"base64"` (the
//! little-endian f32 bytes of each vector, base64-encoded, as OpenAI sends them);
//! `dimensions`, accepted only when it equals the model's (these models cannot shorten their
//! vectors); `user`, ignored. The answer:
//! `{"object":"list","data":[{"object":"embedding","index":i,"embedding":[...]}],
//! "model":...,"usage":{"prompt_tokens":N,"total_tokens":N}}`.
//!
//! An input longer than the model's limit is refused with a 400 naming its index
//! (`param: "input[i]"`, code `context_length_exceeded`), as OpenAI does, rather than
//! truncated as sentence-transformers would: the vector must be of the text sent. Empty
//! inputs (an empty string, an empty list, an empty token array) are refused too.
//!
//! Embedding is CPU work that runs on a blocking thread. Under `--auth` the request is
//! metered like a completion with no completion tokens: its prompt tokens are reserved
//! after tokenisation and settled before the response leaves.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use engine::{Event, FinishReason, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admission::{Admission, AdmittedJson, Meter, NamesModel};
use crate::backend::EmbeddingBackend;
use crate::error::{ApiError, engine_error};
use crate::state::{AppState, traced_id};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// The body of `POST /v1/embeddings`, before validation.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    model: Option<Value>,
    input: Option<Value>,
    encoding_format: Option<Value>,
    dimensions: Option<Value>,
    /// Accepted and ignored, as OpenAI documents it (abuse monitoring).
    #[serde(rename = "user")]
    _user: Option<Value>,
}

/// One input, as given.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// A request checked field by field.
#[derive(Debug)]
struct ValidEmbeddingRequest {
    inputs: Vec<Input>,
    base64: bool,
}

fn validate(
    req: EmbeddingRequest,
    embedder: &dyn EmbeddingBackend,
) -> Result<ValidEmbeddingRequest, ApiError> {
    match req.model {
        None | Some(Value::Null) => return Err(ApiError::invalid("model", "`model` is required")),
        Some(Value::String(m)) if m == embedder.model_id() => {}
        Some(Value::String(m)) => return Err(ApiError::model_not_found(&m)),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    }
    let base64 = match req.encoding_format {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "encoding_format",
                "`encoding_format` must be \"float\" or \"base64\"",
            ));
        }
    };
    match req.dimensions {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(embedder.dimensions() as u64) => {}
        Some(other) => return Err(dimensions_refused(other, embedder)),
    }
    let inputs = parse_input(req.input)?;
    Ok(ValidEmbeddingRequest { inputs, base64 })
}

/// The 400 for a `dimensions` other than the model's.
pub(crate) fn dimensions_refused(
    asked: impl std::fmt::Display,
    embedder: &dyn EmbeddingBackend,
) -> ApiError {
    ApiError::invalid(
        "dimensions",
        format!(
            "`dimensions` {asked} is not supported: this model's vectors have {} dimensions \
             and cannot be shortened",
            embedder.dimensions()
        ),
    )
}

fn parse_input(input: Option<Value>) -> Result<Vec<Input>, ApiError> {
    let shape = || {
        ApiError::invalid(
            "input",
            "`input` must be a string, an array of strings, an array of token ids or an \
             array of token-id arrays",
        )
    };
    let empty_text = |param: String| {
        ApiError::invalid(
            param.clone(),
            format!("`{param}` must not be an empty string"),
        )
    };
    let tokens = |param: String, list: &[Value]| -> Result<Vec<u32>, ApiError> {
        if list.is_empty() {
            return Err(ApiError::invalid(
                param.clone(),
                format!("`{param}` must not be an empty token array"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(j, t)| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("{param}[{j}]"),
                            format!("`{param}[{j}]` = {t} is not a token id"),
                        )
                    })
            })
            .collect()
    };
    let inputs = match input {
        None | Some(Value::Null) => return Err(ApiError::invalid("input", "`input` is required")),
        Some(Value::String(s)) if s.is_empty() => return Err(empty_text("input".into())),
        Some(Value::String(s)) => vec![Input::Text(s)],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid(
                    "input",
                    "`input` must not be an empty array",
                ));
            }
            if items.len() > MAX_EMBEDDING_INPUTS {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "`input` has {} items; at most {MAX_EMBEDDING_INPUTS} are allowed",
                        items.len()
                    ),
                ));
            }
            if items.iter().all(Value::is_number) {
                vec![Input::Tokens(tokens("input".into(), &items)?)]
            } else {
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Value::String(s) if s.is_empty() => Err(empty_text(format!("input[{i}]"))),
                        Value::String(s) => Ok(Input::Text(s)),
                        Value::Array(list) => {
                            Ok(Input::Tokens(tokens(format!("input[{i}]"), &list)?))
                        }
                        _ => Err(shape()),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        }
        Some(_) => return Err(shape()),
    };
    Ok(inputs)
}

/// The error for an input over the model's limit.
fn too_long(index: usize, tokens: usize, max_tokens: usize) -> ApiError {
    ApiError::InvalidRequest {
        message: format!(
            "Input {index} has {tokens} tokens, more than this model's maximum of {max_tokens} \
             tokens per input. Please shorten it; inputs are not truncated."
        ),
        param: Some(format!("input[{index}]")),
        code: Some("context_length_exceeded"),
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
    /// Souverain's extension, as in a generation's usage (clients ignore it): the joules
    /// the embedding took, and `measured` or `modelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_joules: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    energy_source: Option<&'static str>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    /// The request's id (Mistral's schema requires one; OpenAI's clients ignore it).
    id: &'a str,
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: &'a str,
    usage: EmbeddingUsage,
}

/// `POST /v1/embeddings`.
#[tracing::instrument(skip_all, fields(request_id))]
pub(crate) async fn embeddings(
    State(app): State<AppState>,
    AdmittedJson {
        body: req,
        admission,
    }: AdmittedJson<EmbeddingRequest>,
) -> Response {
    let id = traced_id("embd-");
    embeddings_inner(app, id, admission, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings_inner(
    app: AppState,
    id: String,
    admission: Option<Admission>,
    req: EmbeddingRequest,
) -> Result<Response, ApiError> {
    let model = match &req.model {
        Some(Value::String(m)) => m.clone(),
        _ => String::new(),
    };
    let embedder = served_embedder(&app, &model)?;
    let valid = validate(req, embedder.as_ref())?;
    let Embedded {
        vectors,
        prompt_tokens,
        energy,
    } = embed(
        &embedder,
        &id,
        admission.as_ref(),
        valid.inputs,
        Overlong::Refuse,
    )
    .await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if valid.base64 {
                Vector::Base64(base64_f32_le(&v))
            } else {
                Vector::Float(v)
            },
        })
        .collect();
    let response = axum::Json(EmbeddingList {
        id: &id,
        object: "list",
        data,
        model: embedder.model_id(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
            energy_joules: energy.map(|e| e.joules()),
            energy_source: energy.map(|e| e.kind.as_str()),
        },
    })
    .into_response();
    Ok(crate::openai::with_energy_headers(response, energy))
}

/// The embedding model served, or the 400 saying that none is (naming `model`).
pub(crate) fn served_embedder(
    app: &AppState,
    model: &str,
) -> Result<Arc<dyn EmbeddingBackend>, ApiError> {
    app.embedder
        .clone()
        .ok_or_else(|| ApiError::InvalidRequest {
            message: format!(
                "The model `{model}` does not support embeddings: this server runs no embedding \
             model (start it with --embedding-model)"
            ),
            param: Some("model".to_owned()),
            code: Some("model_not_found"),
        })
}

/// What to do with an input longer than the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overlong {
    /// A 400 naming the input (OpenAI's way).
    Refuse,
    /// Cut to the model's limit, keeping the closing special token (Ollama's `truncate`, as
    /// sentence-transformers' tokenizer truncates).
    Truncate,
}

/// Vectors, the tokens they took and the energy (when the backend meters it).
pub(crate) struct Embedded {
    pub(crate) vectors: Vec<Vec<f32>>,
    pub(crate) prompt_tokens: usize,
    pub(crate) energy: Option<engine::Energy>,
}

/// Tokenises and embeds `inputs` on blocking threads; under `--auth` the prompt tokens are
/// reserved first and the request is settled before this returns.
pub(crate) async fn embed(
    embedder: &Arc<dyn EmbeddingBackend>,
    id: &str,
    admission: Option<&Admission>,
    inputs: Vec<Input>,
    overlong: Overlong,
) -> Result<Embedded, ApiError> {
    let worker = Arc::clone(embedder);
    let token_ids = tokio::task::spawn_blocking(move || {
        inputs
            .into_iter()
            .map(|input| match input {
                Input::Text(text) => worker.tokenize(&text),
                Input::Tokens(ids) => ids,
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|err| ApiError::internal(format!("tokenisation task failed: {err}")))?;
    let max_tokens = embedder.max_tokens();
    let mut token_ids = token_ids;
    for (i, ids) in token_ids.iter_mut().enumerate() {
        if ids.len() > max_tokens {
            match overlong {
                Overlong::Refuse => return Err(too_long(i, ids.len(), max_tokens)),
                Overlong::Truncate => truncate(ids, max_tokens),
            }
        }
    }
    let prompt_tokens: usize = token_ids.iter().map(Vec::len).sum();
    let meter = match admission {
        Some(admission) => Some(admission.reserve(id, prompt_tokens, 0).await?),
        None => None,
    };

    // Embedding and settlement run as a task of their own: a client that goes away while its
    // inputs are embedded (axum drops this future) still has its request recorded, with the
    // tokens and the energy the embedding took.
    let worker = Arc::clone(embedder);
    let task = tokio::spawn(async move {
        let embedded = tokio::task::spawn_blocking(move || worker.embed_metered(&token_ids))
            .await
            .map_err(|err| ApiError::internal(format!("embedding task failed: {err}")))
            .and_then(|r| r.map_err(engine_error));
        if let Some(meter) = meter {
            settle(meter, &embedded, prompt_tokens).await;
        }
        embedded
    });
    let (vectors, energy) = task
        .await
        .map_err(|err| ApiError::internal(format!("embedding task failed: {err}")))??;
    tracing::info!(inputs = vectors.len(), prompt_tokens, "embeddings computed");
    Ok(Embedded {
        vectors,
        prompt_tokens,
        energy,
    })
}

/// Cuts `ids` to `max` tokens, keeping its last token (the closing `[SEP]`).
fn truncate(ids: &mut Vec<u32>, max: usize) {
    if max == 0 {
        ids.clear();
        return;
    }
    let last = ids.last().copied();
    ids.truncate(max - 1);
    ids.extend(last);
}

/// Records the request through the meter: the embedding's outcome goes through the same
/// channel a generation's would, and the settlement commits before this returns.
async fn settle(
    meter: Meter,
    embedded: &Result<(Vec<Vec<f32>>, Option<engine::Energy>), ApiError>,
    prompt_tokens: usize,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let event = match embedded {
        Ok((_, energy)) => Event::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens,
                energy: *energy,
                ..Usage::default()
            },
        },
        Err(err) => Event::Failed(engine::Failure::other(ApiError::internal(err.to_string()))),
    };
    let _ = tx.send((0, event));
    drop(tx);
    if let Ok(mut tracked) = meter.track(Ok(rx), 1) {
        // The meter forwards the last event only after the usage record is committed.
        while tracked.recv().await.is_some() {}
    }
}

impl NamesModel for EmbeddingRequest {
    fn model_name(&self) -> Option<&str> {
        self.model.as_ref().and_then(Value::as_str)
    }
}

/// Standard base64 (with padding) of the little-endian bytes of `v`.
fn base64_f32_le(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_encodings() {
        // 1.0f32 = 00 00 80 3f; -2.5f32 = 00 00 20 c0.
        assert_eq!(base64_f32_le(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32_le(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(base64_f32_le(&[1.0, -2.5, 0.0]), "AACAPwAAIMAAAAAA");
        assert_eq!(base64_f32_le(&[]), "");
    }

    #[test]
    fn truncation_keeps_the_closing_token() {
        let mut ids = vec![101, 1, 2, 3, 4, 102];
        truncate(&mut ids, 4);
        assert_eq!(ids, [101, 1, 2, 102]);
    }

    #[test]
    fn input_shapes() {
        let p = |v: Value| parse_input(Some(v));
        assert_eq!(
            p(serde_json::json!("hi")).unwrap(),
            [Input::Text("hi".into())]
        );
        assert_eq!(
            p(serde_json::json!(["a", "b"])).unwrap(),
            [Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            p(serde_json::json!([1, 2])).unwrap(),
            [Input::Tokens(vec![1, 2])]
        );
        assert_eq!(
            p(serde_json::json!([[1], [2, 3]])).unwrap(),
            [Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
        for bad in [
            serde_json::json!(""),
            serde_json::json!([]),
            serde_json::json!(["a", ""]),
            serde_json::json!([[]]),
            serde_json::json!([-1]),
            serde_json::json!([1.5]),
            serde_json::json!({"a": 1}),
            serde_json::json!([true]),
            serde_json::json!(3),
        ] {
            let err = p(bad.clone()).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            p(serde_json::json!(["a", ""])).unwrap_err().param(),
            Some("input[1]")
        );
        assert!(parse_input(None).is_err());
    }
}
