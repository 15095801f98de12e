//! Fill-in-the-middle prompts: the text before a gap and the text after it, arranged with the
//! model's FIM marker tokens so that what it generates is the middle (Mistral's
//! `/v1/fim/completions`, OpenAI's `suffix`).
//!
//! Mistral's tokenizer files follow mistral-common (`<s> [SUFFIX] suffix [PREFIX] prefix`, see
//! `MistralTokenizer::encode_fim`). Other models follow llama.cpp: the markers are the tokens
//! GGUF metadata names (`tokenizer.ggml.fim_pre_token_id`, `..._suf_...`, `..._mid_...`, or
//! the older `prefix_token_id` / `suffix_token_id` / `middle_token_id`), else the tokens whose
//! text is one that llama.cpp's vocabulary loader recognises (`<|fim_prefix|>` for Qwen,
//! `<fim_prefix>` for StarCoder and Granite, `<PRE>` for CodeLlama, `<｜fim▁begin｜>` for
//! DeepSeek, ...), and the prompt is laid out as llama.cpp's server `/infill` lays it out:
//! `[BOS if the model adds one] FIM_PRE prefix FIM_SUF suffix FIM_MID`, prefix and suffix
//! tokenised without BOS and with special-token text kept as text.

use model::gguf::Metadata;

use crate::EngineError;
use crate::text::TextTokenizer;

/// The texts llama.cpp's vocabulary loader takes for FIM_PRE, FIM_SUF and FIM_MID when the
/// metadata names no id, tried in this order.
const PRE_TEXTS: [&str; 7] = [
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
];
const SUF_TEXTS: [&str; 7] = [
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
];
const MID_TEXTS: [&str; 7] = [
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
];

/// A model's FIM marker tokens (for the llama.cpp layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FimTokens {
    pre: u32,
    suf: u32,
    mid: u32,
}

impl FimTokens {
    /// Finds the markers as llama.cpp does: per marker, the id the GGUF metadata names (when
    /// inside the vocabulary), else a token with one of the known texts. `None` unless all
    /// three are found, and always for Mistral's tokenizers (which have their own layout).
    pub(crate) fn find(metadata: Option<&Metadata>, text: &TextTokenizer) -> Option<FimTokens> {
        if matches!(text, TextTokenizer::Mistral(_)) {
            return None;
        }
        let vocab = text.vocab_size();
        let from_metadata = |keys: [&str; 2]| {
            let md = metadata?;
            keys.iter()
                .find_map(|k| md.opt_u32(k).ok().flatten())
                .filter(|&id| (id as usize) < vocab)
        };
        let by_text = |texts: &[&str]| texts.iter().find_map(|t| text.token_id(t));
        let find = |keys, texts: &[&str]| from_metadata(keys).or_else(|| by_text(texts));
        Some(FimTokens {
            pre: find(
                [
                    "tokenizer.ggml.fim_pre_token_id",
                    "tokenizer.ggml.prefix_token_id",
                ],
                &PRE_TEXTS,
            )?,
            suf: find(
                [
                    "tokenizer.ggml.fim_suf_token_id",
                    "tokenizer.ggml.suffix_token_id",
                ],
                &SUF_TEXTS,
            )?,
            mid: find(
                [
                    "tokenizer.ggml.fim_mid_token_id",
                    "tokenizer.ggml.middle_token_id",
                ],
                &MID_TEXTS,
            )?,
        })
    }
}

/// The token ids of a fill-in-the-middle prompt for `prefix` and `suffix` (see the module
/// documentation for the layout); `InvalidRequest` when the model has no FIM tokens.
pub(crate) fn encode_fim(
    text: &TextTokenizer,
    fim: Option<FimTokens>,
    prefix: &str,
    suffix: &str,
) -> Result<Vec<u32>, EngineError> {
    let none = || EngineError::InvalidRequest("this model has no fill-in-the-middle tokens".into());
    if let TextTokenizer::Mistral(m) = text {
        return m.encode_fim(prefix, suffix).map_err(|e| match e {
            tokenizer::MistralError::Unsupported { .. } => none(),
            e => EngineError::InvalidRequest(e.to_string()),
        });
    }
    let fim = fim.ok_or_else(none)?;
    let (mut ids, prefix_ids, suffix_ids) = match text {
        TextTokenizer::Bpe {
            tokenizer, add_bos, ..
        } => (
            match tokenizer.bos_id() {
                Some(bos) if *add_bos => vec![bos],
                _ => Vec::new(),
            },
            tokenizer.encode(prefix, false, false),
            tokenizer.encode(suffix, false, false),
        ),
        TextTokenizer::HuggingFace(h) => {
            let encode = |s: &str| {
                h.encode(s, false)
                    .map_err(|e| EngineError::InvalidRequest(e.to_string()))
            };
            // What the tokenizer adds around a text (its post-processor), when that is a lone
            // leading BOS.
            let added = encode("")?;
            let bos = match h.encode("", true) {
                Ok(with) if with.len() == added.len() + 1 && with.ends_with(&added) => {
                    with.first().copied().filter(|&b| h.is_special(b))
                }
                _ => None,
            };
            (bos.into_iter().collect(), encode(prefix)?, encode(suffix)?)
        }
        TextTokenizer::Mistral(_) => return Err(none()),
    };
    ids.reserve(prefix_ids.len() + suffix_ids.len() + 3);
    ids.push(fim.pre);
    ids.extend(prefix_ids);
    ids.push(fim.suf);
    ids.extend(suffix_ids);
    ids.push(fim.mid);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::gguf::{Array, GgufFile, GgufWriter, Value};
    use tokenizer::{Tokenizer, TokenizerSpec};

    /// A byte-level BPE vocabulary over a few letters plus the given control tokens.
    fn bpe(controls: &[&str], add_bos: bool) -> TextTokenizer {
        let mut tokens: Vec<String> = ["a", "b", "c", "Ġ", "ab", "<s>"].map(String::from).to_vec();
        tokens.extend(controls.iter().map(|s| s.to_string()));
        let mut types = vec![1; 5];
        types.extend(std::iter::repeat_n(3, controls.len() + 1));
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            token_types: Some(types),
            tokens,
            merges: vec!["a b".into()],
            bos_id: Some(5),
            ..TokenizerSpec::default()
        };
        TextTokenizer::bpe(Tokenizer::from_spec(spec).expect("spec"), None, add_bos)
    }

    fn metadata(kvs: &[(&str, u32)]) -> GgufFile {
        let mut w = GgufWriter::new(3);
        w.add_kv("general.architecture", Value::String("llama".into()));
        w.add_kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::from_strings(["x"])),
        );
        for &(k, v) in kvs {
            w.add_kv(k, Value::U32(v));
        }
        GgufFile::from_bytes(w.to_bytes()).expect("gguf")
    }

    #[test]
    fn markers_are_found_by_text_in_psm_order() {
        for (names, bos) in [
            (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], false),
            (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], true),
            (["<PRE>", "<SUF>", "<MID>"], false),
            (
                ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
                false,
            ),
        ] {
            // Listed out of order, so ids and roles differ.
            let text = bpe(&[names[2], names[0], names[1]], bos);
            let fim = FimTokens::find(None, &text);
            assert_eq!(
                fim,
                Some(FimTokens {
                    pre: 7,
                    suf: 8,
                    mid: 6
                }),
                "{names:?}"
            );
            let ids = encode_fim(&text, fim, "ab", "c a").expect("fim");
            let lead: &[u32] = if bos { &[5] } else { &[] };
            let want: Vec<u32> = [lead, &[7, 4, 8, 2, 3, 0, 6]].concat();
            assert_eq!(ids, want, "{names:?}");
        }
    }

    #[test]
    fn metadata_ids_come_first() {
        let text = bpe(&["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], false);
        let md = metadata(&[
            ("tokenizer.ggml.fim_pre_token_id", 2),
            ("tokenizer.ggml.suffix_token_id", 1),
            // Outside the vocabulary: ignored, the text lookup decides.
            ("tokenizer.ggml.fim_mid_token_id", 99),
        ]);
        let fim = FimTokens::find(Some(md.metadata()), &text);
        assert_eq!(
            fim,
            Some(FimTokens {
                pre: 2,
                suf: 1,
                mid: 8
            })
        );
        assert_eq!(encode_fim(&text, fim, "ab", "").expect("fim"), [2, 4, 1, 8]);
    }

    #[test]
    fn a_model_without_markers_is_refused() {
        let text = bpe(&["<fim_prefix>", "<fim_suffix>"], false);
        let fim = FimTokens::find(None, &text);
        assert_eq!(fim, None);
        let err = encode_fim(&text, fim, "a", "b").unwrap_err().to_string();
        assert!(err.contains("no fill-in-the-middle tokens"), "{err}");
    }
}
