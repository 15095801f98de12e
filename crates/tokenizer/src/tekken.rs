//! Tekken, Mistral's tiktoken-style tokenizer (`tekken_*.json`).
//!
//! The file lists byte strings (base64) by rank, a pre-splitting regex and the number of
//! special tokens. Special tokens take the first ids; an ordinary token of rank `r` has id
//! `num_special_tokens + r`, and only the first `default_vocab_size - num_special_tokens` ranks
//! are used. Encoding splits the text with the regex, then runs byte-level BPE on each piece:
//! a piece that is itself a token is taken whole, otherwise the adjacent pair whose
//! concatenation has the lowest rank is merged (the leftmost on ties) until none is left.
//! Special tokens are never produced from text.

use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;
use serde::Deserialize;

use crate::mistral_error::MistralError;

/// The legacy special-token table, used when a (v7 or older) file lists none.
const LEGACY_SPECIALS: [&str; 20] = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
];

#[derive(Deserialize)]
struct FileModel {
    config: FileConfig,
    vocab: Vec<FileToken>,
    #[serde(default)]
    special_tokens: Option<Vec<FileSpecial>>,
}

#[derive(Deserialize)]
struct FileConfig {
    pattern: String,
    default_vocab_size: usize,
    default_num_special_tokens: usize,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
struct FileToken {
    rank: usize,
    token_bytes: String,
}

#[derive(Deserialize)]
struct FileSpecial {
    rank: usize,
    token_str: String,
}

/// A Tekken tokenizer.
#[derive(Debug)]
pub struct Tekken {
    /// Byte string -> rank (not id), for the ranks in use.
    ranks: HashMap<Vec<u8>, u32>,
    /// Rank -> byte string.
    bytes_of_rank: Vec<Vec<u8>>,
    /// Special token texts by id.
    specials: Vec<String>,
    special_ids: HashMap<String, u32>,
    pattern: Regex,
    version: String,
}

impl Tekken {
    /// Reads a `tekken_*.json` file's bytes.
    ///
    /// Errors: malformed JSON or base64, ranks out of order, a vocabulary smaller than the
    /// configured size, duplicate special tokens, a pattern that does not compile, a version
    /// above v7 without an explicit special-token table.
    pub fn from_json(bytes: &[u8]) -> Result<Tekken, MistralError> {
        let file: FileModel =
            serde_json::from_slice(bytes).map_err(|e| MistralError::TekkenJson(e.to_string()))?;
        let version = file
            .config
            .version
            .ok_or_else(|| MistralError::TekkenJson("config.version is missing".into()))?;
        let version_num = version_number(&version)
            .ok_or_else(|| MistralError::UnsupportedVersion(version.clone()))?;
        let num_special = file.config.default_num_special_tokens;
        let vocab_size = file.config.default_vocab_size;
        if vocab_size > file.vocab.len().saturating_add(num_special) || vocab_size < num_special {
            return Err(MistralError::InvalidModel(format!(
                "vocabulary size {vocab_size} does not fit {} tokens and {num_special} special \
                 tokens",
                file.vocab.len()
            )));
        }
        if u32::try_from(vocab_size).is_err() {
            return Err(MistralError::InvalidModel(format!(
                "vocabulary size {vocab_size}"
            )));
        }
        let listed: Vec<(usize, String)> = match file.special_tokens {
            Some(list) => list.into_iter().map(|s| (s.rank, s.token_str)).collect(),
            None if version_num > 7 => {
                return Err(MistralError::TekkenJson(format!(
                    "special_tokens is required for version {version}"
                )));
            }
            None => LEGACY_SPECIALS
                .iter()
                .enumerate()
                .map(|(i, s)| (i, (*s).to_owned()))
                .collect(),
        };
        if listed.len() > num_special {
            return Err(MistralError::InvalidModel(format!(
                "{} special tokens listed, {num_special} configured",
                listed.len()
            )));
        }
        let mut specials = vec![String::new(); num_special];
        for (i, (rank, text)) in listed.iter().enumerate() {
            if *rank != i {
                return Err(MistralError::InvalidModel(format!(
                    "special token {text:?} has rank {rank}, expected {i}"
                )));
            }
            if let Some(slot) = specials.get_mut(i) {
                slot.clone_from(text);
            }
        }
        for (i, slot) in specials.iter_mut().enumerate().skip(listed.len()) {
            *slot = format!("<SPECIAL_{i}>");
        }
        let mut special_ids = HashMap::with_capacity(num_special);
        for (i, s) in specials.iter().enumerate() {
            if special_ids.insert(s.clone(), i as u32).is_some() {
                return Err(MistralError::InvalidModel(format!(
                    "duplicate special token {s:?}"
                )));
            }
        }

        let inner = vocab_size - num_special;
        let mut ranks = HashMap::with_capacity(inner);
        let mut bytes_of_rank = Vec::with_capacity(inner);
        for (i, tok) in file.vocab.iter().take(inner).enumerate() {
            if tok.rank != i {
                return Err(MistralError::InvalidModel(format!(
                    "vocabulary entry {i} has rank {}",
                    tok.rank
                )));
            }
            let b = base64_decode(&tok.token_bytes).ok_or_else(|| {
                MistralError::TekkenJson(format!("rank {i}: bad base64 {:?}", tok.token_bytes))
            })?;
            if i < 256 && b != [i as u8] {
                return Err(MistralError::InvalidModel(format!(
                    "rank {i} must be the single byte {i}"
                )));
            }
            if ranks.insert(b.clone(), i as u32).is_some() {
                return Err(MistralError::InvalidModel(format!(
                    "duplicate byte string at rank {i}"
                )));
            }
            bytes_of_rank.push(b);
        }
        if bytes_of_rank.len() < 256.min(inner) {
            return Err(MistralError::InvalidModel(
                "fewer than 256 byte tokens".into(),
            ));
        }
        let pattern = Regex::new(&file.config.pattern)
            .map_err(|e| MistralError::InvalidModel(format!("pattern does not compile: {e}")))?;
        Ok(Tekken {
            ranks,
            bytes_of_rank,
            specials,
            special_ids,
            pattern,
            version,
        })
    }

    /// The version the file declares (`"v3"`, `"v7"`, `"v13"`, ...).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Total vocabulary size (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.specials.len() + self.bytes_of_rank.len()
    }

    /// Number of special tokens (the first ids).
    pub fn num_special_tokens(&self) -> usize {
        self.specials.len()
    }

    /// The id of a special token by its text (`"[INST]"`, `"</s>"`, ...).
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.special_ids.get(text).copied()
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        (id as usize) < self.specials.len()
    }

    /// Encodes `text` (no BOS / EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let offset = self.specials.len() as u32;
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        // Mistral's pattern matches every character, so the pieces tile the text. Text a
        // pattern skips, or leaves after a regex failure (backtracking limit), is still
        // encoded, byte-level, rather than dropped.
        let mut last = 0;
        for found in self.pattern.find_iter(text) {
            let Ok(m) = found else { break };
            if m.start() > last
                && let Some(gap) = text.get(last..m.start())
            {
                self.encode_piece(gap.as_bytes(), offset, &mut out);
            }
            self.encode_piece(m.as_str().as_bytes(), offset, &mut out);
            last = m.end();
        }
        if let Some(rest) = text.get(last..)
            && !rest.is_empty()
        {
            self.encode_piece(rest.as_bytes(), offset, &mut out);
        }
        out
    }

    fn encode_piece(&self, piece: &[u8], offset: u32, out: &mut Vec<u32>) {
        if let Some(&rank) = self.ranks.get(piece) {
            out.push(rank + offset);
            return;
        }
        for (start, end) in byte_pair_merge(piece, &self.ranks) {
            if let Some(&rank) = piece.get(start..end).and_then(|p| self.ranks.get(p)) {
                out.push(rank + offset);
            }
        }
    }

    /// The bytes of token `id` (empty for special tokens unless `keep_special`, which gives
    /// their text).
    pub fn token_bytes(&self, id: u32, keep_special: bool) -> Result<&[u8], MistralError> {
        let n = self.specials.len();
        match (id as usize).checked_sub(n) {
            None => Ok(if keep_special {
                self.specials
                    .get(id as usize)
                    .map_or(&[][..], |s| s.as_bytes())
            } else {
                &[]
            }),
            Some(rank) => self.bytes_of_rank.get(rank).map(Vec::as_slice).ok_or(
                MistralError::UnknownTokenId {
                    id,
                    vocab_size: self.vocab_size(),
                },
            ),
        }
    }

    /// Decodes ids as mistral-common does: runs of ordinary tokens are decoded as UTF-8 with
    /// U+FFFD for invalid sequences; special tokens are dropped, or written as their text with
    /// `keep_special`.
    ///
    /// Errors: an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String, MistralError> {
        let mut text = String::new();
        let mut run: Vec<u8> = Vec::new();
        for &id in ids {
            if self.is_special(id) {
                text.push_str(&String::from_utf8_lossy(&run));
                run.clear();
                if keep_special {
                    text.push_str(self.specials.get(id as usize).map_or("", String::as_str));
                }
            } else {
                run.extend_from_slice(self.token_bytes(id, false)?);
            }
        }
        text.push_str(&String::from_utf8_lossy(&run));
        Ok(text)
    }
}

/// tiktoken's byte-pair merge over one piece: returns the byte ranges of the final parts.
fn byte_pair_merge(piece: &[u8], ranks: &HashMap<Vec<u8>, u32>) -> Vec<(usize, usize)> {
    let n = piece.len();
    let mut parts: Vec<Part> = (0..n)
        .map(|i| Part {
            start: i,
            end: i + 1,
            prev: i.checked_sub(1),
            next: if i + 1 < n { Some(i + 1) } else { None },
        })
        .collect();
    let rank_of = |s: usize, e: usize| piece.get(s..e).and_then(|b| ranks.get(b)).copied();
    let mut heap = BinaryHeap::new();
    for i in 1..n {
        if let Some(rank) = rank_of(i - 1, i + 1) {
            heap.push(Pair {
                rank,
                left: i - 1,
                len: 2,
            });
        }
    }
    while let Some(top) = heap.pop() {
        let Some(&l) = parts.get(top.left) else {
            continue;
        };
        let Some(right) = l.next else { continue };
        let Some(&r) = parts.get(right) else { continue };
        if l.start == l.end || r.end - l.start != top.len {
            continue;
        }
        if let Some(p) = parts.get_mut(top.left) {
            p.end = r.end;
            p.next = r.next;
        }
        if let Some(p) = parts.get_mut(right) {
            p.end = p.start;
        }
        if let Some(next) = r.next
            && let Some(p) = parts.get_mut(next)
        {
            p.prev = Some(top.left);
        }
        if let Some(prev) = l.prev
            && let Some(&pp) = parts.get(prev)
            && let Some(rank) = rank_of(pp.start, r.end)
        {
            heap.push(Pair {
                rank,
                left: prev,
                len: r.end - pp.start,
            });
        }
        if let Some(next) = r.next
            && let Some(&np) = parts.get(next)
            && let Some(rank) = rank_of(l.start, np.end)
        {
            heap.push(Pair {
                rank,
                left: top.left,
                len: np.end - l.start,
            });
        }
    }
    let mut out = Vec::new();
    let mut at = if n == 0 { None } else { Some(0) };
    while let Some(i) = at {
        let Some(p) = parts.get(i) else { break };
        out.push((p.start, p.end));
        at = p.next;
    }
    out
}

#[derive(Clone, Copy, Debug)]
struct Part {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A queued merge: lowest rank first, then the leftmost.
#[derive(Debug, PartialEq, Eq)]
struct Pair {
    rank: u32,
    left: usize,
    len: usize,
}

lowest_rank_first!(Pair);

/// Standard base64 (with or without padding); `None` on any other character.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in s.trim_end_matches('=').as_bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The numeric part of a version string mistral-common knows (`"v15"` -> 15).
pub(crate) fn version_number(s: &str) -> Option<u32> {
    match s {
        "v1" | "v2" | "v3" | "v7" | "v11" | "v13" | "v15" => s.get(1..)?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in b.chunks(3) {
            let v = chunk
                .iter()
                .enumerate()
                .fold(0u32, |a, (i, &x)| a | u32::from(x) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                s.push(T[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
            for _ in chunk.len()..3 {
                s.push('=');
            }
        }
        s
    }

    fn toy(extra: &[&[u8]], num_special: usize) -> Tekken {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        vocab.extend(extra.iter().map(|e| e.to_vec()));
        let entries: Vec<serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, b)| serde_json::json!({"rank": i, "token_bytes": b64(b), "token_str": null}))
            .collect();
        let doc = serde_json::json!({
            "config": {
                "pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|\s+",
                "num_vocab_tokens": vocab.len(),
                "default_vocab_size": vocab.len() + num_special,
                "default_num_special_tokens": num_special,
                "version": "v3"
            },
            "vocab": entries,
        });
        Tekken::from_json(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn base64_round_trips() {
        for b in [&b""[..], b"a", b"ab", b"abc", b"\x00\xff\x10 z"] {
            assert_eq!(base64_decode(&b64(b)).unwrap(), b);
        }
        assert!(base64_decode("a*").is_none());
    }

    #[test]
    fn merges_lowest_rank_first_and_offsets_ids() {
        // ranks: 256 "ab", 257 "bc", 258 "abc"
        let t = toy(&[b"ab", b"bc", b"abc"], 20);
        assert_eq!(t.encode("abc"), [258 + 20]);
        // "bcab": "bc" (257) and "ab" (256): "ab" first, then "bc" stays.
        assert_eq!(t.encode("bcab"), [257 + 20, 256 + 20]);
        assert_eq!(t.encode("x"), [u32::from(b'x') + 20]);
        assert_eq!(t.decode(&[1, 278, 2], false).unwrap(), "abc");
        assert_eq!(t.decode(&[1, 278], true).unwrap(), "<s>abc");
        assert_eq!(t.special_id("[INST]"), Some(3));
        assert_eq!(t.special_id("<SPECIAL_19>"), None);
        assert!(t.decode(&[100_000], false).is_err());
    }

    #[test]
    fn bad_files_are_errors() {
        for bad in [
            "",
            "{}",
            r#"{"config":{"pattern":"(","default_vocab_size":1,"default_num_special_tokens":0,"version":"v3"},"vocab":[{"rank":0,"token_bytes":"AA==","token_str":null}]}"#,
            r#"{"config":{"pattern":"a","default_vocab_size":5,"default_num_special_tokens":0,"version":"v3"},"vocab":[]}"#,
            r#"{"config":{"pattern":"a","default_vocab_size":0,"default_num_special_tokens":0,"version":"v99"},"vocab":[]}"#,
        ] {
            assert!(Tekken::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
