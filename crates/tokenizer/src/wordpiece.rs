//! BERT's WordPiece tokenizer, built from a Hugging Face `tokenizer.json`.
//!
//! The pipeline follows the `tokenizers` library for the parts BERT-family files use:
//!
//! 1. **Added tokens** (`[CLS]`, `[SEP]`, `[MASK]`, ...) are found in the raw text first,
//!    leftmost and longest match first, and become their own ids; the text between them goes
//!    through the rest of the pipeline. Tokens marked `normalized` are matched in the
//!    normalised text instead.
//! 2. **`BertNormalizer`**: `clean_text` drops NUL, U+FFFD and every code point of category
//!    `C*` except tab, newline and carriage return, and turns every whitespace into a space;
//!    `handle_chinese_chars` puts spaces around CJK ideographs; `strip_accents` (which follows
//!    `lowercase` when `null`) decomposes to NFD and drops non-spacing marks (`Mn`);
//!    `lowercase` lowercases each code point on its own.
//! 3. **`BertPreTokenizer`**: splits on whitespace and makes every punctuation character
//!    (ASCII punctuation or Unicode `P*`) a word of its own.
//! 4. **WordPiece**: each word longer than `max_input_chars_per_word` characters is `[UNK]`;
//!    otherwise it is cut greedily into the longest vocabulary entries from the left, pieces
//!    after the first carrying the `##` prefix; a word with any part not in the vocabulary is
//!    one `[UNK]`.
//! 5. **Post-processor** (`TemplateProcessing` or `BertProcessing`): `[CLS] … [SEP]` around a
//!    single sequence.
//!
//! Truncation and padding settings in the file are ignored: the caller decides what to do with
//! sequences that are too long.

use std::collections::HashMap;

use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Why a `tokenizer.json` cannot be used as a WordPiece tokenizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WordPieceError {
    /// The text is not JSON of the `tokenizer.json` shape.
    #[error("invalid tokenizer.json: {0}")]
    Json(String),
    /// The `model.type` is not `WordPiece`.
    #[error("tokenizer.json model type {0:?} is not WordPiece")]
    NotWordPiece(String),
    /// A normaliser, pre-tokeniser or post-processor this implementation does not know.
    #[error("unsupported {component} {kind:?} in tokenizer.json")]
    Unsupported {
        /// Which part of the pipeline.
        component: &'static str,
        /// Its `type`.
        kind: String,
    },
    /// The vocabulary is empty or has ids that do not form `0..n`.
    #[error("the WordPiece vocabulary is invalid: {0}")]
    BadVocabulary(String),
    /// A token the configuration names (unknown token, a special token of the post-processor)
    /// is not in the vocabulary.
    #[error("{role} token {token:?} is not in the vocabulary")]
    MissingToken {
        /// What the token is for.
        role: &'static str,
        /// Its text.
        token: String,
    },
}

#[derive(Deserialize)]
struct FileTokenizer {
    #[serde(default)]
    added_tokens: Vec<FileAddedToken>,
    #[serde(default)]
    normalizer: Option<FileNormalizer>,
    #[serde(default)]
    pre_tokenizer: Option<FileTyped>,
    #[serde(default)]
    post_processor: Option<serde_json::Value>,
    model: FileModel,
}

#[derive(Deserialize)]
struct FileAddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct FileNormalizer {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    clean_text: bool,
    #[serde(default = "yes")]
    handle_chinese_chars: bool,
    #[serde(default)]
    strip_accents: Option<bool>,
    #[serde(default = "yes")]
    lowercase: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct FileTyped {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct FileModel {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    unk_token: String,
    #[serde(default = "default_prefix")]
    continuing_subword_prefix: String,
    #[serde(default = "default_max_chars")]
    max_input_chars_per_word: usize,
    vocab: HashMap<String, u32>,
}

fn default_prefix() -> String {
    "##".into()
}

fn default_max_chars() -> usize {
    100
}

/// The BERT normaliser's switches.
#[derive(Clone, Copy, Debug)]
struct Normalizer {
    clean_text: bool,
    handle_chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
}

#[derive(Clone, Debug)]
struct AddedToken {
    id: u32,
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

/// A piece of the template: a special token's ids or the sequence itself, with its type id.
#[derive(Clone, Debug)]
enum Piece {
    Special { ids: Vec<u32>, type_id: u32 },
    Sequence { type_id: u32 },
}

/// Token ids of one encoded text with their token-type (segment) ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WordPieceEncoding {
    /// The token ids.
    pub ids: Vec<u32>,
    /// The token type of each id (0 for a single sequence).
    pub type_ids: Vec<u32>,
}

/// A BERT WordPiece tokenizer. Build it with [`WordPiece::from_json`] from the text of a
/// `tokenizer.json`.
///
/// ```
/// use souverain_tokenizer::WordPiece;
/// let json = r###"{
///   "added_tokens": [
///     {"id": 0, "content": "[UNK]", "special": true},
///     {"id": 1, "content": "[CLS]", "special": true},
///     {"id": 2, "content": "[SEP]", "special": true}
///   ],
///   "normalizer": {"type": "BertNormalizer", "lowercase": true},
///   "pre_tokenizer": {"type": "BertPreTokenizer"},
///   "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]},
///   "model": {"type": "WordPiece", "unk_token": "[UNK]",
///             "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "play": 3, "##ing": 4, "!": 5}}
/// }"###;
/// let tok = WordPiece::from_json(json)?;
/// assert_eq!(tok.encode("Playing!", true), [1, 3, 4, 5, 2]);
/// assert_eq!(tok.encode("Played", false), [0]);
/// # Ok::<(), souverain_tokenizer::WordPieceError>(())
/// ```
#[derive(Clone, Debug)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    unk_id: u32,
    prefix: String,
    max_input_chars_per_word: usize,
    normalizer: Option<Normalizer>,
    /// Added tokens matched in the raw text.
    raw_added: Vec<AddedToken>,
    /// Added tokens matched in the normalised text (their content normalised too).
    normalized_added: Vec<AddedToken>,
    template: Vec<Piece>,
}

impl WordPiece {
    /// Builds the tokenizer from the text of a `tokenizer.json` whose model is WordPiece, whose
    /// normaliser is `BertNormalizer` (or absent) and whose pre-tokeniser is
    /// `BertPreTokenizer`.
    pub fn from_json(json: &str) -> Result<Self, WordPieceError> {
        let file: FileTokenizer =
            serde_json::from_str(json).map_err(|e| WordPieceError::Json(e.to_string()))?;
        let kind = file
            .model
            .kind
            .clone()
            .unwrap_or_else(|| "WordPiece".into());
        if kind != "WordPiece" {
            return Err(WordPieceError::NotWordPiece(kind));
        }
        let normalizer = match file.normalizer {
            None => None,
            Some(n) if n.kind == "BertNormalizer" => Some(Normalizer {
                clean_text: n.clean_text,
                handle_chinese_chars: n.handle_chinese_chars,
                strip_accents: n.strip_accents.unwrap_or(n.lowercase),
                lowercase: n.lowercase,
            }),
            Some(n) => {
                return Err(WordPieceError::Unsupported {
                    component: "normalizer",
                    kind: n.kind,
                });
            }
        };
        match &file.pre_tokenizer {
            Some(p) if p.kind == "BertPreTokenizer" => {}
            Some(p) => {
                return Err(WordPieceError::Unsupported {
                    component: "pre_tokenizer",
                    kind: p.kind.clone(),
                });
            }
            None => {
                return Err(WordPieceError::Unsupported {
                    component: "pre_tokenizer",
                    kind: "none".into(),
                });
            }
        }

        // Ids must cover 0..n exactly once, so that id -> token is a plain table.
        let mut vocab = file.model.vocab;
        for t in &file.added_tokens {
            vocab.entry(t.content.clone()).or_insert(t.id);
        }
        let n = vocab.len();
        if n == 0 {
            return Err(WordPieceError::BadVocabulary("it is empty".into()));
        }
        let mut tokens: Vec<Option<String>> = vec![None; n];
        for (text, &id) in &vocab {
            let slot = tokens.get_mut(id as usize).ok_or_else(|| {
                WordPieceError::BadVocabulary(format!(
                    "token {text:?} has id {id}, beyond the {n} entries"
                ))
            })?;
            if let Some(other) = slot.replace(text.clone()) {
                return Err(WordPieceError::BadVocabulary(format!(
                    "tokens {other:?} and {text:?} share id {id}"
                )));
            }
        }
        let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
        for t in &file.added_tokens {
            if tokens.get(t.id as usize) != Some(&t.content) {
                return Err(WordPieceError::BadVocabulary(format!(
                    "added token {:?} has id {} taken by another token",
                    t.content, t.id
                )));
            }
        }
        let unk_id =
            *vocab
                .get(&file.model.unk_token)
                .ok_or_else(|| WordPieceError::MissingToken {
                    role: "unknown",
                    token: file.model.unk_token.clone(),
                })?;

        let mut raw_added = Vec::new();
        let mut normalized_added = Vec::new();
        for t in file.added_tokens {
            let mut token = AddedToken {
                id: t.id,
                content: t.content,
                single_word: t.single_word,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            };
            if t.normalized {
                if let Some(n) = &normalizer {
                    token.content = n.normalize(&token.content);
                }
                if !token.content.is_empty() {
                    normalized_added.push(token);
                }
            } else if !token.content.is_empty() {
                raw_added.push(token);
            }
        }
        let template = match &file.post_processor {
            None | Some(serde_json::Value::Null) => vec![Piece::Sequence { type_id: 0 }],
            Some(p) => parse_template(p, &vocab)?,
        };
        Ok(Self {
            vocab,
            tokens,
            unk_id,
            prefix: file.model.continuing_subword_prefix,
            max_input_chars_per_word: file.model.max_input_chars_per_word,
            normalizer,
            raw_added,
            normalized_added,
            template,
        })
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The text of a token id, if it is in range.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the unknown token.
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// How many tokens the post-processor adds around a single sequence (2 for BERT's
    /// `[CLS] … [SEP]`).
    pub fn num_special_tokens_to_add(&self) -> usize {
        self.template
            .iter()
            .map(|p| match p {
                Piece::Special { ids, .. } => ids.len(),
                Piece::Sequence { .. } => 0,
            })
            .sum()
    }

    /// Token ids of `text`; with `add_special_tokens`, wrapped as the post-processor says.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        self.encode_with_types(text, add_special_tokens).ids
    }

    /// Token ids of `text` with their token-type ids.
    pub fn encode_with_types(&self, text: &str, add_special_tokens: bool) -> WordPieceEncoding {
        let body = self.encode_body(text);
        if !add_special_tokens {
            let type_ids = vec![0; body.len()];
            return WordPieceEncoding {
                ids: body,
                type_ids,
            };
        }
        let mut ids = Vec::with_capacity(body.len() + self.num_special_tokens_to_add());
        let mut type_ids = Vec::with_capacity(ids.capacity());
        for piece in &self.template {
            match piece {
                Piece::Special { ids: s, type_id } => {
                    ids.extend_from_slice(s);
                    type_ids.extend(std::iter::repeat_n(*type_id, s.len()));
                }
                Piece::Sequence { type_id } => {
                    ids.extend_from_slice(&body);
                    type_ids.extend(std::iter::repeat_n(*type_id, body.len()));
                }
            }
        }
        WordPieceEncoding { ids, type_ids }
    }

    /// The ids of `text` without the post-processor's tokens.
    fn encode_body(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for segment in split_added(text, &self.raw_added) {
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text(t) => {
                    let normalized = match &self.normalizer {
                        Some(n) => n.normalize(t),
                        None => t.to_owned(),
                    };
                    for inner in split_added(&normalized, &self.normalized_added) {
                        match inner {
                            Segment::Added(id) => ids.push(id),
                            Segment::Text(t) => {
                                for word in pre_tokenize(t) {
                                    self.word_piece(word, &mut ids);
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// Greedy longest-match-first cutting of one word into vocabulary pieces.
    fn word_piece(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > self.max_input_chars_per_word {
            out.push(self.unk_id);
            return;
        }
        let first = out.len();
        let mut start = 0;
        let mut candidate = String::with_capacity(word.len() + self.prefix.len());
        while start < word.len() {
            let rest = &word[start..];
            let mut found = None;
            // Try the longest remaining prefix first, shortening one character at a time.
            let mut ends: Vec<usize> = rest.char_indices().map(|(i, c)| i + c.len_utf8()).collect();
            while let Some(end) = ends.pop() {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(&self.prefix);
                }
                candidate.push_str(&rest[..end]);
                if let Some(&id) = self.vocab.get(candidate.as_str()) {
                    found = Some((id, end));
                    break;
                }
            }
            match found {
                Some((id, end)) => {
                    out.push(id);
                    start += end;
                }
                None => {
                    out.truncate(first);
                    out.push(self.unk_id);
                    return;
                }
            }
        }
    }
}

/// Reads `TemplateProcessing` (its `single` template) or `BertProcessing`.
fn parse_template(
    p: &serde_json::Value,
    vocab: &HashMap<String, u32>,
) -> Result<Vec<Piece>, WordPieceError> {
    let kind = p.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let bad = |what: &str| WordPieceError::Json(format!("post_processor: {what}"));
    let lookup = |role: &'static str, token: &str| {
        vocab
            .get(token)
            .copied()
            .ok_or_else(|| WordPieceError::MissingToken {
                role,
                token: token.to_owned(),
            })
    };
    match kind {
        "BertProcessing" => {
            let pair = |key: &str| -> Result<u32, WordPieceError> {
                let v = p
                    .get(key)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| bad(key))?;
                let text = v.first().and_then(|t| t.as_str()).ok_or_else(|| bad(key))?;
                let id = lookup("post-processor", text)?;
                match v.get(1).and_then(|i| i.as_u64()) {
                    Some(i) if i == u64::from(id) => Ok(id),
                    _ => Err(bad(&format!("{key} id does not match the vocabulary"))),
                }
            };
            let cls = pair("cls")?;
            let sep = pair("sep")?;
            Ok(vec![
                Piece::Special {
                    ids: vec![cls],
                    type_id: 0,
                },
                Piece::Sequence { type_id: 0 },
                Piece::Special {
                    ids: vec![sep],
                    type_id: 0,
                },
            ])
        }
        "TemplateProcessing" => {
            let single = p
                .get("single")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no single template"))?;
            let specials = p.get("special_tokens");
            let mut pieces = Vec::with_capacity(single.len());
            let mut sequences = 0;
            for item in single {
                let type_id = |v: &serde_json::Value| {
                    v.get("type_id")
                        .and_then(|t| t.as_u64())
                        .and_then(|t| u32::try_from(t).ok())
                        .unwrap_or(0)
                };
                if let Some(s) = item.get("SpecialToken") {
                    let name = s
                        .get("id")
                        .and_then(|i| i.as_str())
                        .ok_or_else(|| bad("special token without id"))?;
                    // The ids come from the `special_tokens` table when it lists them.
                    let listed = specials
                        .and_then(|t| t.get(name))
                        .and_then(|t| t.get("ids"))
                        .and_then(|i| i.as_array());
                    let ids = match listed {
                        Some(list) => list
                            .iter()
                            .map(|i| {
                                i.as_u64()
                                    .and_then(|i| u32::try_from(i).ok())
                                    .filter(|&i| (i as usize) < vocab.len())
                                    .ok_or_else(|| bad("special token id out of range"))
                            })
                            .collect::<Result<Vec<u32>, _>>()?,
                        None => vec![lookup("post-processor", name)?],
                    };
                    pieces.push(Piece::Special {
                        ids,
                        type_id: type_id(s),
                    });
                } else if let Some(s) = item.get("Sequence") {
                    sequences += 1;
                    pieces.push(Piece::Sequence {
                        type_id: type_id(s),
                    });
                } else {
                    return Err(bad("unknown template piece"));
                }
            }
            if sequences != 1 {
                return Err(bad("the single template must hold the sequence once"));
            }
            Ok(pieces)
        }
        other => Err(WordPieceError::Unsupported {
            component: "post_processor",
            kind: other.to_owned(),
        }),
    }
}

impl Normalizer {
    fn normalize(&self, text: &str) -> String {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if self.clean_text {
                if c == '\0' || c == '\u{FFFD}' || is_control(c) {
                    continue;
                }
                if is_bert_whitespace(c) {
                    s.push(' ');
                    continue;
                }
            }
            if self.handle_chinese_chars && is_chinese_char(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        if self.strip_accents {
            s = s
                .nfd()
                .filter(|&c| c.general_category() != GeneralCategory::NonspacingMark)
                .collect();
        }
        if self.lowercase {
            // Code point by code point (no final-sigma rule), as `tokenizers` does.
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s
    }
}

/// Whitespace for `clean_text`: tab, newline, carriage return and Unicode `White_Space`.
fn is_bert_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Control characters for `clean_text`: category `C*` (control, format, unassigned, private
/// use, surrogate) except tab, newline and carriage return.
fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    c.general_category_group() == GeneralCategoryGroup::Other
}

/// CJK Unified Ideographs and their extensions and compatibility blocks: the ranges BERT
/// treats as one word per character.
fn is_chinese_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// Punctuation for the pre-tokeniser: ASCII punctuation (which includes symbols such as `$`
/// and `^`) or Unicode `P*`.
fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

/// `BertPreTokenizer`: words split at whitespace, every punctuation character alone.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() || is_bert_punctuation(c) {
            if let Some(s) = start.take() {
                words.push(&text[s..i]);
            }
            if !c.is_whitespace() {
                words.push(&text[i..i + c.len_utf8()]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` at occurrences of the added tokens: at each position the longest token that
/// matches wins, scanning left to right (leftmost-longest). `lstrip` / `rstrip` swallow the
/// whitespace before / after a match; a `single_word` token matches only where no word
/// character touches it.
fn split_added<'a>(text: &'a str, added: &[AddedToken]) -> Vec<Segment<'a>> {
    if added.is_empty() {
        return vec![Segment::Text(text)];
    }
    let mut out = Vec::new();
    let mut text_start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let best = added
            .iter()
            .filter(|t| rest.starts_with(t.content.as_str()))
            .filter(|t| !t.single_word || is_single_word(text, pos, pos + t.content.len()))
            .max_by_key(|t| t.content.len());
        let Some(token) = best else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let mut before_end = pos;
        if token.lstrip {
            before_end = text[text_start..pos].trim_end().len() + text_start;
        }
        if before_end > text_start {
            out.push(Segment::Text(&text[text_start..before_end]));
        }
        out.push(Segment::Added(token.id));
        pos += token.content.len();
        if token.rstrip {
            pos = text.len() - text[pos..].trim_start().len();
        }
        text_start = pos;
    }
    if text_start < text.len() {
        out.push(Segment::Text(&text[text_start..]));
    }
    out
}

fn is_single_word(text: &str, start: usize, end: usize) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let before = text[..start].chars().next_back().is_some_and(word);
    let after = text[end..].chars().next().is_some_and(word);
    !before && !after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> WordPiece {
        let json = r###"{
          "added_tokens": [
            {"id": 0, "content": "[PAD]", "special": true, "normalized": false},
            {"id": 1, "content": "[UNK]", "special": true, "normalized": false},
            {"id": 2, "content": "[CLS]", "special": true, "normalized": false},
            {"id": 3, "content": "[SEP]", "special": true, "normalized": false},
            {"id": 4, "content": "[MASK]", "special": true, "normalized": false}
          ],
          "normalizer": {"type": "BertNormalizer", "clean_text": true,
                         "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
          "pre_tokenizer": {"type": "BertPreTokenizer"},
          "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
          "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                    "max_input_chars_per_word": 10,
                    "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
                              "un": 5, "##aff": 6, "##able": 7, "cafe": 8, "!": 9, "中": 10,
                              "文": 11, "$": 12, "a": 13, "##a": 14, "[": 15, "]": 16}}
        }"###;
        WordPiece::from_json(json).unwrap()
    }

    #[test]
    fn greedy_longest_match_with_continuation_prefix() {
        let t = toy();
        assert_eq!(t.encode("unaffable", false), [5, 6, 7]);
        assert_eq!(t.encode("UnAffable!", true), [2, 5, 6, 7, 9, 3]);
    }

    #[test]
    fn a_word_with_an_unknown_part_is_one_unk() {
        let t = toy();
        assert_eq!(t.encode("unaffx cafe", false), [1, 8]);
    }

    #[test]
    fn long_words_are_unknown() {
        let t = toy();
        assert_eq!(
            t.encode(&"a".repeat(10), false),
            [13, 14, 14, 14, 14, 14, 14, 14, 14, 14]
        );
        assert_eq!(t.encode(&"a".repeat(11), false), [1]);
    }

    #[test]
    fn accents_are_stripped_and_cjk_split() {
        let t = toy();
        assert_eq!(t.encode("Café", false), [8]);
        assert_eq!(t.encode("CAFE\u{301}", false), [8]);
        assert_eq!(t.encode("中文", false), [10, 11]);
        assert_eq!(t.encode("a中a", false), [13, 10, 13]);
    }

    #[test]
    fn control_characters_vanish_and_whitespace_splits() {
        let t = toy();
        assert_eq!(t.encode("ca\u{200B}fe\u{0}", false), [8]);
        assert_eq!(t.encode("\tcafe\n\u{3000}cafe ", false), [8, 8]);
        assert_eq!(t.encode("   ", true), [2, 3]);
        assert_eq!(t.encode("", true), [2, 3]);
    }

    #[test]
    fn ascii_symbols_are_punctuation() {
        let t = toy();
        assert_eq!(t.encode("a$a", false), [13, 12, 13]);
    }

    #[test]
    fn special_tokens_in_text_are_matched_before_normalising() {
        let t = toy();
        assert_eq!(t.encode("cafe [MASK] cafe", true), [2, 8, 4, 8, 3]);
        // Lowercase "[mask]" is not the special token: it is split as punctuation and words.
        assert_eq!(t.encode("[mask]", false), [15, 1, 16]);
        assert_eq!(t.encode("[CLS][SEP]", false), [2, 3]);
    }

    #[test]
    fn type_ids_are_zero_for_a_single_sequence() {
        let t = toy();
        let e = t.encode_with_types("cafe", true);
        assert_eq!(e.ids, [2, 8, 3]);
        assert_eq!(e.type_ids, [0, 0, 0]);
        assert_eq!(t.num_special_tokens_to_add(), 2);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(
            WordPiece::from_json("{"),
            Err(WordPieceError::Json(_))
        ));
        let bpe = r#"{"model": {"type": "BPE", "unk_token": "x", "vocab": {"x": 0}},
                     "pre_tokenizer": {"type": "BertPreTokenizer"}}"#;
        assert!(matches!(
            WordPiece::from_json(bpe),
            Err(WordPieceError::NotWordPiece(_))
        ));
        let gap = r#"{"model": {"type": "WordPiece", "unk_token": "x", "vocab": {"x": 0, "y": 5}},
                     "pre_tokenizer": {"type": "BertPreTokenizer"}}"#;
        assert!(matches!(
            WordPiece::from_json(gap),
            Err(WordPieceError::BadVocabulary(_))
        ));
        let no_unk = r#"{"model": {"type": "WordPiece", "unk_token": "z", "vocab": {"x": 0}},
                     "pre_tokenizer": {"type": "BertPreTokenizer"}}"#;
        assert!(matches!(
            WordPiece::from_json(no_unk),
            Err(WordPieceError::MissingToken { .. })
        ));
        let nfkc = r#"{"model": {"type": "WordPiece", "unk_token": "x", "vocab": {"x": 0}},
                     "normalizer": {"type": "NFKC"},
                     "pre_tokenizer": {"type": "BertPreTokenizer"}}"#;
        assert!(matches!(
            WordPiece::from_json(nfkc),
            Err(WordPieceError::Unsupported { .. })
        ));
    }
}
