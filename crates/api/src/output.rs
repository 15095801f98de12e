//! The model's output split into what OpenAI's API returns apart: reasoning
//! (`reasoning_content`), the answer (`content`) and tool calls (`tool_calls`).
//!
//! The parser is incremental: it takes the text as the engine streams it and gives back
//! pieces as soon as they are certain, holding back only what might be the start of a
//! marker. Streaming and whole responses run the same parser, so the streamed deltas always
//! concatenate to the whole message.
//!
//! Grammar of an output: `[reasoning] content (tool-calls content)*`, where reasoning is one
//! block at the very start (`<think>`...`</think>` or `[THINK]`...`[/THINK]`; already open
//! when the prompt opened it) and tool calls are in the model's syntax:
//! - Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated;
//! - Mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` objects, or
//!   `name[ARGS]{...}` (with `[CALL_ID]id` between in tokenizer v11), repeated.
//!
//! Text that looks like a call but does not parse stays content, as vLLM does.

use serde_json::Value;

/// The tool-call syntax to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallSyntax {
    Hermes,
    Mistral,
}

impl CallSyntax {
    fn marker(self) -> &'static str {
        match self {
            CallSyntax::Hermes => "<tool_call>",
            CallSyntax::Mistral => "[TOOL_CALLS]",
        }
    }
}

/// What the parser looks for in one generation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ParserSpec {
    /// Tool calls to parse; `None` leaves everything content.
    pub(crate) calls: Option<CallSyntax>,
    /// Only the first call is kept (`parallel_tool_calls: false`).
    pub(crate) single_call: bool,
    /// The reasoning block's markers.
    pub(crate) reasoning: Option<(String, String)>,
    /// The prompt opened the block: the output starts as reasoning.
    pub(crate) reasoning_open: bool,
    /// Call ids of 9 alphanumerics (Mistral's) instead of `call_` and 24.
    pub(crate) short_ids: bool,
}

impl ParserSpec {
    /// True when the parser only passes text through.
    pub(crate) fn is_plain(&self) -> bool {
        self.calls.is_none() && self.reasoning.is_none()
    }
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub(crate) arguments: String,
}

/// A piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Reasoning(String),
    Content(String),
    Call(ParsedCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only whitespace so far: a reasoning block may open.
    Start,
    Reasoning,
    Content,
    Calls,
}

/// Splits one generation's output.
#[derive(Debug)]
pub(crate) struct OutputParser {
    spec: ParserSpec,
    mode: Mode,
    /// Text not given out yet.
    buf: String,
    /// Drop whitespace before the content that follows a reasoning block.
    trim_content: bool,
    calls: usize,
    /// A call failed to parse: the rest is content.
    gave_up: bool,
}

impl OutputParser {
    pub(crate) fn new(spec: ParserSpec) -> Self {
        let mode = match (&spec.reasoning, spec.reasoning_open) {
            (Some(_), true) => Mode::Reasoning,
            (Some(_), false) => Mode::Start,
            (None, _) => Mode::Content,
        };
        Self {
            spec,
            mode,
            buf: String::new(),
            trim_content: false,
            calls: 0,
            gave_up: false,
        }
    }

    /// Calls parsed so far (kept ones).
    pub(crate) fn calls(&self) -> usize {
        self.calls
    }

    /// Takes more text; returns what is now certain.
    pub(crate) fn feed(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.run(&mut out, false);
        out
    }

    /// The generation ended: gives out everything held back.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            match self.mode {
                Mode::Reasoning => out.push(Piece::Reasoning(rest)),
                _ if self.trim_content && rest.trim().is_empty() => {}
                _ => out.push(Piece::Content(rest)),
            }
        }
        out
    }

    fn run(&mut self, out: &mut Vec<Piece>, end: bool) {
        loop {
            let progressed = match self.mode {
                Mode::Start => self.start(),
                Mode::Reasoning => self.reasoning(out),
                Mode::Content => self.content(out),
                Mode::Calls => self.tool_calls(out, end),
            };
            if !progressed {
                return;
            }
        }
    }

    fn start(&mut self) -> bool {
        let Some((open, _)) = &self.spec.reasoning else {
            self.mode = Mode::Content;
            return true;
        };
        let trimmed = self.buf.trim_start();
        if let Some(rest) = trimmed.strip_prefix(open.as_str()) {
            self.buf = rest.to_owned();
            self.mode = Mode::Reasoning;
            true
        } else if open.starts_with(trimmed) {
            false
        } else {
            self.mode = Mode::Content;
            true
        }
    }

    fn reasoning(&mut self, out: &mut Vec<Piece>) -> bool {
        let Some((_, close)) = &self.spec.reasoning else {
            self.mode = Mode::Content;
            return true;
        };
        if let Some(at) = self.buf.find(close.as_str()) {
            let text = self.buf[..at].to_owned();
            self.buf.drain(..at + close.len());
            if !text.is_empty() {
                out.push(Piece::Reasoning(text));
            }
            self.mode = Mode::Content;
            self.trim_content = true;
            return true;
        }
        let safe = safe_len(&self.buf, &[close.as_str()]);
        if safe > 0 {
            out.push(Piece::Reasoning(self.buf[..safe].to_owned()));
            self.buf.drain(..safe);
        }
        false
    }

    fn content(&mut self, out: &mut Vec<Piece>) -> bool {
        if self.trim_content {
            let trimmed = self.buf.trim_start();
            if trimmed.is_empty() {
                self.buf.clear();
                return false;
            }
            self.buf = trimmed.to_owned();
            self.trim_content = false;
        }
        let marker = match self.spec.calls {
            Some(syntax) if !self.gave_up => syntax.marker(),
            _ => {
                if !self.buf.is_empty() {
                    out.push(Piece::Content(std::mem::take(&mut self.buf)));
                }
                return false;
            }
        };
        if let Some(at) = self.buf.find(marker) {
            if at > 0 {
                out.push(Piece::Content(self.buf[..at].to_owned()));
            }
            self.buf.drain(..at);
            self.mode = Mode::Calls;
            return true;
        }
        let safe = safe_len(&self.buf, &[marker]);
        if safe > 0 {
            out.push(Piece::Content(self.buf[..safe].to_owned()));
            self.buf.drain(..safe);
        }
        false
    }

    /// At a call marker (or between calls): parses whole calls off the front of the buffer.
    fn tool_calls(&mut self, out: &mut Vec<Piece>, end: bool) -> bool {
        let Some(syntax) = self.spec.calls else {
            self.mode = Mode::Content;
            return true;
        };
        let lead = self.buf.len() - self.buf.trim_start().len();
        let rest = &self.buf[lead..];
        let marker = syntax.marker();
        if !rest.starts_with(marker) {
            if marker.starts_with(rest) && !end {
                return false;
            }
            // Text after the calls is content again (the whitespace between them dropped).
            self.mode = Mode::Content;
            self.trim_content = self.calls > 0;
            return true;
        }
        let body = &rest[marker.len()..];
        let parsed = match syntax {
            CallSyntax::Hermes => parse_hermes(body),
            CallSyntax::Mistral => parse_mistral(body),
        };
        match parsed {
            Parse::Done(calls, used) => {
                let consumed = lead + marker.len() + used;
                self.buf.drain(..consumed);
                for (name, arguments) in calls {
                    if self.spec.single_call && self.calls >= 1 {
                        continue;
                    }
                    self.calls += 1;
                    out.push(Piece::Call(ParsedCall {
                        id: call_id(self.spec.short_ids),
                        name,
                        arguments,
                    }));
                }
                true
            }
            Parse::NeedMore if !end => false,
            Parse::NeedMore | Parse::Invalid => {
                // Not a call after all: the rest is content.
                self.gave_up = true;
                self.mode = Mode::Content;
                true
            }
        }
    }
}

/// The length of the prefix of `buf` that cannot be the start of any marker.
fn safe_len(buf: &str, markers: &[&str]) -> usize {
    let mut safe = buf.len();
    for marker in markers {
        // The longest suffix of buf that is a proper prefix of the marker.
        let longest = (1..marker.len().min(buf.len() + 1))
            .rev()
            .find(|&k| buf.is_char_boundary(buf.len() - k) && buf.ends_with(&marker[..k]));
        if let Some(k) = longest {
            safe = safe.min(buf.len() - k);
        }
    }
    safe
}

enum Parse {
    /// Calls (name, arguments JSON) and the bytes of the body they took.
    Done(Vec<(String, String)>, usize),
    NeedMore,
    Invalid,
}

/// Reads one JSON value at the start of `text` (after whitespace): the value and the bytes
/// taken, or whether more text could complete it.
fn json_prefix(text: &str) -> Result<(Value, usize), bool> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    match stream.next() {
        Some(Ok(value)) => Ok((value, stream.byte_offset())),
        Some(Err(e)) if e.is_eof() => Err(true),
        None => Err(true),
        Some(Err(_)) => Err(false),
    }
}

/// A `{"name": ..., "arguments": ...}` object as (name, arguments JSON string).
fn named_call(value: &Value) -> Option<(String, String)> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".to_owned(),
    };
    Some((name, arguments))
}

fn parse_hermes(body: &str) -> Parse {
    const CLOSE: &str = "</tool_call>";
    match json_prefix(body) {
        Ok((value, used)) => {
            let Some(call) = named_call(&value) else {
                return Parse::Invalid;
            };
            let after = &body[used..];
            let lead = after.len() - after.trim_start().len();
            let after = &after[lead..];
            if after.starts_with(CLOSE) {
                Parse::Done(vec![call], used + lead + CLOSE.len())
            } else if CLOSE.starts_with(after) {
                Parse::NeedMore
            } else {
                Parse::Invalid
            }
        }
        Err(true) => Parse::NeedMore,
        Err(false) => Parse::Invalid,
    }
}

fn parse_mistral(body: &str) -> Parse {
    const ARGS: &str = "[ARGS]";
    const CALL_ID: &str = "[CALL_ID]";
    let lead = body.len() - body.trim_start().len();
    let text = &body[lead..];
    if text.is_empty() {
        return Parse::NeedMore;
    }
    if text.starts_with('[') || text.starts_with('{') {
        // Tokenizers v2 to v7: a JSON list of calls (or one call).
        return match json_prefix(text) {
            Ok((value, used)) => {
                let items = match &value {
                    Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                let calls: Option<Vec<_>> = items.into_iter().map(named_call).collect();
                match calls {
                    Some(calls) if !calls.is_empty() => Parse::Done(calls, lead + used),
                    _ => Parse::Invalid,
                }
            }
            Err(true) => Parse::NeedMore,
            Err(false) => Parse::Invalid,
        };
    }
    // v11 and later: name [CALL_ID] id [ARGS] {json}.
    let Some(args_at) = text.find(ARGS) else {
        return if text.len() > 256 {
            Parse::Invalid
        } else {
            Parse::NeedMore
        };
    };
    let head = &text[..args_at];
    let name = match head.find(CALL_ID) {
        Some(at) => &head[..at],
        None => head,
    }
    .trim();
    if !crate::tools::is_function_name(name) {
        return Parse::Invalid;
    }
    let json = &text[args_at + ARGS.len()..];
    match json_prefix(json) {
        Ok((value, used)) => Parse::Done(
            vec![(name.to_owned(), value.to_string())],
            lead + args_at + ARGS.len() + used,
        ),
        Err(true) => Parse::NeedMore,
        Err(false) => Parse::Invalid,
    }
}

/// A fresh call id.
fn call_id(short: bool) -> String {
    use rand::Rng;
    use rand::distributions::Alphanumeric;
    let n = if short { 9 } else { 24 };
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect();
    if short {
        suffix
    } else {
        format!("call_{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(calls: Option<CallSyntax>, think: bool, open: bool) -> ParserSpec {
        ParserSpec {
            calls,
            single_call: false,
            reasoning: think.then(|| ("<think>".to_owned(), "</think>".to_owned())),
            reasoning_open: open,
            short_ids: false,
        }
    }

    /// Feeds `text` in pieces of `step` bytes (on char boundaries) and merges the pieces.
    fn parse(spec: ParserSpec, text: &str, step: usize) -> (String, String, Vec<(String, String)>) {
        let mut p = OutputParser::new(spec);
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            pieces.extend(p.feed(&text[i..j]));
            i = j;
        }
        pieces.extend(p.finish());
        let (mut r, mut c, mut calls) = (String::new(), String::new(), Vec::new());
        for piece in pieces {
            match piece {
                Piece::Reasoning(t) => r.push_str(&t),
                Piece::Content(t) => c.push_str(&t),
                Piece::Call(call) => calls.push((call.name, call.arguments)),
            }
        }
        (r, c, calls)
    }

    #[test]
    fn every_split_gives_the_same_result() {
        let text = "<think>plan: call it</think>\n\nSure.<tool_call>\n{\"name\": \"get\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let whole = parse(
            spec(Some(CallSyntax::Hermes), true, false),
            text,
            text.len(),
        );
        assert_eq!(whole.0, "plan: call it");
        assert_eq!(whole.1, "Sure.");
        assert_eq!(
            whole.2,
            vec![
                ("get".to_owned(), "{\"city\":\"Paris\"}".to_owned()),
                ("f".to_owned(), "{}".to_owned())
            ]
        );
        for step in 1..12 {
            assert_eq!(
                parse(spec(Some(CallSyntax::Hermes), true, false), text, step),
                whole,
                "step {step}"
            );
        }
    }

    #[test]
    fn prompt_opened_reasoning_and_unclosed_blocks() {
        let (r, c, _) = parse(spec(None, true, true), "thinking</think> answer", 3);
        assert_eq!((r.as_str(), c.as_str()), ("thinking", "answer"));
        let (r, c, _) = parse(spec(None, true, true), "still thinking", 3);
        assert_eq!((r.as_str(), c.as_str()), ("still thinking", ""));
        let (r, c, _) = parse(spec(None, true, false), "no <think> here", 2);
        assert_eq!((r.as_str(), c.as_str()), ("", "no <think> here"));
    }

    #[test]
    fn mistral_think_blocks_and_calls_together() {
        let s = ParserSpec {
            calls: Some(CallSyntax::Mistral),
            single_call: false,
            reasoning: Some(("[THINK]".to_owned(), "[/THINK]".to_owned())),
            reasoning_open: false,
            short_ids: true,
        };
        let text = "[THINK]weather needed[/THINK][TOOL_CALLS]get[ARGS]{\"city\": \"Lyon\"}";
        for step in [1, 3, 7, text.len()] {
            let (r, c, calls) = parse(s.clone(), text, step);
            assert_eq!(r, "weather needed");
            assert_eq!(c, "");
            assert_eq!(
                calls,
                vec![("get".to_owned(), "{\"city\":\"Lyon\"}".to_owned())]
            );
        }
    }

    #[test]
    fn mistral_forms() {
        let s = spec(Some(CallSyntax::Mistral), false, false);
        let (_, c, calls) = parse(
            s.clone(),
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]",
            4,
        );
        assert_eq!(c, "");
        assert_eq!(calls.len(), 2);
        let (_, _, calls) = parse(
            s.clone(),
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Nice\"}[TOOL_CALLS]other[CALL_ID]abc123def[ARGS]{}",
            5,
        );
        assert_eq!(
            calls,
            vec![
                ("get_weather".to_owned(), "{\"city\":\"Nice\"}".to_owned()),
                ("other".to_owned(), "{}".to_owned())
            ]
        );
    }

    #[test]
    fn broken_calls_stay_content() {
        let text = "<tool_call>not json</tool_call> after";
        let (_, c, calls) = parse(spec(Some(CallSyntax::Hermes), false, false), text, 3);
        assert!(calls.is_empty());
        assert_eq!(c, text);
        let cut = "<tool_call>{\"name\": \"a\", \"argu";
        let (_, c, calls) = parse(spec(Some(CallSyntax::Hermes), false, false), cut, 3);
        assert!(calls.is_empty());
        assert_eq!(c, cut);
    }

    #[test]
    fn single_call_keeps_the_first() {
        let mut s = spec(Some(CallSyntax::Hermes), false, false);
        s.single_call = true;
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let (_, _, calls) = parse(s, text, 7);
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn ids_have_their_shapes() {
        assert_eq!(call_id(true).len(), 9);
        assert!(call_id(false).starts_with("call_"));
    }
}
