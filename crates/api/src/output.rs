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
//!   `name[ARGS]{...}` (with `[CALL_ID]id` between in tokenizer v11), repeated;
//! - Qwen3-Coder / Qwen3.5: `<tool_call>` `<function=name>`, `<parameter=key>` value
//!   `</parameter>` repeated, `</function>` `</tool_call>` (parsed when the call is whole; a
//!   value is text for a parameter the tool declares a string, else JSON);
//! - DeepSeek: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>name<｜tool▁sep｜>
//!   {...}<｜tool▁call▁end｜>` (V3.1 and later) or `<｜tool▁call▁begin｜>function<｜tool▁sep｜>
//!   name` and the arguments in a ```` ```json ```` fence (V3 and R1), then
//!   `<｜tool▁calls▁end｜>`.
//!
//! A call is given out as [`Piece::CallStart`], [`Piece::CallArguments`] fragments and
//! [`Piece::CallEnd`], so a stream sends the arguments as the model writes them, as OpenAI
//! does. A call starts streaming only once its opening is unambiguous, because a started
//! call cannot be taken back:
//! - Hermes and Mistral's list: the object opens as `{"name": "<function name>",
//!   "arguments": {` (or `"parameters"`), the name complete and a valid function name;
//! - Mistral's `name[ARGS]{`: the name valid and the arguments an object;
//! - DeepSeek's `name<｜tool▁sep｜>{` (or `function<｜tool▁sep｜>name` and the fence's
//!   opening, then `{`): the name valid and the arguments an object.
//!
//! A started call's arguments are the model's JSON text without the whitespace between its
//! tokens (the same value, compact, in the model's key order), checked byte by byte: what is
//! sent is always the start of a valid JSON value, and a complete call's arguments are
//! valid JSON. Any other shape (arguments before the name, arguments as a string) is parsed
//! when the call is complete and sent in one piece, re-serialised compactly.
//!
//! Text that looks like a call but does not parse before the call started stays content,
//! as vLLM does. Once a call started, its markup never becomes content: if the JSON breaks
//! (or the closing `</tool_call>` does not follow), the call ends with the arguments it had,
//! and what follows is dropped up to the call's closing marker (`</tool_call>`,
//! `<｜tool▁call▁end｜>` or `<｜tool▁calls▁end｜>`, or the next `[TOOL_CALLS]` in Mistral's
//! syntax, which has none).
//!
//! When the output ends inside a call (`max_tokens`), the markup is not content either: a
//! call whose name is known is given out with the arguments generated so far (the finish
//! reason stays `length`, as OpenAI's does); a call cut before its name is dropped.

use engine::ToolCallFormat;
use engine::deepseek::{CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP};
use serde_json::Value;

/// The tool-call syntax to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallSyntax {
    Hermes,
    Mistral,
    DeepSeek,
    QwenXml,
}

/// Hermes' closing marker.
const HERMES_CLOSE: &str = "</tool_call>";

impl CallSyntax {
    /// The syntax the model's tool-call format writes.
    pub(crate) fn of(format: ToolCallFormat) -> Self {
        match format {
            ToolCallFormat::Mistral { .. } => CallSyntax::Mistral,
            ToolCallFormat::DeepSeek { .. } => CallSyntax::DeepSeek,
            ToolCallFormat::QwenXml => CallSyntax::QwenXml,
            _ => CallSyntax::Hermes,
        }
    }

    fn marker(self) -> &'static str {
        match self {
            CallSyntax::Hermes | CallSyntax::QwenXml => "<tool_call>",
            CallSyntax::Mistral => "[TOOL_CALLS]",
            CallSyntax::DeepSeek => CALLS_BEGIN,
        }
    }

    /// The markers after which content turns into calls.
    fn openers(self) -> &'static [&'static str] {
        match self {
            CallSyntax::Hermes | CallSyntax::QwenXml => &["<tool_call>"],
            CallSyntax::Mistral => &["[TOOL_CALLS]"],
            // A call without the section's opener is taken too.
            CallSyntax::DeepSeek => &[CALLS_BEGIN, CALL_BEGIN],
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
    /// The (function, parameter) pairs the tools declare as strings: in Qwen's XML calls
    /// their values are text, every other value is JSON.
    pub(crate) string_params: Vec<(String, String)>,
}

impl ParserSpec {
    /// True when the parser only passes text through.
    pub(crate) fn is_plain(&self) -> bool {
        self.calls.is_none() && self.reasoning.is_none()
    }
}

/// A piece of output. A call comes as `CallStart`, then `CallArguments` fragments whose
/// concatenation is its arguments (OpenAI's JSON string), then `CallEnd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Reasoning(String),
    Content(String),
    /// A call begins: its id and the function's name.
    CallStart {
        id: String,
        name: String,
    },
    /// The next fragment of the current call's arguments.
    CallArguments(String),
    /// The current call is complete (or was cut).
    CallEnd,
}

#[derive(Debug)]
enum Mode {
    /// Only whitespace so far: a reasoning block may open.
    Start,
    Reasoning,
    Content,
    /// At a call marker or between calls, no call started.
    Calls,
    /// Inside a call that started.
    Call(Inside),
}

/// Where the parser is inside a started call.
#[derive(Debug)]
enum Inside {
    /// The current call's arguments, given out as they come.
    Arguments {
        scan: JsonScan,
        /// The arguments are a member of a call object (Hermes, Mistral's list).
        in_object: bool,
        then: After,
    },
    /// The call object's members after the arguments, skipped up to its `}`.
    ObjectTail { scan: JsonScan, then: After },
    /// Hermes: `</tool_call>` comes next.
    HermesClose,
    /// Mistral's list: `,` and another call, or `]`.
    ListNext,
    /// Mistral's list: a call object comes next.
    ListItem,
    /// DeepSeek: the call's closing (a fence's end first when `fenced`) comes next.
    DeepSeekClose { fenced: bool },
    /// The call broke off: its markup is dropped up to its closing marker.
    Skip,
}

/// What follows a call object (or Mistral's `[ARGS]` value).
#[derive(Debug, Clone, Copy)]
enum After {
    HermesClose,
    ListNext,
    Calls,
    DeepSeekClose { fenced: bool },
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
    /// The current call is kept (only the first is with `single_call`).
    emitting: bool,
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
            emitting: false,
            gave_up: false,
        }
    }

    /// Calls given out so far (kept ones).
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
        if let Mode::Call(inside) = &self.mode {
            // Ended inside a started call (`max_tokens`): the call keeps the arguments it
            // has, and the rest of its markup is not content.
            if matches!(inside, Inside::Arguments { .. }) {
                self.end_call(&mut out);
            }
            self.buf.clear();
            self.mode = Mode::Content;
        }
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
            let progressed = match &self.mode {
                Mode::Start => self.start(),
                Mode::Reasoning => self.reasoning(out),
                Mode::Content => self.content(out),
                Mode::Calls => self.tool_calls(out, end),
                Mode::Call(_) => match std::mem::replace(&mut self.mode, Mode::Calls) {
                    Mode::Call(inside) => self.inside_call(inside, out, end),
                    _ => false,
                },
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
        let openers = match self.spec.calls {
            Some(syntax) if !self.gave_up => syntax.openers(),
            _ => {
                if !self.buf.is_empty() {
                    out.push(Piece::Content(std::mem::take(&mut self.buf)));
                }
                return false;
            }
        };
        if let Some(at) = openers.iter().filter_map(|m| self.buf.find(m)).min() {
            if at > 0 {
                out.push(Piece::Content(self.buf[..at].to_owned()));
            }
            self.buf.drain(..at);
            self.mode = Mode::Calls;
            return true;
        }
        let safe = safe_len(&self.buf, openers);
        if safe > 0 {
            out.push(Piece::Content(self.buf[..safe].to_owned()));
            self.buf.drain(..safe);
        }
        false
    }

    /// At a call marker (or between calls): starts the call once its opening is
    /// unambiguous, or parses a call of another shape once it is whole. The marker stays in
    /// the buffer until then, so that a call that does not parse stays content.
    fn tool_calls(&mut self, out: &mut Vec<Piece>, end: bool) -> bool {
        let Some(syntax) = self.spec.calls else {
            self.mode = Mode::Content;
            return true;
        };
        if syntax == CallSyntax::DeepSeek {
            return self.deepseek_calls(out, end);
        }
        let lead = ws_len(&self.buf);
        let rest = &self.buf[lead..];
        let marker = syntax.marker();
        if !rest.starts_with(marker) {
            if marker.starts_with(rest) && !end {
                return false;
            }
            if end && !rest.is_empty() && marker.starts_with(rest) {
                // A further call cut (`max_tokens`) inside its marker: markup, not content.
                self.buf.clear();
                return false;
            }
            // Text after the calls is content again (the whitespace between them dropped).
            self.mode = Mode::Content;
            self.trim_content = self.calls > 0;
            return true;
        }
        let body = &rest[marker.len()..];
        let opened = match syntax {
            CallSyntax::Hermes => parse_hermes(body, end),
            CallSyntax::Mistral => parse_mistral(body),
            CallSyntax::DeepSeek => parse_deepseek(body, end),
            CallSyntax::QwenXml => parse_qwen_xml(body, end, &self.spec.string_params),
        };
        let head = lead + marker.len();
        self.open_call(out, opened, head, end)
    }

    /// DeepSeek's calls: the section's opener and closer are dropped, each call opens with
    /// its own marker.
    fn deepseek_calls(&mut self, out: &mut Vec<Piece>, end: bool) -> bool {
        let lead = ws_len(&self.buf);
        let rest = &self.buf[lead..];
        // A call parsed whole's closing, or the section's end.
        for (marker, last) in [(CALL_END, false), (CALLS_END, true)] {
            if rest.starts_with(marker) {
                self.buf.drain(..lead + marker.len());
                if last {
                    self.mode = Mode::Content;
                    self.trim_content = true;
                }
                return true;
            }
        }
        // The section's opener stays until the call after it is known, so that what does not
        // parse stays content with it.
        let (skip, call) = match rest.strip_prefix(CALLS_BEGIN) {
            Some(after) => {
                let gap = ws_len(after);
                (CALLS_BEGIN.len() + gap, &after[gap..])
            }
            None => (0, rest),
        };
        if let Some(body) = call.strip_prefix(CALL_BEGIN) {
            let opened = parse_deepseek(body, end);
            return self.open_call(out, opened, lead + skip + CALL_BEGIN.len(), end);
        }
        if skip > 0 {
            if CALL_BEGIN.starts_with(call) {
                if end {
                    // Cut (`max_tokens`) inside the first call's marker: markup.
                    self.buf.clear();
                }
                return false;
            }
            self.gave_up = true;
            self.mode = Mode::Content;
            return true;
        }
        let partial = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END]
            .iter()
            .any(|m| m.starts_with(rest));
        if partial && !end {
            return false;
        }
        if partial && !rest.is_empty() {
            // Cut (`max_tokens`) inside a marker: markup, not content.
            self.buf.clear();
            return false;
        }
        self.mode = Mode::Content;
        self.trim_content = self.calls > 0;
        true
    }

    /// Acts on what the text after a call's marker (`head` bytes of the buffer) is.
    fn open_call(&mut self, out: &mut Vec<Piece>, opened: Opened, head: usize, end: bool) -> bool {
        match opened {
            Opened::Stream {
                name,
                used,
                in_object,
                then,
            } => {
                self.buf.drain(..head + used);
                self.start_call(out, name);
                self.mode = Mode::Call(Inside::Arguments {
                    scan: JsonScan::new(),
                    in_object,
                    then,
                });
                true
            }
            Opened::Whole(calls, used) => {
                self.buf.drain(..head + used);
                for (name, arguments) in calls {
                    self.whole_call(out, name, arguments);
                }
                true
            }
            Opened::NeedMore(_) if !end => false,
            Opened::NeedMore(name) => {
                self.cut_before_arguments(out, name);
                true
            }
            Opened::Invalid => {
                // Not a call after all: the rest is content.
                self.gave_up = true;
                self.mode = Mode::Content;
                true
            }
        }
    }

    /// One step inside a started call; `self.mode` is `Calls` on entry and is set here.
    fn inside_call(&mut self, inside: Inside, out: &mut Vec<Piece>, end: bool) -> bool {
        match inside {
            Inside::Arguments {
                mut scan,
                in_object,
                then,
            } => {
                let (used, kept, state) = scan.run(&self.buf);
                self.buf.drain(..used);
                if self.emitting && !kept.is_empty() {
                    out.push(Piece::CallArguments(kept));
                }
                match state {
                    Scanned::Open => {
                        self.mode = Mode::Call(Inside::Arguments {
                            scan,
                            in_object,
                            then,
                        });
                        false
                    }
                    Scanned::Complete => {
                        self.end_call(out);
                        self.mode = if in_object {
                            Mode::Call(Inside::ObjectTail {
                                scan: JsonScan::after_member(),
                                then,
                            })
                        } else {
                            after(then)
                        };
                        true
                    }
                    Scanned::Broken => {
                        self.end_call(out);
                        self.mode = Mode::Call(Inside::Skip);
                        true
                    }
                }
            }
            Inside::ObjectTail { mut scan, then } => {
                let (used, _, state) = scan.run(&self.buf);
                self.buf.drain(..used);
                match state {
                    Scanned::Open => {
                        self.mode = Mode::Call(Inside::ObjectTail { scan, then });
                        false
                    }
                    Scanned::Complete => {
                        self.mode = after(then);
                        true
                    }
                    Scanned::Broken => {
                        self.mode = Mode::Call(Inside::Skip);
                        true
                    }
                }
            }
            Inside::HermesClose => {
                let lead = ws_len(&self.buf);
                let rest = &self.buf[lead..];
                if rest.starts_with(HERMES_CLOSE) {
                    self.buf.drain(..lead + HERMES_CLOSE.len());
                    true
                } else if HERMES_CLOSE.starts_with(rest) {
                    self.mode = Mode::Call(Inside::HermesClose);
                    false
                } else {
                    self.mode = Mode::Call(Inside::Skip);
                    true
                }
            }
            Inside::ListNext => {
                let lead = ws_len(&self.buf);
                match self.buf[lead..].chars().next() {
                    None => {
                        self.mode = Mode::Call(Inside::ListNext);
                        false
                    }
                    Some(',') => {
                        self.buf.drain(..lead + 1);
                        self.mode = Mode::Call(Inside::ListItem);
                        true
                    }
                    Some(']') => {
                        self.buf.drain(..lead + 1);
                        true
                    }
                    Some(_) => {
                        self.mode = Mode::Call(Inside::Skip);
                        true
                    }
                }
            }
            Inside::ListItem => self.list_item(out, end),
            Inside::DeepSeekClose { fenced } => {
                let closing: &[&str] = if fenced {
                    &["```", CALL_END]
                } else {
                    &[CALL_END]
                };
                let mut at = 0;
                for literal in closing {
                    match expect(&self.buf, &mut at, &[literal]) {
                        Step::Matched => {}
                        Step::Short => {
                            self.mode = Mode::Call(Inside::DeepSeekClose { fenced });
                            return false;
                        }
                        Step::Differs => {
                            self.mode = Mode::Call(Inside::Skip);
                            return true;
                        }
                    }
                }
                self.buf.drain(..at);
                true
            }
            Inside::Skip if self.spec.calls == Some(CallSyntax::DeepSeek) => {
                // Up to the call's closing, or to the section's end if it comes first (which
                // `deepseek_calls` then takes).
                let call_end = self.buf.find(CALL_END);
                let calls_end = self.buf.find(CALLS_END);
                match (call_end, calls_end) {
                    (Some(a), Some(b)) if b < a => {
                        self.buf.drain(..b);
                        true
                    }
                    (Some(a), _) => {
                        self.buf.drain(..a + CALL_END.len());
                        true
                    }
                    (None, Some(b)) => {
                        self.buf.drain(..b);
                        true
                    }
                    (None, None) => {
                        let safe = safe_len(&self.buf, &[CALL_END, CALLS_END]);
                        self.buf.drain(..safe);
                        self.mode = Mode::Call(Inside::Skip);
                        false
                    }
                }
            }
            Inside::Skip => {
                let close = match self.spec.calls {
                    Some(CallSyntax::Mistral) => CallSyntax::Mistral.marker(),
                    _ => HERMES_CLOSE,
                };
                match self.buf.find(close) {
                    // Mistral's marker opens the next call: it stays.
                    Some(at) if close != CallSyntax::Mistral.marker() => {
                        self.buf.drain(..at + close.len());
                        true
                    }
                    Some(at) => {
                        self.buf.drain(..at);
                        true
                    }
                    None => {
                        let safe = safe_len(&self.buf, &[close]);
                        self.buf.drain(..safe);
                        self.mode = Mode::Call(Inside::Skip);
                        false
                    }
                }
            }
        }
    }

    /// Mistral's list after a started call: the next call object.
    fn list_item(&mut self, out: &mut Vec<Piece>, end: bool) -> bool {
        let lead = ws_len(&self.buf);
        let text = &self.buf[lead..];
        let name = match object_opening(text) {
            Opening::Stream { name, used } => {
                self.buf.drain(..lead + used);
                self.start_call(out, name);
                self.mode = Mode::Call(Inside::Arguments {
                    scan: JsonScan::new(),
                    in_object: true,
                    then: After::ListNext,
                });
                return true;
            }
            Opening::Partial(name) => name,
            Opening::Whole(name) => match json_prefix(text) {
                Ok((value, used)) => {
                    self.mode = match named_call(&value) {
                        Some((name, arguments)) => {
                            self.buf.drain(..lead + used);
                            self.whole_call(out, name, arguments);
                            Mode::Call(Inside::ListNext)
                        }
                        None => Mode::Call(Inside::Skip),
                    };
                    return true;
                }
                Err(true) => name,
                Err(false) => {
                    self.mode = Mode::Call(Inside::Skip);
                    return true;
                }
            },
        };
        if end {
            self.cut_before_arguments(out, name);
            true
        } else {
            self.mode = Mode::Call(Inside::ListItem);
            false
        }
    }

    /// The output ended in a call's opening: a call whose name is known is given out with
    /// no arguments; the markup is dropped either way.
    fn cut_before_arguments(&mut self, out: &mut Vec<Piece>, name: Option<String>) {
        self.buf.clear();
        self.mode = Mode::Calls;
        if let Some(name) = name {
            self.start_call(out, name);
            self.end_call(out);
        }
    }

    fn start_call(&mut self, out: &mut Vec<Piece>, name: String) {
        self.emitting = !(self.spec.single_call && self.calls >= 1);
        if self.emitting {
            self.calls += 1;
            out.push(Piece::CallStart {
                id: call_id(self.spec.short_ids),
                name,
            });
        }
    }

    fn end_call(&mut self, out: &mut Vec<Piece>) {
        if self.emitting {
            out.push(Piece::CallEnd);
        }
        self.emitting = false;
    }

    /// A call parsed whole, given out in one go.
    fn whole_call(&mut self, out: &mut Vec<Piece>, name: String, arguments: String) {
        self.start_call(out, name);
        if self.emitting && !arguments.is_empty() {
            out.push(Piece::CallArguments(arguments));
        }
        self.end_call(out);
    }
}

/// The mode after a call object or value.
fn after(then: After) -> Mode {
    match then {
        After::HermesClose => Mode::Call(Inside::HermesClose),
        After::ListNext => Mode::Call(Inside::ListNext),
        After::Calls => Mode::Calls,
        After::DeepSeekClose { fenced } => Mode::Call(Inside::DeepSeekClose { fenced }),
    }
}

/// The bytes of JSON whitespace at the start of `text`.
fn ws_len(text: &str) -> usize {
    text.len() - text.trim_start_matches([' ', '\t', '\n', '\r']).len()
}

/// The length of the prefix of `buf` that cannot be the start of any marker.
fn safe_len(buf: &str, markers: &[&str]) -> usize {
    let mut safe = buf.len();
    for marker in markers {
        // The longest suffix of buf that is a proper prefix of the marker.
        let longest = (1..marker.len().min(buf.len() + 1)).rev().find(|&k| {
            marker.is_char_boundary(k)
                && buf.is_char_boundary(buf.len() - k)
                && buf.ends_with(&marker[..k])
        });
        if let Some(k) = longest {
            safe = safe.min(buf.len() - k);
        }
    }
    safe
}

/// What the text after a call marker is, before any call of it started.
enum Opened {
    /// A call whose arguments stream: `used` bytes of the body, up to the arguments' `{`.
    Stream {
        name: String,
        used: usize,
        in_object: bool,
        then: After,
    },
    /// Calls of another shape, parsed whole (name, arguments JSON), and the bytes taken.
    Whole(Vec<(String, String)>, usize),
    /// More text could complete it; the call's name once it is certain.
    NeedMore(Option<String>),
    Invalid,
}

/// How a call object (`{"name": ..., "arguments": ...}`) opens.
enum Opening {
    /// `{"name": "<name>", "arguments": ` and the value's `{`: `used` bytes before it.
    Stream { name: String, used: usize },
    /// Still a prefix of such an opening; the name once read.
    Partial(Option<String>),
    /// Some other shape (or not an object): parsed when whole; the name if it came first.
    Whole(Option<String>),
}

/// Whether a literal came after whitespace.
enum Step {
    Matched,
    Short,
    Differs,
}

/// Skips whitespace at `*at`, then takes one of `options` if it is there.
fn expect(text: &str, at: &mut usize, options: &[&str]) -> Step {
    *at += ws_len(&text[*at..]);
    let rest = &text[*at..];
    if let Some(option) = options.iter().find(|o| rest.starts_with(**o)) {
        *at += option.len();
        Step::Matched
    } else if options.iter().any(|o| o.starts_with(rest)) {
        Step::Short
    } else {
        Step::Differs
    }
}

/// Reads the opening of a call object at the start of `text`.
fn object_opening(text: &str) -> Opening {
    let mut at = 0;
    for options in [&["{"][..], &["\"name\""], &[":"]] {
        match expect(text, &mut at, options) {
            Step::Matched => {}
            Step::Short => return Opening::Partial(None),
            Step::Differs => return Opening::Whole(None),
        }
    }
    at += ws_len(&text[at..]);
    let name = match json_string(&text[at..]) {
        None => return Opening::Partial(None),
        Some(Ok((name, used))) if crate::tools::is_function_name(&name) => {
            at += used;
            name
        }
        Some(_) => return Opening::Whole(None),
    };
    for options in [&[","][..], &["\"arguments\"", "\"parameters\""], &[":"]] {
        match expect(text, &mut at, options) {
            Step::Matched => {}
            Step::Short => return Opening::Partial(Some(name)),
            Step::Differs => return Opening::Whole(Some(name)),
        }
    }
    at += ws_len(&text[at..]);
    match text[at..].chars().next() {
        None => Opening::Partial(Some(name)),
        Some('{') => Opening::Stream { name, used: at },
        Some(_) => Opening::Whole(Some(name)),
    }
}

/// A JSON string at the start of `text` and its length in bytes; `None` until it closes.
fn json_string(text: &str) -> Option<Result<(String, usize), ()>> {
    let bytes = text.as_bytes();
    match bytes.first() {
        None => return None,
        Some(b'"') => {}
        Some(_) => return Some(Err(())),
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => {
                return Some(
                    serde_json::from_str::<String>(&text[..=i])
                        .map(|s| (s, i + 1))
                        .map_err(|_| ()),
                );
            }
            _ => i += 1,
        }
    }
    None
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

/// A Hermes call after its marker. A call object parsed whole whose closing marker has not
/// come is a call at the `end` of the output.
fn parse_hermes(body: &str, end: bool) -> Opened {
    let lead = ws_len(body);
    let name = match object_opening(&body[lead..]) {
        Opening::Stream { name, used } => {
            return Opened::Stream {
                name,
                used: lead + used,
                in_object: true,
                then: After::HermesClose,
            };
        }
        Opening::Partial(name) => return Opened::NeedMore(name),
        Opening::Whole(name) => name,
    };
    match json_prefix(body) {
        Ok((value, used)) => {
            let Some(call) = named_call(&value) else {
                return Opened::Invalid;
            };
            closed_by_hermes_close(call, body, used, end)
        }
        Err(true) => Opened::NeedMore(name),
        Err(false) => Opened::Invalid,
    }
}

fn parse_mistral(body: &str) -> Opened {
    const ARGS: &str = "[ARGS]";
    const CALL_ID: &str = "[CALL_ID]";
    let lead = ws_len(body);
    let text = &body[lead..];
    if text.is_empty() {
        return Opened::NeedMore(None);
    }
    if text.starts_with('[') || text.starts_with('{') {
        // Tokenizers v2 to v7: a JSON list of calls (or one call). A call object that
        // opens with its name streams; any other shape is parsed whole.
        let (skip, then) = if let Some(items) = text.strip_prefix('[') {
            (1 + ws_len(items), After::ListNext)
        } else {
            (0, After::Calls)
        };
        let name = match object_opening(&text[skip..]) {
            Opening::Stream { name, used } => {
                return Opened::Stream {
                    name,
                    used: lead + skip + used,
                    in_object: true,
                    then,
                };
            }
            Opening::Partial(name) => return Opened::NeedMore(name),
            Opening::Whole(name) => name,
        };
        return match json_prefix(text) {
            Ok((value, used)) => {
                let items = match &value {
                    Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                let calls: Option<Vec<_>> = items.into_iter().map(named_call).collect();
                match calls {
                    Some(calls) if !calls.is_empty() => Opened::Whole(calls, lead + used),
                    _ => Opened::Invalid,
                }
            }
            Err(true) => Opened::NeedMore(name),
            Err(false) => Opened::Invalid,
        };
    }
    // v11 and later: name [CALL_ID] id [ARGS] {json}.
    let Some(args_at) = text.find(ARGS) else {
        if let Some(at) = text.find(CALL_ID) {
            let name = text[..at].trim();
            return if crate::tools::is_function_name(name) {
                Opened::NeedMore(Some(name.to_owned()))
            } else {
                Opened::Invalid
            };
        }
        return if text.len() > 256 {
            Opened::Invalid
        } else {
            Opened::NeedMore(None)
        };
    };
    let head = &text[..args_at];
    let name = match head.find(CALL_ID) {
        Some(at) => &head[..at],
        None => head,
    }
    .trim();
    if !crate::tools::is_function_name(name) {
        return Opened::Invalid;
    }
    let start = args_at + ARGS.len();
    let json = &text[start..];
    let gap = ws_len(json);
    match json[gap..].chars().next() {
        None => Opened::NeedMore(Some(name.to_owned())),
        Some('{') => Opened::Stream {
            name: name.to_owned(),
            used: lead + start + gap,
            in_object: false,
            then: After::Calls,
        },
        Some(_) => match json_prefix(json) {
            Ok((value, used)) => Opened::Whole(
                vec![(name.to_owned(), value.to_string())],
                lead + start + used,
            ),
            Err(true) => Opened::NeedMore(Some(name.to_owned())),
            Err(false) => Opened::Invalid,
        },
    }
}

/// A Qwen XML call after its `<tool_call>`: `<function=name>`, parameters, `</function>`,
/// `</tool_call>`; parsed whole. At the `end` of the output a call whose name is known is
/// given with the parameters that were complete.
fn parse_qwen_xml(body: &str, end: bool, string_params: &[(String, String)]) -> Opened {
    const FUNCTION: &str = "<function=";
    const FUNCTION_END: &str = "</function>";
    const PARAMETER: &str = "<parameter=";
    const PARAMETER_END: &str = "</parameter>";
    let lead = ws_len(body);
    let text = &body[lead..];
    let Some(after) = text.strip_prefix(FUNCTION) else {
        return if FUNCTION.starts_with(text) {
            Opened::NeedMore(None)
        } else {
            Opened::Invalid
        };
    };
    let Some(close) = after.find('>') else {
        return if after.len() > 256 {
            Opened::Invalid
        } else {
            Opened::NeedMore(None)
        };
    };
    let name = &after[..close];
    if !crate::tools::is_function_name(name) {
        return Opened::Invalid;
    }
    let mut at = lead + FUNCTION.len() + close + 1;
    let mut arguments = serde_json::Map::new();
    // The parameters, each whole; `complete` once `</function>` is read.
    let complete = loop {
        let rest = &body[at..];
        let gap = ws_len(rest);
        let rest = &rest[gap..];
        if rest.starts_with(FUNCTION_END) {
            at += gap + FUNCTION_END.len();
            break true;
        }
        let Some(param) = rest.strip_prefix(PARAMETER) else {
            if FUNCTION_END.starts_with(rest) || PARAMETER.starts_with(rest) {
                break false;
            }
            return Opened::Invalid;
        };
        let (Some(key_end), Some(value_end)) = (param.find('>'), param.find(PARAMETER_END)) else {
            break false;
        };
        if key_end > value_end {
            return Opened::Invalid;
        }
        let key = &param[..key_end];
        let raw = &param[key_end + 1..value_end];
        // The template puts the value on its own lines.
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let declared_string = string_params.iter().any(|(f, p)| f == name && p == key);
        arguments.insert(key.to_owned(), xml_value(raw, declared_string));
        at += gap + PARAMETER.len() + value_end + PARAMETER_END.len();
    };
    let call = (name.to_owned(), Value::Object(arguments).to_string());
    if !complete {
        return if end {
            Opened::Whole(vec![call], body.len())
        } else {
            Opened::NeedMore(Some(name.to_owned()))
        };
    }
    closed_by_hermes_close(call, body, at, end)
}

/// A call parsed whole from `body[..at]`: complete once `</tool_call>` follows (after
/// whitespace), or at the `end` of the output while that marker may still be coming.
fn closed_by_hermes_close(call: (String, String), body: &str, at: usize, end: bool) -> Opened {
    let rest = &body[at..];
    let gap = ws_len(rest);
    let rest = &rest[gap..];
    if rest.starts_with(HERMES_CLOSE) {
        Opened::Whole(vec![call], at + gap + HERMES_CLOSE.len())
    } else if HERMES_CLOSE.starts_with(rest) {
        if end {
            Opened::Whole(vec![call], body.len())
        } else {
            Opened::NeedMore(Some(call.0))
        }
    } else {
        Opened::Invalid
    }
}

/// A parameter's value in Qwen's XML calls: text for a declared string; otherwise JSON (as
/// the template writes objects, arrays and numbers), Python's `True`/`False`/`None` (as its
/// `| string` writes them), else text.
fn xml_value(raw: &str, declared_string: bool) -> Value {
    if declared_string {
        return Value::String(raw.to_owned());
    }
    match raw.trim() {
        "True" => Value::Bool(true),
        "False" => Value::Bool(false),
        "None" => Value::Null,
        trimmed => serde_json::from_str(trimmed).unwrap_or_else(|_| Value::String(raw.to_owned())),
    }
}

/// A DeepSeek call after its `<｜tool▁call▁begin｜>`: `name<｜tool▁sep｜>{...}` (V3.1), or
/// `function<｜tool▁sep｜>name` and a fenced ```` ```json ```` block (V3, R1).
fn parse_deepseek(body: &str, end: bool) -> Opened {
    let Some(sep) = body.find(SEP) else {
        return if body.contains(CALL_END) || body.len() > 256 {
            Opened::Invalid
        } else {
            Opened::NeedMore(None)
        };
    };
    let head = body[..sep].trim();
    let after_sep = sep + SEP.len();
    let after = &body[after_sep..];
    let gap = ws_len(after);
    let fenced = head == "function" && !after[gap..].starts_with('{');
    let (name, json_at) = if fenced {
        if after[gap..].is_empty() {
            return Opened::NeedMore(None);
        }
        // The name on its own line, then the fence.
        let Some(nl) = after.find('\n') else {
            return if after.len() > 256 {
                Opened::Invalid
            } else {
                Opened::NeedMore(None)
            };
        };
        let name = after[..nl].trim();
        if !crate::tools::is_function_name(name) {
            return Opened::Invalid;
        }
        let fence = &after[nl..];
        let lead = ws_len(fence);
        let text = &fence[lead..];
        let open = if text.starts_with("```json") {
            "```json".len()
        } else if "```json".starts_with(text) {
            return Opened::NeedMore(Some(name.to_owned()));
        } else if text.starts_with("```") {
            3
        } else {
            return Opened::Invalid;
        };
        (name, after_sep + nl + lead + open)
    } else {
        if !crate::tools::is_function_name(head) {
            return Opened::Invalid;
        }
        (head, after_sep)
    };
    let json = &body[json_at..];
    let gap = ws_len(json);
    let then = After::DeepSeekClose { fenced };
    match json[gap..].chars().next() {
        None => Opened::NeedMore(Some(name.to_owned())),
        Some('{') => Opened::Stream {
            name: name.to_owned(),
            used: json_at + gap,
            in_object: false,
            then,
        },
        // Another value (the V3.1 template writes string arguments as a JSON string):
        // parsed whole; its closing is dropped between calls.
        Some(_) => match json_prefix(json) {
            Ok((value, used)) => {
                let arguments = match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                };
                let mut taken = json_at + used;
                if fenced {
                    // The fence's end is part of the call: wait for it.
                    let rest = &body[taken..];
                    let lead = ws_len(rest);
                    if rest[lead..].starts_with("```") {
                        taken += lead + 3;
                    } else if "```".starts_with(&rest[lead..]) && !end {
                        return Opened::NeedMore(Some(name.to_owned()));
                    }
                }
                Opened::Whole(vec![(name.to_owned(), arguments)], taken)
            }
            Err(true) => Opened::NeedMore(Some(name.to_owned())),
            Err(false) => Opened::Invalid,
        },
    }
}

/// How far a [`JsonScan`] got in the text it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scanned {
    /// All of it taken; the value is not complete yet.
    Open,
    /// The value is complete: the text after it is not taken.
    Complete,
    /// The text cannot continue a JSON value: the rest is not taken.
    Broken,
}

/// What a [`JsonScan`] expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value.
    Value,
    /// After `[`: a value or `]`.
    FirstItem,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    Key,
    Colon,
    /// After a value in a container: `,` or the container's close.
    Next,
    /// Inside a string (a key's when `key`), after a backslash when `escape`, in a `\u`
    /// escape with `hex` digits to go.
    Str {
        key: bool,
        escape: bool,
        hex: u8,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`, `at` bytes of `word` read.
    Literal {
        word: &'static str,
        at: usize,
    },
    Done,
}

/// Where a number is in JSON's number grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// The next state after `c`, if `c` continues the number.
    fn next(self, c: char) -> Option<Num> {
        let digit = c.is_ascii_digit();
        match (self, c) {
            (Num::Minus, '0') => Some(Num::Zero),
            (Num::Minus, _) if digit => Some(Num::Int),
            (Num::Int, _) if digit => Some(Num::Int),
            (Num::Zero | Num::Int, '.') => Some(Num::Dot),
            (Num::Dot | Num::Frac, _) if digit => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, 'e' | 'E') => Some(Num::Exp),
            (Num::Exp, '+' | '-') => Some(Num::ExpSign),
            (Num::Exp | Num::ExpSign | Num::ExpDigits, _) if digit => Some(Num::ExpDigits),
            _ => None,
        }
    }

    /// The number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

/// What one character is to a [`JsonScan`].
enum Char {
    /// Part of the value.
    Keep,
    /// Whitespace between tokens: dropped from the compact text.
    Space,
    /// Cannot continue the value.
    Bad,
}

/// An incremental JSON syntax check: it reads one value a character at a time, so a call's
/// arguments can be given out as they come while what was given out stays the start of a
/// valid value, and it knows where the value ends without waiting for more text.
#[derive(Debug, Clone)]
struct JsonScan {
    /// The open containers, `{` or `[`.
    stack: Vec<u8>,
    expect: Expect,
}

impl JsonScan {
    fn new() -> Self {
        Self {
            stack: Vec::new(),
            expect: Expect::Value,
        }
    }

    /// Inside an object, after a member's value: reads the object's other members and its
    /// `}`.
    fn after_member() -> Self {
        Self {
            stack: vec![b'{'],
            expect: Expect::Next,
        }
    }

    /// Reads the start of `text`: the bytes taken, the compact text of what they hold, and
    /// how far the value got.
    fn run(&mut self, text: &str) -> (usize, String, Scanned) {
        let mut kept = String::new();
        for (at, c) in text.char_indices() {
            match self.push(c) {
                Char::Keep => kept.push(c),
                Char::Space => {}
                Char::Bad => return (at, kept, Scanned::Broken),
            }
            if self.expect == Expect::Done {
                return (at + c.len_utf8(), kept, Scanned::Complete);
            }
        }
        (text.len(), kept, Scanned::Open)
    }

    /// A value ended: the container's next, or the end.
    fn value_done(&mut self) {
        self.expect = if self.stack.is_empty() {
            Expect::Done
        } else {
            Expect::Next
        };
    }

    fn push(&mut self, c: char) -> Char {
        let space = matches!(c, ' ' | '\t' | '\n' | '\r');
        match self.expect {
            Expect::Str { key, escape, hex } => {
                self.expect = match (escape, hex, c) {
                    (_, 1.., _) if c.is_ascii_hexdigit() => Expect::Str {
                        key,
                        escape: false,
                        hex: hex - 1,
                    },
                    (_, 1.., _) => return Char::Bad,
                    (true, _, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => Expect::Str {
                        key,
                        escape: false,
                        hex: 0,
                    },
                    (true, _, 'u') => Expect::Str {
                        key,
                        escape: false,
                        hex: 4,
                    },
                    (true, _, _) => return Char::Bad,
                    (false, _, '"') if key => Expect::Colon,
                    (false, _, '"') => {
                        self.value_done();
                        self.expect
                    }
                    (false, _, '\\') => Expect::Str {
                        key,
                        escape: true,
                        hex: 0,
                    },
                    (false, _, _) if (c as u32) < 0x20 => return Char::Bad,
                    (false, _, _) => self.expect,
                };
                Char::Keep
            }
            Expect::Number(num) => match num.next(c) {
                Some(next) => {
                    self.expect = Expect::Number(next);
                    Char::Keep
                }
                None if num.complete() => {
                    // The number ended before `c`, which the container reads.
                    self.value_done();
                    self.push(c)
                }
                None => Char::Bad,
            },
            Expect::Literal { word, at } => {
                if word.as_bytes().get(at) != Some(&(c as u8)) || !c.is_ascii() {
                    return Char::Bad;
                }
                if at + 1 == word.len() {
                    self.value_done();
                } else {
                    self.expect = Expect::Literal { word, at: at + 1 };
                }
                Char::Keep
            }
            Expect::Done => Char::Bad,
            _ if space => Char::Space,
            Expect::Colon if c == ':' => {
                self.expect = Expect::Value;
                Char::Keep
            }
            Expect::Colon => Char::Bad,
            Expect::FirstKey | Expect::Key if c == '"' => {
                self.expect = Expect::Str {
                    key: true,
                    escape: false,
                    hex: 0,
                };
                Char::Keep
            }
            Expect::FirstKey if c == '}' => self.close(b'{'),
            Expect::FirstKey | Expect::Key => Char::Bad,
            Expect::FirstItem if c == ']' => self.close(b'['),
            Expect::Next => match (c, self.stack.last()) {
                (',', Some(b'{')) => {
                    self.expect = Expect::Key;
                    Char::Keep
                }
                (',', _) => {
                    self.expect = Expect::Value;
                    Char::Keep
                }
                ('}', _) => self.close(b'{'),
                (']', _) => self.close(b'['),
                _ => Char::Bad,
            },
            Expect::Value | Expect::FirstItem => {
                self.expect = match c {
                    '{' => {
                        self.stack.push(b'{');
                        Expect::FirstKey
                    }
                    '[' => {
                        self.stack.push(b'[');
                        Expect::FirstItem
                    }
                    '"' => Expect::Str {
                        key: false,
                        escape: false,
                        hex: 0,
                    },
                    '-' => Expect::Number(Num::Minus),
                    '0' => Expect::Number(Num::Zero),
                    '1'..='9' => Expect::Number(Num::Int),
                    't' => Expect::Literal {
                        word: "true",
                        at: 1,
                    },
                    'f' => Expect::Literal {
                        word: "false",
                        at: 1,
                    },
                    'n' => Expect::Literal {
                        word: "null",
                        at: 1,
                    },
                    _ => return Char::Bad,
                };
                Char::Keep
            }
        }
    }

    /// `}` or `]`: closes the innermost container if it is of that kind.
    fn close(&mut self, open: u8) -> Char {
        if self.stack.last() != Some(&open) {
            return Char::Bad;
        }
        self.stack.pop();
        self.value_done();
        Char::Keep
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

/// Outputs the responders' tests share, so that the stream's and the whole response's
/// tests check the same calls.
#[cfg(test)]
pub(crate) mod samples {
    /// A call as a model's tokens bring it, after some content.
    pub(crate) const CALL: &[&str] = &[
        "Let me look.",
        "<tool_call>",
        "\n{\"",
        "name",
        "\": \"",
        "get",
        "_weather",
        "\",",
        " \"arguments\": {\"",
        "city",
        "\": \"",
        "Par",
        "is\", \"",
        "unit",
        "\": \"",
        "celsius",
        "\"}}",
        "\n</tool_call>\n",
    ];
    /// `CALL`'s arguments.
    pub(crate) const CALL_ARGUMENTS: &str = r#"{"city":"Paris","unit":"celsius"}"#;
    /// A call cut by `max_tokens` inside its arguments.
    pub(crate) const CUT_IN_ARGUMENTS: &[&str] = &[
        "<tool_call>",
        "\n{\"name\": \"get_weather\", \"arguments\": {",
        "\"city\": \"Pa",
    ];
    /// `CUT_IN_ARGUMENTS`' arguments.
    pub(crate) const CUT_ARGUMENTS: &str = r#"{"city":"Pa"#;
    /// A call cut by `max_tokens` before its name is known.
    pub(crate) const CUT_BEFORE_NAME: &[&str] = &["<tool_call>", "\n{\"name\": \"get_wea"];
}

#[cfg(test)]
mod template_calls;

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
            string_params: Vec::new(),
        }
    }

    /// Feeds `text` in pieces of `step` bytes (on char boundaries) and merges the pieces.
    pub(super) fn parse(
        spec: ParserSpec,
        text: &str,
        step: usize,
    ) -> (String, String, Vec<(String, String)>) {
        let pieces = pieces(spec, text, step);
        let (mut r, mut c, mut calls) = (String::new(), String::new(), Vec::new());
        for piece in pieces {
            match piece {
                Piece::Reasoning(t) => r.push_str(&t),
                Piece::Content(t) => c.push_str(&t),
                Piece::CallStart { name, .. } => calls.push((name, String::new())),
                Piece::CallArguments(t) => calls.last_mut().unwrap().1.push_str(&t),
                Piece::CallEnd => {}
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
    fn deepseek_calls_in_both_forms_at_every_split() {
        let v31 = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"location\": \"Paris\", \"unit\": \"celsius\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let r1 = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"location\": \"Paris\", \"unit\": \"celsius\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let want = vec![
            (
                "get_weather".to_owned(),
                "{\"location\":\"Paris\",\"unit\":\"celsius\"}".to_owned(),
            ),
            ("f".to_owned(), "{}".to_owned()),
        ];
        for text in [v31, r1] {
            for step in 1..=text.len().min(40) {
                let (r, c, calls) = parse(
                    spec(Some(CallSyntax::DeepSeek), true, false),
                    &format!("<think>ok</think>{text}"),
                    step,
                );
                assert_eq!(r, "ok", "step {step}");
                assert_eq!(c, "Checking.", "step {step}: {text}");
                assert_eq!(calls, want, "step {step}: {text}");
            }
        }
        // Text after the calls is content again; a call without the section's opener is
        // taken; string arguments (the V3.1 template's `tojson` of a string) are unwrapped.
        let (_, c, calls) = parse(
            spec(Some(CallSyntax::DeepSeek), false, false),
            "<｜tool▁call▁begin｜>f<｜tool▁sep｜>\"{\\\"a\\\": 1}\"<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n\nDone.",
            5,
        );
        assert_eq!(c, "Done.");
        assert_eq!(calls, vec![("f".to_owned(), "{\"a\": 1}".to_owned())]);
    }

    #[test]
    fn qwen_xml_calls_typed_by_the_tools_at_every_split() {
        let text = "Sure.\n<tool_call>\n<function=set_alarm>\n<parameter=hour>\n7\n</parameter>\n<parameter=loud>\nTrue\n</parameter>\n<parameter=label>\n07\n</parameter>\n<parameter=days>\n[\"mon\", \"tue\"]\n</parameter>\n<parameter=note>\ntwo\nlines\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=f>\n</function>\n</tool_call>";
        let spec = ParserSpec {
            calls: Some(CallSyntax::QwenXml),
            string_params: vec![("set_alarm".to_owned(), "label".to_owned())],
            ..ParserSpec::default()
        };
        let want = vec![
            (
                "set_alarm".to_owned(),
                r#"{"hour":7,"loud":true,"label":"07","days":["mon","tue"],"note":"two\nlines"}"#
                    .to_owned(),
            ),
            ("f".to_owned(), "{}".to_owned()),
        ];
        for step in (1..=30).chain([text.len()]) {
            let (_, c, calls) = parse(spec.clone(), text, step);
            assert_eq!(c, "Sure.\n", "step {step}");
            assert_eq!(calls, want, "step {step}");
        }
        // Cut by max_tokens: the complete parameters are kept, no markup becomes content.
        let cut =
            "<tool_call>\n<function=set_alarm>\n<parameter=hour>\n7\n</parameter>\n<parameter=lo";
        let (_, c, calls) = parse(spec.clone(), cut, 4);
        assert_eq!(c, "");
        assert_eq!(
            calls,
            vec![("set_alarm".to_owned(), r#"{"hour":7}"#.to_owned())]
        );
        // Hermes JSON after the marker is not this syntax: content.
        let hermes = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let (_, c, calls) = parse(spec, hermes, 3);
        assert_eq!((c.as_str(), calls.len()), (hermes, 0));
    }

    #[test]
    fn deepseek_edge_cases_at_every_split() {
        let s = || spec(Some(CallSyntax::DeepSeek), false, false);
        // The R1 form with arguments given as a JSON string: the fence's end waits.
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n\"{\\\"a\\\": 1}\"\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>Done.";
        // An opener followed by no call stays content, opener included.
        let not_a_call = "<｜tool▁calls▁begin｜>Sorry, no tool fits.";
        // A broken call closed by the section's end only: what follows is content.
        let broken = "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": ]<｜tool▁calls▁end｜>Then text.";
        for step in 1..=text.len() {
            let (_, c, calls) = parse(s(), text, step);
            assert_eq!(c, "Done.", "step {step}");
            assert_eq!(
                calls,
                vec![("f".to_owned(), "{\"a\": 1}".to_owned())],
                "step {step}"
            );
            if step <= not_a_call.len() {
                let (_, c, calls) = parse(s(), not_a_call, step);
                assert_eq!((c.as_str(), calls.len()), (not_a_call, 0), "step {step}");
            }
            if step <= broken.len() {
                let (_, c, calls) = parse(s(), broken, step);
                assert_eq!((c.as_str(), calls.len()), ("Then text.", 1), "step {step}");
            }
        }
    }

    #[test]
    fn deepseek_markup_never_leaks_into_content() {
        let s = || spec(Some(CallSyntax::DeepSeek), false, false);
        // Cut by max_tokens inside the arguments, inside the name, inside a marker.
        let (_, c, calls) = parse(
            s(),
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get<｜tool▁sep｜>{\"city\": \"Pa",
            4,
        );
        assert_eq!((c.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].1, "{\"city\":\"Pa");
        let (_, c, calls) = parse(s(), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>ge", 3);
        assert_eq!((c.as_str(), calls.len()), ("", 0));
        let (_, c, calls) = parse(s(), "Hi<｜tool▁calls▁begin｜><｜tool▁call", 3);
        assert_eq!((c.as_str(), calls.len()), ("Hi", 0));
        // Broken JSON ends the call with what it had and drops the rest of its markup.
        let (_, c, calls) = parse(
            s(),
            "<｜tool▁call▁begin｜>get<｜tool▁sep｜>{\"a\": 1]]<｜tool▁call▁end｜><｜tool▁calls▁end｜>after",
            2,
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(c, "after");
        // Not a call (no valid name): content, as vLLM leaves it.
        let text = "<｜tool▁call▁begin｜>not a name<｜tool▁sep｜>{}<｜tool▁call▁end｜>";
        let (_, c, calls) = parse(s(), text, 3);
        assert_eq!((c.as_str(), calls.len()), (text, 0));
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
            string_params: Vec::new(),
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
        let nameless = "<tool_call>{\"name\": 5, \"arguments\": {}}</tool_call> after";
        let (_, c, calls) = parse(spec(Some(CallSyntax::Hermes), false, false), nameless, 3);
        assert!(calls.is_empty());
        assert_eq!(c, nameless);
        // Cut by the end of the output, a call whose name is known is a call (with the
        // arguments it has), not content: see `calls_cut_by_the_end_leave_no_markup`.
        let cut = "<tool_call>{\"name\": \"a\", \"argu";
        let (_, c, calls) = parse(spec(Some(CallSyntax::Hermes), false, false), cut, 3);
        assert_eq!(calls, vec![("a".to_owned(), String::new())]);
        assert_eq!(c, "");
    }

    #[test]
    fn single_call_keeps_the_first() {
        let mut s = spec(Some(CallSyntax::Hermes), false, false);
        s.single_call = true;
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let (_, _, calls) = parse(s, text, 7);
        assert_eq!(calls.len(), 1);
    }

    /// Feeds `text` in pieces of `step` bytes and returns every piece given out.
    fn pieces(spec: ParserSpec, text: &str, step: usize) -> Vec<Piece> {
        let mut p = OutputParser::new(spec);
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            out.extend(p.feed(&text[i..j]));
            i = j;
        }
        out.extend(p.finish());
        out
    }

    fn fragments(pieces: &[Piece]) -> Vec<&str> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::CallArguments(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn arguments_stream_as_they_are_generated() {
        let hermes = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"15e\\\"\", \"unit\": \"celsius\", \"days\": [1, 2.5e-3, true, null]}}\n</tool_call>\n";
        let mistral_named = "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Nice\", \"days\": 3}";
        let mistral_list = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Nice\"}}, {\"name\": \"b\", \"parameters\": {\"x\": {}}}]";
        let named = |name: &str, arguments: &str| (name.to_owned(), arguments.to_owned());
        for (syntax, text, expected) in [
            (
                CallSyntax::Hermes,
                hermes,
                // The model's text without its whitespace (its numbers as it wrote them).
                vec![named(
                    "get_weather",
                    "{\"city\":\"Paris \\\"15e\\\"\",\"unit\":\"celsius\",\"days\":[1,2.5e-3,true,null]}",
                )],
            ),
            (
                CallSyntax::Mistral,
                mistral_named,
                vec![named("get_weather", "{\"city\":\"Nice\",\"days\":3}")],
            ),
            (
                CallSyntax::Mistral,
                mistral_list,
                vec![
                    named("get_weather", "{\"city\":\"Nice\"}"),
                    named("b", "{\"x\":{}}"),
                ],
            ),
        ] {
            let calls = expected.len();
            let s = spec(Some(syntax), false, false);
            let whole = parse(s.clone(), text, text.len());
            assert_eq!(whole.1, "", "{text}");
            assert_eq!(whole.2, expected, "{text}");
            for (_, arguments) in &whole.2 {
                serde_json::from_str::<Value>(arguments).unwrap();
            }
            for step in [1, 2, 3, 5] {
                let out = pieces(s.clone(), text, step);
                // More than one fragment per call, concatenating to the whole arguments.
                assert!(fragments(&out).len() > calls, "step {step}: {out:?}");
                assert_eq!(parse(s.clone(), text, step), whole, "step {step}");
                // Each call opens before its first fragment and ends after its last.
                let shape: Vec<u8> = out
                    .iter()
                    .map(|p| match p {
                        Piece::CallStart { .. } => b'(',
                        Piece::CallArguments(_) => b'a',
                        Piece::CallEnd => b')',
                        _ => b'.',
                    })
                    .filter(|&b| b != b'a')
                    .collect();
                assert_eq!(shape, b"()".repeat(calls), "step {step}");
            }
        }
        // The opening goes out as soon as it is unambiguous, before the arguments end.
        let mut p = OutputParser::new(spec(Some(CallSyntax::Hermes), false, false));
        assert!(p.feed("<tool_call>{\"name\": \"get_weather\", ").is_empty());
        let out = p.feed("\"arguments\": {\"ci");
        assert!(matches!(&out[0], Piece::CallStart { name, .. } if name == "get_weather"));
        assert_eq!(out[1], Piece::CallArguments("{\"ci".to_owned()));
        assert_eq!(
            p.feed("ty\": "),
            vec![Piece::CallArguments("ty\":".to_owned())]
        );
    }

    #[test]
    fn other_call_shapes_come_whole() {
        // Arguments before the name, or as a string: parsed when the call is complete.
        let s = spec(Some(CallSyntax::Hermes), false, false);
        let text = "<tool_call>{\"arguments\": {\"x\": 1}, \"name\": \"f\"}</tool_call><tool_call>{\"name\": \"g\", \"arguments\": \"{\\\"y\\\": 2}\"}</tool_call>";
        for step in [1, 4, text.len()] {
            let out = pieces(s.clone(), text, step);
            assert_eq!(
                fragments(&out),
                vec!["{\"x\":1}", "{\"y\": 2}"],
                "step {step}"
            );
        }
    }

    #[test]
    fn calls_cut_by_the_end_leave_no_markup() {
        let hermes = spec(Some(CallSyntax::Hermes), false, false);
        let mistral = spec(Some(CallSyntax::Mistral), false, false);
        let named = |name: &str, arguments: &str| vec![(name.to_owned(), arguments.to_owned())];
        for (s, text, calls) in [
            // Inside the arguments: the arguments so far.
            (
                &hermes,
                "Sure.<tool_call>\n{\"name\": \"get\", \"arguments\": {\"city\": \"Pa",
                named("get", "{\"city\":\"Pa"),
            ),
            // The call is complete, its closing marker is not.
            (
                &hermes,
                "Sure.<tool_call>{\"name\": \"get\", \"arguments\": {}}\n</tool_",
                named("get", "{}"),
            ),
            (
                &hermes,
                "Sure.<tool_call>{\"arguments\": {}, \"name\": \"get\"}",
                named("get", "{}"),
            ),
            // Before the name is known: dropped.
            (&hermes, "Sure.<tool_call>\n{\"name\": \"ge", vec![]),
            (&hermes, "Sure.<tool_call>", vec![]),
            (&hermes, "Sure.<tool_call>{\"arguments\": {\"x\": ", vec![]),
            (
                &mistral,
                "Sure.[TOOL_CALLS]get[ARGS]{\"city\": \"Ly",
                named("get", "{\"city\":\"Ly"),
            ),
            (
                &mistral,
                "Sure.[TOOL_CALLS]get[CALL_ID]abc123def",
                named("get", ""),
            ),
            (&mistral, "Sure.[TOOL_CALLS]get_wea", vec![]),
            // A second call cut inside its marker: the first call, no markup.
            (
                &hermes,
                "Sure.<tool_call>{\"name\": \"get\", \"arguments\": {}}</tool_call>\n<tool",
                named("get", "{}"),
            ),
            (
                &hermes,
                "Sure.<tool_call>{\"name\": \"get\", \"arguments\": {}}</tool_call>\n<tool_call",
                named("get", "{}"),
            ),
            (
                &mistral,
                "Sure.[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {\"y\": [",
                vec![
                    ("a".to_owned(), "{\"x\":1}".to_owned()),
                    ("b".to_owned(), "{\"y\":[".to_owned()),
                ],
            ),
            (
                &mistral,
                "Sure.[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"argu",
                vec![
                    ("a".to_owned(), "{}".to_owned()),
                    ("b".to_owned(), String::new()),
                ],
            ),
        ] {
            for step in [1, 3, text.len()] {
                let (_, c, got) = parse(s.clone(), text, step);
                assert_eq!(c, "Sure.", "{text} step {step}");
                assert_eq!(got, calls, "{text} step {step}");
            }
        }
    }

    #[test]
    fn a_started_call_that_breaks_keeps_its_markup_out_of_content() {
        let s = spec(Some(CallSyntax::Hermes), false, false);
        for (text, arguments) in [
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": nope}}</tool_call>\nAfter.",
                // `n` may still begin `null`.
                "{\"a\":n",
            ),
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}}</tool_call> After.",
                "{\"a\":1}",
            ),
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}, \"id\": [2]}</tool_call>After.",
                "{\"a\":1}",
            ),
        ] {
            for step in [1, 3, text.len()] {
                let (_, c, calls) = parse(s.clone(), text, step);
                assert_eq!(
                    calls,
                    vec![("f".to_owned(), arguments.to_owned())],
                    "{text}"
                );
                assert_eq!(c, "After.", "{text} step {step}");
            }
        }
    }

    #[test]
    fn single_call_drops_the_later_calls_fragments() {
        let mut s = spec(Some(CallSyntax::Hermes), false, false);
        s.single_call = true;
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {\"y\": 2}}</tool_call>";
        let out = pieces(s, text, 2);
        assert_eq!(fragments(&out).concat(), "{\"x\":1}");
        assert_eq!(out.iter().filter(|p| **p == Piece::CallEnd).count(), 1);
    }

    #[test]
    fn the_scan_reads_json_as_serde_does() {
        for good in [
            "{}",
            "{ \"a\" : [ ] , \"b\":[1,-0.5E+3, 0, -12e4,\"\\u00e9\\n\\/\"],\"c\":{\"d\":false}}",
            "{\"é ü\": \"日本\", \"t\": true, \"n\": null, \"z\": [[[]]]}",
        ] {
            let mut scan = JsonScan::new();
            let text = format!("{good} tail");
            let (used, kept, state) = scan.run(&text);
            assert_eq!((used, state), (good.len(), Scanned::Complete), "{good}");
            let a: Value = serde_json::from_str(&kept).unwrap();
            let b: Value = serde_json::from_str(good).unwrap();
            assert_eq!(a, b);
            // The same, a character at a time.
            let mut scan = JsonScan::new();
            let mut pieces = String::new();
            for c in good.chars() {
                let (_, kept, _) = scan.run(&c.to_string());
                pieces.push_str(&kept);
            }
            assert_eq!(pieces, kept);
        }
        for (bad, at) in [
            ("{\"a\" 1}", 5),
            ("{\"a\": 01}", 7),
            ("{\"a\": tru}", 9),
            ("{\"a\": [1,]}", 9),
            ("{\"a\": \"\\x\"}", 8),
            ("{\"a\": 1]", 7),
            ("{a: 1}", 1),
            ("{\"a\": -}", 7),
        ] {
            let (used, _, state) = JsonScan::new().run(bad);
            assert_eq!((used, state), (at, Scanned::Broken), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err());
        }
        let (_, _, state) = JsonScan::new().run("{\"a\": [1, 2");
        assert_eq!(state, Scanned::Open);
    }

    #[test]
    fn the_shared_samples_parse_as_the_responders_expect() {
        use super::samples::*;
        let s = spec(Some(CallSyntax::Hermes), false, false);
        let run = |tokens: &[&str]| {
            let mut p = OutputParser::new(s.clone());
            let mut out: Vec<Piece> = tokens.iter().flat_map(|t| p.feed(t)).collect();
            out.extend(p.finish());
            out
        };
        let out = run(CALL);
        assert!(fragments(&out).len() > 5);
        assert_eq!(fragments(&out).concat(), CALL_ARGUMENTS);
        assert_eq!(fragments(&run(CUT_IN_ARGUMENTS)).concat(), CUT_ARGUMENTS);
        assert!(run(CUT_BEFORE_NAME).is_empty());
    }

    #[test]
    fn ids_have_their_shapes() {
        assert_eq!(call_id(true).len(), 9);
        assert!(call_id(false).starts_with("call_"));
    }
}
