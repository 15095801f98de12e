//! Chat templates: Hugging Face Jinja templates rendered with minijinja.
//!
//! Hugging Face renders `tokenizer.chat_template` in a Jinja2 sandbox with `trim_blocks` and
//! `lstrip_blocks` on, the `loopcontrols` extension, a `raise_exception(message)` global and a
//! `tojson` filter that is plain `json.dumps(..., ensure_ascii=False)` (no HTML escaping,
//! Python's `", "` / `": "` separators). We set minijinja up the same way, with Python string
//! and dict methods (`.strip()`, `.startswith()`, `.items()`, ...) from minijinja-contrib.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::TokenizerError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

const TEMPLATE_NAME: &str = "chat_template";

/// Carries the message of `raise_exception` through minijinja's error chain.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compiles `source`; a syntax error gives [`TokenizerError::TemplateSyntax`].
    pub fn new(source: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(
                    Error::new(ErrorKind::InvalidOperation, "raise_exception called")
                        .with_source(Raised(message)),
                )
            },
        );
        env.add_filter("tojson", tojson);
        env.add_function("strftime_now", |format: String| -> Result<String, Error> {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            strftime(now, &format)
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TokenizerError::TemplateSyntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
        })
    }

    /// The template's source text (to tell which tool-call and reasoning formats it uses).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation.
    ///
    /// The template sees `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
    /// `raise_exception(msg)` gives [`TokenizerError::TemplateRaised`]; other failures give
    /// [`TokenizerError::TemplateRender`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        self.render_context(ctx)
    }

    /// Renders a conversation given as OpenAI-shaped JSON messages (with `tool_calls`,
    /// `tool_call_id`, `name`, `reasoning_content` as the client sent them), the `tools` the
    /// model may call (left undefined when `None`, as templates test `tools is defined`), and
    /// extra variables (`chat_template_kwargs` such as `enable_thinking`), as
    /// `apply_chat_template` does in transformers.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        extra: &serde_json::Map<String, serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let base = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        let tools = match tools {
            Some(tools) => minijinja::context! { tools => Value::from_serialize(tools) },
            None => minijinja::context! {},
        };
        // Earlier contexts win: the fixed variables cannot be overridden by `extra`.
        let ctx = minijinja::value::merge_maps([base, tools, Value::from_serialize(extra)]);
        self.render_context(ctx)
    }

    fn render_context(&self, ctx: Value) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::TemplateRender(describe(&e)))?;
        template.render(ctx).map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(raised) = err.downcast_ref::<Raised>() {
                    return TokenizerError::TemplateRaised(raised.0.clone());
                }
                source = err.source();
            }
            TokenizerError::TemplateRender(describe(&e))
        })
    }
}

/// The error with its detail and location, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(s, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(s, " (line {line})");
    }
    s
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key_text = match key.as_str() {
                    Some(s) => s.to_owned(),
                    None => key.to_string(),
                };
                out.push_str(&json_string(&key_text)?);
                out.push_str(": ");
                write_json(out, &v.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::String => out.push_str(&json_string(v.as_str().unwrap_or(""))?),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        _ => {
            let s = serde_json::to_string(v)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
            out.push_str(&s);
        }
    }
    Ok(())
}

/// Python's `datetime.strftime` for the time `secs` after the Unix epoch, in UTC, with the
/// directives chat templates use (`%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %%`); any
/// other directive is an error rather than a wrong date.
fn strftime(secs: u64, format: &str) -> Result<String, Error> {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs / 86_400;
    let in_day = secs % 86_400;
    let (hour, minute, second) = (in_day / 3600, in_day % 3600 / 60, in_day % 60);
    let (year, month, day) = civil_date(days);
    let day_of_year = days - days_before_year(year) + 1;
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days + 3) % 7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('%') => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        };
    }
    Ok(out)
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// Days from 1970-01-01 to the first day of `year` (>= 1970).
fn days_before_year(year: u64) -> u64 {
    (1970..year)
        .map(|y| if is_leap(y) { 366 } else { 365 })
        .sum()
}

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01.
fn civil_date(mut days: u64) -> (u64, u64, u64) {
    let mut year = 1970;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let lengths = [
        31,
        if is_leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 1;
    for len in lengths {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    (year, month, days + 1)
}

fn json_string(s: &str) -> Result<String, Error> {
    serde_json::to_string(s)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage {
                role: (*r).to_owned(),
                content: (*c).to_owned(),
            })
            .collect()
    }

    /// Renders `pairs` (role, content) with `t`.
    fn render(
        t: &ChatTemplate,
        pairs: &[(&str, &str)],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> String {
        t.render(&msgs(pairs), add_generation_prompt, bos, eos)
            .unwrap()
    }

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn strftime_matches_python_in_utc() {
        // Python's datetime.fromtimestamp(t, timezone.utc).strftime(...) for each t.
        let format = "%Y-%m-%d %y %e %j %H:%M:%S %I %p %a %A %b %B %%";
        for (t, python) in [
            (
                0,
                "1970-01-01 70  1 001 00:00:00 12 AM Thu Thursday Jan January %",
            ),
            (
                951_829_261,
                "2000-02-29 00 29 060 13:01:01 01 PM Tue Tuesday Feb February %",
            ),
            (
                1_767_312_000,
                "2026-01-02 26  2 002 00:00:00 12 AM Fri Friday Jan January %",
            ),
            (
                4_102_444_799,
                "2099-12-31 99 31 365 23:59:59 11 PM Thu Thursday Dec December %",
            ),
            (
                1_709_251_199,
                "2024-02-29 24 29 060 23:59:59 11 PM Thu Thursday Feb February %",
            ),
        ] {
            assert_eq!(strftime(t, format).unwrap(), python, "t = {t}");
        }
        assert!(strftime(0, "%Q").is_err());
        assert!(strftime(0, "trailing %").is_err());
        // Through a template, today's date.
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let year: u64 = t.render(&[], false, "", "").unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    #[test]
    fn smollm2_template_adds_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2).unwrap();
        let out = render(&t, &[("user", "Hi!")], true, "<|im_start|>", "<|im_end|>");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = render(
            &t,
            &[("system", "Be brief."), ("user", "Hi!")],
            false,
            "",
            "",
        );
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        );
    }

    /// The Llama-3 instruct template (its structure, with trim/lstrip-sensitive whitespace).
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn llama3_template_uses_bos_and_trim() {
        let t = ChatTemplate::new(LLAMA3).unwrap();
        let out = render(
            &t,
            &[("user", "  Hello  ")],
            true,
            "<|begin_of_text|>",
            "<|eot_id|>",
        );
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on_like_hugging_face() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let out = t
            .render(&msgs(&[("user", " a "), ("user", "b")]), false, "", "")
            .unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src).unwrap();
        let e = t
            .render(&msgs(&[("assistant", "x")]), false, "", "")
            .unwrap_err();
        assert!(
            matches!(e, TokenizerError::TemplateRaised(ref m) if m == "Conversation must start with user"),
            "{e:?}"
        );
        assert_eq!(
            t.render(&msgs(&[("user", "x")]), false, "", "").unwrap(),
            "ok"
        );
    }

    #[test]
    fn syntax_and_render_errors_are_typed() {
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(TokenizerError::TemplateSyntax(_))
        ));
        let t = ChatTemplate::new("{{ messages[0].content.nope() }}").unwrap();
        assert!(matches!(
            t.render(&msgs(&[("user", "x")]), false, "", ""),
            Err(TokenizerError::TemplateRender(_))
        ));
    }

    #[test]
    fn python_methods_and_tojson_behave_like_python() {
        let src = "{% if messages[0].content.startswith('Hé') %}yes{% endif %} {{ messages[0].content.upper() }} {{ messages[0] | tojson }} {{ {'a': [1, 2.5, none, true]} | tojson }}";
        let t = ChatTemplate::new(src).unwrap();
        let out = t
            .render(&msgs(&[("user", "Hé <b>")]), false, "", "")
            .unwrap();
        assert_eq!(
            out,
            r#"yes HÉ <B> {"role": "user", "content": "Hé <b>"} {"a": [1, 2.5, null, true]}"#
        );
        let t = ChatTemplate::new("{{ {'a': [1]} | tojson(indent=2) }}").unwrap();
        assert_eq!(
            t.render(&[], false, "", "").unwrap(),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }
}
