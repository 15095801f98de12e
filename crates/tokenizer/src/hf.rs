//! Hugging Face `tokenizer.json` (with `tokenizer_config.json` for special tokens and the chat
//! template), on the `tokenizers` crate: the reference implementation of that format.

use std::str::FromStr;

use serde_json::Value;

use crate::{ChatTemplate, TokenizerError};

/// Tokens that end a generation when a model's config does not say otherwise: the common
/// end-of-turn markers of chat models.
const END_OF_TURN_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// A `tokenizer.json` tokenizer and what its `tokenizer_config.json` adds.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    bos_text: String,
    eos_text: String,
    eog: Vec<u32>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl HfTokenizer {
    /// Builds the tokenizer from the contents of `tokenizer.json` and, when the model has one,
    /// `tokenizer_config.json`.
    pub fn from_json(
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
    ) -> Result<Self, TokenizerError> {
        let text = std::str::from_utf8(tokenizer_json)
            .map_err(|e| TokenizerError::HfJson(format!("tokenizer.json is not UTF-8: {e}")))?;
        let inner = tokenizers::Tokenizer::from_str(text)
            .map_err(|e| TokenizerError::HfJson(format!("tokenizer.json: {e}")))?;
        let config: Value = match config_json {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| TokenizerError::HfJson(format!("tokenizer_config.json: {e}")))?,
            None => Value::Null,
        };
        let template = match config.get("chat_template") {
            Some(Value::String(src)) => Some(ChatTemplate::new(src)?),
            // A list of named templates: the one named "default".
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(ChatTemplate::new)
                .transpose()?,
            _ => None,
        };
        let bos_text = token_text(config.get("bos_token")).unwrap_or_default();
        let eos_text = token_text(config.get("eos_token")).unwrap_or_default();
        let mut eog: Vec<u32> = END_OF_TURN_TOKENS
            .iter()
            .chain(std::iter::once(&eos_text.as_str()))
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        eog.sort_unstable();
        eog.dedup();
        Ok(Self {
            inner,
            template,
            bos_text,
            eos_text,
            eog,
        })
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text; with `add_special`, the post-processor's tokens (BOS and the like) too.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::HfJson(e.to_string()))
    }

    /// Decodes ids; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(TokenizerError::UnknownTokenId {
                id: bad,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::HfJson(e.to_string()))
    }

    /// The chat template from `tokenizer_config.json`, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The BOS and EOS token texts the template is rendered with.
    pub fn bos_eos_text(&self) -> (&str, &str) {
        (&self.bos_text, &self.eos_text)
    }

    /// True for tokens that end a generation: EOS and the usual end-of-turn markers.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// True for added tokens marked special (control markers such as `<|im_start|>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The end-of-sequence token's id, from `tokenizer_config.json`.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.token_to_id(&self.eos_text)
    }

    /// The id of a token given its vocabulary entry (added tokens included).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The vocabulary entry of a token, as stored (e.g. `Ġhello` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Incremental decoding for streams, as vLLM does it for `tokenizers`: the text of a short
/// window of recent tokens is decoded again at each step and only its new, complete suffix is
/// released, so multi-token characters and decoder-level space handling come out right.
#[derive(Clone, Debug, Default)]
pub struct HfStreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    keep_special: bool,
}

impl HfStreamDecoder {
    /// An empty decoder that leaves special tokens out.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that shows special tokens as their text (for output parsers that
    /// look for markers such as `<tool_call>`).
    pub fn keeping_special() -> Self {
        Self {
            keep_special: true,
            ..Self::default()
        }
    }

    /// Adds a token; returns the text that is now complete (special tokens skipped).
    pub fn push(&mut self, tok: &HfTokenizer, id: u32) -> String {
        self.ids.push(id);
        let skip = !self.keep_special;
        let prefix = tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)
            .unwrap_or_default();
        let full = tok
            .decode(&self.ids[self.prefix_offset..], skip)
            .unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            new
        } else {
            String::new()
        }
    }

    /// Whatever is still held back.
    pub fn finish(&mut self, tok: &HfTokenizer) -> String {
        let skip = !self.keep_special;
        let prefix = tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)
            .unwrap_or_default();
        let full = tok
            .decode(&self.ids[self.prefix_offset..], skip)
            .unwrap_or_default();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or_default().to_owned()
    }
}
