//! llama.cpp's GBNF grammars, converted to llguidance's Lark dialect.
//!
//! GBNF (the `grammar` parameter of llama.cpp's server) describes the output as code points:
//! `name ::= alternatives`, string literals, character classes, `.`, groups, `*` `+` `?`
//! `{m,n}` repetition and `#` comments; `root` is the start. llguidance has no GBNF front end,
//! so [`gbnf_to_lark`] rewrites a GBNF grammar as a Lark grammar with the same language.
//!
//! llguidance splits its input into lexemes greedily (a lexeme ends only when the next byte
//! cannot extend it), so a multi-character lexeme could refuse a string the grammar allows
//! (`("a" | "ab") "bc"` and `abc`). Every lexeme written here is therefore exactly one code
//! point: a literal becomes a sequence of one-character strings, a class a one-character
//! regex. A one-code-point lexeme can never be extended, so the lexer cannot cut a string
//! differently from the grammar, and the Earley parser sees the grammar as GBNF defines it.
//!
//! The parse follows llama.cpp's parser (`src/llama-grammar.cpp`): the same names, escapes
//! and line rules, the same repetition limit (2000), the last definition of a rule wins, an
//! empty literal or class (`""`, `[]`, `[^]`) matches the empty string and cannot be
//! repeated. It also accepts `{,n}` (as `{0,n}`) and left-recursive rules, which llama.cpp
//! refuses. Token references map to llguidance's: `<[id]>`, `!<[id]>` (as `<[^id]>`) and
//! `<name>`; a negated named token (`!<name>`) has no Lark form and is refused.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// The largest grammar accepted, in bytes.
const MAX_GBNF_BYTES: usize = 1 << 20;

/// The deepest nesting of groups and repetition operators accepted.
const MAX_NESTING: usize = 64;

/// The largest repetition count, as llama.cpp's `MAX_REPETITION_THRESHOLD`.
const MAX_REPETITION: u64 = 2000;

/// Why a GBNF grammar cannot be converted. Positions are 1-based; columns count characters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GbnfError {
    /// The grammar is larger than the converter accepts.
    #[error("the grammar is {bytes} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The text is not GBNF.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
        /// What was expected or found.
        message: String,
    },
    /// A `\` escape that GBNF does not define, or a malformed `\x`/`\u`/`\U`.
    #[error("line {line}, column {column}: bad escape: {message}")]
    BadEscape {
        /// Line of the backslash.
        line: usize,
        /// Column of the backslash.
        column: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A rule is referenced but never defined.
    #[error("line {line}, column {column}: undefined rule `{name}`")]
    UndefinedRule {
        /// The rule's name.
        name: String,
        /// Line of the first reference.
        line: usize,
        /// Column of the first reference.
        column: usize,
    },
    /// No rule is named `root`.
    #[error("line {line}, column {column}: the grammar has no `root` rule")]
    MissingRoot {
        /// The end of the grammar: line.
        line: usize,
        /// The end of the grammar: column.
        column: usize,
    },
    /// A repetition `{m,n}` with `m > n` or a count above 2000.
    #[error("line {line}, column {column}: bad repetition: {message}")]
    Repetition {
        /// Line of the `{`.
        line: usize,
        /// Column of the `{`.
        column: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Groups and repetition operators nested deeper than the converter accepts.
    #[error("line {line}, column {column}: nesting deeper than {max} levels")]
    TooDeep {
        /// Line where the limit was passed.
        line: usize,
        /// Column where the limit was passed.
        column: usize,
        /// The limit.
        max: usize,
    },
    /// A token reference with no llguidance form.
    #[error("line {line}, column {column}: unsupported token reference: {message}")]
    Token {
        /// Line of the reference.
        line: usize,
        /// Column of the reference.
        column: usize,
        /// Why it is refused.
        message: String,
    },
}

impl GbnfError {
    /// The (line, column) of the error, both 1-based; `None` for [`GbnfError::TooLarge`].
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            GbnfError::TooLarge { .. } => None,
            GbnfError::Syntax { line, column, .. }
            | GbnfError::BadEscape { line, column, .. }
            | GbnfError::UndefinedRule { line, column, .. }
            | GbnfError::MissingRoot { line, column }
            | GbnfError::Repetition { line, column, .. }
            | GbnfError::TooDeep { line, column, .. }
            | GbnfError::Token { line, column, .. } => Some((*line, *column)),
        }
    }
}

/// Converts a llama.cpp GBNF grammar into an llguidance Lark grammar with the same language
/// (over Unicode code points); `root` becomes `start`.
///
/// ```
/// let lark = souverain_engine::gbnf_to_lark("root ::= [0-9]+ (\",\" [0-9]+)*\n").unwrap();
/// assert!(lark.starts_with("start: "));
/// ```
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    if gbnf.len() > MAX_GBNF_BYTES {
        return Err(GbnfError::TooLarge {
            bytes: gbnf.len(),
            max: MAX_GBNF_BYTES,
        });
    }
    let mut parser = Parser {
        src: gbnf,
        pos: 0,
        rules: Vec::new(),
        index: HashMap::new(),
    };
    parser.parse()?;
    parser.check_references()?;
    let Some(&root) = parser.index.get("root") else {
        let (line, column) = line_column(gbnf, gbnf.len());
        return Err(GbnfError::MissingRoot { line, column });
    };
    Ok(emit(&parser.rules, root))
}

/// One element of a sequence.
#[derive(Debug)]
enum Term {
    /// A literal: these code points in order (never empty).
    Literal(Vec<u32>),
    /// A character class (never empty): inclusive code point ranges, maybe negated.
    Class {
        negated: bool,
        ranges: Vec<(u32, u32)>,
    },
    /// `.`: any code point.
    Any,
    /// A reference to a rule, with the byte offset of the reference.
    Ref { name: String, at: usize },
    /// A token reference.
    Token(Token),
    /// `( ... )`, with its nesting height.
    Group {
        alternatives: Vec<Vec<Term>>,
        height: usize,
    },
    /// A repeated item, `max` `None` for unbounded; with its nesting height.
    Repeat {
        item: Box<Term>,
        min: u64,
        max: Option<u64>,
        height: usize,
    },
}

impl Term {
    /// How many groups and repetitions nest inside this term, itself included.
    fn height(&self) -> usize {
        match self {
            Term::Group { height, .. } | Term::Repeat { height, .. } => *height,
            _ => 0,
        }
    }
}

/// A token reference: `<[id]>`, `!<[id]>` or `<name>`.
#[derive(Debug)]
enum Token {
    Id { id: u32, negated: bool },
    Named(String),
}

/// A rule definition: its name, alternatives and where it was (last) defined.
struct Rule {
    name: String,
    alternatives: Vec<Vec<Term>>,
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    rules: Vec<Rule>,
    index: HashMap<String, usize>,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// (line, column) of a byte offset, both 1-based; the column counts characters.
fn line_column(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = src.get(..at).unwrap_or(src);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

impl Parser<'_> {
    /// The byte at `pos + ahead`, 0 past the end (as the C parser sees its terminating NUL).
    fn peek(&self, ahead: usize) -> u8 {
        self.src
            .as_bytes()
            .get(self.pos + ahead)
            .copied()
            .unwrap_or(0)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn syntax(&self, at: usize, message: impl Into<String>) -> GbnfError {
        let (line, column) = line_column(self.src, at);
        GbnfError::Syntax {
            line,
            column,
            message: message.into(),
        }
    }

    /// What is at the current position, for messages.
    fn found(&self) -> String {
        match self.src.get(self.pos..).and_then(|s| s.chars().next()) {
            Some(c) => format!("found {c:?}"),
            None => "found the end of the grammar".into(),
        }
    }

    fn parse(&mut self) -> Result<(), GbnfError> {
        if let Some(nul) = self.src.bytes().position(|b| b == 0) {
            return Err(self.syntax(nul, "a NUL byte is not allowed in a grammar"));
        }
        self.space(true);
        while !self.at_end() {
            self.rule()?;
        }
        Ok(())
    }

    /// Skips blanks and `#` comments; newlines too when `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        loop {
            match self.peek(0) {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while !matches!(self.peek(0), 0 | b'\r' | b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn name(&mut self) -> Result<String, GbnfError> {
        let start = self.pos;
        while is_word(self.peek(0)) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.syntax(start, format!("expecting a rule name, {}", self.found())));
        }
        Ok(self.src.get(start..self.pos).unwrap_or_default().to_owned())
    }

    fn rule(&mut self) -> Result<(), GbnfError> {
        let name = self.name()?;
        self.space(false);
        if !self
            .src
            .get(self.pos..)
            .is_some_and(|s| s.starts_with("::="))
        {
            return Err(self.syntax(self.pos, format!("expecting `::=`, {}", self.found())));
        }
        self.pos += 3;
        self.space(true);
        let alternatives = self.alternatives(0, false)?;
        match self.peek(0) {
            b'\r' => self.pos += if self.peek(1) == b'\n' { 2 } else { 1 },
            b'\n' => self.pos += 1,
            0 if self.at_end() => {}
            _ => {
                return Err(self.syntax(
                    self.pos,
                    format!("expecting a newline or the end, {}", self.found()),
                ));
            }
        }
        self.space(true);
        // As in llama.cpp, a later definition of a rule replaces the earlier one.
        match self.index.get(&name) {
            Some(&i) => {
                if let Some(rule) = self.rules.get_mut(i) {
                    rule.alternatives = alternatives;
                }
            }
            None => {
                self.index.insert(name.clone(), self.rules.len());
                self.rules.push(Rule { name, alternatives });
            }
        }
        Ok(())
    }

    fn alternatives(&mut self, depth: usize, nested: bool) -> Result<Vec<Vec<Term>>, GbnfError> {
        let mut alternatives = vec![self.sequence(depth, nested)?];
        while self.peek(0) == b'|' {
            self.pos += 1;
            self.space(true);
            alternatives.push(self.sequence(depth, nested)?);
        }
        Ok(alternatives)
    }

    fn sequence(&mut self, depth: usize, nested: bool) -> Result<Vec<Term>, GbnfError> {
        let mut seq: Vec<Term> = Vec::new();
        // Whether the last element parsed is one a postfix operator may apply to.
        let mut last = false;
        loop {
            let start = self.pos;
            match self.peek(0) {
                b'"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    loop {
                        if self.at_end() {
                            return Err(
                                self.syntax(self.pos, "unexpected end of the grammar in a literal")
                            );
                        }
                        if self.peek(0) == b'"' {
                            break;
                        }
                        chars.push(self.char()?);
                    }
                    self.pos += 1;
                    self.space(nested);
                    last = !chars.is_empty();
                    if last {
                        seq.push(Term::Literal(chars));
                    }
                }
                b'[' => {
                    self.pos += 1;
                    let negated = self.peek(0) == b'^';
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        if self.at_end() {
                            return Err(self.syntax(
                                self.pos,
                                "unexpected end of the grammar in a character class",
                            ));
                        }
                        if self.peek(0) == b']' {
                            break;
                        }
                        let low = self.char()?;
                        let mut high = low;
                        if self.peek(0) == b'-' && self.peek(1) != b']' {
                            self.pos += 1;
                            if self.at_end() {
                                return Err(self.syntax(
                                    self.pos,
                                    "unexpected end of the grammar in a character class",
                                ));
                            }
                            high = self.char()?;
                        }
                        ranges.push((low, high));
                    }
                    self.pos += 1;
                    self.space(nested);
                    last = !ranges.is_empty();
                    if last {
                        seq.push(Term::Class { negated, ranges });
                    }
                }
                b'<' | b'!' => {
                    let token = self.token()?;
                    self.space(nested);
                    seq.push(Term::Token(token));
                    last = true;
                }
                b if is_word(b) => {
                    let name = self.name()?;
                    self.space(nested);
                    seq.push(Term::Ref { name, at: start });
                    last = true;
                }
                b'(' => {
                    if depth + 1 > MAX_NESTING {
                        let (line, column) = line_column(self.src, start);
                        return Err(GbnfError::TooDeep {
                            line,
                            column,
                            max: MAX_NESTING,
                        });
                    }
                    self.pos += 1;
                    self.space(true);
                    let alternatives = self.alternatives(depth + 1, true)?;
                    if self.peek(0) != b')' {
                        return Err(
                            self.syntax(self.pos, format!("expecting `)`, {}", self.found()))
                        );
                    }
                    self.pos += 1;
                    self.space(nested);
                    let height = 1 + alternatives
                        .iter()
                        .flatten()
                        .map(Term::height)
                        .max()
                        .unwrap_or(0);
                    seq.push(Term::Group {
                        alternatives,
                        height,
                    });
                    last = true;
                }
                b'.' => {
                    self.pos += 1;
                    self.space(nested);
                    seq.push(Term::Any);
                    last = true;
                }
                op @ (b'*' | b'+' | b'?' | b'{') => {
                    let (min, max) = match op {
                        b'*' => {
                            self.pos += 1;
                            (0, None)
                        }
                        b'+' => {
                            self.pos += 1;
                            (1, None)
                        }
                        b'?' => {
                            self.pos += 1;
                            (0, Some(1))
                        }
                        _ => self.braces(nested)?,
                    };
                    self.space(nested);
                    let item = match seq.pop() {
                        Some(item) if last => item,
                        _ => {
                            return Err(self.syntax(
                                start,
                                format!("expecting an item before `{}`", op as char),
                            ));
                        }
                    };
                    let height = item.height() + 1;
                    if depth + height > MAX_NESTING {
                        let (line, column) = line_column(self.src, start);
                        return Err(GbnfError::TooDeep {
                            line,
                            column,
                            max: MAX_NESTING,
                        });
                    }
                    seq.push(Term::Repeat {
                        item: Box::new(item),
                        min,
                        max,
                        height,
                    });
                }
                _ => return Ok(seq),
            }
        }
    }

    /// `{m}`, `{m,}`, `{m,n}` or `{,n}`, the `{` at the current position.
    fn braces(&mut self, nested: bool) -> Result<(u64, Option<u64>), GbnfError> {
        let open = self.pos;
        self.pos += 1;
        self.space(nested);
        let min = if self.peek(0) == b',' { 0 } else { self.int()? };
        self.space(nested);
        let max = match self.peek(0) {
            b'}' => Some(min),
            b',' => {
                self.pos += 1;
                self.space(nested);
                let max = if self.peek(0).is_ascii_digit() {
                    Some(self.int()?)
                } else {
                    None
                };
                self.space(nested);
                if self.peek(0) != b'}' {
                    return Err(self.syntax(self.pos, format!("expecting `}}`, {}", self.found())));
                }
                max
            }
            _ => {
                return Err(
                    self.syntax(self.pos, format!("expecting `,` or `}}`, {}", self.found()))
                );
            }
        };
        self.pos += 1;
        let (line, column) = line_column(self.src, open);
        let bad = |message: String| GbnfError::Repetition {
            line,
            column,
            message,
        };
        if let Some(max) = max
            && min > max
        {
            return Err(bad(format!("the minimum {min} is above the maximum {max}")));
        }
        let count = max.unwrap_or(min);
        if count > MAX_REPETITION {
            return Err(bad(format!(
                "{count} repetitions; at most {MAX_REPETITION} are allowed"
            )));
        }
        Ok((min, max))
    }

    /// A decimal integer; saturates far above any limit rather than overflowing.
    fn int(&mut self) -> Result<u64, GbnfError> {
        let start = self.pos;
        let mut value: u64 = 0;
        while self.peek(0).is_ascii_digit() {
            value = value
                .saturating_mul(10)
                .saturating_add(u64::from(self.peek(0) - b'0'));
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.syntax(start, format!("expecting an integer, {}", self.found())));
        }
        Ok(value)
    }

    /// `<[id]>`, `!<[id]>`, `<name>` or `!<name>` at the current position.
    fn token(&mut self) -> Result<Token, GbnfError> {
        let start = self.pos;
        let negated = self.peek(0) == b'!';
        if negated {
            self.pos += 1;
        }
        if self.peek(0) != b'<' {
            return Err(self.syntax(self.pos, format!("expecting `<`, {}", self.found())));
        }
        self.pos += 1;
        if self.peek(0) == b'[' {
            self.pos += 1;
            let digits = self.pos;
            let id = self.int()?;
            let id = u32::try_from(id).map_err(|_| self.syntax(digits, "token id out of range"))?;
            for close in [b']', b'>'] {
                if self.peek(0) != close {
                    return Err(self.syntax(
                        self.pos,
                        format!("expecting `{}`, {}", close as char, self.found()),
                    ));
                }
                self.pos += 1;
            }
            return Ok(Token::Id { id, negated });
        }
        let name_start = self.pos;
        while !self.at_end() && self.peek(0) != b'>' {
            self.pos += 1;
        }
        if self.at_end() {
            return Err(self.syntax(self.pos, "expecting `>`, found the end of the grammar"));
        }
        let name = self
            .src
            .get(name_start..self.pos)
            .unwrap_or_default()
            .to_owned();
        self.pos += 1;
        let (line, column) = line_column(self.src, start);
        let refuse = |message: &str| GbnfError::Token {
            line,
            column,
            message: message.to_owned(),
        };
        if negated {
            return Err(refuse("a negated named token; write it by id, `!<[id]>`"));
        }
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '<') {
            return Err(refuse(
                "a token name must be non-empty, without blanks or `<`",
            ));
        }
        Ok(Token::Named(format!("<{name}>")))
    }

    /// One character of a literal or class: an escape or a UTF-8 character.
    fn char(&mut self) -> Result<u32, GbnfError> {
        let start = self.pos;
        let Some(c) = self.src.get(self.pos..).and_then(|s| s.chars().next()) else {
            return Err(self.syntax(self.pos, "unexpected end of the grammar"));
        };
        if c != '\\' {
            self.pos += c.len_utf8();
            return Ok(u32::from(c));
        }
        let (line, column) = line_column(self.src, start);
        let bad = |message: String| GbnfError::BadEscape {
            line,
            column,
            message,
        };
        let digits = match self.peek(1) {
            b'x' => 2,
            b'u' => 4,
            b'U' => 8,
            simple @ (b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']' | b'-') => {
                self.pos += 2;
                return Ok(match simple {
                    b't' => u32::from('\t'),
                    b'r' => u32::from('\r'),
                    b'n' => u32::from('\n'),
                    other => u32::from(other),
                });
            }
            0 if self.pos + 1 >= self.src.len() => {
                return Err(bad("a backslash at the end of the grammar".into()));
            }
            _ => {
                let next = self
                    .src
                    .get(self.pos + 1..)
                    .and_then(|s| s.chars().next())
                    .unwrap_or('\0');
                return Err(bad(format!("unknown escape `\\{next}`")));
            }
        };
        let mut value: u32 = 0;
        for i in 0..digits {
            let Some(d) = char::from(self.peek(2 + i)).to_digit(16) else {
                return Err(bad(format!("expecting {digits} hex digits")));
            };
            value = (value << 4) | d;
        }
        self.pos += 2 + digits;
        Ok(value)
    }

    /// Every referenced rule must be defined.
    fn check_references(&self) -> Result<(), GbnfError> {
        fn walk<'t>(terms: &'t [Term], out: &mut Vec<(&'t str, usize)>) {
            for term in terms {
                match term {
                    Term::Ref { name, at } => out.push((name, *at)),
                    Term::Group { alternatives, .. } => {
                        alternatives.iter().for_each(|a| walk(a, out));
                    }
                    Term::Repeat { item, .. } => walk(std::slice::from_ref(item.as_ref()), out),
                    _ => {}
                }
            }
        }
        for rule in &self.rules {
            let mut refs = Vec::new();
            rule.alternatives.iter().for_each(|a| walk(a, &mut refs));
            if let Some(&(name, at)) = refs.iter().find(|(n, _)| !self.index.contains_key(*n)) {
                let (line, column) = line_column(self.src, at);
                return Err(GbnfError::UndefinedRule {
                    name: name.to_owned(),
                    line,
                    column,
                });
            }
        }
        Ok(())
    }
}

/// Lark names for the rules: `root` is `start`; the others are lowercased (Lark rules are
/// lowercase), `-` becomes `_`, prefixed with `r_` when they would not start with a letter
/// or would be `start`, and numbered when two would collide.
fn lark_names(rules: &[Rule], root: usize) -> Vec<String> {
    let mut taken: HashSet<String> = HashSet::new();
    taken.insert("start".into());
    let mut names = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        if i == root {
            names.push("start".to_owned());
            continue;
        }
        let mut base = rule.name.to_ascii_lowercase().replace('-', "_");
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) || base == "start" {
            base = format!("r_{base}");
        }
        let mut name = base.clone();
        let mut n = 2;
        while taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        taken.insert(name.clone());
        names.push(name);
    }
    names
}

/// Writes the Lark grammar: the rules reachable from `root`, `root` (as `start`) first.
/// Groups, and repeated items that are more than one lexeme or rule, become rules of their
/// own, so the output nests at most one group deep (llguidance's Lark parser limits nesting).
fn emit(rules: &[Rule], root: usize) -> String {
    let index: HashMap<&str, usize> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    let names = lark_names(rules, root);
    // Rules in the order they are first reached from the root.
    let mut order = vec![root];
    let mut seen: HashSet<usize> = HashSet::from([root]);
    let mut next = 0;
    while let Some(&r) = order.get(next) {
        next += 1;
        let mut refs = Vec::new();
        if let Some(rule) = rules.get(r) {
            collect_refs(&rule.alternatives, &mut refs);
        }
        for name in refs {
            if let Some(&i) = index.get(name)
                && seen.insert(i)
            {
                order.push(i);
            }
        }
    }
    let mut emitter = Emitter {
        lookup: rules
            .iter()
            .zip(&names)
            .map(|(r, n)| (r.name.as_str(), n.as_str()))
            .collect(),
        taken: names.iter().cloned().collect(),
        pending: Vec::new(),
        out: String::new(),
    };
    for r in order {
        let (Some(rule), Some(name)) = (rules.get(r), names.get(r)) else {
            continue;
        };
        emitter.rule(name, Body::Alternatives(&rule.alternatives));
        // The helper rules of this rule, and theirs, follow it.
        while let Some((helper, body)) = emitter.pending.pop() {
            emitter.rule(&helper, body);
        }
    }
    emitter.out
}

fn collect_refs<'t>(alternatives: &'t [Vec<Term>], out: &mut Vec<&'t str>) {
    for term in alternatives.iter().flatten() {
        collect_term_refs(term, out);
    }
}

fn collect_term_refs<'t>(term: &'t Term, out: &mut Vec<&'t str>) {
    match term {
        Term::Ref { name, .. } => out.push(name),
        Term::Group { alternatives, .. } => collect_refs(alternatives, out),
        Term::Repeat { item, .. } => collect_term_refs(item, out),
        _ => {}
    }
}

/// What a rule of the output holds.
#[derive(Clone, Copy)]
enum Body<'t> {
    Alternatives(&'t [Vec<Term>]),
    Term(&'t Term),
}

struct Emitter<'t> {
    /// GBNF rule name to Lark rule name.
    lookup: HashMap<&'t str, &'t str>,
    /// Every Lark rule name in use.
    taken: HashSet<String>,
    /// Helper rules still to write.
    pending: Vec<(String, Body<'t>)>,
    out: String,
}

impl<'t> Emitter<'t> {
    fn rule(&mut self, name: &str, body: Body<'t>) {
        self.out.push_str(name);
        self.out.push_str(": ");
        match body {
            Body::Alternatives(alternatives) => {
                for (i, seq) in alternatives.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(" | ");
                    }
                    if seq.is_empty() {
                        self.out.push_str("\"\"");
                    }
                    for (j, term) in seq.iter().enumerate() {
                        if j > 0 {
                            self.out.push(' ');
                        }
                        self.term(name, term);
                    }
                }
            }
            Body::Term(term) => self.term(name, term),
        }
        self.out.push('\n');
    }

    /// A new rule named after `base`, to be written later.
    fn helper(&mut self, base: &str, body: Body<'t>) -> String {
        let mut n = self.taken.len();
        let mut name = format!("{base}_{n}");
        while self.taken.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        self.taken.insert(name.clone());
        self.pending.push((name.clone(), body));
        name
    }

    fn term(&mut self, rule: &str, term: &'t Term) {
        match term {
            Term::Literal(chars) => {
                for (i, &c) in chars.iter().enumerate() {
                    if i > 0 {
                        self.out.push(' ');
                    }
                    write_char_lexeme(&mut self.out, c);
                }
            }
            Term::Class { negated, ranges } => write_class(&mut self.out, *negated, ranges),
            Term::Any => self.out.push_str(ANY),
            Term::Ref { name, .. } => {
                let lark = self.lookup.get(name.as_str()).copied().unwrap_or("start");
                self.out.push_str(lark);
            }
            Term::Token(Token::Id { id, negated }) => {
                let caret = if *negated { "^" } else { "" };
                let _ = write!(self.out, "<[{caret}{id}]>");
            }
            Term::Token(Token::Named(text)) => self.out.push_str(text),
            Term::Group { alternatives, .. } => {
                let name = self.helper(rule, Body::Alternatives(alternatives));
                self.out.push_str(&name);
            }
            Term::Repeat { max: Some(0), .. } => self.out.push_str("\"\""),
            Term::Repeat { item, min, max, .. } => {
                match item.as_ref() {
                    Term::Literal(chars) if chars.len() > 1 => {
                        self.out.push('(');
                        self.term(rule, item);
                        self.out.push(')');
                    }
                    Term::Literal(_)
                    | Term::Class { .. }
                    | Term::Any
                    | Term::Ref { .. }
                    | Term::Token(_) => self.term(rule, item),
                    Term::Group { alternatives, .. } => {
                        let name = self.helper(rule, Body::Alternatives(alternatives));
                        self.out.push_str(&name);
                    }
                    Term::Repeat { .. } => {
                        let name = self.helper(rule, Body::Term(item));
                        self.out.push_str(&name);
                    }
                }
                let _ = match (min, max) {
                    (0, None) => write!(self.out, "*"),
                    (1, None) => write!(self.out, "+"),
                    (0, Some(1)) => write!(self.out, "?"),
                    (m, None) => write!(self.out, "{{{m},}}"),
                    (m, Some(n)) if m == n => write!(self.out, "{{{m}}}"),
                    (m, Some(n)) => write!(self.out, "{{{m},{n}}}"),
                };
            }
        }
    }
}

/// A lexeme matching any one code point.
const ANY: &str = "/(?s:.)/";

/// A lexeme matching nothing (a code point outside Unicode's scalar values).
const NOTHING: &str = "/[^\\x{0}-\\x{10FFFF}]/";

fn is_scalar(c: u32) -> bool {
    char::from_u32(c).is_some()
}

/// One code point as a Lark string (JSON syntax).
fn write_char_lexeme(out: &mut String, c: u32) {
    let Some(ch) = char::from_u32(c) else {
        out.push_str(NOTHING);
        return;
    };
    out.push('"');
    match ch {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x20 || c == '\x7f' => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => out.push(c),
    }
    out.push('"');
}

/// A class as a one-code-point regex. Ranges are clipped to Unicode scalar values (no text
/// holds a surrogate); a reversed range matches nothing, as in llama.cpp.
fn write_class(out: &mut String, negated: bool, ranges: &[(u32, u32)]) {
    let mut parts = Vec::new();
    for &(low, high) in ranges {
        let high = high.min(0x10FFFF);
        if low > high {
            continue;
        }
        // Split around the surrogates.
        for (a, b) in [(low, high.min(0xD7FF)), (low.max(0xE000), high)] {
            if a <= b && is_scalar(a) && is_scalar(b) {
                parts.push((a, b));
            }
        }
    }
    if parts.is_empty() {
        out.push_str(if negated { ANY } else { NOTHING });
        return;
    }
    out.push_str(if negated { "/[^" } else { "/[" });
    for (a, b) in parts {
        write_regex_char(out, a);
        if b != a {
            out.push('-');
            write_regex_char(out, b);
        }
    }
    out.push_str("]/");
}

/// A code point inside a regex class: ASCII letters and digits as themselves, anything else
/// as `\x{..}` (so no character is special to the regex or to Lark's `/.../`).
fn write_regex_char(out: &mut String, c: u32) {
    match char::from_u32(c) {
        Some(ch) if ch.is_ascii_alphanumeric() => out.push(ch),
        _ => {
            let _ = write!(out, "\\x{{{c:x}}}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Whether llguidance, given the converted grammar, accepts `text` as a whole output.
    fn accepts(lark: &str, text: &str) -> bool {
        crate::lark_accepts(lark, text)
            .unwrap_or_else(|e| panic!("llguidance refuses\n{lark}\n{e}"))
    }

    /// Converts `gbnf` and checks each string's verdict.
    fn check(gbnf: &str, yes: &[&str], no: &[&str]) {
        let lark = gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf}\n{e}"));
        for s in yes {
            assert!(accepts(&lark, s), "{s:?} should match\n{gbnf}\n=>\n{lark}");
        }
        for s in no {
            assert!(
                !accepts(&lark, s),
                "{s:?} should not match\n{gbnf}\n=>\n{lark}"
            );
        }
    }

    fn err(gbnf: &str) -> GbnfError {
        match gbnf_to_lark(gbnf) {
            Ok(lark) => panic!("{gbnf:?} was accepted as\n{lark}"),
            Err(e) => e,
        }
    }

    #[test]
    fn literals_and_escapes() {
        check(r#"root ::= "ab""#, &["ab"], &["", "a", "abb", "b"]);
        check(
            r#"root ::= "\n\r\t\\\"\[\]\x41\u00e9\U0001F600""#,
            &["\n\r\t\\\"[]A\u{e9}\u{1F600}"],
            &["\n\r\t\\\"[]A\u{e9}"],
        );
        check("root ::= \"é😀\"", &["é😀"], &["é", "e😀"]);
        check(r#"root ::= "" "x" """#, &["x"], &["", "xx"]);
        check(r#"root ::= "/\"/""#, &["/\"/"], &["//"]);
        // A surrogate can never be part of text.
        check(r#"root ::= "\uD800" | "a""#, &["a"], &[""]);
    }

    #[test]
    fn classes_and_any() {
        check(
            "root ::= [a-c0-9_]",
            &["a", "c", "5", "_"],
            &["d", "", "ab", "-"],
        );
        check(
            "root ::= [^a-c\\n]",
            &["d", "é", "😀", "\r"],
            &["a", "\n", ""],
        );
        check("root ::= [a-]", &["a", "-"], &["b"]);
        check("root ::= [\\]\\[^/]", &["]", "[", "^", "/"], &["a"]);
        check("root ::= [a\\-z] \"\\-\"", &["--", "a-", "z-"], &["b-"]);
        check("root ::= [z-a] | \"q\"", &["q"], &["a", "z", "m"]);
        check("root ::= [\\x00-\\x1F]", &["\x00", "\x1f"], &[" "]);
        check(
            "root ::= [\\u0100-\\U0010FFFF]",
            &["Ā", "😀", "\u{10FFFF}"],
            &["ÿ"],
        );
        check("root ::= [^\\uD800-\\uDFFF]", &["a", "😀"], &[""]);
        check("root ::= .", &["a", "\n", "😀", "é"], &["", "ab"]);
        // As in llama.cpp, an empty class is nothing at all.
        check("root ::= \"a\" [] [^] \"b\"", &["ab"], &["a b", "axb"]);
    }

    #[test]
    fn repetition_groups_and_alternatives() {
        check("root ::= \"ab\"*", &["", "ab", "abab"], &["a", "aba"]);
        check(
            "root ::= \"a\"+ \"b\"?",
            &["a", "aa", "ab", "aab"],
            &["", "b", "abb"],
        );
        check("root ::= [0-9]{3}", &["123"], &["12", "1234"]);
        check("root ::= [0-9]{2,}", &["12", "12345"], &["1"]);
        check("root ::= [0-9]{1,3}", &["1", "123"], &["", "1234"]);
        check("root ::= [0-9]{,2}", &["", "1", "12"], &["123"]);
        check("root ::= [0-9]{ 2 , 3 }", &["12", "123"], &["1"]);
        check("root ::= \"a\"{0}", &[""], &["a"]);
        check(
            "root ::= (\"a\" | \"b\" \"c\")+ \"d\"",
            &["ad", "bcad", "abcd"],
            &["bd", "d"],
        );
        check("root ::= \"x\" | | \"y\"", &["x", "", "y"], &["xy"]);
        check("root ::= (\"a\"*)*", &["", "aaa"], &["b"]);
        // The greedy-lexer trap: a shorter alternative followed by an overlapping literal.
        check(
            "root ::= (\"a\" | \"ab\") \"bc\"",
            &["abc", "abbc"],
            &["ab", "abcc"],
        );
        check("root ::= [a-z]* \"b\"", &["b", "ab", "bbb"], &["", "ba"]);
    }

    #[test]
    fn rules_names_comments_and_lines() {
        let gbnf = "# a comment\nroot ::= item-list # trailing\n\n\
                    item-list ::= item (\",\" item)*\nitem ::=\n  Item | start | 1x | ITEM-LIST\n\
                    Item ::= \"I\"\nstart ::= \"s\"\n1x ::= \"1\"\nITEM-LIST ::= \"L\"\n\
                    unused ::= \"never\"\n";
        let lark = gbnf_to_lark(gbnf).unwrap();
        assert!(lark.starts_with("start: item_list\n"), "{lark}");
        assert!(!lark.contains("never"), "unused rules are left out: {lark}");
        for name in ["item_2:", "r_start:", "r_1x:", "item_list_2:"] {
            assert!(lark.contains(name), "{name} in {lark}");
        }
        check(gbnf, &["I", "s,1,I,L", "1"], &["", "never", "I,"]);
        // Newlines continue a rule inside parentheses and after `|` or `::=`.
        check(
            "root ::=\n (\"a\"\n  | \"b\") |\n \"c\"\r\n",
            &["a", "b", "c"],
            &["ab"],
        );
        // The last definition of a rule wins.
        check("root ::= x\nx ::= \"1\"\nx ::= \"2\"\n", &["2"], &["1"]);
        // Left recursion, which llguidance's Earley parser handles.
        check("root ::= root \"a\" | \"b\"", &["b", "baa"], &["a"]);
    }

    #[test]
    fn tokens() {
        let lark = gbnf_to_lark("root ::= <[12]> !<[7]> <|im_end|>").unwrap();
        assert_eq!(lark, "start: <[12]> <[^7]> <|im_end|>\n");
        assert!(matches!(
            err("root ::= !<|x|>"),
            GbnfError::Token {
                line: 1,
                column: 10,
                ..
            }
        ));
        assert!(matches!(err("root ::= <a b>"), GbnfError::Token { .. }));
        assert!(matches!(
            err("root ::= <[99999999999]>"),
            GbnfError::Syntax { .. }
        ));
        assert!(matches!(err("root ::= <[1>"), GbnfError::Syntax { .. }));
        assert!(matches!(err("root ::= !x"), GbnfError::Syntax { .. }));
        assert!(matches!(err("root ::= <abc"), GbnfError::Syntax { .. }));
    }

    fn at(e: &GbnfError) -> (usize, usize) {
        e.position().unwrap()
    }

    #[test]
    fn errors_carry_their_position() {
        let e = err("root ::= \"a\"\nx ::= y\n");
        assert_eq!(
            e,
            GbnfError::UndefinedRule {
                name: "y".into(),
                line: 2,
                column: 7
            }
        );
        assert_eq!(e.to_string(), "line 2, column 7: undefined rule `y`");
        assert!(matches!(
            err("x ::= \"a\"\n"),
            GbnfError::MissingRoot { line: 2, column: 1 }
        ));
        assert!(matches!(err(""), GbnfError::MissingRoot { .. }));
        let e = err("root ::= \"a\\q\"");
        assert!(
            matches!(e, GbnfError::BadEscape { .. }) && at(&e) == (1, 12),
            "{e}"
        );
        let e = err("root ::= [\\x4]");
        assert!(
            matches!(e, GbnfError::BadEscape { .. }) && at(&e) == (1, 11),
            "{e}"
        );
        assert!(matches!(err("root ::= \"a\\"), GbnfError::BadEscape { .. }));
        let e = err("root ::= \"é\" [0-9]{3,2}");
        assert!(
            matches!(e, GbnfError::Repetition { .. }) && at(&e) == (1, 19),
            "{e}"
        );
        assert!(matches!(
            err("root ::= \"a\"{2001}"),
            GbnfError::Repetition { .. }
        ));
        assert!(matches!(
            err("root ::= \"a\"{3,99999999999999999999999}"),
            GbnfError::Repetition { .. }
        ));
        assert!(gbnf_to_lark("root ::= \"a\"{2000}").is_ok());
        for (bad, pos) in [
            ("root ::= \"abc", (1, 14)),
            ("root ::= [abc", (1, 14)),
            ("root ::= (\"a\"", (1, 14)),
            ("root ::= \"a\" )", (1, 14)),
            ("root = \"a\"", (1, 6)),
            ("root\n::= \"a\"", (1, 5)),
            ("root ::= *", (1, 10)),
            ("root ::= \"\"*", (1, 12)),
            ("root ::= []+", (1, 12)),
            ("root ::= \"a\"{x}", (1, 14)),
            ("root ::= \"a\"{1;}", (1, 15)),
            ("root ::= \"a\"{1,2", (1, 17)),
            ("root ::= \"a\"\n  | \"b\"", (2, 3)),
            ("root ::= \"a\"\x0b", (1, 13)),
            ("root ::= \"a\"\0", (1, 13)),
        ] {
            let e = err(bad);
            assert!(matches!(e, GbnfError::Syntax { .. }), "{bad:?}: {e:?}");
            assert_eq!(at(&e), pos, "{bad:?}: {e}");
        }
    }

    #[test]
    fn limits_are_errors_not_crashes() {
        let big = format!("root ::= \"{}\"", "a".repeat(MAX_GBNF_BYTES));
        assert!(matches!(err(&big), GbnfError::TooLarge { .. }));
        let deep = format!(
            "root ::= {}\"a\"{}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        assert!(matches!(err(&deep), GbnfError::TooDeep { .. }));
        let stars = format!("root ::= \"a\"{}", "*".repeat(100_000));
        assert!(matches!(err(&stars), GbnfError::TooDeep { .. }));
        let ok = format!("root ::= {}\"a\"{}", "(".repeat(20), ")*".repeat(20));
        check(&ok, &["", "aa"], &["b"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_on_any_text(s in "\\PC*") {
            let _ = gbnf_to_lark(&s);
        }

        #[test]
        fn never_panics_on_grammar_like_text(
            s in "(root ::= |[a-z-]{1,3} ::= |[\"\\[\\]()|*+?{},.^#<>!\\\\xuU0-9a-f -]|\n|é|😀){0,60}"
        ) {
            if let Ok(lark) = gbnf_to_lark(&s) {
                // Whatever converts must be Lark that llguidance reads.
                prop_assert!(lark.starts_with("start: "), "{}", lark);
                let parsed = crate::lark_accepts(&lark, "");
                prop_assert!(parsed.is_ok(), "{}\n=>\n{}\n{:?}", s, lark, parsed.err());
            }
        }
    }
}
