//! What the router reads of a request to place it: the model, the prompt's prefix blocks, the
//! session. Shared by the HTTP router and the ext_proc endpoint picker, so both place a
//! request the same way.

use axum::http::HeaderMap;
use serde_json::Value;

use crate::config::RoutingConfig;
use crate::prefix::block_hashes;

/// Where a request should go, as far as its body and headers tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingKey {
    /// The `model` field (empty when absent).
    pub model: String,
    /// The chained hashes of the prompt's leading blocks.
    pub prefix: Vec<u64>,
    /// The session header's value, if sent.
    pub session: Option<String>,
}

/// The bytes whose prefix blocks identify a prompt: the model, then each chat message's
/// compact JSON (the next turn of a conversation repeats the earlier messages, so it shares
/// their blocks), or the completion prompt's text.
pub fn prompt_bytes(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(model) = body.get("model").and_then(Value::as_str) {
        out.extend_from_slice(model.as_bytes());
    }
    out.push(0);
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages {
            if let Ok(json) = serde_json::to_vec(message) {
                out.extend_from_slice(&json);
            }
            out.push(0);
        }
    } else {
        match body.get("prompt") {
            Some(Value::String(text)) => out.extend_from_slice(text.as_bytes()),
            Some(other @ Value::Array(_)) => {
                if let Ok(json) = serde_json::to_vec(other) {
                    out.extend_from_slice(&json);
                }
            }
            _ => {}
        }
    }
    out
}

/// The routing key of a parsed body and its headers.
pub fn routing_key(body: &Value, headers: &HeaderMap, config: &RoutingConfig) -> RoutingKey {
    let session = headers
        .get(config.session_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .map(str::to_owned);
    RoutingKey {
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        prefix: block_hashes(&prompt_bytes(body), config.block_bytes),
        session,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_conversations_next_turn_shares_its_blocks() {
        let config = RoutingConfig {
            block_bytes: 64,
            ..RoutingConfig::default()
        };
        let system = json!({"role": "system", "content": "You are terse. ".repeat(40)});
        let turn1 = json!({"model": "m", "messages": [system, {"role": "user", "content": "hi"}]});
        let turn2 = json!({"model": "m", "messages": [
            system, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}
        ]});
        let other_model = json!({"model": "n", "messages": [system]});
        let mut headers = HeaderMap::new();
        headers.insert("x-session-id", "  abc ".parse().unwrap());
        let k1 = routing_key(&turn1, &headers, &config);
        let k2 = routing_key(&turn2, &HeaderMap::new(), &config);
        assert_eq!(k1.session.as_deref(), Some("abc"));
        assert_eq!(k2.session, None);
        assert!(k1.prefix.len() >= 9);
        assert!(k2.prefix.len() > k1.prefix.len());
        assert_eq!(k1.prefix[..], k2.prefix[..k1.prefix.len()]);
        let k3 = routing_key(&other_model, &headers, &config);
        assert_ne!(k3.prefix[0], k1.prefix[0]);
        let completion = json!({"model": "m", "prompt": "x".repeat(200)});
        assert_eq!(routing_key(&completion, &headers, &config).prefix.len(), 3);
        assert_eq!(
            routing_key(&json!({}), &headers, &config),
            RoutingKey {
                model: String::new(),
                prefix: vec![],
                session: Some("abc".into())
            }
        );
    }
}
