//! Incremental detokenisation for streaming.

use crate::Tokenizer;

/// Turns token ids into text one at a time, never emitting part of a UTF-8 character.
///
/// Bytes that cannot start or continue a valid character are emitted as U+FFFD as soon as that
/// is certain, so the concatenation of everything [`push`](Self::push) and
/// [`finish`](Self::finish) return equals a lossy decode of all the token bytes at once.
/// Unlike [`Tokenizer::decode`] it never drops a leading BOS / trailing EOS nor cleans up
/// spaces: those need the whole sequence.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder; with `skip_special`, control and unknown tokens produce no text.
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder {
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds token `id` and returns the text that is now complete (possibly empty). Ids outside
    /// the vocabulary produce no text.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if let Ok(bytes) = tok.piece_bytes(id, self.skip_special) {
            self.pending.extend_from_slice(bytes);
        }
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    let (good, tail) = rest.split_at(valid);
                    // `good` is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(good));
                    match e.error_len() {
                        // An invalid sequence: it can never become valid.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = tail.get(n..).unwrap_or(&[]);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Returns whatever is left, with an incomplete character replaced by U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
