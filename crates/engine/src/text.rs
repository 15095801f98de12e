//! The model's text side, whichever tokenizer it ships: a GGUF byte-level BPE with a Jinja
//! chat template, or Mistral's own tokenizer files (SentencePiece or Tekken) with
//! mistral-common's chat encoding, which goes straight from messages to token ids.

use tokenizer::{
    ChatTemplate, HfStreamDecoder, HfTokenizer, MistralTokenizer, StreamDecoder, Tokenizer,
};

use crate::EngineError;

/// A model's tokenizer and chat format.
// One per engine, never moved in a hot loop: the size difference between variants is moot.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TextTokenizer {
    /// Byte-level BPE from GGUF metadata, chats rendered by the Jinja template.
    Bpe {
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        add_bos: bool,
        bos_text: String,
        eos_text: String,
    },
    /// Mistral's tokenizer files; chats encoded as mistral-common encodes them.
    Mistral(MistralTokenizer),
    /// A Hugging Face `tokenizer.json`, chats rendered by `tokenizer_config.json`'s template.
    HuggingFace(HfTokenizer),
}

impl TextTokenizer {
    /// A GGUF BPE tokenizer with its optional chat template.
    pub(crate) fn bpe(tokenizer: Tokenizer, template: Option<ChatTemplate>, add_bos: bool) -> Self {
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
                .to_owned()
        };
        let bos_text = text(tokenizer.bos_id());
        let eos_text = text(tokenizer.eos_id());
        TextTokenizer::Bpe {
            tokenizer,
            template,
            add_bos,
            bos_text,
            eos_text,
        }
    }

    pub(crate) fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Bpe { tokenizer, .. } => tokenizer.vocab_size(),
            TextTokenizer::Mistral(m) => m.vocab_size(),
            TextTokenizer::HuggingFace(h) => h.vocab_size(),
        }
    }

    /// Tokenises text as a completion prompt: BOS as the model wants it; with the BPE
    /// tokenizer special-token text (such as `<|im_start|>`) becomes its token, with
    /// Mistral's it stays text, as mistral-common does.
    pub(crate) fn encode_prompt(&self, text: &str) -> Vec<u32> {
        match self {
            TextTokenizer::Bpe {
                tokenizer, add_bos, ..
            } => {
                let mut ids = tokenizer.encode(text, false, true);
                if *add_bos
                    && let Some(bos) = tokenizer.bos_id()
                    && ids.first() != Some(&bos)
                {
                    ids.insert(0, bos);
                }
                ids
            }
            TextTokenizer::Mistral(m) => m.encode(text, true, false),
            TextTokenizer::HuggingFace(h) => h.encode(text, true).unwrap_or_default(),
        }
    }

    /// Text of token ids, special tokens shown.
    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        match self {
            TextTokenizer::Bpe { tokenizer, .. } => tokenizer
                .decode(ids, false)
                .map_err(|e| EngineError::InvalidRequest(e.to_string())),
            TextTokenizer::Mistral(m) => m
                .decode(ids, true)
                .map_err(|e| EngineError::InvalidRequest(e.to_string())),
            TextTokenizer::HuggingFace(h) => h
                .decode(ids, false)
                .map_err(|e| EngineError::InvalidRequest(e.to_string())),
        }
    }

    /// A token's raw bytes (for log-probabilities).
    pub(crate) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match self {
            TextTokenizer::Bpe { tokenizer, .. } => tokenizer.token_bytes(id).map(<[u8]>::to_vec),
            TextTokenizer::Mistral(m) => m.token_bytes(id).ok(),
            // `tokenizers` decodes whole tokens only; a token that is part of a character
            // shows as U+FFFD here.
            TextTokenizer::HuggingFace(h) => h.decode(&[id], false).ok().map(String::into_bytes),
        }
    }

    /// True for tokens that end a generation.
    pub(crate) fn is_eog(&self, id: u32) -> bool {
        match self {
            TextTokenizer::Bpe { tokenizer, .. } => tokenizer.is_eog(id),
            TextTokenizer::Mistral(m) => id == m.eos_id(),
            TextTokenizer::HuggingFace(h) => h.is_eog(id),
        }
    }

    /// A decoder for one generation's stream; with `keep_special`, special (control) tokens
    /// come out as their text, for output parsers that look for markers such as
    /// `[TOOL_CALLS]` or `<tool_call>`.
    pub(crate) fn stream_decoder(&self, keep_special: bool) -> TextDecoder {
        match self {
            TextTokenizer::Bpe { .. } => TextDecoder::Bpe(StreamDecoder::new(!keep_special)),
            TextTokenizer::Mistral(_) => TextDecoder::Bytes {
                pending: Vec::new(),
                keep_special,
            },
            TextTokenizer::HuggingFace(_) => TextDecoder::Hf(if keep_special {
                HfStreamDecoder::keeping_special()
            } else {
                HfStreamDecoder::new()
            }),
        }
    }

    /// The Jinja chat template and the BOS/EOS texts it is rendered with; `None` for
    /// Mistral's tokenizers (which encode chats themselves) and models without a template.
    pub(crate) fn template(&self) -> Option<(&ChatTemplate, &str, &str)> {
        match self {
            TextTokenizer::Bpe {
                template,
                bos_text,
                eos_text,
                ..
            } => template
                .as_ref()
                .map(|t| (t, bos_text.as_str(), eos_text.as_str())),
            TextTokenizer::HuggingFace(h) => {
                let (bos, eos) = h.bos_eos_text();
                h.chat_template().map(|t| (t, bos, eos))
            }
            TextTokenizer::Mistral(_) => None,
        }
    }

    /// The BOS/EOS texts a template is rendered with (empty for Mistral's tokenizers).
    pub(crate) fn bos_eos_text(&self) -> (&str, &str) {
        match self {
            TextTokenizer::Bpe {
                bos_text, eos_text, ..
            } => (bos_text, eos_text),
            TextTokenizer::HuggingFace(h) => h.bos_eos_text(),
            TextTokenizer::Mistral(_) => ("", ""),
        }
    }

    /// The id of a token given its text as the vocabulary stores it (`[TOOL_CALLS]`,
    /// `<tool_call>`, ...).
    pub(crate) fn token_id(&self, text: &str) -> Option<u32> {
        match self {
            TextTokenizer::Bpe { tokenizer, .. } => tokenizer.token_to_id(text),
            TextTokenizer::Mistral(m) => m.special_id(text),
            TextTokenizer::HuggingFace(h) => h.token_to_id(text),
        }
    }

    /// Encodes an already rendered chat: the template wrote the special tokens itself.
    pub(crate) fn encode_rendered_chat(&self, rendered: &str) -> Result<Vec<u32>, EngineError> {
        match self {
            TextTokenizer::HuggingFace(h) => h
                .encode(rendered, false)
                .map_err(|e| EngineError::Template(e.to_string())),
            _ => Ok(self.encode_prompt(rendered)),
        }
    }
}

/// Incremental detokenisation that never splits a UTF-8 character.
pub(crate) enum TextDecoder {
    Bpe(StreamDecoder),
    /// Mistral's tokenizers: bytes not yet emitted (an incomplete character at the end).
    Bytes {
        pending: Vec<u8>,
        keep_special: bool,
    },
    Hf(HfStreamDecoder),
}

impl TextDecoder {
    /// Adds a token; returns the text now complete. Special tokens produce no text.
    pub(crate) fn push(&mut self, text: &TextTokenizer, id: u32) -> String {
        match (self, text) {
            (TextDecoder::Bpe(d), TextTokenizer::Bpe { tokenizer, .. }) => d.push(tokenizer, id),
            (
                TextDecoder::Bytes {
                    pending,
                    keep_special,
                },
                TextTokenizer::Mistral(m),
            ) => {
                if m.is_special(id) {
                    if *keep_special && let Ok(text) = m.decode(&[id], true) {
                        pending.extend_from_slice(text.as_bytes());
                    }
                } else if let Ok(bytes) = m.token_bytes(id) {
                    pending.extend_from_slice(&bytes);
                }
                take_complete_utf8(pending)
            }
            (TextDecoder::Hf(d), TextTokenizer::HuggingFace(h)) => d.push(h, id),
            _ => String::new(),
        }
    }

    /// Whatever is left, an incomplete character as U+FFFD.
    pub(crate) fn finish(&mut self, text: &TextTokenizer) -> String {
        match self {
            TextDecoder::Bpe(d) => d.finish(),
            TextDecoder::Hf(d) => match text {
                TextTokenizer::HuggingFace(h) => d.finish(h),
                _ => String::new(),
            },
            TextDecoder::Bytes { pending, .. } => {
                let out = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                out
            }
        }
    }
}

/// Removes and returns the longest prefix of `pending` that is complete text: invalid bytes
/// become U+FFFD at once, an incomplete character at the end stays.
fn take_complete_utf8(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&pending[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = pending.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&pending[start..valid]));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None => {
                        start = valid;
                        break;
                    }
                }
            }
        }
    }
    pending.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_released_only_when_complete() {
        let mut p = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_complete_utf8(&mut p), "");
        p.extend_from_slice(&"é".as_bytes()[1..]);
        p.extend_from_slice(b"a\xff");
        assert_eq!(take_complete_utf8(&mut p), "éa\u{FFFD}");
        assert!(p.is_empty());
        let emoji = "😀".as_bytes();
        let mut p = emoji[..3].to_vec();
        assert_eq!(take_complete_utf8(&mut p), "");
        assert_eq!(p.len(), 3);
    }
}
