//! Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` list and the
//! legacy completions object of parallel arrays.

use engine::TokenLogprobs;
use serde_json::{Map, Value, json};

fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How tokens are named in log-probabilities: by their text, or (vLLM's
/// `return_tokens_as_token_ids`) as `token_id:<id>`, which names every token exactly even
/// when its bytes are part of a UTF-8 character.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TokenNames {
    pub(crate) ids: bool,
}

impl TokenNames {
    fn name(self, id: u32, bytes: &[u8]) -> String {
        if self.ids {
            format!("token_id:{id}")
        } else {
            token_text(bytes)
        }
    }

    /// The bytes chat reports for a token: its own, or its name's when named by id (as vLLM).
    fn bytes(self, id: u32, bytes: &[u8]) -> Vec<u8> {
        if self.ids {
            self.name(id, bytes).into_bytes()
        } else {
            bytes.to_vec()
        }
    }
}

/// Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`.
pub(crate) fn chat(items: &[TokenLogprobs], names: TokenNames) -> Value {
    let content: Vec<Value> = items
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|(id, bytes, lp)| {
                    json!({
                        "token": names.name(*id, bytes),
                        "logprob": lp,
                        "bytes": names.bytes(*id, bytes),
                    })
                })
                .collect();
            json!({
                "token": names.name(t.token, &t.bytes),
                "logprob": t.logprob,
                "bytes": names.bytes(t.token, &t.bytes),
                "top_logprobs": top,
            })
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, offsets in
/// characters of the returned text from `offset` (the length of text already returned).
pub(crate) fn completion(items: &[TokenLogprobs], mut offset: usize, names: TokenNames) -> Value {
    let mut tokens = Vec::with_capacity(items.len());
    let mut token_logprobs = Vec::with_capacity(items.len());
    let mut top_logprobs = Vec::with_capacity(items.len());
    let mut text_offset = Vec::with_capacity(items.len());
    for t in items {
        text_offset.push(offset);
        offset += token_text(&t.bytes).chars().count();
        tokens.push(names.name(t.token, &t.bytes));
        token_logprobs.push(t.logprob);
        let mut top = Map::new();
        for (id, bytes, lp) in &t.top {
            top.entry(names.name(*id, bytes)).or_insert(json!(lp));
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
/// as `first` (its id and text) with `null`s, then `prompt` (each later token given those
/// before it).
pub(crate) fn completion_echo(
    first: (u32, &str),
    prompt: &[TokenLogprobs],
    names: TokenNames,
) -> Value {
    let (first_id, first_text) = first;
    let mut value = completion(prompt, first_text.chars().count(), names);
    for (key, head) in [
        ("tokens", json!(names.name(first_id, first_text.as_bytes()))),
        ("token_logprobs", Value::Null),
        ("top_logprobs", Value::Null),
        ("text_offset", json!(0)),
    ] {
        if let Some(items) = value.get_mut(key).and_then(Value::as_array_mut) {
            items.insert(0, head);
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
        let c = chat(&items, TokenNames::default());
        assert_eq!(c["content"][0]["token"], "Hé");
        assert_eq!(c["content"][0]["bytes"], json!([72, 195, 169]));
        assert_eq!(c["content"][1]["top_logprobs"][1]["token"], "x");
        let t = completion(&items, 10, TokenNames::default());
        assert_eq!(t["tokens"], json!(["Hé", "!"]));
        assert_eq!(t["text_offset"], json!([10, 12]));
        assert_eq!(t["top_logprobs"][0]["x"], json!(-3.0));
        assert_eq!(t["token_logprobs"][1], json!(-0.25));
    }

    #[test]
    fn tokens_named_by_id() {
        let ids = TokenNames { ids: true };
        let items = [item(1, "Hé", -0.5), item(2, "!", -0.25)];
        let c = chat(&items, ids);
        assert_eq!(c["content"][0]["token"], "token_id:1");
        assert_eq!(c["content"][0]["bytes"], json!(b"token_id:1".to_vec()));
        assert_eq!(c["content"][1]["top_logprobs"][1]["token"], "token_id:9");
        let t = completion(&items, 0, ids);
        assert_eq!(t["tokens"], json!(["token_id:1", "token_id:2"]));
        // Offsets still count the returned text's characters.
        assert_eq!(t["text_offset"], json!([0, 2]));
        assert_eq!(t["top_logprobs"][1]["token_id:9"], json!(-3.0));
        let e = completion_echo((5, "A"), &items, ids);
        assert_eq!(e["tokens"][0], "token_id:5");
        assert_eq!(e["text_offset"], json!([0, 1, 3]));
    }
}
