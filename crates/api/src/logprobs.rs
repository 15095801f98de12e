//! Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` list and the
//! legacy completions object of parallel arrays.

use engine::TokenLogprobs;
use serde_json::{Map, Value, json};

fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`.
pub(crate) fn chat(items: &[TokenLogprobs]) -> Value {
    let content: Vec<Value> = items
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|(_, bytes, lp)| {
                    json!({"token": token_text(bytes), "logprob": lp, "bytes": bytes})
                })
                .collect();
            json!({
                "token": token_text(&t.bytes),
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, offsets in
/// characters from `offset` (the length of text already returned).
pub(crate) fn completion(items: &[TokenLogprobs], mut offset: usize) -> Value {
    let mut tokens = Vec::with_capacity(items.len());
    let mut token_logprobs = Vec::with_capacity(items.len());
    let mut top_logprobs = Vec::with_capacity(items.len());
    let mut text_offset = Vec::with_capacity(items.len());
    for t in items {
        let text = token_text(&t.bytes);
        text_offset.push(offset);
        offset += text.chars().count();
        tokens.push(text);
        token_logprobs.push(t.logprob);
        let mut top = Map::new();
        for (_, bytes, lp) in &t.top {
            top.entry(token_text(bytes)).or_insert(json!(lp));
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// Completions with `echo`: the prompt's tokens, the first (which has no log-probability)
/// as `first_token` with `null`s, then `prompt` (each later token given those before it).
pub(crate) fn completion_echo(first_token: &str, prompt: &[TokenLogprobs]) -> Value {
    let first_chars = first_token.chars().count();
    let mut value = completion(prompt, first_chars);
    for (key, first) in [
        ("tokens", json!(first_token)),
        ("token_logprobs", Value::Null),
        ("top_logprobs", Value::Null),
        ("text_offset", json!(0)),
    ] {
        if let Some(items) = value.get_mut(key).and_then(Value::as_array_mut) {
            items.insert(0, first);
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(token: u32, text: &str, lp: f32) -> TokenLogprobs {
        TokenLogprobs {
            token,
            bytes: text.as_bytes().to_vec(),
            logprob: lp,
            top: vec![
                (token, text.as_bytes().to_vec(), lp),
                (9, b"x".to_vec(), -3.0),
            ],
        }
    }

    #[test]
    fn both_shapes() {
        let items = [item(1, "Hé", -0.5), item(2, "!", -0.25)];
        let c = chat(&items);
        assert_eq!(c["content"][0]["token"], "Hé");
        assert_eq!(c["content"][0]["bytes"], json!([72, 195, 169]));
        assert_eq!(c["content"][1]["top_logprobs"][1]["token"], "x");
        let t = completion(&items, 10);
        assert_eq!(t["tokens"], json!(["Hé", "!"]));
        assert_eq!(t["text_offset"], json!([10, 12]));
        assert_eq!(t["top_logprobs"][0]["x"], json!(-3.0));
        assert_eq!(t["token_logprobs"][1], json!(-0.25));
    }
}
