//! Pre-tokenisation: splitting text into words before BPE, as llama.cpp does.
//!
//! llama.cpp runs a list of patterns one after another; each pattern splits every piece the
//! previous one left (matches and the gaps between them both become pieces), so no later piece
//! crosses an earlier boundary. Two patterns have hand-written splitters in llama.cpp whose
//! behaviour we copy exactly (GPT-2's and Llama-3's). The others run through a regex engine on
//! a "collapsed" text in which every non-ASCII code point is replaced by a stand-in for its
//! class (letter, number, punctuation, mark, symbol, whitespace, other) and `\p{..}` classes in
//! the pattern are rewritten to match those stand-ins. We do the same with fancy-regex, which,
//! like the ECMAScript engine llama.cpp uses, is a leftmost-first backtracking matcher.

use crate::TokenizerError;
use crate::unicode::{self, Flags};

/// Qwen2's pattern (Llama-3's with single digits).
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral Tekken's pattern as llama.cpp rewrites it (upper/lower case through look-aheads).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One splitting pass.
#[derive(Debug)]
enum Pass {
    /// llama.cpp's hand-written GPT-2 splitter.
    Gpt2,
    /// llama.cpp's hand-written Llama-3 splitter.
    Llama3,
    /// A pattern run on the collapsed text.
    Regex(Box<fancy_regex::Regex>),
}

/// The pre-tokeniser for one `tokenizer.ggml.pre` value.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    passes: Vec<Pass>,
    /// Whole words that are already tokens skip BPE merges (Llama-3, Tekken).
    pub(crate) ignore_merges: bool,
    /// Apply llama.cpp's "clean up tokenisation spaces" on full decodes.
    pub(crate) clean_spaces: bool,
}

impl PreTokenizer {
    /// The pre-tokeniser llama.cpp uses for `pre`, or `UnsupportedPreTokenizer`.
    pub(crate) fn new(pre: &str) -> Result<Self, TokenizerError> {
        let regex = |p: &str| -> Result<Pass, TokenizerError> {
            let collapsed = collapse_pattern(p);
            fancy_regex::Regex::new(&collapsed)
                .map(|r| Pass::Regex(Box::new(r)))
                .map_err(|e| TokenizerError::Regex {
                    pattern: p.to_owned(),
                    message: e.to_string(),
                })
        };
        let (passes, ignore_merges, clean_spaces) = match pre {
            "default" => (
                vec![
                    regex(r"[\p{P}\$\+<=>\^~\|]+")?,
                    Pass::Gpt2,
                    regex(r"\p{N}+")?,
                    regex(r"[0-9][0-9][0-9]")?,
                ],
                false,
                true,
            ),
            "smollm" | "command-r" => (vec![regex(r"\p{N}")?, Pass::Gpt2], false, false),
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => {
                (vec![regex(r"\p{N}")?, Pass::Gpt2], false, true)
            }
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => (vec![Pass::Gpt2], false, true),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
                // dbrx and smaug use Llama-3's pattern but keep BPE merges.
                let ignore = !matches!(pre, "dbrx" | "smaug-bpe");
                (vec![Pass::Llama3], ignore, true)
            }
            "qwen2" | "deepseek-r1-qwen" | "megrez" => {
                (vec![regex(QWEN2)?], false, pre == "megrez")
            }
            "stablelm2" => (vec![regex(QWEN2)?], false, true),
            "tekken" => (vec![regex(TEKKEN)?], true, false),
            other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_owned())),
        };
        Ok(PreTokenizer {
            passes,
            ignore_merges,
            clean_spaces,
        })
    }

    /// Splits `text` into words (as sub-slices, in order, covering all of `text`).
    pub(crate) fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        if text.is_empty() {
            return Vec::new();
        }
        let cpts: Vec<u32> = text.chars().map(u32::from).collect();
        let mut lengths = vec![cpts.len()];
        let mut collapsed: Option<(String, Vec<usize>)> = None;
        for pass in &self.passes {
            lengths = match pass {
                Pass::Gpt2 => split_gpt2(&cpts, &lengths),
                Pass::Llama3 => split_llama3(&cpts, &lengths),
                Pass::Regex(re) => {
                    let (ctext, starts) = collapsed.get_or_insert_with(|| collapse_text(&cpts));
                    split_regex(re, ctext, starts, &lengths)
                }
            };
        }
        // Code point lengths back to byte slices.
        let mut words = Vec::with_capacity(lengths.len());
        let mut chars = text
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()));
        let mut start_byte = chars.next().unwrap_or(0);
        for len in lengths {
            let mut end_byte = start_byte;
            for _ in 0..len {
                end_byte = chars.next().unwrap_or(text.len());
            }
            if let Some(word) = text.get(start_byte..end_byte) {
                words.push(word);
            }
            start_byte = end_byte;
        }
        words
    }
}

/// Stand-in characters for non-ASCII code points in the collapsed text.
const STAND_IN_NUMBER: char = '\u{D1}';
const STAND_IN_LETTER: char = '\u{D2}';
const STAND_IN_PUNCTUATION: char = '\u{D3}';
const STAND_IN_MARK: char = '\u{D4}';
const STAND_IN_SYMBOL: char = '\u{D5}';
const STAND_IN_OTHER: char = '\u{D0}';

/// The collapsed text and the byte offset of each code point in it (plus its length).
fn collapse_text(cpts: &[u32]) -> (String, Vec<usize>) {
    let mut s = String::with_capacity(cpts.len() * 2);
    let mut starts = Vec::with_capacity(cpts.len() + 1);
    for &cp in cpts {
        starts.push(s.len());
        let c = if cp < 0x80 {
            char::from_u32(cp).unwrap_or(STAND_IN_OTHER)
        } else {
            let f = unicode::flags(cp);
            if f.whitespace {
                '\u{0B}'
            } else {
                match f.class {
                    unicode::NUMBER => STAND_IN_NUMBER,
                    unicode::LETTER => STAND_IN_LETTER,
                    unicode::PUNCTUATION => STAND_IN_PUNCTUATION,
                    unicode::MARK => STAND_IN_MARK,
                    unicode::SYMBOL => STAND_IN_SYMBOL,
                    _ => STAND_IN_OTHER,
                }
            }
        };
        s.push(c);
    }
    starts.push(s.len());
    (s, starts)
}

/// Members of a collapsed class: the stand-in plus the ASCII characters (with ranges) in `ascii`.
fn class_members(stand_in: char, ascii: &str) -> String {
    let mut out = format!("\\x{{{:X}}}", stand_in as u32);
    for c in ascii.chars() {
        // '-' stays a range operator; escape what is special inside a class.
        if matches!(c, '[' | ']' | '\\' | '^' | '&' | '~') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Rewrites `\p{..}` classes to match the stand-ins, as llama.cpp does for its collapsed text.
fn collapse_pattern(pattern: &str) -> String {
    // ASCII members of each class, as ranges; '-' separates range ends.
    let number = class_members(STAND_IN_NUMBER, "0-9");
    let letter = class_members(STAND_IN_LETTER, "A-Za-z");
    let punct = class_members(STAND_IN_PUNCTUATION, "!-#%-*,-/:-;?-@[-]_{}");
    let mark = class_members(STAND_IN_MARK, "");
    let symbol = class_members(STAND_IN_SYMBOL, "$+<->^`|");
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut rest = pattern;
    let mut prev_backslash = false;
    while let Some(c) = rest.chars().next() {
        if c == '\\'
            && !prev_backslash
            && rest.starts_with("\\p{")
            && let Some(close) = rest.find('}')
        {
            let name = rest.get(3..close).unwrap_or("");
            let members = match name {
                "N" => Some(&number),
                "L" | "Lu" | "Ll" | "Lt" | "Lm" | "Lo" => Some(&letter),
                "P" => Some(&punct),
                "M" => Some(&mark),
                "S" => Some(&symbol),
                _ => None,
            };
            if let Some(m) = members {
                if inside {
                    out.push_str(m);
                } else {
                    out.push('[');
                    out.push_str(m);
                    out.push(']');
                }
                rest = rest.get(close + 1..).unwrap_or("");
                prev_backslash = false;
                continue;
            }
        }
        if c == '[' && !prev_backslash {
            inside = true;
        } else if c == ']' && !prev_backslash {
            inside = false;
        }
        prev_backslash = c == '\\' && !prev_backslash;
        out.push(c);
        rest = rest.get(c.len_utf8()..).unwrap_or("");
    }
    out
}

/// Splits each piece by regex matches; matches and the gaps between them become pieces.
fn split_regex(
    re: &fancy_regex::Regex,
    ctext: &str,
    starts: &[usize],
    lengths: &[usize],
) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut cp_start = 0usize;
    for &len in lengths {
        let cp_end = cp_start + len;
        let (Some(&b0), Some(&b1)) = (starts.get(cp_start), starts.get(cp_end)) else {
            out.push(len);
            cp_start = cp_end;
            continue;
        };
        let piece = ctext.get(b0..b1).unwrap_or("");
        // Byte offset within the piece -> code point index within the piece.
        let to_cp = |byte: usize| -> usize {
            match starts.get(cp_start..=cp_end) {
                Some(s) => s.partition_point(|&x| x < b0 + byte),
                None => 0,
            }
        };
        let mut last = 0usize;
        for m in re.find_iter(piece) {
            let Ok(m) = m else {
                // Backtracking limit hit: keep the rest of the piece whole.
                break;
            };
            let (ms, me) = (to_cp(m.start()), to_cp(m.end()));
            if ms > last {
                out.push(ms - last);
            }
            if me > ms {
                out.push(me - ms);
            }
            last = me;
        }
        if len > last {
            out.push(len - last);
        }
        cp_start = cp_end;
    }
    out
}

/// Cursor over one piece of code points, giving "nothing" outside it, like llama.cpp's helpers.
struct Piece<'a> {
    cpts: &'a [u32],
    ini: usize,
    end: usize,
}

const OUT_OF_RANGE: u32 = u32::MAX;

impl Piece<'_> {
    fn cpt(&self, pos: usize) -> u32 {
        if self.ini <= pos && pos < self.end {
            self.cpts.get(pos).copied().unwrap_or(OUT_OF_RANGE)
        } else {
            OUT_OF_RANGE
        }
    }

    /// The length (2 or 3) of the English contraction `'s 't 'm 'd 're 've 'll` at `pos`, or 0;
    /// `any_case` also takes upper-case letters (Llama-3's `(?i:...)`).
    fn contraction(&self, pos: usize, any_case: bool) -> usize {
        if self.cpt(pos) != u32::from('\'') || pos + 1 >= self.end {
            return 0;
        }
        let fold = |c: u32| {
            if any_case && (u32::from('A')..=u32::from('Z')).contains(&c) {
                c + 32
            } else {
                c
            }
        };
        let next = fold(self.cpt(pos + 1));
        if [b's', b't', b'm', b'd']
            .iter()
            .any(|&c| next == u32::from(c))
        {
            return 2;
        }
        if pos + 2 < self.end {
            let next2 = fold(self.cpt(pos + 2));
            let pair = |a: u8, b: u8| next == u32::from(a) && next2 == u32::from(b);
            if pair(b'r', b'e') || pair(b'v', b'e') || pair(b'l', b'l') {
                return 3;
            }
        }
        0
    }

    /// Where the piece at `pos` ends when it begins with `n_ws` whitespace code points (none
    /// matched a rule before): `\s+(?!\S)` leaves the last one to the word that follows,
    /// `\s+` takes them all, and anything else is one code point on its own.
    fn whitespace_end(&self, pos: usize, n_ws: usize) -> usize {
        if n_ws > 1 && self.cpt(pos + n_ws) != OUT_OF_RANGE {
            pos + n_ws - 1
        } else if n_ws > 0 {
            pos + n_ws
        } else {
            pos + 1
        }
    }

    fn flags(&self, pos: usize) -> Flags {
        if self.ini <= pos && pos < self.end {
            self.cpts
                .get(pos)
                .map_or(Flags::NONE, |&c| unicode::flags(c))
        } else {
            Flags::NONE
        }
    }
}

/// Runs `split` over each piece (`lengths` are consecutive runs of `cpts`) and returns the
/// lengths it emitted, in order.
fn split_pieces(
    cpts: &[u32],
    lengths: &[usize],
    mut split: impl FnMut(&Piece<'_>, &mut Emitter<'_>),
) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0usize;
    for &len in lengths {
        let piece = Piece {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut em = Emitter {
            out: &mut out,
            prev_end: piece.ini,
        };
        split(&piece, &mut em);
    }
    out
}

/// Emits pieces of a split; zero-length pieces are dropped.
struct Emitter<'o> {
    out: &'o mut Vec<usize>,
    prev_end: usize,
}

impl Emitter<'_> {
    fn add(&mut self, end: usize) -> usize {
        let len = end.saturating_sub(self.prev_end);
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2(cpts: &[u32], lengths: &[usize]) -> Vec<usize> {
    split_pieces(cpts, lengths, |p, em| {
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);
            let n = p.contraction(pos, false);
            if n > 0 {
                pos += em.add(pos + n);
                continue;
            }
            let is_space = cpt == u32::from(' ');
            let mut f2 = if is_space { p.flags(pos + 1) } else { flags };
            if f2.is_letter() {
                pos += usize::from(is_space);
                while f2.is_letter() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                em.add(pos);
                continue;
            }
            if f2.is_number() {
                pos += usize::from(is_space);
                while f2.is_number() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                em.add(pos);
                continue;
            }
            let other = |f: Flags| !(f.whitespace || f.is_letter() || f.is_number()) && f.is_any();
            if other(f2) {
                pos += usize::from(is_space);
                while other(f2) {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                em.add(pos);
                continue;
            }
            let mut n_ws = 0usize;
            while p.flags(pos + n_ws).whitespace {
                n_ws += 1;
            }
            pos = p.whitespace_end(pos, n_ws);
            em.add(pos);
        }
    })
}

/// Llama-3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
fn split_llama3(cpts: &[u32], lengths: &[usize]) -> Vec<usize> {
    let is_crlf = |c: u32| c == u32::from('\r') || c == u32::from('\n');
    split_pieces(cpts, lengths, |p, em| {
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);
            let n = p.contraction(pos, true);
            if n > 0 {
                pos += em.add(pos + n);
                continue;
            }
            if !(is_crlf(cpt) || flags.is_number())
                && (flags.is_letter() || p.flags(pos + 1).is_letter())
            {
                pos += 1;
                while p.flags(pos).is_letter() {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }
            if flags.is_number() {
                let mut ini = pos;
                while p.flags(pos).is_number() {
                    pos += 1;
                    if pos - ini >= 3 {
                        em.add(pos);
                        ini = pos;
                    }
                }
                em.add(pos);
                continue;
            }
            let mut f2 = if cpt == u32::from(' ') {
                p.flags(pos + 1)
            } else {
                flags
            };
            let not_wln = |f: Flags| !(f.whitespace || f.is_letter() || f.is_number());
            // llama.cpp tests the current code point's flags here, the next one's in the loop.
            if not_wln(f2) && flags.is_any() {
                pos += usize::from(cpt == u32::from(' '));
                while not_wln(f2) && f2.is_any() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                while is_crlf(p.cpt(pos)) {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }
            let mut n_ws = 0usize;
            let mut last_crlf_end = 0usize;
            while p.flags(pos + n_ws).whitespace {
                if is_crlf(p.cpt(pos + n_ws)) {
                    last_crlf_end = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            if last_crlf_end > 0 {
                pos = last_crlf_end;
                em.add(pos);
                continue;
            }
            pos = p.whitespace_end(pos, n_ws);
            em.add(pos);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(pre).unwrap();
        let w = p.split(text);
        assert_eq!(w.concat(), text, "pieces must cover the text");
        w.into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn gpt2_splits_words_spaces_and_contractions() {
        assert_eq!(
            words("gpt2", "Hello world's  end!!  \n"),
            ["Hello", " world", "'s", " ", " end", "!!", "  \n"]
        );
        assert_eq!(words("gpt2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(words("gpt2", "x123 45"), ["x", "123", " 45"]);
    }

    #[test]
    fn smollm_splits_every_digit_first() {
        assert_eq!(
            words("smollm", "x123 45"),
            ["x", "1", "2", "3", " ", "4", "5"]
        );
        assert_eq!(words("smollm", "a   1"), ["a", "   ", "1"]);
    }

    #[test]
    fn llama3_groups_digits_by_three_and_newlines() {
        assert_eq!(words("llama-bpe", "1234567"), ["123", "456", "7"]);
        assert_eq!(
            words("llama-bpe", "Hi\n\n  there"),
            ["Hi", "\n\n", " ", " there"]
        );
        assert_eq!(words("llama-bpe", "I'M ok"), ["I", "'M", " ok"]);
    }

    #[test]
    fn qwen2_regex_path_matches_expectations() {
        assert_eq!(words("qwen2", "abc 123"), ["abc", " ", "1", "2", "3"]);
        assert_eq!(words("qwen2", "héllo, wörld"), ["héllo", ",", " wörld"]);
        assert_eq!(words("qwen2", "a\n\nb"), ["a", "\n\n", "b"]);
    }

    #[test]
    fn tekken_splits_case_changes() {
        assert_eq!(words("tekken", "HelloWorld"), ["Hello", "World"]);
        assert_eq!(words("tekken", "ABCdef"), ["ABCdef"]);
    }

    #[test]
    fn default_pattern_runs_all_passes() {
        assert_eq!(
            words("default", "a+b=12345"),
            ["a", "+", "b", "=", "123", "45"]
        );
    }

    #[test]
    fn unknown_pre_is_a_typed_error() {
        let e = PreTokenizer::new("nonsense").unwrap_err();
        assert!(matches!(e, TokenizerError::UnsupportedPreTokenizer(ref s) if s == "nonsense"));
    }
}
