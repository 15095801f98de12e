//! The GGUF tokenizers as llama.cpp runs them: byte-level BPE for
//! `tokenizer.ggml.model = "gpt2"`, and SentencePiece BPE for `"llama"` (Gemma, Llama 2):
//! spaces become `▁`, characters merge pairwise, the best-scoring vocabulary entry
//! (`tokenizer.ggml.scores`) first, leftmost on ties, and what stays out of the vocabulary
//! falls back to `<0xXX>` byte tokens. Both share the special-token partitioning, the
//! end-of-generation rules and the decoder.

use std::collections::{BinaryHeap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::TokenizerError;
use crate::pretokenize::PreTokenizer;
use crate::unicode::{byte_to_char, char_to_byte};

/// Everything needed to build a [`Tokenizer`], as read from GGUF `tokenizer.*` metadata.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `"smollm"`, `"llama-bpe"`, `"qwen2"`; `None` means
    /// `"default"`, as in llama.cpp.
    #[serde(default)]
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token texts in GPT-2 byte-to-unicode form (`"Ġthe"`).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte. `None` makes every token normal.
    #[serde(default)]
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`; when `None` it is found by text (`<|eot_id|>`,
    /// `<|im_end|>`, ...), as llama.cpp does.
    #[serde(default)]
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    #[serde(default)]
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    #[serde(default)]
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`. When the key is absent llama.cpp defaults it to true for
    /// the Llama-3 and Tekken pre-tokenisers and false otherwise; the caller applies that.
    #[serde(default)]
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`.
    #[serde(default)]
    pub add_eos: bool,
    /// `tokenizer.chat_template`.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.scores`: each token's merge score (SentencePiece vocabularies).
    #[serde(default)]
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.add_space_prefix`: SentencePiece puts a space before text that starts
    /// the input or follows a special token (llama.cpp's default: true).
    #[serde(default)]
    pub add_space_prefix: Option<bool>,
}

/// Token attributes, as llama.cpp derives them from token types (a bit set).
const ATTR_UNDEFINED: u8 = 0;
const ATTR_UNKNOWN: u8 = 1 << 0;
const ATTR_UNUSED: u8 = 1 << 1;
const ATTR_NORMAL: u8 = 1 << 2;
const ATTR_CONTROL: u8 = 1 << 3;
const ATTR_USER_DEFINED: u8 = 1 << 4;
const ATTR_BYTE: u8 = 1 << 5;

fn attr_of_type(t: i32) -> u8 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => ATTR_UNDEFINED,
    }
}

/// Token texts llama.cpp treats as end of generation (and marks as control).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Texts llama.cpp recognises as the end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle pad / repository / file-separator tokens, which llama.cpp also treats as
/// end of generation.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// A byte-level BPE tokenizer that reproduces llama.cpp's `gpt2` tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    attrs: Vec<u8>,
    token_to_id: HashMap<String, u32>,
    /// `"left right"` -> rank.
    merge_ranks: HashMap<String, u32>,
    /// Raw bytes of each token as rendered with specials shown (llama.cpp's piece cache).
    pieces: Vec<Box<[u8]>>,
    /// Special tokens (control, user-defined, unknown), longest text first.
    special_by_length: Vec<u32>,
    eog: HashSet<u32>,
    pre: PreTokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Set for a SentencePiece (`"llama"`) vocabulary.
    spm: Option<Spm>,
}

/// What a SentencePiece vocabulary adds.
#[derive(Debug)]
struct Spm {
    scores: Vec<f32>,
    add_space_prefix: bool,
    /// The `<0xXX>` token of each byte.
    byte_ids: Vec<Option<u32>>,
    unk_id: Option<u32>,
}

/// SentencePiece's whitespace symbol.
const SPM_SPACE: char = '\u{2581}';

/// Part of the input during special-token partitioning.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    /// Byte range of text still to tokenise.
    Text(usize, usize),
    /// A special token already recognised.
    Token(u32),
}

impl Tokenizer {
    /// Builds a tokenizer, validating the spec.
    ///
    /// Errors: unsupported model or pre-tokeniser, empty or duplicate tokens, a token-type list
    /// of the wrong length, malformed merges or merges naming unknown tokens, special ids
    /// outside the vocabulary, `add_bos`/`add_eos` without the token.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let spm_vocab = match spec.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            _ => return Err(TokenizerError::UnsupportedModel(spec.model)),
        };
        // A SentencePiece vocabulary has no pre-tokeniser (llama.cpp ignores the key).
        let pre = PreTokenizer::new(if spm_vocab {
            "default"
        } else {
            spec.pre.as_deref().unwrap_or("default")
        })?;
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabularyTooLarge(n));
        }
        let mut attrs = match &spec.token_types {
            Some(types) if types.len() != n => {
                return Err(TokenizerError::TokenTypeCount {
                    types: types.len(),
                    tokens: n,
                });
            }
            Some(types) => types.iter().map(|&t| attr_of_type(t)).collect(),
            None => vec![ATTR_NORMAL; n],
        };
        let mut tokens = spec.tokens;
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, text) in tokens.iter_mut().enumerate() {
            let id = i as u32;
            if text.is_empty() {
                // llama.cpp renames empty tokens so that they stay unique and unmatchable.
                *text = format!("[EMPTY_{i}]");
            }
            if let Some(first) = token_to_id.insert(text.clone(), id) {
                return Err(TokenizerError::DuplicateToken {
                    text: text.clone(),
                    first,
                    second: id,
                });
            }
        }
        let mut merge_ranks = HashMap::with_capacity(spec.merges.len());
        for (index, merge) in spec.merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let split = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let parts = split.and_then(|at| Some((merge.get(..at)?, merge.get(at + 1..)?)));
            let (Some((left, right)), Ok(rank)) = (parts, u32::try_from(index)) else {
                return Err(TokenizerError::MalformedMerge {
                    index,
                    text: merge.clone(),
                });
            };
            for part in [left, right] {
                if !token_to_id.contains_key(part) {
                    return Err(TokenizerError::MergeUnknownToken {
                        index,
                        text: merge.clone(),
                        part: part.to_owned(),
                    });
                }
            }
            // Later duplicates keep the first (best) rank, like std::map::emplace.
            merge_ranks.entry(merge.clone()).or_insert(rank);
        }
        for (role, id) in [
            ("bos", spec.bos_id),
            ("eos", spec.eos_id),
            ("eot", spec.eot_id),
            ("unk", spec.unk_id),
            ("pad", spec.pad_id),
        ] {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(TokenizerError::SpecialIdOutOfRange {
                    role,
                    id,
                    vocab_size: n,
                });
            }
        }
        if spec.add_bos && spec.bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken { role: "bos" });
        }
        if spec.add_eos && spec.eos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken { role: "eos" });
        }

        let eog = end_of_generation_ids(&token_to_id, &mut attrs, spec.eos_id, spec.eot_id);
        // gpt-oss: these always render.
        for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(text)
                && let Some(a) = attrs.get_mut(id as usize)
            {
                *a = ATTR_USER_DEFINED;
            }
        }

        let mut special_by_length: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs.get(id as usize).copied().unwrap_or(0)
                    & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)
                    != 0
            })
            .collect();
        special_by_length
            .sort_by_key(|&id| std::cmp::Reverse(tokens.get(id as usize).map_or(0, String::len)));

        let spm = if spm_vocab {
            let scores = spec.scores.unwrap_or_default();
            if scores.len() != n {
                return Err(TokenizerError::ScoreCount {
                    scores: scores.len(),
                    tokens: n,
                });
            }
            let byte_ids = (0..=255u8)
                .map(|b| token_to_id.get(&format!("<0x{b:02X}>")).copied())
                .collect();
            Some(Spm {
                scores,
                add_space_prefix: spec.add_space_prefix.unwrap_or(true),
                byte_ids,
                unk_id: spec.unk_id,
            })
        } else {
            None
        };

        let pieces = tokens
            .iter()
            .zip(&attrs)
            .map(|(text, &attr)| piece(text, attr, spm_vocab).into_boxed_slice())
            .collect();

        Ok(Tokenizer {
            tokens,
            attrs,
            token_to_id,
            merge_ranks,
            pieces,
            special_by_length,
            eog,
            pre,
            bos_id: spec.bos_id,
            eos_id: spec.eos_id,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            spm,
        })
    }

    /// Tokenises `text`.
    ///
    /// `add_special` adds BOS / EOS where the spec's `add_bos` / `add_eos` ask for them.
    /// `parse_special` recognises control-token texts (e.g. `<|im_start|>`) in `text`;
    /// user-defined tokens are always recognised, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos_id
        {
            out.push(bos);
        }
        let mut scratch = Scratch::default();
        // SentencePiece: a space before text at the start or after a special token.
        let mut after_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(start, end) => {
                    let Some(t) = text.get(start..end) else {
                        continue;
                    };
                    match &self.spm {
                        Some(spm) => self.spm_encode(spm, t, after_special, &mut scratch, &mut out),
                        None => self.encode_text(t, &mut scratch, &mut out),
                    }
                    after_special = false;
                }
            }
        }
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos_id
        {
            out.push(eos);
        }
        out
    }

    /// Splits `text` at special-token occurrences: for each special token, longest first, every
    /// text fragment is cut at each of its occurrences (llama.cpp's `tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0, text.len())];
        for &id in &self.special_by_length {
            let attr = self.attr(id);
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let Some(special) = self.tokens.get(id as usize) else {
                continue;
            };
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(s, e) if text.get(*s..*e).is_some_and(|t| t.contains(special.as_str()))))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut start, end) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(found) = text.get(start..end).and_then(|t| t.find(special.as_str()))
                {
                    let at = start + found;
                    if at > start {
                        next.push(Fragment::Text(start, at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + special.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Pre-tokenises and BPE-encodes a stretch of text with no special tokens in it.
    fn encode_text(&self, text: &str, scratch: &mut Scratch, out: &mut Vec<u32>) {
        for word in self.pre.split(text) {
            scratch.encoded.clear();
            for &b in word.as_bytes() {
                scratch.encoded.push(byte_to_char(b));
            }
            if self.pre.ignore_merges
                && let Some(&id) = self.token_to_id.get(scratch.encoded.as_str())
            {
                out.push(id);
                continue;
            }
            self.bpe_word(scratch, out);
        }
    }

    /// BPE over the byte-level characters of one word (in `scratch.encoded`).
    fn bpe_word(&self, scratch: &mut Scratch, out: &mut Vec<u32>) {
        let word = scratch.encoded.as_str();
        let symbols = &mut scratch.symbols;
        let count = one_symbol_per_char(word, symbols);
        let heap = &mut scratch.heap;
        heap.clear();
        let key = &mut scratch.key;
        for i in 1..count {
            self.push_bigram(word, symbols, i - 1, i, heap, key);
        }
        while let Some(b) = heap.pop() {
            let (Some(l), Some(r)) = (symbols.get(b.left), symbols.get(b.right)) else {
                continue;
            };
            // Stale entry: one side has changed since it was queued.
            if l.len == 0 || r.len == 0 || l.len != b.left_len || r.len != b.right_len {
                continue;
            }
            let (r_len, r_next) = (r.len, r.next);
            if let Some(l) = symbols.get_mut(b.left) {
                l.len += r_len;
                l.next = r_next;
            }
            if let Some(r) = symbols.get_mut(b.right) {
                r.len = 0;
            }
            if let Some(nx) = r_next.and_then(|i| symbols.get_mut(i)) {
                nx.prev = Some(b.left);
            }
            let prev = symbols.get(b.left).and_then(|s| s.prev);
            if let Some(p) = prev {
                self.push_bigram(word, symbols, p, b.left, heap, key);
            }
            if let Some(nx) = r_next {
                self.push_bigram(word, symbols, b.left, nx, heap, key);
            }
        }
        for s in symbols.iter().filter(|s| s.len > 0) {
            let Some(text) = word.get(s.start..s.start + s.len) else {
                continue;
            };
            if let Some(&id) = self.token_to_id.get(text) {
                out.push(id);
            } else {
                // llama.cpp looks up each byte of the symbol's text as a one-byte token and
                // drops bytes that are not tokens.
                for b in text.bytes() {
                    let one = [b];
                    if let Some(&id) = std::str::from_utf8(&one)
                        .ok()
                        .and_then(|t| self.token_to_id.get(t))
                    {
                        out.push(id);
                    }
                }
            }
        }
    }

    /// SentencePiece BPE over one stretch of text with no special tokens in it (llama.cpp's
    /// `llm_tokenizer_spm_session`): spaces become `▁` (one is put first when
    /// `add_space_prefix` and `after_special`), each character is a symbol, and the adjacent
    /// pair whose concatenation is the best-scoring token merges first, the leftmost on equal
    /// scores, until no pair is a token. A symbol that is no token becomes its bytes' `<0xXX>`
    /// tokens (the unknown token where the vocabulary lacks one).
    fn spm_encode(
        &self,
        spm: &Spm,
        text: &str,
        after_special: bool,
        scratch: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        let word = &mut scratch.encoded;
        word.clear();
        if spm.add_space_prefix && after_special {
            word.push(SPM_SPACE);
        }
        word.extend(text.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
        let word = word.as_str();
        let symbols = &mut scratch.symbols;
        let count = one_symbol_per_char(word, symbols);
        let mut heap: BinaryHeap<SpmBigram> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<SpmBigram>, symbols: &[Symbol], l: usize, r: usize| {
            let (Some(ls), Some(rs)) = (symbols.get(l), symbols.get(r)) else {
                return;
            };
            let Some(joined) = word.get(ls.start..rs.start + rs.len) else {
                return;
            };
            if let Some(&id) = self.token_to_id.get(joined) {
                heap.push(SpmBigram {
                    score: spm.scores.get(id as usize).copied().unwrap_or(f32::MIN),
                    left: l,
                    right: r,
                    size: joined.len(),
                });
            }
        };
        for i in 1..count {
            push(&mut heap, symbols, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (Some(l), Some(r)) = (symbols.get(b.left), symbols.get(b.right)) else {
                continue;
            };
            // Stale entry: one side has merged since it was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            let (r_len, r_next) = (r.len, r.next);
            if let Some(l) = symbols.get_mut(b.left) {
                l.len += r_len;
                l.next = r_next;
            }
            if let Some(r) = symbols.get_mut(b.right) {
                r.len = 0;
            }
            if let Some(nx) = r_next.and_then(|i| symbols.get_mut(i)) {
                nx.prev = Some(b.left);
            }
            if let Some(p) = symbols.get(b.left).and_then(|s| s.prev) {
                push(&mut heap, symbols, p, b.left);
            }
            if let Some(nx) = r_next {
                push(&mut heap, symbols, b.left, nx);
            }
        }
        for s in symbols.iter().filter(|s| s.len > 0) {
            let Some(text) = word.get(s.start..s.start + s.len) else {
                continue;
            };
            match self.token_to_id.get(text) {
                Some(&id) => out.push(id),
                None => {
                    for b in text.bytes() {
                        if let Some(id) = spm.byte_ids[b as usize].or(spm.unk_id) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    fn push_bigram(
        &self,
        word: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Bigram>,
        key: &mut String,
    ) {
        let (Some(l), Some(r)) = (symbols.get(left), symbols.get(right)) else {
            return;
        };
        let (Some(lt), Some(rt)) = (
            word.get(l.start..l.start + l.len),
            word.get(r.start..r.start + r.len),
        ) else {
            return;
        };
        key.clear();
        key.push_str(lt);
        key.push(' ');
        key.push_str(rt);
        if let Some(&rank) = self.merge_ranks.get(key.as_str()) {
            heap.push(Bigram {
                rank,
                left,
                right,
                left_len: l.len,
                right_len: r.len,
            });
        }
    }

    /// Turns token ids back into text, as llama.cpp's `llama_detokenize`.
    ///
    /// With `skip_special`, control and unknown tokens render as nothing and a leading BOS /
    /// trailing EOS that `add_bos` / `add_eos` would have added are dropped; otherwise control
    /// tokens render as their text. Invalid UTF-8 is replaced by U+FFFD. For pre-tokenisers
    /// where llama.cpp cleans up tokenisation spaces (`gpt2`, `llama-bpe`, ...; not `smollm`,
    /// `qwen2`, `tekken`), the same clean-up is applied.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut ids = ids;
        if skip_special
            && self.add_bos
            && let (Some(&first), Some(bos)) = (ids.first(), self.bos_id)
            && first == bos
        {
            ids = ids.get(1..).unwrap_or(&[]);
        }
        if skip_special
            && self.add_eos
            && let (Some(&last), Some(eos)) = (ids.last(), self.eos_id)
            && last == eos
        {
            ids = ids.get(..ids.len() - 1).unwrap_or(&[]);
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let mut piece = self.piece_bytes(id, skip_special)?;
            // SentencePiece with a space prefix: the first token's leading spaces were the
            // prefix, not text (llama.cpp strips them).
            if i == 0 && self.spm.as_ref().is_some_and(|s| s.add_space_prefix) {
                while let [b' ', rest @ ..] = piece {
                    piece = rest;
                }
            }
            bytes.extend_from_slice(piece);
        }
        if self.spm.is_none() && self.pre.clean_spaces {
            bytes = clean_spaces(&bytes);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` contributes to decoded text; empty for control / unknown tokens
    /// when `skip_special`.
    pub(crate) fn piece_bytes(&self, id: u32, skip_special: bool) -> Result<&[u8], TokenizerError> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.tokens.len(),
            });
        };
        if skip_special && self.attr(id) & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            return Ok(&[]);
        }
        Ok(piece)
    }

    /// Raw bytes of a token (byte-level decoded; special tokens give their text), or `None` for
    /// an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(|p| &p[..])
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether generation stops at `id`: EOS, EOT and the tokens llama.cpp recognises as end of
    /// generation by their text (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`,
    /// `<end_of_turn>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Whether `id` is a control, user-defined or unknown token.
    pub fn is_special(&self, id: u32) -> bool {
        self.attr(id) & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
    }

    /// The id of the token whose (byte-level encoded) text is `text`.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The (byte-level encoded) text of token `id`.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    fn attr(&self, id: u32) -> u8 {
        self.attrs
            .get(id as usize)
            .copied()
            .unwrap_or(ATTR_UNDEFINED)
    }
}

/// Computes the end-of-generation set as llama.cpp does, marking such tokens as control.
fn end_of_generation_ids(
    token_to_id: &HashMap<String, u32>,
    attrs: &mut [u8],
    eos_id: Option<u32>,
    eot_id: Option<u32>,
) -> HashSet<u32> {
    let mut eog = HashSet::new();
    let mut mark = |id: u32, eog: &mut HashSet<u32>| {
        eog.insert(id);
        if let Some(a) = attrs.get_mut(id as usize) {
            *a |= ATTR_CONTROL;
        }
    };
    // FIM pad / repo / separator: the first of each group that exists.
    for group in [
        &FIM_EOG_TEXTS[0..5],
        &FIM_EOG_TEXTS[5..10],
        &FIM_EOG_TEXTS[10..],
    ] {
        if let Some(&id) = group.iter().find_map(|t| token_to_id.get(*t)) {
            mark(id, &mut eog);
        }
    }
    for text in EOG_TEXTS {
        if let Some(&id) = token_to_id.get(*text) {
            mark(id, &mut eog);
        }
    }
    let eot = eot_id.or_else(|| EOT_TEXTS.iter().find_map(|t| token_to_id.get(*t).copied()));
    for id in [eos_id, eot, token_to_id.get("<|eom_id|>").copied()]
        .into_iter()
        .flatten()
    {
        eog.insert(id);
    }
    // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
    let in_eog =
        |eog: &HashSet<u32>, t: &str| token_to_id.get(t).is_some_and(|id| eog.contains(id));
    let harmony = (in_eog(&eog, "<|return|>") && in_eog(&eog, "<|call|>"))
        || (in_eog(&eog, "<|calls|>") && in_eog(&eog, "<|flush|>"));
    if harmony
        && in_eog(&eog, "<|end|>")
        && let Some(&end) = token_to_id.get("<|end|>")
    {
        eog.remove(&end);
        if let Some(a) = attrs.get_mut(end as usize) {
            *a = ATTR_USER_DEFINED;
        }
    }
    // gemma4 / paddleocr: "</s>" is not an end of generation next to "<|tool_response>".
    if in_eog(&eog, "<|tool_response>")
        && in_eog(&eog, "</s>")
        && let Some(&s) = token_to_id.get("</s>")
    {
        eog.remove(&s);
        if let Some(a) = attrs.get_mut(s as usize) {
            *a = ATTR_NORMAL;
        }
    }
    eog
}

/// The bytes a token renders as, special tokens shown (llama.cpp's `token_to_piece`): for a
/// SentencePiece vocabulary (`spm`) a normal token's `▁` are spaces and the unknown token is
/// `▅`; for byte-level BPE its characters map back to bytes.
fn piece(text: &str, attr: u8, spm: bool) -> Vec<u8> {
    if spm && attr & ATTR_UNKNOWN != 0 {
        return "\u{2585}".as_bytes().to_vec();
    }
    if attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
        return text.as_bytes().to_vec();
    }
    if attr & ATTR_USER_DEFINED != 0 {
        return text.as_bytes().to_vec();
    }
    if spm && attr & ATTR_NORMAL != 0 {
        return text.replace(SPM_SPACE, " ").into_bytes();
    }
    if attr & ATTR_NORMAL != 0 {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match char_to_byte(c) {
                Some(b) => out.push(b),
                None => {
                    // llama.cpp's marker for a character outside the byte alphabet.
                    out.extend_from_slice(b"[UNK_BYTE_0x");
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.push(b']');
                }
            }
        }
        return out;
    }
    if attr & ATTR_BYTE != 0 {
        // "<0xAB>"
        if let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return vec![b];
        }
    }
    Vec::new()
}

/// llama.cpp's clean-up of tokenisation spaces: " ?", " !", " .", " ," lose the space; a lone
/// apostrophe between spaces loses both spaces; " 's", " 'm", " 're", " 've" lose the space.
fn clean_spaces(text: &[u8]) -> Vec<u8> {
    // Pass 1: space before ? ! . ,
    let mut a: Vec<u8> = Vec::with_capacity(text.len());
    for (i, &x) in text.iter().enumerate() {
        if i > 0 && text.get(i - 1) == Some(&b' ') && matches!(x, b'?' | b'!' | b'.' | b',') {
            a.pop();
        }
        a.push(x);
    }
    // Pass 2: " ' " -> "'"; the dropped space reads as NUL for the next position, as in
    // llama.cpp's in-place loop.
    let mut b: Vec<u8> = Vec::with_capacity(a.len());
    let mut i = 0;
    while i < a.len() {
        let x = a.get(i).copied().unwrap_or(0);
        if i > 0
            && x == b'\''
            && i + 1 < a.len()
            && a.get(i - 1) == Some(&b' ')
            && a.get(i + 1) == Some(&b' ')
        {
            b.pop();
            b.push(x);
            if let Some(next) = a.get_mut(i + 1) {
                *next = 0;
            }
            i += 2;
            continue;
        }
        b.push(x);
        i += 1;
    }
    // Pass 3: contractions.
    let mut c: Vec<u8> = Vec::with_capacity(b.len());
    for (i, &x) in b.iter().enumerate() {
        if i > 0 && b.get(i - 1) == Some(&b' ') && x == b'\'' && i + 1 < b.len() {
            let x1 = b.get(i + 1).copied().unwrap_or(0);
            let x2 = b.get(i + 2).copied();
            let drop = match x1 {
                b's' | b'm' => true,
                b'r' | b'v' => i + 2 < b.len() && x2 == Some(b'e'),
                _ => false,
            };
            if drop {
                c.pop();
            }
        }
        c.push(x);
    }
    c
}

/// Fills `symbols` with one symbol per character of `word`, linked in order; returns how many.
fn one_symbol_per_char(word: &str, symbols: &mut Vec<Symbol>) -> usize {
    symbols.clear();
    let mut offset = 0;
    for c in word.chars() {
        let n = c.len_utf8();
        symbols.push(Symbol {
            start: offset,
            len: n,
            prev: symbols.len().checked_sub(1),
            next: None,
        });
        offset += n;
    }
    let count = symbols.len();
    for (i, s) in symbols.iter_mut().enumerate() {
        if i + 1 < count {
            s.next = Some(i + 1);
        }
    }
    count
}

/// One symbol during BPE: a byte range of the encoded word, linked to its neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the heap yields the lowest rank, then the leftmost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_len: usize,
    right_len: usize,
}

lowest_rank_first!(Bigram);

/// A candidate SentencePiece merge; the heap yields the highest score, then the leftmost.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SpmBigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged text, to tell stale entries.
    size: usize,
}

impl Eq for SpmBigram {}

impl Ord for SpmBigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Buffers reused across words.
#[derive(Default)]
struct Scratch {
    encoded: String,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
    key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: all 256 byte tokens, a few merges, and special tokens.
    fn toy_spec() -> TokenizerSpec {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
        let mut types = vec![1; 256];
        for (t, ty) in [
            ("he", 1),
            ("ll", 1),
            ("hell", 1),
            ("hello", 1),
            ("Ġw", 1),
            ("<|im_start|>", 3),
            ("<|im_end|>", 3),
            ("<tool>", 4),
        ] {
            tokens.push(t.to_owned());
            types.push(ty);
        }
        TokenizerSpec {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            tokens,
            token_types: Some(types),
            merges: ["h e", "l l", "he ll", "hell o", "Ġ w"]
                .map(String::from)
                .to_vec(),
            bos_id: Some(261),
            eos_id: Some(262),
            ..TokenizerSpec::default()
        }
    }

    #[test]
    fn merges_follow_rank_order() {
        let tok = Tokenizer::from_spec(toy_spec()).unwrap();
        let ids = tok.encode("hello world", false, false);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(
            ids,
            [id("hello"), id("Ġw"), id("o"), id("r"), id("l"), id("d")]
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
    }

    #[test]
    fn special_tokens_only_with_parse_special_but_user_defined_always() {
        let tok = Tokenizer::from_spec(toy_spec()).unwrap();
        let start = tok.token_to_id("<|im_start|>").unwrap();
        let tool = tok.token_to_id("<tool>").unwrap();
        let with = tok.encode("<|im_start|>he<tool>", false, true);
        assert_eq!(with.first(), Some(&start));
        assert!(with.contains(&tool));
        let without = tok.encode("<|im_start|>he<tool>", false, false);
        assert!(!without.contains(&start));
        assert!(without.contains(&tool));
        assert_eq!(tok.decode(&without, false).unwrap(), "<|im_start|>he<tool>");
        assert_eq!(tok.decode(&with, true).unwrap(), "he<tool>");
        assert_eq!(tok.decode(&with, false).unwrap(), "<|im_start|>he<tool>");
    }

    #[test]
    fn eog_and_special_flags() {
        let tok = Tokenizer::from_spec(toy_spec()).unwrap();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        assert!(tok.is_eog(end));
        assert!(tok.is_special(end));
        assert!(!tok.is_eog(tok.token_to_id("he").unwrap()));
        assert_eq!(
            tok.token_bytes(tok.token_to_id("Ġw").unwrap()),
            Some(&b" w"[..])
        );
        assert_eq!(tok.token_bytes(100_000), None);
        assert_eq!(tok.vocab_size(), 264);
    }

    #[test]
    fn add_special_adds_bos_and_eos_when_asked() {
        let mut spec = toy_spec();
        spec.add_bos = true;
        spec.add_eos = true;
        let tok = Tokenizer::from_spec(spec).unwrap();
        let ids = tok.encode("he", true, false);
        assert_eq!(ids.first(), Some(&261));
        assert_eq!(ids.last(), Some(&262));
        assert_eq!(tok.encode("he", false, false).len(), 1);
        assert_eq!(tok.decode(&ids, true).unwrap(), "he");
    }

    #[test]
    fn malformed_specs_give_typed_errors() {
        let mut s = toy_spec();
        s.merges.push("h zz".into());
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::MergeUnknownToken { ref part, .. }) if part == "zz"
        ));
        let mut s = toy_spec();
        s.merges.push("nospace".into());
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::MalformedMerge { .. })
        ));
        let mut s = toy_spec();
        s.eos_id = Some(9999);
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::SpecialIdOutOfRange {
                role: "eos",
                id: 9999,
                ..
            })
        ));
        let mut s = toy_spec();
        s.token_types = Some(vec![1; 3]);
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::TokenTypeCount { .. })
        ));
        let mut s = toy_spec();
        s.tokens.push("he".into());
        s.token_types = None;
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::DuplicateToken { .. })
        ));
        let mut s = toy_spec();
        s.model = "rwkv".into();
        assert!(
            matches!(Tokenizer::from_spec(s), Err(TokenizerError::UnsupportedModel(ref m)) if m == "rwkv")
        );
        // A SentencePiece vocabulary needs one score per token.
        let mut s = toy_spec();
        s.model = "llama".into();
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::ScoreCount { scores: 0, .. })
        ));
        let mut s = toy_spec();
        s.pre = Some("martian".into());
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::UnsupportedPreTokenizer(ref p)) if p == "martian"
        ));
        let mut s = toy_spec();
        s.bos_id = None;
        s.add_bos = true;
        assert!(matches!(
            Tokenizer::from_spec(s),
            Err(TokenizerError::MissingSpecialToken { role: "bos" })
        ));
        let tok = Tokenizer::from_spec(toy_spec()).unwrap();
        assert!(matches!(
            tok.decode(&[70_000], false),
            Err(TokenizerError::UnknownTokenId { id: 70_000, .. })
        ));
    }

    #[test]
    fn clean_spaces_matches_llama_cpp_rules() {
        assert_eq!(clean_spaces(b"Hello , world !"), b"Hello, world!");
        assert_eq!(clean_spaces(b"a ' b"), b"a'b");
        assert_eq!(clean_spaces(b"it 's we 're I 'll"), b"it's we're I 'll");
    }

    /// A toy SentencePiece vocabulary: control tokens, the 256 byte tokens, then pieces with
    /// scores (higher merges first).
    fn spm_spec(add_space_prefix: bool) -> TokenizerSpec {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<bos>".into(), "<eos>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (t, score) in [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("llo", -5.0),
            ("hello", -6.0),
            ("\u{2581}hello", -7.0),
            ("\u{2581}w", -8.0),
            ("or", -9.0),
        ] {
            tokens.push(t.into());
            types.push(1);
            scores.push(score);
        }
        tokens.push("<start_of_turn>".into());
        types.push(3);
        scores.push(0.0);
        TokenizerSpec {
            model: "llama".into(),
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            add_bos: true,
            add_space_prefix: Some(add_space_prefix),
            ..TokenizerSpec::default()
        }
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let t = Tokenizer::from_spec(spm_spec(false)).expect("spm");
        let id = |s: &str| t.token_to_id(s).expect(s);
        // "hello" merges ll, he, llo, hello (best scores first); " w" then "or"; "l" and "d"
        // stay single; "!" is no piece: its byte token.
        assert_eq!(
            t.encode("hello world!", true, false),
            [
                1,
                id("hello"),
                id("\u{2581}w"),
                id("or"),
                id("l"),
                id("d"),
                id("<0x21>")
            ]
        );
        assert_eq!(
            t.decode(&t.encode("hello world!", false, false), false)
                .expect("decode"),
            "hello world!"
        );
        // A special token resets the space prefix only when the vocabulary asks for one.
        assert_eq!(
            t.encode("<start_of_turn>hello", false, true),
            [id("<start_of_turn>"), id("hello")]
        );
        let p = Tokenizer::from_spec(spm_spec(true)).expect("spm");
        assert_eq!(
            p.encode("<start_of_turn>hello", false, true),
            [id("<start_of_turn>"), id("\u{2581}hello")]
        );
        // The prefix space is not text: decoding drops it.
        assert_eq!(
            p.decode(&p.encode("hello", false, false), false)
                .expect("decode"),
            "hello"
        );
        // UTF-8 outside the vocabulary: one byte token per byte.
        assert_eq!(t.encode("é", false, false), [id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(
            t.decode(&[id("<0xC3>"), id("<0xA9>")], false)
                .expect("decode"),
            "é"
        );
    }
}
