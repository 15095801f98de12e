//! SentencePiece BPE models (`tokenizer.model`, as Mistral ships them), encoding and decoding as
//! the `sentencepiece` library does.
//!
//! The `.model` file is a `ModelProto` protobuf; a small reader below takes the fields that
//! matter (pieces with score and type, the trainer's model type, byte fallback and special ids,
//! the normaliser's dummy prefix and whitespace handling). Encoding: normalise (spaces become
//! `▁`, a `▁` is prepended), split into characters (user-defined pieces are matched whole and
//! never merged), merge the adjacent pair whose concatenation is the best-scoring piece until
//! none is left, then map each symbol to its id, or to `<0xXX>` byte pieces when it is not in
//! the vocabulary. Control pieces (`<s>`, `[INST]`, ...) are never produced from text.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::mistral_error::MistralError;

/// A piece's type, as `ModelProto.SentencePiece.Type` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PieceType {
    /// Ordinary vocabulary piece.
    Normal,
    /// The unknown piece (`<unk>`).
    Unknown,
    /// Control piece (`<s>`, `</s>`, `[INST]`, ...): never produced from text, decodes to nothing.
    Control,
    /// User-defined piece: matched whole in the input text.
    UserDefined,
    /// Unused piece: merged through, then split back into its parts.
    Unused,
    /// Byte piece `<0xXX>`, used by byte fallback.
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<PieceType> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry.
#[derive(Clone, Debug)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceType,
}

/// The `unk_surface` default: " ⁇ ".
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";
/// The whitespace symbol.
const SPACE: char = '\u{2581}';

/// A SentencePiece BPE tokenizer read from a `.model` file.
#[derive(Debug)]
pub struct SentencePieceBpe {
    pieces: Vec<Piece>,
    /// Normal, user-defined and unused pieces: the ones encoding may produce by merging.
    mergeable: HashMap<String, u32>,
    /// Every piece text, including control, unknown and byte pieces.
    all: HashMap<String, u32>,
    /// User-defined pieces, longest first, for matching in the input.
    user_defined: Vec<String>,
    /// Id of the `<0xXX>` piece for each byte (256 entries).
    byte_ids: Vec<Option<u32>>,
    unk_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    unk_surface: String,
}

/// Fields read from the protobuf before validation.
#[derive(Default)]
struct RawModel {
    pieces: Vec<Piece>,
    model_type: Option<u64>,
    byte_fallback: bool,
    unk_id: Option<i64>,
    bos_id: Option<i64>,
    eos_id: Option<i64>,
    pad_id: Option<i64>,
    treat_whitespace_as_suffix: bool,
    unk_surface: Option<String>,
    precompiled_charsmap_len: usize,
    add_dummy_prefix: Option<bool>,
    remove_extra_whitespaces: Option<bool>,
    escape_whitespaces: Option<bool>,
}

impl SentencePieceBpe {
    /// Reads a serialised `ModelProto` (the bytes of a `tokenizer.model` file).
    ///
    /// Errors: malformed protobuf, a model type other than BPE, a precompiled normalisation
    /// table (only identity normalisation is implemented), duplicate pieces, special ids out
    /// of range.
    pub fn from_bytes(bytes: &[u8]) -> Result<SentencePieceBpe, MistralError> {
        let raw = parse_model(bytes)?;
        // ModelProto.TrainerSpec.ModelType: UNIGRAM = 1 (the default), BPE = 2.
        let model_type = raw.model_type.unwrap_or(1);
        if model_type != 2 {
            return Err(MistralError::UnsupportedModel(format!(
                "SentencePiece model type {model_type} (only BPE, type 2, is implemented)"
            )));
        }
        if raw.precompiled_charsmap_len > 0 {
            return Err(MistralError::UnsupportedModel(
                "SentencePiece normaliser with a precompiled character map (only identity \
                 normalisation is implemented)"
                    .into(),
            ));
        }
        if raw.treat_whitespace_as_suffix {
            return Err(MistralError::UnsupportedModel(
                "SentencePiece treat_whitespace_as_suffix".into(),
            ));
        }
        let n = raw.pieces.len();
        if n == 0 {
            return Err(MistralError::InvalidModel("no pieces".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(MistralError::InvalidModel(format!("{n} pieces")));
        }
        let mut mergeable = HashMap::with_capacity(n);
        let mut all = HashMap::with_capacity(n);
        let mut byte_ids = vec![None; 256];
        let mut user_defined = Vec::new();
        for (i, p) in raw.pieces.iter().enumerate() {
            let id = i as u32;
            if all.insert(p.text.clone(), id).is_some() {
                return Err(MistralError::InvalidModel(format!(
                    "duplicate piece {:?}",
                    p.text
                )));
            }
            match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    mergeable.insert(p.text.clone(), id);
                }
                PieceType::Byte => {
                    let byte = p
                        .text
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| {
                            MistralError::InvalidModel(format!("byte piece {:?}", p.text))
                        })?;
                    if let Some(slot) = byte_ids.get_mut(usize::from(byte)) {
                        *slot = Some(id);
                    }
                }
                PieceType::Control | PieceType::Unknown => {}
            }
            if p.kind == PieceType::UserDefined && !p.text.is_empty() {
                user_defined.push(p.text.clone());
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let id_of =
            |role: &str, v: Option<i64>, default: i64| -> Result<Option<u32>, MistralError> {
                let v = v.unwrap_or(default);
                if v < 0 {
                    return Ok(None);
                }
                match u32::try_from(v) {
                    Ok(id) if (id as usize) < n => Ok(Some(id)),
                    _ => Err(MistralError::InvalidModel(format!(
                        "{role} id {v} out of range ({n} pieces)"
                    ))),
                }
            };
        let unk_id = id_of("unk", raw.unk_id, 0)?
            .ok_or_else(|| MistralError::InvalidModel("no unknown piece".into()))?;
        if raw.pieces.get(unk_id as usize).map(|p| p.kind) != Some(PieceType::Unknown) {
            return Err(MistralError::InvalidModel(format!(
                "unk id {unk_id} is not an unknown piece"
            )));
        }
        let byte_fallback = raw.byte_fallback;
        if byte_fallback && byte_ids.iter().any(Option::is_none) {
            return Err(MistralError::InvalidModel(
                "byte_fallback without all 256 byte pieces".into(),
            ));
        }
        Ok(SentencePieceBpe {
            unk_id,
            bos_id: id_of("bos", raw.bos_id, 1)?,
            eos_id: id_of("eos", raw.eos_id, 2)?,
            pad_id: id_of("pad", raw.pad_id, -1)?,
            pieces: raw.pieces,
            mergeable,
            all,
            user_defined,
            byte_ids,
            byte_fallback,
            add_dummy_prefix: raw.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: raw.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: raw.escape_whitespaces.unwrap_or(true),
            unk_surface: raw
                .unk_surface
                .unwrap_or_else(|| DEFAULT_UNK_SURFACE.to_owned()),
        })
    }

    /// Number of pieces (the vocabulary size).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Id of the beginning-of-sequence piece, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of the end-of-sequence piece, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Id of the padding piece, if the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Id of the unknown piece.
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The id of a piece by its text (any type), as `piece_to_id` finds it.
    pub fn piece_id(&self, text: &str) -> Option<u32> {
        self.all.get(text).copied()
    }

    /// The text of piece `id` (with `▁` for spaces), if it exists.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// The type of piece `id`, if it exists.
    pub fn piece_type(&self, id: u32) -> Option<PieceType> {
        self.pieces.get(id as usize).map(|p| p.kind)
    }

    /// Whether piece `id` is a control piece.
    pub fn is_control(&self, id: u32) -> bool {
        self.piece_type(id) == Some(PieceType::Control)
    }

    /// Encodes `text` (no BOS / EOS), as `SentencePieceProcessor.encode` does.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut out = Vec::with_capacity(normalized.len() / 3 + 1);
        if normalized.is_empty() {
            return out;
        }
        let symbols = self.initial_symbols(&normalized);
        let mut rev_merge = HashMap::new();
        let merged = self.merge(&normalized, symbols, &mut rev_merge);
        let mut prev_unk = false;
        for (start, end) in merged {
            let Some(piece) = normalized.get(start..end) else {
                continue;
            };
            let mut segments = Vec::new();
            self.resegment(piece, &rev_merge, &mut segments);
            for seg in segments {
                match self.mergeable.get(seg) {
                    Some(&id) => {
                        out.push(id);
                        prev_unk = false;
                    }
                    None if self.byte_fallback => {
                        for b in seg.bytes() {
                            if let Some(Some(id)) = self.byte_ids.get(usize::from(b)) {
                                out.push(*id);
                            }
                        }
                        prev_unk = false;
                    }
                    None => {
                        // Consecutive unknown symbols become one unknown piece.
                        if !prev_unk {
                            out.push(self.unk_id);
                        }
                        prev_unk = true;
                    }
                }
            }
        }
        out
    }

    /// Identity normalisation: optional whitespace cleanup, `▁` for spaces, the dummy prefix.
    fn normalize(&self, text: &str) -> String {
        let cleaned: String;
        let text = if self.remove_extra_whitespaces {
            let mut s = String::with_capacity(text.len());
            let mut prev_space = true;
            for c in text.chars() {
                if c == ' ' {
                    if !prev_space {
                        s.push(' ');
                    }
                    prev_space = true;
                } else {
                    s.push(c);
                    prev_space = false;
                }
            }
            while s.ends_with(' ') {
                s.pop();
            }
            cleaned = s;
            cleaned.as_str()
        } else {
            text
        };
        if text.is_empty() {
            return String::new();
        }
        let mut out = String::with_capacity(text.len() + 8);
        let space = if self.escape_whitespaces { SPACE } else { ' ' };
        if self.add_dummy_prefix {
            out.push(space);
        }
        for c in text.chars() {
            out.push(if c == ' ' { space } else { c });
        }
        out
    }

    /// Splits normalised text into characters, user-defined pieces kept whole (and frozen).
    fn initial_symbols(&self, text: &str) -> Vec<Symbol> {
        let mut symbols = Vec::with_capacity(text.len());
        let mut at = 0;
        while let Some(rest) = text.get(at..) {
            let Some(c) = rest.chars().next() else {
                break;
            };
            let user = self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
                .map(String::len);
            let len = user.unwrap_or(c.len_utf8());
            symbols.push(Symbol {
                start: at,
                end: at + len,
                frozen: user.is_some(),
            });
            at += len;
        }
        symbols
    }

    /// Best-score-first merging of adjacent symbols (ties: the leftmost pair).
    fn merge<'a>(
        &self,
        text: &'a str,
        symbols: Vec<Symbol>,
        rev_merge: &mut HashMap<&'a str, (&'a str, &'a str)>,
    ) -> Vec<(usize, usize)> {
        let score = |start: usize, end: usize| -> Option<f32> {
            let piece = text.get(start..end)?;
            let &id = self.mergeable.get(piece)?;
            self.pieces.get(id as usize).map(|p| p.score)
        };
        let n = symbols.len();
        let mut live: Vec<Live> = symbols
            .iter()
            .enumerate()
            .map(|(i, s)| Live {
                start: s.start,
                end: s.end,
                frozen: s.frozen,
                prev: i.checked_sub(1),
                next: if i + 1 < n { Some(i + 1) } else { None },
            })
            .collect();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>,
                    rev_merge: &mut HashMap<&'a str, (&'a str, &'a str)>,
                    live: &[Live],
                    left: usize,
                    right: usize| {
            let (Some(l), Some(r)) = (live.get(left), live.get(right)) else {
                return;
            };
            if l.frozen || r.frozen {
                return;
            }
            if let Some(score) = score(l.start, r.end) {
                // Unused pieces are split back into the symbols that formed them.
                if let (Some(whole), Some(a), Some(b)) = (
                    text.get(l.start..r.end),
                    text.get(l.start..l.end),
                    text.get(r.start..r.end),
                ) && self
                    .mergeable
                    .get(whole)
                    .is_some_and(|&id| self.piece_type(id) == Some(PieceType::Unused))
                {
                    rev_merge.insert(whole, (a, b));
                }
                heap.push(Candidate {
                    score,
                    left,
                    right,
                    len: r.end - l.start,
                });
            }
        };
        for i in 1..n {
            push(&mut heap, rev_merge, &live, i - 1, i);
        }
        while let Some(top) = heap.pop() {
            let (Some(l), Some(r)) = (live.get(top.left), live.get(top.right)) else {
                continue;
            };
            // Stale entries: one side was merged away or grew since the pair was queued.
            if l.start == l.end || r.start == r.end || l.next != Some(top.right) {
                continue;
            }
            if r.end - l.start != top.len {
                continue;
            }
            let (new_end, right_next, left_prev) = (r.end, r.next, l.prev);
            if let Some(l) = live.get_mut(top.left) {
                l.end = new_end;
                l.next = right_next;
            }
            if let Some(r) = live.get_mut(top.right) {
                r.end = r.start;
            }
            if let Some(next) = right_next
                && let Some(s) = live.get_mut(next)
            {
                s.prev = Some(top.left);
            }
            if let Some(prev) = left_prev {
                push(&mut heap, rev_merge, &live, prev, top.left);
            }
            if let Some(next) = right_next {
                push(&mut heap, rev_merge, &live, top.left, next);
            }
        }
        let mut out = Vec::new();
        let mut at = if live.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let Some(s) = live.get(i) else { break };
            out.push((s.start, s.end));
            at = s.next;
        }
        out
    }

    /// Splits an unused piece back into the two symbols whose merge produced it (recursively);
    /// other pieces are returned as they are.
    fn resegment<'a>(
        &self,
        piece: &'a str,
        rev_merge: &HashMap<&'a str, (&'a str, &'a str)>,
        out: &mut Vec<&'a str>,
    ) {
        let unused = self
            .mergeable
            .get(piece)
            .is_some_and(|&id| self.piece_type(id) == Some(PieceType::Unused));
        match rev_merge.get(piece) {
            Some(&(a, b)) if unused => {
                self.resegment(a, rev_merge, out);
                self.resegment(b, rev_merge, out);
            }
            _ => out.push(piece),
        }
    }

    /// Decodes ids as `SentencePieceProcessor.decode` does: control pieces vanish, `▁` becomes a
    /// space (the first piece's leading one is dropped when the model adds a dummy prefix), byte
    /// pieces are gathered and decoded as UTF-8 (each invalid byte becomes U+FFFD).
    ///
    /// Errors: an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, MistralError> {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        // Only the first piece that is not a control piece loses its leading `▁`.
        let mut first = true;
        for &id in ids {
            let piece = self
                .pieces
                .get(id as usize)
                .ok_or(MistralError::UnknownTokenId {
                    id,
                    vocab_size: self.pieces.len(),
                })?;
            let is_first = first && piece.kind != PieceType::Control;
            if piece.kind != PieceType::Control {
                first = false;
            }
            if piece.kind == PieceType::Byte {
                if let Some(b) = self
                    .byte_ids
                    .iter()
                    .position(|&x| x == Some(id))
                    .and_then(|b| u8::try_from(b).ok())
                {
                    bytes.push(b);
                }
                continue;
            }
            flush_bytes(&mut bytes, &mut text);
            match piece.kind {
                PieceType::Control => {}
                PieceType::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut p = piece.text.as_str();
                    if is_first && (self.add_dummy_prefix || self.remove_extra_whitespaces) {
                        p = p.strip_prefix(SPACE).unwrap_or(p);
                    }
                    for c in p.chars() {
                        text.push(if c == SPACE { ' ' } else { c });
                    }
                }
            }
        }
        flush_bytes(&mut bytes, &mut text);
        Ok(text)
    }
}

/// Appends byte-fallback bytes as UTF-8, one U+FFFD per byte that does not form a character.
/// A leading space produced this way is not stripped, as in sentencepiece.
fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(good).unwrap_or_default());
                text.push('\u{FFFD}');
                rest = bad.get(1..).unwrap_or(&[]);
            }
        }
    }
    bytes.clear();
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    end: usize,
    frozen: bool,
}

#[derive(Clone, Copy, Debug)]
struct Live {
    start: usize,
    end: usize,
    frozen: bool,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A queued merge: higher score first, then the leftmost.
#[derive(Debug)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal protobuf reader for ModelProto.

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the whole file, for error messages.
    base: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8], usize),
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> MistralError {
        MistralError::Protobuf {
            offset: self.base + self.pos,
            message: what.to_owned(),
        }
    }

    fn varint(&mut self) -> Result<u64, MistralError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let &b = self
                .buf
                .get(self.pos)
                .ok_or_else(|| self.err("truncated varint"))?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MistralError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err("field runs past the end"))?;
        let out = self.buf.get(self.pos..end).unwrap_or(&[]);
        self.pos = end;
        Ok(out)
    }

    /// The next field as (number, value), or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, MistralError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| self.err("length does not fit in memory"))?;
                let offset = self.base + self.pos;
                Field::Bytes(self.take(len)?, offset)
            }
            5 => {
                let b = self.take(4)?;
                let mut a = [0u8; 4];
                a.copy_from_slice(b);
                Field::Fixed32(u32::from_le_bytes(a))
            }
            t => return Err(self.err(&format!("unsupported wire type {t}"))),
        };
        Ok(Some((number, field)))
    }
}

fn sub_reader(buf: &[u8], offset: usize) -> Reader<'_> {
    Reader {
        buf,
        pos: 0,
        base: offset,
    }
}

fn utf8(b: &[u8], offset: usize) -> Result<String, MistralError> {
    String::from_utf8(b.to_vec()).map_err(|_| MistralError::Protobuf {
        offset,
        message: "string is not UTF-8".into(),
    })
}

fn parse_model(bytes: &[u8]) -> Result<RawModel, MistralError> {
    let mut raw = RawModel::default();
    let mut r = sub_reader(bytes, 0);
    while let Some((number, field)) = r.next()? {
        match (number, field) {
            (1, Field::Bytes(b, off)) => raw.pieces.push(parse_piece(b, off)?),
            (2, Field::Bytes(b, off)) => parse_trainer(b, off, &mut raw)?,
            (3, Field::Bytes(b, off)) => parse_normalizer(b, off, &mut raw)?,
            _ => {}
        }
    }
    Ok(raw)
}

fn parse_piece(b: &[u8], offset: usize) -> Result<Piece, MistralError> {
    let mut r = sub_reader(b, offset);
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((number, field)) = r.next()? {
        match (number, field) {
            (1, Field::Bytes(s, off)) => piece.text = utf8(s, off)?,
            (2, Field::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Field::Varint(t)) => {
                piece.kind = PieceType::from_proto(t).ok_or_else(|| MistralError::Protobuf {
                    offset,
                    message: format!("unknown piece type {t}"),
                })?;
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(b: &[u8], offset: usize, raw: &mut RawModel) -> Result<(), MistralError> {
    let mut r = sub_reader(b, offset);
    while let Some((number, field)) = r.next()? {
        match (number, field) {
            (3, Field::Varint(v)) => raw.model_type = Some(v),
            (24, Field::Varint(v)) => raw.treat_whitespace_as_suffix = v != 0,
            (35, Field::Varint(v)) => raw.byte_fallback = v != 0,
            // int32 fields: negative values arrive sign-extended to 64 bits.
            (40, Field::Varint(v)) => raw.unk_id = Some(i64::from(v as i32)),
            (41, Field::Varint(v)) => raw.bos_id = Some(i64::from(v as i32)),
            (42, Field::Varint(v)) => raw.eos_id = Some(i64::from(v as i32)),
            (43, Field::Varint(v)) => raw.pad_id = Some(i64::from(v as i32)),
            (44, Field::Bytes(s, off)) => raw.unk_surface = Some(utf8(s, off)?),
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(b: &[u8], offset: usize, raw: &mut RawModel) -> Result<(), MistralError> {
    let mut r = sub_reader(b, offset);
    while let Some((number, field)) = r.next()? {
        match (number, field) {
            (2, Field::Bytes(s, _)) => raw.precompiled_charsmap_len = s.len(),
            (3, Field::Varint(v)) => raw.add_dummy_prefix = Some(v != 0),
            (4, Field::Varint(v)) => raw.remove_extra_whitespaces = Some(v != 0),
            (5, Field::Varint(v)) => raw.escape_whitespaces = Some(v != 0),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf writer for hand-made models.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(number: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn model(pieces: &[(&str, f32, u64)], byte_fallback: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (text, score, kind) in pieces {
            let mut p = Vec::new();
            bytes_field(1, text.as_bytes(), &mut p);
            varint(2 << 3 | 5, &mut p);
            p.extend_from_slice(&score.to_bits().to_le_bytes());
            varint(3 << 3, &mut p);
            varint(*kind, &mut p);
            bytes_field(1, &p, &mut out);
        }
        let mut t = Vec::new();
        varint(3 << 3, &mut t);
        varint(2, &mut t);
        varint(35 << 3, &mut t);
        varint(u64::from(byte_fallback), &mut t);
        bytes_field(2, &t, &mut out);
        let mut n = Vec::new();
        varint(4 << 3, &mut n);
        varint(0, &mut n);
        bytes_field(3, &n, &mut out);
        out
    }

    fn toy() -> SentencePieceBpe {
        let mut pieces: Vec<(String, f32, u64)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
            ("[REF]".into(), 0.0, 4),
        ];
        for b in 0..=255u8 {
            pieces.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (text, score) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("▁a", -4.0),
            ("ab", -5.0),
            ("▁ab", -6.0),
            ("[", -7.0),
        ] {
            pieces.push((text.into(), score, 1));
        }
        let refs: Vec<(&str, f32, u64)> = pieces
            .iter()
            .map(|(t, s, k)| (t.as_str(), *s, *k))
            .collect();
        SentencePieceBpe::from_bytes(&model(&refs, true)).unwrap()
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let sp = toy();
        let id = |t: &str| sp.piece_id(t).unwrap();
        // "▁ab": "▁a" (-4) merges before "ab" (-5), then "▁ab".
        assert_eq!(sp.encode("ab"), [id("▁ab")]);
        // "c" is not a piece: its byte.
        assert_eq!(sp.encode("ac"), [id("▁a"), id("<0x63>")]);
        // Control text stays text; user-defined pieces are matched whole.
        assert_eq!(
            sp.encode("<s>[REF]"),
            [
                id("▁"),
                id("<0x3C>"),
                id("<0x73>"),
                id("<0x3E>"),
                id("[REF]")
            ]
        );
        assert_eq!(sp.encode(""), Vec::<u32>::new());
        assert_eq!(sp.decode(&sp.encode("ab ac")).unwrap(), "ab ac");
        assert_eq!(sp.decode(&[1, id("▁ab"), 2]).unwrap(), "ab");
        // Only the first non-control piece loses its leading space.
        assert_eq!(sp.decode(&[1, id("▁"), id("▁ab")]).unwrap(), " ab");
        assert_eq!(sp.decode(&[id("<0x63>"), id("▁ab")]).unwrap(), "c ab");
    }

    #[test]
    fn hostile_protobuf_is_an_error() {
        for bad in [
            &[0x0a, 0xff][..],
            &[0x0a, 0x05, 0x01][..],
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[0x0b][..],
        ] {
            assert!(SentencePieceBpe::from_bytes(bad).is_err(), "{bad:?}");
        }
        // A well-formed but empty model.
        assert!(SentencePieceBpe::from_bytes(&[]).is_err());
    }
}
