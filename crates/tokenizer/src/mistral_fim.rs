//! Fill-in-the-middle encoding for Mistral's tokenizers, token-exact with mistral-common's
//! `MistralTokenizer.encode_fim(FIMRequest(prompt=..., suffix=...))`.
//!
//! mistral-common puts the suffix first: `<s> [SUFFIX] suffix [PREFIX] prompt`; the model then
//! writes the middle. The suffix is encoded after a throw-away `"☺"` whose first two tokens are
//! dropped, which removes the space SentencePiece would put at the start of a text (it applies
//! the same rule to Tekken files). Version v1 has no FIM and is refused, as mistral-common
//! refuses it. The markers are looked up as mistral-common looks them up: a SentencePiece file
//! without them (v2's `240216`) gets the unknown token's id in their place, as it does there.

use crate::mistral_chat::{MistralTokenizer, MistralVersion};
use crate::mistral_error::MistralError;

/// The text mistral-common puts before the suffix, to drop with its tokens.
const SUFFIX_LEAD: &str = "☺";

impl MistralTokenizer {
    /// Encodes a fill-in-the-middle request: the text before the gap (`prompt`) and after it
    /// (`suffix`; empty means none) as `<s> [SUFFIX] suffix [PREFIX] prompt`, the ids that
    /// mistral-common's `encode_fim` gives. Control-token text in either stays text.
    ///
    /// Errors: [`MistralError::Unsupported`] for version v1 (which has no FIM tokens) or a
    /// Tekken vocabulary without `[PREFIX]` / `[SUFFIX]`. A SentencePiece vocabulary without
    /// them gets the unknown token's id in their place, as in mistral-common.
    ///
    /// ```no_run
    /// # let bytes = std::fs::read("tekken.json")?;
    /// let tok = souverain_tokenizer::MistralTokenizer::from_bytes("tekken.json", &bytes)?;
    /// let ids = tok.encode_fim("def add(a, b):\n    return ", "\n\nprint(add(1, 2))")?;
    /// assert_eq!(ids[0], tok.bos_id());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn encode_fim(&self, prompt: &str, suffix: &str) -> Result<Vec<u32>, MistralError> {
        let version = self.version();
        let unsupported = |what: &str| MistralError::Unsupported {
            version: version.as_str(),
            what: what.to_owned(),
        };
        if version == MistralVersion::V1 {
            return Err(unsupported("fill-in-the-middle"));
        }
        let (Some(prefix_id), Some(suffix_id)) = (
            self.special_token_lookup("[PREFIX]"),
            self.special_token_lookup("[SUFFIX]"),
        ) else {
            return Err(unsupported(
                "fill-in-the-middle: the vocabulary has no [PREFIX] / [SUFFIX] tokens",
            ));
        };
        let mut ids = vec![self.bos_id(), suffix_id];
        if !suffix.is_empty() {
            let lead = format!("{SUFFIX_LEAD}{suffix}");
            ids.extend(self.encode(&lead, false, false).into_iter().skip(2));
        }
        ids.push(prefix_id);
        ids.extend(self.encode(prompt, false, false));
        Ok(ids)
    }
}
